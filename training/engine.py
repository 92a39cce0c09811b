"""One training epoch and one prediction pass; both return plain numbers and arrays."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from tqdm.auto import tqdm

from training.model import Classifier, backbone_is_frozen, train_mode
from training.transforms import to_tensor


class ImageArrayDataset(Dataset):
    """Decoded uint8 images + labels; the transform makes each float tensor on demand."""

    def __init__(
        self, images: Sequence[np.ndarray], labels: Sequence[int], transform: Callable
    ) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.transform(image=self.images[index])["image"]
        return to_tensor(image), int(self.labels[index])


def make_loader(
    dataset: ImageArrayDataset,
    batch_size: int,
    train: bool,
    seed: int,
    num_workers: int = 0,
    balanced: bool = False,
) -> DataLoader:
    """Seeded loader; `balanced` draws each class equally often (with replacement)."""
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if train and balanced:
        labels = np.asarray(dataset.labels)
        per_class = np.bincount(labels)
        weights = 1.0 / per_class[labels]
        sampler = WeightedRandomSampler(weights, len(labels), replacement=True, generator=generator)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        drop_last=train and len(dataset) > batch_size,  # BatchNorm fails on a batch of 1
        num_workers=num_workers,
        generator=generator,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )


def pick_device(requested: str = "auto") -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def _forward(model: Classifier, images: torch.Tensor, frozen_backbone: bool) -> torch.Tensor:
    if frozen_backbone:
        # A frozen backbone needs no graph: run it like inference, train only the head.
        with torch.no_grad():
            features = model.backbone(images)
        return model.head(features)
    return model(images)


def train_one_epoch(
    model: Classifier,
    loader: DataLoader,
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
    description: str = "train",
    progress: bool = True,
    mix: Callable | None = None,
    ema: nn.Module | None = None,
    on_features: bool = False,
    freeze_bn_stats: bool = False,
) -> dict[str, float]:
    """Train for one pass over `loader`; return mean loss, accuracy, seconds and images/s.

    `mix` (timm's Mixup) mixes each even-sized batch and makes soft targets; `ema` (timm's
    ModelEmaV3) is updated after every step; `on_features` means the loader yields cached
    backbone features (training.feature_cache) and only the head runs; `freeze_bn_stats`:
    see training.model.train_mode."""
    train_mode(model, freeze_bn_stats)
    frozen = backbone_is_frozen(model)
    amp = device.type == "cuda"
    total_loss, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    bar = tqdm(loader, desc=description, leave=False, disable=not progress)
    for inputs, labels in bar:
        inputs = inputs.to(device, non_blocking=True)
        if not on_features:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        targets = labels
        if mix is not None and len(labels) % 2 == 0:  # timm mixes a batch with its reverse
            inputs, targets = mix(inputs, labels)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, enabled=amp):
            logits = model.head(inputs) if on_features else _forward(model, inputs, frozen)
            loss = loss_fn(logits, targets)
        if scaler is not None and amp:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if ema is not None:
            ema.updates = getattr(ema, "updates", 0) + 1
            ema.update(model, step=ema.updates)
        batch = labels.size(0)
        total_loss += loss.item() * batch
        correct += (logits.argmax(dim=1) == labels).sum().item()
        seen += batch
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{correct / seen:.3f}")
    seconds = time.perf_counter() - start
    return {
        "loss": total_loss / max(seen, 1),
        "accuracy": correct / max(seen, 1),
        "seconds": seconds,
        "images_per_s": seen / max(seconds, 1e-9),
    }


@torch.no_grad()
def predict_probs(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    description: str = "predict",
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and targets for every item of `loader`, in order."""
    model.eval()
    amp = device.type == "cuda"
    probs, targets = [], []
    for images, batch_targets in tqdm(loader, desc=description, leave=False, disable=not progress):
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.type, enabled=amp):
            logits = model(images)
        probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
        targets.append(np.asarray(batch_targets))
    return np.concatenate(probs), np.concatenate(targets)


def mean_loss(probs: np.ndarray, targets: np.ndarray, loss_fn: nn.Module) -> float:
    """The training loss evaluated on predicted probabilities (log turns them back into
    logits up to a constant, which softmax-based losses ignore)."""
    logits = torch.from_numpy(np.log(np.clip(probs, 1e-12, 1.0)))
    cpu_loss = copy.deepcopy(loss_fn).cpu()  # leave the training loss on its device
    return float(cpu_loss(logits, torch.from_numpy(targets).long()).item())
