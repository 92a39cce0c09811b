"""Bench: the demo k-fold as Ray tasks (two one-thread workers) against one process with two
threads on this 2-core machine, and the per-task overheads a projection to N GPUs needs:
Ray's start, shipping the decoded images through the object store, MLflow over HTTP.

    .venv/bin/python -m bench.scale_out           # the demo k-fold (5 folds), ~12 minutes
    .venv/bin/python -m bench.scale_out --quick   # smoke: tiny model and data, under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import fresh_sqlite_store, scratch_store, write_digits  # noqa: E402
from bench.logging_cost import tracking_server  # noqa: E402
from training.config import parse_cli  # noqa: E402
from training.demo_data import write_demo_data  # noqa: E402
from training.kfold_folds import train_fold  # noqa: E402
from training.kfold_job import KFoldConfig, prepare_job  # noqa: E402
from training.tracking import RunTracker  # noqa: E402

DEMO = ROOT / "data" / "demo"
DEMO_JOB = ["--config", str(ROOT / "configs" / "demo.yaml"), "--data", str(DEMO / "train")]
QUICK_JOB = [
    *("--model", "test_efficientnet", "--pretrained", "none", "--image_size", "32"),
    *("--batch_size", "16", "--stage1_epochs", "1", "--stage2_epochs", "1"),
    *("--unfreeze_blocks", "2", "--folds", "2", "--explain_misclassified", "0"),
]


def job_flags(quick: bool, folder: Path) -> list[str]:
    if quick:  # written to the scratch folder, never into the repo
        return [*QUICK_JOB, "--data", str(write_digits(folder / "digits", 40, classes=4))]
    if not (DEMO / "train.csv").is_file():
        write_demo_data(DEMO)
    return DEMO_JOB


def run_arm(flags: list[str], folder: Path, name: str) -> dict:
    """One `python -m training.kfold` process on a fresh SQLite store: wall time, fold times
    (from the fold runs) and, for executor=ray, Ray's start and the object-store put (from
    the executor's log lines)."""
    arm = folder / name
    arm.mkdir()
    uri = fresh_sqlite_store(arm / "mlflow.db")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "OPTUNA_"))},
        "MLFLOW_TRACKING_URI": uri,
        "PYTHONPATH": str(ROOT),
        "TQDM_DISABLE": "1",
    }
    command = [sys.executable, "-m", "training.kfold", *flags, "--experiment_name", "bench"]
    start = time.perf_counter()
    done = subprocess.run(
        command, cwd=arm, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    wall = time.perf_counter() - start
    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("bench").experiment_id])
    folds = sorted((r for r in runs if r.data.tags.get("fold")), key=lambda r: r.data.tags["fold"])
    parent = next(r for r in runs if r.data.tags.get("job") == "kfold")
    seconds = [(r.info.end_time - r.info.start_time) / 1000 for r in folds]
    # The training epochs alone (what a GPU speeds up); the rest of a fold is set-up,
    # validation, evaluation and logging.
    training = [
        sum(m.value for m in client.get_metric_history(r.info.run_id, "train/seconds"))
        for r in folds
    ]
    last_fold_end = max(r.info.end_time for r in folds)
    log = done.stderr.decode(errors="replace")
    return {
        "wall_s": round(wall, 1),
        "fold_s": [round(s, 1) for s in seconds],
        "mean_fold_s": round(sum(seconds) / len(seconds), 1),
        "mean_fold_training_s": round(sum(training) / len(training), 1),
        "aggregate_s": round((parent.info.end_time - last_fold_end) / 1000, 1),
        "oof_f1_macro": round(parent.data.metrics["oof_f1_macro"], 4),
        **logged_seconds(log),
    }


def logged_seconds(log: str) -> dict:
    """Ray's start and the put of the decoded job, as the executor logged them."""
    found = {}
    for key, pattern in (
        ("ray_start_s", r"started a local Ray in ([0-9.]+) s"),
        ("object_store_put_s", r"put in Ray's object store in ([0-9.]+) s"),
    ):
        match = re.search(pattern, log)
        if match:
            found[key] = float(match.group(1))
    return found


def http_fold(flags: list[str], folder: Path) -> float:
    """Fold 0 trained in this process (two threads, as the local arm) against an `mlflow
    server` on 127.0.0.1: its run time, to compare with the local arm's fold 0 on SQLite."""
    job = prepare_job(parse_cli(KFoldConfig, flags, ""))
    with tracking_server(folder, workers=1) as url, scratch_store(url):
        with RunTracker("bench", "parent") as parent:
            run_id = train_fold(job, 0, parent.run_id, progress=False)
        run = mlflow.get_run(run_id)
    return round((run.info.end_time - run.info.start_time) / 1000, 1)


def run(quick: bool = False) -> dict:
    """Both arms; the HTTP fold only at full size (the smoke test keeps to the arms)."""
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as scratch:
        folder = Path(scratch)
        flags = job_flags(quick, folder)
        local = run_arm([*flags, "--executor", "local"], folder, "local")
        remote = run_arm([*flags, "--executor", "ray", "--cpus_per_task", "1"], folder, "ray")
        result = {
            "mode": "quick" if quick else "demo k-fold",
            "folds": len(local["fold_s"]),
            "images": images(flags),
            "local_two_threads": local,
            "ray_two_one_thread_workers": remote,
            "local_wall_s": local["wall_s"],
            "ray_wall_s": remote["wall_s"],
            "speedup": round(local["wall_s"] / remote["wall_s"], 3),
            "ray_start_s": remote.get("ray_start_s", 0.0),
            "object_store_put_s": remote.get("object_store_put_s", 0.0),
        }
        if not quick:
            result["fold_http_s"] = http_fold(flags, folder)
            result["http_overhead_per_fold_s"] = round(
                result["fold_http_s"] - local["fold_s"][0], 1
            )
    return result


def images(flags: list[str]) -> int:
    data = parse_cli(KFoldConfig, flags, "").data
    return sum(1 for p in Path(data).rglob("*.png"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    print(json.dumps(run(parser.parse_args().quick), indent=2))
