"""Bench: training epochs (and seconds) the median pruner saves over no pruning on the demo digits.

Both arms run the same N trials with the same sampler seed. With N at most TPE's 10 random
start-up trials, trial n gets the same parameters in both arms (the sampler draws per trial
number), so the only difference is where the pruner stops a trial.

    .venv/bin/python -m training.demo_data          # data/demo, once
    .venv/bin/python bench/pruning_savings.py         # full: Lite0 (ImageNet weights), ~15 min
    .venv/bin/python bench/pruning_savings.py --bench # make bench's size: Lite0, ~2 minutes
    .venv/bin/python bench/pruning_savings.py --quick # smoke: tiny model, 50 images, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import optuna
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import fresh_sqlite_store  # noqa: E402
from training.demo_data import write_demo_data  # noqa: E402
from tuning.config import TuneConfig  # noqa: E402
from tuning.study import create_storage  # noqa: E402
from tuning.tune import run as tune  # noqa: E402

DEMO = ROOT / "data" / "demo"
# Training settings per mode; `per_class` picks that many demo images of each digit.
FULL = {
    "per_class": 50,  # 500 images: each untouched trial costs about a minute on 2 shared cores
    "model": "tf_efficientnet_lite0",
    "pretrained": "lite0-pypi",
    "image_size": 32,
    "stage1_epochs": 2,
    "stage2_epochs": 4,
    "unfreeze_blocks": 9,
    "n_trials": 8,
    # Judge after two epochs; the first three trials only set the bar.
    "pruner": "median:n_startup_trials=3,n_warmup_steps=1",
}
# `make bench`'s size: the same kind of study, small enough for about two minutes.
BENCH = {
    "per_class": 20,
    "model": "tf_efficientnet_lite0",
    "pretrained": "lite0-pypi",
    "image_size": 32,
    "stage1_epochs": 1,
    "stage2_epochs": 3,
    "unfreeze_blocks": 9,
    "n_trials": 6,
    "pruner": "median:n_startup_trials=2,n_warmup_steps=1",
}
# The smoke test's size: checks the plumbing, not the savings.
QUICK = {
    "per_class": 5,
    "model": "test_efficientnet",
    "pretrained": "none",
    "image_size": 32,
    "stage1_epochs": 1,
    "stage2_epochs": 1,
    "unfreeze_blocks": 2,
    "n_trials": 2,
    "pruner": "median:n_startup_trials=1",
}


@contextmanager
def scratch_workspace() -> Iterator[Path]:
    """A temporary cwd with its own MLflow store, so the bench leaves ./mlruns alone."""
    saved_cwd, saved_uri = Path.cwd(), os.environ.get("MLFLOW_TRACKING_URI")
    with tempfile.TemporaryDirectory(prefix="bench-pruning-") as folder:
        os.chdir(folder)
        os.environ["MLFLOW_TRACKING_URI"] = fresh_sqlite_store(Path(folder) / "mlflow.db")
        try:
            # Create both stores now so that neither arm's time includes their set-up.
            mlflow.MlflowClient().search_experiments()
            create_storage(f"sqlite:///{Path(folder) / 'optuna.db'}")
            yield Path(folder)
        finally:
            os.chdir(saved_cwd)
            if saved_uri is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = saved_uri


def demo_manifest(folder: Path, per_class: int) -> Path:
    """The first `per_class` demo training images of each digit, as a manifest of absolute
    paths."""
    if not (DEMO / "train.csv").is_file():
        write_demo_data(DEMO)
    table = pd.read_csv(DEMO / "train.csv", dtype=str)
    table = table.groupby("label", group_keys=False).head(per_class)
    table["path"] = [str(DEMO / p) for p in table["path"]]
    path = folder / "train.csv"
    table.to_csv(path, index=False)
    return path


def run_arm(settings: dict, data: Path, folder: Path, pruner: str) -> dict:
    name = pruner.partition(":")[0]
    options = {k: v for k, v in settings.items() if k != "per_class"}
    cfg = TuneConfig(
        data=str(data),
        **{**options, "pruner": pruner},
        study_name=f"bench-{name}",
        storage=f"sqlite:///{folder / 'optuna.db'}",
        sampler_seed=0,
        experiment_name="bench-pruning",
        best_config=str(folder / f"best_{name}.yaml"),
    )
    start = time.perf_counter()
    summary = tune(cfg)
    seconds = time.perf_counter() - start
    study = optuna.load_study(study_name=cfg.study_name, storage=create_storage(cfg.storage))
    return {
        "epochs": sum(len(t.intermediate_values) for t in study.trials),
        "seconds": round(seconds, 1),
        "pruned": summary.states["PRUNED"],
        "best_value": summary.best_value,
        "params": [t.params for t in study.trials],
        # Per trial, the monitored value after each epoch: shows why a trial was (not) pruned.
        "curves": [
            [round(t.intermediate_values[step], 3) for step in sorted(t.intermediate_values)]
            for t in study.trials
        ],
    }


def run(quick: bool = False, settings: dict | None = None) -> dict:
    """Both arms, same trials; returns epochs, seconds and the savings of pruning.
    `settings` (e.g. BENCH) overrides the QUICK / FULL choice."""
    settings = settings or (QUICK if quick else FULL)
    with scratch_workspace() as folder:
        data = demo_manifest(folder, settings["per_class"])
        pruned = run_arm(settings, data, folder, settings["pruner"])
        full = run_arm(settings, data, folder, "none")
    return {
        "mode": "quick" if settings is QUICK else "bench" if settings is BENCH else "full",
        "model": settings["model"],
        "images": settings["per_class"] * 10,
        "trials": settings["n_trials"],
        "epochs_per_trial": settings["stage1_epochs"] + settings["stage2_epochs"],
        "pruner": settings["pruner"],
        "same_params": pruned.pop("params") == full.pop("params"),
        "epochs_median": pruned["epochs"],
        "epochs_none": full["epochs"],
        "epoch_saving": round(1 - pruned["epochs"] / full["epochs"], 3),
        "seconds_median": pruned["seconds"],
        "seconds_none": full["seconds"],
        "time_saving": round(1 - pruned["seconds"] / full["seconds"], 3),
        "trials_pruned": pruned["pruned"],
        "best_value_median": pruned["best_value"],
        "best_value_none": full["best_value"],
        "curves_median": pruned["curves"],
        "curves_none": full["curves"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--bench", action="store_true", help="make bench's size")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.quick, BENCH if args.bench else None), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
