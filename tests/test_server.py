"""Faults survived against real processes: PostgreSQL, `mlflow server`, tuning and training
workers. A killed tuning worker, four workers racing on an empty database, the tracking
server down for 30 s mid-run, and eight writers within the connection cap."""

from __future__ import annotations

import shutil
import textwrap
import time
from pathlib import Path

import mlflow
import optuna
import pytest
from servers import (
    THROWAWAY,
    Jobs,
    free_port,
    job_env,
    live_group_members,
    postgres_missing,
    server_folder,
    wait_for,
)

from server import control, tracking
from server.__main__ import main as server_main
from server.config import ServerConfig
from tuning.study import create_storage

needs_postgres = pytest.mark.skipif(
    bool(postgres_missing()), reason=f"PostgreSQL binaries not installed: {postgres_missing()}"
)


@pytest.fixture
def jobs():
    """This test's subprocesses; none outlives it, whatever the outcome."""
    started = Jobs()
    yield started
    started.kill_all()


def tune_argv(digits_dir: Path, storage: str, study: str, experiment: str, *extra: str):
    """A tiny study: two epochs (one per stage) of a random-init model on 40 digits."""
    return [
        *("--data", str(digits_dir), "--model", "test_efficientnet", "--pretrained", "none"),
        *("--image_size", "32", "--batch_size", "16", "--unfreeze_blocks", "2"),
        *("--stage1_epochs", "1", "--stage2_epochs", "1", "--pruner", "none"),
        *("--storage", storage, "--study_name", study, "--experiment_name", experiment),
        *extra,
    ]


def runs_of(uri: str, experiment: str):
    client = mlflow.MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs([found.experiment_id], max_results=1000)


def finish(procs, logs, timeout: float = 300) -> None:
    """Wait for every process; all must exit 0 (their logs are shown when one does not)."""
    deadline = time.monotonic() + timeout
    for proc in procs:
        proc.wait(timeout=max(1, deadline - time.monotonic()))
    outputs = {str(log): log.read_text(errors="replace")[-3000:] for log in logs}
    assert [proc.returncode for proc in procs] == [0] * len(procs), outputs


def test_a_killed_tuning_worker_fails_its_trial_which_is_retried_once(
    team_server, digits_dir, tmp_path, jobs
):
    storage = team_server.fresh_database("optuna_killed")
    uri, experiment = team_server.tracking_uri, "killed-worker"
    # Short heartbeats (the defaults, 30 s + 60 s, bound a real failure at 90 s); a few
    # stage-2 epochs so the victim is surely killed inside a trial.
    argv = tune_argv(digits_dir, storage, "killed", experiment, "--stage2_epochs", "3")
    argv += ["--heartbeat_seconds", "2", "--heartbeat_grace_seconds", "4"]
    argv += ["--n_trials", "6", "--study_trials", "4"]
    env = job_env(uri)
    logs = [tmp_path / "victim.log", tmp_path / "survivor.log"]
    victim = jobs.module("tuning.tune", [*argv, "--run_name", "victim"], env, tmp_path, logs[0])

    def victims_running_trial():
        runs = runs_of(uri, experiment)
        parents = {r.info.run_id for r in runs if r.info.run_name == "victim"}
        return next(
            (
                r
                for r in runs
                if r.data.tags.get("mlflow.parentRunId") in parents and r.info.status == "RUNNING"
            ),
            None,
        )

    trial_run = wait_for(victims_running_trial, 120, 0.2, "a running trial of the victim", jobs)
    # The survivor starts now, so it is surely still at work when the victim's trial goes
    # stale (started together, on a loaded machine it once finished the study first).
    survivor = jobs.module("tuning.tune", [*argv, "--run_name", "survivor"], env, tmp_path, logs[1])
    victim.kill()  # SIGKILL: no cleanup of any kind
    victim.wait()
    killed_at = time.monotonic()
    killed_trial = int(trial_run.data.tags["trial_number"])

    study = optuna.load_study(study_name="killed", storage=create_storage(storage))
    trial_state = lambda: study.get_trials(deepcopy=False)[killed_trial].state  # noqa: E731
    wait_for(lambda: trial_state() == optuna.trial.TrialState.FAIL, 120, 0.2, "trial FAIL", jobs)
    seconds_to_fail = time.monotonic() - killed_at
    client = mlflow.MlflowClient(tracking_uri=uri)
    run_status = lambda: client.get_run(trial_run.info.run_id).info.status  # noqa: E731
    wait_for(lambda: run_status() == "FAILED", 60, 0.2, "trial run FAILED", jobs)
    to_failed_run = time.monotonic() - killed_at
    print(f"SIGKILL -> trial FAIL {seconds_to_fail:.1f} s, run FAILED {to_failed_run:.1f} s")

    finish([survivor], logs[1:])
    trials = study.get_trials(deepcopy=False)
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed_trial]
    assert len(retries) == 1  # retried once, with the dead trial's parameters
    assert retries[0].params == trials[killed_trial].params
    assert retries[0].state == optuna.trial.TrialState.COMPLETE
    finished = [t for t in trials if t.state.is_finished() and t.state.name != "FAIL"]
    assert len(finished) >= 4  # the study still reached study_trials
    assert [t.number for t in trials if t.state.name == "FAIL"] == [killed_trial]

    runs = {r.info.run_id: r for r in runs_of(uri, experiment)}
    dead = runs[trial_run.info.run_id]
    assert (dead.info.status, dead.data.tags["trial_state"]) == ("FAILED", "FAIL")
    assert runs[dead.data.tags["mlflow.parentRunId"]].info.status == "KILLED"
    retry_run = runs[retries[0].user_attrs["mlflow_run_id"]]
    assert retry_run.data.tags["retry_of_trial"] == str(killed_trial)
    assert retry_run.data.tags["trial_origin"] == f"retry of trial {killed_trial}"
    assert retry_run.info.status == "FINISHED"
    assert not [r for r in runs.values() if r.info.status == "RUNNING"]


def test_four_workers_started_together_on_an_empty_database(
    team_server, digits_dir, tmp_path, jobs
):
    storage = team_server.fresh_database("optuna_race")
    uri, experiment = team_server.tracking_uri, "race"
    argv = tune_argv(digits_dir, storage, "race", experiment, "--n_trials", "2")
    logs = [tmp_path / f"worker{i}.log" for i in range(4)]
    procs = [jobs.module("tuning.tune", argv, job_env(uri), tmp_path, log) for log in logs]
    finish(procs, logs)
    for log in logs:
        assert "Traceback" not in log.read_text()  # nothing raced into an error, even retried

    study = optuna.load_study(study_name="race", storage=create_storage(storage))
    first = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)[:8]
    assert len(first) == 8 and {t.state.name for t in first} == {"COMPLETE"}
    params = [tuple(sorted(t.params.items())) for t in first]
    assert len(set(params)) == 8, params  # no two trials with identical parameters
    assert [t.user_attrs.get("origin") for t in first].count("base config") == 1
    runs = runs_of(uri, experiment)
    assert len([r for r in runs if r.data.tags.get("job") == "tune"]) == 4
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert len([r for r in runs if "trial_number" in r.data.tags]) == 8


# Through the platform's RunTracker: plain `mlflow.set_experiment` (MLflow 3.17) loses the
# race to create the experiment in one of eight writers and logs its runs to "Default".
WRITER = textwrap.dedent(
    """
    import sys
    from training.tracking import RunTracker

    for r in range(2):
        name = f"writer-{sys.argv[1]}-{r}"
        with RunTracker("connections", run_name=name, params={"writer": sys.argv[1]}) as run:
            for step in range(15):
                run.log_metrics({"loss": 1 / (step + 1), "accuracy": step / 15}, step=step)
            run.log_text("done", "done.txt")
    """
)


def test_eight_writers_stay_within_the_connection_cap(team_server, tmp_path, jobs):
    cap = team_server.running.connection_cap  # 1 worker x 2 threads: 1 x 2 x 5 + 3 = 13
    env = job_env(team_server.tracking_uri)
    logs = [tmp_path / f"writer{i}.log" for i in range(8)]
    procs = [jobs.start(["-c", WRITER, str(i)], env, tmp_path, log) for i, log in enumerate(logs)]
    samples = []
    while any(proc.poll() is None for proc in procs):
        samples.append(team_server.connections("mlflow"))
        time.sleep(0.1)
    finish(procs, logs)
    print(f"connections to 'mlflow': max {max(samples)} of cap {cap}, {len(samples)} samples")
    assert max(samples) <= cap
    assert max(samples) > tracking.LAUNCHER_CONNECTIONS  # the workers' pools were sampled
    runs = runs_of(team_server.tracking_uri, "connections")
    assert len(runs) == 16 and {r.info.status for r in runs} == {"FINISHED"}
    client = mlflow.MlflowClient(tracking_uri=team_server.tracking_uri)
    for run in runs:  # nothing lost while requests queued for a connection
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(
            range(15)
        )


@needs_postgres
def test_training_survives_the_tracking_server_down_for_30_s(digits_dir, tmp_path, capsys, jobs):
    folder = server_folder("imgclf-server-down-")
    cfg = ServerConfig(data=str(folder), port=free_port(), pg_port=free_port(), workers=1)
    flags = ["--data", cfg.data, "--port", str(cfg.port), "--pg_port", str(cfg.pg_port)]
    flags += ["--workers", "1", "--pg_settings", THROWAWAY]
    pids = []
    try:
        assert server_main(["start", *flags]) == 0
        running = control.read_running(cfg)
        exports = (folder / "env").read_text()
        assert f"export MLFLOW_TRACKING_URI={running.tracking_uri}\n" in exports
        assert f"export OPTUNA_STORAGE={running.optuna_storage}\n" in exports
        assert exports.strip() in capsys.readouterr().out
        postmaster = (folder / "postgres" / "data" / "postmaster.pid").read_text().split()[0]
        pids += [running.mlflow_pid, int(postmaster)]
        _train_through_an_outage(cfg, running.tracking_uri, digits_dir, tmp_path, jobs, pids)
    finally:
        stopped = server_main(["stop", "--data", cfg.data])
        shutil.rmtree(folder, ignore_errors=True)
    # `stop` stopped exactly what `start` started, leaving no process.
    assert stopped == 0
    assert [pid for pid in pids if tracking.alive(pid)] == []
    assert live_group_members(pids[-1]) == []  # nor any gunicorn process of its group


def _train_through_an_outage(cfg, uri, digits_dir, tmp_path, jobs, pids: list[int]) -> None:
    epochs = 24
    argv = [
        *("--data", str(digits_dir), "--model", "test_efficientnet", "--pretrained", "none"),
        *("--image_size", "32", "--batch_size", "16", "--unfreeze_blocks", "2"),
        *("--stage1_epochs", "1", "--stage2_epochs", str(epochs - 1), "--patience", "100"),
        *("--experiment_name", "server-down", "--run_name", "survivor"),
    ]
    log = tmp_path / "train.log"
    train = jobs.module("training.train", argv, job_env(uri), tmp_path, log)
    client = mlflow.MlflowClient(tracking_uri=uri)

    def run_past_epoch_two():
        runs = runs_of(uri, "server-down")
        if runs and len(client.get_metric_history(runs[0].info.run_id, "val/loss")) >= 2:
            return runs[0]
        return None

    run = wait_for(run_past_epoch_two, 180, 0.5, "the run's second epoch", jobs)
    assert control.stop_tracking(cfg)
    assert not tracking.healthy(uri)
    time.sleep(30)
    assert train.poll() is None  # still alive, waiting for the server
    pids.append(control.restart_tracking(cfg).mlflow_pid)
    back = time.monotonic()
    finish([train], [log], timeout=400)
    print(f"server back; the run ended {time.monotonic() - back:.1f} s later")

    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert "Traceback" not in log.read_text()
    for key in ("train/loss", "val/loss", "val/f1_macro", "train/lr", "train/seconds"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(epochs)), key  # every epoch, none twice
    assert "model_uri" in run.data.tags  # the logged model, after the outage


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--port", "0"], "port"),
        (["--port", "5050", "--pg_port", "5050"], "pg_port"),
        (["--host", "localhost"], "host"),
        (["--threads", "0"], "threads"),
        (["--pg_settings", "fsync"], "pg_settings"),
        (["--pg_bin", "/nonexistent"], "pg_bin"),
    ],
)
def test_bad_server_flags_name_the_parameter_and_start_nothing(tmp_path, capsys, flags, named):
    assert server_main(["start", "--data", str(tmp_path / "state"), *flags]) == 2
    assert f"parameter '{named}'" in capsys.readouterr().err
    assert not (tmp_path / "state" / "server.json").exists()


def test_status_and_stop_of_a_server_never_started(tmp_path, capsys):
    assert server_main(["status", "--data", str(tmp_path)]) == 0
    assert capsys.readouterr().out == "postgres: stopped\nmlflow server: stopped\n"
    assert server_main(["stop", "--data", str(tmp_path)]) == 0
    assert capsys.readouterr().out == "nothing was running\n"
