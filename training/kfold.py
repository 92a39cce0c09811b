"""`kfold` entry point: group-aware k-fold training as nested MLflow runs; resumable, fans out."""

from __future__ import annotations

import hashlib
import logging
import sys
from dataclasses import dataclass

import numpy as np
import pandas as pd

from training import plots
from training.cli import run_entry_point
from training.config import ConfigError, TrainConfig, config_to_dict, train_config_from
from training.data import LabelledImages
from training.fold_runs import latest_finished_fold_runs
from training.kfold_summary import summarise_folds
from training.names import fold_run_name, job_run_name
from training.pipeline import execute, plan_training
from training.run_results import GALLERY_SIZE
from training.splits import assign_folds
from training.tracking import (
    RunTracker,
    child_runs,
    flatten_params,
    get_run,
    set_run_status,
    set_run_tags,
)
from training.train import load_data

log = logging.getLogger(__name__)

# Fields that steer this invocation rather than define the job; a resumed job may differ here.
CONTROL_FIELDS = ("fold", "parent_run_id", "prepare_only", "aggregate_only", "run_name")


class KFoldError(ValueError):
    """A k-fold job that cannot be started, resumed or aggregated as asked."""


@dataclass(frozen=True)
class KFoldConfig(TrainConfig):
    """A `train` config plus the folds; `fold`/`parent_run_id` run one fold of a job."""

    folds: int = 5  # number of folds (StratifiedGroupKFold with a group column)
    fold: int = -1  # run only this fold of `parent_run_id` (fan-out); -1 = every fold
    parent_run_id: str = ""  # continue (or add a fold to) this k-fold job
    prepare_only: bool = False  # create the job (folds decided, no training), print its id
    aggregate_only: bool = False  # only fill the job's summary from its finished folds

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.folds < 2:
            raise ConfigError(f"parameter 'folds': at least 2 folds are needed, got {self.folds}")
        if not -1 <= self.fold < self.folds:
            raise ConfigError(f"parameter 'fold': -1 or 0..{self.folds - 1}, got {self.fold}")
        if (self.fold >= 0 or self.aggregate_only) and not self.parent_run_id:
            raise ConfigError(
                "parameter 'parent_run_id': needed with fold >= 0 or aggregate_only; "
                "create the job first with prepare_only=true"
            )


@dataclass
class KFoldJob:
    """The data and the fold of every image, decided before any training."""

    cfg: KFoldConfig
    data: LabelledImages
    fold_of: np.ndarray

    @property
    def fold_digest(self) -> str:
        return hashlib.sha256(self.folds_table().to_csv(index=False).encode()).hexdigest()[:16]

    def folds_table(self) -> pd.DataFrame:
        table = self.data.table[["path", "label", "group"]].copy()
        table["fold"] = self.fold_of
        return table

    def job_params(self) -> dict:
        params = {k: v for k, v in config_to_dict(self.cfg).items() if k not in CONTROL_FIELDS}
        return {**params, "data_digest": self.data.digest, "fold_digest": self.fold_digest}

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


def prepare_job(cfg: KFoldConfig) -> KFoldJob:
    """Load data and assign folds; clear errors (too many folds for a class) come from here."""
    unit = "groups" if cfg.group_column else "images"
    data = load_data(cfg, min_per_class=2, reason="k-fold")
    fold_of = assign_folds(data.labels, data.groups, cfg.folds, cfg.seed)
    log.info("%d %s in %d folds: %s", len(data), unit, cfg.folds, np.bincount(fold_of).tolist())
    return KFoldJob(cfg, data, fold_of)


def check_parent(job: KFoldJob, parent_run_id: str) -> None:
    """The parent must be a k-fold job over the same data, folds and settings."""
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
    current = flatten_params(job.job_params())
    changed = {k: (params[k], v) for k, v in current.items() if params.get(k, v) != v}
    if changed:
        raise KFoldError(
            f"parameter 'parent_run_id': run {parent_run_id} was started with other settings "
            f"(logged, current): {changed}"
        )


def finished_folds(parent_run_id: str, folds: int) -> dict[int, str]:
    """Fold index → run id of the run that counts (training.fold_runs: the newest FINISHED
    one, the rule promotion uses too). Runs left RUNNING by a dead process are marked
    FAILED, so they are neither counted nor mistaken for live ones."""
    for run in child_runs(parent_run_id, "attributes.status = 'RUNNING'"):
        log.warning("fold run %s was left RUNNING: marked FAILED", run.info.run_id)
        set_run_status(run.info.run_id, "FAILED")
        set_run_tags(run.info.run_id, {"superseded": "true"})
    return {
        fold: run.info.run_id
        for fold, run in latest_finished_fold_runs(parent_run_id, folds).items()
    }


def train_fold(job: KFoldJob, fold: int, parent_run_id: str) -> str:
    """One fold as a full `train` run nested under the job."""
    cfg = job.cfg
    train_cfg = train_config_from(cfg)
    val_mask = job.fold_of == fold
    plan = plan_training(train_cfg, job.data, val_mask)
    tags = {"fold": fold, "job": "train", "kfold_parent": parent_run_id}
    name = fold_run_name(fold)
    log.info(
        "fold %d/%d: %d train, %d val images",
        fold + 1,
        cfg.folds,
        (~val_mask).sum(),
        val_mask.sum(),
    )
    with RunTracker(cfg.experiment_name, name, parent_run_id=parent_run_id, tags=tags) as run:
        run.log_params({"fold": fold, "folds": cfg.folds})
        outcome = execute(plan, run)
    return outcome.run_id


def aggregate(job: KFoldJob, parent: RunTracker) -> dict[str, float]:
    """Fill the job's summary from its finished fold runs (same result however they ran)."""
    finished = finished_folds(parent.run_id, job.cfg.folds)
    missing = sorted(set(range(job.cfg.folds)) - set(finished))
    if missing:
        raise KFoldError(f"k-fold job {parent.run_id}: folds {missing} are not finished yet")
    names = job.data.class_names
    cfg = job.cfg
    summary = summarise_folds(
        job.folds_table(), names, finished, cfg.monitor, cfg.monitor_mode, cfg.keep
    )
    parent.log_metrics(summary.metrics)
    parent.log_csv(summary.per_fold, "folds/metrics.csv")
    parent.log_table(summary.per_fold, "folds/metrics.json")
    parent.log_table(summary.per_class, "folds/per_class.json")
    parent.log_csv(summary.oof, "evaluation/oof_predictions.csv")
    parent.log_dict(summary.confusion, "evaluation/oof_confusion_matrix.json")
    parent.log_figure(
        plots.confusion_matrix_figure(
            summary.confusion["counts"], names, "out-of-fold confusion matrix"
        ),
        "evaluation/oof_confusion_matrix.png",
    )
    parent.log_csv(summary.misclassified, "evaluation/misclassified.csv")
    worst = summary.misclassified.head(GALLERY_SIZE)
    parent.log_figure(
        plots.misclassified_sheet(
            [job.data.images[i] for i in worst.index],
            worst,
            f"out-of-fold: worst {len(worst)} of {len(summary.misclassified)} wrong",
        ),
        "evaluation/misclassified.png",
    )
    parent.log_dict(summary.reliability, "evaluation/oof_reliability.json")
    parent.log_figure(
        plots.reliability_diagram(
            summary.reliability, summary.metrics["oof_ece"], "out-of-fold reliability"
        ),
        "plots/oof_reliability.png",
    )
    parent.log_figure(
        plots.fold_bars(
            summary.per_fold["val_f1_macro"].tolist(),
            "val macro F1",
            summary.metrics["oof_f1_macro"],
        ),
        "plots/fold_f1.png",
    )
    parent.set_tags({"kfold_state": "complete"})
    parent.set_description(describe(job, summary.metrics))
    return summary.metrics


def describe(job: KFoldJob, metrics: dict[str, float]) -> str:
    """The parent's one-line description; the honest estimate first (the number to quote)."""
    cfg = job.cfg
    return (
        f"honest macro F1 {metrics['honest_val_f1_macro']:.3f} "
        f"± {metrics['honest_std_val_f1_macro']:.3f} (accuracy "
        f"{metrics['honest_val_accuracy']:.3f}; each fold read at the epoch the other folds "
        f"chose): {cfg.folds}-fold cross-validation of {cfg.model} on {len(job.data)} images "
        f"({len(job.data.class_names)} classes). Kept weights out-of-fold macro F1 "
        f"{metrics['oof_f1_macro']:.3f} (accuracy {metrics['oof_accuracy']:.3f}, ECE "
        f"{metrics['oof_ece']:.3f}); best epoch per fold, chosen on the fold itself "
        f"(optimistic): {metrics['mean_val_f1_macro']:.3f} ± {metrics['std_val_f1_macro']:.3f}"
    )


def _open_parent(job: KFoldJob) -> RunTracker:
    cfg = job.cfg
    if cfg.parent_run_id:
        check_parent(job, cfg.parent_run_id)
        return RunTracker(cfg.experiment_name, run_id=cfg.parent_run_id)
    return RunTracker(
        cfg.experiment_name,
        cfg.run_name or job_run_name("kfold", cfg.data, cfg.model),
        tags=job.job_tags(),
        params=job.job_params(),
    )


def run_kfold(cfg: KFoldConfig) -> KFoldOutcome:
    """Prepare, train the folds not yet finished, aggregate. Bad input fails before runs."""
    job = prepare_job(cfg)
    with _open_parent(job) as parent:
        if not cfg.parent_run_id:
            parent.log_csv(job.folds_table(), "folds.csv")
            parent.set_tags({"kfold_state": "prepared"})
        if cfg.prepare_only:
            parent.end_status = "SCHEDULED"  # waiting for its folds, not finished
            return KFoldOutcome(parent.run_id, [], {})
        done = finished_folds(parent.run_id, cfg.folds)
        todo = [cfg.fold] if cfg.fold >= 0 else list(range(cfg.folds))
        if cfg.aggregate_only:
            todo = []
        for fold in todo:
            if fold in done:
                log.info("fold %d already finished (run %s): skipped", fold, done[fold])
                continue
            done[fold] = train_fold(job, fold, parent.run_id)
        if len(done) < cfg.folds:
            parent.end_status = "SCHEDULED"
            log.info(
                "folds finished: %s of %d; aggregate runs after the last", sorted(done), cfg.folds
            )
            return KFoldOutcome(parent.run_id, [done[f] for f in sorted(done)], {})
        summary = aggregate(job, parent)
        return KFoldOutcome(parent.run_id, [done[f] for f in sorted(done)], summary)


def report(outcome: KFoldOutcome) -> None:
    if not outcome.summary:
        print(f"k-fold job {outcome.parent_run_id}: {len(outcome.fold_run_ids)} fold(s) finished")
        return
    s = outcome.summary
    print(
        f"k-fold job {outcome.parent_run_id}: honest macro F1 {s['honest_val_f1_macro']:.4f} "
        f"± {s['honest_std_val_f1_macro']:.4f} (accuracy {s['honest_val_accuracy']:.4f}; "
        "each fold read at the epoch chosen on the other folds: quote this one)\n"
        f"  kept weights out-of-fold macro F1 {s['oof_f1_macro']:.4f}, accuracy "
        f"{s['oof_accuracy']:.4f}; best epoch per fold (chosen on the fold, optimistic) "
        f"{s['mean_val_f1_macro']:.4f} ± {s['std_val_f1_macro']:.4f}"
    )


def main(argv: list[str] | None = None) -> int:
    return run_entry_point(KFoldConfig, argv, __doc__, run_kfold, report, (KFoldError,))


if __name__ == "__main__":
    sys.exit(main())
