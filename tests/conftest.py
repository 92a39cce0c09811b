"""Shared fixtures: real digit PNGs, a private MLflow SQLite store, tiny training configs, one
real team server (PostgreSQL + `mlflow server`) and one local Ray per test session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from servers import TeamServer, postgres_missing, start_team_server
from sklearn.datasets import load_digits

from training.config import TrainConfig
from training.data import load_labelled_images
from training.engine import ImageArrayDataset
from training.splits import holdout_split
from training.transforms import eval_transform

TINY = {
    "model": "test_efficientnet",
    "pretrained": "none",
    "image_size": 32,
    "batch_size": 16,
    "stage1_epochs": 1,
    "stage2_epochs": 2,
    "stage2_lr": 1e-3,
    "unfreeze_blocks": 2,
    "patience": 3,
    "experiment_name": "tests",
}


ROOT = Path(__file__).resolve().parents[1]


def repo_state() -> dict[str, float]:
    """Data and tracking state inside the project folder (path -> mtime): tests leave it as
    they found it."""
    paths = [ROOT / "mlflow.db", *(ROOT / "mlruns").rglob("*"), *(ROOT / "data").rglob("*")]
    return {str(p): p.stat().st_mtime for p in paths if p.exists()}


def write_digits(root: Path, per_class: int = 8, classes: int = 4, offset: int = 0) -> Path:
    """Real handwritten digits as PNGs in class folders, with a manifest (writer groups)."""
    digits = load_digits()
    rows = []
    for label in range(classes):
        indices = np.flatnonzero(digits.target == label)[offset : offset + per_class]
        for rank, index in enumerate(indices):
            path = root / str(label) / f"d{index:04d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            image = (digits.images[index] * (255 / 16)).astype(np.uint8)
            Image.fromarray(image, mode="L").save(path)
            rows.append((path.relative_to(root).as_posix(), str(label), f"g{rank // 2}_{label}"))
    pd.DataFrame(rows, columns=["path", "label", "person"]).to_csv(
        root / "manifest.csv", index=False
    )
    return root


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """40 real digit images: 4 classes x 10, read-only for tests."""
    return write_digits(tmp_path_factory.mktemp("digits"), per_class=10)


@pytest.fixture(scope="session")
def migrated_store(tmp_path_factory) -> Path:
    """An empty, fully migrated MLflow SQLite file; copying it saves ~3 s of migrations."""
    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking(tmp_path, monkeypatch, migrated_store) -> str:
    """A fresh MLflow SQLite store (and artifact root) in tmp_path for this test."""
    shutil.copy(migrated_store, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.delenv("OPTUNA_STORAGE", raising=False)  # a developer's `make server` shell
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is ./mlruns
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run() is not None:
        mlflow.end_run()


@pytest.fixture(scope="session")
def team_server() -> TeamServer:
    """One PostgreSQL cluster and one `mlflow server` (1 worker, 2 threads: a small, known
    connection cap) for the whole session, in a temporary folder; stopped at the end."""
    missing = postgres_missing()
    if missing:
        pytest.skip(f"PostgreSQL binaries not installed: {missing}")
    server = start_team_server(workers=1, threads=2)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the session (2 CPUs, loopback only; starting one takes 5-15 s here,
    and timed out when started per test at low priority on busy cores); shut down at the end.
    Jobs run with executor=ray find it running and use it."""
    try:
        import ray
    except ImportError:
        pytest.skip("ray is not installed (pip install -e '.[ray]'; make test installs it)")
    if ray.is_initialized():
        yield ray
        return
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        configure_logging=False,
    )
    yield ray
    ray.shutdown()


def child_runs(parent_id: str) -> pd.DataFrame:
    """The runs nested under `parent_id`, in any experiment, as mlflow.search_runs gives them."""
    return mlflow.search_runs(
        search_all_experiments=True, filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )


def oof_predictions(parent_id: str) -> pd.DataFrame:
    """A k-fold parent's out-of-fold predictions (evaluation/oof_predictions.csv)."""
    path = mlflow.artifacts.download_artifacts(
        run_id=parent_id, artifact_path="evaluation/oof_predictions.csv"
    )
    return pd.read_csv(path)


def plain_datasets(digits_dir: Path, size: int = 32):
    """Training and validation digits (a 25 % holdout), resized and normalised, no
    augmentation: a learning rate of ~0 changes nothing from epoch to epoch."""
    data = load_labelled_images(digits_dir, size, progress=False)
    mask = holdout_split(data.labels, None, 0.25, seed=0)
    transform = eval_transform(size, (0.5,) * 3, (0.5,) * 3)

    def dataset(rows: np.ndarray) -> ImageArrayDataset:
        return ImageArrayDataset([data.images[i] for i in rows], data.labels[rows], transform)

    return dataset(np.flatnonzero(~mask)), dataset(np.flatnonzero(mask))


@pytest.fixture
def tiny_config(digits_dir) -> TrainConfig:
    return TrainConfig(data=str(digits_dir), **TINY)


def all_runs(experiment: str = "tests") -> pd.DataFrame:
    if mlflow.get_experiment_by_name(experiment) is None:
        return pd.DataFrame()
    return mlflow.search_runs(experiment_names=[experiment])


os.environ.setdefault("TQDM_DISABLE", "1")
# A local Ray binds the loopback address only (read when ray is imported; Ray workers inherit
# the environment, TQDM_DISABLE too).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


# Files that take longest first (about 175, 135, 125, 60, 60, 40 and 30 s under `make test`),
# the rest after them in their usual order, so the two workers end close together: xdist
# hands a worker the next file when the worker has two tests left, and by default orders files
# by their number of tests, which left the fault and subprocess files to the end and one
# worker idle for a minute. `make test` passes --no-loadscope-reorder to keep this order.
SLOWEST_FILES = (
    "test_server.py",
    "test_mlflow_run.py",
    "test_kfold.py",
    "test_registry.py",
    "test_ray.py",
    "test_tune.py",
    "test_bench_smoke.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return SLOWEST_FILES.index(name) if name in SLOWEST_FILES else len(SLOWEST_FILES)

    items.sort(key=rank)  # stable: tests keep their order within a file


# `make test` runs two pytest-xdist workers (`-n 2 --dist loadfile`): the fault tests spend
# much of their time waiting on other processes (heartbeats going stale, a server down for
# 30 s), which the other worker fills with CPU work. A test file stays in one worker, so its
# module fixtures (a real `mlflow run` of every entry point, a reference k-fold job) run once;
# a worker that reaches a team-server test starts its own server (free ports).
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers share the machine's cores: each (and every job it starts as a subprocess,
    # through OMP_NUM_THREADS) runs torch on its half instead of on all of them. Torch
    # threads spin-wait at every operator: more threads than cores slowed a batch ~80x here.
    import torch

    per_worker = max(1, (os.cpu_count() or 2) // 2)
    os.environ["OMP_NUM_THREADS"] = str(per_worker)
    torch.set_num_threads(per_worker)
