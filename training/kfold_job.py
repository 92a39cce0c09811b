"""A k-fold job as data: its config, the fold of every image, and what makes two jobs the same.

Library code (the `kfold` CLI is training/kfold.py; other packages import this, not it)."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from training.config import ConfigError, TrainConfig, config_to_dict
from training.data import LabelledImages
from training.executor import ExecutorConfig, validate_executor_fields
from training.job_data import load_job_data
from training.splits import assign_folds
from training.tracking import flatten_params, get_run

log = logging.getLogger(__name__)

# Fields that steer this invocation rather than define the job; a resumed job may differ here.
CONTROL_FIELDS = ("fold", "parent_run_id", "prepare_only", "aggregate_only", "run_name")
# Fields that say where and how a process runs, not what is trained: a fold process on
# another machine may differ in all of them (its data path, device, workers, executor...).
RUN_SETTINGS = (
    "data",
    "config",
    "device",
    "num_workers",
    "experiment_name",
    "executor",
    "ray_address",
    "cpus_per_task",
    "gpus_per_task",
    "max_retries",
    "heartbeat_seconds",
    "heartbeat_grace_seconds",
)
HEARTBEAT_SECONDS = 20
GRACE_SECONDS = 90


class KFoldError(ValueError):
    """A k-fold job that cannot be started, resumed or aggregated as asked."""


@dataclass(frozen=True)
class KFoldConfig(ExecutorConfig, TrainConfig):
    """A `train` config plus the folds; `fold`/`parent_run_id` run one fold of a job."""

    folds: int = 5  # number of folds (StratifiedGroupKFold with a group column)
    fold: int = -1  # run only this fold of `parent_run_id` (fan-out); -1 = every fold
    parent_run_id: str = ""  # continue (or add a fold to) this k-fold job
    prepare_only: bool = False  # create the job (folds decided, no training), print its id
    aggregate_only: bool = False  # only fill the job's summary from its finished folds
    heartbeat_seconds: int = HEARTBEAT_SECONDS  # a training fold run renews its heartbeat tag
    heartbeat_grace_seconds: int = GRACE_SECONDS  # a RUNNING fold run silent this long
    # belongs to a dead process: marked FAILED and trained again

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_executor_fields(self)
        if self.folds < 2:
            raise ConfigError(f"parameter 'folds': at least 2 folds are needed, got {self.folds}")
        if not -1 <= self.fold < self.folds:
            raise ConfigError(f"parameter 'fold': -1 or 0..{self.folds - 1}, got {self.fold}")
        if (self.fold >= 0 or self.aggregate_only) and not self.parent_run_id:
            raise ConfigError(
                "parameter 'parent_run_id': needed with fold >= 0 or aggregate_only; "
                "create the job first with prepare_only=true"
            )
        if self.heartbeat_seconds < 1:
            raise ConfigError(
                f"parameter 'heartbeat_seconds': seconds >= 1, got {self.heartbeat_seconds}"
            )
        if self.heartbeat_grace_seconds <= self.heartbeat_seconds:
            raise ConfigError(
                "parameter 'heartbeat_grace_seconds': more than heartbeat_seconds "
                f"({self.heartbeat_seconds}), got {self.heartbeat_grace_seconds}"
            )


@dataclass
class KFoldJob:
    """The data and the fold of every image, decided before any training."""

    cfg: KFoldConfig
    data: LabelledImages
    fold_of: np.ndarray

    @property
    def fold_digest(self) -> str:
        """The fold of every image by content (file bytes, label, group), in data order: the
        same wherever the data folder is."""
        rows = zip(
            self.data.file_hashes,
            self.data.table["label"],
            self.data.table["group"].astype(str),
            self.fold_of,
            strict=True,
        )
        text = "".join(f"{h}|{label}|{group}|{fold}\n" for h, label, group, fold in rows)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def folds_table(self) -> pd.DataFrame:
        table = self.data.table[["path", "label", "group"]].copy()
        table["fold"] = self.fold_of
        return table

    def job_params(self) -> dict:
        """What the parent run logs: the config as it ran plus the digests."""
        params = {k: v for k, v in config_to_dict(self.cfg).items() if k not in CONTROL_FIELDS}
        return {**params, "data_digest": self.data.digest, "fold_digest": self.fold_digest}

    def identity_params(self) -> dict:
        """What every process of the job must agree on: the digests and the settings that
        change what is trained (model, epochs, learning rates, seed, ...)."""
        return {k: v for k, v in self.job_params().items() if k not in RUN_SETTINGS}

    def job_tags(self) -> dict:
        return {
            "job": "kfold",
            "folds": self.cfg.folds,
            "data_digest": self.data.digest,
            "fold_digest": self.fold_digest,
        }


@dataclass
class KFoldOutcome:
    parent_run_id: str
    fold_run_ids: list[str]
    summary: dict[str, float]
    note: str = ""  # why there is no summary (folds pending, aggregated elsewhere)


def prepare_job(cfg: KFoldConfig) -> KFoldJob:
    """Load data and assign folds; clear errors (too many folds for a class) come from here."""
    unit = "groups" if cfg.group_column else "images"
    data = load_job_data(cfg, min_per_class=2, reason="k-fold")
    fold_of = assign_folds(data.labels, data.split_groups, cfg.folds, cfg.seed)
    log.info("%d %s in %d folds: %s", len(data), unit, cfg.folds, np.bincount(fold_of).tolist())
    return KFoldJob(cfg, data, fold_of)


def check_parent(job: KFoldJob, parent_run_id: str) -> None:
    """The parent must be a k-fold job over the same data content, folds and training
    settings; where the data lives, the device, workers and executor may differ."""
    run = get_run(parent_run_id)
    tags, params = run.data.tags, run.data.params
    if tags.get("job") != "kfold":
        raise KFoldError(f"parameter 'parent_run_id': run {parent_run_id} is not a k-fold job")
    for key, expected in (("data_digest", job.data.digest), ("fold_digest", job.fold_digest)):
        if tags.get(key) != expected:
            raise KFoldError(
                f"parameter 'parent_run_id': run {parent_run_id} has {key} {tags.get(key)}, "
                f"the current data gives {expected} (different images, labels or folds)"
            )
    current = flatten_params(job.identity_params())
    changed = {k: (params[k], v) for k, v in current.items() if params.get(k, v) != v}
    if changed:
        raise KFoldError(
            f"parameter 'parent_run_id': run {parent_run_id} was started with other settings "
            f"(logged, current): {changed}"
        )
