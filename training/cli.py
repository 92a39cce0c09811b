"""The shared shape of every entry point: parse the config, run the job, report or fail cleanly."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

from training.config import ConfigError, parse_cli
from training.data import DataError
from training.errors import WeightsError
from training.logs import setup_logging

C = TypeVar("C")

# Bad input a user can fix: printed as one line, exit code 2, no traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, DataError, WeightsError)


def run_entry_point(
    config_class: type[C],
    argv: list[str] | None,
    description: str | None,
    job: Callable[[C], Any],
    report: Callable[[Any], None],
    user_errors: tuple[type[BaseException], ...] = (),
) -> int:
    """`job(config)` then `report(outcome)`; a user error prints `error: ...` and returns 2."""
    setup_logging()
    try:
        cfg = parse_cli(config_class, argv, description=description or "")
        outcome = job(cfg)
    except (*USER_ERRORS, *user_errors) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report(outcome)
    return 0
