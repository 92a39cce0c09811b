"""Config validation, YAML precedence, and MLproject / CLI / dataclass agreement."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from conftest import TINY, all_runs

from training import train
from training.config import ConfigError, TrainConfig, parse_cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("flag", "value", "named"),
    [
        ("--stage1_lr", "-0.1", "stage1_lr"),
        ("--stage2-lr", "0", "stage2_lr"),
        ("--model", "no_such_net", "model"),
        ("--optimizer", "adamq", "optimizer"),
        ("--loss", "hinge", "loss"),
        ("--scheduler", "step", "scheduler"),
        ("--dropout", "1.5", "dropout"),
        ("--val_fraction", "1", "val_fraction"),
        ("--class_weights", "1,x", "class_weights"),
        ("--augment", "mixup", "augment"),
        ("--pretrained", "weights.txt", "pretrained"),
    ],
)
def test_invalid_values_name_the_parameter_and_create_no_run(
    tracking, digits_dir, capsys, flag, value, named
):
    code = train.main(["--data", str(digits_dir), "--experiment_name", "tests", flag, value])
    assert code == 2
    assert f"'{named}'" in capsys.readouterr().err
    assert all_runs().empty


def test_class_weight_list_of_wrong_length_fails_before_a_run(tracking, digits_dir, capsys):
    argv = [
        "--data",
        str(digits_dir),
        "--experiment_name",
        "tests",
        "--model",
        "test_resnet",
        "--pretrained",
        "none",
        "--class_weights",
        "1.0,2.0",
    ]
    assert train.main(argv) == 2
    assert "'class_weights': 2 weights given for 4 classes" in capsys.readouterr().err
    assert all_runs().empty


def test_explicit_flags_beat_the_yaml_file_even_when_equal_to_the_default(tmp_path):
    config = tmp_path / "best.yaml"
    config.write_text(yaml.safe_dump({"stage1_lr": 0.005, "dropout": 0.1, "model": "test_resnet"}))
    # --dropout 0.3 is the dataclass default, and it was asked for: it wins over the file.
    cfg = parse_cli(
        TrainConfig, ["--config", str(config), "--dropout", "0.3", "--stage2_lr", "0.01"], ""
    )
    assert (cfg.stage1_lr, cfg.dropout, cfg.model, cfg.stage2_lr) == (
        0.005,
        0.3,
        "test_resnet",
        0.01,
    )


def test_an_empty_flag_is_not_given_so_the_file_or_default_applies(tmp_path):
    """`mlflow run` passes '' for every MLproject parameter the user did not set."""
    config = tmp_path / "best.yaml"
    config.write_text(yaml.safe_dump({"dropout": 0.1, "balanced_sampling": True}))
    argv = ["--config", str(config), "--dropout", "", "--balanced_sampling", "", "--seed", ""]
    cfg = parse_cli(TrainConfig, argv, "")
    assert (cfg.dropout, cfg.balanced_sampling, cfg.seed) == (0.1, True, 42)
    assert parse_cli(TrainConfig, ["--config", ""], "") == TrainConfig()


def test_yaml_config_with_unknown_key_is_an_error(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown keys \\['learning_rate'\\]"):
        parse_cli(TrainConfig, ["--config", str(config)], "")


def test_config_is_frozen():
    cfg = TrainConfig(**TINY)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dropout = 0.5


def _mlproject() -> dict:
    return yaml.safe_load((ROOT / "MLproject").read_text())
