"""Stratified (and group-aware) holdout splits and k-fold assignments, decided before training."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import (
    StratifiedGroupKFold,
    StratifiedKFold,
    train_test_split,
)

from training.data import DataError


def holdout_split(
    labels: np.ndarray, groups: np.ndarray | None, val_fraction: float, seed: int
) -> np.ndarray:
    """Boolean mask of validation rows: stratified; no group on both sides when grouped."""
    if groups is not None:
        return grouped_holdout(labels, groups, val_fraction, seed)
    indices = np.arange(len(labels))
    try:
        _, val_idx = train_test_split(
            indices, test_size=val_fraction, stratify=labels, random_state=seed
        )
    except ValueError as err:  # e.g. fewer validation slots than classes
        raise DataError(f"parameter 'val_fraction' = {val_fraction}: {err}") from None
    mask = np.zeros(len(labels), dtype=bool)
    mask[val_idx] = True
    return mask


def grouped_holdout(
    labels: np.ndarray, groups: np.ndarray, val_fraction: float, seed: int
) -> np.ndarray:
    """Whole groups to validation until it holds `val_fraction` of the images (within one
    group's size), every class on both sides, per-class shares as close as groups allow.

    scikit-learn has no grouped, stratified split to a fraction (one fold of
    StratifiedGroupKFold is 1/k: 0.4 became 0.5), so groups are moved greedily: first one
    group per class (smallest first), then the move (add or remove a group) that brings the
    total nearer the target, choosing among those the one best for the per-class shares."""
    group_ids, group_of = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    classes = np.unique(labels)
    if len(group_ids) < 2:
        raise DataError(
            f"parameter 'val_fraction': a grouped split needs at least 2 groups, the data has "
            f"{len(group_ids)} ({list(group_ids)})"
        )
    # counts[g, c]: images of class c in group g
    counts = np.zeros((len(group_ids), len(classes)), dtype=np.int64)
    np.add.at(counts, (group_of, np.searchsorted(classes, labels)), 1)
    order = np.random.default_rng(seed).permutation(len(group_ids))  # seeded tie-breaks
    counts = counts[order]
    in_val = _seed_every_class(counts, classes)
    _move_towards_target(counts, in_val, val_fraction)
    chosen = order[in_val]
    return np.isin(group_of, chosen)


def _seed_every_class(counts: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """One group per class into validation, leaving every class some training images."""
    in_val = np.zeros(len(counts), dtype=bool)
    for c in np.argsort(counts.sum(axis=0)):  # rarest class first
        if counts[in_val, c].sum() > 0:
            continue
        having = np.flatnonzero((counts[:, c] > 0) & ~in_val)
        train_left = counts[~in_val].sum(axis=0)
        usable = [g for g in having if np.all(train_left - counts[g] > 0)]
        if not usable:
            raise DataError(
                f"parameter 'group_column': class '{classes[c]}' cannot be on both sides of "
                f"a grouped split: its images are in {len(having)} group(s), and each is "
                "needed on the training side"
            )
        in_val[min(usable, key=lambda g: counts[g].sum())] = True
    return in_val


def _move_towards_target(counts: np.ndarray, in_val: np.ndarray, fraction: float) -> None:
    """Add or remove whole groups while that brings the validation total nearer the target."""
    sizes = counts.sum(axis=1)
    target_total = fraction * sizes.sum()
    target_per_class = fraction * counts.sum(axis=0)
    while True:
        val_counts, train_counts = counts[in_val].sum(axis=0), counts[~in_val].sum(axis=0)
        sign = np.where(in_val, -1, 1)  # a move adds a training group or removes a val one
        after = val_counts + sign[:, None] * counts
        keeps_classes = np.all(after > 0, axis=1) & np.all(
            train_counts - sign[:, None] * counts > 0, axis=1
        )
        gap = abs(val_counts.sum() - target_total)
        nearer = np.abs(after.sum(axis=1) - target_total) < gap - 1e-9
        candidates = np.flatnonzero(keeps_classes & nearer)
        if len(candidates) == 0:
            return
        imbalance = ((after[candidates] - target_per_class) ** 2).sum(axis=1)
        in_val[candidates[np.argmin(imbalance)]] ^= True


def check_foldable(labels: np.ndarray, groups: np.ndarray | None, folds: int) -> None:
    """Clear error when a class has fewer images (or groups) than there are folds."""
    if folds < 2:
        raise DataError(f"parameter 'folds': at least 2 folds are needed, got {folds}")
    for label in np.unique(labels):
        members = labels == label
        count = len(np.unique(groups[members])) if groups is not None else int(members.sum())
        unit = "groups" if groups is not None else "images"
        if count < folds:
            raise DataError(
                f"parameter 'folds': {folds} folds need at least {folds} {unit} per class, "
                f"but class index {label} has {count}"
            )


def assign_folds(
    labels: np.ndarray, groups: np.ndarray | None, folds: int, seed: int
) -> np.ndarray:
    """Fold index (0..folds-1) of every row: StratifiedGroupKFold with groups, else
    StratifiedKFold; seeded."""
    check_foldable(labels, groups, folds)
    indices = np.arange(len(labels))
    if groups is None:
        splits = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(
            indices, labels
        )
    else:
        splits = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(
            indices, labels, groups
        )
    fold_of = np.full(len(labels), -1, dtype=int)
    for fold, (_, val_idx) in enumerate(splits):
        fold_of[val_idx] = fold
    return fold_of
