"""Ensemble input rows: base64 / data URL / path decoding, errors, per-member preprocessing."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from registry.images import ImageInputError, Preprocessing, decode_bytes, member_batch, row_bytes
from registry.tta import tta_views
from training.transforms import eval_transform, to_tensor


def _png(width: int = 40, height: int = 30) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_row_bytes_from_base64_data_url_and_path(tmp_path):
    raw = _png()
    text = base64.b64encode(raw).decode()
    assert row_bytes(text, None) == raw
    assert row_bytes(f"data:image/png;base64,{text}", None) == raw
    (tmp_path / "a.png").write_bytes(raw)
    assert row_bytes(float("nan"), str(tmp_path / "a.png")) == raw  # NaN = empty cell


@pytest.mark.parametrize(
    ("image", "path", "message"),
    [
        ("not base64 at all!", None, "not valid base64"),
        (None, "/no/such.png", "file not found"),
        (None, None, "neither"),
    ],
)
def test_row_bytes_errors(image, path, message):
    with pytest.raises(ImageInputError, match=message):
        row_bytes(image, path)


def test_decode_rejects_non_images():
    prep = Preprocessing(32, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ImageInputError, match="unreadable image"):
        decode_bytes(b"GIF89a but not really", prep)


def test_each_member_gets_its_own_size_and_normalisation():
    small = Preprocessing(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    large = Preprocessing(24, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    views = tta_views(2)
    for prep in (small, large):
        image = decode_bytes(_png(), prep)
        assert min(image.shape[:2]) == prep.image_size  # shrunk like training decodes
        batch = member_batch([image, image], views, prep)
        assert batch.shape == (4, 3, prep.image_size, prep.image_size)
        expected = to_tensor(
            eval_transform(prep.image_size, prep.mean, prep.std)(image=image)["image"]
        )
        assert np.allclose(batch[0].numpy(), expected.numpy())  # view 0 is the eval transform
        assert np.allclose(batch[1].numpy(), expected.numpy()[:, :, ::-1], atol=1e-5)  # the flip
