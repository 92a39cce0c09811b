"""Albumentations pipelines: training augmentation policies and the deterministic eval view."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import albumentations as A
import cv2
import numpy as np
import torch
from torchvision.transforms.v2 import TrivialAugmentWide

Normalisation = tuple[Sequence[float], Sequence[float]]


def centre_square(image: np.ndarray, crop_pct: float) -> np.ndarray:
    """The part of an image the model sees under `crop_pct` (timm's eval crop): the centred
    square of side crop_pct x the shorter side; 0 = all of it (the squash view)."""
    if not crop_pct:
        return image
    rows, cols = image.shape[:2]
    side = max(1, round(crop_pct * min(rows, cols)))
    top, left = (rows - side) // 2, (cols - side) // 2
    return image[top : top + side, left : left + side]


def decode_side(image_size: int, crop_pct: float) -> int:
    """The shorter side images are decoded at: the crop then keeps about image_size pixels."""
    return math.ceil(image_size / crop_pct) if crop_pct else image_size


def _square(crop_pct: float) -> list:
    # Crop first, then augment and resize: the same part of the image as timm's
    # resize-then-crop; a flip then mirrors exactly what the model sees (the feature cache's
    # mirrored view), and the crop alone is what explain and Grad-CAM show.
    return [A.Lambda(image=partial(_centre_square, crop_pct=crop_pct))] if crop_pct else []


def _finish(image_size: int, mean: Sequence[float], std: Sequence[float]) -> list:
    return [
        A.Resize(image_size, image_size, interpolation=cv2.INTER_LINEAR),
        A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0),
    ]


def _centre_square(image: np.ndarray, crop_pct: float, **_: object) -> np.ndarray:
    return np.ascontiguousarray(centre_square(image, crop_pct))


def train_transform(
    policy: str,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int | None = None,
    crop_pct: float = 0.0,
) -> A.Compose:
    """`base`: seed 000's flip + light colour jitter; `flip`: horizontal flip only (stage 1
    can then train on cached features); `random`: RandAugment-style, two of a pool of ops at
    random strength; `trivial`: TrivialAugment (torchvision's TrivialAugmentWide: one op of
    its pool at a uniformly random strength per image) + flip; `facecrop`: faces were cropped
    at decode time, then base; `none`: resize and normalise only. `crop_pct` as in
    eval_transform (the square is cut before the augmentation)."""
    if policy in ("base", "facecrop"):
        augment = [
            A.HorizontalFlip(p=0.5),
            A.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.0, hue=0.0, p=0.8),
        ]
    elif policy == "flip":
        augment = [A.HorizontalFlip(p=0.5)]
    elif policy == "trivial":
        augment = [A.Lambda(image=_trivial_augment, p=1.0), A.HorizontalFlip(p=0.5)]
    elif policy == "random":
        augment = [
            A.SomeOf(
                [
                    A.Affine(rotate=(-15, 15), p=1.0),
                    A.Affine(shear=(-10, 10), p=1.0),
                    A.Affine(translate_percent=(-0.1, 0.1), p=1.0),
                    A.RandomBrightnessContrast(0.3, 0.3, p=1.0),
                    A.HueSaturationValue(10, 20, 10, p=1.0),
                    A.Equalize(p=1.0),
                    A.Posterize(num_bits=(4, 6), p=1.0),
                    A.Sharpen(p=1.0),
                    A.GaussNoise(std_range=(0.02, 0.08), p=1.0),
                ],
                n=2,
                replace=False,
            ),
            A.HorizontalFlip(p=0.5),
        ]
    elif policy == "none":
        augment = []
    else:
        raise ValueError(f"unknown augmentation policy {policy!r}")
    # Compose keeps its own RNG, untouched by global seeds: seed it for reproducible runs.
    return A.Compose(_square(crop_pct) + augment + _finish(image_size, mean, std), seed=seed)


_TRIVIAL = TrivialAugmentWide()


def _trivial_augment(image: np.ndarray, **_: object) -> np.ndarray:
    """torchvision's TrivialAugmentWide on a uint8 HWC array (it draws from torch's global
    RNG, which every run seeds)."""
    tensor = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    return _TRIVIAL(tensor).numpy().transpose(1, 2, 0)


def eval_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], crop_pct: float = 0.0
) -> A.Compose:
    """Deterministic view for validation and inference: the centre square of side crop_pct x
    the shorter side (0 = the whole image, squashed), resized to image_size, normalised."""
    return A.Compose(_square(crop_pct) + _finish(image_size, mean, std))


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """HWC float32 array → CHW tensor."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
