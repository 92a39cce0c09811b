"""Grad-CAM for any timm classifier: the target layer chosen from the model, heatmaps, overlays,
and a deletion check of whether the heat marks what the prediction depends on."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import cv2
import numpy as np
import torch
from matplotlib.figure import Figure
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.metrics.road import NoisyLinearImputer
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from training.transforms import centre_square, eval_transform, to_tensor

log = logging.getLogger(__name__)

MIN_GRID = 4  # coarsest heatmap grid accepted before falling back to an earlier CNN stage
DELETION_FRACTION = 0.2  # share of pixels masked by the deletion check


@dataclass
class ExplainedModel:
    """A classifier (our Classifier or any timm model with a head) and its preprocessing."""

    model: nn.Module
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    weight: float = 1.0  # its share when several models (an ensemble) are explained together
    name: str = "model"
    crop_pct: float = 0.0  # the centre square it sees (training.transforms); 0 = whole image

    def batch(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """The eval view training used: centre square, resize to image_size, normalise, NCHW."""
        transform = eval_transform(self.image_size, self.mean, self.std, self.crop_pct)
        return torch.stack([to_tensor(transform(image=image)["image"]) for image in images])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration (dropout off, BatchNorm frozen), the caller's mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _chunks(items: Sequence, size: int) -> list[Sequence]:
    return [items[start : start + size] for start in range(0, len(items), size)]


@dataclass(frozen=True)
class TargetLayer:
    """Where Grad-CAM looks, and how that layer's output becomes an NCHW map."""

    module: nn.Module
    name: str
    layout: str  # NCHW (CNN stage) | NHWC (Swin-like stage) | tokens (ViT block)
    grid: tuple[int, int]  # the map's height and width at the model's input size
    prefix_tokens: int = 0  # class / distillation / register tokens dropped before reshaping

    def reshape(self, output: torch.Tensor) -> torch.Tensor:
        if self.layout == "NHWC":
            return output.permute(0, 3, 1, 2)
        if self.layout == "tokens":
            patches = output[:, self.prefix_tokens :, :]
            batch, _, channels = patches.shape
            return patches.reshape(batch, *self.grid, channels).permute(0, 3, 1, 2)
        return output


def backbone_of(model: nn.Module) -> nn.Module:
    """The timm network inside our Classifier (`.backbone` + `.head`), else the model itself."""
    backbone = getattr(model, "backbone", None)
    return backbone if isinstance(backbone, nn.Module) and hasattr(model, "head") else model


def _output_shapes(
    model: nn.Module, modules: dict[str, nn.Module], image_size: int
) -> dict[str, tuple[int, ...]]:
    """Output shape of each named module on one blank image (a dry run with forward hooks)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def record(name: str):
        def hook(_module, _inputs, output) -> None:  # returning a value would replace output
            shapes.setdefault(name, tuple(output.shape))

        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in modules.items()]
    try:
        with _eval_mode(model), torch.inference_mode():
            device = next(model.parameters()).device
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _feature_modules(backbone: nn.Module) -> dict[str, nn.Module]:
    """timm's own feature stages (feature_info), input side first; else every Conv2d."""
    named = dict(backbone.named_modules())
    stages = [info["module"] for info in getattr(backbone, "feature_info", None) or []]
    stages = [name for name in stages if name in named]
    if not stages:
        stages = [name for name, module in named.items() if isinstance(module, nn.Conv2d)]
    if not stages:
        raise ValueError(f"{type(backbone).__name__}: no feature stage or Conv2d to explain")
    return {name: named[name] for name in stages}


def _token_layer(backbone: nn.Module, block_name: str, shape: tuple[int, ...]) -> TargetLayer:
    """ViT / DeiT: the last block's first norm. With a class-token head, only attention in the
    last block carries the patches into the prediction, so its input is what Grad-CAM needs."""
    block = dict(backbone.named_modules())[block_name]
    norm_name, norm = next(
        ((n, m) for n, m in block.named_children() if n.startswith("norm")),
        ("", block),
    )
    prefix = int(getattr(backbone, "num_prefix_tokens", 0) or 0)
    side = math.isqrt(shape[1] - prefix)
    if side * side != shape[1] - prefix:
        raise ValueError(f"{block_name}: {shape[1] - prefix} patch tokens are not a square grid")
    name = f"{block_name}.{norm_name}" if norm_name else block_name
    return TargetLayer(norm, name, "tokens", (side, side), prefix)


def find_target_layer(model: nn.Module, image_size: int, min_grid: int = MIN_GRID) -> TargetLayer:
    """The layer Grad-CAM should use, chosen from the model at its input size.

    - vision transformers (token outputs): the last block's norm, tokens reshaped to the grid;
    - Swin-like (NHWC stages): the last stage, permuted to NCHW;
    - CNNs (NCHW stages): the deepest stage whose map is at least `min_grid` cells on a side
      (at 32 px the last stage of an EfficientNet is 1x1, which cannot show a place).
    """
    backbone = backbone_of(model)
    stages = _feature_modules(backbone)
    shapes = _output_shapes(model, stages, image_size)
    names = [name for name in stages if name in shapes]
    last = names[-1]
    if len(shapes[last]) == 3:
        return _token_layer(backbone, last, shapes[last])
    channels = {info["module"]: info["num_chs"] for info in getattr(backbone, "feature_info", [])}
    layouts = {
        name: "NHWC" if shapes[name][-1] == channels.get(name, -1) != shapes[name][1] else "NCHW"
        for name in names
        if len(shapes[name]) == 4
    }

    def grid(name: str) -> tuple[int, int]:
        shape = shapes[name]
        return (shape[1], shape[2]) if layouts[name] == "NHWC" else (shape[2], shape[3])

    usable = [name for name in layouts if min(grid(name)) >= min_grid]
    chosen = usable[-1] if usable else max(layouts, key=lambda name: min(grid(name)))
    return TargetLayer(stages[chosen], chosen, layouts[chosen], grid(chosen))


def predict_probs(
    members: Sequence[ExplainedModel], images: Sequence[np.ndarray], batch_size: int = 32
) -> np.ndarray:
    """(N, C) probabilities: the weighted mean of the members' softmax (one model: its own)."""
    total = sum(member.weight for member in members)
    mean = 0.0
    for member in members:
        with _eval_mode(member.model) as model, torch.inference_mode():
            probs = torch.cat(
                [
                    torch.softmax(model(member.batch(chunk).to(member.device)).float(), dim=1)
                    for chunk in _chunks(images, batch_size)
                ]
            )
        mean = mean + probs.cpu().numpy() * (member.weight / total)
    return np.asarray(mean)


def _gradcam(
    member: ExplainedModel, layer: TargetLayer, images: Sequence[np.ndarray], classes
) -> np.ndarray:
    """(N, S, S) Grad-CAM maps in [0, 1] at the model's input size (grad-cam package)."""
    with _eval_mode(member.model) as model:
        cam = GradCAM(model=model, target_layers=[layer.module], reshape_transform=layer.reshape)
        try:
            # The input requires grad so that a frozen model (no trainable weight before the
            # layer) still yields activation gradients; GradCAM does not expose this option.
            batch = member.batch(images).to(member.device).requires_grad_(True)
            targets = [ClassifierOutputTarget(int(c)) for c in classes]
            with torch.enable_grad():
                return cam(input_tensor=batch, targets=targets)
        finally:
            # Not `with GradCAM(...)`: its __exit__ swallows an IndexError and only prints it.
            cam.activations_and_grads.release()


def member_heatmaps(
    member: ExplainedModel,
    images: Sequence[np.ndarray],
    classes: Sequence[int],
    min_grid: int = MIN_GRID,
    batch_size: int = 16,
) -> tuple[list[np.ndarray], TargetLayer]:
    """One model's heatmap (float32 in [0, 1], same height x width as the image) per image."""
    layer = find_target_layer(member.model, member.image_size, min_grid)
    classes = np.asarray(classes, dtype=int)
    maps = np.concatenate(
        [
            _gradcam(member, layer, chunk, chunk_classes)
            for chunk, chunk_classes in zip(
                _chunks(images, batch_size), _chunks(classes, batch_size), strict=True
            )
        ]
    )
    heatmaps = [
        cv2.resize(heat, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
        for heat, image in zip(maps, images, strict=True)
    ]
    return [np.clip(heat, 0, 1).astype(np.float32) for heat in heatmaps], layer


@dataclass
class Explanation:
    """Heatmaps of `classes` for `images`, and the (ensemble's) probabilities."""

    heatmaps: list[np.ndarray]
    classes: np.ndarray
    probs: np.ndarray
    layers: dict[str, str] = field(default_factory=dict)  # model name -> target layer name


def explain(
    members: Sequence[ExplainedModel],
    images: Sequence[np.ndarray],
    classes: Sequence[int] | None = None,
    min_grid: int = MIN_GRID,
) -> Explanation:
    """Grad-CAM of `classes` (default: the predicted class). Several members (an ensemble) are
    each explained for the same class and their heatmaps averaged with the members' weights."""
    if not images:
        raise ValueError("no images to explain")
    probs = predict_probs(members, images)
    targets = probs.argmax(axis=1) if classes is None else np.asarray(classes, dtype=int)
    total = sum(member.weight for member in members)
    summed = [np.zeros(image.shape[:2], dtype=np.float32) for image in images]
    layers = {}
    for member in members:
        heatmaps, layer = member_heatmaps(member, images, targets, min_grid)
        layers[member.name] = layer.name
        for acc, heat in zip(summed, heatmaps, strict=True):
            acc += heat * (member.weight / total)
    return Explanation([_unit_range(heat) for heat in summed], targets, probs, layers)


def _unit_range(heat: np.ndarray) -> np.ndarray:
    low, high = float(heat.min()), float(heat.max())
    return ((heat - low) / (high - low) if high > low else np.zeros_like(heat)).astype(np.float32)


@dataclass
class DeletionCheck:
    """p(target) on each image, after masking its hottest pixels, and after masking as many
    random pixels; `lowered_more`: the heat mask cost p(target) more than the random one."""

    p_original: np.ndarray
    p_heat_masked: np.ndarray
    p_random_masked: np.ndarray
    fraction_masked: float

    @property
    def lowered_more(self) -> np.ndarray:
        return self.p_heat_masked < self.p_random_masked

    @property
    def fraction(self) -> float:
        """Share of images where masking the heat lowered p(target) more than random masking."""
        return float(self.lowered_more.mean()) if len(self.p_original) else 0.0


def _masked(image: np.ndarray, drop: np.ndarray, imputer: NoisyLinearImputer) -> np.ndarray:
    """The image with the `drop` pixels filled in from their neighbours (ROAD's noisy linear
    imputation): no flat patch whose shape alone could sway the model."""
    tensor = torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32) / 255.0)
    keep = torch.from_numpy((~drop).astype(np.float32))
    filled = imputer(tensor, keep).numpy().transpose(1, 2, 0)
    return np.clip(filled * 255.0 + 0.5, 0, 255).astype(np.uint8)


def deletion_check(
    members: Sequence[ExplainedModel],
    images: Sequence[np.ndarray],
    heatmaps: Sequence[np.ndarray],
    classes: Sequence[int],
    fraction: float = DELETION_FRACTION,
    seed: int = 0,
) -> DeletionCheck:
    """Mask the top `fraction` of each heatmap's pixels, and separately a random `fraction`
    (seeded), and compare p(class) of the (ensemble) model on the two."""
    rng = np.random.default_rng(seed)
    imputer = NoisyLinearImputer()
    hot, random = [], []
    with torch.random.fork_rng(devices=[]):  # the imputer's noise, seeded, global RNG untouched
        torch.manual_seed(seed)
        for image, heat in zip(images, heatmaps, strict=True):
            count = max(1, round(fraction * heat.size))
            # Exactly `count` pixels: ties (flat regions) broken at random, not by position.
            order = np.lexsort((rng.random(heat.size), -heat.ravel()))
            hot.append(_masked(image, _mask(heat.shape, order[:count]), imputer))
            random.append(
                _masked(image, _mask(heat.shape, rng.permutation(heat.size)[:count]), imputer)
            )
    rows = np.arange(len(images))
    targets = np.asarray(classes, dtype=int)
    return DeletionCheck(
        p_original=predict_probs(members, images)[rows, targets],
        p_heat_masked=predict_probs(members, hot)[rows, targets],
        p_random_masked=predict_probs(members, random)[rows, targets],
        fraction_masked=fraction,
    )


def _mask(shape: tuple[int, ...], flat_indices: np.ndarray) -> np.ndarray:
    mask = np.zeros(int(np.prod(shape)), dtype=bool)
    mask[flat_indices] = True
    return mask.reshape(shape)


def overlay(image: np.ndarray, heat: np.ndarray, min_side: int = 0) -> np.ndarray:
    """uint8 RGB: the heatmap (jet) over the image, enlarged to `min_side` for tiny images
    (pixels kept sharp, heat smooth)."""
    height, width = image.shape[:2]
    scale = max(1.0, min_side / min(height, width)) if min_side else 1.0
    size = (round(width * scale), round(height * scale))
    if scale > 1:
        image = cv2.resize(image, size, interpolation=cv2.INTER_NEAREST)
        heat = cv2.resize(heat, size, interpolation=cv2.INTER_LINEAR)
    return show_cam_on_image(image.astype(np.float32) / 255.0, heat, use_rgb=True)


def overlay_sheet(
    images: Sequence[np.ndarray],
    rows: Sequence[Sequence[tuple[np.ndarray, str]]],
    title: str,
    columns: int = 4,
) -> Figure:
    """A contact sheet: per image, the image and its overlays (heatmap, caption) side by side."""
    panels = [1 + len(row) for row in rows]
    per_row = max(1, columns) * max(panels)
    lines = math.ceil(sum(panels) / per_row) if panels else 1
    height = 2.3 * lines + 0.5  # inches, with half an inch for the title
    fig = Figure(figsize=(2.0 * per_row, height))
    axes = fig.subplots(lines, per_row, squeeze=False).ravel()
    slot = 0
    for image, overlays in zip(images, rows, strict=True):
        axes[slot].imshow(image, interpolation="nearest")
        axes[slot].set_title("image", fontsize=8)
        slot += 1
        for heat, caption in overlays:
            axes[slot].imshow(overlay(image, heat, min_side=128))
            axes[slot].set_title(caption, fontsize=8)
            slot += 1
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title)
    # Every axis is off: a fixed layout (title clear of row one, room for the captions) looks
    # as tight_layout's and costs a fraction of it, which each training run pays.
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.55 / height, hspace=0.25)
    return fig


def seen_views(
    members: Sequence[ExplainedModel], images: Sequence[np.ndarray]
) -> tuple[list[ExplainedModel], list[np.ndarray]]:
    """The images cut to the centre square the members see (the smallest when they differ),
    and the members set to take that square whole: heatmaps, overlays and deletion masks then
    cover exactly the pixels the prediction used."""
    crop_pct = min((member.crop_pct for member in members if member.crop_pct), default=0.0)
    if not crop_pct:
        return list(members), list(images)
    if any(member.crop_pct != crop_pct for member in members):
        log.warning("members see different parts of the images: explaining the smallest")
    return (
        [replace(member, crop_pct=0.0) for member in members],
        [np.ascontiguousarray(centre_square(image, crop_pct)) for image in images],
    )


def misclassified_figure(
    member: ExplainedModel,
    images: Sequence[np.ndarray],
    targets: Sequence[int],
    class_names: Sequence[str],
    max_images: int = 8,
    probs: np.ndarray | None = None,
) -> Figure | None:
    """For training runs: Grad-CAM of the predicted and the true class on the most confidently
    misclassified images (None when every image is right or max_images is 0)."""
    targets = np.asarray(targets, dtype=int)
    probs = predict_probs([member], images) if probs is None else probs
    (member,), images = seen_views([member], images)
    predicted = probs.argmax(axis=1)
    wrong = np.flatnonzero(predicted != targets)
    if max_images <= 0 or len(wrong) == 0:
        return None
    chosen = wrong[np.argsort(-probs[wrong, predicted[wrong]], kind="stable")][:max_images]
    picked = [images[i] for i in chosen]
    heat_pred, _ = member_heatmaps(member, picked, predicted[chosen])
    heat_true, _ = member_heatmaps(member, picked, targets[chosen])
    rows = [
        [
            (hp, f"pred {class_names[predicted[i]]} {probs[i, predicted[i]]:.2f}"),
            (ht, f"true {class_names[targets[i]]} {probs[i, targets[i]]:.2f}"),
        ]
        for i, hp, ht in zip(chosen, heat_pred, heat_true, strict=True)
    ]
    return overlay_sheet(picked, rows, f"misclassified: {len(chosen)} of {len(wrong)}", columns=2)
