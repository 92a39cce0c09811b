"""Bench: ensemble predict (5 members x 2 TTA views) vs bare forward passes; ONNX vs eager.

The members are saved as MLflow PyTorch models (pickle format, as training logs them) and
loaded by EnsembleModel.setup, the code the pyfunc runs when served, so predict() here is the
served path minus HTTP: read the files, decode once, TTA views, per-member preprocessing,
forward, voting. The bare arm runs the same loaded models on the same preprocessed tensor.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch

from bench.common import best_of, verdict, write_photos
from registry.ensemble import EnsembleModel, MemberSpec, ensemble_config
from registry.images import decode_bytes, member_batch, row_bytes
from registry.onnx_export import INPUT_NAME, OUTPUT_NAME, export_onnx
from registry.tta import tta_views
from training.model import create_classifier

TARGET = 0.9
MEMBERS, TTA, CLASSES = 5, 2, 4
FULL = {"model": "tf_efficientnet_lite0", "image_size": 224, "images": 32, "repeats": 2}
QUICK = {"model": "test_efficientnet", "image_size": 32, "images": 8, "repeats": 1}
PICKLE = {"serialization_format": "pickle"}  # as training logs members: the class comes back


def save_members(folder: Path, model_name: str, size: int) -> tuple[dict[str, str], list]:
    """MEMBERS randomly initialised classifiers saved as MLflow models with the metadata the
    ensemble reads; returns artifacts (key -> folder) and member specs."""
    artifacts, specs = {}, []
    for index in range(MEMBERS):
        torch.manual_seed(index)
        model, info = create_classifier(model_name, CLASSES, 0.3, "none")
        model.to(memory_format=torch.channels_last).eval()  # as fit + pipeline leave it
        meta = {
            "class_names": [str(c) for c in range(CLASSES)],
            "image_size": size,
            "mean": list(info.mean),
            "std": list(info.std),
        }
        key = f"member_{index}"
        path = folder / key
        mlflow.pytorch.save_model(
            model,
            str(path),
            metadata=meta,
            pip_requirements=["torch"],
            serialization_format="pickle",
        )
        artifacts[key] = str(path)
        specs.append(MemberSpec(key, index, "", "", "val_f1_macro", 1.0, 1.0 / MEMBERS))
    return artifacts, specs


def onnx_vs_eager(model: torch.nn.Module, batch: torch.Tensor, folder: Path, repeats: int):
    """Images/s of onnxruntime vs torch eager for one member on the same tensor."""
    import onnxruntime as ort

    for chatty in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export"):
        logging.getLogger(chatty).setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = export_onnx(model, batch.shape[-1], folder / "member.onnx", opset=18)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    array = batch.numpy()

    def onnx_pass():
        return session.run([OUTPUT_NAME], {INPUT_NAME: array})

    def eager_pass():
        with torch.inference_mode():
            return model(batch)

    onnx_pass(), eager_pass()  # warm-up: session arenas, oneDNN primitives
    gap = float(np.abs(onnx_pass()[0] - eager_pass().numpy()).max())
    onnx_s = best_of(onnx_pass, repeats + 1)
    eager_s = best_of(eager_pass, repeats + 1)
    return len(batch) / onnx_s, len(batch) / eager_s, gap


def run(quick: bool = False) -> dict:
    """Ensemble predict images/s vs the bare forward passes, and ONNX vs eager."""
    settings = QUICK if quick else FULL
    size, count, repeats = settings["image_size"], settings["images"], settings["repeats"]
    with tempfile.TemporaryDirectory(prefix="bench-ensemble-") as tmp:
        folder = Path(tmp)
        photos = write_photos(folder / "images", count, size + size // 7, classes=CLASSES)
        paths = sorted(str(p) for p in photos.rglob("*.jpg"))
        artifacts, specs = save_members(folder / "members", settings["model"], size)
        class_names = [str(c) for c in range(CLASSES)]
        ensemble = EnsembleModel()
        ensemble.setup(ensemble_config(specs, class_names, "arithmetic", TTA), artifacts)
        frame = pd.DataFrame({"path": paths})
        params = {"tta": TTA}

        ensemble.predict(None, frame.head(2), params)  # warm-up
        predict_s = best_of(lambda: ensemble.predict(None, frame, params), repeats)
        out = ensemble.predict(None, frame, params)
        assert (out["error"] == "").all(), out["error"].tolist()

        # Bare: the same models on the same (N * views) tensor, preprocessed up front.
        prep = ensemble._loaded[0].prep
        decoded = [decode_bytes(row_bytes(None, p), prep) for p in paths]
        batch = member_batch(decoded, tta_views(TTA), prep)
        models = [loaded.model for loaded in ensemble._loaded]

        def bare() -> list[torch.Tensor]:
            with torch.inference_mode():
                return [model(batch) for model in models]

        bare()  # warm-up
        bare_s = best_of(bare, repeats)
        onnx_ips, eager_ips, gap = onnx_vs_eager(models[0], batch, folder, repeats)
    ratio = bare_s / predict_s
    return {
        "model": settings["model"],
        "image_size": size,
        "images": count,
        "members": MEMBERS,
        "tta_views": TTA,
        "bare_images_per_s": round(count / bare_s, 2),
        "ensemble_images_per_s": round(count / predict_s, 2),
        "ratio": round(ratio, 3),
        "target": TARGET,
        "status": verdict(ratio, TARGET),
        "onnx_images_per_s": round(onnx_ips, 2),
        "eager_images_per_s": round(eager_ips, 2),
        "onnx_vs_eager": round(onnx_ips / eager_ips, 3),
        "onnx_max_abs_diff": gap,
    }


if __name__ == "__main__":
    print(json.dumps(run("--quick" in sys.argv), indent=2))
