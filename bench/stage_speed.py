"""Bench: epoch time of stage 1 (frozen backbone) vs stage 2 (last N groups) at 224 px.

Both stages run the project's own train_one_epoch over make_loader with the `base`
augmentation, after set_trainable, with fit's optimizer, on a channels_last model as fit
leaves it. A one-batch epoch warms each stage up first. Full training (every layer) is timed
too, and each setting is split into loader / forward / backward / optimizer-step seconds per
batch: that profile is what explains the ratio.

Stage 1 as the project runs it with the feature cache (`feature_cache`, augment `none` or
`flip`) is timed on the same images: the one-off pooled features of both flip views (the
training images resized and normalised, no augmentation, as training/pipeline.py builds them),
spread over the default config's `stage1_epochs`, plus one head epoch on cached features
(train_one_epoch with `on_features`). Validation is left out of every setting.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch
from timm.optim import create_optimizer_v2
from torch.utils.data import Subset

from bench.common import best_of, photo_like, verdict
from training.config import TrainConfig
from training.engine import ImageArrayDataset, _forward, make_loader, train_one_epoch
from training.feature_cache import FeatureDataset, backbone_features
from training.losses import create_loss
from training.model import Classifier, backbone_is_frozen, create_classifier, set_trainable
from training.model import train_mode as project_train_mode
from training.transforms import eval_transform, train_transform

TARGET = 4.0  # stage 1 at least this many times faster than stage 2
FULL = {"model": "efficientnet_b0", "image_size": 224, "images": 64, "batch": 32, "unfreeze": 3}
QUICK = {"model": "test_efficientnet", "image_size": 64, "images": 16, "batch": 8, "unfreeze": 2}
SETTINGS = {"stage1": 0, "stage2": None, "all": None}  # stage2's value comes from `unfreeze`


def batch_profile(model: Classifier, images: torch.Tensor, targets: torch.Tensor, optimizer):
    """Best-of-2 seconds of forward, backward and optimizer step on one batch, as the engine
    runs them (a frozen backbone under no_grad)."""
    loss_fn = torch.nn.CrossEntropyLoss()
    frozen = backbone_is_frozen(model)
    times = {"forward": [], "backward": [], "step": []}
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss = loss_fn(_forward(model, images, frozen), targets)
        middle = time.perf_counter()
        loss.backward()
        after = time.perf_counter()
        optimizer.step()
        end = time.perf_counter()
        times["forward"].append(middle - start)
        times["backward"].append(after - middle)
        times["step"].append(end - after)
    return {key: round(min(values), 4) for key, values in times.items()}


def time_setting(model: Classifier, dataset, batch: int, unfreeze: int | None) -> dict:
    """One warm-up batch, then one timed epoch of train_one_epoch, then the batch profile."""
    trainable = set_trainable(model, unfreeze)
    optimizer = create_optimizer_v2(model, opt="adam", lr=1e-4, weight_decay=1e-4)
    loss_fn = create_loss("cross_entropy", None, 0.0, 0.0)
    device = torch.device("cpu")
    warm = make_loader(Subset(dataset, range(batch)), batch, True, 0)
    train_one_epoch(model, warm, loss_fn, optimizer, device, progress=False)
    loader = make_loader(dataset, batch, True, 0)
    epoch = train_one_epoch(model, loader, loss_fn, optimizer, device, progress=False)
    images, targets = next(iter(loader))
    images = images.contiguous(memory_format=torch.channels_last)
    project_train_mode(model)
    profile = batch_profile(model, images, targets, optimizer)
    return {"trainable_params": trainable, "epoch_s": round(epoch["seconds"], 3), **profile}


def time_cached_stage1(model: Classifier, plain, batch: int, epochs: int) -> dict:
    """Stage 1 on cached features: both views' feature pass (after a one-batch warm-up),
    then one head epoch after a warm-up epoch; the pass is spread over `epochs`."""
    set_trainable(model, 0)
    device = torch.device("cpu")
    warm = make_loader(Subset(plain, range(batch)), batch * 2, False, 0)
    backbone_features(model.backbone, warm, device)
    loader = make_loader(plain, batch * 2, False, 0)  # as training/pipeline.py's stage1_cache
    start = time.perf_counter()
    views = [
        backbone_features(model.backbone, loader, device, mirrored)[0] for mirrored in (False, True)
    ]
    feature_s = time.perf_counter() - start
    features = make_loader(FeatureDataset(views, np.asarray(plain.labels), 0), batch, True, 0)
    optimizer = create_optimizer_v2(model, opt="adam", lr=1e-3, weight_decay=1e-4)
    loss_fn = create_loss("cross_entropy", None, 0.0, 0.0)
    head = [
        train_one_epoch(
            model, features, loss_fn, optimizer, device, progress=False, on_features=True
        )["seconds"]
        for _ in range(3)
    ]
    head_s = min(head[1:])  # the first epoch is the warm-up
    return {
        "feature_pass_s": round(feature_s, 3),
        "views": len(views),
        "head_epoch_s": round(head_s, 4),
        "stage1_epochs": epochs,
        "amortised_epoch_s": round(feature_s / epochs + head_s, 4),
    }


def run(quick: bool = False) -> dict:
    """Stage 1 (uncached and cached), stage 2 and full-training epoch times; ratios of stage 2
    to each stage 1."""
    settings = QUICK if quick else FULL
    size, batch, count = settings["image_size"], settings["batch"], settings["images"]
    torch.manual_seed(0)
    model, info = create_classifier(settings["model"], 4, 0.3, "none")
    model.to(memory_format=torch.channels_last)  # as fit leaves it
    rng = np.random.default_rng(0)
    images = [photo_like(rng, size + size // 7) for _ in range(count)]  # e.g. 256 -> 224
    dataset = ImageArrayDataset(
        images, np.arange(count) % 4, train_transform("base", size, info.mean, info.std, 0)
    )
    loader = make_loader(dataset, batch, True, 0)
    loader_s = best_of(lambda: [None for _ in loader], 2)
    results = {}
    for name, unfreeze in SETTINGS.items():
        unfreeze = settings["unfreeze"] if name == "stage2" else unfreeze
        results[name] = time_setting(model, dataset, batch, unfreeze)
    ratio = results["stage2"]["epoch_s"] / results["stage1"]["epoch_s"]
    plain = ImageArrayDataset(
        images, np.arange(count) % 4, eval_transform(size, info.mean, info.std)
    )
    cached = time_cached_stage1(model, plain, batch, TrainConfig.stage1_epochs)
    cached_ratio = results["stage2"]["epoch_s"] / cached["amortised_epoch_s"]
    # Early stopping can end stage 1 after `patience` + 1 epochs: fewer epochs share the pass.
    earliest = TrainConfig.patience + 1
    earliest_epoch_s = cached["feature_pass_s"] / earliest + cached["head_epoch_s"]
    return {
        "model": settings["model"],
        "image_size": size,
        "images": count,
        "batch_size": batch,
        "unfreeze_blocks": settings["unfreeze"],
        "stage1_epoch_s": results["stage1"]["epoch_s"],
        "stage2_epoch_s": results["stage2"]["epoch_s"],
        "all_epoch_s": results["all"]["epoch_s"],
        "stage1_cached_epoch_s": cached["amortised_epoch_s"],
        "cached_ratio": round(cached_ratio, 2),
        "ratio": round(ratio, 2),  # uncached stage 1 (augment=base, the default: no cache)
        "all_vs_stage1": round(results["all"]["epoch_s"] / results["stage1"]["epoch_s"], 2),
        "target": TARGET,
        "status": verdict(cached_ratio, TARGET),
        "uncached_status": verdict(ratio, TARGET),
        "cached_ratio_earliest_stop": round(results["stage2"]["epoch_s"] / earliest_epoch_s, 2),
        "earliest_stop_epochs": earliest,
        "cached": cached,
        "loader_epoch_s": round(loader_s, 3),
        "profile": results,  # per-batch forward / backward / step seconds per setting
    }


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv), indent=2))
