"""Data layer: discovery, robust decoding, and the clear errors raised before training."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pandas as pd
import pytest
from conftest import write_digits
from PIL import Image

from training.data import DataError, decode_image, load_labelled_images


def test_folder_and_csv_give_the_same_dataset(digits_dir):
    from_folder = load_labelled_images(digits_dir, 32, progress=False)
    from_csv = load_labelled_images(
        digits_dir / "manifest.csv", 32, group_column="person", progress=False
    )
    assert len(from_folder) == len(from_csv) == 40
    assert from_folder.class_names == ["0", "1", "2", "3"]
    assert from_folder.digest == load_labelled_images(digits_dir, 32, progress=False).digest
    assert from_folder.groups is None
    assert from_csv.groups is not None and len(set(from_csv.groups)) == 20
    assert all(img.dtype == np.uint8 and img.shape[2] == 3 for img in from_folder.images)


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_labelled_images(tmp_path / "nope", 32)


def test_missing_csv_column_names_the_column_and_parameter(digits_dir):
    with pytest.raises(DataError, match="'age'.*label_column"):
        load_labelled_images(digits_dir / "manifest.csv", 32, label_column="age")
    with pytest.raises(DataError, match="'pid'.*group_column"):
        load_labelled_images(digits_dir / "manifest.csv", 32, group_column="pid")


def test_empty_dataset(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_labelled_images(tmp_path, 32)
    (tmp_path / "a" / "junk.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="no readable images"):
        load_labelled_images(tmp_path, 32, progress=False)


def test_fewer_than_two_classes(tmp_path):
    write_digits(tmp_path, per_class=5, classes=1)
    with pytest.raises(DataError, match="at least 2 are needed"):
        load_labelled_images(tmp_path, 32, progress=False)


def test_class_too_small_for_the_split(tmp_path):
    write_digits(tmp_path, per_class=5, classes=3)
    for extra in sorted((tmp_path / "2").iterdir())[1:]:
        extra.unlink()
    with pytest.raises(DataError, match=r"\{'2': 1\}.*fewer than 2"):
        load_labelled_images(tmp_path, 32, progress=False)


def test_corrupt_and_non_image_files_are_skipped_and_named(tmp_path, caplog):
    write_digits(tmp_path, per_class=5, classes=2)
    (tmp_path / "0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "1" / "notes.txt").write_text("hello")
    with caplog.at_level(logging.WARNING):
        data = load_labelled_images(tmp_path, 32, progress=False)
    skipped = {path.split("/")[-1] for path, _ in data.skipped}
    assert skipped == {"broken.png", "notes.txt"}
    assert len(data) == 10
    assert "broken.png" in caplog.text and "notes.txt" in caplog.text


def test_image_modes_exif_and_unicode_paths(tmp_path):
    folder = tmp_path / "표정 데이터" / "웃음"
    folder.mkdir(parents=True)
    rgb = np.zeros((20, 10, 3), np.uint8)
    rgb[:10, :, 0] = 255  # top half red
    Image.fromarray(rgb).convert("L").save(folder / "grey.png")
    Image.fromarray(np.dstack([rgb, np.full((20, 10), 128, np.uint8)])).save(folder / "rgba.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "pal.png")
    Image.fromarray((np.arange(200).reshape(20, 10) * 300).astype(np.uint16)).save(
        folder / "deep.png"
    )
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    Image.fromarray(rgb).save(folder / "rotated.jpg", exif=exif)
    for name in ("grey.png", "rgba.png", "pal.png", "deep.png"):
        image = decode_image(folder / name)
        assert image.shape == (20, 10, 3) and image.dtype == np.uint8, name
    assert decode_image(folder / "deep.png").max() == 255  # 16-bit scaled, not clipped to 0
    rotated = decode_image(folder / "rotated.jpg")
    assert rotated.shape == (10, 20, 3)  # EXIF applied: displayed 90° clockwise
    assert rotated[:, 15:, 0].min() > 200 and rotated[:, :5, 0].max() < 60  # top went right
    assert decode_image(folder / "pal.png")[0, 0, 0] > 200  # palette colour kept


def test_decoded_images_are_uint8_at_training_size(tmp_path):
    folder = tmp_path / "big" / "a"
    folder.mkdir(parents=True)
    Image.fromarray(np.zeros((400, 300, 3), np.uint8)).save(folder / "x.png")
    assert decode_image(folder / "x.png", max_side=64).shape == (85, 64, 3)


def test_csv_relative_paths_and_empty_labels(tmp_path, digits_dir):
    shutil.copytree(digits_dir, tmp_path / "copy")
    manifest = pd.read_csv(tmp_path / "copy" / "manifest.csv", dtype=str)
    manifest.loc[0, "label"] = ""
    manifest.to_csv(tmp_path / "copy" / "bad.csv", index=False)
    with pytest.raises(DataError, match="empty 'label'"):
        load_labelled_images(tmp_path / "copy" / "bad.csv", 32)


@pytest.mark.parametrize(
    ("flag", "value"), [("group_column", "person"), ("label_column", "age"), ("path_column", "f")]
)
def test_column_parameters_with_a_class_folder_are_refused(digits_dir, flag, value):
    """A folder has no columns: a grouped job must not silently run ungrouped."""
    with pytest.raises(DataError, match=f"parameter '{flag}'='{value}' applies to a CSV"):
        load_labelled_images(digits_dir, 32, **{flag: value}, progress=False)
