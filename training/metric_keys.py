"""MLflow metric keys: epoch curves in prefixed sections, run summaries without a prefix.

The MLflow UI groups a run's charts by the key's prefix (before the last '/'), lists the
prefixed sections alphabetically and the unprefixed "Model metrics" section last: curves
(`train/...`, `val/...`, `val_f1/<class>`, ...) therefore come first, and one-value summaries
(`best_val_f1_macro`, ...) after them. Search filters quote prefixed keys:
metrics.`val/f1_macro` > 0.9; summaries need no quotes: metrics.best_val_f1_macro > 0.9.
"""

from __future__ import annotations

import re

# Record field of training.fit -> MLflow key of its per-epoch curve.
EPOCH_KEYS = {
    "train_loss": "train/loss",
    "train_accuracy": "train/accuracy",
    "lr": "train/lr",
    "stage": "train/stage",
    "epoch_seconds": "train/seconds",
    "images_per_s": "train/images_per_s",
    "val_loss": "val/loss",
    "val_accuracy": "val/accuracy",
    "val_f1_macro": "val/f1_macro",
    "val_precision_macro": "val/precision_macro",
    "val_recall_macro": "val/recall_macro",
    "val_ece": "val/ece",
}
# The validation figures of the kept (best) epoch, logged once as run summaries best_<name>.
SUMMARY_FIELDS = (
    "val_f1_macro",
    "val_accuracy",
    "val_loss",
    "val_precision_macro",
    "val_recall_macro",
    "val_ece",
)
PER_CLASS = ("f1", "precision", "recall")
# The figure that ranks each kind of top run: a k-fold job (the honest estimate first, then
# out-of-fold, fold mean and std), a train or fold run (kept epoch), promote (its k-fold job's
# out-of-fold), predict (test). The columns of the MLflow UI's "headline metrics" view.
HEADLINE_METRICS = (
    "honest_val_f1_macro",
    "oof_f1_macro",
    "mean_val_f1_macro",
    "std_val_f1_macro",
    "best_val_f1_macro",
    "test_f1_macro",
)
CLASS_FIELD = re.compile(r"^val_(f1|precision|recall)/(\d+)$")  # per-class record fields


def safe_name(text: str) -> str:
    """A class name as MLflow accepts it in a key (letters, digits, _ - . and space)."""
    cleaned = re.sub(r"[^\w\-. ]", "_", str(text)).strip()
    return cleaned or "_"


def class_field(kind: str, index: int) -> str:
    """The fit record's field of one class's per-epoch score, e.g. val_f1/3."""
    return f"val_{kind}/{index}"


def epoch_metrics(record: dict[str, float], class_names: list[str]) -> dict[str, float]:
    """One epoch's record as MLflow metrics: curves under their prefixed keys, per-class
    scores as val_f1/<class>, val_precision/<class>, val_recall/<class>."""
    metrics = {EPOCH_KEYS[k]: v for k, v in record.items() if k in EPOCH_KEYS}
    for field, value in record.items():
        match = CLASS_FIELD.match(field)
        if match:
            kind, index = match.groups()
            metrics[f"val_{kind}/{safe_name(class_names[int(index)])}"] = value
    return metrics


def summary_metrics(best_epoch: dict[str, float]) -> dict[str, float]:
    """The kept epoch's validation figures as best_<name> (no prefix: 'Model metrics')."""
    return {f"best_{k}": best_epoch[k] for k in SUMMARY_FIELDS if k in best_epoch}
