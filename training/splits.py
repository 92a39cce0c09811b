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
    indices = np.arange(len(labels))
    if groups is None:
        try:
            _, val_idx = train_test_split(
                indices, test_size=val_fraction, stratify=labels, random_state=seed
            )
        except ValueError as err:  # e.g. fewer validation slots than classes
            raise DataError(f"parameter 'val_fraction' = {val_fraction}: {err}") from None
    else:
        # One fold of a StratifiedGroupKFold is the best stratified split that keeps groups whole.
        n_splits = max(2, round(1 / val_fraction))
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        _, val_idx = next(splitter.split(indices, labels, groups))
    mask = np.zeros(len(labels), dtype=bool)
    mask[val_idx] = True
    return mask


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
