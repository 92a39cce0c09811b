"""`train` entry point: one two-stage transfer-learning run, tracked in MLflow."""

from __future__ import annotations

import sys

from training.cli import run_entry_point
from training.config import TrainConfig, config_to_dict
from training.job_data import load_job_data
from training.names import job_run_name
from training.pipeline import TrainOutcome, execute, plan_training
from training.splits import holdout_split
from training.tracking import RunTracker


def run(cfg: TrainConfig, progress: bool = True) -> TrainOutcome:
    """Validate everything, then create the run and train; bad input fails before the run."""
    data = load_job_data(cfg)
    val_mask = holdout_split(data.label_names, data.split_groups, cfg.val_fraction, cfg.seed)
    plan = plan_training(cfg, data, val_mask)
    params = config_to_dict(cfg)
    name = cfg.run_name or job_run_name("train", cfg.data, cfg.model)
    with RunTracker(cfg.experiment_name, name, params=params) as tracker:
        return execute(plan, tracker, progress=progress)


def report(outcome: TrainOutcome) -> None:
    best = outcome.best
    print(
        f"run {outcome.run_id}: best val macro F1 {best['val_f1_macro']:.4f}, "
        f"accuracy {best['val_accuracy']:.4f}\nmodel: {outcome.model_uri}"
    )


def main(argv: list[str] | None = None) -> int:
    return run_entry_point(TrainConfig, argv, __doc__, run, report)


if __name__ == "__main__":
    sys.exit(main())
