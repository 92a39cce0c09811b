"""Which run of a k-fold job's fold counts: its newest FINISHED child run (reads only)."""

from __future__ import annotations

from mlflow.entities import Run

from training.tracking import child_runs


def latest_finished_fold_runs(parent_run_id: str, folds: int | None = None) -> dict[int, Run]:
    """Fold index -> the newest (by start_time) FINISHED child run tagged with that fold, in
    fold order. Runs whose `fold` tag is not an index below `folds` (when given) are ignored.

    The one rule for the k-fold summary and for promotion: a fold re-run that finished (a
    retry, or a duplicate fan-out process) replaces the earlier run of that fold.
    """
    latest: dict[int, Run] = {}
    for run in child_runs(parent_run_id, "attributes.status = 'FINISHED'"):
        tag = run.data.tags.get("fold", "")
        if not tag.isdigit() or (folds is not None and int(tag) >= folds):
            continue
        fold = int(tag)
        # run_id breaks a tie of equal start times (ms resolution) the same way every call.
        if fold not in latest or _newness(run) > _newness(latest[fold]):
            latest[fold] = run
    return dict(sorted(latest.items()))


def _newness(run: Run) -> tuple[int, str]:
    return run.info.start_time or 0, run.info.run_id
