"""The one rule for which run of a k-fold fold counts: its newest FINISHED child run."""

from __future__ import annotations

import mlflow

from training.fold_runs import latest_finished_fold_runs
from training.kfold_folds import fold_states


def _job_with_reruns() -> tuple[str, dict[str, str]]:
    """A k-fold parent whose children were written as a retried, fanned-out job leaves them:
    fold 0 finished twice (and failed once, last), fold 1 once, plus runs that never count."""
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("fold-runs")
    parent = client.create_run(experiment, start_time=0, tags={"job": "kfold"}).info.run_id
    runs = {}
    for name, fold, start, status in [
        ("fold0-first", "0", 1_000, "FINISHED"),
        ("fold1", "1", 2_000, "FINISHED"),
        ("fold0-rerun", "0", 3_000, "FINISHED"),
        ("fold0-failed", "0", 4_000, "FAILED"),
        ("fold7", "7", 5_000, "FINISHED"),  # not a fold of a 3-fold job
        ("untagged", None, 6_000, "FINISHED"),
    ]:
        tags = {"mlflow.parentRunId": parent, "job": "train"}
        if fold is not None:
            tags["fold"] = fold
        run_id = client.create_run(experiment, start_time=start, tags=tags).info.run_id
        client.set_terminated(run_id, status, end_time=start + 500)
        runs[name] = run_id
    return parent, runs


def test_the_newest_finished_run_of_each_fold_counts(tracking):
    parent, runs = _job_with_reruns()
    counted = latest_finished_fold_runs(parent, folds=3)
    assert {fold: run.info.run_id for fold, run in counted.items()} == {
        0: runs["fold0-rerun"],
        1: runs["fold1"],
    }
    assert list(latest_finished_fold_runs(parent)) == [0, 1, 7]  # no fold count: any index


def test_kfold_summary_counts_the_runs_promotion_counts(tracking):
    parent, _ = _job_with_reruns()
    counted = latest_finished_fold_runs(parent, folds=3)
    finished = fold_states(parent, 3, grace_seconds=60).finished
    assert finished == {f: run.info.run_id for f, run in counted.items()}


def test_only_fold_runs_left_running_are_marked_failed(tracking):
    """The `mlflow run` launcher nested under the job is RUNNING while the job runs: it is
    not a fold run left by a dead process (it used to end FAILED, tagged superseded)."""
    parent, _ = _job_with_reruns()
    client = mlflow.MlflowClient()
    experiment = client.get_run(parent).info.experiment_id
    launcher = client.create_run(
        experiment, tags={"mlflow.parentRunId": parent, "job": "mlflow-run-launcher"}
    ).info.run_id
    stale_fold = client.create_run(
        experiment, tags={"mlflow.parentRunId": parent, "job": "train", "fold": "2"}
    ).info.run_id
    fold_states(parent, 3, grace_seconds=0)  # every RUNNING run without a heartbeat is stale
    assert client.get_run(launcher).info.status == "RUNNING"
    assert "superseded" not in client.get_run(launcher).data.tags
    assert client.get_run(stale_fold).info.status == "FAILED"
