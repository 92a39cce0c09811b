"""MLproject mirrors every entry point's config dataclass 1:1; run this file to rewrite it."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # when run as a script

from registry.config import (  # noqa: E402
    ExplainConfig,
    OnnxExportConfig,
    PredictConfig,
    PromoteConfig,
)
from training.config import TrainConfig  # noqa: E402
from training.demo_data import DemoDataConfig  # noqa: E402
from training.kfold_job import KFoldConfig  # noqa: E402
from training.mlproject import render  # noqa: E402
from tuning.config import TuneConfig  # noqa: E402

# (entry point, module run by `python -m`, config dataclass), in MLproject order.
ENTRY_POINTS = [
    ("train", "training.train", TrainConfig),
    ("kfold", "training.kfold", KFoldConfig),
    ("demo_data", "training.demo_data", DemoDataConfig),
    ("tune", "tuning.tune", TuneConfig),
    ("promote", "registry.promote", PromoteConfig),
    ("predict", "registry.predict", PredictConfig),
    ("onnx_export", "registry.onnx_export", OnnxExportConfig),
    ("explain", "registry.explain", ExplainConfig),
]


def test_mlproject_is_generated_from_the_dataclasses():
    assert (ROOT / "MLproject").read_text() == render(ENTRY_POINTS), (
        "MLproject is out of date: run `python tests/test_mlproject.py`"
    )


@pytest.mark.parametrize(("name", "module", "config_class"), ENTRY_POINTS)
def test_each_entry_point_mirrors_its_dataclass(name, module, config_class):
    """Read back as MLflow reads it: one parameter and one flag per field, default ''."""
    entry = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"][name]
    fields = [field.name for field in dataclasses.fields(config_class)]
    assert list(entry["parameters"]) == fields
    assert all(spec["default"] == "" for spec in entry["parameters"].values())
    command = entry["command"]
    assert command.startswith(f"python -m {module} ")
    assert command.split(" ")[3:] == [part for f in fields for part in (f"--{f}", f"{{{f}}}")]


if __name__ == "__main__":
    (ROOT / "MLproject").write_text(render(ENTRY_POINTS))
    print(f"wrote {ROOT / 'MLproject'}")
