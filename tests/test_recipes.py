"""Recipes: presets beneath the config file and flags, a recipe per trial, and the pruners."""

from __future__ import annotations

import optuna
import pytest
import yaml

from training.config import ConfigError, TrainConfig, parse_cli
from training.recipes import RECIPES, switch_recipe
from tuning.space import base_trial, load_space, suggest, trial_config
from tuning.study import create_pruner, pruner_options

BASE = ["--model", "test_resnet", "--pretrained", "none"]


def test_a_recipe_sets_defaults_that_the_config_file_and_flags_override(tmp_path):
    modern = parse_cli(TrainConfig, [*BASE, "--recipe", "modern"], "")
    for name, value in RECIPES["modern"].items():
        assert getattr(modern, name) == value, name
    seed = parse_cli(TrainConfig, BASE, "")
    assert seed.recipe == "seed" and seed.layer_decay == 1.0 and seed.ema_decay == 0.0
    # an explicit flag wins, even when equal to the dataclass default
    no_ema = parse_cli(TrainConfig, [*BASE, "--recipe", "modern", "--ema_decay", "0"], "")
    assert no_ema.ema_decay == 0.0 and no_ema.layer_decay == RECIPES["modern"]["layer_decay"]
    # a config file names the recipe; its values win over the preset, flags over both
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"recipe": "modern", "layer_decay": 0.9}))
    filed = parse_cli(TrainConfig, [*BASE, "--config", str(path), "--warmup_epochs", "3"], "")
    assert filed.layer_decay == 0.9 and filed.warmup_epochs == 3
    assert filed.ema_decay == RECIPES["modern"]["ema_decay"]
    with pytest.raises(ConfigError, match="parameter 'recipe'"):
        parse_cli(TrainConfig, [*BASE, "--recipe", "fancy"], "")


def test_switching_recipe_keeps_what_the_user_set():
    seed = TrainConfig(model="test_resnet", pretrained="none", dropout=0.1, ema_decay=0.5)
    modern = switch_recipe(seed, "modern")
    assert modern.recipe == "modern"
    assert modern.layer_decay == RECIPES["modern"]["layer_decay"]  # left at seed's: follows
    assert modern.ema_decay == 0.5 and modern.dropout == 0.1  # set by the user: stays
    back = switch_recipe(modern, "seed")
    assert back.layer_decay == 1.0 and back.ema_decay == 0.5 and back.recipe == "seed"


def test_a_study_can_search_the_recipe_and_its_knobs(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(
        yaml.safe_dump({"recipe": {"choices": ["seed", "modern"]}, "layer_decay": {"low": 0.6}})
    )
    space = load_space(path)
    assert space["recipe"] == {"choices": ["seed", "modern"]}
    assert space["layer_decay"] == {"low": 0.6, "high": 1.0, "log": False}
    base = TrainConfig(model="test_resnet", pretrained="none")
    assert base_trial(space, base) == {
        "stage1_lr": base.stage1_lr,
        "stage2_lr": base.stage2_lr,
        "dropout": base.dropout,
        "class_weight_strength": 1.0,
        "recipe": "seed",
        "layer_decay": 1.0,
    }
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(3))
    values = suggest(study.ask(), space, base)
    assert values["recipe"] in ("seed", "modern") and 0.6 <= values["layer_decay"] <= 1.0
    cfg = trial_config(base, {**values, "recipe": "modern"})
    assert cfg.recipe == "modern" and cfg.ema_decay == RECIPES["modern"]["ema_decay"]
    assert cfg.layer_decay == values["layer_decay"]  # the sampled value, not the preset's
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"recipe": {"choices": ["seed", "fancy"]}}))
    with pytest.raises(ConfigError, match="'recipe' needs choices"):
        load_space(bad)


def test_successive_halving_and_hyperband_start_judging_after_the_warm_up():
    assert pruner_options("successive_halving", 4) == ("successive_halving", {"min_resource": 4})
    name, options = pruner_options("hyperband:reduction_factor=2", 3, 11)
    assert options == {"min_resource": 3, "max_resource": 11, "reduction_factor": 2}
    assert isinstance(create_pruner("hyperband", 3, 11), optuna.pruners.HyperbandPruner)
    sha = create_pruner("successive_halving:reduction_factor=2", 2)
    assert isinstance(sha, optuna.pruners.SuccessiveHalvingPruner)
