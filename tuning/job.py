"""A tuning invocation end to end: validate, open the study, one parent run, trials here or
in Ray worker tasks, results on the parent. Library code: tuning/tune.py is only its CLI."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from training.config import ConfigError
from training.executor import run_tasks
from training.job_data import load_job_data
from training.tracking import RunTracker, configure_tracking, get_run, tracking_target
from tuning.config import TuneConfig
from tuning.objective import Objective
from tuning.optimize import (
    StudyInput,
    open_configured_study,
    optimize,
    run_worker,
    split_trials,
)
from tuning.results import TuneSummary, log_study_results, study_params
from tuning.space import base_trial, load_space
from tuning.study import mask_url, resolve_storage

log = logging.getLogger(__name__)


def shared_storage(cfg: TuneConfig) -> str:
    """The storage every worker opens. Ray workers run in other processes (and machines):
    SQLite is refused, a journal file's path made absolute (their working directory is not
    ours), $OPTUNA_STORAGE resolved here (their environment is not ours)."""
    storage = resolve_storage(cfg.storage)
    if cfg.executor != "ray":
        return cfg.storage
    if storage.startswith("sqlite"):
        raise ConfigError(
            f"parameter 'storage': {mask_url(storage)} is SQLite, which is for one process; "
            "executor=ray runs workers in several processes: use PostgreSQL (`make server` "
            "sets OPTUNA_STORAGE) or a journal file path ending in .log"
        )
    if "://" not in storage:
        return str(Path(storage).resolve())
    return storage


def run(cfg: TuneConfig) -> TuneSummary:
    """Validate data, weights and storage first; then add `n_trials` trials to the study,
    here (n_jobs threads) or in `workers` Ray tasks, all under one parent run."""
    storage = shared_storage(cfg)
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
    study = open_configured_study(dataclasses.replace(cfg, storage=storage), first_trial)
    if cfg.pruner.startswith("wilcoxon") and not cfg.cv:
        log.info("wilcoxon pruner with cv=0: its paired test runs over epochs, not folds")
    run_name = cfg.run_name or f"tune {cfg.study_name}"
    params = study_params(cfg, space)
    with RunTracker(cfg.experiment_name, run_name=run_name, params=params) as parent:
        parent.set_tags(
            {"job": "tune", "optuna_study": cfg.study_name, "executor": cfg.executor}
            | ({"tune_workers": cfg.workers} if cfg.executor == "ray" else {})
        )
        parent.log_dict(params, "tune_config.yaml")
        if cfg.executor == "ray":
            shared = StudyInput(
                dataclasses.replace(cfg, storage=storage),
                space,
                data,
                parent.run_id,
                tracking_target(get_run(parent.run_id).info.experiment_id),
            )
            shares = split_trials(cfg.n_trials, cfg.workers)
            names = [f"tune worker {share.index}" for share in shares]
            ran = sum(len(numbers) for numbers in run_tasks(run_worker, shared, shares, cfg, names))
        else:
            objective.parent_run_id = parent.run_id
            optimize(study, objective, cfg, cfg.n_trials)
            ran = len(objective.trial_numbers)
        return log_study_results(parent, study, cfg, objective.base, ran)
