"""`kfold` entry point: group-aware k-fold training as nested MLflow runs; resumable, fans out
(hand-launched fold processes or Ray tasks). Only the CLI: the job is training/kfold_*.py."""

from __future__ import annotations

import sys

from training.cli import run_entry_point
from training.kfold_job import KFoldConfig, KFoldError, KFoldOutcome
from training.kfold_pipeline import run_kfold


def report(outcome: KFoldOutcome) -> None:
    if not outcome.summary:
        print(
            f"k-fold job {outcome.parent_run_id}: {len(outcome.fold_run_ids)} fold(s) finished"
            + (f" ({outcome.note})" if outcome.note else "")
        )
        return
    s = outcome.summary
    print(
        f"k-fold job {outcome.parent_run_id}: honest macro F1 {s['honest_val_f1_macro']:.4f} "
        f"± {s['honest_std_val_f1_macro']:.4f} (accuracy {s['honest_val_accuracy']:.4f}; "
        "each fold read at the epoch chosen on the other folds: quote this one)\n"
        f"  kept weights out-of-fold macro F1 {s['oof_f1_macro']:.4f}, accuracy "
        f"{s['oof_accuracy']:.4f}; best epoch per fold (chosen on the fold, optimistic) "
        f"{s['mean_val_f1_macro']:.4f} ± {s['std_val_f1_macro']:.4f}"
    )


def main(argv: list[str] | None = None) -> int:
    return run_entry_point(KFoldConfig, argv, __doc__, run_kfold, report, (KFoldError,))


if __name__ == "__main__":
    sys.exit(main())
