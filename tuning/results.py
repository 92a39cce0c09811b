"""What a tuning invocation leaves behind: parent-run params, best config, metrics and plots."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from training.config import TrainConfig, config_to_dict, config_to_yaml
from training.tracking import RunTracker
from tuning import plots
from tuning.config import TuneConfig
from tuning.space import SearchSpace, trial_config
from tuning.study import mask_url, pruner_options, resolve_storage

log = logging.getLogger(__name__)


@dataclass
class TuneSummary:
    """The study as this invocation left it (counts cover every worker and invocation)."""

    study_name: str
    parent_run_id: str
    trials_this_run: int
    states: dict[str, int] = field(default_factory=dict)
    best_value: float | None = None
    best_trial: int | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    best_config_path: str = ""
    base_value: float | None = None  # the enqueued base config's value, when it completed


def study_params(cfg: TuneConfig, space: SearchSpace) -> dict[str, Any]:
    """The parent run's params: the config as given (so `mlflow run`, which logged the same
    keys, can adopt it), the storage without credentials, the sampler, the pruner and the
    resolved search space as JSON."""
    return {
        **config_to_dict(cfg),
        "storage": mask_url(cfg.storage),
        "storage_url": mask_url(resolve_storage(cfg.storage)),
        "sampler": f"TPESampler(seed={cfg.sampler_seed}, n_startup_trials={cfg.n_startup_trials})",
        "pruner_options": pruner_options(cfg.pruner, cfg.pruner_warmup_steps, cfg.steps_per_trial)[
            1
        ],
        "search_space_json": space,
        "optuna_version": optuna.__version__,
    }


def best_config_path(cfg: TuneConfig) -> Path:
    safe_name = re.sub(r"[^\w.-]", "_", cfg.study_name)
    return Path(cfg.best_config or f"mlruns/best_config_{safe_name}.yaml")


def state_counts(study: optuna.Study) -> dict[str, int]:
    trials = study.get_trials(deepcopy=False)
    return {state.name: sum(t.state == state for t in trials) for state in TrialState}


def base_value(study: optuna.Study) -> float | None:
    """The value of the study's completed base-config trial (tuning.study enqueues it)."""
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if trial.user_attrs.get("origin") == "base config":
            return trial.value
    return None


def log_study_results(
    tracker: RunTracker, study: optuna.Study, cfg: TuneConfig, base: TrainConfig, ran: int
) -> TuneSummary:
    """Best value/params, best_config.yaml (parent artifact and local file), trial table and
    plots on the parent run; without a completed trial only counts and the table."""
    states = state_counts(study)
    summary = TuneSummary(cfg.study_name, tracker.run_id, ran, states)
    tracker.log_metrics(
        {"trials_this_run": ran, **{f"trials_{k.lower()}": v for k, v in states.items()}}
    )
    summary.base_value = base_value(study)
    if summary.base_value is not None:  # how much tuning gained over the config as given
        tracker.log_metrics({"base_value": summary.base_value})
    if states["COMPLETE"] == 0:
        log.warning("study %s has no completed trial yet: no best config", cfg.study_name)
        tracker.set_tags({"best_config": "none (no completed trial)"})
    else:
        best = study.best_trial
        summary.best_value, summary.best_trial = best.value, best.number
        summary.best_params = dict(best.params)
        tracker.log_metrics({"best_value": best.value})
        if summary.base_value is not None:
            tracker.log_metrics({"best_gain_over_base": best.value - summary.base_value})
        tracker.log_params(
            {"best_trial_number": best.number, **{f"best_{k}": v for k, v in best.params.items()}}
        )
        text = config_to_yaml(trial_config(base, best.params))
        path = best_config_path(cfg)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        tracker.log_text(text, "best_config.yaml")
        summary.best_config_path = str(path)
    tracker.log_csv(study.trials_dataframe(), "trials.csv")
    for name, figure in plots.study_figures(study).items():
        tracker.log_figure(figure, f"plots/{name}.png")
    for name, page in plots.study_html(study).items():
        tracker.log_text(page, f"plots/{name}.html")
    return summary
