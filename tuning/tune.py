"""`tune` entry point: an Optuna study over `train`, one MLflow parent run per invocation,
trials in this process or in Ray worker tasks. Only the CLI: the job is tuning/job.py."""

from __future__ import annotations

import sys

from training.cli import run_entry_point
from tuning.config import TuneConfig
from tuning.job import run


def report(summary) -> None:
    states = ", ".join(f"{n} {s.lower()}" for s, n in summary.states.items() if n)
    print(f"study {summary.study_name}: {states}; parent run {summary.parent_run_id}")
    if summary.best_value is None:
        print("no completed trial yet: run again to add trials")
    else:
        print(
            f"best value {summary.best_value:.4f} (trial {summary.best_trial}): "
            f"{summary.best_params}\nbest config: {summary.best_config_path}"
        )
        if summary.base_value is not None:
            gain = summary.best_value - summary.base_value
            print(f"the base config scored {summary.base_value:.4f}; the best is {gain:+.4f}")


def main(argv: list[str] | None = None) -> int:
    return run_entry_point(TuneConfig, argv, __doc__, run, report)


if __name__ == "__main__":
    sys.exit(main())
