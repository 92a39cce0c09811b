"""K-fold job: fold assignment, nested runs, errors, kill-and-resume, fan-out + aggregate."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import TINY, all_runs, child_runs, oof_predictions, write_digits
from servers import wait_for

from training import kfold
from training.data import DataError
from training.kfold_aggregate import claim_aggregation
from training.kfold_folds import fold_states
from training.kfold_job import KFoldConfig, KFoldError, check_parent, prepare_job
from training.kfold_pipeline import run_kfold
from training.splits import assign_folds
from training.tracking import HEARTBEAT_TAG, RunTracker, heartbeat_age

JOB = {**TINY, "stage1_epochs": 1, "stage2_epochs": 1, "folds": 3}


def _argv(cfg: dict) -> list[str]:
    return [item for key, value in cfg.items() for item in (f"--{key}", str(value))]


def test_grouped_folds_never_split_a_group_and_stay_stratified():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(100), rng.integers(1, 6, 100))
    labels = rng.integers(0, 3, 100)[groups]
    fold_of = assign_folds(labels, groups.astype(str), 5, seed=7)
    assert (fold_of >= 0).all()  # every image in exactly one validation fold
    seen: dict[int, int] = {}
    for group, fold in zip(groups, fold_of, strict=True):
        assert seen.setdefault(group, fold) == fold  # a group lives in one fold only
    overall = np.bincount(labels) / len(labels)
    for fold in range(5):
        share = np.bincount(labels[fold_of == fold], minlength=3) / (fold_of == fold).sum()
        assert np.abs(share - overall).max() < 0.12


def test_ungrouped_folds_are_stratified_exactly():
    labels = np.repeat([0, 1], [50, 25])
    fold_of = assign_folds(labels, None, 5, seed=0)
    for fold in range(5):
        assert np.bincount(labels[fold_of == fold]).tolist() == [10, 5]


def test_bad_fold_counts_fail_before_any_run(tracking, digits_dir):
    with pytest.raises(Exception, match="'folds'"):
        KFoldConfig(data=str(digits_dir), **{**JOB, "folds": 1})
    with pytest.raises(DataError, match="'folds': 11 folds need at least 11 images per class"):
        run_kfold(KFoldConfig(data=str(digits_dir), **{**JOB, "folds": 11}))
    with pytest.raises(DataError, match="at least 6 groups per class"):
        run_kfold(
            KFoldConfig(
                data=str(digits_dir / "manifest.csv"),
                group_column="person",
                **{**JOB, "folds": 6},
            )
        )
    assert all_runs().empty


@pytest.fixture(scope="module")
def store(tmp_path_factory, digits_dir):
    """One store for the k-fold jobs below, and an uninterrupted reference job."""
    folder = tmp_path_factory.mktemp("kfold")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.delenv("MLFLOW_RUN_ID", raising=False)
        patch.chdir(folder)
        mlflow.set_tracking_uri(uri)
        cfg = KFoldConfig(data=str(digits_dir), **JOB)
        reference = run_kfold(cfg)
        yield {"folder": folder, "uri": uri, "cfg": cfg, "reference": reference}


def test_reference_job_has_nested_fold_runs_and_a_summary(store):
    parent_id = store["reference"].parent_run_id
    parent = mlflow.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["job"] == "kfold"
    children = child_runs(parent_id)
    assert sorted(children["tags.fold"].astype(int)) == [0, 1, 2]
    assert (children["status"] == "FINISHED").all()
    assert children["tags.model_uri"].str.startswith("models:/").all()
    for key in ("oof_f1_macro", "oof_accuracy", "mean_val_f1_macro", "std_val_f1_macro"):
        assert key in parent.data.metrics, key
    # The headline: each fold read at the step the other folds chose, said first. On the
    # monitored metric (val_loss by default) that step can never beat the fold's own best.
    assert parent.data.metrics["honest_val_loss"] >= parent.data.metrics["mean_val_loss"]
    assert parent.data.tags["mlflow.note.content"].startswith("honest macro F1 ")
    oof = oof_predictions(parent_id)
    assert len(oof) == 40 and oof["path"].is_unique  # every image exactly once
    assert np.allclose(oof.filter(like="prob_").sum(axis=1), 1.0, atol=1e-4)
    client = mlflow.MlflowClient()
    names = {
        a.path
        for top in client.list_artifacts(parent_id)
        for a in ([top] if not top.is_dir else client.list_artifacts(parent_id, top.path))
    }
    assert {
        "folds.csv",
        "folds/metrics.csv",
        "evaluation/oof_confusion_matrix.png",
        "evaluation/oof_confusion_matrix.json",
        "plots/fold_f1.png",
    } <= names


def _run_cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training.kfold", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _env(store) -> dict:
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"], "TQDM_DISABLE": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    return env


def test_killed_job_resumes_to_the_same_result(store, digits_dir):
    # Short heartbeats: the dead fold run is taken for dead 3 s after its last beat.
    beats = ["--heartbeat_seconds", "1", "--heartbeat_grace_seconds", "3"]
    args = ["--data", str(digits_dir), *_argv(JOB), "--run_name", "killed", *beats]
    log = store["folder"] / "killed.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "training.kfold", *args],
            env=_env(store),
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=store["folder"],
        )
    parent_id = None
    deadline = time.time() + 240
    try:
        while time.time() < deadline:  # kill once fold 1 has started training
            time.sleep(0.5)
            parents = mlflow.search_runs(
                search_all_experiments=True, filter_string="tags.mlflow.runName = 'killed'"
            )
            children = pd.DataFrame() if parents.empty else child_runs(parents["run_id"].iloc[0])
            if "tags.fold" in children and (children["tags.fold"] == "1").any():
                parent_id = parents["run_id"].iloc[0]
                break
        assert parent_id, f"fold 1 never started:\n{log.read_text(errors='replace')[-3000:]}"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert mlflow.get_run(parent_id).info.status == "RUNNING"  # nothing ended it
    dead = child_runs(parent_id).query("`tags.fold` == '1'")["run_id"].item()
    wait_for(lambda: heartbeat_age(mlflow.get_run(dead)) > 3, 60, 0.5, "a stale heartbeat")

    done = _run_cli([*args, "--parent_run_id", parent_id], _env(store))
    assert done.returncode == 0, done.stderr
    children = child_runs(parent_id)
    finished = children[children["status"] == "FINISHED"]
    assert sorted(finished["tags.fold"].astype(int)) == [0, 1, 2]
    assert set(children["status"]) <= {"FINISHED", "FAILED"}  # the dead fold run: FAILED
    assert mlflow.get_run(dead).info.status == "FAILED"
    reference = oof_predictions(store["reference"].parent_run_id)
    resumed = oof_predictions(parent_id)
    assert (reference["path"] == resumed["path"]).all()
    assert np.allclose(reference.filter(like="prob_"), resumed.filter(like="prob_"), atol=1e-5)


def test_folds_as_separate_processes_give_the_same_summary(store, digits_dir):
    base = ["--data", str(digits_dir), *_argv(JOB)]
    env = _env(store)
    prepared = run_kfold(KFoldConfig(**{**store["cfg"].__dict__, "prepare_only": True}))
    parent_id = prepared.parent_run_id
    assert mlflow.get_run(parent_id).info.status == "SCHEDULED"
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "training.kfold",
                *base,
                "--fold",
                str(fold),
                "--parent_run_id",
                parent_id,
            ],
            env=env,
            stderr=subprocess.PIPE,
        )
        for fold in (0, 1)
    ]
    for worker in workers:
        assert worker.wait(timeout=300) == 0, worker.stderr.read()
    last = _run_cli([*base, "--fold", "2", "--parent_run_id", parent_id], env)
    assert last.returncode == 0, last.stderr  # the last fold triggers the aggregate step
    parent = mlflow.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    reference = mlflow.get_run(store["reference"].parent_run_id).data.metrics
    for key in ("oof_f1_macro", "oof_accuracy", "mean_val_f1_macro", "mean_val_loss"):
        assert parent.data.metrics[key] == pytest.approx(reference[key], abs=1e-6), key
    again = run_kfold(
        KFoldConfig(**{**store["cfg"].__dict__, "aggregate_only": True, "parent_run_id": parent_id})
    )
    assert again.summary["oof_f1_macro"] == pytest.approx(reference["oof_f1_macro"], abs=1e-6)
    assert len(child_runs(parent_id)) == 3


def test_parent_that_is_not_a_kfold_job_or_other_data_is_refused(store, tmp_path, capsys):
    fold_run = child_runs(store["reference"].parent_run_id)["run_id"].iloc[0]
    cfg = {**JOB, "data": str(store["cfg"].data)}
    assert kfold.main([*_argv(cfg), "--parent_run_id", fold_run]) == 2
    assert "is not a k-fold job" in capsys.readouterr().err
    other = write_digits(tmp_path / "other", per_class=10, offset=20)
    other_cfg = {**JOB, "data": str(other)}
    parent = store["reference"].parent_run_id
    assert kfold.main([*_argv(other_cfg), "--parent_run_id", parent]) == 2
    assert "data_digest" in capsys.readouterr().err
    with pytest.raises(KFoldError, match="other settings"):
        run_kfold(KFoldConfig(**{**cfg, "dropout": 0.5, "parent_run_id": parent}))


def test_a_live_sibling_is_left_alone_and_only_a_stale_one_is_failed(tracking):
    """Two fold processes at once used to mark each other FAILED: every RUNNING sibling was
    taken for dead. Now only a run whose heartbeat is older than the grace period is."""
    client = mlflow.MlflowClient()
    with RunTracker("tests", "job") as parent:
        pass
    dead = client.create_run(  # left RUNNING by a process that died two minutes ago
        mlflow.get_run(parent.run_id).info.experiment_id,
        tags={
            "mlflow.parentRunId": parent.run_id,
            "fold": "1",
            HEARTBEAT_TAG: str(time.time() - 120),
        },
    ).info.run_id
    with RunTracker("tests", "fold 0", parent.run_id, {"fold": 0}, heartbeat_seconds=1) as live:
        first_beat = mlflow.get_run(live.run_id).data.tags[HEARTBEAT_TAG]
        states = fold_states(parent.run_id, folds=2, grace_seconds=30)
        assert states.live == {0: live.run_id}
        assert mlflow.get_run(live.run_id).info.status == "RUNNING"
        assert mlflow.get_run(dead).info.status == "FAILED"
        beat = lambda: mlflow.get_run(live.run_id).data.tags[HEARTBEAT_TAG]  # noqa: E731
        wait_for(lambda: beat() != first_beat, 30, 0.2, "the heartbeat renewed")
    assert mlflow.get_run(live.run_id).info.status == "FINISHED"


def test_of_processes_claiming_one_aggregation_at_once_exactly_one_wins(tracking):
    """The claim behind 'exactly one process aggregates': a param MLflow never changes."""
    with RunTracker("tests", "job") as parent:
        pass
    finished = {0: "a" * 32, 1: "b" * 32}
    with ThreadPoolExecutor(6) as pool:
        wins = list(pool.map(lambda _: claim_aggregation(parent.run_id, finished), range(6)))
    assert wins.count(True) == 1
    assert claim_aggregation(parent.run_id, {**finished, 1: "c" * 32})  # a new set of runs


def test_fold_processes_started_at_once_both_finish_and_one_aggregates(store, digits_dir):
    """Two hand-launched fold processes on the same job, started together: neither fails the
    other's fold run, both finish, and the summary is written exactly once (the old fold
    processes read the finished folds before training, so neither ever aggregated)."""
    two = {**JOB, "folds": 2}
    cfg = KFoldConfig(data=str(digits_dir), **two, prepare_only=True, run_name="race")
    parent_id = run_kfold(cfg).parent_run_id
    base = ["--data", str(digits_dir), *_argv(two), "--parent_run_id", parent_id]
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "training.kfold", *base, "--fold", str(fold)],
            env=_env(store),
            stderr=subprocess.PIPE,
            text=True,
        )
        for fold in (0, 1)
    ]
    logs = [worker.communicate(timeout=300)[1] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], logs
    children = child_runs(parent_id)
    assert sorted(children["tags.fold"].astype(int)) == [0, 1]
    assert set(children["status"]) == {"FINISHED"}  # nobody was taken for dead
    assert "superseded" not in children or children["tags.superseded"].isna().all()
    parent = mlflow.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["kfold_state"] == "complete"
    history = mlflow.MlflowClient().get_metric_history(parent_id, "oof_f1_macro")
    assert len(history) == 1  # aggregated once
    claims = [k for k in parent.data.params if k.startswith("aggregated_by_")]
    assert len(claims) == 1
    assert sum("aggregated by another process" in log for log in logs) <= 1


def test_a_fold_process_elsewhere_may_differ_in_data_path_device_and_workers(
    store, digits_dir, tmp_path
):
    """Job identity is the data's content, the folds and what is trained: a copy of the data
    in another folder, another device, DataLoader workers or executor are the same job (they
    used to be refused: every param was compared, the fold digest hashed the paths)."""
    copy = tmp_path / "elsewhere"
    shutil.copytree(digits_dir, copy)
    elsewhere = {"data": str(copy), "device": "cpu", "num_workers": 1, "max_retries": 0}
    job = prepare_job(KFoldConfig(**{**store["cfg"].__dict__, **elsewhere}))
    check_parent(job, store["reference"].parent_run_id)  # no error: the same job
    with pytest.raises(KFoldError, match="other settings"):
        check_parent(
            prepare_job(KFoldConfig(**{**store["cfg"].__dict__, **elsewhere, "dropout": 0.5})),
            store["reference"].parent_run_id,
        )
