"""The Optuna objective: one `train` run per trial (or one per fold), nested under the study run."""

from __future__ import annotations

import dataclasses
import logging

import optuna
import pandas as pd

from training.config import TrainConfig, config_to_dict, config_to_yaml, train_config_from
from training.data import LabelledImages
from training.fit import DivergedError
from training.honest_estimate import honest_fold_scores, running_fold_score
from training.names import trial_run_name
from training.pipeline import execute, plan_training
from training.splits import assign_folds, holdout_split
from training.tracking import RunTracker, set_run_tags
from tuning.config import TuneConfig
from tuning.space import SearchSpace, suggest, trial_config
from tuning.study import retried_trial_number

log = logging.getLogger(__name__)

METRIC = "val_f1_macro"  # reported for pruning and returned as the value: one scale for both


class Objective:
    """Callable objective over data decoded once per process and a split decided once, so
    every trial sees the same images and the same validation rows."""

    def __init__(self, cfg: TuneConfig, space: SearchSpace, data: LabelledImages) -> None:
        self.base = dataclasses.replace(train_config_from(cfg), config="", run_name="")
        self.space = space
        self.data = data
        self.cv = cfg.cv
        self.figures = cfg.trial_plots
        self.study_name = cfg.study_name
        self.parent_run_id: str | None = None
        self.worker_key = ""  # a Ray tuning worker's key, kept on its trials (user attr)
        self.trial_numbers: list[int] = []  # trials of this process (list.append is atomic)
        if self.cv:
            self.fold_of = assign_folds(data.labels, data.split_groups, self.cv, cfg.seed)
        else:
            self.val_mask = holdout_split(
                data.label_names, data.split_groups, cfg.val_fraction, cfg.seed
            )

    def preflight(self) -> None:
        """Plan once with the base config: weights and class-weight errors surface before any
        run exists."""
        plan_training(self.base, self.data, self.val_mask if not self.cv else self.fold_of == 0)

    def __call__(self, trial: optuna.Trial) -> float:
        self.trial_numbers.append(trial.number)
        if self.worker_key:
            trial.set_user_attr("tune_worker", self.worker_key)
        values = suggest(trial, self.space, self.base)
        cfg = trial_config(self.base, values, run_name=trial_run_name(trial.number))
        tracker = RunTracker(
            cfg.experiment_name,
            run_name=cfg.run_name,
            parent_run_id=self.parent_run_id,
            tags=self._tags(trial),
            finish_on=(optuna.TrialPruned,),
        )
        state = "FAIL"
        try:
            run_trial = self._cross_validate if self.cv else self._holdout
            value = run_trial(trial, cfg, tracker)
            state = "COMPLETE"
            return value
        except optuna.TrialPruned:
            state = "PRUNED"
            raise
        finally:
            if tracker.run_id:  # tagged after the run ended: its final word on the trial
                set_run_tags(tracker.run_id, {"trial_state": state})

    def _tags(self, trial: optuna.Trial, **extra: object) -> dict[str, str]:
        origin = trial.user_attrs.get("origin", "sampled")  # "base config" when enqueued
        retried = retried_trial_number(trial)  # a dead worker's trial, run again
        if retried is not None:
            origin = f"retry of trial {retried}"
            extra = {"retry_of_trial": retried, **extra}
        return {
            "optuna_study": self.study_name,
            "trial_number": str(trial.number),
            "trial_origin": origin,
            **{key: str(value) for key, value in extra.items()},
        }

    def _holdout(self, trial: optuna.Trial, cfg: TrainConfig, tracker: RunTracker) -> float:
        plan = plan_training(cfg, self.data, self.val_mask)
        with tracker:
            trial.set_user_attr("mlflow_run_id", tracker.run_id)
            last_step = cfg.stage1_epochs + cfg.stage2_epochs - 1
            outcome = _execute(plan, tracker, self.figures, _pruning_callback(trial, last_step))
            value = outcome.best[METRIC]
            tracker.log_metrics({"trial_value": value})
        return value

    def _cross_validate(self, trial: optuna.Trial, cfg: TrainConfig, tracker: RunTracker) -> float:
        """One run per fold nested under the trial's run. The value is the honest estimate
        (training.honest_estimate: each fold read at the step the other folds choose), so a
        recipe is not rewarded for a lucky epoch on a small fold; after each fold the pruner
        sees that fold's score read at the step the folds before it choose."""
        histories = []
        with tracker:
            trial.set_user_attr("mlflow_run_id", tracker.run_id)
            tracker.log_params({**config_to_dict(cfg), "cv": self.cv})
            tracker.set_tags({"job": "tune-trial-cv"})
            tracker.log_text(config_to_yaml(cfg), "config.yaml")
            for fold in range(self.cv):
                fold_cfg = dataclasses.replace(cfg, run_name=trial_run_name(trial.number, fold))
                plan = plan_training(fold_cfg, self.data, self.fold_of == fold)
                with RunTracker(
                    cfg.experiment_name,
                    run_name=fold_cfg.run_name,
                    parent_run_id=tracker.run_id,
                    tags=self._tags(trial, fold=fold),
                    finish_on=(optuna.TrialPruned,),
                ) as fold_run:
                    outcome = _execute(plan, fold_run, self.figures)
                histories.append(pd.DataFrame(outcome.history))
                score = running_fold_score(
                    histories, cfg.monitor, cfg.monitor_mode, cfg.keep, scored=METRIC
                )
                tracker.log_metrics({f"cv/{METRIC}": score}, step=fold)  # a curve over folds
                trial.report(score, fold)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after fold {fold}")
            # The k-fold job's estimate: steps chosen by `monitor`, macro F1 read there.
            scores = honest_fold_scores(
                dict(enumerate(histories)), cfg.monitor, cfg.monitor_mode, cfg.keep
            )
            values = scores[f"honest_{METRIC}"]
            value = float(values.mean())
            tracker.log_table(scores, "cv/honest_scores.json")
            spread = float(values.std(ddof=0))
            tracker.log_metrics({"trial_value": value, f"cv_std_{METRIC}": spread})
        return value


def _execute(plan, tracker: RunTracker, figures: bool, on_epoch=None):
    """Fit through the `train` pipeline; a diverged fit is pruned (the run says why), so the
    study goes on and the sampler still learns from the trial."""
    try:
        return execute(plan, tracker, on_epoch=on_epoch, progress=False, figures=figures)
    except DivergedError as err:
        tracker.set_tags({"diverged": str(err)})
        raise optuna.TrialPruned(f"diverged: {err}") from err


def _pruning_callback(trial: optuna.Trial, last_step: int):
    """Report every epoch; never prune after the last one, where stopping saves nothing and
    would only file a finished trial as pruned."""

    def report(record: dict[str, float]) -> None:
        step = int(record["step"])
        trial.report(record[METRIC], step)
        if step < last_step and trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}")

    return report
