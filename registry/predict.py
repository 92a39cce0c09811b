"""`predict` entry point: ensemble predictions for a folder or CSV of images, written to a CSV."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from tqdm.auto import tqdm

from registry.config import PredictConfig
from registry.errors import PredictError
from registry.inputs import discover_inputs
from training import plots
from training.cli import run_entry_point
from training.config import config_to_dict
from training.metrics import classification_metrics, confusion, report, report_text
from training.names import data_label
from training.tracking import RunTracker, configure_tracking

log = logging.getLogger(__name__)


@dataclass
class PredictOutcome:
    table: pd.DataFrame  # image_id, path, [label], predicted, prob_<class>..., error
    output: Path
    metrics: dict[str, float] | None  # when labels were known
    run_id: str  # the job=predict run, when labels were known


def load_model(model_uri: str) -> mlflow.pyfunc.PyFuncModel:
    configure_tracking()
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as err:
        raise PredictError(f"parameter 'model_uri': cannot load {model_uri!r}: {err}") from None


def model_version(model_uri: str) -> str:
    """The registry version behind models:/name@alias or models:/name/version, else ''."""
    if not model_uri.startswith("models:/"):
        return ""
    reference = model_uri[len("models:/") :]
    if "@" in reference:
        name, alias = reference.split("@", 1)
        return str(mlflow.MlflowClient().get_model_version_by_alias(name, alias).version)
    if "/" in reference:
        return reference.rsplit("/", 1)[1]
    return ""  # models:/m-<id>: a logged model, not a registry version


def call_params(cfg: PredictConfig) -> dict[str, Any]:
    """Only what was asked for; the model's stored defaults fill the rest."""
    params: dict[str, Any] = {}
    if cfg.method:
        params["method"] = cfg.method
    if cfg.tta:
        params["tta"] = cfg.tta
    return params


def predict_table(
    model: mlflow.pyfunc.PyFuncModel,
    inputs: pd.DataFrame,
    batch_size: int,
    params: dict[str, Any],
    progress: bool = True,
) -> pd.DataFrame:
    """Predict in batches (one model call each); unreadable files come back as error rows."""
    outputs = []
    with tqdm(total=len(inputs), desc="predict", unit="img", disable=not progress) as bar:
        for start in range(0, len(inputs), batch_size):
            chunk = inputs.iloc[start : start + batch_size]
            request = pd.DataFrame({"path": chunk["path"].to_numpy()})
            outputs.append(model.predict(request, params=params or None))
            bar.update(len(chunk))
    predicted = pd.concat(outputs, ignore_index=True).rename(columns={"label": "predicted"})
    columns = ["image_id", "path"] + (["label"] if inputs["label"].notna().all() else [])
    return pd.concat([inputs[columns].reset_index(drop=True), predicted], axis=1)


def class_names_of(table: pd.DataFrame) -> list[str]:
    return [column[len("prob_") :] for column in table.columns if column.startswith("prob_")]


def submission_table(table: pd.DataFrame) -> pd.DataFrame:
    """Seed 004's format: ImageID, ans (the predicted class; empty for an error row)."""
    return pd.DataFrame({"ImageID": table["image_id"], "ans": table["predicted"]})


def evaluate(table: pd.DataFrame, class_names: list[str]) -> tuple[dict[str, float], dict]:
    """Metrics of the rows that were predicted and whose label is a model class."""
    ok = table["error"] == ""
    known = table["label"].isin(class_names)
    if (ok & ~known).any():
        log.warning("%d row(s) have labels the model does not know", int((ok & ~known).sum()))
    scored = table[ok & known]
    if scored.empty:
        raise PredictError("no labelled image could be predicted; nothing to score")
    index = {name: i for i, name in enumerate(class_names)}
    targets = scored["label"].map(index).to_numpy()
    preds = scored["predicted"].map(index).to_numpy()
    # One-hot of the ensemble's labels: metrics of exactly its decisions (hard-vote ties too).
    metrics = classification_metrics(targets, np.eye(len(class_names))[preds])
    summary = {f"test_{k}": v for k, v in metrics.items()}
    summary.update(
        {
            "test_images": float(len(scored)),
            "error_rows": float((~ok).sum()),
            "unknown_label_rows": float((ok & ~known).sum()),
        }
    )
    details = {
        "confusion": confusion(targets, preds, class_names),
        "report": report(targets, preds, class_names),
        "report_text": report_text(targets, preds, class_names),
    }
    return summary, details


def log_predict_run(
    cfg: PredictConfig, table: pd.DataFrame, metrics: dict[str, float], details: dict
) -> str:
    """A job=predict run: parameters, test metrics, confusion matrix, predictions."""
    model_uri = cfg.resolved_model_uri
    tags = {"job": "predict", "model_uri": model_uri}
    params = config_to_dict(cfg)
    name = cfg.run_name or f"predict {data_label(cfg.data)}"
    with RunTracker(cfg.experiment_name, name, tags=tags, params=params) as tracker:
        tracker.log_params(
            {
                "resolved_model_uri": model_uri,
                "model_version": model_version(model_uri),
            }
        )
        tracker.log_metrics(metrics)
        matrix = details["confusion"]
        tracker.log_dict(matrix, "evaluation/confusion_matrix.json")
        tracker.log_figure(
            plots.confusion_matrix_figure(
                matrix["counts"], matrix["class_names"], "test confusion matrix"
            ),
            "evaluation/confusion_matrix.png",
        )
        tracker.log_dict(details["report"], "evaluation/classification_report.json")
        tracker.log_text(details["report_text"], "evaluation/classification_report.txt")
        tracker.log_csv(table, "evaluation/predictions.csv")
        return tracker.run_id


def run(cfg: PredictConfig, progress: bool = True) -> PredictOutcome:
    """Check inputs and model first, then predict, write the CSV, and score when labelled."""
    inputs = discover_inputs(cfg.data, cfg.path_column, cfg.label_column)
    model = load_model(cfg.resolved_model_uri)
    table = predict_table(model, inputs, cfg.batch_size, call_params(cfg), progress)
    output = Path(cfg.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    written = submission_table(table) if cfg.format == "submission" else table
    written.to_csv(output, index=False)
    errors = int((table["error"] != "").sum())
    if errors:
        log.warning(
            "%d of %d image(s) could not be predicted (see column 'error')", errors, len(table)
        )
    if "label" not in table.columns:
        return PredictOutcome(table, output, None, "")
    metrics, details = evaluate(table, class_names_of(table))
    run_id = log_predict_run(cfg, table, metrics, details)
    return PredictOutcome(table, output, metrics, run_id)


def print_summary(outcome: PredictOutcome) -> None:
    table = outcome.table
    errors = int((table["error"] != "").sum())
    print(f"{len(table) - errors} of {len(table)} image(s) predicted -> {outcome.output}")
    if outcome.metrics is not None:
        m = outcome.metrics
        print(
            f"test macro F1 {m['test_f1_macro']:.4f}, accuracy {m['test_accuracy']:.4f} "
            f"on {int(m['test_images'])} labelled image(s); run {outcome.run_id}"
        )


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # ours is enough
    return run_entry_point(PredictConfig, argv, __doc__, run, print_summary, (PredictError,))


if __name__ == "__main__":
    sys.exit(main())
