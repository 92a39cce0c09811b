"""Registry configs: MLproject / CLI / dataclass agreement, bad values, top-k selection rules."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from registry import predict, promote
from registry.config import ExplainConfig, OnnxExportConfig, PredictConfig, PromoteConfig
from registry.errors import PromoteError
from registry.selection import FoldModel, resolve_direction, select_top_k
from training.config import ConfigError, parse_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("cls", "argv", "named"),
    [
        (PromoteConfig, ["--top_k", "0"], "top_k"),
        (PromoteConfig, ["--direction", "up"], "direction"),
        (PromoteConfig, ["--method", "median"], "method"),
        (PromoteConfig, ["--tta", "0"], "tta"),
        (PromoteConfig, ["--alias", "latest"], "alias"),
        (PromoteConfig, ["--alias", "v2"], "alias"),
        (PromoteConfig, ["--model_name", "a/b"], "model_name"),
        (PredictConfig, ["--format", "xlsx"], "format"),
        (PredictConfig, ["--method", "soft"], "method"),
        (PredictConfig, ["--batch_size", "0"], "batch_size"),
        (PredictConfig, ["--tta", "17"], "tta"),
        (OnnxExportConfig, ["--opset", "9"], "opset"),
    ],
)
def test_bad_values_name_the_parameter(cls, argv, named):
    with pytest.raises(ConfigError, match=f"parameter '{named}'"):
        parse_cli(cls, argv, "")


@pytest.mark.parametrize("main", [promote.main, predict.main])
def test_bad_value_exits_2_with_error_line(tracking, capsys, main):
    assert main(["--method", "median"]) == 2
    assert capsys.readouterr().err.startswith("error: parameter 'method'")


def test_yaml_config_feeds_promote(tmp_path):
    config = tmp_path / "promote.yaml"
    config.write_text(yaml.safe_dump({"top_k": 2, "metric": "best_val_loss"}))
    cfg = parse_cli(PromoteConfig, ["--config", str(config), "--top_k", "3"], "")
    assert (cfg.top_k, cfg.metric) == (3, "best_val_loss")  # the flag wins, default or not


def _folds(values: list[float], metric: str = "m") -> list[FoldModel]:
    return [FoldModel(i, f"run{i}", f"models:/m-{i}", {metric: v}) for i, v in enumerate(values)]


def test_top_k_by_direction_with_reproducible_ties():
    folds = _folds([0.7, 0.9, 0.7, 0.8])
    assert [f.fold for f in select_top_k(folds, "m", 3, "max")] == [1, 3, 0]
    assert [f.fold for f in select_top_k(folds, "m", 3, "min")] == [0, 2, 3]


def test_direction_auto_is_min_for_losses():
    assert resolve_direction("best_val_loss", "auto") == "min"
    assert resolve_direction("best_val_f1_macro", "auto") == "max"
    assert resolve_direction("best_val_loss", "max") == "max"


def test_selection_errors_are_clear():
    with pytest.raises(PromoteError, match=r"'top_k': 5 is more than the 4 finished"):
        select_top_k(_folds([0.1, 0.2, 0.3, 0.4]), "m", 5, "max")
    with pytest.raises(PromoteError, match=r"unknown metric 'f2'; the fold runs have \['m'\]"):
        select_top_k(_folds([0.1, 0.2]), "f2", 1, "max")


def test_predict_input_errors_exit_2_before_loading_a_model(tracking, digits_dir, capsys):
    bad_csv = digits_dir.parent / "no_path_column.csv"
    bad_csv.write_text("file,label\na.png,1\n")
    cases = [
        (["--data", str(digits_dir / "missing")], "parameter 'data':"),
        (["--data", str(bad_csv)], "column 'path' (parameter 'path_column') not found"),
        (["--data", str(digits_dir), "--model_name", "nope"], "parameter 'model_uri': cannot load"),
    ]
    for argv, message in cases:
        assert predict.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, err


@pytest.mark.parametrize("cls", [PromoteConfig, PredictConfig, ExplainConfig, OnnxExportConfig])
def test_the_mlproject_command_line_with_nothing_given_is_valid(cls):
    """`mlflow run -e <entry>` passes every parameter as '' (not given): the defaults apply
    ('' experiment_name = the experiment of `mlflow run --experiment-name`)."""
    names = [f.name for f in dataclasses.fields(cls)]
    cfg = parse_cli(cls, [arg for name in names for arg in (f"--{name}", "")], "")
    assert cfg == cls()
