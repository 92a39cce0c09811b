"""The fit loop: step numbering across stages, early stopping and the weights it keeps,
divergence, both schedulers, and which modules train in each stage."""

from __future__ import annotations

import pytest
import torch
from conftest import plain_datasets

from training.config import TrainConfig
from training.engine import make_loader
from training.fit import DivergedError, Stage, fit
from training.losses import create_loss
from training.model import create_classifier, set_trainable, train_mode

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def loaders(digits_dir):
    """Unaugmented loaders, so a learning rate of ~0 changes nothing from epoch to epoch."""
    train, val = plain_datasets(digits_dir)
    return make_loader(train, 8, True, 0), make_loader(val, 16, False, 0)


def _fit(loaders, stages, on_epoch=None, model_name="test_efficientnet", **cfg):
    torch.manual_seed(0)
    model, _ = create_classifier(model_name, 4, 0.0, "none")
    config = TrainConfig(model=model_name, pretrained="none", **cfg)
    loss = create_loss("cross_entropy", None, 0.0, 0.0)
    result = fit(model, *loaders, loss, config, CPU, stages, on_epoch, progress=False)
    return model, result


def test_stage2_epoch_e_is_step_stage1_epochs_plus_e_after_an_early_stop(loaders):
    # lr ~0: stage 1 cannot improve after its first epoch and stops after the second.
    stages = [Stage("stage1", 4, 1e-12, 0), Stage("stage2", 2, 1e-3, 2)]
    _, result = _fit(loaders, stages, patience=1, scheduler="none")
    steps = [(r["stage"], r["epoch"], r["step"]) for r in result.history]
    assert steps == [(1, 1, 0), (1, 2, 1), (2, 1, 4), (2, 2, 5)]


def test_early_stopping_keeps_the_best_epochs_weights(loaders):
    kept = {}

    def spoil_after_first_epoch(record):
        if record["epoch"] == 1:  # what epoch 1 left, then ruin it: later epochs are worse
            kept.update({k: v.clone() for k, v in model_ref[0].state_dict().items()})
            with torch.no_grad():
                model_ref[0].head[1].bias.copy_(torch.tensor([30.0, 0.0, 0.0, 0.0]))

    model_ref = []
    torch.manual_seed(0)
    model, _ = create_classifier("test_efficientnet", 4, 0.0, "none")
    model_ref.append(model)
    cfg = TrainConfig(model="test_efficientnet", pretrained="none", patience=2, monitor="val_loss")
    loss = create_loss("cross_entropy", None, 0.0, 0.0)
    stages = [Stage("stage1", 6, 1e-9, 0)]
    result = fit(model, *loaders, loss, cfg, CPU, stages, spoil_after_first_epoch, False)
    assert len(result.history) == 3  # epoch 1 best, two worse epochs, stopped (patience 2)
    assert result.best_epoch["epoch"] == 1
    losses = [r["val_loss"] for r in result.history]
    assert losses[0] < min(losses[1:])
    for name, tensor in kept.items():
        assert torch.equal(result.best_state[name], tensor), name
        assert torch.equal(model.state_dict()[name], tensor), name  # fit leaves the best
    assert not torch.equal(result.final_state["head.1.weight"], kept["head.1.weight"])


def test_a_nan_validation_loss_ends_the_stage_as_diverged(loaders):
    """Training in train mode uses batch statistics; negative running variances make only
    the evaluation NaN: a monitor of val_loss must not carry on with NaN."""
    torch.manual_seed(0)
    model, _ = create_classifier("test_resnet", 4, 0.0, "none")
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_var.fill_(-1e6)
    cfg = TrainConfig(
        model="test_resnet", pretrained="none", monitor="val_loss", freeze_bn_stats="false"
    )
    loss = create_loss("cross_entropy", None, 0.0, 0.0)
    with pytest.raises(DivergedError, match="all epoch 1: validation loss nan"):
        fit(model, *loaders, loss, cfg, CPU, [Stage("all", 3, 1e-3, None)], progress=False)


def test_plateau_lowers_the_lr_after_lr_patience_epochs_without_improvement(loaders):
    stages = [Stage("stage1", 5, 1e-6, 0)]
    _, result = _fit(loaders, stages, scheduler="plateau", lr_patience=1, patience=10)
    lrs = [r["lr"] for r in result.history]
    assert lrs[0] == pytest.approx(1e-6)
    assert lrs[-1] == pytest.approx(1e-7)  # lowered by 10x, to the floor
    assert lrs == sorted(lrs, reverse=True)


def test_cosine_lowers_the_lr_every_epoch(loaders):
    _, result = _fit(loaders, [Stage("stage1", 4, 1e-2, 0)], scheduler="cosine", patience=10)
    lrs = [r["lr"] for r in result.history]
    assert lrs[0] == pytest.approx(1e-2)
    assert all(later < earlier for earlier, later in zip(lrs, lrs[1:], strict=False))


@pytest.mark.parametrize("model_name", ["test_efficientnet", "test_vit"])
def test_only_fully_frozen_parts_are_in_eval_mode(model_name):
    model, _ = create_classifier(model_name, 3, 0.1, "none")
    set_trainable(model, 2)
    train_mode(model)
    blocks = list(model.backbone.blocks)
    trains = [any(p.requires_grad for p in block.parameters()) for block in blocks]
    assert any(trains) and not all(trains)
    for block, trainable in zip(blocks, trains, strict=True):
        assert all(m.training == trainable for m in block.modules()), block
    assert model.backbone.training  # a ViT's root owns frozen cls_token / pos_embed
    assert model.head.training


@pytest.mark.parametrize("freeze", ["true", "false"])
def test_freeze_bn_stats_keeps_pretrained_statistics_while_their_blocks_train(loaders, freeze):
    torch.manual_seed(0)
    model, _ = create_classifier("test_efficientnet", 4, 0.0, "none")
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    cfg = TrainConfig(model="test_efficientnet", pretrained="none", freeze_bn_stats=freeze)
    loss = create_loss("cross_entropy", None, 0.0, 0.0)
    fit(model, *loaders, loss, cfg, CPU, [Stage("stage2", 1, 1e-2, 2)], progress=False)
    after = model.backbone.state_dict()
    trained = "blocks.4.0.bn3"  # a BatchNorm of the last block, which trains
    assert not torch.equal(after[f"{trained}.weight"], before[f"{trained}.weight"])
    stats_kept = torch.equal(after[f"{trained}.running_mean"], before[f"{trained}.running_mean"])
    assert stats_kept == (freeze == "true")
