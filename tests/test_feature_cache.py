"""Stage-1 feature caching: the same head update as the image path, and when it is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import plain_datasets

from training.config import TrainConfig
from training.engine import ImageArrayDataset, make_loader
from training.feature_cache import CacheSource, backbone_features, cache_refusal
from training.fit import Stage, fit
from training.losses import create_loss
from training.model import create_classifier

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def plain_sets(digits_dir):
    """Training and validation images, resized and normalised, no augmentation."""
    return plain_datasets(digits_dir)


def _stage1(plain_sets, cached: bool, epochs: int = 2):
    train_set, val_set = plain_sets
    torch.manual_seed(0)
    model, _ = create_classifier("test_efficientnet", 4, 0.3, "none")  # dropout in the head
    cfg = TrainConfig(
        model="test_efficientnet", pretrained="none", scheduler="none", seed=3, batch_size=8
    )
    loss = create_loss("cross_entropy", [1.0, 2.0, 1.0, 1.0], 0.0, 0.0)
    train_loader = make_loader(train_set, cfg.batch_size, True, cfg.seed)
    val_loader = make_loader(val_set, 16, False, cfg.seed)
    source = CacheSource(make_loader(train_set, 16, False, cfg.seed), False) if cached else None
    torch.manual_seed(1)  # the head's dropout masks
    stages = [Stage("stage1", epochs, 1e-2, 0)]
    result = fit(model, train_loader, val_loader, loss, cfg, CPU, stages, None, False, source)
    return model, result


def test_cached_features_give_the_same_head_update_as_the_images(plain_sets):
    """Same batch order, same dropout masks, no augmentation: the head trained on cached
    features ends where the head trained on images does, and so do the epoch records."""
    model_images, images = _stage1(plain_sets, cached=False)
    model_cached, cached = _stage1(plain_sets, cached=True)
    for name, tensor in model_images.head.state_dict().items():
        assert torch.allclose(model_cached.head.state_dict()[name], tensor, atol=1e-5), name
    assert not torch.allclose(  # the head did move: the check above can fail
        model_images.head[1].weight,
        create_classifier("test_efficientnet", 4, 0.3, "none")[0].head[1].weight,
    )
    for a, b in zip(images.history, cached.history, strict=True):
        for key in ("train_loss", "train_accuracy", "val_loss", "val_f1_macro"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key
    assert np.allclose(images.val_probs, cached.val_probs, atol=1e-5)
    for name, tensor in model_images.backbone.state_dict().items():  # frozen, stats too
        assert torch.equal(model_cached.backbone.state_dict()[name], tensor), name


def test_the_mirrored_view_is_the_features_of_the_flipped_images(plain_sets):
    train_set, _ = plain_sets
    model, _ = create_classifier("test_efficientnet", 4, 0.0, "none")
    loader = make_loader(train_set, 16, False, 0)
    mirrored, _ = backbone_features(model.backbone, loader, CPU, mirrored=True)
    flipped = ImageArrayDataset(
        [image[:, ::-1] for image in train_set.images], train_set.labels, train_set.transform
    )
    expected, _ = backbone_features(model.backbone, make_loader(flipped, 16, False, 0), CPU)
    assert torch.allclose(mirrored, expected, atol=1e-4)


@pytest.mark.parametrize(
    ("feature_cache", "augment", "reason"),
    [
        (True, "flip", ""),
        (True, "none", ""),
        (True, "base", "augment=base changes pixels beyond a flip"),
        (True, "trivial", "augment=trivial changes pixels beyond a flip"),
        (False, "flip", "feature_cache=false"),
    ],
)
def test_caching_is_refused_when_the_augmentation_changes_pixels(feature_cache, augment, reason):
    refusal = cache_refusal(feature_cache, augment)
    assert refusal.startswith(reason) and bool(refusal) == bool(reason)
