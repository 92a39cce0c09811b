"""Near-duplicate images before a split: find the pairs, group them, count pairs a split cuts."""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import pandas as pd
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

log = logging.getLogger(__name__)

PAIR_COLUMNS = ["index_a", "index_b", "method", "score"]


@dataclass(frozen=True)
class DuplicateSearch:
    """How near-duplicates are searched; the defaults are measured (docs/leakage.md).

    Every image becomes a `side` x `side` grey descriptor. A pair's score is the best
    normalised cross-correlation (NCC: 1 = the same picture up to brightness and contrast) of
    one image's centre against the other shifted by up to `max_shift` pixels and cropped
    centrally by each of `crops`, in both directions. Exact, resized, re-encoded, slightly
    cropped and slightly shifted copies score >= 0.99; different photos score far lower, but
    different tiny images (8x8 digits) can look alike to 0.99 too.
    """

    threshold: float = 0.99  # score at or above which a pair is reported
    side: int = 32  # descriptor side in pixels
    max_shift: int = 2  # translations searched, in descriptor pixels (2 of 32 = 6 %)
    crops: tuple[float, ...] = (1.0, 0.98, 0.96, 0.94, 0.92, 0.90)  # central crops searched
    blur: float = 1.5  # anti-aliasing sigma (descriptor pixels) for images shrunk >= 2x
    block: int = 4096  # images per block of the pairwise products (memory ~ 8 * block^2 B)

    def __post_init__(self) -> None:
        if not 0 < self.threshold <= 1:
            raise ValueError(f"near-duplicate threshold must be in (0, 1], got {self.threshold}")
        if self.side < 8 or not 0 <= self.max_shift < self.side // 4:
            raise ValueError(f"descriptor side {self.side} / max_shift {self.max_shift} unusable")
        if not self.crops or self.crops[0] != 1.0 or not all(0.5 <= c <= 1 for c in self.crops):
            raise ValueError(f"crops must start with 1.0 and lie in [0.5, 1], got {self.crops}")
        if self.blur < 0 or self.block < 1:
            raise ValueError(f"blur {self.blur} / block {self.block} unusable")


def _grey(image: np.ndarray) -> np.ndarray:
    if image.ndim == 3 and image.shape[2] >= 3:
        image = cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2GRAY)
    elif image.ndim == 3:
        image = image[..., 0]
    return image.astype(np.float32)


def _resize(grey: np.ndarray, side: int) -> np.ndarray:
    # Area averaging when shrinking (it also cancels JPEG noise); bilinear when enlarging tiny
    # images such as the 8x8 digits.
    shrinking = min(grey.shape) >= side
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(grey, (side, side), interpolation=interpolation)


def crop_views(image: np.ndarray, search: DuplicateSearch) -> np.ndarray:
    """(len(crops), side, side) grey views: the image squeezed to a square, and central crops."""
    grey = _grey(image)
    fine = 2 * search.side  # crop on a finer grid than the descriptor, then shrink
    base = _resize(grey, fine)
    # Anti-aliasing in proportion to how much the image is shrunk: a photo brought down to the
    # descriptor is low-passed so its copies resampled at other sizes, crops and shifts alias
    # alike; an image enlarged to it (8x8 digits) has no such detail and stays sharp.
    shrink = min(grey.shape) / search.side
    sigma = search.blur * float(np.clip(shrink - 1, 0, 1))
    views = []
    for crop in search.crops:
        keep = max(search.side, round(fine * crop))
        start = (fine - keep) // 2
        view = _resize(base[start : start + keep, start : start + keep], search.side)
        views.append(cv2.GaussianBlur(view, (0, 0), sigma) if sigma > 0.05 else view)
    return np.stack(views)


def _unit_rows(windows: np.ndarray) -> np.ndarray:
    """Flattened windows, each zero-mean with unit norm (flat windows stay zero)."""
    rows = windows.reshape(len(windows), -1)
    rows = rows - rows.mean(axis=1, keepdims=True)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 1e-3)


def _block_scores(
    views_a: np.ndarray, views_b: np.ndarray, search: DuplicateSearch, same: bool
) -> np.ndarray:
    """Best aligned NCC of every image of block a against every image of block b."""
    r, side = search.max_shift, search.side
    inner = side - 2 * r
    centre = slice(r, r + inner)

    def references(views: np.ndarray) -> np.ndarray:
        return _unit_rows(views[:, 0, centre, centre])  # crop 1.0, unshifted

    def shifted(views: np.ndarray, crop: int, dy: int, dx: int) -> np.ndarray:
        return _unit_rows(views[:, crop, r + dy : r + dy + inner, r + dx : r + dx + inner])

    ref_a, ref_b = references(views_a), references(views_b)
    best = np.full((len(views_a), len(views_b)), -1.0, dtype=np.float32)
    for crop in range(len(search.crops)):
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                np.maximum(best, ref_a @ shifted(views_b, crop, dy, dx).T, out=best)
                if not same:  # the other direction; within one block the transpose gives it
                    np.maximum(best, (ref_b @ shifted(views_a, crop, dy, dx).T).T, out=best)
    return np.maximum(best, best.T) if same else best


def _pixel_ids(images: Sequence[np.ndarray]) -> np.ndarray:
    """One id per distinct decoded image (same shape and pixels = same id)."""
    digests = [
        hashlib.sha1(str(image.shape).encode() + np.ascontiguousarray(image).tobytes()).digest()
        for image in images
    ]
    return np.unique(digests, return_inverse=True)[1]


def _exact_pairs(ids: np.ndarray) -> pd.DataFrame:
    """Every pair of identical images (flat ones too, which NCC cannot score)."""
    members: dict[int, list[int]] = {}
    for index, image_id in enumerate(ids.tolist()):
        members.setdefault(image_id, []).append(index)
    pairs = [pair for same in members.values() for pair in itertools.combinations(same, 2)]
    frame = pd.DataFrame(pairs, columns=["index_a", "index_b"], dtype=int)
    return frame.assign(method="exact", score=1.0)


def find_near_duplicates(
    images: Sequence[np.ndarray], search: DuplicateSearch | None = None
) -> pd.DataFrame:
    """Pairs (index_a < index_b) of near-duplicate images with `method` and `score`.

    `method` is `exact` for identical decoded pixels (score 1) and `ncc` for the others (the
    aligned NCC of DuplicateSearch, rounded to 5 decimals). Every pair is compared: O(n^2)
    in blocks of matrix products (about 12 s for 1,527 images on 2 CPU cores).
    """
    search = search or DuplicateSearch()
    n = len(images)
    ids = _pixel_ids(images) if n else np.zeros(0, dtype=int)
    found = [_exact_pairs(ids)]
    views = np.stack([crop_views(image, search) for image in images]) if n else None
    starts = range(0, n, search.block)
    for a in starts:
        for b in (s for s in starts if s >= a):
            scores = _block_scores(
                views[a : a + search.block], views[b : b + search.block], search, a == b
            )
            rows, cols = np.nonzero(scores >= search.threshold)
            index_a, index_b = rows + a, cols + b
            keep = (index_a < index_b) & (ids[index_a] != ids[index_b])
            found.append(
                pd.DataFrame(
                    {
                        "index_a": index_a[keep],
                        "index_b": index_b[keep],
                        "method": "ncc",
                        "score": scores[rows[keep], cols[keep]].astype(float).round(5),
                    }
                )
            )
    pairs = pd.concat(found, ignore_index=True)[PAIR_COLUMNS]
    log.info("%d near-duplicate pair(s) among %d images", len(pairs), n)
    return pairs.sort_values(["index_a", "index_b"], ignore_index=True)


def duplicate_groups(
    n_images: int, pairs: pd.DataFrame, groups: np.ndarray | None = None
) -> np.ndarray:
    """Group id (int) of every image: connected components of the near-duplicate pairs, merged
    with the explicit `groups` (images sharing a group id stay together, as before)."""
    rows = list(pairs["index_a"].astype(int)) if len(pairs) else []
    cols = list(pairs["index_b"].astype(int)) if len(pairs) else []
    if groups is not None:
        if len(groups) != n_images:
            raise ValueError(f"{len(groups)} group ids for {n_images} images")
        _, first_of = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
        leader = {}
        for index, group in enumerate(first_of):
            rows.append(leader.setdefault(group, index))
            cols.append(index)
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n_images, n_images))
    _, component = connected_components(graph, directed=False)
    return component


def pairs_across(pairs: pd.DataFrame, side: np.ndarray) -> int:
    """How many pairs have their two images on different sides: `side` is a validation mask
    (holdout split) or a fold index per image (k-fold)."""
    if len(pairs) == 0:
        return 0
    side = np.asarray(side)
    a, b = pairs["index_a"].to_numpy(int), pairs["index_b"].to_numpy(int)
    return int((side[a] != side[b]).sum())


def leakage_metrics(pairs: pd.DataFrame, side: np.ndarray | None = None) -> dict[str, int]:
    """`near_duplicate_pairs`; with a split mask or fold assignment also
    `near_duplicates_across_split`."""
    metrics = {"near_duplicate_pairs": len(pairs)}
    if side is not None:
        metrics["near_duplicates_across_split"] = pairs_across(pairs, side)
    return metrics


def describe_pairs(
    pairs: pd.DataFrame, table: pd.DataFrame, side: np.ndarray | None = None
) -> pd.DataFrame:
    """The pairs with both images' path and label (and split side) for `near_duplicates.csv`;
    `table` is LabelledImages.table."""
    a, b = pairs["index_a"].to_numpy(int), pairs["index_b"].to_numpy(int)
    described = pairs.copy()
    for suffix, index in (("a", a), ("b", b)):
        described[f"path_{suffix}"] = table["path"].to_numpy()[index]
        described[f"label_{suffix}"] = table["label"].to_numpy()[index]
        if side is not None:
            described[f"side_{suffix}"] = np.asarray(side)[index]
    if side is not None:
        described["across"] = described["side_a"] != described["side_b"]
    return described
