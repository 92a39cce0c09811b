"""Frozen configs of the registry entry points (promote, predict, onnx_export, explain) and their
checks."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from registry.tta import MAX_VIEWS
from registry.voting import METHODS
from training.config import ConfigError

DIRECTIONS = ("auto", "max", "min")
FORMATS = ("csv", "submission")
EXPLAIN_TARGETS = ("predicted", "true", "both")
_ALIAS = re.compile(r"^[\w\-]{1,240}$")  # room for the members' -fold-<n>
_VERSION_ALIAS = re.compile(r"^[vV]\d+$")  # MLflow reserves these (and 'latest') for versions


def _require(ok: bool, name: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"parameter '{name}': {expected}, got {value!r}")


def _check_model_name(name: str, value: str) -> None:
    _require(
        bool(value.strip()) and not any(c in value for c in "/:"),
        name,
        value,
        "a registered model name without '/' or ':'",
    )


def _check_alias(value: str) -> None:
    _require(
        bool(_ALIAS.match(value)) and not _VERSION_ALIAS.match(value) and value != "latest",
        "alias",
        value,
        "letters, digits, '_' or '-' (not 'latest' or v<number>)",
    )


@dataclasses.dataclass(frozen=True)
class PromoteConfig:
    """Register the top-k fold models of a k-fold run and their ensemble; point an alias at it."""

    kfold_run_id: str = ""  # k-fold parent run; empty = latest FINISHED job=kfold run
    experiment_name: str = ""  # where to look for the k-fold run; '' = as for train
    top_k: int = 3  # fold models in the ensemble
    metric: str = "best_val_f1_macro"  # fold-run metric that ranks the folds
    direction: str = "auto"  # max | min | auto (min when the metric name contains 'loss')
    model_name: str = "image-classifier"  # registered ensemble; members: <model_name>-members
    alias: str = "champion"  # alias pointed at the ensemble version
    method: str = "arithmetic"  # default voting: arithmetic | geometric | weighted | hard
    tta: int = 2  # default test-time views: 1 identity, 2 + flip, more = + seeded crops
    run_name: str = ""
    config: str = ""  # YAML file of parameter values (explicit flags win)

    def __post_init__(self) -> None:
        _require(self.top_k >= 1, "top_k", self.top_k, "an integer >= 1")
        _require(bool(self.metric.strip()), "metric", self.metric, "a metric name")
        _require(self.direction in DIRECTIONS, "direction", self.direction, f"one of {DIRECTIONS}")
        _check_model_name("model_name", self.model_name)
        _check_alias(self.alias)
        _require(self.method in METHODS, "method", self.method, f"one of {METHODS}")
        _require(1 <= self.tta <= MAX_VIEWS, "tta", self.tta, f"an integer in 1..{MAX_VIEWS}")

    @property
    def members_model_name(self) -> str:
        return f"{self.model_name}-members"


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    """Ensemble predictions for a folder or CSV of images; metrics when labels are known."""

    model_uri: str = ""  # empty = models:/<model_name>@<alias>
    model_name: str = "image-classifier"
    alias: str = "champion"
    data: str = "data/demo/test"  # folder (flat or class sub-folders) or CSV of image paths
    output: str = "outputs/predictions.csv"
    format: str = "csv"  # csv (id, label, probabilities) | submission (seed 004: ImageID,ans)
    method: str = ""  # voting method; empty = the model's stored default
    tta: int = 0  # test-time views; 0 = the model's stored default
    batch_size: int = 32  # images per model call
    path_column: str = "path"  # CSV input: image path column
    label_column: str = "label"  # CSV input: true label column, if present
    calibrated: bool = True  # divide member logits by the ensemble's temperature (false: raw)
    compare: bool = True  # labelled data: members vs voting methods vs TTA table, with timing
    seed: int = 0  # bootstrap resamples and the timed sample of the comparison
    explain: int = 0  # then Grad-CAM of this many of the images, as an explain run; 0 = off
    experiment_name: str = ""  # where the labelled predict run is logged; '' = as for train
    run_name: str = ""
    config: str = ""  # YAML file of parameter values (explicit flags win)

    def __post_init__(self) -> None:
        if not self.model_uri:
            _check_model_name("model_name", self.model_name)
            _check_alias(self.alias)
        _require(bool(self.data), "data", self.data, "a folder or CSV path")
        _require(bool(self.output), "output", self.output, "a file path")
        _require(self.seed >= 0, "seed", self.seed, "an integer >= 0")
        _require(self.format in FORMATS, "format", self.format, f"one of {FORMATS}")
        _require(self.method in ("", *METHODS), "method", self.method, f"empty or one of {METHODS}")
        _require(0 <= self.tta <= MAX_VIEWS, "tta", self.tta, f"an integer in 0..{MAX_VIEWS}")
        _require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        _require(bool(self.path_column), "path_column", self.path_column, "a column name")
        _require(self.explain >= 0, "explain", self.explain, "an integer >= 0")

    @property
    def resolved_model_uri(self) -> str:
        return self.model_uri or f"models:/{self.model_name}@{self.alias}"


@dataclasses.dataclass(frozen=True)
class OnnxExportConfig:
    """Export an ensemble's members (or one PyTorch model) to ONNX with preprocessing JSON."""

    model_uri: str = ""  # empty = models:/<model_name>@<alias>
    model_name: str = "image-classifier"
    alias: str = "champion"
    output: str = "outputs/onnx"  # folder for <member>.onnx, <member>.json and ensemble.json
    opset: int = 18
    config: str = ""

    def __post_init__(self) -> None:
        if not self.model_uri:
            _check_model_name("model_name", self.model_name)
            _check_alias(self.alias)
        _require(bool(self.output), "output", self.output, "a folder path")
        _require(self.opset >= 17, "opset", self.opset, "an integer >= 17")

    @property
    def resolved_model_uri(self) -> str:
        return self.model_uri or f"models:/{self.model_name}@{self.alias}"


@dataclasses.dataclass(frozen=True)
class ExplainConfig:
    """Grad-CAM heatmaps of a model (or the members of an ensemble) on some images, logged."""

    model_uri: str = ""  # models:/m-<id>, models:/<name>/<version>, ...; empty = name@alias
    model_name: str = "image-classifier"
    alias: str = "champion"
    data: str = "data/demo/test"  # folder (flat or class sub-folders), CSV of paths, or one image
    max_images: int = 16  # images explained (a seeded sample when there are more)
    target: str = "predicted"  # class the heatmap explains: predicted | true | both
    deletion_fraction: float = 0.2  # share of pixels the deletion check masks
    seed: int = 0  # image sample and random masks
    path_column: str = "path"  # CSV input: image path column
    label_column: str = "label"  # CSV input: true label column, if present
    experiment_name: str = ""  # where the job=explain run is logged; '' = as for train
    run_name: str = ""
    config: str = ""  # YAML file of parameter values (explicit flags win)

    def __post_init__(self) -> None:
        if not self.model_uri:
            _check_model_name("model_name", self.model_name)
            _check_alias(self.alias)
        _require(bool(self.data), "data", self.data, "a folder, CSV or image path")
        _require(self.max_images >= 1, "max_images", self.max_images, "an integer >= 1")
        _require(self.target in EXPLAIN_TARGETS, "target", self.target, f"one of {EXPLAIN_TARGETS}")
        _require(
            0 < self.deletion_fraction < 1,
            "deletion_fraction",
            self.deletion_fraction,
            "a number in (0, 1)",
        )
        _require(bool(self.path_column), "path_column", self.path_column, "a column name")

    @property
    def resolved_model_uri(self) -> str:
        return self.model_uri or f"models:/{self.model_name}@{self.alias}"
