"""Named recipes: preset values of `train` fields, beneath the config file and explicit flags.

`seed` is the dataclass defaults: seed 000's two stages (head on a frozen backbone, then the
last blocks at a lower rate), with the defaults measured to hold up on a few hundred photos.
`modern` is the fine-tuning recipe of the field's well-kept tools (timm's layer-wise lr decay
over all blocks instead of hard freezing, warm-up + cosine, label smoothing, an EMA of the
weights, mixup/cutmix, TrivialAugment). Every value is also its own parameter: a recipe only
changes the defaults, so `--recipe modern --ema_decay 0` is modern without the EMA.
"""

from __future__ import annotations

import dataclasses
from typing import Any

RECIPES: dict[str, dict[str, Any]] = {
    "seed": {},
    "modern": {
        "unfreeze_blocks": -1,
        "layer_decay": 0.7,
        "optimizer": "adamw",
        "weight_decay": 0.05,
        "stage2_lr": 1e-3,
        "scheduler": "cosine",
        "warmup_epochs": 1,
        "loss": "label_smoothing",
        "label_smoothing": 0.1,
        "ema_decay": 0.99,
        "augment": "trivial",
    },
}


def recipe_values(name: str) -> dict[str, Any]:
    """The preset of a recipe (an unknown name is the caller's error to report)."""
    return dict(RECIPES[name])


def recipe_value(cfg: Any, recipe: str, name: str) -> Any:
    """A field's value under a recipe: its preset's, else the dataclass default."""
    preset = RECIPES[recipe]
    if name in preset:
        return preset[name]
    return next(f.default for f in dataclasses.fields(cfg) if f.name == name)


def switch_recipe(cfg: Any, recipe: str) -> Any:
    """`cfg` under another recipe: every field it leaves at its own recipe's value takes the
    new recipe's; fields set to anything else stay (a user's choice outranks a preset)."""
    names = set(RECIPES[cfg.recipe]) | set(RECIPES[recipe])
    moved = {
        name: recipe_value(cfg, recipe, name)
        for name in names
        if getattr(cfg, name) == recipe_value(cfg, cfg.recipe, name)
    }
    return dataclasses.replace(cfg, recipe=recipe, **moved)
