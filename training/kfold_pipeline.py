"""The k-fold job end to end: prepare, train the folds not finished or live elsewhere (here or
on Ray), then aggregate once. Library code: training/kfold.py is only its CLI."""

from __future__ import annotations

import logging

from training.kfold_aggregate import aggregate_once
from training.kfold_folds import fold_states, train_folds
from training.kfold_job import (
    KFoldConfig,
    KFoldError,
    KFoldJob,
    KFoldOutcome,
    check_parent,
    prepare_job,
)
from training.names import job_run_name
from training.pipeline import log_near_duplicates
from training.tracking import RunTracker, get_run

log = logging.getLogger(__name__)


def run_kfold(cfg: KFoldConfig) -> KFoldOutcome:
    """Prepare, train the missing folds, aggregate. Bad input fails before any run.

    A new job holds its parent run open while it trains (RUNNING; SCHEDULED when it ends
    with folds missing). A process continuing a job (`parent_run_id`) never touches the
    parent's status while it trains: concurrent fold processes would overwrite each other.
    Only the process that aggregates opens it, and ends it FINISHED."""
    job = prepare_job(cfg)
    if cfg.parent_run_id:
        check_parent(job, cfg.parent_run_id)
        experiment_id = get_run(cfg.parent_run_id).info.experiment_id
        return continue_job(job, cfg.parent_run_id, experiment_id)
    with _new_parent(job) as parent:
        parent.log_csv(job.folds_table(), "folds.csv")
        log_near_duplicates(parent, job.data, job.fold_of)
        parent.set_tags({"kfold_state": "prepared", "executor": cfg.executor})
        if cfg.prepare_only:
            parent.end_status = "SCHEDULED"  # waiting for its folds, not finished
            return KFoldOutcome(parent.run_id, [], {}, "prepared")
        experiment_id = get_run(parent.run_id).info.experiment_id
        outcome = continue_job(job, parent.run_id, experiment_id, parent)
        if not outcome.summary:
            parent.end_status = "SCHEDULED"
        return outcome


def _new_parent(job: KFoldJob) -> RunTracker:
    cfg = job.cfg
    return RunTracker(
        cfg.experiment_name,
        cfg.run_name or job_run_name("kfold", cfg.data, cfg.model),
        tags=job.job_tags(),
        params=job.job_params(),
    )


def continue_job(
    job: KFoldJob, parent_run_id: str, experiment_id: str, parent: RunTracker | None = None
) -> KFoldOutcome:
    """Train this invocation's folds unless finished or live elsewhere; then read the folds
    again (others may have finished meanwhile) and aggregate if all are finished."""
    cfg = job.cfg
    grace = cfg.heartbeat_grace_seconds
    if cfg.aggregate_only:
        states = fold_states(parent_run_id, cfg.folds, grace)
        missing = sorted(set(range(cfg.folds)) - set(states.finished))
        if missing:
            raise KFoldError(f"k-fold job {parent_run_id}: folds {missing} are not finished yet")
    else:
        states = fold_states(parent_run_id, cfg.folds, grace)
        wanted = [cfg.fold] if cfg.fold >= 0 else list(range(cfg.folds))
        todo = [fold for fold in wanted if _needs_training(fold, states)]
        train_folds(job, todo, parent_run_id, experiment_id)
        states = fold_states(parent_run_id, cfg.folds, grace)
    finished = states.finished
    run_ids = [finished[fold] for fold in sorted(finished)]
    if len(finished) < cfg.folds:
        log.info(
            "folds finished: %s of %d (training elsewhere: %s); the process that finishes "
            "the last fold aggregates",
            sorted(finished),
            cfg.folds,
            sorted(states.live) or "none",
        )
        return KFoldOutcome(parent_run_id, run_ids, {}, "folds pending")
    summary = aggregate_once(job, parent_run_id, finished, parent, force=cfg.aggregate_only)
    if summary is None:
        return KFoldOutcome(parent_run_id, run_ids, {}, "aggregated by another process")
    return KFoldOutcome(parent_run_id, run_ids, summary)


def _needs_training(fold: int, states) -> bool:
    if fold in states.finished:
        log.info("fold %d already finished (run %s): skipped", fold, states.finished[fold])
        return False
    if fold in states.live:
        log.info(
            "fold %d is training in another process (run %s): skipped", fold, states.live[fold]
        )
        return False
    return True
