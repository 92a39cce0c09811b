"""freeze_bn_stats=auto: the BatchNorm statistics shift it measures, and the rule it applies."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import TINY
from torch import nn

from training.bn_stats import SHIFT_LIMIT, bn_statistics_shift, keeps_pretrained
from training.config import ConfigError, TrainConfig, resolve_config
from training.engine import ImageArrayDataset, make_loader
from training.fit import Stage, resolve_bn_freeze
from training.job_data import load_job_data
from training.model import backbone_parts, create_classifier
from training.transforms import eval_transform, train_transform


@pytest.fixture(scope="module")
def loaders_like(digits_dir):
    """An untrained tiny model and loaders over the real digits (validation view: plain)."""
    cfg = TrainConfig(**{**TINY, "data": str(digits_dir), "near_duplicates": "off"})
    data = load_job_data(cfg)
    model, info = create_classifier(cfg.model, len(data.class_names), 0.0, "none")
    augmented = train_transform("flip", cfg.image_size, info.mean, info.std)
    train = ImageArrayDataset(data.images, data.labels, augmented)
    plain = eval_transform(cfg.image_size, info.mean, info.std)
    val = ImageArrayDataset(data.images[:8], data.labels[:8], plain)
    return model, make_loader(train, 8, True, 0), make_loader(val, 8, False, 0)


def _batch() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(32, 3, 32, 32) * 2 - 1


def _fitted_statistics(batch: torch.Tensor):
    """A tiny backbone whose running statistics are those of `batch` (one train-mode pass
    with a cumulative average): the images fit them exactly."""
    torch.manual_seed(0)
    model, _ = create_classifier("test_efficientnet", 3, 0.0, "none")
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(batch)
    return model


def test_images_that_fit_the_statistics_shift_little_and_others_a_lot():
    batch = _batch()
    model = _fitted_statistics(batch)
    names = backbone_parts(model.backbone).unfrozen(2)
    fitting = bn_statistics_shift(model.backbone, batch, names)
    assert fitting is not None and fitting < 0.05
    far = bn_statistics_shift(model.backbone, batch * 6, names)  # other contrast, far off
    assert far > SHIFT_LIMIT
    model.train()
    model.backbone.blocks[0].eval()  # e.g. a frozen block, as training.model.train_mode sets
    bn_statistics_shift(model.backbone, batch, names)
    # The measure leaves every module's mode as it found it.
    assert model.backbone.training and model.backbone.blocks[-1].training
    assert not any(m.training for m in model.backbone.blocks[0].modules())


def test_nothing_to_measure_without_batchnorm_among_the_trained_parts():
    model = _fitted_statistics(_batch())
    assert bn_statistics_shift(model.backbone, _batch(), []) is None
    assert keeps_pretrained(None) is False


def test_the_auto_rule_follows_the_limit():
    assert keeps_pretrained(SHIFT_LIMIT / 2) is True
    assert keeps_pretrained(SHIFT_LIMIT * 2) is False


def test_auto_never_freezes_random_statistics_nor_a_backbone_that_does_not_train(loaders_like):
    model, train, val = loaders_like
    stages = [Stage("stage1", 1, 1e-3, 0), Stage("stage2", 1, 1e-3, 2)]
    cfg = TrainConfig(**{**TINY, "pretrained": "none", "freeze_bn_stats": "auto"})
    assert resolve_bn_freeze(model, cfg, stages, train, val, torch.device("cpu")) == (False, None)
    measured = dataclasses.replace(cfg, pretrained="hub")  # as if pretrained: measured
    frozen, shift = resolve_bn_freeze(model, measured, stages, train, val, torch.device("cpu"))
    assert shift is not None and frozen == (shift < SHIFT_LIMIT)
    for given, applied in (("true", True), ("false", False)):  # explicit settings win
        explicit = dataclasses.replace(measured, freeze_bn_stats=given)
        assert resolve_bn_freeze(model, explicit, stages, train, val, torch.device("cpu")) == (
            applied,
            None,
        )
    head_only = [Stage("stage1", 2, 1e-3, 0), Stage("stage2", 0, 1e-3, 2)]
    assert resolve_bn_freeze(model, measured, head_only, train, val, torch.device("cpu")) == (
        False,
        None,
    )


def test_the_setting_is_checked_and_yaml_booleans_are_accepted():
    assert resolve_config(TrainConfig, {"freeze_bn_stats": True}).freeze_bn_stats == "true"
    with pytest.raises(ConfigError, match="parameter 'freeze_bn_stats'"):
        TrainConfig(freeze_bn_stats="sometimes")
