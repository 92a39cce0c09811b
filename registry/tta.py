"""Deterministic test-time-augmentation views: identity, horizontal flip, then seeded crops."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TTA_SEED = 4  # fixed: the same views, in the same order, on every machine and every call
MAX_VIEWS = 16
CROP_SCALE = (0.80, 0.95)  # side of a crop as a fraction of the image side


@dataclass(frozen=True)
class View:
    """A crop box as fractions of the image (top, left, height, width) and a mirror flag."""

    top: float = 0.0
    left: float = 0.0
    height: float = 1.0
    width: float = 1.0
    flip: bool = False


# How apply_view works, for ensemble.json: enough to reproduce the views outside Python.
VIEW_RECIPE = (
    "Views are applied to each member's decoded image (uint8 RGB, H x W, after the shorter "
    "side was shrunk as the member's preprocessing says), before the member's centre crop "
    "and resize: "
    "top = round(view.top * H), left = round(view.left * W), "
    "bottom = min(H, max(top + 1, round((view.top + view.height) * H))), "
    "right = min(W, max(left + 1, round((view.left + view.width) * W))), "
    "where round() rounds halves to even (Python round, numpy.round); keep rows top:bottom "
    "and columns left:right; if flip, mirror left-right; then centre square, resize and "
    "normalise as the member's preprocessing says. A request with tta = n uses the first n "
    "views."
)


def tta_views(count: int) -> list[View]:
    """The first `count` views. View lists are prefixes of each other: asking for 4 views
    gives the 3-view list plus one, so results with fewer views stay comparable.

    Unlike seed 004's random TTA, nothing depends on global random state: crops come from a
    private generator with a fixed seed.
    """
    if not 1 <= count <= MAX_VIEWS:
        raise ValueError(f"tta must be between 1 and {MAX_VIEWS} views, got {count}")
    views = [View(), View(flip=True)]
    rng = np.random.default_rng(TTA_SEED)
    for index in range(2, count):
        scale = float(rng.uniform(*CROP_SCALE))
        top, left = (float(v) for v in rng.uniform(0.0, 1.0 - scale, size=2))
        views.append(View(top, left, scale, scale, flip=index % 2 == 1))
    return views[:count]


def apply_view(image: np.ndarray, view: View) -> np.ndarray:
    """Crop and mirror a uint8 HWC image; the member's own resize follows."""
    rows, cols = image.shape[:2]
    top, left = round(view.top * rows), round(view.left * cols)
    bottom = min(rows, max(top + 1, round((view.top + view.height) * rows)))
    right = min(cols, max(left + 1, round((view.left + view.width) * cols)))
    crop = image[top:bottom, left:right]
    if view.flip:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(crop)
