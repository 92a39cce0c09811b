"""`explain` entry point: Grad-CAM heatmaps of a logged or registered model (or the champion
ensemble's members) on images, with a deletion check, logged as a job=explain run."""

from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from registry.config import ExplainConfig
from registry.errors import ExplainError, PredictError
from registry.inputs import discover_inputs
from registry.onnx_export import find_members
from registry.store import model_version
from training.cli import run_entry_point
from training.config import config_to_dict
from training.data import decode_image
from training.gradcam import (
    DeletionCheck,
    ExplainedModel,
    deletion_check,
    explain,
    overlay,
    overlay_sheet,
    seen_views,
)
from training.names import data_label
from training.tracking import RunTracker, configure_tracking, scratch_dir
from training.transforms import decode_side

log = logging.getLogger(__name__)

DISPLAY_SIDE = 160  # overlays of tiny images (8x8 digits) are enlarged to this for viewing


@dataclass
class LoadedModel:
    """The PyTorch model(s) behind a model URI, ready for Grad-CAM."""

    members: list[ExplainedModel]
    class_names: list[str]
    is_ensemble: bool


@dataclass
class ExplainOutcome:
    run_id: str
    table: pd.DataFrame  # one row per explained image
    deletion_fraction: float
    layers: dict[str, str]


def load_explainable(model_uri: str, folder: Path) -> LoadedModel:
    """Download the model and load each PyTorch model in it (an ensemble's members, with the
    ensemble's weights when it votes `weighted`) with its logged preprocessing."""
    configure_tracking()
    try:
        local = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(folder))
        )
        members, meta = find_members(local)
    except (MlflowException, OSError, PredictError) as err:
        raise ExplainError(f"parameter 'model_uri': cannot load {model_uri!r}: {err}") from None
    weighted = meta.get("method") == "weighted"
    loaded, class_names = [], None
    for member in members:
        info = Model.load(member.folder / "MLmodel").metadata or {}
        if "image_size" not in info or "class_names" not in info:
            raise ExplainError(
                f"parameter 'model_uri': {model_uri} ({member.name}) has no image_size / "
                "class_names metadata; log it with training.train or training.kfold"
            )
        if info.get("face_crop"):
            raise ExplainError(
                f"parameter 'model_uri': {model_uri} ({member.name}) is a face-crop model, "
                "which explain does not support yet"
            )
        if class_names is not None and list(info["class_names"]) != class_names:
            raise ExplainError(
                f"parameter 'model_uri': {model_uri}: members disagree on the classes"
            )
        class_names = list(info["class_names"])
        model = mlflow.pytorch.load_model(str(member.folder), map_location="cpu")
        loaded.append(
            ExplainedModel(
                model=model,
                image_size=int(info["image_size"]),
                mean=tuple(float(v) for v in info["mean"]),
                std=tuple(float(v) for v in info["std"]),
                weight=float(member.info.get("weight", 1.0)) if weighted else 1.0,
                name=member.name,
                crop_pct=float(info.get("crop_pct", 0.0)),  # models before it squashed
            )
        )
    return LoadedModel(loaded, class_names or [], is_ensemble=bool(meta.get("members")))


def find_images(cfg: ExplainConfig) -> pd.DataFrame:
    """image_id, path, label (None when unknown) of the images to explain: one image file,
    or a seeded sample of at most max_images from a folder or CSV."""
    source = Path(cfg.data)
    if source.is_file() and source.suffix.lower() != ".csv":
        return pd.DataFrame({"image_id": [source.name], "path": [str(source)], "label": [None]})
    try:
        table = discover_inputs(cfg.data, cfg.path_column, cfg.label_column)
    except PredictError as err:
        raise ExplainError(str(err)) from None
    if len(table) > cfg.max_images:
        table = table.sample(n=cfg.max_images, random_state=cfg.seed).sort_index()
    return table.reset_index(drop=True)


def decode_all(table: pd.DataFrame, max_side: int) -> tuple[pd.DataFrame, list[np.ndarray]]:
    """Decode as training did; unreadable files are skipped with a warning naming each."""
    keep, images = [], []
    for row, path in enumerate(table["path"]):
        try:
            images.append(decode_image(path, max_side))
            keep.append(row)
        except (OSError, ValueError, SyntaxError) as err:
            log.warning("skipping %s: unreadable image (%s)", path, err)
    if not images:
        raise ExplainError(f"parameter 'data': none of the {len(table)} image(s) could be read")
    return table.iloc[keep].reset_index(drop=True), images


def true_classes(table: pd.DataFrame, class_names: list[str], target: str) -> np.ndarray | None:
    """Class index of each row's label (-1 when unknown); None when no label is needed."""
    if target == "predicted":
        return None
    if table["label"].isna().all():
        raise ExplainError(
            f"parameter 'target': {target!r} needs labels (class sub-folders or a label column)"
        )
    index = {name: i for i, name in enumerate(class_names)}
    classes = np.array([index.get(str(label), -1) for label in table["label"]])
    if (classes < 0).all():
        raise ExplainError(f"parameter 'data': no label is one of the model's {class_names}")
    return classes


def keep_known_labels(
    table: pd.DataFrame, images: list[np.ndarray], class_names: list[str], target: str
) -> tuple[pd.DataFrame, list[np.ndarray], np.ndarray | None]:
    """With a true-class target, rows whose label is not a model class are skipped (warned)."""
    truth = true_classes(table, class_names, target)
    if truth is None or (truth >= 0).all():
        return table, images, truth
    known = truth >= 0
    log.warning("skipping %d image(s) whose label the model does not know", (~known).sum())
    kept = [image for image, keep in zip(images, known, strict=True) if keep]
    return table[known].reset_index(drop=True), kept, truth[known]


def artifact_name(image_id: str) -> str:
    """explain/<image>.png: the image id with folders joined by '__' and unsafe characters '_'."""
    stem = str(Path(image_id).with_suffix("")).replace("/", "__").replace("\\", "__")
    return "explain/" + re.sub(r"[^\w.\-]+", "_", stem) + ".png"


def strip(image: np.ndarray, heatmaps: list[np.ndarray]) -> np.ndarray:
    """The image and its overlays side by side (uint8), enlarged when tiny."""
    shown = [overlay(image, heat, DISPLAY_SIDE) for heat in heatmaps]
    height, width = shown[0].shape[:2]
    parts = [cv2.resize(image, (width, height), interpolation=cv2.INTER_NEAREST)]
    for panel in shown:
        parts += [np.full((height, 4, 3), 255, dtype=np.uint8), panel]
    return np.concatenate(parts, axis=1)


def explain_images(
    loaded: LoadedModel, images: list[np.ndarray], truth: np.ndarray | None, cfg: ExplainConfig
) -> tuple[dict[str, list[np.ndarray]], np.ndarray, np.ndarray, DeletionCheck, dict[str, str]]:
    """Heatmaps per requested target, predicted classes, probabilities, the deletion check
    (on the predicted class, or the true one when only that is asked for) and target layers."""
    predicted = explain(loaded.members, images)
    heatmaps: dict[str, list[np.ndarray]] = {}
    if cfg.target in ("predicted", "both"):
        heatmaps["predicted"] = predicted.heatmaps
    if truth is not None:
        heatmaps["true"] = explain(loaded.members, images, truth).heatmaps
    checked = "predicted" if "predicted" in heatmaps else "true"
    classes = predicted.classes if checked == "predicted" else truth
    check = deletion_check(
        loaded.members, images, heatmaps[checked], classes, cfg.deletion_fraction, cfg.seed
    )
    return heatmaps, predicted.classes, predicted.probs, check, predicted.layers


def results_table(
    table: pd.DataFrame,
    class_names: list[str],
    predicted: np.ndarray,
    probs: np.ndarray,
    check: DeletionCheck,
) -> pd.DataFrame:
    rows = np.arange(len(table))
    return pd.DataFrame(
        {
            "image_id": table["image_id"],
            "path": table["path"],
            "label": table["label"],
            "predicted": [class_names[i] for i in predicted],
            "p_predicted": probs[rows, predicted].round(6),
            "artifact": [artifact_name(i) for i in table["image_id"]],
            "p_target": check.p_original.round(6),
            "p_heat_masked": check.p_heat_masked.round(6),
            "p_random_masked": check.p_random_masked.round(6),
            "heat_mask_lowered_more": check.lowered_more,
        }
    )


def log_explain_run(
    cfg: ExplainConfig,
    loaded: LoadedModel,
    images: list[np.ndarray],
    heatmaps: dict[str, list[np.ndarray]],
    results: pd.DataFrame,
    check: DeletionCheck,
    layers: dict[str, str],
) -> str:
    """A job=explain run: one overlay strip per image, a contact sheet, the per-image table
    and the deletion-check fraction."""
    model_uri = cfg.resolved_model_uri
    tags = {"job": "explain", "model_uri": model_uri}
    params = config_to_dict(cfg)
    name = cfg.run_name or f"explain {data_label(cfg.data)}"
    with RunTracker(cfg.experiment_name, name, tags=tags, params=params) as tracker:
        tracker.log_params(
            {
                "resolved_model_uri": model_uri,
                "model_version": model_version(model_uri),
                "members": len(loaded.members),
                "target_layers": layers,
                "explained_images": len(images),
                "ensemble_prediction": "weighted mean of member softmax, 1 view"
                if loaded.is_ensemble
                else "model softmax",
            }
        )
        tracker.log_metrics(
            {
                "deletion_check_fraction": check.fraction,
                "deletion_mean_p_target": float(check.p_original.mean()),
                "deletion_mean_p_heat_masked": float(check.p_heat_masked.mean()),
                "deletion_mean_p_random_masked": float(check.p_random_masked.mean()),
                "explained_images": len(images),
            }
        )
        for row, image in enumerate(images):
            panels = [heatmaps[key][row] for key in ("predicted", "true") if key in heatmaps]
            tracker.log_image(strip(image, panels), results["artifact"][row])
        captions = []
        for row in range(len(images)):
            captions.append(
                [
                    (heatmaps[key][row], _caption(key, results, row))
                    for key in ("predicted", "true")
                    if key in heatmaps
                ]
            )
        title = f"Grad-CAM, {model_uri} (deletion check {check.fraction:.0%})"
        tracker.log_figure(overlay_sheet(images, captions, title), "explain/contact_sheet.png")
        tracker.log_csv(results, "explain/explanations.csv")
        tracker.set_description(
            f"Grad-CAM of {model_uri} on {len(images)} image(s) of {data_label(cfg.data)}: "
            f"hiding the hottest {cfg.deletion_fraction:.0%} of pixels lowered p(target) more "
            f"than hiding random ones on {check.fraction:.0%} of them (about 50 % = no better "
            f"than random)"
        )
        return tracker.run_id


def _caption(key: str, results: pd.DataFrame, row: int) -> str:
    if key == "predicted":
        return f"pred {results['predicted'][row]} {results['p_predicted'][row]:.2f}"
    return f"true {results['label'][row]}"


def run(cfg: ExplainConfig) -> ExplainOutcome:
    """Check model and images first, then explain and log one run."""
    table = find_images(cfg)
    with scratch_dir() as folder:
        loaded = load_explainable(cfg.resolved_model_uri, folder)
    max_side = max(decode_side(m.image_size, m.crop_pct) for m in loaded.members)
    table, images = decode_all(table, max_side)
    table, images, truth = keep_known_labels(table, images, loaded.class_names, cfg.target)
    members, images = seen_views(loaded.members, images)
    loaded = replace(loaded, members=members)
    heatmaps, predicted, probs, check, layers = explain_images(loaded, images, truth, cfg)
    results = results_table(table, loaded.class_names, predicted, probs, check)
    run_id = log_explain_run(cfg, loaded, images, heatmaps, results, check, layers)
    return ExplainOutcome(run_id, results, check.fraction, layers)


def print_summary(outcome: ExplainOutcome) -> None:
    layers = ", ".join(f"{name}: {layer}" for name, layer in outcome.layers.items())
    print(
        f"{len(outcome.table)} image(s) explained (target layers {layers}); deletion check: "
        f"masking the top heat lowered p(target) more than random masking on "
        f"{outcome.deletion_fraction:.0%} of them; run {outcome.run_id}"
    )


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return run_entry_point(ExplainConfig, argv, __doc__, run, print_summary, (ExplainError,))


if __name__ == "__main__":
    sys.exit(main())
