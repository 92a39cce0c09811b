"""The fold runs of a k-fold job: which are finished, live or dead, and training one fold
(here or as an executor task in another process)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from training.config import train_config_from
from training.executor import run_tasks, worker_identity
from training.fold_runs import latest_finished_fold_runs
from training.kfold_job import KFoldJob
from training.names import fold_run_name
from training.pipeline import execute, plan_training
from training.tracking import (
    RunTracker,
    TrackingTarget,
    child_runs,
    heartbeat_age,
    set_run_status,
    set_run_tags,
    tracking_target,
    use_tracking_target,
)

log = logging.getLogger(__name__)


@dataclass
class FoldStates:
    """A job's folds as its runs show them now."""

    finished: dict[int, str] = field(default_factory=dict)  # fold -> the run that counts
    live: dict[int, str] = field(default_factory=dict)  # fold -> a RUNNING run, heartbeat fresh


def fold_states(parent_run_id: str, folds: int, grace_seconds: float) -> FoldStates:
    """Finished folds (training.fold_runs: the newest FINISHED run, the rule promotion uses
    too) and folds training elsewhere right now. A RUNNING fold run whose heartbeat is older
    than `grace_seconds` belongs to a dead process: it is marked FAILED, so it is neither
    counted nor mistaken for a live one. A live sibling is left alone; so are runs that are
    not fold runs (the `mlflow run` launcher nested under the job is RUNNING while it runs)."""
    states = FoldStates()
    for run in child_runs(parent_run_id, "attributes.status = 'RUNNING'"):
        tag = run.data.tags.get("fold", "")
        if not tag.isdigit():  # the `mlflow run` launcher nested under the job: alive
            continue
        age = heartbeat_age(run)
        if age <= grace_seconds:
            states.live[int(tag)] = run.info.run_id
            continue
        log.warning("fold run %s: no heartbeat for %.0f s, marked FAILED", run.info.run_id, age)
        mark_dead(run.info.run_id, f"no heartbeat for {age:.0f} s: its process died")
    states.finished = {
        fold: run.info.run_id
        for fold, run in latest_finished_fold_runs(parent_run_id, folds).items()
    }
    return states


def mark_dead(run_id: str, reason: str) -> None:
    set_run_status(run_id, "FAILED")
    set_run_tags(run_id, {"superseded": "true", "error": reason})


def end_earlier_attempts(parent_run_id: str, fold: int, task_id: str) -> int:
    """Before a Ray task trains its fold again: runs of earlier attempts of the same task
    still RUNNING belong to a dead worker (Ray retries a task only when its worker died),
    so they are marked FAILED now, without waiting for their heartbeat to go stale.
    Returns the number of earlier attempts."""
    where = f"tags.fold = '{fold}' and tags.ray_task_id = '{task_id}'"
    earlier = child_runs(parent_run_id, where)
    for run in earlier:
        if run.info.status == "RUNNING":
            log.warning("fold %d: run %s of a dead attempt marked FAILED", fold, run.info.run_id)
            mark_dead(run.info.run_id, "its worker process died; Ray ran the fold again")
    return len(earlier)


def train_fold(job: KFoldJob, fold: int, parent_run_id: str, progress: bool = True) -> str:
    """One fold as a full `train` run nested under the job, with a heartbeat while it trains
    and the worker that trains it (host, pid, Ray task and attempt) as tags."""
    cfg = job.cfg
    val_mask = job.fold_of == fold
    plan = plan_training(train_config_from(cfg), job.data, val_mask)
    tags = {"fold": fold, "job": "train", "kfold_parent": parent_run_id, **worker_identity()}
    if "ray_task_id" in tags:
        tags["attempt"] = end_earlier_attempts(parent_run_id, fold, tags["ray_task_id"])
    log.info(
        "fold %d/%d: %d train, %d val images",
        fold + 1,
        cfg.folds,
        (~val_mask).sum(),
        val_mask.sum(),
    )
    with RunTracker(
        cfg.experiment_name,
        fold_run_name(fold),
        parent_run_id=parent_run_id,
        tags=tags,
        heartbeat_seconds=cfg.heartbeat_seconds,
    ) as run:
        run.log_params({"fold": fold, "folds": cfg.folds})
        outcome = execute(plan, run, progress=progress)
    return outcome.run_id


@dataclass(frozen=True)
class FoldTask:
    """What a fold task needs besides the job (which travels once, as the shared object)."""

    fold: int
    parent_run_id: str
    target: TrackingTarget | None = None  # set for tasks in other processes


def run_fold_task(job: KFoldJob, task: FoldTask) -> str:
    """An executor task: one fold, logged to the job's store (module level: Ray imports it)."""
    if task.target is not None:
        use_tracking_target(task.target)
    return train_fold(job, task.fold, task.parent_run_id, progress=task.target is None)


def train_folds(job: KFoldJob, folds: list[int], parent_run_id: str, experiment_id: str) -> None:
    """Train `folds` with the job's executor: here one after another, or one Ray task each
    (the decoded images shipped once through Ray's object store)."""
    if not folds:
        return
    cfg = job.cfg
    remote = cfg.executor != "local"
    target = tracking_target(experiment_id) if remote else None
    if remote and not target.uri.startswith(("http://", "https://")) and cfg.ray_address:
        log.warning(
            "tracking store %s: workers on other machines cannot reach it; set "
            "MLFLOW_TRACKING_URI to a tracking server (see README, Team set-up)",
            target.uri,
        )
    tasks = [FoldTask(fold, parent_run_id, target) for fold in folds]

    def done(index: int, run_id: str) -> None:
        log.info("fold %d finished: run %s", folds[index], run_id)

    run_tasks(
        run_fold_task,
        job,
        tasks,
        cfg,
        names=[fold_run_name(fold) for fold in folds],
        on_done=done,
    )
