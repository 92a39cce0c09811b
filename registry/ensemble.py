"""The ensemble as an MLflow pyfunc: member models, their own preprocessing, TTA and voting."""

from __future__ import annotations

import copy
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
from registry.voting import METHODS, log_softmax, vote
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


@dataclass(frozen=True)
class Options:
    """What one call asks for: voting method, TTA views, and whether the temperature applies."""

    method: str
    tta: int
    calibrated: bool


@dataclass
class Scores:
    """Every member's per-view log-probabilities (uncalibrated: log_softmax of the logits)
    of the request rows that decoded: all the models' work for those rows."""

    log_probs: np.ndarray  # (M, V, N_good, C)
    good: list[int]  # the request rows they belong to, in order
    errors: list[str]  # per request row: '' when decoded, else the reason

    @classmethod
    def concat(cls, parts: list[Scores]) -> Scores:
        """The scores of consecutive slices of one request as one."""
        good, offset = [], 0
        for part in parts:
            good += [offset + row for row in part.good]
            offset += len(part.errors)
        return cls(
            np.concatenate([part.log_probs for part in parts], axis=2),
            good,
            [error for part in parts for error in part.errors],
        )


def _as_bool(value: Any) -> bool:
    """A request's `calibrated`: a JSON boolean, or 'true' / 'false' as text."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text not in ("true", "false", "1", "0"):
            raise MlflowException.invalid_parameter_value(
                f"param 'calibrated': true or false, got {value!r}"
            )
        return text in ("true", "1")
    return bool(value)


class EnsembleModel(mlflow.pyfunc.PythonModel):
    """DataFrame with a base64 `image` column (image-file bytes) or a `path` column in;
    DataFrame with `label`, `prob_<class>` and `error` out. Rows that cannot be decoded get
    an empty label, no probabilities (None) and the reason; the other rows are still predicted.
    Each view's logits are divided by the stored temperature (unless the request says
    calibrated=false), each member's views are averaged, then the members voted; `weighted`
    uses the stored metric weights, the other methods weigh members equally. Requests of any
    size are decoded and predicted in chunks of `forward_batch` image views (memory stays
    bounded).

    Logged as code (registry/ensemble_code.py), not pickled: its settings come from the
    model_config (`ensemble_config`) and its members from the copied artifacts.
    """

    def __init__(self) -> None:
        self.members: list[dict[str, Any]] = []
        self.class_names: list[str] = []
        self.method = "arithmetic"
        self.tta = 1
        self.temperature = 1.0
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
        # Ensembles promoted before calibration have no temperature: T = 1 changes nothing.
        self.temperature = float(config.get("temperature", 1.0))
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

    @property
    def weights(self) -> list[float]:
        return [member["weight"] for member in self.members]

    @property
    def preprocessing(self) -> list[Preprocessing]:
        return [loaded.prep for loaded in self._loaded]

    def only(self, index: int) -> EnsembleModel:
        """This model with member `index` alone (sharing its loaded weights): what one member
        costs and scores through the same code path."""
        one = copy.copy(self)
        one.members, one._loaded = [self.members[index]], [self._loaded[index]]
        return one

    def options(self, params: dict[str, Any] | None) -> Options:
        """Voting method, TTA views and calibration for this call: request params, else the
        stored defaults (calibrated unless asked otherwise)."""
        params = params or {}
        method = params.get("method") or self.method
        tta = int(params.get("tta") or self.tta)
        calibrated = params.get("calibrated")
        if method not in METHODS:
            raise MlflowException.invalid_parameter_value(
                f"param 'method': one of {METHODS}, got {method!r}"
            )
        if not 1 <= tta <= MAX_VIEWS:
            raise MlflowException.invalid_parameter_value(
                f"param 'tta': 1..{MAX_VIEWS} views, got {tta}"
            )
        return Options(method, tta, True if calibrated is None else _as_bool(calibrated))

    def temperature_for(self, options: Options) -> float:
        return self.temperature if options.calibrated else 1.0

    def predict(
        self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        options = self.options(params)
        scores = self.score(model_input, options.tta)
        return self.answer(scores, *self.vote(scores, options))

    def vote(self, scores: Scores, options: Options) -> tuple[np.ndarray, np.ndarray]:
        """(labels, probabilities) of the decoded rows, voted as `options` say."""
        if not scores.good:
            return np.zeros(0, dtype=int), np.zeros((0, len(self.class_names)))
        views = scores.log_probs[:, : options.tta]  # views are prefixes of each other
        return vote(views, options.method, self.weights, self.temperature_for(options))

    def score(self, model_input: pd.DataFrame, views: int) -> Scores:
        """Every member's log-probabilities of the first `views` TTA views of each row that
        decodes. Images are decoded, viewed and forwarded a chunk at a time, so memory is
        bounded by the chunk whatever the request size; voting is per image."""
        if "image" not in model_input.columns and "path" not in model_input.columns:
            raise MlflowException.invalid_parameter_value(
                f"input needs an 'image' (base64) or 'path' column, got {list(model_input)}"
            )
        view_list = tta_views(views)
        chunk = max(1, self.forward_batch // len(view_list))
        errors = [""] * len(model_input)
        parts, good = [], []
        for start in range(0, len(model_input), chunk):
            frame = model_input.iloc[start : start + chunk]
            decoded, decoded_rows = self._decode(frame, errors, start)
            if decoded_rows:
                parts.append(self._view_log_probs(decoded, view_list))
                good += decoded_rows
        if not parts:
            shape = (len(self._loaded), len(view_list), 0, len(self.class_names))
            return Scores(np.zeros(shape), good, errors)
        return Scores(np.concatenate(parts, axis=2), good, errors)

    def answer(self, scores: Scores, labels: np.ndarray, probs: np.ndarray) -> pd.DataFrame:
        """The output frame: labels and probabilities of the rows that decoded; an empty
        label, None and the reason for the others."""
        rows = len(scores.errors)
        full = np.full((rows, len(self.class_names)), np.nan)
        names = [""] * rows
        full[scores.good] = probs
        for row, label in zip(scores.good, labels, strict=True):
            names[row] = self.class_names[label]
        frame = pd.DataFrame({"label": names})
        failed = any(scores.errors)
        for index, name in enumerate(self.class_names):
            column = pd.Series(full[:, index])
            # None, not NaN, for failed rows: the REST answer stays strict JSON (null).
            frame[f"prob_{name}"] = (
                column.astype(object).where(column.notna(), None) if failed else column
            )
        frame["error"] = list(scores.errors)
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
    def _view_log_probs(self, decoded: dict, views: list[View]) -> np.ndarray:
        """(M, V, N, C) log-probabilities of N decoded images, per member and view."""
        out = []
        for loaded in self._loaded:
            images = decoded[loaded.prep.decode_key]
            batch = member_batch(images, views, loaded.prep)
            logits = loaded.model(batch.to(self._device)).float().cpu()
            per_view = log_softmax(logits.numpy()).reshape(len(images), len(views), -1)
            out.append(per_view.transpose(1, 0, 2))
        return np.stack(out)


def ensemble_config(
    members: list[MemberSpec],
    class_names: list[str],
    method: str,
    tta: int,
    temperature: float = 1.0,
) -> dict[str, Any]:
    """The model_config the pyfunc is logged with (JSON-ready)."""
    return {
        "class_names": list(class_names),
        "method": method,
        "tta": tta,
        "temperature": float(temperature),
        "members": [asdict(member) for member in members],
    }


def ensemble_signature(class_names: list[str], method: str, tta: int) -> ModelSignature:
    """Input: optional `image` (base64) and `path` strings; params: method, tta and
    calibrated (divide the logits by the stored temperature; default true)."""
    inputs = Schema(
        [ColSpec("string", "image", required=False), ColSpec("string", "path", required=False)]
    )
    outputs = Schema(
        [ColSpec("string", "label")]
        + [ColSpec("double", f"prob_{name}") for name in class_names]
        + [ColSpec("string", "error")]
    )
    params = ParamSchema(
        [
            ParamSpec("method", "string", method),
            ParamSpec("tta", "long", tta),
            ParamSpec("calibrated", "boolean", True),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)
