"""Readable run and model names made from a job's settings (`kfold demo/train resnet18`)."""

from __future__ import annotations

from pathlib import Path

GENERIC_FOLDERS = {"train", "training", "val", "valid", "test", "images", "data", "dataset"}


def data_label(source: str) -> str:
    """A short name for a data source: the folder or CSV name, with its parent when the name
    alone says little (data/demo/train -> demo/train)."""
    path = Path(str(source).rstrip("/"))
    name = path.stem if path.suffix.lower() == ".csv" else path.name
    if name.lower() in GENERIC_FOLDERS and path.parent.name:
        return f"{path.parent.name}/{name}"
    return name or str(source)


def job_run_name(job: str, data: str, model: str = "") -> str:
    """The top run of a job: `<job> <data> <model>`."""
    return " ".join(part for part in (job, data_label(data), model) if part)


def fold_run_name(fold: int) -> str:
    return f"fold {fold}"


def trial_run_name(trial: int, fold: int | None = None) -> str:
    return f"trial {trial}" if fold is None else f"trial {trial} fold {fold}"


def model_name_for(run_name: str) -> str:
    """A LoggedModel name from a run name (`fold 3` -> `fold-3`)."""
    return "-".join(run_name.replace("/", " ").split()) or "model"
