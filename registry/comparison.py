"""Each member alone against every voting method, with and without TTA and calibration, on
labelled images: macro F1 with a bootstrap interval, accuracy, latency against one member."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial

import numpy as np
import pandas as pd
from scipy import stats

from registry.voting import METHODS, vote

BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95
BOOTSTRAP_BATCH = 250  # resamples per vectorised call: bounds memory on large test sets
BASELINE = ("member 0", 1)  # latency reference: the best member, one view


@dataclass(frozen=True)
class Variant:
    """One row: which members vote how, on how many views, with or without the temperature.
    `calibrated` is None where the temperature cannot change a label: a member alone (the
    argmax of logits / T is the argmax of the logits) and geometric voting (a mean of
    log-probabilities: T scales it up to a per-image constant)."""

    model: str  # "member 0 (fold 3)" or "ensemble"
    timing_key: str  # "member 0" or "ensemble": what the latency was measured on
    members: tuple[int, ...]
    method: str
    tta: int
    calibrated: bool | None


def variants(member_folds: list[int], tta: int) -> list[Variant]:
    """Members alone, then every voting method; each at 1 view and at `tta` views; with and
    without the temperature where it can change a label (arithmetic, weighted, hard ties)."""
    views = sorted({1, tta})
    rows = [
        Variant(f"member {rank} (fold {fold})", f"member {rank}", (rank,), "-", n, None)
        for rank, fold in enumerate(member_folds)
        for n in views
    ]
    everyone = tuple(range(len(member_folds)))
    for method in METHODS:
        for n in views:
            options = (None,) if method == "geometric" else (False, True)
            rows += [Variant("ensemble", "ensemble", everyone, method, n, c) for c in options]
    return rows


def macro_f1(targets: np.ndarray, preds: np.ndarray, classes: int, axis: int = -1) -> np.ndarray:
    """Macro F1 over classes 0..classes-1 along `axis`, vectorised over any leading axes (the
    bootstrap's resamples): scikit-learn's f1_score(average='macro', labels=all classes,
    zero_division=0), which takes one sample per call (2,000 calls a row is too slow)."""
    t = np.moveaxis(np.asarray(targets), axis, -1)[..., None] == np.arange(classes)
    p = np.moveaxis(np.asarray(preds), axis, -1)[..., None] == np.arange(classes)
    tp = (t & p).sum(axis=-2)
    wrong = (t ^ p).sum(axis=-2)  # false positives + false negatives
    denominator = 2 * tp + wrong
    f1 = np.divide(2 * tp, denominator, out=np.zeros(denominator.shape), where=denominator > 0)
    return f1.mean(axis=-1)


def f1_interval(
    targets: np.ndarray, preds: np.ndarray, classes: int, seed: int
) -> tuple[float, float]:
    """95 % bootstrap interval of the macro F1: (target, prediction) pairs resampled together
    (scipy.stats.bootstrap, paired, BCa). Where BCa is undefined (every resample scores the
    same, e.g. all right) the percentile interval, which is then that score."""
    statistic = partial(macro_f1, classes=classes)
    options = dict(
        paired=True,
        vectorized=True,
        n_resamples=BOOTSTRAP_RESAMPLES,
        batch=BOOTSTRAP_BATCH,
        confidence_level=CONFIDENCE,
    )
    # A degenerate sample makes BCa divide 0 by 0 (NaN bounds, warned): the fallback's case.
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        found = stats.bootstrap(
            (targets, preds), statistic, method="BCa", rng=np.random.default_rng(seed), **options
        ).confidence_interval
        if not np.all(np.isfinite(found)):
            found = stats.bootstrap(
                (targets, preds),
                statistic,
                method="percentile",
                rng=np.random.default_rng(seed),
                **options,
            ).confidence_interval
    return float(found.low), float(found.high)


def comparison_table(
    log_probs: np.ndarray,
    targets: np.ndarray,
    member_folds: list[int],
    weights: list[float],
    temperature: float,
    tta: int,
    seconds: dict[tuple[str, int], float] | None,
    seed: int,
) -> pd.DataFrame:
    """One row per variant from cached per-member, per-view log-probabilities (M, V, N, C)
    of labelled images (the models ran once per view). `seconds` maps (timing_key, views) to
    the measured time of that call on the timed sample; None leaves latency out."""
    classes = log_probs.shape[-1]
    rows = []
    intervals: dict[bytes, tuple[float, float]] = {}  # variants that vote alike (often) share one
    for variant in variants(member_folds, tta):
        members = list(variant.members)
        labels, _ = vote(
            log_probs[members, : variant.tta],
            "arithmetic" if variant.method == "-" else variant.method,
            [weights[m] for m in members],
            temperature if variant.calibrated else 1.0,
        )
        key = np.asarray(labels).tobytes()
        if key not in intervals:
            intervals[key] = f1_interval(targets, labels, classes, seed)
        low, high = intervals[key]
        row = {
            "model": variant.model,
            "method": variant.method,
            "tta": variant.tta,
            "calibrated": {None: "-", False: "no", True: "yes"}[variant.calibrated],
            "f1_macro": float(macro_f1(targets, labels, classes)),
            "f1_low": low,
            "f1_high": high,
            "accuracy": float((labels == targets).mean()),
        }
        if seconds:
            row["latency_x"] = seconds[(variant.timing_key, variant.tta)] / seconds[BASELINE]
        rows.append(row)
    return pd.DataFrame(rows)


def format_comparison(table: pd.DataFrame) -> str:
    """The table as printed by predict: F1 with its interval in one column."""
    shown = pd.DataFrame(
        {
            "model": table["model"],
            "method": table["method"],
            "tta": table["tta"],
            "calibrated": table["calibrated"],
            "macro F1 [95% CI]": [
                f"{r.f1_macro:.4f} [{r.f1_low:.4f}, {r.f1_high:.4f}]" for r in table.itertuples()
            ],
            "accuracy": table["accuracy"].map("{:.4f}".format),
        }
    )
    if "latency_x" in table:
        shown["latency"] = table["latency_x"].map("{:.2f}x".format)
    return shown.to_string(index=False)
