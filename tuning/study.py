"""Open an Optuna study: storage from a URL or journal file, seeded sampler, pruner by name."""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import sqlalchemy
import yaml
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial
from sqlalchemy.engine import make_url

from training.config import ConfigError
from training.tracking import child_runs, get_run, set_run_status, set_run_tags

log = logging.getLogger(__name__)

DEFAULT_STORAGE = "sqlite:///mlruns/optuna.db"
STORAGE_VARIABLE = "OPTUNA_STORAGE"  # set by `python -m server start` (its env file)
# A running trial records a heartbeat every HEARTBEAT_SECONDS; one silent for GRACE_SECONDS
# belongs to a dead worker, and any running worker fails it within another heartbeat: at
# most 90 s after a kill (or when the next worker starts, if none runs).
HEARTBEAT_SECONDS = 30
GRACE_SECONDS = 60
MAX_RETRY = 1  # a dead worker's trial is run once more, with the same parameters
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


def resolve_storage(url: str) -> str:
    """The storage a study uses: the one given, else $OPTUNA_STORAGE (the team server's
    database while it runs), else SQLite under mlruns/."""
    return url or os.environ.get(STORAGE_VARIABLE) or DEFAULT_STORAGE


def create_storage(
    url: str, heartbeat_seconds: int = HEARTBEAT_SECONDS, grace_seconds: int | None = None
):
    """See resolve_storage; *.log = journal file (parallel processes on one machine or
    a shared disk); anything else = an RDB URL with heartbeats, so trials of a killed worker
    end FAIL and are retried once (Optuna has no heartbeat for journal files).
    `grace_seconds` defaults to twice the heartbeat."""
    url = resolve_storage(url)
    try:
        if "://" not in url:
            Path(url).parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(url))
        url = _with_installed_driver(url)
        if url.startswith("sqlite:///"):
            Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        return _rdb_storage(url, heartbeat_seconds, grace_seconds or 2 * heartbeat_seconds)
    except Exception as err:  # driver missing, bad URL, server down: all a 'storage' problem
        raise ConfigError(f"parameter 'storage': cannot open {mask_url(url)}: {err}") from None


def _rdb_storage(
    url: str, heartbeat_seconds: int, grace_seconds: int, retries: int = 3
) -> RDBStorage:
    def connect() -> RDBStorage:
        with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url,
                heartbeat_interval=heartbeat_seconds,
                grace_period=grace_seconds,
                heartbeat_stale_trial_callback=handle_stale_trial,
            )

    for attempt in range(retries):
        try:
            return connect()
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as err:
            # Workers started together on a fresh database race to create Optuna's tables;
            # the loser finds them made a moment later.
            log.info("study tables being created by another worker (%s)", type(err).__name__)
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
    grace_seconds: int | None = None,
) -> optuna.Study:
    """Create the study or continue it (same name and storage), then fail stale trials.

    `first_trial` is enqueued only by the process that created the study: creation is atomic
    in every Optuna storage, so workers started together never evaluate it twice."""
    options = {"study_name": study_name, "sampler": sampler, "pruner": pruner}
    opened = create_storage(storage, heartbeat_seconds, grace_seconds)
    try:
        study = optuna.create_study(storage=opened, direction="maximize", **options)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(storage=opened, **options)
    else:
        if first_trial:
            study.enqueue_trial(first_trial, user_attrs={"origin": "base config"})
    fail_stale_trials(study)
    return study


def fail_stale_trials(study: optuna.Study) -> None:
    with warnings.catch_warnings():  # "experimental" since Optuna 2.9
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


@contextmanager
def watching_stale_trials(study: optuna.Study, every_seconds: float) -> Iterator[None]:
    """Fail stale trials of dead workers every `every_seconds` while the block runs.

    Optuna itself looks only when a worker starts a trial; with trials of many minutes a
    dead worker's trial would stay RUNNING (and not be retried) that long. Each look is a
    no-op without heartbeats (journal files)."""
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(every_seconds):
            try:
                fail_stale_trials(study)
            except Exception as err:  # noqa: BLE001 - a database hiccup must not end the study
                log.warning("checking for stale trials failed: %s", err)

    thread = threading.Thread(target=watch, name="stale-trial-watcher", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def handle_stale_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """A dead worker's trial, just failed: close its MLflow runs, then queue its parameters
    once more (Optuna's retry callback; the new trial records which one it retries)."""
    try:
        close_stale_trial_run(study, trial)
    except Exception as err:  # noqa: BLE001 - e.g. the tracking server down: the study goes on
        log.warning("could not close the MLflow run of stale trial %d: %s", trial.number, err)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, trial)


def retried_trial_number(trial: optuna.Trial) -> int | None:
    """The number of the failed trial that `trial` retries (None for a new trial)."""
    running = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    frozen = next((t for t in running if t.number == trial.number), None)
    if frozen is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback.retried_trial_number(frozen)


def close_stale_trial_run(study: optuna.Study, trial: FrozenTrial) -> None:
    """A trial whose worker died: end its MLflow run (and fold runs, and the dead worker's
    own parent run) so nothing stays RUNNING, and tag it like any failed trial."""
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
    if not parent_id:
        return
    parent = get_run(parent_id)
    # A hand-launched worker's own parent died with it. With executor=ray the parent is the
    # study's one run, held by the driver, and Ray runs the dead worker again.
    if parent.info.status == "RUNNING" and parent.data.tags.get("executor") != "ray":
        set_run_status(parent_id, "KILLED")
