"""Every entry point through a real `mlflow run` on tiny data, with no MLFLOW_TRACKING_URI:
all commands share MLflow's default store, and the top of each job shows what ran."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from conftest import repo_state, write_digits

ROOT = Path(__file__).resolve().parents[1]
TINY_P = {
    "model": "test_efficientnet",
    "pretrained": "none",
    "image_size": 32,
    "batch_size": 16,
    "stage1_epochs": 1,
    "stage2_epochs": 1,
    "unfreeze_blocks": 2,
}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = str(ROOT)
    # MLproject commands call `python`: the one of this environment, as the Makefile does.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def mlflow_run(cwd: Path, entry: str, experiment: str, **params) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", entry]
    command += ["--env-manager", "local", "--experiment-name", experiment]
    for key, value in params.items():
        command += ["-P", f"{key}={value}"]
    return subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A user's folder: digits, then every job run from there with no tracking set-up."""
    folder = tmp_path_factory.mktemp("user")
    before = repo_state()
    data = write_digits(folder / "digits", per_class=10)
    done: dict[str, subprocess.CompletedProcess] = {}
    direct = [sys.executable, "-m", "training.train", "--data", str(data), "--run_name", "direct"]
    direct += [f"--{k}={v}" for k, v in TINY_P.items()] + ["--experiment_name", "jobs"]
    done["python -m"] = subprocess.run(
        direct, cwd=folder, env=_env(), capture_output=True, text=True
    )
    common = {"data": data, **TINY_P}
    steps = [
        ("demo_data", {"output": folder / "demo"}),
        ("train", {**common, "balanced_sampling": "true", "dropout": 0.3}),
        ("kfold", {**common, "folds": 2}),
        (
            "tune",
            {
                **common,
                "n_trials": 1,
                "storage": f"sqlite:///{folder}/optuna.db",
                "best_config": folder / "best.yaml",
                "study_name": "s",
            },
        ),
        ("promote", {"top_k": 1}),
        ("predict", {"data": data, "output": folder / "predictions.csv"}),
        ("onnx_export", {"output": folder / "onnx"}),
        ("explain", {"data": data, "max_images": 2, "target": "both"}),
    ]
    for entry, params in steps:
        done[entry] = mlflow_run(folder, entry, "jobs", **params)
    done["wrong experiment"] = mlflow_run(
        folder, "train", "jobs", **common, experiment_name="elsewhere"
    )
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}")
    runs = pd.DataFrame(
        [
            {
                "run_id": r.info.run_id,
                "status": r.info.status,
                **r.data.tags,
                **{f"params.{k}": v for k, v in r.data.params.items()},
                **{f"metrics.{k}": v for k, v in r.data.metrics.items()},
            }
            for r in client.search_runs([e.experiment_id for e in client.search_experiments()])
        ]
    )
    yield {"folder": folder, "done": done, "runs": runs, "client": client}
    assert repo_state() == before, "a test wrote tracking state inside the repo"


@pytest.mark.parametrize(
    "step",
    [
        "python -m",
        "demo_data",
        "train",
        "kfold",
        "tune",
        "promote",
        "predict",
        "onnx_export",
        "explain",
    ],
)
def test_each_entry_point_runs(workspace, step):
    done = workspace["done"][step]
    assert done.returncode == 0, done.stderr[-3000:]


def test_every_command_lands_in_one_default_store(workspace):
    """No export: `python -m` and `mlflow run` both write ./mlflow.db, artifacts ./mlruns."""
    folder, runs = workspace["folder"], workspace["runs"]
    assert (folder / "mlflow.db").is_file() and (folder / "mlruns").is_dir()
    jobs = set(runs.get("job", pd.Series(dtype=str)).dropna())
    assert {"train", "kfold", "tune", "promote", "predict", "explain"} <= jobs
    assert "mlflow-run-launcher" in jobs
    direct = runs[runs["mlflow.runName"] == "direct"]
    assert len(direct) == 1 and direct["status"].item() == "FINISHED"
    artifact_root = workspace["client"].get_run(direct["run_id"].item()).info.artifact_uri
    assert artifact_root.removeprefix("file://").startswith(str(folder / "mlruns"))


def test_the_top_of_a_job_holds_the_values_that_ran(workspace):
    runs = workspace["runs"]
    launchers = runs[runs["job"] == "mlflow-run-launcher"]
    train_launcher = launchers[launchers["mlflow.project.entryPoint"] == "train"].iloc[0]
    job = runs[runs["run_id"] == train_launcher["mlflow.parentRunId"]].iloc[0]
    assert pd.isna(job.get("mlflow.parentRunId"))  # the job's own run is at the top
    # What ran: the MLproject leaves unset values '' and the job's defaults apply.
    assert job["params.model"] == "test_efficientnet" and job["params.seed"] == "42"
    assert job["params.dropout"] == "0.3"  # given explicitly, equal to the default
    assert job["params.class_weights_resolved"].startswith("none (balanced_sampling=true")
    assert not pd.isna(job["metrics.best_val_f1_macro"]) and not pd.isna(
        job["metrics.val/f1_macro"]
    )
    # The launcher keeps the command line as typed: '' for what was not given.
    assert train_launcher["params.seed"] == "''" and train_launcher["params.model"] == (
        "test_efficientnet"
    )
    kfold_parent = runs[(runs["job"] == "kfold")].iloc[0]
    folds = runs[runs["mlflow.parentRunId"] == kfold_parent["run_id"]]
    assert sorted(folds["fold"].dropna()) == ["0", "1"]  # folds directly under the job


def test_an_experiment_name_other_than_mlflow_runs_is_refused(workspace):
    done = workspace["done"]["wrong experiment"]
    assert done.returncode != 0
    assert "use `mlflow run --experiment-name elsewhere" in done.stderr
    assert workspace["client"].get_experiment_by_name("elsewhere") is None
