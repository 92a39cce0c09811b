"""One training run end to end: plan (validate, no side effects), then fit and log to a run."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader

from training.config import TrainConfig, config_to_dict, config_to_yaml
from training.data import LabelledImages
from training.engine import ImageArrayDataset, make_loader, pick_device
from training.feature_cache import CACHEABLE_AUGMENTS, CacheSource, cache_refusal
from training.fit import FitResult, fit, stages_from
from training.leakage import describe_pairs, leakage_metrics
from training.losses import create_loss, resolve_class_weights
from training.metric_keys import epoch_metrics
from training.model import (
    Classifier,
    ModelInfo,
    backbone_parts,
    create_classifier,
    view_crop_pct,
)
from training.run_results import (
    input_example,
    log_checkpoints,
    log_evaluation,
    log_model,
    log_summary,
)
from training.tracking import RunTracker
from training.transforms import eval_transform, train_transform

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainingPlan:
    """Everything decided before a run exists; building it raises on any bad input."""

    cfg: TrainConfig
    data: LabelledImages
    val_mask: np.ndarray
    class_weights: list[float] | None
    model: Classifier
    model_info: ModelInfo

    @property
    def train_indices(self) -> np.ndarray:
        return np.flatnonzero(~self.val_mask)

    @property
    def val_indices(self) -> np.ndarray:
        return np.flatnonzero(self.val_mask)

    @property
    def crop_pct(self) -> float:
        """The share of the shorter side the model sees (training.transforms; 0 = squash)."""
        return view_crop_pct(self.cfg.model, self.cfg.resize)


def plan_training(cfg: TrainConfig, data: LabelledImages, val_mask: np.ndarray) -> TrainingPlan:
    """Resolve class weights and build the model (weights errors surface here)."""
    seed_everything(cfg.seed)
    train_labels = data.labels[~val_mask]
    weights = resolve_class_weights(
        cfg.effective_class_weights, train_labels, len(data.class_names), cfg.class_weight_strength
    )
    model, info = create_classifier(cfg.model, len(data.class_names), cfg.dropout, cfg.pretrained)
    return TrainingPlan(cfg, data, val_mask, weights, model, info)


@dataclass
class TrainOutcome:
    """What a finished run hands back to k-fold, tuning and the CLI summary."""

    run_id: str
    best: dict[str, float]
    history: list[dict[str, float]]
    val_indices: np.ndarray
    val_probs: np.ndarray
    model_uri: str


def _no_weights_reason(cfg: TrainConfig) -> str:
    if cfg.class_weights != cfg.effective_class_weights:
        return "none (balanced_sampling=true already balances the classes)"
    return "none"


def log_near_duplicates(tracker: RunTracker, data: LabelledImages, side: np.ndarray) -> None:
    """The job's near-duplicate pairs (found once, before any split) and how many of them
    this run's split puts on two sides: metrics and data/near_duplicates.csv."""
    if data.duplicate_pairs is None:
        return
    tracker.log_metrics(leakage_metrics(data.duplicate_pairs, side))
    table = describe_pairs(data.duplicate_pairs, data.table, side)
    tracker.log_csv(table, "data/near_duplicates.csv")


def split_table(data: LabelledImages, val_mask: np.ndarray) -> pd.DataFrame:
    table = data.table[["path", "label", "group"]].copy()
    table["split"] = np.where(val_mask, "val", "train")
    return table


def model_metadata(plan: TrainingPlan) -> dict:
    """What inference needs to preprocess exactly as training did."""
    cfg = plan.cfg
    return {
        "model_name": cfg.model,
        "class_names": list(plan.data.class_names),
        "image_size": cfg.image_size,
        "crop_pct": plan.crop_pct,
        "mean": list(plan.model_info.mean),
        "std": list(plan.model_info.std),
        "face_crop": cfg.augment == "facecrop",
        "dropout": cfg.dropout,
    }


@dataclass
class FitInputs:
    """What `fit` takes besides the model and config, built from a plan (no side effects)."""

    train_loader: DataLoader
    val_loader: DataLoader
    loss_fn: nn.Module
    cache_source: CacheSource | None
    cache_note: str  # the run's stage1_feature_cache param: on, or off and why


def fit_inputs(plan: TrainingPlan) -> FitInputs:
    """Loaders over the plan's split (training augmentation, deterministic validation view),
    the loss with its class weights, and the stage-1 feature cache when allowed."""
    cfg, data = plan.cfg, plan.data
    mean, std = plan.model_info.mean, plan.model_info.std
    crop_pct = plan.crop_pct
    train_set = ImageArrayDataset(
        [data.images[i] for i in plan.train_indices],
        data.labels[plan.train_indices],
        train_transform(cfg.augment, cfg.image_size, mean, std, cfg.seed, crop_pct),
    )
    val_set = ImageArrayDataset(
        [data.images[i] for i in plan.val_indices],
        data.labels[plan.val_indices],
        eval_transform(cfg.image_size, mean, std, crop_pct),
    )
    train_loader = make_loader(
        train_set, cfg.batch_size, True, cfg.seed, cfg.num_workers, cfg.balanced_sampling
    )
    val_loader = make_loader(val_set, cfg.batch_size * 2, False, cfg.seed, cfg.num_workers)
    cache_source, cache_note = stage1_cache(plan, val_set.transform)
    loss_fn = create_loss(cfg.loss, plan.class_weights, cfg.label_smoothing, cfg.focal_gamma)
    return FitInputs(train_loader, val_loader, loss_fn, cache_source, cache_note)


def fit_plan(
    plan: TrainingPlan, inputs: FitInputs, device: torch.device, on_epoch=None, progress=True
) -> FitResult:
    """Every stage of the plan's config on its model and inputs (training.fit.fit)."""
    return fit(
        plan.model,
        inputs.train_loader,
        inputs.val_loader,
        inputs.loss_fn,
        plan.cfg,
        device,
        None,
        on_epoch,
        progress,
        inputs.cache_source,
    )


def stage1_cache(plan: TrainingPlan, plain_transform) -> tuple[CacheSource | None, str]:
    """Whether stage 1 trains on cached features, and the run's note saying so or why not."""
    cfg = plan.cfg
    if cfg.stage1_epochs == 0:
        return None, "off: no stage 1"
    refusal = cache_refusal(cfg.feature_cache, cfg.augment)
    if refusal:
        return None, f"off: {refusal}"
    plain = ImageArrayDataset(
        [plan.data.images[i] for i in plan.train_indices],
        plan.data.labels[plan.train_indices],
        plain_transform,
    )
    loader = make_loader(plain, cfg.batch_size * 2, False, cfg.seed, cfg.num_workers)
    mirrored = CACHEABLE_AUGMENTS[cfg.augment]
    views = "the image and its mirror" if mirrored else "the image"
    return CacheSource(loader, mirrored), f"on: features of {views}, computed once"


def execute(
    plan: TrainingPlan,
    tracker: RunTracker,
    on_epoch=None,
    progress: bool = True,
    figures: bool = True,
) -> TrainOutcome:
    """Fit the plan and log params, per-epoch metrics, artifacts, checkpoints and the model.
    `figures` (plots, error gallery, per-epoch confusion images) is off in tuning trials."""
    cfg, data = plan.cfg, plan.data
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    meta = model_metadata(plan)
    parts = backbone_parts(plan.model.backbone)
    stage2 = stages_from(cfg)[1]
    tracker.log_params(
        {
            **config_to_dict(cfg),
            "num_classes": len(data.class_names),
            "class_names": data.class_names,
            "class_weights_resolved": plan.class_weights or _no_weights_reason(cfg),
            "weights_source": plan.model_info.weights_source,
            "crop_pct": meta["crop_pct"],
            "train_images": int((~plan.val_mask).sum()),
            "val_images": int(plan.val_mask.sum()),
            "skipped_images": len(data.skipped),
            "data_digest": data.digest,
            "device_used": device.type,
            "backbone_blocks": len(parts.blocks),
            "stage2_unfrozen": ", ".join(parts.unfrozen_modules(stage2.unfreeze_blocks)) or "none",
            "torch_threads": torch.get_num_threads(),
        }
    )
    tracker.set_tags({"job": "train", "weights_source": plan.model_info.weights_source})
    tracker.log_text(config_to_yaml(cfg), "config.yaml")
    splits = split_table(data, plan.val_mask)
    tracker.log_csv(splits, "data/split.csv")
    tracker.log_dataset(splits, data.source, "images", "training", data.digest)
    tracker.log_metrics({"skipped_images": len(data.skipped)})
    log_near_duplicates(tracker, data, np.where(plan.val_mask, "val", "train"))
    if data.skipped:
        skipped = pd.DataFrame(data.skipped, columns=["path", "reason"])
        tracker.log_csv(skipped, "data/skipped_images.csv")

    inputs = fit_inputs(plan)
    tracker.log_params({"stage1_feature_cache": inputs.cache_note})

    def log_epoch(record: dict[str, float]) -> None:
        tracker.log_metrics(epoch_metrics(record, data.class_names), step=int(record["step"]))
        if on_epoch is not None:
            on_epoch(record)

    result = fit_plan(plan, inputs, device, log_epoch, progress)
    plan.model.load_state_dict(result.best_state)
    plan.model.to("cpu").eval()
    log_summary(tracker, plan, result)
    log_evaluation(tracker, plan, result, figures)
    log_checkpoints(tracker, plan, result, meta)
    name = tracker.run_name or "model"
    model_uri = log_model(
        tracker, plan, result, meta, input_example(inputs.val_loader.dataset), name
    )
    best = {k: v for k, v in result.best_epoch.items() if k.startswith("val_") and "/" not in k}
    return TrainOutcome(
        run_id=tracker.run_id,
        best=best,
        history=result.history,
        val_indices=plan.val_indices,
        val_probs=result.val_probs,
        model_uri=model_uri,
    )
