"""The only module that writes to MLflow: runs, params, metrics, artifacts, models, statuses."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from matplotlib import pyplot as plt
from matplotlib.figure import Figure
from mlflow.entities import LoggedModelInput, RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from training.config import ConfigError
from training.metric_keys import HEADLINE_METRICS

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000
# The MLflow UI (3.17) keeps the saved views of an experiment's runs table ("Views" above it)
# as experiment tags mlflow.sharedViewState.<id> = {"name", "createdAt", "updatedAt",
# "state"}, state being the table's settings as JSON (read from its bundle: not a documented
# API; a view it cannot read is left out of its list and nothing else changes).
SAVED_VIEW_TAG = "mlflow.sharedViewState."
HEADLINE_VIEW = "headline"  # opened by #/experiments/<id>/runs?viewStateShareKey=headline


DEFAULT_EXPERIMENT = "image-classifier"
NOTE_TAG = "mlflow.note.content"  # the run's description in the MLflow UI
HEARTBEAT_TAG = "heartbeat"  # a live run's last sign of life: Unix time in seconds

# The run `mlflow run` created for this process (MLFLOW_RUN_ID), taken out of the environment
# before any run starts: MLflow would otherwise make every new run *be* that run.
_launcher_run_id: str | None = None


def configure_tracking() -> str:
    """MLFLOW_TRACKING_URI when set; else MLflow's own default store, `sqlite:///mlflow.db` in
    the current folder with artifacts under ./mlruns: the store `mlflow ui`, `mlflow run` and
    `mlflow models serve` use with no set-up, so every command sees the same runs."""
    global _launcher_run_id
    _launcher_run_id = os.environ.pop("MLFLOW_RUN_ID", None) or _launcher_run_id
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI") or None)  # None = default
    return mlflow.get_tracking_uri()


@dataclass(frozen=True)
class TrackingTarget:
    """Where a task in another process logs: the store and the experiment of its job."""

    uri: str
    experiment_id: str


def tracking_target(experiment_id: str) -> TrackingTarget:
    """This process's store as a URI another process can use: a relative SQLite path (the
    default `sqlite:///mlflow.db`) made absolute, since a Ray worker's working directory is
    not ours. Workers on other machines need an http(s):// tracking server."""
    uri = configure_tracking()
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        uri = prefix + str(Path(uri.removeprefix(prefix)).resolve())
    return TrackingTarget(uri, experiment_id)


def use_tracking_target(target: TrackingTarget) -> None:
    """In a task's process: log to `target` (MLFLOW_EXPERIMENT_ID fixes the experiment, as
    `mlflow run` does), never to a run id inherited from the launcher's environment."""
    os.environ["MLFLOW_TRACKING_URI"] = target.uri
    os.environ["MLFLOW_EXPERIMENT_ID"] = target.experiment_id
    configure_tracking()


def resolve_experiment_name(name: str) -> str:
    """The experiment a job works in. `mlflow run --experiment-name` (MLFLOW_EXPERIMENT_ID)
    fixes it for the launcher's run, and MLflow cannot move a run: an `experiment_name` naming
    another one is refused rather than silently ignored. '' = that one, else image-classifier."""
    configure_tracking()
    fixed = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if not fixed:
        return name or DEFAULT_EXPERIMENT
    launcher_experiment = MlflowClient().get_experiment(fixed).name
    if name and name != launcher_experiment:
        raise ConfigError(
            f"parameter 'experiment_name': {name!r}, but this job was started in experiment "
            f"{launcher_experiment!r} (MLFLOW_EXPERIMENT_ID={fixed}, which `mlflow run` sets "
            f"from --experiment-name): use `mlflow run --experiment-name {name} ...` instead "
            f"of -P experiment_name={name}"
        )
    return launcher_experiment


def experiment_id_for(name: str) -> str:
    """The id of the job's experiment (see resolve_experiment_name), created if missing; with
    the default store its artifacts land in ./mlruns/<experiment id>."""
    name = resolve_experiment_name(name)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except mlflow.exceptions.MlflowException:  # created meanwhile by a parallel worker
        return client.get_experiment_by_name(name).experiment_id


def _attach_launcher(job_run_id: str) -> None:
    """Nest the `mlflow run` run under the job's own top run. The launcher's run holds the
    parameters as typed ('' = not given) and MLflow parameters cannot change, so the job's
    resolved values live on its own run, at the top, the same whichever way it was started."""
    global _launcher_run_id
    launcher, _launcher_run_id = _launcher_run_id, None
    if not launcher:
        return
    client = MlflowClient()
    entry_point = client.get_run(launcher).data.tags.get("mlflow.project.entryPoint", "")
    tags = {
        "mlflow.parentRunId": job_run_id,
        "mlflow.runName": f"mlflow run -e {entry_point}".strip(),
        "job": "mlflow-run-launcher",
        NOTE_TAG: (
            "The run `mlflow run` created: its parameters are the command line as typed "
            "('' = not given). The job's resolved parameters and results are on the parent run."
        ),
    }
    for key, value in tags.items():
        client.set_tag(launcher, key, value)


def ensure_headline_view(experiment_id: str) -> None:
    """The experiment's saved view "headline metrics" of its runs table: each run's name,
    the metric that ranks its kind (metric_keys.HEADLINE_METRICS), then its description. The
    UI's default table shows no metric at all, and its column picker lists every key."""
    columns = [f"metrics.`{key}`" for key in HEADLINE_METRICS] + ["attributes.`Description`"]
    state = json.dumps(
        {
            "selectedColumns": columns,
            "columnOrder": columns,  # the UI applies widths to the columns it orders
            "columnWidths": {column: 140 for column in columns[:-1]},
        }
    )
    client = MlflowClient()
    key = SAVED_VIEW_TAG + HEADLINE_VIEW
    saved = client.get_experiment(experiment_id).tags.get(key)
    if saved and json.loads(saved).get("state") == state:
        return
    now = int(time.time() * 1000)
    view = {"name": "headline metrics", "createdAt": now, "updatedAt": now, "state": state}
    client.set_experiment_tag(experiment_id, key, json.dumps(view))


def flatten_params(params: dict[str, Any]) -> dict[str, str]:
    flat = {}
    for key, value in params.items():
        if isinstance(value, bool):
            text = str(value).lower()  # as MLproject parameters spell them
        elif isinstance(value, list | tuple | dict):
            text = json.dumps(value)
        else:
            text = str(value)
        flat[key] = text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."
    return flat


class RunTracker:
    """One MLflow run behind a small interface. Opens nothing until entered; ends the run
    FINISHED, FAILED (exception) or KILLED (Ctrl-C / termination), never left RUNNING.

    Fluent calls are safe across threads: MLflow keeps the active run per thread.
    """

    enabled = True

    def __init__(
        self,
        experiment_name: str,
        run_name: str | None = None,
        parent_run_id: str | None = None,
        tags: dict[str, str] | None = None,
        run_id: str | None = None,
        finish_on: tuple[type[BaseException], ...] = (),
        params: dict[str, Any] | None = None,
        heartbeat_seconds: float = 0,
    ) -> None:
        """`run_id` resumes an existing run; exceptions in `finish_on` (e.g. Optuna's
        TrialPruned) are expected endings: the run ends FINISHED and the exception goes on.
        `params` are logged on entry. `heartbeat_seconds` > 0: the `heartbeat` tag holds the
        time, set when the run starts and renewed that often while it is open, so another
        process can tell a live run from one whose process died (see heartbeat_age)."""
        self.experiment_name = experiment_name
        self.params = flatten_params(params or {})
        self.finish_on = finish_on
        self.run_name = run_name or None
        self.parent_run_id = parent_run_id
        self.tags = tags or {}
        self.resume_run_id = run_id
        self.run_id = ""
        self._run = None
        self.end_status = "FINISHED"  # e.g. SCHEDULED for a k-fold job waiting for its folds
        self.heartbeat_seconds = heartbeat_seconds
        self._heartbeat_stop = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None

    def __enter__(self) -> RunTracker:
        experiment_id = experiment_id_for(self.experiment_name)
        nested = mlflow.active_run() is not None or self.parent_run_id is not None
        # As text: a tracking server's REST API takes string tags only (SQLite took ints).
        tags = {key: str(value) for key, value in self.tags.items()}
        if self.heartbeat_seconds:  # with the run's creation: never a live run without one
            tags[HEARTBEAT_TAG] = _now()
        self._run = mlflow.start_run(
            run_id=self.resume_run_id,
            experiment_id=None if self.resume_run_id else experiment_id,
            run_name=self.run_name,
            parent_run_id=self.parent_run_id,
            nested=nested,
            tags=tags,
        )
        self.run_id = self._run.info.run_id
        self.parent_run_id = self.parent_run_id or self._run.data.tags.get("mlflow.parentRunId")
        if not self.parent_run_id and not self.resume_run_id:
            _attach_launcher(self.run_id)
            try:
                ensure_headline_view(experiment_id)
            except mlflow.exceptions.MlflowException as err:  # a UI nicety never stops a job
                log.warning("could not save the runs table view 'headline metrics': %s", err)
        self.log_params(self.params)
        if self.heartbeat_seconds:
            self._start_heartbeat()
        return self

    def _start_heartbeat(self) -> None:
        client, run_id = MlflowClient(), self.run_id  # the client API: safe in any thread

        def beat() -> None:
            while not self._heartbeat_stop.wait(self.heartbeat_seconds):
                try:
                    client.set_tag(run_id, HEARTBEAT_TAG, _now())
                except Exception as err:  # noqa: BLE001 - a store hiccup must not end the run
                    log.warning("heartbeat of run %s not recorded: %s", run_id, err)

        self._heartbeat_thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
        self._heartbeat_thread.start()

    def _stop_heartbeat(self) -> None:
        if self._heartbeat_thread is not None:
            self._heartbeat_stop.set()
            self._heartbeat_thread.join()
            self._heartbeat_thread = None

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._stop_heartbeat()
        if exc_type is None or (self.finish_on and issubclass(exc_type, self.finish_on)):
            status = self.end_status
        elif issubclass(exc_type, KeyboardInterrupt | SystemExit):
            status = RunStatus.to_string(RunStatus.KILLED)
        else:
            status = RunStatus.to_string(RunStatus.FAILED)
            self._safe(lambda: mlflow.set_tag("error", f"{exc_type.__name__}: {exc}"[:5000]))
        self._end(status)
        return False

    def _end(self, status: str) -> None:
        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            mlflow.end_run(status=status)
        else:
            MlflowClient().set_terminated(self.run_id, status=status)

    @staticmethod
    def _safe(action) -> None:
        try:
            action()
        except Exception as err:  # never mask the original failure
            log.warning("MLflow call failed while ending a run: %s", err)

    def log_params(self, params: dict[str, Any]) -> None:
        """Log in one batch (values as flatten_params spells them)."""
        if params:
            mlflow.log_params(flatten_params(params))

    def set_tags(self, tags: dict[str, Any]) -> None:
        if tags:
            mlflow.set_tags({k: str(v) for k, v in tags.items()})

    def log_metrics(
        self, metrics: dict[str, float], step: int | None = None, model_id: str | None = None
    ) -> None:
        """One batched call per step (one call per value is ~7x slower on SQLite). With
        `model_id` (a LoggedModel, m-...) the metrics are the run's and that model's too: the
        model page and a registered version of it show them, and a model this run did not
        log becomes one of the run's inputs (its Logged models list, direction input)."""
        if metrics:
            values = {k: float(v) for k, v in metrics.items()}
            mlflow.log_metrics(values, step=step, model_id=model_id)

    def set_model_description(self, model_id: str, text: str) -> None:
        """A LoggedModel's description on its page in the MLflow UI (its note tag)."""
        mlflow.set_logged_model_tags(model_id, {NOTE_TAG: text})

    def log_model_input(self, model_id: str) -> None:
        """Record a LoggedModel this run used (e.g. the ensemble a predict run scored) as a
        run input. MlflowClient's call: mlflow.log_inputs(models=...) is Databricks-only."""
        MlflowClient().log_inputs(self.run_id, models=[LoggedModelInput(model_id=model_id)])

    def set_description(self, text: str) -> None:
        """The run's description in the MLflow UI (its note)."""
        mlflow.set_tag(NOTE_TAG, text)

    def log_image_at_step(self, image: np.ndarray, key: str, step: int) -> None:
        """A uint8 RGB image under `key` at `step`: the UI's chart view shows such images
        side by side across runs, with a slider over steps. Synchronous: the fluent call's
        default queues it, and ending the run then idles up to 1 s polling that queue."""
        mlflow.log_image(image, key=key, step=step, synchronous=True)

    def log_figure(self, figure: Figure, artifact_file: str) -> None:
        mlflow.log_figure(figure, artifact_file)
        if plt.fignum_exists(getattr(figure, "number", -1)):  # made by pyplot (e.g. Optuna's)
            plt.close(figure)

    def log_image(self, image: Any, artifact_file: str) -> None:
        """A uint8 HxW(x3) array (or PIL image) as a PNG artifact."""
        mlflow.log_image(image, artifact_file=artifact_file)

    def log_dict(self, data: dict | list, artifact_file: str) -> None:
        mlflow.log_dict(data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        mlflow.log_text(text, artifact_file)

    def log_csv(self, table: pd.DataFrame, artifact_file: str) -> None:
        mlflow.log_text(table.to_csv(index=False), artifact_file)

    def log_table(self, table: pd.DataFrame, artifact_file: str) -> None:
        """A JSON table the MLflow UI can show and compare across runs."""
        mlflow.log_table(table, artifact_file=artifact_file)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        mlflow.log_artifact(str(local_path), artifact_path)

    def log_dataset(
        self, table: pd.DataFrame, source: str, name: str, context: str, digest: str
    ) -> None:
        with warnings.catch_warnings():  # a local path "can be interpreted in multiple ways"
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_pandas(table, source=source, name=name, targets="label")
        try:
            mlflow.log_input(dataset, context=context, tags={"content_digest": digest})
        except Exception:  # noqa: BLE001 - a parallel worker inserted the same dataset first
            # MLflow's insert of a new dataset races across processes (unique digest); on the
            # retry the dataset exists and only the run's input link is written.
            mlflow.log_input(dataset, context=context, tags={"content_digest": digest})

    def log_pytorch_model(
        self,
        model: Any,
        name: str,
        input_example: Any,
        metadata: dict[str, Any],
        pip_requirements: list[str],
        step: int,
        code_paths: list[str] | None = None,
    ) -> str:
        """Log a LoggedModel in pickle format (the original class back, in eval mode) with an
        explicit requirement list (requirement detection costs seconds). `step` is the epoch
        whose weights it holds: MLflow links the run's metrics at that step to the model
        (without it, step 0's, the first epoch's, show on the model page). Returns its URI."""
        model.eval()
        info = mlflow.pytorch.log_model(
            model,
            name=name,
            input_example=input_example,
            metadata=metadata,
            pip_requirements=pip_requirements,
            serialization_format="pickle",
            code_paths=code_paths,
            step=step,
        )
        return info.model_uri

    def log_pyfunc_model(self, name: str, python_model: Any, **kwargs: Any) -> Any:
        return mlflow.pyfunc.log_model(name=name, python_model=python_model, **kwargs)


class NullTracker(RunTracker):
    """The no-op twin: same interface, nothing written; keeps code paths identical."""

    enabled = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.run_id = ""
        self.parent_run_id = None

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        return False

    def __getattribute__(self, name: str) -> Any:
        attribute = object.__getattribute__(self, name)
        if callable(attribute) and name.startswith(("log_", "set_")):
            return lambda *args, **kwargs: None
        return attribute


def find_runs(
    experiment_ids: list[str] | None = None,
    filter_string: str = "",
    order_by: list[str] | None = None,
) -> list[mlflow.entities.Run]:
    """Runs matching an MLflow search filter (all pages), newest first by default."""
    client = MlflowClient()
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    runs, token = [], None
    while True:
        page = client.search_runs(
            experiment_ids,
            filter_string=filter_string,
            order_by=order_by or ["attributes.start_time DESC"],
            max_results=1000,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def get_run(run_id: str) -> mlflow.entities.Run:
    configure_tracking()
    return MlflowClient().get_run(run_id)


def child_runs(parent_run_id: str, filter_string: str = "") -> list[mlflow.entities.Run]:
    """Runs nested directly under `parent_run_id` (MLflow's parentRunId tag)."""
    parent = get_run(parent_run_id)
    where = f"tags.mlflow.parentRunId = '{parent_run_id}'"
    if filter_string:
        where += f" and {filter_string}"
    return find_runs([parent.info.experiment_id], where)


def load_artifact_csv(run_id: str, artifact_path: str, **read_options: Any) -> pd.DataFrame:
    """A CSV artifact of a run as a DataFrame (`read_options` go to pandas.read_csv)."""
    with scratch_dir() as folder:
        local = mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact_path, dst_path=str(folder)
        )
        return pd.read_csv(local, **read_options)


def set_run_status(run_id: str, status: str) -> None:
    """Mark a run (e.g. a dead fold run) FAILED / KILLED / FINISHED."""
    MlflowClient().set_terminated(run_id, status=status)


def set_run_tags(run_id: str, tags: dict[str, Any]) -> None:
    client = MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, str(value))


def _now() -> str:
    return f"{time.time():.3f}"


def heartbeat_age(run: mlflow.entities.Run) -> float:
    """Seconds since the run last showed it was alive: its `heartbeat` tag, else its start
    (a run logged before heartbeats existed). Clocks of the machines must agree (NTP)."""
    beat = run.data.tags.get(HEARTBEAT_TAG)
    last = float(beat) if beat else (run.info.start_time or 0) / 1000
    return time.time() - last


def claim_param(run_id: str, key: str, value: str) -> bool:
    """Log param `key`=`value` unless the run holds another value for it: True when this
    call's value is the one logged. MLflow never changes a logged param (the store's unique
    key decides between concurrent writers), so exactly one of several processes claiming
    the same key with different values wins, on SQLite and over HTTP alike."""
    try:
        MlflowClient().log_param(run_id, key, value)
    except MlflowException as err:
        if err.error_code != "INVALID_PARAMETER_VALUE":
            raise
        return get_run(run_id).data.params.get(key) == value
    return True


@contextmanager
def scratch_dir() -> Iterator[Path]:
    """A temporary folder for files that are logged and then dropped."""
    with tempfile.TemporaryDirectory(prefix="imgclf-") as folder:
        yield Path(folder)
