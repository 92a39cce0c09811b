"""Checkpoint files that carry their config and preprocessing, and the one-liner to reload."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch

from training.model import Classifier, load_tensors_only


def save_checkpoint(path: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """`meta` holds model name, class names, image size, mean/std, dropout and the config."""
    torch.save({"state_dict": state, **meta}, path)
    return path


def load_checkpoint(path: str | Path, device: str = "cpu") -> Classifier:
    """Rebuild the classifier from a checkpoint file, in eval mode:
    `model = training.checkpoints.load_checkpoint("best.pt")`."""
    saved = load_tensors_only(path, "checkpoint")
    backbone = timm.create_model(saved["model_name"], pretrained=False, num_classes=0)
    model = Classifier(backbone, len(saved["class_names"]), saved.get("dropout", 0.0))
    model.load_state_dict(saved["state_dict"])
    model.class_names = saved["class_names"]
    model.preprocessing = {k: saved[k] for k in ("image_size", "mean", "std", "face_crop")}
    model.preprocessing["crop_pct"] = saved.get("crop_pct", 0.0)  # older checkpoints squashed
    return model.to(device).eval()
