"""The search space: default ranges, YAML overrides, and the one function that suggests."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import optuna
import yaml

from training.config import ConfigError, TrainConfig
from training.recipes import RECIPES, switch_recipe

# name -> keyword arguments of trial.suggest_float; every name is a TrainConfig field.
DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "stage1_lr": {"low": 1e-4, "high": 1e-2, "log": True},  # head only: large steps are fine
    "stage2_lr": {"low": 1e-5, "high": 1e-3, "log": True},  # unfrozen backbone: small steps
    "dropout": {"low": 0.0, "high": 0.5, "log": False},
    # 0 = uniform class weights, 1 = inverse frequency: one number for 2 or 18 classes alike.
    "class_weight_strength": {"low": 0.0, "high": 1.0, "log": False},
}

# Searched only when a search-space file names them: the recipe and its main knobs.
OPTIONAL_SPACE: dict[str, dict[str, Any]] = {
    "recipe": {"choices": list(RECIPES)},  # a trial's recipe: the preset of fields left at it
    "layer_decay": {"low": 0.5, "high": 1.0, "log": False},
    "ema_decay": {"low": 0.0, "high": 0.995, "log": False},
    "mixup": {"low": 0.0, "high": 0.4, "log": False},
    "cutmix": {"low": 0.0, "high": 1.0, "log": False},
    "label_smoothing": {"low": 0.0, "high": 0.2, "log": False},
    "weight_decay": {"low": 1e-5, "high": 0.1, "log": True},
}

# What TrainConfig accepts for each tuned field: (lowest, highest, highest is exclusive).
LIMITS = {
    "stage1_lr": (0.0, math.inf, False),
    "stage2_lr": (0.0, math.inf, False),
    "dropout": (0.0, 1.0, True),
    "class_weight_strength": (0.0, 1.0, False),
    "layer_decay": (0.0, 1.0, False),
    "ema_decay": (0.0, 1.0, True),
    "mixup": (0.0, math.inf, False),
    "cutmix": (0.0, math.inf, False),
    "label_smoothing": (0.0, 1.0, True),
    "weight_decay": (0.0, math.inf, False),
}

SearchSpace = dict[str, dict[str, Any]]


def _fail(path: str | Path, message: str) -> ConfigError:
    return ConfigError(f"parameter 'search_space': {path}: {message}")


def load_space(path: str | Path = "") -> SearchSpace:
    """The default ranges updated from a YAML file of `name: {low, high, log}` entries (a
    partial entry keeps the other bounds; a plain number fixes the value). The file may add
    the recipe (`recipe: {choices: [seed, modern]}`) and its knobs (OPTIONAL_SPACE)."""
    space = {name: dict(bounds) for name, bounds in DEFAULT_SPACE.items()}
    if not path:
        return space
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "file not found")
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise _fail(path, f"not valid YAML ({err})") from None
    if not isinstance(loaded, dict):
        raise _fail(path, "must hold a mapping of parameter: {low, high, log}")
    unknown = sorted(set(loaded) - set(space) - set(OPTIONAL_SPACE))
    if unknown:
        raise _fail(path, f"unknown keys {unknown}; tunable: {sorted({*space, *OPTIONAL_SPACE})}")
    for name, entry in loaded.items():
        if name not in space:
            space[name] = dict(OPTIONAL_SPACE[name])
        if name == "recipe":
            space[name] = _choices(path, name, entry)
            continue
        if isinstance(entry, int | float) and not isinstance(entry, bool):
            entry = {"low": entry, "high": entry}
        if not isinstance(entry, dict) or set(entry) - {"low", "high", "log"}:
            raise _fail(path, f"'{name}' must be a number or a mapping of low, high, log")
        space[name].update(entry)
        _check_bounds(path, name, space[name])
    return space


def _choices(path: str | Path, name: str, entry: Any) -> dict[str, list[str]]:
    choices = entry.get("choices") if isinstance(entry, dict) else [entry]
    if not isinstance(choices, list) or not choices or set(choices) - set(RECIPES):
        raise _fail(path, f"'{name}' needs choices among {list(RECIPES)}, got {entry!r}")
    return {"choices": [str(choice) for choice in choices]}


def _check_bounds(path: str | Path, name: str, bounds: dict[str, Any]) -> None:
    try:
        low, high = float(bounds["low"]), float(bounds["high"])
    except (TypeError, ValueError):
        raise _fail(path, f"'{name}' bounds must be numbers, got {bounds}") from None
    if not isinstance(bounds["log"], bool):
        raise _fail(path, f"'{name}': log must be true or false, got {bounds['log']!r}")
    lowest, highest, exclusive = LIMITS[name]
    inside = lowest <= low and (high < highest if exclusive else high <= highest)
    if not (math.isfinite(low) and math.isfinite(high) and low <= high and inside):
        limit = f"[{lowest}, {highest}{')' if exclusive else ']'}"
        raise _fail(path, f"'{name}' needs low <= high within {limit}, got {low}..{high}")
    if (bounds["log"] or name.endswith("_lr")) and low <= 0:
        raise _fail(path, f"'{name}' needs low > 0 (log scale / learning rate), got {low}")
    bounds.update(low=low, high=high)


def searched_fields(base: TrainConfig, space: SearchSpace) -> list[str]:
    """The fields a study over `base` searches: not those that cannot matter (a stage with no
    epochs, class weights switched off), plus the optional ones the space file named."""
    names = ["stage1_lr"] if base.stage1_epochs > 0 else []
    names += ["stage2_lr"] if base.stage2_epochs > 0 else []
    names += ["dropout"]
    names += ["class_weight_strength"] if base.effective_class_weights != "none" else []
    return names + [name for name in OPTIONAL_SPACE if name in space]


def suggest(trial: optuna.Trial, space: SearchSpace, base: TrainConfig) -> dict[str, Any]:
    """Every suggest_* call of the study."""
    values: dict[str, Any] = {}
    for name in searched_fields(base, space):
        if "choices" in space[name]:
            values[name] = trial.suggest_categorical(name, space[name]["choices"])
        else:
            values[name] = trial.suggest_float(name, **space[name])
    return values


def trial_config(base: TrainConfig, values: dict[str, Any], **fixed: Any) -> TrainConfig:
    """The base config with a trial's values: a sampled recipe first (the fields the base
    leaves at its own recipe's value take the trial recipe's), then the sampled values."""
    values = dict(values)
    recipe = values.pop("recipe", None)
    cfg = switch_recipe(base, recipe) if recipe else base
    return dataclasses.replace(cfg, **values, **fixed)


def base_trial(space: SearchSpace, base: TrainConfig) -> dict[str, Any] | None:
    """The base config's own values of the searched fields, evaluated first on a new study so
    the best found is never worse than where the user started; None when a value lies outside
    its range (a trial must stay inside the space the sampler models)."""
    values: dict[str, Any] = {}
    for name in searched_fields(base, space):
        value = getattr(base, name)
        bounds = space[name]
        if "choices" in bounds:
            inside = value in bounds["choices"]
        else:
            value = float(value)
            inside = bounds["low"] <= value <= bounds["high"]
        if not inside:
            return None
        values[name] = value
    return values
