"""A job's data, loaded once: decoded and validated images, then the near-duplicate check and
the groups every split and fold keeps whole (shared by train, kfold and tune)."""

from __future__ import annotations

import logging

from training.config import TrainConfig
from training.data import LabelledImages, load_labelled_images
from training.leakage import DuplicateSearch, duplicate_groups, find_near_duplicates
from training.model import view_crop_pct
from training.transforms import decode_side

log = logging.getLogger(__name__)


def load_job_data(
    cfg: TrainConfig, min_per_class: int = 2, reason: str = "a stratified split"
) -> LabelledImages:
    """Decode and validate (DataError on bad data), then look for near-duplicates before any
    split: `near_duplicates=group` merges them into the split groups, `report` only records
    them, `off` skips the check."""
    data = load_labelled_images(
        cfg.data,
        decode_side(cfg.image_size, view_crop_pct(cfg.model, cfg.resize)),
        cfg.path_column,
        cfg.label_column,
        cfg.group_column,
        face_crop=cfg.augment == "facecrop",
        min_per_class=min_per_class,
        split_reason=reason,
    )
    if cfg.near_duplicates == "off":
        return data
    pairs = find_near_duplicates(data.images, DuplicateSearch(threshold=cfg.duplicate_threshold))
    data.duplicate_pairs = pairs
    if cfg.near_duplicates == "group" and len(pairs):
        # Only when there is something to group: with no pairs the splits stay exactly those
        # of the explicit groups (or of the ungrouped, stratified splitters).
        data.duplicate_groups = duplicate_groups(len(data), pairs, data.groups)
        log.info("%d near-duplicate pair(s) kept on one side of every split", len(pairs))
    elif len(pairs):
        log.warning(
            "%d near-duplicate pair(s) found, not grouped (near_duplicates=report)", len(pairs)
        )
    return data
