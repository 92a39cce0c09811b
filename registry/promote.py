"""`promote` entry point: register the top-k fold models of a k-fold run and their ensemble."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import Run
from mlflow.models.model import ModelInfo
from PIL import Image

import registry
import training
from registry import store
from registry.calibrate import OofCalibration, calibrate, oof_predictions
from registry.config import PromoteConfig
from registry.ensemble import MemberSpec, ensemble_config, ensemble_signature
from registry.errors import PromoteError
from registry.selection import (
    FoldModel,
    find_kfold_parent,
    fold_models,
    resolve_direction,
    select_top_k,
)
from registry.voting import metric_weights
from training import plots
from training.cli import run_entry_point
from training.config import config_to_dict
from training.run_results import pip_requirements
from training.tracking import RunTracker


def _digest(run_ids: list[str]) -> str:
    return hashlib.sha256(",".join(sorted(run_ids)).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class PromotionPlan:
    """Everything decided before anything is written; building it raises PromoteError."""

    cfg: PromoteConfig
    parent: Run
    experiment_name: str
    direction: str
    selected: list[FoldModel]
    weights: list[float]
    class_names: list[str]
    calibration: OofCalibration

    @property
    def kfold_run_id(self) -> str:
        return self.parent.info.run_id

    @property
    def kfold_run_name(self) -> str:
        return self.parent.info.run_name or self.kfold_run_id

    @property
    def member_run_ids(self) -> list[str]:
        """The chosen fold runs, best first (the order of the members)."""
        return [fold.run_id for fold in self.selected]

    @property
    def key(self) -> str:
        """Identifies one promotion: the same key twice reuses the registered version. It
        names the chosen fold runs (a digest; the ids are in the version's member_run_ids
        tag), so a job whose folds finished or were re-run since gets a new ensemble, and
        the fold runs whose out-of-fold predictions gave its temperature and figures (all
        the finished folds, members or not: another fold finishing changes them too)."""
        cfg = self.cfg
        runs = _digest(self.member_run_ids)
        oof = _digest(self.calibration.run_ids)
        return (
            f"{self.kfold_run_id}/top{cfg.top_k}/{cfg.metric}/{self.direction}"
            f"/{cfg.method}/tta{cfg.tta}/runs-{runs}/oof-{oof}"
        )

    def describe(self) -> str:
        """The ensemble version's one-line description."""
        cfg, cal = self.cfg, self.calibration
        figures = cal.figures
        folds = ", ".join(str(fold.fold) for fold in self.selected)
        return (
            f"Folds {folds} (top {len(self.selected)} by {cfg.metric}) of k-fold run "
            f"'{self.kfold_run_name}' ({self.kfold_run_id}); {cfg.method} voting, {cfg.tta} "
            f"TTA view(s). Out-of-fold macro F1 {figures['oof_f1_macro']:.4f}, accuracy "
            f"{figures['oof_accuracy']:.4f} ({cal.images} images of folds "
            f"{', '.join(map(str, cal.folds))}, each scored by the fold model that did not "
            f"train on it); temperature {cal.temperature:.3f} (out-of-fold ECE "
            f"{figures['oof_ece_uncalibrated']:.3f} -> {figures['oof_ece_calibrated']:.3f})."
        )


@dataclass(frozen=True)
class PromoteOutcome:
    model_name: str
    version: str
    alias: str
    member_versions: list[str]
    reused: bool
    run_id: str
    plan: PromotionPlan

    @property
    def model_uri(self) -> str:
        return f"models:/{self.model_name}@{self.alias}"


def plan_promotion(cfg: PromoteConfig) -> PromotionPlan:
    """Find the k-fold run, pick its top-k folds and check their models agree on classes."""
    parent = find_kfold_parent(cfg.kfold_run_id, cfg.experiment_name)
    direction = resolve_direction(cfg.metric, cfg.direction)
    selected = select_top_k(fold_models(parent), cfg.metric, cfg.top_k, direction)
    class_names = None
    for fold in selected:
        names = (mlflow.models.get_model_info(fold.model_uri).metadata or {}).get("class_names")
        if class_names is not None and names != class_names:
            raise PromoteError(
                f"fold {fold.fold} (run {fold.run_id}) has classes {names}, "
                f"other folds {class_names}; the members of an ensemble must agree"
            )
        class_names = names
    if not class_names:
        raise PromoteError(f"fold model {selected[0].model_uri} has no class_names metadata")
    weights = metric_weights([fold.metrics[cfg.metric] for fold in selected], direction)
    experiment = mlflow.MlflowClient().get_experiment(parent.info.experiment_id)
    oof, oof_run_ids = oof_predictions(parent, class_names)
    calibration = calibrate(oof, class_names, oof_run_ids)
    return PromotionPlan(
        cfg,
        parent,
        experiment.name,
        direction,
        selected,
        weights.tolist(),
        class_names,
        calibration,
    )


def register_members(plan: PromotionPlan) -> list[MemberSpec]:
    """One version of <model_name>-members per fold run, reused when it already exists."""
    cfg = plan.cfg
    name = cfg.members_model_name
    store.ensure_registered_model(
        name,
        f"Fold models of k-fold runs, the members of the ensembles in '{cfg.model_name}'. "
        "One version per fold run; tags: fold, source_run_id, kfold_run_id.",
        {"role": "ensemble-members", "ensemble_model": cfg.model_name},
    )
    members = []
    for rank, (fold, weight) in enumerate(zip(plan.selected, plan.weights, strict=True)):
        selection = {
            "metric": cfg.metric,
            "metric_value": fold.metrics[cfg.metric],
            "direction": plan.direction,
        }
        existing = store.find_version(name, {"source_run_id": fold.run_id})
        if existing is None:
            tags = {
                "fold": fold.fold,
                "source_run_id": fold.run_id,
                "kfold_run_id": plan.kfold_run_id,
                **selection,
            }
            member_version = store.register_version(fold.model_uri, name, tags).version
        else:  # the latest selection it took part in
            member_version = existing.version
            store.set_version_tags(name, member_version, selection)
        # Version numbers count registrations, not folds: the description says which fold.
        store.set_version_description(
            name,
            member_version,
            f"fold {fold.fold} of k-fold run '{plan.kfold_run_name}' ({plan.kfold_run_id}); "
            f"fold run {fold.run_id}, {cfg.metric} {fold.metrics[cfg.metric]:.4f}",
        )
        members.append(
            MemberSpec(
                key=f"member_{rank}",
                fold=fold.fold,
                run_id=fold.run_id,
                model_uri=f"models:/{name}/{member_version}",
                metric=cfg.metric,
                metric_value=fold.metrics[cfg.metric],
                weight=weight,
            )
        )
    return members


def example_request() -> pd.DataFrame:
    """A real (blank) PNG as the input example: MLflow runs the ensemble on it while logging,
    so a model that cannot predict never gets registered, and the UI shows the format."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    return pd.DataFrame({"image": [base64.b64encode(buffer.getvalue()).decode("ascii")]})


def log_ensemble(tracker: RunTracker, plan: PromotionPlan, members: list[MemberSpec]) -> ModelInfo:
    """Log the pyfunc (as code) with the members copied in: its artifacts are the members'
    models:/ URIs, so the logged model is self-contained. Returns its ModelInfo."""
    cfg = plan.cfg
    package = Path(registry.__file__).parent
    config = ensemble_config(
        members, plan.class_names, cfg.method, cfg.tta, plan.calibration.temperature
    )
    info = tracker.log_pyfunc_model(
        "ensemble",
        str(package / "ensemble_code.py"),
        model_config=config,
        artifacts={member.key: member.model_uri for member in members},
        signature=ensemble_signature(plan.class_names, cfg.method, cfg.tta),
        input_example=example_request(),
        code_paths=[str(package), str(Path(training.__file__).parent)],
        pip_requirements=pip_requirements(),
        metadata={
            **config,
            "kfold_run_id": plan.kfold_run_id,
            "metric": cfg.metric,
            "direction": plan.direction,
            "temperature_fitted_on": f"out-of-fold predictions of folds {plan.calibration.folds}",
        },
    )
    return info


def log_calibration(tracker: RunTracker, calibration: OofCalibration) -> None:
    """The temperature's evidence on the promote run: its JSON and reliability diagrams of
    the out-of-fold predictions before and after it."""
    figures = calibration.figures
    tracker.log_dict(
        {
            "temperature": calibration.temperature,
            "folds": calibration.folds,
            "images": calibration.images,
            **figures,
            "reliability_uncalibrated": calibration.bins_uncalibrated,
            "reliability_calibrated": calibration.bins_calibrated,
        },
        "calibration/temperature.json",
    )
    for name, bins in (
        ("uncalibrated", calibration.bins_uncalibrated),
        ("calibrated", calibration.bins_calibrated),
    ):
        title = f"out-of-fold, {name}" + (
            f" (T = {calibration.temperature:.3f})" if name == "calibrated" else ""
        )
        figure = plots.reliability_diagram(bins, figures[f"oof_ece_{name}"], title)
        tracker.log_figure(figure, f"calibration/oof_reliability_{name}.png")


def promote(cfg: PromoteConfig) -> PromoteOutcome:
    """Plan (no writes), then inside a job=promote run: members, calibration, ensemble (with
    its out-of-fold figures as LoggedModel metrics), descriptions, aliases."""
    plan = plan_promotion(cfg)
    tags = {"job": "promote", "kfold_run_id": plan.kfold_run_id}
    params = config_to_dict(cfg)
    with RunTracker(
        plan.experiment_name, cfg.run_name or f"promote top-{cfg.top_k}", tags=tags, params=params
    ) as tracker:
        # New names: `mlflow run` already logged the given kfold_run_id and direction.
        tracker.log_params(
            {"resolved_kfold_run_id": plan.kfold_run_id, "resolved_direction": plan.direction}
        )
        members = register_members(plan)
        tracker.log_dict([asdict(member) for member in members], "promotion/members.json")
        log_calibration(tracker, plan.calibration)
        ensemble_version, reused = register_ensemble(tracker, plan, members)
        store.set_version_description(cfg.model_name, ensemble_version, plan.describe())
        store.set_alias(cfg.model_name, cfg.alias, ensemble_version)
        store.point_fold_aliases(
            cfg.members_model_name, cfg.alias, {m.fold: _version_of(m) for m in members}
        )
        tracker.set_tags(
            {
                "registered_model": cfg.model_name,
                "model_version": ensemble_version,
                "alias": cfg.alias,
                "reused_version": reused,
            }
        )
        tracker.set_description(
            f"{cfg.model_name} version {ensemble_version} ({cfg.alias}"
            f"{', reused' if reused else ''}): {plan.describe()}"
        )
    return PromoteOutcome(
        cfg.model_name,
        ensemble_version,
        cfg.alias,
        [_version_of(m) for m in members],
        reused,
        tracker.run_id,
        plan,
    )


def _version_of(member: MemberSpec) -> str:
    return member.model_uri.rsplit("/", 1)[1]


def register_ensemble(
    tracker: RunTracker, plan: PromotionPlan, members: list[MemberSpec]
) -> tuple[str, bool]:
    """The ensemble's version: found by its promotion key, else logged and registered with
    the out-of-fold figures and temperature as metrics of its LoggedModel (what the version
    page shows). Returns (version, reused)."""
    cfg = plan.cfg
    store.ensure_registered_model(
        cfg.model_name,
        "Ensembles of k-fold models (pyfunc: base64 images in, label + probabilities out).",
        {"role": "ensemble"},
    )
    existing = store.find_version(cfg.model_name, {"promotion_key": plan.key})
    if existing is not None:
        tracker.log_metrics(plan.calibration.metrics)
        return str(existing.version), True
    version_tags = {
        "promotion_key": plan.key,
        "kfold_run_id": plan.kfold_run_id,
        "kfold_run_name": plan.kfold_run_name,
        "top_k": cfg.top_k,
        "metric": cfg.metric,
        "direction": plan.direction,
        "method": cfg.method,
        "tta": cfg.tta,
        "temperature": f"{plan.calibration.temperature:.6g}",
        "oof_folds": ",".join(str(fold) for fold in plan.calibration.folds),
        "folds": ",".join(str(member.fold) for member in members),
        "member_run_ids": ",".join(member.run_id for member in members),
        "member_versions": ",".join(_version_of(m) for m in members),
        "promote_run_id": tracker.run_id,
    }
    info = log_ensemble(tracker, plan, members)
    tracker.log_metrics(plan.calibration.metrics, model_id=info.model_id)
    tracker.set_model_description(info.model_id, plan.describe())  # its page: metrics + this
    version = store.register_version(info.model_uri, cfg.model_name, version_tags)
    return str(version.version), False


def report(outcome) -> None:
    plan = outcome.plan
    cal = plan.calibration
    folds = [
        f"fold {fold.fold} ({plan.cfg.metric}={fold.metrics[plan.cfg.metric]:.4f})"
        for fold in plan.selected
    ]
    state = "already registered, reused" if outcome.reused else "registered"
    print(
        f"k-fold run {plan.kfold_run_id}: top {len(folds)} by {plan.cfg.metric} "
        f"({plan.direction}): {', '.join(folds)}\n"
        f"ensemble {outcome.model_name} version {outcome.version} ({state}), "
        f"members {plan.cfg.members_model_name} versions {outcome.member_versions} "
        f"(aliases {outcome.alias}-fold-<n>)\n"
        f"temperature {cal.temperature:.3f} on {cal.images} out-of-fold predictions: ECE "
        f"{cal.figures['oof_ece_uncalibrated']:.4f} -> {cal.figures['oof_ece_calibrated']:.4f}, "
        f"NLL {cal.figures['oof_nll_uncalibrated']:.4f} -> "
        f"{cal.figures['oof_nll_calibrated']:.4f}; out-of-fold macro F1 "
        f"{cal.figures['oof_f1_macro']:.4f}\n"
        f"model: {outcome.model_uri}"
    )


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # copies are local
    return run_entry_point(PromoteConfig, argv, __doc__, promote, report, (PromoteError,))


if __name__ == "__main__":
    sys.exit(main())
