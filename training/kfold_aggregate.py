"""The k-fold job's summary on its parent run, filled once per set of finished fold runs,
whichever process (driver or hand-launched fold) sees the last fold finish."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import uuid

from training import plots
from training.kfold_job import KFoldJob
from training.kfold_summary import summarise_folds
from training.run_results import GALLERY_SIZE
from training.tracking import RunTracker, claim_param

log = logging.getLogger(__name__)


def aggregation_key(finished: dict[int, str]) -> str:
    """The parent param that records who aggregated this exact set of fold runs."""
    runs = ",".join(finished[fold] for fold in sorted(finished))
    return "aggregated_by_" + hashlib.sha256(runs.encode()).hexdigest()[:12]


def claim_aggregation(parent_run_id: str, finished: dict[int, str]) -> bool:
    """True for exactly one of the processes that see the same finished folds: the parent's
    param `aggregated_by_<digest of the fold run ids>` can be logged once (MLflow params never
    change). A fold re-run that finished later is a new set and is aggregated again."""
    claimant = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    return claim_param(parent_run_id, aggregation_key(finished), claimant)


def aggregate_once(
    job: KFoldJob,
    parent_run_id: str,
    finished: dict[int, str],
    parent: RunTracker | None = None,
    force: bool = False,
) -> dict[str, float] | None:
    """Aggregate unless another process claimed these fold runs (None then); `force`
    (aggregate_only) always does. `parent` is the open parent run of this process, if any;
    else the parent is resumed for the summary and ends FINISHED."""
    if not force and not claim_aggregation(parent_run_id, finished):
        log.info("k-fold job %s: aggregated by another process", parent_run_id)
        return None
    if parent is not None:
        return aggregate(job, parent, finished)
    with RunTracker(job.cfg.experiment_name, run_id=parent_run_id) as resumed:
        return aggregate(job, resumed, finished)


def aggregate(job: KFoldJob, parent: RunTracker, finished: dict[int, str]) -> dict[str, float]:
    """Fill the job's summary from its finished fold runs (same result however they ran;
    the same values again when repeated on the same runs)."""
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
    parent.set_tags({"kfold_state": "complete", "kfold_fold_runs": aggregation_key(finished)})
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
