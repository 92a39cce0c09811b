"""Whether pretrained BatchNorm statistics fit the training images (freeze_bn_stats=auto)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

# The auto rule keeps the pretrained statistics when the mean |log(variance ratio)| over the
# BatchNorm layers stage 2 trains is below this. Measured with EfficientNet-Lite0 and its
# ImageNet weights, 128 training images: ants-vs-bees photos 0.26 at 224 px and 128 px, 0.41 at
# 64 px; the demo's 8x8 digits 1.26 at 32 px and 1.10 at 224 px. Frozen statistics ruined the
# digits (holdout macro F1 0.964 -> 0.752); on the photos they were no better than re-estimated
# ones by the 5-fold honest estimate (bench/real_notes.md), so auto is an option, not the default.
SHIFT_LIMIT = 0.7
SAMPLE_IMAGES = 128


def bn_statistics_shift(
    model: nn.Module, batch: torch.Tensor, parameters: list[str]
) -> float | None:
    """Mean over the BatchNorm layers owning any of `parameters` (names within `model`) of
    the channel-mean |log(variance of their input on `batch` / running variance)|; None when
    no such layer exists (e.g. a ViT's LayerNorms, or nothing trains)."""
    owners = {name.rsplit(".", 1)[0] for name in parameters}
    layers = [
        module
        for name, module in model.named_modules()
        if name in owners and isinstance(module, nn.modules.batchnorm._BatchNorm)
    ]
    if not layers:
        return None
    shifts: list[float] = []

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], _output) -> None:
        channels = inputs[0].detach().transpose(0, 1).flatten(1)
        ratio = (channels.var(dim=1) + module.eps) / (module.running_var + module.eps)
        shifts.append(float(ratio.log().abs().mean()))

    hooks = [layer.register_forward_hook(record) for layer in layers]
    modes = {module: module.training for module in model.modules()}  # may differ per module
    try:
        model.eval()  # the running statistics are read, never updated
        with torch.no_grad():
            model(batch)
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes.items():
            module.training = training
    return float(np.mean(shifts))


def keeps_pretrained(shift: float | None) -> bool:
    """The auto rule: keep the statistics when the measured shift is below SHIFT_LIMIT (no
    BatchNorm to measure: nothing to keep)."""
    return shift is not None and shift < SHIFT_LIMIT
