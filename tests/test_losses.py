"""Losses, class weights and class-balanced sampling, checked against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from training.config import ConfigError, TrainConfig
from training.engine import ImageArrayDataset, make_loader
from training.losses import FocalLoss, create_loss, resolve_class_weights

LOGITS = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 3.0], [1.0, 1.0, 1.0]])
TARGETS = torch.tensor([0, 1, 2])


def test_focal_loss_by_hand():
    p_true = F.softmax(LOGITS, dim=1)[torch.arange(3), TARGETS]
    expected = (-((1 - p_true) ** 2) * torch.log(p_true)).mean()
    assert FocalLoss(2.0)(LOGITS, TARGETS).item() == pytest.approx(expected.item(), rel=1e-6)
    weight = torch.tensor([1.0, 2.0, 0.5])
    weighted = (weight[TARGETS] * -((1 - p_true) ** 2) * torch.log(p_true)).sum() / weight.sum()
    assert create_loss("focal", [1.0, 2.0, 0.5], 0.1, 2.0)(LOGITS, TARGETS).item() == (
        pytest.approx(weighted.item(), rel=1e-6)
    )
    # gamma 0 is plain (weighted) cross-entropy
    assert FocalLoss(0.0, weight)(LOGITS, TARGETS).item() == pytest.approx(
        F.cross_entropy(LOGITS, TARGETS, weight=weight).item(), rel=1e-6
    )


def test_label_smoothing_by_hand_and_only_when_asked():
    log_p = F.log_softmax(LOGITS, dim=1)
    nll = -log_p[torch.arange(3), TARGETS]
    expected = ((1 - 0.2) * nll + 0.2 * -log_p.mean(dim=1)).mean()
    smoothed = create_loss("label_smoothing", None, 0.2, 2.0)(LOGITS, TARGETS)
    assert smoothed.item() == pytest.approx(expected.item(), rel=1e-6)
    plain = create_loss("cross_entropy", None, 0.2, 2.0)(LOGITS, TARGETS)
    assert plain.item() == pytest.approx(nll.mean().item(), rel=1e-6)


def test_class_weights_auto_explicit_none_and_strength():
    labels = np.array([0, 0, 0, 1])
    assert resolve_class_weights("auto", labels, 2) == pytest.approx([4 / 6, 2.0])
    assert resolve_class_weights("auto", labels, 2, 0.5) == pytest.approx([5 / 6, 1.5])
    assert resolve_class_weights("auto", labels, 2, 0.0) == pytest.approx([1.0, 1.0])
    assert resolve_class_weights("1,2", labels, 2, 0.5) == pytest.approx([1.0, 1.5])
    assert resolve_class_weights("none", labels, 2) is None
    with pytest.raises(ConfigError, match="3 weights given for 2 classes"):
        resolve_class_weights("1,2,3", labels, 2)


def test_balanced_sampling_draws_classes_equally():
    labels = np.array([0] * 90 + [1] * 10)
    dataset = ImageArrayDataset(
        [np.zeros((4, 4, 3), np.uint8)] * 100,
        labels,
        lambda image: {"image": image.astype(np.float32)},
    )

    def minority_share(balanced: bool) -> float:
        loader = make_loader(dataset, 20, True, seed=0, balanced=balanced)
        drawn = torch.cat([targets for _ in range(20) for _, targets in loader])
        return float((drawn == 1).float().mean())

    assert minority_share(True) == pytest.approx(0.5, abs=0.06)
    assert minority_share(False) == pytest.approx(0.1, abs=0.01)


def test_balanced_sampling_turns_off_auto_weights_not_explicit_ones():
    """Balanced batches plus inverse-frequency weights would correct the imbalance twice."""
    assert TrainConfig(balanced_sampling=True).effective_class_weights == "none"
    assert TrainConfig(balanced_sampling=False).effective_class_weights == "auto"
    explicit = TrainConfig(balanced_sampling=True, class_weights="1,2")
    assert explicit.effective_class_weights == "1,2"
