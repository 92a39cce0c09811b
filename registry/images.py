"""Model input rows (base64 image-file bytes or paths) to decoded images and member batches."""

from __future__ import annotations

import base64
import binascii
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import UnidentifiedImageError

from registry.tta import View, apply_view
from training.data import decode_image
from training.transforms import decode_side, eval_transform, to_tensor


class ImageInputError(ValueError):
    """One input row cannot be turned into an image; it becomes an error row."""


@dataclass(frozen=True)
class Preprocessing:
    """How one member saw its images in training (from its logged model metadata)."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    face_crop: bool = False
    crop_pct: float = 0.0  # centre square seen (training.transforms); 0 = whole image, squashed

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> Preprocessing:
        return cls(
            image_size=int(meta["image_size"]),
            mean=tuple(float(v) for v in meta["mean"]),
            std=tuple(float(v) for v in meta["std"]),
            face_crop=bool(meta.get("face_crop", False)),
            crop_pct=float(meta.get("crop_pct", 0.0)),  # models before it squashed
        )

    @property
    def decode_side(self) -> int:
        """The shorter side training decoded its images at."""
        return decode_side(self.image_size, self.crop_pct)

    @property
    def decode_key(self) -> tuple[int, bool]:
        """Members sharing this key share one decoded copy of each image."""
        return self.decode_side, self.face_crop


def _present(value: Any) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return str(value).strip() != ""


def row_bytes(image: Any, path: Any) -> bytes:
    """The image file's bytes from a base64 string (a `data:` URL prefix is allowed) or a path."""
    if _present(image):
        text = str(image).strip()
        if text.startswith("data:") and "," in text:
            text = text.split(",", 1)[1]
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ImageInputError("column 'image' is not valid base64") from None
    if _present(path):
        try:
            return Path(str(path)).read_bytes()
        except FileNotFoundError:
            raise ImageInputError(f"file not found: {path}") from None
        except OSError as err:
            raise ImageInputError(f"cannot read {path}: {err}") from None
    raise ImageInputError("row has neither an 'image' nor a 'path' value")


def decode_bytes(data: bytes, prep: Preprocessing) -> np.ndarray:
    """Decode exactly as training did: uint8 RGB, face crop if trained so, shorter side
    shrunk as training did (training.data.decode_image), before the eval transform."""
    try:
        return decode_image(io.BytesIO(data), prep.decode_side, prep.face_crop)
    except UnidentifiedImageError:
        raise ImageInputError("unreadable image (not a known image format)") from None
    except (OSError, ValueError, SyntaxError) as err:  # truncated or malformed files
        raise ImageInputError(f"unreadable image ({type(err).__name__}: {err})") from None


def member_batch(
    images: Sequence[np.ndarray], views: Sequence[View], prep: Preprocessing
) -> torch.Tensor:
    """(N * V, 3, S, S) float tensor, image-major: rows i*V .. i*V+V-1 are image i's views."""
    transform = eval_transform(prep.image_size, prep.mean, prep.std, prep.crop_pct)
    return torch.stack(
        [
            to_tensor(transform(image=apply_view(image, view))["image"])
            for image in images
            for view in views
        ]
    )
