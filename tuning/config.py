"""The `tune` job's frozen config: every `train` field plus the study's own, validated."""

from __future__ import annotations

import dataclasses

from training.config import ConfigError, TrainConfig
from training.executor import ExecutorConfig, validate_executor_fields
from tuning.space import load_space
from tuning.study import GRACE_SECONDS, HEARTBEAT_SECONDS, create_pruner

STORAGE_HINT = (
    "'' ($OPTUNA_STORAGE, else sqlite under mlruns/), a database URL (scheme://...) "
    "or a journal file *.log"
)


@dataclasses.dataclass(frozen=True)
class TuneConfig(ExecutorConfig, TrainConfig):
    """A `train` config as the base of every trial, and how to search around it."""

    n_trials: int = 12  # trials this invocation adds to the study (split over its `workers`)
    study_trials: int = 0  # stop once the study holds this many complete or pruned trials,
    # whichever worker ran them (a dead worker's share is made up); 0 = no study-wide limit
    timeout: int = 0  # seconds this invocation may start new trials for; 0 = no limit
    study_name: str = "tune"  # re-running with the same name and storage continues the study
    storage: str = ""  # '' = $OPTUNA_STORAGE or sqlite:///mlruns/optuna.db; any Optuna URL;
    # a path ending in .log = journal file
    sampler_seed: int = 0  # TPESampler seed (trial n's random draws depend on seed and n)
    n_startup_trials: int = 5  # random trials before TPE models the study (Optuna's own is 10)
    enqueue_base: bool = True  # a new study's first trial is the base config's own values
    pruner: str = "median"  # median | wilcoxon | threshold | none, options as name:key=value,...
    cv: int = 0  # 0 = holdout objective; k >= 2 = mean macro F1 over k group-aware folds
    n_jobs: int = 1  # trials run in parallel threads of each worker process
    workers: int = 1  # executor=ray: worker tasks, each running its share of the n_trials
    heartbeat_seconds: int = HEARTBEAT_SECONDS  # database storages: a running trial's beat
    heartbeat_grace_seconds: int = GRACE_SECONDS  # silent this long = dead worker: the trial
    # is failed (checked every heartbeat) and its parameters run once more
    search_space: str = ""  # YAML file overriding the default ranges (tuning/space.py)
    best_config: str = ""  # where to write the best config; '' = mlruns/best_config_<study>.yaml
    trial_plots: bool = False  # each trial run also logs plots, error gallery, confusion images

    def __post_init__(self) -> None:
        super().__post_init__()
        validate_executor_fields(self)
        validate_tune_fields(self)

    @property
    def steps_per_trial(self) -> int:
        """What a trial reports: one step per epoch, or per fold with `cv`."""
        return self.cv or self.stage1_epochs + self.stage2_epochs

    @property
    def pruner_warmup_steps(self) -> int:
        """Epochs the median pruner waits before comparing trials: stage 1 and the first half
        of stage 2. Head-only scores and the dip after unfreezing do not rank how trials end
        (bench/pruning_savings.py on the demo study: a trial pruned in the second stage-2
        epoch at F1 0.84 would have ended at 0.987, the best of the study). With `cv` a step
        is a fold, and every fold counts."""
        return 0 if self.cv else self.stage1_epochs + (self.stage2_epochs + 1) // 2


def _require(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"parameter '{name}': {expected}, got {value!r}")


def validate_tune_fields(cfg: TuneConfig) -> None:
    """Check the study's own fields; the pruner is built once and the search space read once
    so that a typo fails here, before any data is loaded or run created."""
    _require(cfg.n_trials >= 1, "n_trials", cfg.n_trials, "an integer >= 1")
    _require(cfg.study_trials >= 0, "study_trials", cfg.study_trials, "an integer >= 0")
    _require(cfg.timeout >= 0, "timeout", cfg.timeout, "seconds >= 0 (0 = no limit)")
    _require(bool(cfg.study_name.strip()), "study_name", cfg.study_name, "a name")
    storage = cfg.storage
    _require(
        storage == "" or "://" in storage or storage.endswith(".log"),
        "storage",
        storage,
        STORAGE_HINT,
    )
    _require(cfg.sampler_seed >= 0, "sampler_seed", cfg.sampler_seed, "an integer >= 0")
    _require(cfg.n_startup_trials >= 0, "n_startup_trials", cfg.n_startup_trials, "an integer >= 0")
    _require(cfg.cv == 0 or cfg.cv >= 2, "cv", cfg.cv, "0 (holdout) or a number of folds >= 2")
    _require(cfg.n_jobs >= 1, "n_jobs", cfg.n_jobs, "an integer >= 1")
    _require(cfg.workers >= 1, "workers", cfg.workers, "an integer >= 1")
    _require(
        cfg.workers == 1 or cfg.executor == "ray",
        "workers",
        cfg.workers,
        "1 with executor=local (use executor=ray, or start more tune processes on one storage)",
    )
    _require(
        cfg.n_trials >= cfg.workers,
        "n_trials",
        cfg.n_trials,
        f"at least one trial per worker (workers={cfg.workers})",
    )
    beat, grace = cfg.heartbeat_seconds, cfg.heartbeat_grace_seconds
    _require(beat >= 1, "heartbeat_seconds", beat, "seconds >= 1")
    # One late beat (a busy database, a long GC pause) must not fail a live worker's trial.
    expected = f"more than heartbeat_seconds ({beat})"
    _require(grace > beat, "heartbeat_grace_seconds", grace, expected)
    create_pruner(cfg.pruner)
    load_space(cfg.search_space)
