"""Adding trials to a study in one worker process: threads, heartbeats, the study-wide limit,
and the worker task that executor=ray runs once per tuning worker."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import optuna
import torch
from optuna.trial import TrialState

from training.data import LabelledImages
from training.tracking import TrackingTarget, use_tracking_target
from tuning.config import TuneConfig
from tuning.objective import Objective
from tuning.space import SearchSpace
from tuning.study import TrialSeededTPESampler, create_pruner, open_study, watching_stale_trials

log = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what `study_trials` counts


@contextmanager
def torch_threads_per_trial(n_jobs: int) -> Iterator[None]:
    """Trials in n_jobs threads share the process's cores: divide torch's intra-op threads
    between them instead of running n_jobs x all-cores threads; restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, before // n_jobs))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def study_full(study: optuna.Study, study_trials: int) -> bool:
    """The study holds `study_trials` finished trials (any worker's; failed ones do not
    count, so a dead worker's share is made up) and none queued: a dead worker's trial queued
    for its retry is run first."""
    if not study_trials:
        return False
    finished = study.get_trials(deepcopy=False, states=FINISHED)
    return len(finished) >= study_trials and not study.get_trials(
        deepcopy=False, states=(TrialState.WAITING,)
    )


def study_limit(study_trials: int) -> list:
    """The callback that stops this worker once the study is full (see study_full). Optuna's
    MaxTrialsCallback counts the same states but would leave a queued retry behind."""

    def stop_when_full(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if study_full(study, study_trials):
            study.stop()

    return [stop_when_full] if study_trials else []


def optimize(study: optuna.Study, objective: Objective, cfg: TuneConfig, n_trials: int) -> None:
    """Run up to `n_trials` trials in `n_jobs` threads, failing dead workers' trials every
    heartbeat, until the study holds `study_trials` (when set)."""
    if study_full(study, cfg.study_trials):
        log.info("study %s holds %d finished trials already", cfg.study_name, cfg.study_trials)
        return
    if n_trials <= 0:
        return
    with torch_threads_per_trial(cfg.n_jobs), watching_stale_trials(study, cfg.heartbeat_seconds):
        study.optimize(
            objective,
            n_trials=n_trials,
            timeout=cfg.timeout or None,
            n_jobs=cfg.n_jobs,
            catch=(RuntimeError,),  # e.g. an optimizer overflow: FAIL, the study goes on
            callbacks=study_limit(cfg.study_trials),
        )


def open_configured_study(cfg: TuneConfig, first_trial: dict | None = None) -> optuna.Study:
    """The study of `cfg` (created, or loaded when it exists) with its sampler and pruner."""
    return open_study(
        cfg.storage,
        cfg.study_name,
        TrialSeededTPESampler(cfg.sampler_seed, cfg.n_startup_trials),
        create_pruner(cfg.pruner, cfg.pruner_warmup_steps, cfg.steps_per_trial),
        first_trial=first_trial,
        heartbeat_seconds=cfg.heartbeat_seconds,
        grace_seconds=cfg.heartbeat_grace_seconds,
    )


@dataclass(frozen=True)
class StudyInput:
    """What every tuning worker task shares (sent once through Ray's object store)."""

    cfg: TuneConfig  # storage resolved to one every worker reaches
    space: SearchSpace
    data: LabelledImages
    parent_run_id: str
    target: TrackingTarget


@dataclass(frozen=True)
class WorkerShare:
    index: int
    n_trials: int


def split_trials(n_trials: int, workers: int) -> list[WorkerShare]:
    """`n_trials` over `workers` as evenly as possible (the first ones get one more)."""
    base, extra = divmod(n_trials, workers)
    return [WorkerShare(i, base + (i < extra)) for i in range(workers)]


def run_worker(shared: StudyInput, share: WorkerShare) -> list[int]:
    """A tuning worker task: its share of trials against the shared study, each trial run
    nested under the study's one parent run. Trials carry the worker's key, so a worker that
    Ray runs again after its process died only adds what its earlier attempt had not
    finished. Returns the numbers of the trials it ran (module level: Ray imports it)."""
    use_tracking_target(shared.target)
    cfg = shared.cfg
    study = open_configured_study(cfg)
    objective = Objective(cfg, shared.space, shared.data)
    objective.parent_run_id = shared.parent_run_id
    objective.worker_key = f"{shared.parent_run_id}/{share.index}"
    done = [
        t
        for t in study.get_trials(deepcopy=False, states=FINISHED)
        if t.user_attrs.get("tune_worker") == objective.worker_key
    ]
    if done:
        log.info("worker %d: %d trial(s) finished by an earlier attempt", share.index, len(done))
    optimize(study, objective, cfg, share.n_trials - len(done))
    return objective.trial_numbers
