"""`tune` entry point: an Optuna study over `train`, one MLflow parent run per invocation."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import optuna
import torch
from optuna.trial import TrialState

from training.cli import run_entry_point
from training.job_data import load_job_data
from training.tracking import RunTracker, configure_tracking
from tuning.config import TuneConfig
from tuning.objective import Objective
from tuning.results import TuneSummary, log_study_results, study_params
from tuning.space import base_trial, load_space
from tuning.study import (
    TrialSeededTPESampler,
    create_pruner,
    open_study,
    watching_stale_trials,
)

log = logging.getLogger(__name__)


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


def run(cfg: TuneConfig) -> TuneSummary:
    """Validate data, weights and storage first; then add `n_trials` trials to the study."""
    space = load_space(cfg.search_space)
    if cfg.cv:
        data = load_job_data(cfg, cfg.cv, f"{cfg.cv}-fold cross-validation")
    else:
        data = load_job_data(cfg)
    objective = Objective(cfg, space, data)
    objective.preflight()
    configure_tracking()
    first_trial = base_trial(space, objective.base) if cfg.enqueue_base else None
    if cfg.enqueue_base and first_trial is None:
        log.info("the base config lies outside the search space: a new study starts sampled")
    study = open_study(
        cfg.storage,
        cfg.study_name,
        TrialSeededTPESampler(cfg.sampler_seed, cfg.n_startup_trials),
        create_pruner(cfg.pruner, cfg.pruner_warmup_steps),
        first_trial=first_trial,
        heartbeat_seconds=cfg.heartbeat_seconds,
        grace_seconds=cfg.heartbeat_grace_seconds,
    )
    if cfg.pruner.startswith("wilcoxon") and not cfg.cv:
        log.info("wilcoxon pruner with cv=0: its paired test runs over epochs, not folds")
    run_name = cfg.run_name or f"tune {cfg.study_name}"
    params = study_params(cfg, space)
    with RunTracker(cfg.experiment_name, run_name=run_name, params=params) as parent:
        parent.set_tags({"job": "tune", "optuna_study": cfg.study_name})
        parent.log_dict(params, "tune_config.yaml")
        objective.parent_run_id = parent.run_id
        if study_full(study, cfg.study_trials):
            log.info("study %s holds %d finished trials already", cfg.study_name, cfg.study_trials)
        else:
            with (
                torch_threads_per_trial(cfg.n_jobs),
                watching_stale_trials(study, cfg.heartbeat_seconds),
            ):
                study.optimize(
                    objective,
                    n_trials=cfg.n_trials,
                    timeout=cfg.timeout or None,
                    n_jobs=cfg.n_jobs,
                    catch=(RuntimeError,),  # e.g. an optimizer overflow: FAIL, study goes on
                    callbacks=study_limit(cfg.study_trials),
                )
        ran = len(objective.trial_numbers)
        return log_study_results(parent, study, cfg, objective.base, ran)


FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # what `study_trials` counts


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


def report(summary) -> None:
    states = ", ".join(f"{n} {s.lower()}" for s, n in summary.states.items() if n)
    print(f"study {summary.study_name}: {states}; parent run {summary.parent_run_id}")
    if summary.best_value is None:
        print("no completed trial yet: run again to add trials")
    else:
        print(
            f"best value {summary.best_value:.4f} (trial {summary.best_trial}): "
            f"{summary.best_params}\nbest config: {summary.best_config_path}"
        )
        if summary.base_value is not None:
            gain = summary.best_value - summary.base_value
            print(f"the base config scored {summary.base_value:.4f}; the best is {gain:+.4f}")


def main(argv: list[str] | None = None) -> int:
    return run_entry_point(TuneConfig, argv, __doc__, run, report)


if __name__ == "__main__":
    sys.exit(main())
