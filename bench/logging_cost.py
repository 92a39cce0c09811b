"""Bench: MLflow cost per epoch (SQLite and HTTP tracking server) as a share of an epoch.

Per epoch, training.pipeline.execute logs exactly one thing: the epoch record (12 metrics) in
one batched RunTracker.log_metrics call. That call is timed against a temporary SQLite store
and against an `mlflow server` on 127.0.0.1 (its own SQLite store), and divided by the
project's epoch time from bench.train_throughput.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from bench.common import fresh_sqlite_store, scratch_store, verdict
from training.tracking import RunTracker

TARGET = 0.02  # logging at most 2 % of an epoch
SERVER_START_TIMEOUT = 120.0
# The record fit hands to on_epoch, minus `step` (execute logs it as the step).
RECORD = {
    "stage": 2,
    "epoch": 1,
    "lr": 1e-4,
    "train_loss": 0.5,
    "train_accuracy": 0.8,
    "epoch_seconds": 5.0,
    "images_per_s": 60.0,
    "val_accuracy": 0.8,
    "val_f1_macro": 0.8,
    "val_precision_macro": 0.8,
    "val_recall_macro": 0.8,
    "val_loss": 0.5,
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def tracking_server(folder: Path, workers: int | None = None) -> Iterator[str]:
    """An `mlflow server` on a free local port; its whole process group is ended on exit.
    `workers` None keeps the server's default (4); 1 starts faster (the smoke test)."""
    port = free_port()
    command = [
        str(Path(sys.executable).with_name("mlflow")),
        "server",
        "--backend-store-uri",
        fresh_sqlite_store(folder / "server.db"),
        "--default-artifact-root",
        str(folder / "server-artifacts"),
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        *(["--workers", str(workers)] if workers else []),
    ]
    url = f"http://127.0.0.1:{port}"
    with open(folder / "server.log", "wb") as log:
        # A session of its own: the server forks workers; ending the group ends them all.
        process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(folder / 'server.log').read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"mlflow server not healthy after {SERVER_START_TIMEOUT} s")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def seconds_per_epoch(steps: int, uri: str | None = None) -> float:
    """Median seconds of one epoch's logging (one batched call) over `steps` epochs."""
    with scratch_store(uri), RunTracker("bench-logging") as tracker:
        tracker.log_metrics(RECORD, step=0)  # warm-up: metric keys, connection pool
        times = []
        for step in range(1, steps + 1):
            start = time.perf_counter()
            tracker.log_metrics({**RECORD, "epoch": step}, step=step)
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def run(quick: bool = False, epoch_seconds: float | None = None) -> dict:
    """Per-epoch logging seconds with SQLite and HTTP, and their share of `epoch_seconds`
    (the project's epoch in bench.train_throughput; measured here when not given)."""
    if epoch_seconds is None:
        from bench import train_throughput

        epoch_seconds = train_throughput.run(quick)["project_epoch_s"]
    steps = 5 if quick else 30
    sqlite_s = seconds_per_epoch(steps)
    with tempfile.TemporaryDirectory(prefix="bench-server-") as folder:
        # One client sends one request at a time: the worker count changes start-up only.
        with tracking_server(Path(folder), workers=1 if quick else None) as url:
            http_s = seconds_per_epoch(steps, url)
    worst = max(sqlite_s, http_s) / epoch_seconds
    return {
        "metrics_per_epoch": len(RECORD),
        "epochs_logged": steps,
        "epoch_s": round(epoch_seconds, 3),
        "sqlite_s_per_epoch": round(sqlite_s, 4),
        "http_s_per_epoch": round(http_s, 4),
        "sqlite_share": round(sqlite_s / epoch_seconds, 4),
        "http_share": round(http_s / epoch_seconds, 4),
        "target": TARGET,
        "status": verdict(worst, TARGET, higher_is_better=False),
    }


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv), indent=2))
