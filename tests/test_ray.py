"""executor=ray against a real local Ray (the session's `ray_cluster`): k-fold folds as Ray
tasks give the local out-of-fold predictions; a fold's worker process SIGKILLed mid-epoch is
run again by Ray with the same result; two Ray tuning workers nest every trial under one
parent; bad executor settings name the parameter before any run."""

from __future__ import annotations

import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import mlflow
import numpy as np
import optuna
import pytest
import torch
from conftest import TINY, all_runs, child_runs, oof_predictions, write_digits
from servers import wait_for

from training.config import ConfigError
from training.kfold_job import KFoldConfig
from training.kfold_pipeline import run_kfold
from training.tracking import RunTracker
from tuning import tune
from tuning.study import create_storage

# Epochs of about a second (120 images at 64 px): a kill after the first epoch lands inside
# a later one. No Grad-CAM: it costs seconds per fold and is not what is tested here.
RAY_JOB = {
    **TINY,
    "image_size": 64,
    "stage1_epochs": 1,
    "stage2_epochs": 2,
    "folds": 3,
    "explain_misclassified": 0,
}
EPOCHS = RAY_JOB["stage1_epochs"] + RAY_JOB["stage2_epochs"]


@pytest.fixture(scope="module")
def ray_store(tmp_path_factory, ray_cluster):
    """One store with the same k-fold job run locally and as Ray tasks (undisturbed)."""
    folder = tmp_path_factory.mktemp("ray-kfold")
    data = write_digits(folder / "digits", per_class=30)
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.delenv("MLFLOW_RUN_ID", raising=False)
        patch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        patch.chdir(folder)
        mlflow.set_tracking_uri(uri)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as in each Ray task (cpus_per_task=1)
        try:
            local = run_kfold(KFoldConfig(data=str(data), **RAY_JOB, run_name="local"))
        finally:
            torch.set_num_threads(threads)
        cfg = KFoldConfig(data=str(data), **RAY_JOB, executor="ray", run_name="ray")
        remote = run_kfold(cfg)
        yield {"data": data, "cfg": cfg, "local": local, "ray": remote}


def test_folds_as_ray_tasks_give_the_local_out_of_fold_predictions(ray_store):
    parent_id = ray_store["ray"].parent_run_id
    parent = mlflow.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["executor"] == "ray"
    folds = child_runs(parent_id)
    assert sorted(folds["tags.fold"].astype(int)) == [0, 1, 2]
    assert set(folds["status"]) == {"FINISHED"}
    # Each fold ran in a Ray worker process, logged to the driver's store, first attempt.
    assert str(os.getpid()) not in set(folds["tags.worker_pid"])
    assert folds["tags.ray_task_id"].nunique() == 3 and set(folds["tags.attempt"]) == {"0"}
    local, remote = oof_predictions(ray_store["local"].parent_run_id), oof_predictions(parent_id)
    assert (local["path"] == remote["path"]).all() and (local["fold"] == remote["fold"]).all()
    # Same seed, same torch threads (1 per Ray task, 1 in the local run): the same numbers.
    # (With other thread counts float sums differ in the 5th decimal.)
    difference = np.abs(local.filter(like="prob_") - remote.filter(like="prob_")).to_numpy()
    print(f"largest OOF probability difference, ray vs local: {difference.max():.2e}")
    assert difference.max() <= 1e-6
    assert (local["predicted"] == remote["predicted"]).all()


def test_a_fold_worker_killed_mid_epoch_is_run_again_by_ray(ray_store):
    cfg = KFoldConfig(**{**ray_store["cfg"].__dict__, "run_name": "killed"})
    client = mlflow.MlflowClient()

    def fold_1_training():
        """Fold 1's run once it has logged its first epoch (so it is inside a later one)."""
        parents = mlflow.search_runs(
            search_all_experiments=True, filter_string="tags.mlflow.runName = 'killed'"
        )
        if parents.empty:
            return None
        for run in client.search_runs(
            [parents["experiment_id"].iloc[0]],
            f"tags.mlflow.parentRunId = '{parents['run_id'].iloc[0]}' and tags.fold = '1' "
            "and attributes.status = 'RUNNING'",
        ):
            if client.get_metric_history(run.info.run_id, "val/f1_macro"):
                return run
        return None

    with ThreadPoolExecutor(1) as pool:  # the driver, as a user's process would run it
        driver = pool.submit(run_kfold, cfg)
        victim = wait_for(fold_1_training, 240, 0.1, "fold 1 training")
        os.kill(int(victim.data.tags["worker_pid"]), signal.SIGKILL)
        killed_at = time.monotonic()
        status = lambda: client.get_run(victim.info.run_id).info.status  # noqa: E731
        wait_for(lambda: status() == "FAILED", 240, 0.1, "the killed attempt's run FAILED")
        seconds_to_failed = time.monotonic() - killed_at
        outcome = driver.result(timeout=300)
    print(f"SIGKILL -> killed fold run FAILED in {seconds_to_failed:.1f} s", file=sys.stderr)

    epochs_logged = len(client.get_metric_history(victim.info.run_id, "val/f1_macro"))
    assert 1 <= epochs_logged < EPOCHS  # it died while training, after its first epoch
    runs = child_runs(outcome.parent_run_id)
    finished = runs[runs["status"] == "FINISHED"]
    assert sorted(finished["tags.fold"].astype(int)) == [0, 1, 2]  # exactly one per fold
    assert set(runs["status"]) == {"FINISHED", "FAILED"}
    killed = runs.set_index("run_id").loc[victim.info.run_id]
    assert killed["status"] == "FAILED" and "worker process died" in killed["tags.error"]
    retry = finished[finished["tags.fold"] == "1"].iloc[0]
    assert retry["tags.ray_task_id"] == victim.data.tags["ray_task_id"]  # the same Ray task
    assert retry["tags.attempt"] == "1" and len(runs[runs["tags.fold"] == "1"]) == 2
    assert mlflow.get_run(outcome.parent_run_id).info.status == "FINISHED"
    undisturbed, disturbed = (
        oof_predictions(ray_store["ray"].parent_run_id),
        oof_predictions(outcome.parent_run_id),
    )
    assert (undisturbed["path"] == disturbed["path"]).all()
    difference = np.abs(undisturbed.filter(like="prob_") - disturbed.filter(like="prob_"))
    print(f"largest OOF probability difference: {difference.to_numpy().max():.2e}")
    assert difference.to_numpy().max() <= 1e-6
    assert (undisturbed["predicted"] == disturbed["predicted"]).all()


def tune_argv(data, storage: str, *extra: str) -> list[str]:
    return [
        *("--data", str(data), "--model", "test_efficientnet", "--pretrained", "none"),
        *("--image_size", "32", "--batch_size", "16", "--unfreeze_blocks", "2"),
        *("--stage1_epochs", "1", "--stage2_epochs", "1", "--pruner", "none"),
        *("--explain_misclassified", "0", "--storage", storage),
        *extra,
    ]


def test_two_ray_tuning_workers_nest_every_trial_under_one_parent(
    team_server, digits_dir, ray_cluster, tmp_path, monkeypatch
):
    """Against the team server: trials logged over HTTP from Ray workers, the study in
    PostgreSQL; one parent for the invocation however many workers ran its trials."""
    storage = team_server.fresh_database("optuna_ray")
    uri, before = team_server.tracking_uri, mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    argv = tune_argv(digits_dir, storage, "--study_name", "ray", "--experiment_name", "ray-tune")
    try:
        assert tune.main([*argv, "--executor", "ray", "--workers", "2", "--n_trials", "4"]) == 0
        client = mlflow.MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name("ray-tune").experiment_id
        runs = client.search_runs([experiment], max_results=100)
    finally:
        mlflow.set_tracking_uri(before)
    parents = [r for r in runs if r.data.tags.get("job") == "tune"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["tune_workers"] == "2"
    trials = [r for r in runs if r.data.tags.get("trial_number")]
    assert len(trials) == 4
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent.info.run_id}
    assert {r.info.status for r in trials} == {"FINISHED"}
    assert parent.data.metrics["trials_this_run"] == 4
    study = optuna.load_study(study_name="ray", storage=create_storage(storage))
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    workers = {t.user_attrs["tune_worker"] for t in study.trials}
    assert workers == {f"{parent.info.run_id}/0", f"{parent.info.run_id}/1"}
    assert {t.user_attrs["mlflow_run_id"] for t in study.trials} == {r.info.run_id for r in trials}


def test_a_k_fold_parent_with_number_tags_starts_on_a_tracking_server(team_server, monkeypatch):
    """The k-fold parent's tags (folds=5) and fold runs' (fold, attempt) are numbers: MLflow's
    REST client refused them ('bad argument type'), so no k-fold job ran against a server."""
    client = mlflow.MlflowClient(tracking_uri=team_server.tracking_uri)
    before = mlflow.get_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", team_server.tracking_uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    try:
        with RunTracker("number-tags", "job", tags={"folds": 5, "attempt": 0}) as run:
            pass
    finally:
        mlflow.set_tracking_uri(before)
    tags = client.get_run(run.run_id).data.tags
    assert (tags["folds"], tags["attempt"]) == ("5", "0")


def test_ray_tuning_refuses_sqlite_storage_before_any_run(tracking, digits_dir, capsys):
    pytest.importorskip("ray")
    argv = tune_argv(digits_dir, "sqlite:///optuna.db", "--executor", "ray", "--workers", "2")
    assert tune.main(argv) == 2
    err = capsys.readouterr().err
    assert "parameter 'storage'" in err and "journal file" in err
    assert all_runs().empty


def test_executor_ray_without_ray_installed_says_how_to_install_it(monkeypatch, digits_dir):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets without Ray
    with pytest.raises(ConfigError, match=r"parameter 'executor'.*pip install -e '\.\[ray\]'"):
        KFoldConfig(data=str(digits_dir), executor="ray")


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        ({"executor": "dask"}, "executor"),
        ({"ray_address": "auto"}, "ray_address"),  # without executor=ray
        ({"executor": "ray", "ray_address": "http://head"}, "ray_address"),
        ({"executor": "ray", "cpus_per_task": 0}, "cpus_per_task"),
        ({"executor": "ray", "max_retries": -1}, "max_retries"),
        ({"heartbeat_grace_seconds": 10, "heartbeat_seconds": 10}, "heartbeat_grace_seconds"),
    ],
)
def test_bad_executor_settings_name_the_parameter(digits_dir, flags, named):
    pytest.importorskip("ray")
    with pytest.raises(ConfigError, match=f"parameter '{named}'"):
        KFoldConfig(data=str(digits_dir), **flags)
