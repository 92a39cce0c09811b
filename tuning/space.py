"""The search space: default ranges, YAML overrides, and the one function that suggests."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
import yaml

from training.config import ConfigError, TrainConfig

# name -> keyword arguments of trial.suggest_float; every name is a TrainConfig field.
DEFAULT_SPACE: dict[str, dict[str, Any]] = {
    "stage1_lr": {"low": 1e-4, "high": 1e-2, "log": True},  # head only: large steps are fine
    "stage2_lr": {"low": 1e-5, "high": 1e-3, "log": True},  # unfrozen backbone: small steps
    "dropout": {"low": 0.0, "high": 0.5, "log": False},
    # 0 = uniform class weights, 1 = inverse frequency: one number for 2 or 18 classes alike.
    "class_weight_strength": {"low": 0.0, "high": 1.0, "log": False},
}

# What TrainConfig accepts for each tuned field: (lowest, highest, highest is exclusive).
LIMITS = {
    "stage1_lr": (0.0, math.inf, False),
    "stage2_lr": (0.0, math.inf, False),
    "dropout": (0.0, 1.0, True),
    "class_weight_strength": (0.0, 1.0, False),
}

SearchSpace = dict[str, dict[str, Any]]


def _fail(path: str | Path, message: str) -> ConfigError:
    return ConfigError(f"parameter 'search_space': {path}: {message}")


def load_space(path: str | Path = "") -> SearchSpace:
    """The default ranges updated from a YAML file of `name: {low, high, log}` entries (a
    partial entry keeps the other bounds; a plain number fixes the value)."""
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
    unknown = sorted(set(loaded) - set(space))
    if unknown:
        raise _fail(path, f"unknown keys {unknown}; tunable: {sorted(space)}")
    for name, entry in loaded.items():
        if isinstance(entry, int | float) and not isinstance(entry, bool):
            entry = {"low": entry, "high": entry}
        if not isinstance(entry, dict) or set(entry) - {"low", "high", "log"}:
            raise _fail(path, f"'{name}' must be a number or a mapping of low, high, log")
        space[name].update(entry)
        _check_bounds(path, name, space[name])
    return space


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


def searched_fields(base: TrainConfig) -> list[str]:
    """The fields a study over `base` searches: not those that cannot matter (a stage with no
    epochs, class weights switched off)."""
    names = ["stage1_lr"] if base.stage1_epochs > 0 else []
    names += ["stage2_lr"] if base.stage2_epochs > 0 else []
    names += ["dropout"]
    names += ["class_weight_strength"] if base.effective_class_weights != "none" else []
    return names


def suggest(trial: optuna.Trial, space: SearchSpace, base: TrainConfig) -> dict[str, float]:
    """Every suggest_* call of the study."""
    return {name: trial.suggest_float(name, **space[name]) for name in searched_fields(base)}


def base_trial(space: SearchSpace, base: TrainConfig) -> dict[str, float] | None:
    """The base config's own values of the searched fields, evaluated first on a new study so
    the best found is never worse than where the user started; None when a value lies outside
    its range (a trial must stay inside the space the sampler models)."""
    values = {name: float(getattr(base, name)) for name in searched_fields(base)}
    if all(space[n]["low"] <= v <= space[n]["high"] for n, v in values.items()):
        return values
    return None
