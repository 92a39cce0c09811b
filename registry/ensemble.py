"""The ensemble as an MLflow pyfunc: member models, their own preprocessing, TTA and voting."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from registry.images import ImageInputError, Preprocessing, decode_bytes, member_batch, row_bytes
from registry.tta import MAX_VIEWS, View, tta_views
from registry.voting import METHODS, average_views, combine, log_softmax
from training.engine import pick_device

FORWARD_BATCH = 64  # image views per forward pass: bounds memory whatever the request size


@dataclass(frozen=True)
class MemberSpec:
    """One member as stored in the ensemble; `key` names its artifact (a copied model)."""

    key: str
    fold: int
    run_id: str
    model_uri: str  # registered member version, models:/<name>/<version>
    metric: str
    metric_value: float
    weight: float  # normalised; used by method=weighted


@dataclass
class LoadedMember:
    model: torch.nn.Module
    prep: Preprocessing


class EnsembleModel(mlflow.pyfunc.PythonModel):
    """DataFrame with a base64 `image` column (image-file bytes) or a `path` column in;
    DataFrame with `label`, `prob_<class>` and `error` out. Rows that cannot be decoded get
    an empty label, no probabilities (None) and the reason; the other rows are still predicted.
    Members are averaged over their TTA views first, then voted; `weighted` uses the stored
    metric weights, the other methods weigh members equally. Requests of any size are
    decoded and predicted in chunks of `forward_batch` image views (memory stays bounded).

    Logged as code (registry/ensemble_code.py), not pickled: its settings come from the
    model_config (`ensemble_config`) and its members from the copied artifacts.
    """

    def __init__(self) -> None:
        self.members: list[dict[str, Any]] = []
        self.class_names: list[str] = []
        self.method = "arithmetic"
        self.tta = 1
        self._loaded: list[LoadedMember] = []
        self._device = torch.device("cpu")
        self.forward_batch = FORWARD_BATCH

    def load_context(self, context) -> None:
        self.setup(context.model_config, context.artifacts)

    def setup(self, config: dict[str, Any], artifacts: dict[str, str]) -> None:
        """Load every member from its local model folder, on the GPU when there is one."""
        self.members = list(config["members"])
        self.class_names = list(config["class_names"])
        self.method, self.tta = config["method"], int(config["tta"])
        self._device = pick_device("auto")
        self._loaded = []
        for member in self.members:
            path = artifacts[member["key"]]
            meta = Model.load(path).metadata or {}
            if list(meta.get("class_names", [])) != self.class_names:
                raise MlflowException(
                    f"member {member['key']} has classes {meta.get('class_names')}, "
                    f"the ensemble {self.class_names}"
                )
            model = mlflow.pytorch.load_model(path, map_location=self._device)
            self._loaded.append(LoadedMember(model.eval(), Preprocessing.from_metadata(meta)))

    def options(self, params: dict[str, Any] | None) -> tuple[str, int]:
        """Voting method and TTA views for this call: request params, else stored defaults."""
        params = params or {}
        method = params.get("method") or self.method
        tta = int(params.get("tta") or self.tta)
        if method not in METHODS:
            raise MlflowException.invalid_parameter_value(
                f"param 'method': one of {METHODS}, got {method!r}"
            )
        if not 1 <= tta <= MAX_VIEWS:
            raise MlflowException.invalid_parameter_value(
                f"param 'tta': 1..{MAX_VIEWS} views, got {tta}"
            )
        return method, tta

    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        method, tta = self.options(params)
        if "image" not in model_input.columns and "path" not in model_input.columns:
            raise MlflowException.invalid_parameter_value(
                f"input needs an 'image' (base64) or 'path' column, got {list(model_input)}"
            )
        views = tta_views(tta)
        # Images are decoded, viewed and forwarded a chunk at a time, so memory is bounded by
        # the chunk whatever the request size; voting is per image, so results do not change.
        chunk = max(1, self.forward_batch // len(views))
        rows = len(model_input)
        probs = np.full((rows, len(self.class_names)), np.nan)
        labels, errors = [""] * rows, [""] * rows
        weights = [member["weight"] for member in self.members]
        for start in range(0, rows, chunk):
            decoded, good = self._decode(model_input.iloc[start : start + chunk], errors, start)
            if not good:
                continue
            member_log_probs = self._member_log_probs(decoded, views, method)
            voted, voted_probs = combine(member_log_probs, method, weights)
            probs[good] = voted_probs
            for row, label in zip(good, voted, strict=True):
                labels[row] = self.class_names[label]
        frame = pd.DataFrame({"label": labels})
        failed = any(errors)
        for index, name in enumerate(self.class_names):
            column = pd.Series(probs[:, index])
            # None, not NaN, for failed rows: the REST answer stays strict JSON (null).
            frame[f"prob_{name}"] = (
                column.astype(object).where(column.notna(), None) if failed else column
            )
        frame["error"] = errors
        return frame

    def _decode(
        self, frame: pd.DataFrame, errors: list[str], offset: int
    ) -> tuple[dict[tuple[int, bool], list[np.ndarray]], list[int]]:
        """The rows of `frame` (rows offset.. of the request) decoded once per distinct member
        preprocessing; returns the images per decode key and the rows that decoded. A row
        that fails gets its reason in `errors`."""
        keys = {loaded.prep.decode_key: loaded.prep for loaded in self._loaded}
        images = frame["image"] if "image" in frame else [None] * len(frame)
        paths = frame["path"] if "path" in frame else [None] * len(frame)
        decoded: dict[tuple[int, bool], list[np.ndarray]] = {key: [] for key in keys}
        good = []
        for row, (image, path) in enumerate(zip(images, paths, strict=True), start=offset):
            try:
                raw = row_bytes(image, path)
                pictures = {key: decode_bytes(raw, prep) for key, prep in keys.items()}
            except ImageInputError as err:
                errors[row] = str(err)
                continue
            for key, picture in pictures.items():
                decoded[key].append(picture)
            good.append(row)
        return decoded, good

    @torch.inference_mode()
    def _member_log_probs(self, decoded: dict, views: list[View], method: str) -> np.ndarray:
        """(M, N, C) log-probabilities of N decoded images: each member's views averaged."""
        out = []
        for loaded in self._loaded:
            images = decoded[loaded.prep.decode_key]
            batch = member_batch(images, views, loaded.prep)
            logits = loaded.model(batch.to(self._device)).float().cpu()
            per_view = log_softmax(logits.numpy()).reshape(len(images), len(views), -1)
            out.append(average_views(per_view.transpose(1, 0, 2), method))
        return np.stack(out)


def ensemble_config(
    members: list[MemberSpec], class_names: list[str], method: str, tta: int
) -> dict[str, Any]:
    """The model_config the pyfunc is logged with (JSON-ready)."""
    return {
        "class_names": list(class_names),
        "method": method,
        "tta": tta,
        "members": [asdict(member) for member in members],
    }


def ensemble_signature(class_names: list[str], method: str, tta: int) -> ModelSignature:
    """Input: optional `image` (base64) and `path` strings; params: method and tta."""
    inputs = Schema(
        [ColSpec("string", "image", required=False), ColSpec("string", "path", required=False)]
    )
    outputs = Schema(
        [ColSpec("string", "label")]
        + [ColSpec("double", f"prob_{name}") for name in class_names]
        + [ColSpec("string", "error")]
    )
    params = ParamSchema([ParamSpec("method", "string", method), ParamSpec("tta", "long", tta)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)
