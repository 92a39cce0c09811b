"""Optuna's study plots as matplotlib figures (PNG) and as interactive plotly HTML."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")  # headless: figures go to MLflow, never to a window

import optuna
from matplotlib.figure import Figure
from optuna.trial import TrialState

log = logging.getLogger(__name__)

PLOTS = (
    "optimization_history",
    "param_importances",
    "parallel_coordinate",
    "intermediate_values",
)


def _wanted(study: optuna.Study) -> list[str]:
    complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if complete == 0:
        log.info("no completed trial yet: study plots skipped")
        return []
    if complete < 2:
        log.info("parameter importances need >= 2 completed trials (have %d): skipped", complete)
        return [name for name in PLOTS if name != "param_importances"]
    return list(PLOTS)


def _draw(name: str, make: Callable[[optuna.Study], object], study: optuna.Study):
    # A plot is a by-product of a finished study: never let one fail the job.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", UserWarning)  # flat axes while few trials exist
            return make(study)
    except (ValueError, RuntimeError, TypeError, ZeroDivisionError) as err:
        log.warning("study plot %s skipped: %s", name, err)
        return None


def study_figures(study: optuna.Study) -> dict[str, Figure]:
    """name -> matplotlib Figure (optuna.visualization.matplotlib, experimental)."""
    from optuna.visualization import matplotlib as optuna_mpl

    figures = {}
    for name in _wanted(study):
        axes = _draw(name, getattr(optuna_mpl, f"plot_{name}"), study)
        if axes is not None:
            first = axes.flat[0] if hasattr(axes, "flat") else axes
            figures[name] = first.figure
    return figures


def study_html(study: optuna.Study) -> dict[str, str]:
    """name -> standalone interactive HTML page (plotly.js from its CDN)."""
    pages = {}
    for name in _wanted(study):
        figure = _draw(name, getattr(optuna.visualization, f"plot_{name}"), study)
        if figure is not None:
            pages[name] = figure.to_html(include_plotlyjs="cdn", full_html=True)
    return pages
