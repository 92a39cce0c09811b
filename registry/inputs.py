"""Images to predict: a flat folder, a folder of class sub-folders (labels), or a CSV of paths."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from registry.errors import PredictError
from training.data import read_manifest

log = logging.getLogger(__name__)


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def discover_inputs(
    data: str, path_column: str = "path", label_column: str = "label"
) -> pd.DataFrame:
    """Rows of image_id, path and label (None when unknown).

    A folder with sub-folders is read as one sub-folder per class (files at its top level,
    e.g. a manifest, are ignored); a folder without sub-folders is a flat list of images.
    A CSV needs `path_column` (paths relative to the CSV's folder); `label_column` is used
    when present.
    """
    source = Path(data)
    if source.is_dir():
        return _from_folder(source)
    if source.is_file() and source.suffix.lower() == ".csv":
        return _from_csv(source, path_column, label_column)
    if source.exists():
        raise PredictError(f"parameter 'data': {source} is neither a folder nor a .csv file")
    raise PredictError(f"parameter 'data': {source} does not exist")


def _from_folder(root: Path) -> pd.DataFrame:
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes:
        ignored = _visible_files(root)
        if ignored:
            log.info(
                "class folders found; ignoring %d file(s) at the top of %s", len(ignored), root
            )
        rows = [
            (path.relative_to(root).as_posix(), str(path), folder.name)
            for folder in classes
            for path in sorted(folder.rglob("*"))
            if path.is_file() and not path.name.startswith(".")
        ]
    else:
        rows = [(path.name, str(path), None) for path in _visible_files(root)]
    if not rows:
        raise PredictError(f"parameter 'data': no files in {root}")
    return pd.DataFrame(rows, columns=["image_id", "path", "label"])


def _from_csv(csv: Path, path_column: str, label_column: str) -> pd.DataFrame:
    # The label column is optional here: without it predict computes no metrics.
    table, paths = read_manifest(csv, {"path_column": path_column}, PredictError)
    labels = table[label_column] if label_column in table.columns else None
    if labels is not None and (labels.str.strip() == "").any():
        log.warning(
            "%s: some rows have an empty '%s'; no metrics will be computed", csv, label_column
        )
        labels = None
    return pd.DataFrame(
        {"image_id": table[path_column], "path": paths, "label": labels}, dtype=object
    )
