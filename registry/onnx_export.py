"""`onnx_export` entry point: an ensemble's members (or one PyTorch model) as ONNX + JSON."""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model

from registry.config import OnnxExportConfig
from registry.errors import PredictError
from registry.tta import MAX_VIEWS, VIEW_RECIPE, tta_views
from registry.voting import VOTING_RECIPE
from training.config import ConfigError, parse_cli
from training.logs import setup_logging
from training.tracking import configure_tracking, scratch_dir

log = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "image", "logits"
PARITY_TOLERANCE = 1e-4  # max |onnx - torch| logit difference accepted at export time
PREPROCESSING = (
    "RGB uint8; shorter side shrunk to S = ceil(image_size / crop_pct) if larger (PIL "
    "bilinear; S = image_size when crop_pct is 0); [an ensemble's TTA view, see view_recipe in "
    "ensemble.json]; when crop_pct > 0, keep the centred square of side "
    "max(1, round(crop_pct * min(H, W))), its top-left corner at ((H - side) // 2, "
    "(W - side) // 2); resize to image_size x image_size (cv2 INTER_LINEAR); "
    "(pixel / 255 - mean) / std; NCHW float32"
)


@dataclass(frozen=True)
class MemberModel:
    """A member's local MLflow model folder and what the ensemble knows of it."""

    name: str
    folder: Path
    info: dict[str, Any]  # fold, run_id, weight, ... (empty for a lone model)


def find_members(model_folder: Path) -> tuple[list[MemberModel], dict[str, Any]]:
    """The PyTorch models inside a downloaded model: the members of our ensemble pyfunc, or
    the model itself when it is a PyTorch model. Also returns the ensemble metadata."""
    model = Model.load(model_folder / "MLmodel")
    if "pytorch" in model.flavors:
        return [MemberModel("model", model_folder, {})], {}
    artifacts = model.flavors.get("python_function", {}).get("artifacts", {})
    meta = model.metadata or {}
    specs = {member["key"]: member for member in meta.get("members", [])}
    members = [
        MemberModel(key, model_folder / entry["path"], specs.get(key, {}))
        for key, entry in sorted(artifacts.items())
        if (model_folder / entry["path"] / "MLmodel").is_file()
    ]
    if not members:
        raise PredictError(f"{model_folder} holds neither a PyTorch model nor ensemble members")
    return members, meta


def export_onnx(model: torch.nn.Module, image_size: int, path: Path, opset: int) -> Path:
    """torch.onnx.export with the torch.export-based (dynamo) exporter, the default and
    maintained one in torch 2.9+; the TorchScript one warns that it will be removed.
    The batch dimension is dynamic."""
    model = model.eval().cpu()
    example = torch.zeros(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: batch},),
        opset_version=opset,
        dynamo=True,
        external_data=False,  # one self-contained file (fine below ONNX's 2 GB limit)
        verbose=False,
    )
    return path


def onnx_logits(path: Path, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT_NAME], {INPUT_NAME: images.astype(np.float32)})[0]


def parity_gap(model: torch.nn.Module, path: Path, images: np.ndarray) -> float:
    """Largest absolute logit difference between onnxruntime and torch on `images`."""
    with torch.inference_mode():
        expected = model.eval().cpu()(torch.from_numpy(images.astype(np.float32))).numpy()
    return float(np.abs(onnx_logits(path, images) - expected).max())


def export_members(model_folder: Path, output: Path, opset: int) -> list[Path]:
    """Write <member>.onnx and <member>.json per member, plus ensemble.json; returns the
    JSON files. Each export is checked against torch on random inputs."""
    members, meta = find_members(model_folder)
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for member in members:
        info = Model.load(member.folder / "MLmodel").metadata or {}
        model = mlflow.pytorch.load_model(str(member.folder), map_location="cpu")
        size = int(info["image_size"])
        onnx_path = export_onnx(model, size, output / f"{member.name}.onnx", opset)
        probe = np.random.default_rng(0).normal(size=(3, 3, size, size)).astype(np.float32)
        gap = parity_gap(model, onnx_path, probe)
        if gap > PARITY_TOLERANCE:
            raise RuntimeError(f"{onnx_path}: onnxruntime differs from torch by {gap:.2e}")
        description = {
            "file": onnx_path.name,
            "input": INPUT_NAME,
            "output": OUTPUT_NAME,
            "opset": opset,
            "preprocessing": PREPROCESSING,
            "max_abs_diff_vs_torch": gap,
            **{k: info.get(k) for k in ("model_name", "class_names", "image_size", "mean", "std")},
            "crop_pct": float(info.get("crop_pct", 0.0)),
            "face_crop": bool(info.get("face_crop", False)),
            **{k: member.info[k] for k in ("fold", "run_id", "weight") if k in member.info},
        }
        json_path = output / f"{member.name}.json"
        json_path.write_text(json.dumps(description, indent=2))
        written.append(json_path)
        log.info("%s: max |onnx - torch| = %.2e", onnx_path, gap)
    ensemble = {
        "members": [path.name for path in written],
        "method": meta.get("method", "arithmetic"),
        "tta": meta.get("tta", 1),
        # Divides each member's logits before log_softmax (voting_recipe); 1 = uncalibrated
        # (the pyfunc's calibrated=false, or an ensemble promoted before calibration).
        "temperature": float(meta.get("temperature", 1.0)),
        "class_names": meta.get("class_names") or json.loads(written[0].read_text())["class_names"],
        # Every view a request may ask for (tta overrides up to MAX_VIEWS); the first `tta`
        # are the default. Fractions of the image, as registry.tta.View holds them.
        "views": [asdict(view) for view in tta_views(MAX_VIEWS)],
        "view_recipe": VIEW_RECIPE,
        "voting_recipe": VOTING_RECIPE,
    }
    (output / "ensemble.json").write_text(json.dumps(ensemble, indent=2))
    return written


def run(cfg: OnnxExportConfig) -> list[Path]:
    configure_tracking()
    with scratch_dir() as folder:
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=cfg.resolved_model_uri, dst_path=str(folder)
            )
        except (MlflowException, OSError) as err:
            raise PredictError(
                f"parameter 'model_uri': cannot load {cfg.resolved_model_uri!r}: {err}"
            ) from None
        return export_members(Path(local), Path(cfg.output), cfg.opset)


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    for chatty in ("onnxscript", "onnx_ir"):  # one INFO line per optimisation pass
        logging.getLogger(chatty).setLevel(logging.WARNING)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        cfg = parse_cli(OnnxExportConfig, argv, description=__doc__)
        written = run(cfg)
    except (ConfigError, PredictError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"{len(written)} ONNX model(s) with metadata in {cfg.output}: ensemble.json, "
        + ", ".join(path.stem + ".onnx" for path in written)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
