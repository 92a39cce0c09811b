"""Bench: training images/s of the project's loop (data loading, MLflow) vs a bare timm loop.

Project arm: training.fit.fit over ImageArrayDataset/make_loader with the `base` augmentation,
one Stage('all', ..., None) (every layer trains), and the per-epoch batched log_metrics that
training.pipeline.execute does, into a RunTracker on a temporary SQLite store. Its epoch time
is wall clock between epoch ends minus the validation pass (the bare loop validates nothing).
Bare arm: timm.create_model + torch Adam over the same images already in memory as one float
tensor; plain forward / backward / step, in NCHW and in channels_last; the faster is the
baseline. Same model, batch size, image size and images per epoch. Bare, project, bare run in
turn so that a slow spell of the machine does not favour one arm.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F

from bench.common import scratch_store, verdict, write_digits
from training import fit as fit_module
from training.config import TrainConfig
from training.data import load_labelled_images
from training.engine import ImageArrayDataset, make_loader
from training.fit import Stage, fit
from training.losses import create_loss
from training.model import create_classifier
from training.tracking import RunTracker
from training.transforms import eval_transform, to_tensor, train_transform

TARGET = 0.95
# `val`: validation images; validation is timed and subtracted, so small keeps the bench short.
FULL = {
    "model": "efficientnet_b0",
    "image_size": 64,
    "images": 384,
    "val": 32,
    "batch": 32,
    "epochs": 2,
}
QUICK = {
    "model": "test_efficientnet",
    "image_size": 32,
    "images": 32,
    "val": 16,
    "batch": 16,
    "epochs": 1,
}
LR = 1e-3


def bare_loop(
    model_name: str,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch: int,
    epochs: int,
    channels_last: bool,
) -> list[float]:
    """Seconds per epoch of a hand-written loop; the first (warm-up) epoch is dropped.
    `channels_last` converts model and data once, up front, as a tuned loop would."""
    torch.manual_seed(0)
    classes = int(labels.max()) + 1
    model = timm.create_model(model_name, num_classes=classes, drop_rate=0.3)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=1e-4)
    model.train()
    seconds = []
    for _ in range(epochs + 1):
        start = time.perf_counter()
        order = torch.randperm(len(images))
        for first in range(0, len(images) - batch + 1, batch):  # drop_last, like the project
            index = order[first : first + batch]
            loss = F.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        seconds.append(time.perf_counter() - start)
    return seconds[1:]


class _ValidationClock:
    """Wraps fit's predict_probs to time the validation passes, which the bare loop lacks."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.original = fit_module.predict_probs

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.original(*args, **kwargs)
        finally:
            self.seconds.append(time.perf_counter() - start)

    def __enter__(self) -> _ValidationClock:
        fit_module.predict_probs = self
        return self

    def __exit__(self, *exc) -> None:
        fit_module.predict_probs = self.original


def project_loop(settings: dict, data, train_idx: np.ndarray, val_idx: np.ndarray) -> dict:
    """Per-epoch wall seconds (warm-up epoch dropped) of fit + per-epoch MLflow logging."""
    size, batch, epochs = settings["image_size"], settings["batch"], settings["epochs"]
    cfg = TrainConfig(
        data="unused",
        model=settings["model"],
        pretrained="none",
        image_size=size,
        batch_size=batch,
        scheduler="none",
        patience=epochs + 2,  # never stop early: every epoch is measured
        experiment_name="bench-throughput",
    )
    torch.manual_seed(0)
    model, info = create_classifier(cfg.model, len(data.class_names), cfg.dropout, "none")
    images, labels = data.images, data.labels
    train_set = ImageArrayDataset(
        [images[i] for i in train_idx],
        labels[train_idx],
        train_transform("base", size, info.mean, info.std, cfg.seed),
    )
    val_set = ImageArrayDataset(
        [images[i] for i in val_idx], labels[val_idx], eval_transform(size, info.mean, info.std)
    )
    train_loader = make_loader(train_set, batch, True, cfg.seed)  # num_workers=0, the default
    val_loader = make_loader(val_set, batch * 2, False, cfg.seed)
    ends: list[float] = []
    log_seconds: list[float] = []
    with scratch_store(), RunTracker(cfg.experiment_name) as tracker:

        def log_epoch(record: dict[str, float]) -> None:  # as training.pipeline.execute does
            start = time.perf_counter()
            tracker.log_metrics({k: v for k, v in record.items() if k != "step"}, record["step"])
            log_seconds.append(time.perf_counter() - start)
            ends.append(time.perf_counter())

        stages = [Stage("all", epochs + 1, LR, None)]
        loss_fn = create_loss("cross_entropy", None, 0.0, 0.0)
        with _ValidationClock() as validation:
            begin = time.perf_counter()
            device = torch.device("cpu")
            result = fit(
                model, train_loader, val_loader, loss_fn, cfg, device, stages, log_epoch, False
            )
    walls = np.diff([begin, *ends])
    epoch_seconds = (walls - np.asarray(validation.seconds))[1:]
    engine_seconds = [record["epoch_seconds"] for record in result.history][1:]
    return {
        "epoch_seconds": epoch_seconds.tolist(),
        "engine_seconds": engine_seconds,  # train_one_epoch alone (data loading included)
        "log_seconds": log_seconds[1:],
        "val_seconds": validation.seconds[1:],
        "metrics_per_epoch": len(result.history[0]) - 1,
    }


def run(quick: bool = False) -> dict:
    """Both arms on the same digits; returns images/s of each and their ratio."""
    settings = QUICK if quick else FULL
    size, batch, count = settings["image_size"], settings["batch"], settings["images"]
    with tempfile.TemporaryDirectory(prefix="bench-digits-") as folder:
        root = write_digits(Path(folder), count + settings["val"])
        data = load_labelled_images(root, size, progress=False)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(data))
    train_idx, val_idx = order[:count], order[count:]

    # The bare arm's tensor: the same images, resized and normalised once, up front.
    _, info = create_classifier(settings["model"], len(data.class_names), 0.3, "none")
    prepare = eval_transform(size, info.mean, info.std)
    tensor = torch.stack([to_tensor(prepare(image=data.images[i])["image"]) for i in train_idx])
    targets = torch.as_tensor(data.labels[train_idx], dtype=torch.long)

    # Plain NCHW is what a hand-written loop does; channels_last is what the project does (and
    # is faster for these models on this CPU). The baseline is the faster of the two.
    epochs = settings["epochs"]
    bare_nchw = bare_loop(settings["model"], tensor, targets, batch, epochs, False)
    project = project_loop(settings, data, train_idx, val_idx)
    bare_cl = bare_loop(settings["model"], tensor, targets, batch, epochs, True)
    seen = (count // batch) * batch
    nchw_ips, cl_ips = seen / float(np.mean(bare_nchw)), seen / float(np.mean(bare_cl))
    bare_ips = max(nchw_ips, cl_ips)
    project_ips = seen / float(np.mean(project["epoch_seconds"]))
    ratio = project_ips / bare_ips
    return {
        "model": settings["model"],
        "image_size": size,
        "batch_size": batch,
        "train_images": seen,
        "timed_epochs": settings["epochs"],
        "bare_images_per_s": round(bare_ips, 2),
        "project_images_per_s": round(project_ips, 2),
        "ratio": round(ratio, 3),
        "target": TARGET,
        "status": verdict(ratio, TARGET),
        "bare_nchw_images_per_s": round(nchw_ips, 2),
        "bare_channels_last_images_per_s": round(cl_ips, 2),
        "ratio_vs_plain_nchw": round(project_ips / nchw_ips, 3),
        "bare_epoch_s": round(seen / bare_ips, 3),
        "project_epoch_s": round(float(np.mean(project["epoch_seconds"])), 3),
        "project_engine_epoch_s": round(float(np.mean(project["engine_seconds"])), 3),
        "project_log_s": round(float(np.mean(project["log_seconds"])), 4),
        "project_val_s": round(float(np.mean(project["val_seconds"])), 3),
        "metrics_per_epoch": project["metrics_per_epoch"],
    }


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv), indent=2))
