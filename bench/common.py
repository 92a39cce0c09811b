"""Shared bench helpers: scratch MLflow stores, real and generated images, timing, verdicts."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

_template: Path | None = None


def real_data_folder() -> Path:
    """../shared/data/hymenoptera beside the project (or beside a folder above it, for git
    worktrees); REAL_DATA overrides."""
    if os.environ.get("REAL_DATA"):
        return Path(os.environ["REAL_DATA"])
    project = Path(__file__).resolve().parents[1]
    for folder in project.parents:
        candidate = folder / "shared" / "data" / "hymenoptera"
        if candidate.is_dir():
            return candidate
    return project.parent / "shared" / "data" / "hymenoptera"


def fresh_sqlite_store(path: Path) -> str:
    """A new, migrated SQLite store at `path`: a copy of one migrated per process, since
    MLflow's schema migrations cost seconds per new database."""
    global _template
    if _template is None:
        folder = Path(tempfile.mkdtemp(prefix="bench-template-"))
        atexit.register(shutil.rmtree, folder, True)
        mlflow.MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
        _template = folder / "mlflow.db"
    shutil.copy(_template, path)
    return f"sqlite:///{path}"


@contextmanager
def scratch_store(uri: str | None = None) -> Iterator[Path]:
    """A temporary cwd whose SQLite store (or `uri`) becomes the tracking store; restored after.

    RunTracker reads MLFLOW_TRACKING_URI, and the SQLite store's default artifact root is
    ./mlruns, so both are redirected and ./mlruns of the project is never touched.
    """
    saved_cwd, saved_uri = Path.cwd(), os.environ.get("MLFLOW_TRACKING_URI")
    with tempfile.TemporaryDirectory(prefix="bench-") as folder:
        os.chdir(folder)
        os.environ["MLFLOW_TRACKING_URI"] = uri or fresh_sqlite_store(Path(folder) / "mlflow.db")
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        try:
            mlflow.MlflowClient().search_experiments()  # connect now, not inside a timing
            yield Path(folder)
        finally:
            while mlflow.active_run() is not None:
                mlflow.end_run()
            os.chdir(saved_cwd)
            # set_tracking_uri(None) also clears the variable: MLflow's own default applies
            # again, as before, instead of a URI pinned for the rest of the process.
            mlflow.set_tracking_uri(saved_uri)


def write_digits(root: Path, count: int, classes: int = 10) -> Path:
    """The first `count` of scikit-learn's real 8x8 digits (of `classes` classes) as PNGs in
    class folders, as a user's data would look."""
    digits = load_digits(n_class=classes)
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    for index in range(count):
        path = root / str(digits.target[index]) / f"digit_{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[index], mode="L").save(path)
    return root


def photo_like(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth random colour image with some noise: compresses like a photo, not like noise."""
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC))
    noise = rng.integers(-12, 13, image.shape)
    return np.clip(image.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def write_photos(root: Path, count: int, size: int, classes: int = 4, fmt: str = "JPEG") -> Path:
    """`count` generated size x size images in `classes` class folders."""
    rng = np.random.default_rng(0)
    suffix = ".jpg" if fmt == "JPEG" else ".png"
    for index in range(count):
        path = root / f"class_{index % classes}" / f"img_{index:05d}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo_like(rng, size)).save(path, format=fmt, quality=90)
    return root


def best_of(fn: Callable[[], object], repeats: int) -> float:
    """Fastest wall time of `repeats` calls: the least disturbed by other processes."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    met = value >= target if higher_is_better else value <= target
    return "met" if met else "missed"
