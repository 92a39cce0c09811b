"""Class weights and the loss functions: weighted cross-entropy, label smoothing, focal."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training.config import ConfigError, parse_class_weights


def resolve_class_weights(
    spec: str, labels: np.ndarray, num_classes: int, strength: float = 1.0
) -> list[float] | None:
    """'auto' = inverse frequency (mean 1), 'none' = None, or an explicit list of the right
    length; `strength` blends from uniform (0) to these weights (1)."""
    parsed = parse_class_weights(spec)
    if parsed == "none":
        return None
    if parsed == "auto":
        counts = np.bincount(labels, minlength=num_classes).astype(float)
        weights = len(labels) / (num_classes * np.maximum(counts, 1.0))
    else:
        if len(parsed) != num_classes:
            raise ConfigError(
                f"parameter 'class_weights': {len(parsed)} weights given for "
                f"{num_classes} classes ({spec!r})"
            )
        weights = np.asarray(parsed, dtype=float)
    blended = (1.0 - strength) + strength * weights
    return [round(float(w), 6) for w in blended]


class FocalLoss(nn.Module):
    """Multi-class focal loss (Lin et al. 2017) with optional class weights.

    Written here because torchvision's focal loss is the sigmoid (multi-label) form."""

    def __init__(self, gamma: float, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.gamma = gamma
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_probs = F.log_softmax(logits.float(), dim=1)
        log_pt = log_probs.gather(1, target[:, None]).squeeze(1)
        loss = -((1.0 - log_pt.exp()) ** self.gamma) * log_pt
        if self.weight is not None:
            per_sample = self.weight[target]
            return (loss * per_sample).sum() / per_sample.sum()
        return loss.mean()


def create_loss(
    name: str, class_weights: list[float] | None, label_smoothing: float, focal_gamma: float
) -> nn.Module:
    weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
    if name == "focal":
        return FocalLoss(focal_gamma, weight)
    smoothing = label_smoothing if name == "label_smoothing" else 0.0
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=smoothing)
