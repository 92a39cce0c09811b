"""Stage-1 feature caching: a frozen backbone's pooled features, computed once per view.

While the backbone is frozen (in eval mode, so its output depends on the pixels alone) every
epoch of stage 1 recomputes the same features. When the augmentation changes nothing but a
horizontal flip, the features of both views of every training image, and of every
validation image, are computed once and the head trains on them: stage 1 then costs about
one forward pass instead of `stage1_epochs` of them. Each epoch draws one view per image
(the mirrored one with probability 0.5), as the flip augmentation would.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

CACHEABLE_AUGMENTS = {"none": False, "flip": True}  # policy -> mirrored view cached too


def cache_refusal(feature_cache: bool, augment: str) -> str:
    """Why stage 1 cannot train on cached features ('' when it can)."""
    if not feature_cache:
        return "feature_cache=false"
    if augment not in CACHEABLE_AUGMENTS:
        return (
            f"augment={augment} changes pixels beyond a flip (colour or geometric jitter), "
            "so the features differ every epoch"
        )
    return ""


class FeatureDataset(Dataset):
    """Cached features of each training image, one view drawn per access."""

    def __init__(self, views: list[torch.Tensor], labels: np.ndarray, seed: int) -> None:
        self.views = views
        self.labels = labels
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        view = 0
        if len(self.views) > 1:
            view = int(torch.randint(len(self.views), (1,), generator=self.generator))
        return self.views[view][index], int(self.labels[index])


@torch.no_grad()
def backbone_features(
    backbone: nn.Module, loader: DataLoader, device: torch.device, mirrored: bool = False
) -> tuple[torch.Tensor, np.ndarray]:
    """Pooled features (and targets) of every item of `loader`, in order; `mirrored` flips
    each image horizontally first."""
    backbone.eval()
    features, targets = [], []
    amp = device.type == "cuda"
    for images, batch_targets in loader:
        images = images.to(device).contiguous(memory_format=torch.channels_last)
        if mirrored:
            images = torch.flip(images, dims=(3,))
        with torch.autocast(device_type=device.type, enabled=amp):
            features.append(backbone(images).float().cpu())
        targets.append(np.asarray(batch_targets))
    return torch.cat(features), np.concatenate(targets)


class CachedFeatures:
    """Training views and validation features of a frozen backbone, and the head's epochs
    and predictions on them."""

    def __init__(
        self,
        backbone: nn.Module,
        plain_train: DataLoader,
        val_loader: DataLoader,
        mirrored: bool,
        device: torch.device,
    ) -> None:
        start = time.perf_counter()
        plain, self.train_targets = backbone_features(backbone, plain_train, device)
        self.train_views = [plain]
        if mirrored:
            self.train_views.append(backbone_features(backbone, plain_train, device, True)[0])
        self.val_features, self.val_targets = backbone_features(backbone, val_loader, device)
        self.seconds = time.perf_counter() - start

    def describe(self) -> str:
        count, width = self.train_views[0].shape
        return (
            f"on: {len(self.train_views)} view(s) of {count} training and "
            f"{len(self.val_targets)} validation images, {width} features each"
        )

    def loader(self, batch_size: int, seed: int, balanced: bool) -> DataLoader:
        """Batches as the image loader would draw them (same sampler settings)."""
        from training.engine import make_loader  # engine imports this module

        dataset = FeatureDataset(self.train_views, self.train_targets, seed)
        return make_loader(dataset, batch_size, True, seed, 0, balanced)

    @torch.no_grad()
    def val_probs(self, head: nn.Module, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
        head.eval()
        logits = head(self.val_features.to(device)).float()
        return torch.softmax(logits, dim=1).cpu().numpy(), self.val_targets


@dataclass(frozen=True)
class CacheSource:
    """What caching needs: the training images resized and normalised with no augmentation
    (in dataset order), and whether their mirrored view is cached too."""

    plain_train: DataLoader
    mirrored: bool
