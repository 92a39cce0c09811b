"""Open an Optuna study: storage from a URL or journal file, seeded sampler, pruner by name."""

from __future__ import annotations

import importlib.util
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import sqlalchemy
import yaml
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial
from sqlalchemy.engine import make_url

from training.config import ConfigError
from training.tracking import child_runs, get_run, set_run_status, set_run_tags

log = logging.getLogger(__name__)

DEFAULT_STORAGE = "sqlite:///mlruns/optuna.db"
HEARTBEAT_SECONDS = 60  # a trial whose worker stops beating for 2x this long is failed
PRUNERS = {
    "median": optuna.pruners.MedianPruner,
    "successive_halving": optuna.pruners.SuccessiveHalvingPruner,  # asynchronous (ASHA)
    "hyperband": optuna.pruners.HyperbandPruner,  # brackets of successive halving
    "wilcoxon": optuna.pruners.WilcoxonPruner,  # paired test over folds (steps = folds)
    "threshold": optuna.pruners.ThresholdPruner,
    "none": optuna.pruners.NopPruner,
}


def mask_url(url: str) -> str:
    """The storage URL with any password replaced by ***, safe to log. SQLAlchemy renders it
    (a password may hold '/', ':' or escapes); a URL it cannot parse, or one with a raw '@' in
    its password, loses everything between the user name and the last '@'."""
    if "://" not in url:
        return url  # a journal file path
    try:
        if url.count("@") <= 1:
            return make_url(url).render_as_string(hide_password=True)
    except sqlalchemy.exc.ArgumentError:
        pass
    scheme, rest = url.split("://", 1)
    if "@" not in rest:
        return url
    credentials, host = rest.rsplit("@", 1)
    return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}"


def pruner_options(
    spec: str, warmup_steps: int = 0, max_steps: int = 0
) -> tuple[str, dict[str, Any]]:
    """The pruner's name and keyword arguments from `name` or `name:key=value,...`, e.g.
    `median:n_startup_trials=2,n_warmup_steps=3` or `threshold:lower=0.2`. Unless the spec
    sets them, `warmup_steps` is the median pruner's n_warmup_steps and the first step
    successive halving and Hyperband compare trials at (min_resource; steps count from 0),
    and `max_steps` (steps per trial) is Hyperband's max_resource."""
    name, _, options = spec.partition(":")
    if name not in PRUNERS:
        raise ConfigError(f"parameter 'pruner': one of {tuple(PRUNERS)}, got {spec!r}")
    kwargs: dict[str, Any] = {}
    if name == "median":
        kwargs["n_warmup_steps"] = warmup_steps
    elif name in ("successive_halving", "hyperband"):
        kwargs["min_resource"] = max(1, warmup_steps)
        if name == "hyperband" and max_steps:
            kwargs["max_resource"] = max(max_steps, kwargs["min_resource"] + 1)
    for item in filter(None, options.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"parameter 'pruner': expected key=value, got {item!r} in {spec!r}")
        kwargs[key.strip()] = yaml.safe_load(value)
    return name, kwargs


def create_pruner(
    spec: str, warmup_steps: int = 0, max_steps: int = 0
) -> optuna.pruners.BasePruner:
    """The Optuna pruner of `spec` (see pruner_options)."""
    name, kwargs = pruner_options(spec, warmup_steps, max_steps)
    try:
        with warnings.catch_warnings():  # WilcoxonPruner is "experimental" since Optuna 3.6
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return PRUNERS[name](**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"parameter 'pruner': {spec!r}: {err}") from None


class TrialSeededTPESampler(optuna.samplers.TPESampler):
    """TPE whose random draws for trial n depend only on (seed, n) and the study so far.

    A plainly seeded sampler restarts its random stream in every process, so two workers
    (or a resumed invocation) would propose the very same first trials."""

    def __init__(self, seed: int, n_startup_trials: int = 10) -> None:
        # Optuna 5's TPE is multivariate with constant liar by default: learning rates are
        # modelled jointly, and parallel workers do not crowd around a running trial.
        super().__init__(seed=seed, n_startup_trials=n_startup_trials)
        self.seed = seed

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        state = np.random.SeedSequence([self.seed, trial.number]).generate_state(2)
        # Private attributes of TPESampler 5.x; without them we only lose reproducibility.
        for holder, value in ((self, state[0]), (getattr(self, "_random_sampler", None), state[1])):
            rng = getattr(holder, "_rng", None)
            if rng is not None:
                rng.rng.seed(int(value))
        super().before_trial(study, trial)


def create_storage(url: str, heartbeat_seconds: int = HEARTBEAT_SECONDS):
    """'' = SQLite under mlruns/; *.log = journal file (parallel processes on one machine or
    a shared disk); anything else = an RDB URL with heartbeats, so trials of a killed worker
    end FAIL (Optuna has no heartbeat for journal files)."""
    url = url or DEFAULT_STORAGE
    try:
        if "://" not in url:
            Path(url).parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(url))
        url = _with_installed_driver(url)
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return _rdb_storage(url, heartbeat_seconds)
    except Exception as err:  # driver missing, bad URL, server down: all a 'storage' problem
        raise ConfigError(f"parameter 'storage': cannot open {mask_url(url)}: {err}") from None


def _rdb_storage(url: str, heartbeat_seconds: int, retries: int = 2) -> RDBStorage:
    def connect() -> RDBStorage:
        with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url,
                heartbeat_interval=heartbeat_seconds,
                grace_period=2 * heartbeat_seconds,
                heartbeat_stale_trial_callback=close_stale_trial_run,
            )

    for attempt in range(retries):
        try:
            return connect()
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            # Workers started together on a fresh database race to create Optuna's tables;
            # the loser finds them made a moment later.
            time.sleep(1 + attempt)
    return connect()


def _with_installed_driver(url: str) -> str:
    """SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; use psycopg2 when only it is
    installed (the project's dev extra)."""
    installed = importlib.util.find_spec
    if url.startswith("postgresql://") and not installed("psycopg") and installed("psycopg2"):
        return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


def open_study(
    storage: str,
    study_name: str,
    sampler: optuna.samplers.BaseSampler,
    pruner: optuna.pruners.BasePruner,
    first_trial: dict[str, float] | None = None,
    heartbeat_seconds: int = HEARTBEAT_SECONDS,
) -> optuna.Study:
    """Create the study or continue it (same name and storage), then fail stale trials.

    `first_trial` is enqueued only by the process that created the study: creation is atomic
    in every Optuna storage, so workers started together never evaluate it twice."""
    options = {"study_name": study_name, "sampler": sampler, "pruner": pruner}
    opened = create_storage(storage, heartbeat_seconds)
    try:
        study = optuna.create_study(storage=opened, direction="maximize", **options)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(storage=opened, **options)
    else:
        if first_trial:
            study.enqueue_trial(first_trial, user_attrs={"origin": "base config"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return study


def close_stale_trial_run(study: optuna.Study, trial: FrozenTrial) -> None:
    """A trial whose worker died: end its MLflow run (and fold runs, and the dead worker's
    parent run) so nothing stays RUNNING, and tag it like any failed trial."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    log.warning("trial %d of a dead worker marked FAIL (run %s)", trial.number, run_id)
    if not run_id:
        return
    for fold_run in child_runs(run_id, "attributes.status = 'RUNNING'"):
        set_run_status(fold_run.info.run_id, "FAILED")
    run = get_run(run_id)
    if run.info.status == "RUNNING":
        set_run_status(run_id, "FAILED")
    set_run_tags(run_id, {"trial_state": "FAIL", "error": "worker stopped (stale heartbeat)"})
    parent_id = run.data.tags.get("mlflow.parentRunId")
    if parent_id and get_run(parent_id).info.status == "RUNNING":
        set_run_status(parent_id, "KILLED")
