"""Run a list of transfer-learning stages with early stopping; return history and best weights."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.metrics import confusion_matrix
from timm.data import Mixup
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader

from training.bn_stats import SAMPLE_IMAGES, SHIFT_LIMIT, bn_statistics_shift, keeps_pretrained
from training.config import TrainConfig
from training.engine import mean_loss, predict_probs, train_one_epoch
from training.feature_cache import CachedFeatures, CacheSource
from training.metrics import (
    classification_metrics,
    expected_calibration_error,
    per_class_metrics,
)
from training.model import Classifier, backbone_parts, set_trainable
from training.transforms import to_tensor

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


class DivergedError(FloatingPointError):
    """The training loss became NaN or infinite."""


@dataclass(frozen=True)
class Stage:
    """One stage of transfer learning: what trains, how long, how fast."""

    name: str
    epochs: int
    lr: float
    unfreeze_blocks: int | None  # backbone blocks that train; 0 = head only, None = all


def resolve_bn_freeze(
    model: Classifier,
    cfg: TrainConfig,
    stages: list[Stage],
    train_loader: DataLoader,
    val_loader: DataLoader,
    device: torch.device,
) -> tuple[bool, float | None]:
    """`freeze_bn_stats` as applied, and the measured shift when it was `auto`: a seeded
    sample of the training images in the deterministic validation view, through the
    pretrained BatchNorm layers of what the last unfreezing stage trains."""
    if cfg.freeze_bn_stats != "auto":
        return cfg.freeze_bn_stats == "true", None
    if cfg.pretrained == "none":
        return False, None  # random initial statistics: nothing worth keeping
    unfreezing = [s for s in stages if s.epochs and s.unfreeze_blocks != 0]
    if not unfreezing:
        return False, None  # the backbone never trains: its statistics never move
    names = backbone_parts(model.backbone).unfrozen(unfreezing[-1].unfreeze_blocks)
    images = train_loader.dataset.images
    chosen = np.random.default_rng(cfg.seed).permutation(len(images))[:SAMPLE_IMAGES]
    view = val_loader.dataset.transform
    batch = torch.stack([to_tensor(view(image=images[i])["image"]) for i in chosen])
    shift = bn_statistics_shift(model.backbone, batch.to(device), names)
    frozen = keeps_pretrained(shift)
    log.info(
        "freeze_bn_stats=auto: BatchNorm statistics shift %s (limit %g): %s",
        "none to measure" if shift is None else f"{shift:.3f}",
        SHIFT_LIMIT,
        "pretrained statistics kept" if frozen else "statistics re-estimated",
    )
    return frozen, shift


def stages_from(cfg: TrainConfig) -> list[Stage]:
    """Seed 000's two stages: frozen backbone, then the last N blocks unfrozen (-1: all)."""
    unfreeze = None if cfg.unfreeze_blocks < 0 else cfg.unfreeze_blocks
    return [
        Stage("stage1", cfg.stage1_epochs, cfg.stage1_lr, 0),
        Stage("stage2", cfg.stage2_epochs, cfg.stage2_lr, unfreeze),
    ]


@dataclass
class FitResult:
    """Per-epoch history, the best weights (overall and per stage), the last weights, and
    the validation probabilities of the best weights."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_state: State | None = None
    best_epoch: dict[str, float] = field(default_factory=dict)
    stage_best: dict[str, tuple[State, dict[str, float]]] = field(default_factory=dict)
    final_state: State | None = None
    val_probs: np.ndarray | None = None
    val_targets: np.ndarray | None = None
    confusions: dict[int, np.ndarray] = field(default_factory=dict)  # step -> counts
    bn_stats_frozen: bool = False  # freeze_bn_stats as applied (auto resolved)
    bn_stat_shift: float | None = None  # measured for freeze_bn_stats=auto (training.bn_stats)


def _copy_state(model: nn.Module) -> State:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _improved(value: float, best: float | None, mode: str) -> bool:
    if best is None:
        return True
    return value > best if mode == "max" else value < best


def validation_record(probs: np.ndarray, targets: np.ndarray, loss: float) -> dict[str, float]:
    """One epoch's validation figures: loss, accuracy, macro scores, calibration error and
    every class's F1 / precision / recall (fields f1/<class index>, ...)."""
    record = classification_metrics(targets, probs)
    record["loss"] = loss
    record["ece"] = expected_calibration_error(targets, probs)
    indices = [str(i) for i in range(probs.shape[1])]
    for kind, scores in per_class_metrics(targets, probs, indices).items():
        record.update({f"{kind}/{index}": value for index, value in scores.items()})
    return record


def _check_finite(loss: float, name: str, stage: Stage, epoch: int) -> None:
    if not math.isfinite(loss):
        raise DivergedError(f"{stage.name} epoch {epoch + 1}: {name} loss {loss}")


def _scheduler(optimizer, cfg: TrainConfig, stage: Stage):
    """timm's scheduler of `cfg.scheduler`; warm-up only where the backbone trains (a head
    on frozen features has nothing to protect). None for `none`."""
    if cfg.scheduler == "none":
        return None
    warmup = cfg.warmup_epochs if stage.unfreeze_blocks != 0 else 0
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.scheduler,
        num_epochs=stage.epochs,
        patience_epochs=cfg.lr_patience,
        decay_rate=0.1,
        plateau_mode=cfg.monitor_mode,
        min_lr=1e-7,
        warmup_epochs=min(warmup, max(stage.epochs - 1, 0)),
        warmup_lr=stage.lr / 10,
        warmup_prefix=True,
    )
    return scheduler


def _optimizer(model: Classifier, cfg: TrainConfig, stage: Stage):
    """timm's optimizer; with `layer_decay` < 1 a stage that trains the backbone gets
    timm's layer-wise lr decay over the model's blocks (Classifier.group_matcher)."""
    layer_decay = cfg.layer_decay if stage.unfreeze_blocks != 0 and cfg.layer_decay < 1 else None
    return create_optimizer_v2(
        model,
        opt=cfg.optimizer,
        lr=stage.lr,
        weight_decay=cfg.weight_decay,
        layer_decay=layer_decay,
    )


def _mixer(cfg: TrainConfig, stage: Stage, num_classes: int) -> Mixup | None:
    """timm's Mixup/CutMix for stages that train backbone blocks (a head on frozen features
    learns from clean images); label smoothing stays the loss's job."""
    if not cfg.mixes or stage.unfreeze_blocks == 0:
        return None
    return Mixup(
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
        prob=cfg.mix_prob,
        label_smoothing=0.0,
        num_classes=num_classes,
    )


def _lr(optimizer) -> float:
    """The head's learning rate (the largest, with layer-wise decay)."""
    return max(group["lr"] for group in optimizer.param_groups)


@dataclass
class StageTools:
    """What one stage trains with besides the model: optimizer, scheduler, mixing, EMA and
    cached features (each None when off)."""

    optimizer: torch.optim.Optimizer
    scheduler: object | None
    mix: Mixup | None
    ema: ModelEmaV3 | None
    cache: CachedFeatures | None
    cache_loader: DataLoader | None  # batches of cached features, drawn like the images


def _stage_tools(
    model: Classifier,
    cfg: TrainConfig,
    stage: Stage,
    val_loader: DataLoader,
    device: torch.device,
    cache_source: CacheSource | None,
) -> StageTools:
    optimizer = _optimizer(model, cfg, stage)
    scheduler = _scheduler(optimizer, cfg, stage)
    if scheduler is None:  # timm's schedulers apply the layer-wise scales; without one, here
        for group in optimizer.param_groups:
            group["lr"] = stage.lr * group.get("lr_scale", 1.0)
    num_classes = model.head[-1].out_features
    trains_backbone = stage.unfreeze_blocks != 0
    ema = None
    if cfg.ema_decay > 0 and trains_backbone:
        ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True)
    cache = cache_loader = None
    if cache_source is not None and not trains_backbone:
        cache = CachedFeatures(
            model.backbone, cache_source.plain_train, val_loader, cache_source.mirrored, device
        )
        log.info("%s: head trains on cached features (%.1f s)", stage.name, cache.seconds)
        cache_loader = cache.loader(cfg.batch_size, cfg.seed, cfg.balanced_sampling)
    mix = _mixer(cfg, stage, num_classes)
    return StageTools(optimizer, scheduler, mix, ema, cache, cache_loader)


def _validate(model, val_loader, loss_fn, tools: StageTools, device, progress):
    """Validation probabilities of the weights this epoch would keep (the EMA's when on)."""
    if tools.cache is not None:
        probs, targets = tools.cache.val_probs(model.head, device)
    else:
        judged = tools.ema.module if tools.ema is not None else model
        probs, targets = predict_probs(judged, val_loader, device, "validate", progress)
    return probs, targets, mean_loss(probs, targets, loss_fn)


def _weights(model: Classifier, tools: StageTools) -> State:
    return _copy_state(tools.ema.module if tools.ema is not None else model)


def fit(
    model: Classifier,
    train_loader: DataLoader,
    val_loader: DataLoader,
    loss_fn: nn.Module,
    cfg: TrainConfig,
    device: torch.device,
    stages: list[Stage] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    progress: bool = True,
    cache_source: CacheSource | None = None,
) -> FitResult:
    """Train stage after stage; each stage starts from the weights the one before kept.

    `on_epoch` sees every epoch record (tracking, Optuna pruning); it may raise to stop.
    `cache_source` (training.feature_cache) lets stages with a frozen backbone train the
    head on features computed once.
    """
    stages = stages if stages is not None else stages_from(cfg)
    mode = cfg.monitor_mode
    result = FitResult()
    model.to(device).to(memory_format=torch.channels_last)
    loss_fn.to(device)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    freeze_bn_stats, result.bn_stat_shift = resolve_bn_freeze(
        model, cfg, stages, train_loader, val_loader, device
    )
    result.bn_stats_frozen = freeze_bn_stats
    for stage_number, stage in enumerate(stages, start=1):
        if stage.epochs == 0:
            continue
        # Epoch e of a stage is always step (epochs planned before it) + e, however early the
        # stages before it stopped: trials and folds compare like with like at every step.
        first_step = sum(earlier.epochs for earlier in stages[: stage_number - 1])
        trainable = set_trainable(model, stage.unfreeze_blocks)
        log.info("%s: %d trainable parameters, lr %g", stage.name, trainable, stage.lr)
        tools = _stage_tools(model, cfg, stage, val_loader, device, cache_source)
        best_value, stale = None, 0
        for epoch in range(stage.epochs):
            label = f"{stage.name} epoch {epoch + 1}/{stage.epochs}"
            try:
                if tools.cache is not None:
                    train = train_one_epoch(
                        model,
                        tools.cache_loader,
                        loss_fn,
                        tools.optimizer,
                        device,
                        scaler,
                        label,
                        False,
                        on_features=True,
                    )
                else:
                    train = train_one_epoch(
                        model,
                        train_loader,
                        loss_fn,
                        tools.optimizer,
                        device,
                        scaler,
                        label,
                        progress,
                        tools.mix,
                        tools.ema,
                        freeze_bn_stats=freeze_bn_stats,
                    )
            except RuntimeError as err:  # e.g. Adam's overflow with an absurd learning rate
                if "overflow" not in str(err):
                    raise
                raise DivergedError(f"{stage.name} epoch {epoch + 1}: {err}") from err
            if epoch == 0 and tools.cache is not None:  # the feature pass is stage 1's cost
                train["seconds"] += tools.cache.seconds
            _check_finite(train["loss"], "training", stage, epoch)
            probs, targets, val_loss = _validate(
                model, val_loader, loss_fn, tools, device, progress
            )
            _check_finite(val_loss, "validation", stage, epoch)  # whatever `monitor` is
            val = validation_record(probs, targets, val_loss)
            record = {
                "stage": stage_number,
                "epoch": epoch + 1,
                "step": first_step + epoch,
                "lr": _lr(tools.optimizer),
                "train_loss": train["loss"],
                "train_accuracy": train["accuracy"],
                "epoch_seconds": train["seconds"],
                "images_per_s": train["images_per_s"],
                **{f"val_{k}": v for k, v in val.items()},
            }
            result.history.append(record)
            result.confusions[record["step"]] = confusion_matrix(
                targets, probs.argmax(axis=1), labels=np.arange(probs.shape[1])
            )
            value = record[cfg.monitor]
            improved = _improved(value, best_value, mode)
            if improved:
                best_value, stale = value, 0
            else:
                stale += 1
            if improved or cfg.keep == "last":
                result.stage_best[stage.name] = (_weights(model, tools), dict(record))
                overall = result.best_epoch.get(cfg.monitor)
                if cfg.keep == "last" or _improved(value, overall, mode):
                    result.best_state = result.stage_best[stage.name][0]
                    result.best_epoch = dict(record)
                    result.val_probs, result.val_targets = probs, targets
            if on_epoch is not None:
                on_epoch(record)
            if tools.scheduler is not None:
                tools.scheduler.step(epoch + 1, value)
            if stale >= cfg.patience:
                log.info(
                    "%s: early stop after epoch %d (no better %s for %d epochs)",
                    stage.name,
                    epoch + 1,
                    cfg.monitor,
                    stale,
                )
                break
        result.final_state = _weights(model, tools)
        # The next stage builds on the weights this stage kept, not its last ones.
        model.load_state_dict(result.stage_best[stage.name][0])
    return result
