"""Run a list of transfer-learning stages with early stopping; return history and best weights."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.metrics import confusion_matrix
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn
from torch.utils.data import DataLoader

from training.config import TrainConfig
from training.engine import mean_loss, predict_probs, train_one_epoch
from training.metrics import (
    classification_metrics,
    expected_calibration_error,
    per_class_metrics,
)
from training.model import Classifier, set_trainable

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


def _scheduler(optimizer, cfg: TrainConfig, epochs: int):
    if cfg.scheduler == "none":
        return None
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=cfg.scheduler,
        num_epochs=epochs,
        patience_epochs=cfg.lr_patience,
        decay_rate=0.1,
        plateau_mode=cfg.monitor_mode,
        min_lr=1e-7,
    )
    return scheduler


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
) -> FitResult:
    """Train stage after stage; each stage starts from the best weights of the one before.

    `on_epoch` sees every epoch record (tracking, Optuna pruning); it may raise to stop.
    """
    stages = stages if stages is not None else stages_from(cfg)
    mode = cfg.monitor_mode
    result = FitResult()
    model.to(device).to(memory_format=torch.channels_last)
    loss_fn.to(device)
    scaler = torch.amp.GradScaler("cuda") if device.type == "cuda" else None
    for stage_number, stage in enumerate(stages, start=1):
        if stage.epochs == 0:
            continue
        # Epoch e of a stage is always step (epochs planned before it) + e, however early the
        # stages before it stopped: trials and folds compare like with like at every step.
        first_step = sum(earlier.epochs for earlier in stages[: stage_number - 1])
        trainable = set_trainable(model, stage.unfreeze_blocks)
        log.info("%s: %d trainable parameters, lr %g", stage.name, trainable, stage.lr)
        optimizer = create_optimizer_v2(
            model, opt=cfg.optimizer, lr=stage.lr, weight_decay=cfg.weight_decay
        )
        scheduler = _scheduler(optimizer, cfg, stage.epochs)
        best_value, stale = None, 0
        for epoch in range(stage.epochs):
            try:
                train = train_one_epoch(
                    model,
                    train_loader,
                    loss_fn,
                    optimizer,
                    device,
                    scaler,
                    description=f"{stage.name} epoch {epoch + 1}/{stage.epochs}",
                    progress=progress,
                )
            except RuntimeError as err:  # e.g. Adam's overflow with an absurd learning rate
                if "overflow" not in str(err):
                    raise
                raise DivergedError(f"{stage.name} epoch {epoch + 1}: {err}") from err
            _check_finite(train["loss"], "training", stage, epoch)
            probs, targets = predict_probs(model, val_loader, device, "validate", progress)
            val_loss = mean_loss(probs, targets, loss_fn)
            _check_finite(val_loss, "validation", stage, epoch)  # whatever `monitor` is
            val = validation_record(probs, targets, val_loss)
            record = {
                "stage": stage_number,
                "epoch": epoch + 1,
                "step": first_step + epoch,
                "lr": optimizer.param_groups[0]["lr"],
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
                result.stage_best[stage.name] = (_copy_state(model), dict(record))
                overall = result.best_epoch.get(cfg.monitor)
                if cfg.keep == "last" or _improved(value, overall, mode):
                    result.best_state = result.stage_best[stage.name][0]
                    result.best_epoch = dict(record)
                    result.val_probs, result.val_targets = probs, targets
            if on_epoch is not None:
                on_epoch(record)
            if scheduler is not None:
                scheduler.step(epoch + 1, value)
            if stale >= cfg.patience:
                log.info(
                    "%s: early stop after epoch %d (no better %s for %d epochs)",
                    stage.name,
                    epoch + 1,
                    cfg.monitor,
                    stale,
                )
                break
        result.final_state = _copy_state(model)
        # The next stage builds on this stage's best weights, not its last ones.
        model.load_state_dict(result.stage_best[stage.name][0])
    return result
