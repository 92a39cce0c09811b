"""Find a k-fold parent run and its finished fold models; rank them by a metric (reads only)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from registry.errors import PromoteError
from training.fold_runs import latest_finished_fold_runs
from training.tracking import configure_tracking, find_runs, resolve_experiment_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoldModel:
    """One finished fold run and the model it logged."""

    fold: int
    run_id: str
    model_uri: str
    metrics: dict[str, float]


def resolve_direction(metric: str, direction: str) -> str:
    """`auto`: lower is better for losses, higher for everything else."""
    if direction == "auto":
        return "min" if "loss" in metric.lower() else "max"
    return direction


def find_kfold_parent(kfold_run_id: str, experiment_name: str) -> Run:
    """The given run, checked to be a k-fold parent; else the newest FINISHED one."""
    configure_tracking()
    client = MlflowClient()
    if kfold_run_id:
        try:
            run = client.get_run(kfold_run_id)
        except MlflowException:
            raise PromoteError(f"parameter 'kfold_run_id': no run {kfold_run_id!r}") from None
        job = run.data.tags.get("job", "")
        if job != "kfold":
            raise PromoteError(
                f"parameter 'kfold_run_id': run {kfold_run_id} is not a k-fold parent run "
                f"(its tag job is {job or 'missing'!r}, expected 'kfold')"
            )
        if run.info.status != "FINISHED":
            log.warning(
                "k-fold run %s is %s; using its finished folds", run.info.run_id, run.info.status
            )
        return run
    experiment_name = resolve_experiment_name(experiment_name)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise PromoteError(f"parameter 'experiment_name': no experiment {experiment_name!r}")
    runs = find_runs(
        [experiment.experiment_id], "tags.job = 'kfold' and attributes.status = 'FINISHED'"
    )
    if not runs:
        raise PromoteError(
            f"experiment {experiment.name!r} has no FINISHED k-fold run (tag job=kfold); "
            "run the kfold job first or give kfold_run_id"
        )
    return runs[0]


def fold_models(parent: Run) -> list[FoldModel]:
    """The fold models of a k-fold job, in fold order: per fold, the run that counts
    (training.fold_runs: its newest FINISHED run), when that run logged a model."""
    folds_tag = parent.data.tags.get("folds", "")
    counted = latest_finished_fold_runs(
        parent.info.run_id, int(folds_tag) if folds_tag.isdigit() else None
    )
    models = []
    for fold, run in counted.items():
        model_uri = run.data.tags.get("model_uri")
        if not model_uri:  # an older run of the fold must not stand in for the newest
            log.warning("fold %d: run %s logged no model; left out", fold, run.info.run_id)
            continue
        models.append(FoldModel(fold, run.info.run_id, model_uri, run.data.metrics))
    return models


def select_top_k(folds: list[FoldModel], metric: str, k: int, direction: str) -> list[FoldModel]:
    """The k best folds by `metric` (`direction` max or min), best first; ties go to the
    lower fold index so the choice is reproducible."""
    if not folds:
        raise PromoteError("the k-fold run has no FINISHED fold runs with a logged model")
    having = [fold for fold in folds if metric in fold.metrics]
    if not having:
        known = sorted({name for fold in folds for name in fold.metrics})
        raise PromoteError(
            f"parameter 'metric': unknown metric {metric!r}; the fold runs have {known}"
        )
    if len(having) < len(folds):
        log.warning("%d fold run(s) lack metric %s", len(folds) - len(having), metric)
    if k > len(having):
        raise PromoteError(
            f"parameter 'top_k': {k} is more than the {len(having)} finished fold run(s) "
            f"with metric {metric!r} (folds {[fold.fold for fold in having]})"
        )
    sign = -1.0 if direction == "max" else 1.0
    ranked = sorted(having, key=lambda fold: (sign * fold.metrics[metric], fold.fold))
    return ranked[:k]
