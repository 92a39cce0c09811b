"""Find labelled images (class folders or a CSV manifest), decode each once, and validate them."""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from training.faces import crop_largest_face

log = logging.getLogger(__name__)


class DataError(ValueError):
    """The data cannot be used for training; the message names the file, folder or column."""


@dataclass
class LabelledImages:
    """Decoded uint8 RGB images with labels; `table` has path, label, group, label_index."""

    table: pd.DataFrame
    images: list[np.ndarray]
    class_names: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    digest: str = ""
    source: str = ""
    duplicate_pairs: pd.DataFrame | None = None  # near-duplicate check; None = not run
    duplicate_groups: np.ndarray | None = None  # groups that keep near-copies together
    file_hashes: list[str] = field(default_factory=list)  # SHA-1 of each file's bytes

    @property
    def labels(self) -> np.ndarray:
        return self.table["label_index"].to_numpy()

    @property
    def split_groups(self) -> np.ndarray | None:
        """What every split and fold keeps whole: the explicit groups merged with the
        near-duplicate groups when those are on, else the explicit groups (or None)."""
        return self.duplicate_groups if self.duplicate_groups is not None else self.groups

    @property
    def label_names(self) -> np.ndarray:
        return self.table["label"].to_numpy()

    @property
    def groups(self) -> np.ndarray | None:
        groups = self.table["group"]
        return None if groups.isna().all() else groups.astype(str).to_numpy()

    def __len__(self) -> int:
        return len(self.images)


def discover(
    source: str | Path,
    path_column: str = "path",
    label_column: str = "label",
    group_column: str = "",
) -> pd.DataFrame:
    """List (path, label, group) rows from a class-folder tree or a CSV manifest."""
    source = Path(source)
    if source.is_dir():
        _refuse_columns_for_folder(source, path_column, label_column, group_column)
        return _discover_folder(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        return _discover_csv(source, path_column, label_column, group_column)
    if source.exists():
        raise DataError(f"data '{source}' is neither a folder of class sub-folders nor a .csv")
    raise DataError(f"data '{source}' does not exist")


def _refuse_columns_for_folder(
    root: Path, path_column: str, label_column: str, group_column: str
) -> None:
    """Column parameters mean nothing for a class-folder tree: refuse them rather than run a
    job that silently ignores them (an ungrouped split the user believes grouped)."""
    given = {
        name: value
        for name, value, default in (
            ("group_column", group_column, ""),
            ("label_column", label_column, "label"),
            ("path_column", path_column, "path"),
        )
        if value != default
    }
    if given:
        name, value = next(iter(given.items()))
        raise DataError(
            f"parameter '{name}'={value!r} applies to a CSV manifest, but data '{root}' is a "
            "folder of class sub-folders (the class is the sub-folder name; there are no "
            "columns and no groups). Write a CSV with path, label and group columns to use it."
        )


def _discover_folder(root: Path) -> pd.DataFrame:
    rows = [
        (str(path), class_dir.name, None)
        for class_dir in sorted(p for p in root.iterdir() if p.is_dir())
        if not class_dir.name.startswith(".")
        for path in sorted(class_dir.rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    ]
    if not rows:
        raise DataError(
            f"data '{root}' has no images in class sub-folders (expected root/<class>/*)"
        )
    return pd.DataFrame(rows, columns=["path", "label", "group"])


def read_manifest(
    csv: Path, columns: dict[str, str], error: type[Exception] = DataError
) -> tuple[pd.DataFrame, list[str]]:
    """A CSV manifest read as text with each given column checked (the error names its
    parameter), and its `path_column` paths made absolute against the CSV's folder."""
    table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    for parameter, column in columns.items():
        if column and column not in table.columns:
            raise error(
                f"{csv}: column '{column}' (parameter '{parameter}') not found; "
                f"columns are {list(table.columns)}"
            )
    if table.empty:
        raise error(f"parameter 'data': {csv} has no rows")
    root = csv.parent
    paths = [str(p if Path(p).is_absolute() else root / p) for p in table[columns["path_column"]]]
    return table, paths


def _discover_csv(
    csv: Path, path_column: str, label_column: str, group_column: str
) -> pd.DataFrame:
    columns = {"path_column": path_column, "label_column": label_column}
    manifest, paths = read_manifest(csv, {**columns, "group_column": group_column})
    groups = manifest[group_column] if group_column else None
    table = pd.DataFrame({"path": paths, "label": manifest[label_column], "group": groups})
    blank = table["label"].str.strip() == ""
    if blank.any():
        raise DataError(
            f"{csv}: {int(blank.sum())} rows have an empty '{label_column}', "
            f"first: {table.loc[blank, 'path'].iloc[0]}"
        )
    return table


def decode_image(
    path: str | Path, max_side: int | None = None, face_crop: bool = False
) -> np.ndarray:
    """Read any PIL-readable file as uint8 RGB (EXIF orientation applied, 16-bit scaled).

    When `max_side` is set, the shorter side is shrunk to it: we keep uint8 at about the
    training size, never float copies.
    """
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(img, dtype=np.float64)
            top = array.max() or 1.0
            img = Image.fromarray((array * (255.0 / top)).astype(np.uint8))
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img)
        img = img.convert("RGB")
        if face_crop:  # before shrinking: the detector needs the detail
            img = Image.fromarray(crop_largest_face(np.asarray(img)))
        if max_side and min(img.size) > max_side:
            scale = max_side / min(img.size)
            size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
            img = img.resize(size, Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8).copy()


def _read(path: str, max_side: int | None, face_crop: bool) -> tuple[np.ndarray | None, str, str]:
    try:
        raw = Path(path).read_bytes()
        digest = hashlib.sha1(raw).hexdigest()
        return decode_image(path, max_side, face_crop), digest, ""
    except FileNotFoundError:
        return None, "", "file not found"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        return None, "", f"unreadable image ({type(err).__name__}: {err})"


def load_images(
    table: pd.DataFrame,
    max_side: int | None,
    face_crop: bool = False,
    workers: int = 4,
    progress: bool = True,
) -> tuple[pd.DataFrame, list[np.ndarray], list[tuple[str, str]], list[str]]:
    """Decode every row once (threads: PIL releases the GIL); skip and report bad files."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(
            tqdm(
                pool.map(lambda p: _read(p, max_side, face_crop), table["path"]),
                total=len(table),
                desc="decode images",
                disable=not progress,
                leave=False,
            )
        )
    keep, images, hashes, skipped = [], [], [], []
    for row_index, (path, (image, file_hash, reason)) in enumerate(
        zip(table["path"], results, strict=True)
    ):
        if image is None:
            log.warning("skipping %s: %s", path, reason)
            skipped.append((path, reason))
            continue
        keep.append(row_index)
        images.append(image)
        hashes.append(file_hash)
    kept = table.iloc[keep].reset_index(drop=True)
    return kept, images, skipped, hashes


def dataset_digest(table: pd.DataFrame, file_hashes: list[str]) -> str:
    """Content digest of the dataset: file bytes, labels and groups, independent of location."""
    hasher = hashlib.sha256()
    for file_hash, label, group in sorted(
        zip(file_hashes, table["label"], table["group"].astype(str), strict=True)
    ):
        hasher.update(f"{file_hash}|{label}|{group}\n".encode())
    return hasher.hexdigest()[:16]


def check_class_counts(labels: pd.Series, source: str, minimum: int, reason: str) -> None:
    """Clear errors for too few classes or a class too small for the split."""
    counts = Counter(labels)
    if len(counts) < 2:
        raise DataError(
            f"data '{source}' has {len(counts)} class(es) {sorted(counts)}; at least 2 are needed"
        )
    small = {name: n for name, n in counts.items() if n < minimum}
    if small:
        raise DataError(
            f"data '{source}': classes {small} have fewer than {minimum} readable images, "
            f"which {reason} needs"
        )


def load_labelled_images(
    source: str | Path,
    shorter_side: int,
    path_column: str = "path",
    label_column: str = "label",
    group_column: str = "",
    face_crop: bool = False,
    min_per_class: int = 2,
    split_reason: str = "a stratified split",
    progress: bool = True,
) -> LabelledImages:
    """Discover, decode once (shorter side shrunk to `shorter_side`), validate; raise DataError
    before any training on bad data."""
    table = discover(source, path_column, label_column, group_column)
    kept, images, skipped, hashes = load_images(
        table, max_side=shorter_side, face_crop=face_crop, progress=progress
    )
    if skipped:
        log.warning("skipped %d unreadable file(s) of %d", len(skipped), len(table))
    if not images:
        raise DataError(f"data '{source}' has no readable images ({len(skipped)} skipped)")
    check_class_counts(kept["label"], str(source), min_per_class, split_reason)
    class_names = sorted(kept["label"].unique())
    kept["label_index"] = kept["label"].map({name: i for i, name in enumerate(class_names)})
    return LabelledImages(
        table=kept,
        images=images,
        class_names=class_names,
        skipped=skipped,
        digest=dataset_digest(kept, hashes),
        source=str(source),
        file_hashes=hashes,
    )
