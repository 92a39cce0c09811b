"""What a finished training run logs: summaries, evaluation, error gallery, calibration,
checkpoints and the model, linked to the epoch whose weights it holds."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd
import timm
import torch

import training
from training import plots
from training.checkpoints import save_checkpoint
from training.config import config_to_dict
from training.fit import FitResult
from training.gradcam import ExplainedModel, misclassified_figure
from training.metric_keys import summary_metrics
from training.metrics import (
    confusion,
    misclassified,
    reliability_bins,
    report,
    report_text,
)
from training.names import model_name_for
from training.tracking import RunTracker, scratch_dir

GALLERY_SIZE = 16  # misclassified images on a run's contact sheet


def log_summary(tracker: RunTracker, plan, result: FitResult) -> None:
    """The kept epoch's validation figures (best_*), which epoch that was (params), and a
    one-line description of the run."""
    best = result.best_epoch
    tracker.log_metrics(summary_metrics(best))
    tracker.log_params(
        {
            "best_step": int(best["step"]),
            "best_stage": int(best["stage"]),
            "best_epoch": int(best["epoch"]),
            "bn_stats_frozen": result.bn_stats_frozen,
            "bn_stat_shift": "" if result.bn_stat_shift is None else round(result.bn_stat_shift, 4),
        }
    )
    seconds = sum(record["epoch_seconds"] for record in result.history)
    tracker.set_description(
        f"val macro F1 {best['val_f1_macro']:.3f}, accuracy {best['val_accuracy']:.3f}, "
        f"ECE {best['val_ece']:.3f}: weights of stage {int(best['stage'])} epoch "
        f"{int(best['epoch'])} (step {int(best['step'])}) of {len(result.history)} epochs "
        f"({seconds:.0f} s); {plan.cfg.model} on {len(plan.train_indices)} training and "
        f"{len(plan.val_indices)} validation images, {len(plan.data.class_names)} classes"
    )


def log_evaluation(tracker: RunTracker, plan, result: FitResult, figures: bool) -> None:
    """Confusion matrix, report, predictions, misclassified images and calibration of the
    kept weights on the validation split; with `figures`, the plots, the gallery and one
    confusion-matrix image per epoch (`figures` is off in tuning trials unless asked)."""
    names = plan.data.class_names
    probs, targets = result.val_probs, result.val_targets
    preds = probs.argmax(axis=1)
    matrix = confusion(targets, preds, names)
    tracker.log_dict(matrix, "evaluation/confusion_matrix.json")
    tracker.log_dict(report(targets, preds, names), "evaluation/classification_report.json")
    tracker.log_text(report_text(targets, preds, names), "evaluation/classification_report.txt")
    tracker.log_csv(predictions_table(plan, probs), "evaluation/val_predictions.csv")
    tracker.log_csv(pd.DataFrame(result.history), "evaluation/history.csv")
    paths = plan.data.table["path"].to_numpy()[plan.val_indices]
    wrong = misclassified(list(paths), targets, probs, names)
    tracker.log_csv(wrong, "evaluation/misclassified.csv")
    bins = reliability_bins(targets, probs)
    tracker.log_dict(bins, "evaluation/reliability.json")
    if not figures:
        return
    tracker.log_figure(
        plots.confusion_matrix_figure(matrix["counts"], names, "validation confusion matrix"),
        "evaluation/confusion_matrix.png",
    )
    for step, image in plots.confusion_matrix_frames(result.confusions, names):
        tracker.log_image_at_step(image, "confusion_matrix", step)
    tracker.log_figure(plots.learning_curves(result.history), "plots/learning_curves.png")
    tracker.log_figure(
        plots.probability_distribution(probs, targets), "plots/probability_distribution.png"
    )
    ece = result.best_epoch["val_ece"]
    tracker.log_figure(
        plots.reliability_diagram(bins, ece, "validation reliability"), "plots/reliability.png"
    )
    log_gradcam(tracker, plan, result)
    worst = wrong.head(GALLERY_SIZE)
    images = [plan.data.images[plan.val_indices[i]] for i in worst.index]
    tracker.log_figure(
        plots.misclassified_sheet(images, worst, f"worst {len(worst)} of {len(wrong)} wrong"),
        "evaluation/misclassified.png",
    )


def log_gradcam(tracker: RunTracker, plan, result: FitResult) -> None:
    """Grad-CAM of the predicted and the true class on the most confidently misclassified
    validation images (`explain_misclassified` of them; 0 = off)."""
    count = plan.cfg.explain_misclassified
    if count <= 0:
        return
    info = plan.model_info
    member = ExplainedModel(
        plan.model, plan.cfg.image_size, info.mean, info.std, crop_pct=plan.crop_pct
    )
    images = [plan.data.images[i] for i in plan.val_indices]
    figure = misclassified_figure(
        member, images, result.val_targets, plan.data.class_names, count, result.val_probs
    )
    if figure is not None:
        tracker.log_figure(figure, "evaluation/misclassified_gradcam.png")


def log_checkpoints(tracker: RunTracker, plan, result: FitResult, meta: dict) -> None:
    """Best weights of each stage and the final weights, with their config and metrics."""
    with scratch_dir() as folder:
        ckpt_meta = {**meta, "config": config_to_dict(plan.cfg)}
        for stage_name, (state, record) in result.stage_best.items():
            path = folder / f"best_{stage_name}.pt"
            save_checkpoint(path, state, {**ckpt_meta, "metrics": record})
            tracker.log_artifact(path, "checkpoints")
        save_checkpoint(folder / "final.pt", result.final_state, ckpt_meta)
        tracker.log_artifact(folder / "final.pt", "checkpoints")


def log_model(
    tracker: RunTracker, plan, result: FitResult, meta: dict, example: np.ndarray, name: str
) -> str:
    """The kept weights as a LoggedModel named after the run (`fold-3`), linked to the step
    of the epoch they come from; returns its models:/ URI (also the run's model_uri tag)."""
    best = result.best_epoch
    model_uri = tracker.log_pytorch_model(
        plan.model,
        name=model_name_for(name),
        input_example=example,
        metadata={
            **meta,
            **{k: round(v, 6) for k, v in summary_metrics(best).items()},
            **{k: int(best[k]) for k in ("stage", "epoch", "step")},
        },
        pip_requirements=pip_requirements(),
        step=int(best["step"]),
        code_paths=[str(Path(training.__file__).parent)],
    )
    tracker.set_tags({"model_uri": model_uri})  # lets registry find the model without search
    return model_uri


def pip_requirements() -> list[str]:
    import albumentations
    import sklearn

    return [
        f"torch=={torch.__version__.split('+')[0]}",
        f"timm=={timm.__version__}",
        f"mlflow=={version('mlflow')}",
        f"albumentations=={albumentations.__version__}",
        f"scikit-learn=={sklearn.__version__}",
        f"numpy=={np.__version__}",
        "pillow",
        "pandas",
    ]


def predictions_table(plan, probs: np.ndarray) -> pd.DataFrame:
    """Validation predictions: path, true label, predicted label, one column per class."""
    rows = plan.data.table.iloc[plan.val_indices]
    names = plan.data.class_names
    table = pd.DataFrame(
        {
            "path": rows["path"].to_numpy(),
            "label": rows["label"].to_numpy(),
            "predicted": [names[i] for i in probs.argmax(axis=1)],
        }
    )
    for index, name in enumerate(names):
        table[f"prob_{name}"] = probs[:, index]
    return table


def input_example(dataset, count: int = 2) -> np.ndarray:
    return torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))]).numpy()
