"""`predict` entry point: ensemble predictions for a folder or CSV of images, written to a CSV."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from tqdm.auto import tqdm

from registry.comparison import comparison_table, format_comparison
from registry.config import ExplainConfig, PredictConfig
from registry.ensemble import EnsembleModel, Options, Scores
from registry.errors import ExplainError, PredictError
from registry.explain import ExplainOutcome
from registry.explain import print_summary as print_explained
from registry.explain import run as run_explain
from registry.images import Preprocessing, decode_bytes, row_bytes
from registry.inputs import discover_inputs
from registry.latency import measure, timed_sample
from registry.store import model_version, pinned_model_uri
from registry.voting import vote
from training import plots
from training.cli import run_entry_point
from training.config import config_to_dict
from training.metrics import (
    classification_metrics,
    confusion,
    expected_calibration_error,
    misclassified,
    negative_log_likelihood,
    report,
    report_text,
)
from training.names import data_label
from training.run_results import GALLERY_SIZE
from training.tracking import RunTracker, configure_tracking

log = logging.getLogger(__name__)


@dataclass
class PredictOutcome:
    table: pd.DataFrame  # image_id, path, [label], predicted, prob_<class>..., error
    output: Path
    metrics: dict[str, float] | None  # when labels were known
    run_id: str  # the job=predict run, when labels were known
    comparison: pd.DataFrame | None = None  # members / voting / TTA / calibration table
    explained: ExplainOutcome | None = None  # with `explain`: the Grad-CAM run


def load_model(model_uri: str) -> mlflow.pyfunc.PyFuncModel:
    configure_tracking()
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as err:
        raise PredictError(f"parameter 'model_uri': cannot load {model_uri!r}: {err}") from None


def ensemble_of(model: mlflow.pyfunc.PyFuncModel) -> EnsembleModel | None:
    """Our ensemble inside a loaded pyfunc, else None (another pyfunc is only called)."""
    try:
        inner = model.unwrap_python_model()
    except MlflowException:
        return None
    return inner if isinstance(inner, EnsembleModel) else None


def call_params(cfg: PredictConfig) -> dict[str, Any]:
    """Only what was asked for; the model's stored defaults fill the rest."""
    params: dict[str, Any] = {"calibrated": cfg.calibrated}
    if cfg.method:
        params["method"] = cfg.method
    if cfg.tta:
        params["tta"] = cfg.tta
    return params


def _with_inputs(inputs: pd.DataFrame, predicted: pd.DataFrame) -> pd.DataFrame:
    predicted = predicted.rename(columns={"label": "predicted"})
    columns = ["image_id", "path"] + (["label"] if inputs["label"].notna().all() else [])
    return pd.concat([inputs[columns].reset_index(drop=True), predicted], axis=1)


def _requests(inputs: pd.DataFrame, batch_size: int, progress: bool):
    """The inputs as model requests of `batch_size` paths, with a progress bar."""
    with tqdm(total=len(inputs), desc="predict", unit="img", disable=not progress) as bar:
        for start in range(0, len(inputs), batch_size):
            chunk = inputs.iloc[start : start + batch_size]
            yield pd.DataFrame({"path": chunk["path"].to_numpy()})
            bar.update(len(chunk))


def predict_table(
    model: mlflow.pyfunc.PyFuncModel,
    inputs: pd.DataFrame,
    batch_size: int,
    params: dict[str, Any],
    progress: bool = True,
) -> pd.DataFrame:
    """Any pyfunc taking paths: one model call per batch; unreadable files are error rows."""
    outputs = [
        model.predict(request, params=params or None)
        for request in _requests(inputs, batch_size, progress)
    ]
    return _with_inputs(inputs, pd.concat(outputs, ignore_index=True))


def ensemble_table(
    ensemble: EnsembleModel,
    inputs: pd.DataFrame,
    batch_size: int,
    options: Options,
    progress: bool = True,
) -> tuple[pd.DataFrame, Scores]:
    """The ensemble's predictions (what its pyfunc predict returns for `options`) and the
    per-member, per-view log-probabilities behind them, kept for the comparison: the
    models run once per image and view."""
    scores = Scores.concat(
        [
            ensemble.score(request, options.tta)
            for request in _requests(inputs, batch_size, progress)
        ]
    )
    return _with_inputs(inputs, ensemble.answer(scores, *ensemble.vote(scores, options))), scores


def class_names_of(table: pd.DataFrame) -> list[str]:
    return [column[len("prob_") :] for column in table.columns if column.startswith("prob_")]


def submission_table(table: pd.DataFrame) -> pd.DataFrame:
    """Seed 004's format: ImageID, ans (the predicted class; empty for an error row)."""
    return pd.DataFrame({"ImageID": table["image_id"], "ans": table["predicted"]})


def evaluate(table: pd.DataFrame, class_names: list[str]) -> tuple[dict[str, float], dict]:
    """Metrics of the rows that were predicted and whose label is a model class; the details
    hold the confusion matrix, the reports, the misclassified rows, and which table rows
    were scored with their class indices (`rows`, `targets`)."""
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
    probs = scored[[f"prob_{name}" for name in class_names]].to_numpy(dtype=float)
    # The label is the argmax of the probabilities except in a hard-vote tie (vote shares
    # equal; the soft mean decided): nudged so that misclassified sees the label.
    decided = probs.copy()
    decided[np.arange(len(preds)), preds] += 1e-9
    wrong = misclassified(list(scored["path"]), targets, decided, class_names)
    wrong["p_predicted"] = probs[wrong.index, preds[wrong.index]]
    wrong.insert(0, "image_id", scored["image_id"].to_numpy()[wrong.index])
    details = {
        "confusion": confusion(targets, preds, class_names),
        "report": report(targets, preds, class_names),
        "report_text": report_text(targets, preds, class_names),
        "rows": scored.index.to_numpy(),
        "targets": targets,
        "misclassified": wrong,
    }
    return summary, details


def calibration_metrics(
    ensemble: EnsembleModel, log_probs: np.ndarray, targets: np.ndarray, options: Options
) -> dict[str, float]:
    """ECE and NLL of the ensemble's probabilities (this run's method and views) with and
    without its temperature."""
    metrics = {}
    for name, calibrated in (("uncalibrated", False), ("calibrated", True)):
        _, probs = vote(
            log_probs[:, : options.tta],
            options.method,
            ensemble.weights,
            ensemble.temperature if calibrated else 1.0,
        )
        metrics[f"test_ece_{name}"] = expected_calibration_error(targets, probs)
        metrics[f"test_nll_{name}"] = negative_log_likelihood(targets, probs)
    return metrics


def scored_log_probs(scores: Scores, rows: np.ndarray) -> np.ndarray:
    """The cached (M, V, N, C) log-probabilities of the given table rows, in their order."""
    position = {row: i for i, row in enumerate(scores.good)}
    return scores.log_probs[:, :, [position[row] for row in rows]]


def compare(
    ensemble: EnsembleModel,
    paths: list[str],
    log_probs: np.ndarray,
    targets: np.ndarray,
    options: Options,
    seed: int,
) -> pd.DataFrame:
    """The comparison table of the scored images from their cached log-probabilities, with
    the latency of real calls on a sample of them."""
    seconds = measure(ensemble, timed_sample(paths, seed), sorted({1, options.tta}))
    return comparison_table(
        log_probs,
        targets,
        [int(member["fold"]) for member in ensemble.members],
        ensemble.weights,
        ensemble.temperature,
        options.tta,
        seconds,
        seed,
    )


def worst_images(wrong: pd.DataFrame, prep: Preprocessing) -> list[np.ndarray]:
    """Misclassified images decoded as the ensemble's (first) member decodes them."""
    return [decode_bytes(row_bytes(None, path), prep) for path in wrong["path"]]


@dataclass
class Evaluation:
    """What a labelled predict run logs."""

    metrics: dict[str, float]  # test_* (also on the model), counts
    details: dict  # see evaluate
    model_id: str  # the LoggedModel that predicted ('' when unknown)
    calibration: dict[str, float] = field(default_factory=dict)
    comparison: pd.DataFrame | None = None
    gallery: list = field(default_factory=list)  # decoded worst misclassified images


def log_predict_run(cfg: PredictConfig, table: pd.DataFrame, evaluation: Evaluation) -> str:
    """A job=predict run: parameters, test metrics (also on the model's LoggedModel, which
    the run records as its input), calibration, comparison, confusion matrix, errors."""
    model_uri = cfg.resolved_model_uri
    tags = {"job": "predict", "model_uri": model_uri}
    params = config_to_dict(cfg)
    name = cfg.run_name or f"predict {data_label(cfg.data)}"
    metrics, details = evaluation.metrics, evaluation.details
    with RunTracker(cfg.experiment_name, name, tags=tags, params=params) as tracker:
        version = model_version(model_uri)
        tracker.log_params(
            {
                "resolved_model_uri": model_uri,
                "model_version": version,
                "model_id": evaluation.model_id,
            }
        )
        model_metrics = {k: v for k, v in metrics.items() if k.startswith("test_")}
        model_metrics |= evaluation.calibration
        if evaluation.model_id:
            tracker.log_model_input(evaluation.model_id)
        tracker.log_metrics(model_metrics, model_id=evaluation.model_id or None)
        tracker.log_metrics({k: v for k, v in metrics.items() if k not in model_metrics})
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
        wrong = details["misclassified"]
        tracker.log_csv(wrong, "evaluation/misclassified.csv")
        if evaluation.gallery:
            worst = wrong.head(len(evaluation.gallery))
            title = f"worst {len(worst)} of {len(wrong)} wrong"
            sheet = plots.misclassified_sheet(evaluation.gallery, worst, title)
            tracker.log_figure(sheet, "evaluation/misclassified.png")
        if evaluation.comparison is not None:
            tracker.log_table(evaluation.comparison, "evaluation/comparison.json")
            tracker.log_csv(evaluation.comparison, "evaluation/comparison.csv")
        tracker.set_description(describe(cfg, version, metrics, evaluation.calibration))
        return tracker.run_id


def describe(cfg: PredictConfig, version: str, metrics: dict, calibration: dict) -> str:
    """The predict run's one-line description."""
    text = (
        f"{cfg.resolved_model_uri}{f' (version {version})' if version else ''} on "
        f"{int(metrics['test_images'])} labelled images of {cfg.data}: macro F1 "
        f"{metrics['test_f1_macro']:.4f}, accuracy {metrics['test_accuracy']:.4f}"
    )
    if calibration:
        text += (
            f"; ECE {calibration['test_ece_uncalibrated']:.4f} without the temperature, "
            f"{calibration['test_ece_calibrated']:.4f} with it"
        )
    return text


def evaluate_ensemble(
    cfg: PredictConfig,
    ensemble: EnsembleModel,
    table: pd.DataFrame,
    scores: Scores,
    options: Options,
    evaluation: Evaluation,
) -> None:
    """Add what only our ensemble can tell: ECE and NLL with and without its temperature,
    the gallery of the worst errors, and (cfg.compare) the comparison table."""
    rows, targets = evaluation.details["rows"], evaluation.details["targets"]
    log_probs = scored_log_probs(scores, rows)
    evaluation.calibration = calibration_metrics(ensemble, log_probs, targets, options)
    worst = evaluation.details["misclassified"].head(GALLERY_SIZE)
    evaluation.gallery = worst_images(worst, ensemble.preprocessing[0])
    if cfg.compare:
        paths = table.loc[rows, "path"].tolist()
        evaluation.comparison = compare(ensemble, paths, log_probs, targets, options, cfg.seed)


def run(cfg: PredictConfig, progress: bool = True) -> PredictOutcome:
    """Check inputs and model first, then predict, write the CSV, score when labelled, and
    explain a sample of the images when asked (same process: no second model start-up)."""
    outcome = predict(cfg, progress)
    if cfg.explain:
        labelled = "label" in outcome.table.columns
        outcome.explained = run_explain(
            ExplainConfig(
                model_uri=pinned_model_uri(cfg.resolved_model_uri),
                data=cfg.data,
                max_images=cfg.explain,
                target="both" if labelled else "predicted",
                seed=cfg.seed,
                path_column=cfg.path_column,
                label_column=cfg.label_column,
                experiment_name=cfg.experiment_name,
            )
        )
    return outcome


def predict(cfg: PredictConfig, progress: bool) -> PredictOutcome:
    """Predict, write the CSV, and log a job=predict run when labels are known."""
    inputs = discover_inputs(cfg.data, cfg.path_column, cfg.label_column)
    model = load_model(cfg.resolved_model_uri)
    ensemble = ensemble_of(model)
    scores = options = None
    if ensemble is None:
        table = predict_table(model, inputs, cfg.batch_size, call_params(cfg), progress)
    else:
        try:
            options = ensemble.options(call_params(cfg))
        except MlflowException as err:
            raise PredictError(err.message) from None
        table, scores = ensemble_table(ensemble, inputs, cfg.batch_size, options, progress)
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
    evaluation = Evaluation(metrics, details, model.metadata.model_id or "")
    if ensemble is not None:
        evaluate_ensemble(cfg, ensemble, table, scores, options, evaluation)
    run_id = log_predict_run(cfg, table, evaluation)
    return PredictOutcome(
        table, output, {**metrics, **evaluation.calibration}, run_id, evaluation.comparison
    )


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
        if "test_ece_calibrated" in m:
            print(
                f"ECE {m['test_ece_uncalibrated']:.4f} without the temperature, "
                f"{m['test_ece_calibrated']:.4f} with it"
            )
    if outcome.comparison is not None:
        print(format_comparison(outcome.comparison))
    if outcome.explained is not None:
        print_explained(outcome.explained)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # ours is enough
    return run_entry_point(
        PredictConfig, argv, __doc__, run, print_summary, (PredictError, ExplainError)
    )


if __name__ == "__main__":
    sys.exit(main())
