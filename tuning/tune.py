"""`tune` entry point: an Optuna study over `train`, one MLflow parent run per invocation."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from training.cli import run_entry_point
from training.tracking import RunTracker, configure_tracking
from training.train import load_data
from tuning.config import TuneConfig
from tuning.objective import Objective
from tuning.results import TuneSummary, log_study_results, study_params
from tuning.space import base_trial, load_space
from tuning.study import TrialSeededTPESampler, create_pruner, open_study

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
        data = load_data(cfg, cfg.cv, f"{cfg.cv}-fold cross-validation")
    else:
        data = load_data(cfg)
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
        create_pruner(cfg.pruner, cfg.pruner_warmup_steps, cfg.steps_per_trial),
        first_trial=first_trial,
    )
    if cfg.pruner.startswith("wilcoxon") and not cfg.cv:
        log.info("wilcoxon pruner with cv=0: its paired test runs over epochs, not folds")
    run_name = cfg.run_name or f"tune {cfg.study_name}"
    params = study_params(cfg, space)
    with RunTracker(cfg.experiment_name, run_name=run_name, params=params) as parent:
        parent.set_tags({"job": "tune", "optuna_study": cfg.study_name})
        parent.log_dict(params, "tune_config.yaml")
        objective.parent_run_id = parent.run_id
        with torch_threads_per_trial(cfg.n_jobs):
            study.optimize(
                objective,
                n_trials=cfg.n_trials,
                timeout=cfg.timeout or None,
                n_jobs=cfg.n_jobs,
                catch=(RuntimeError,),  # e.g. an overflow in the optimizer: FAIL, study goes on
            )
        ran = len(objective.trial_numbers)
        return log_study_results(parent, study, cfg, objective.base, ran)


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
