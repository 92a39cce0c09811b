"""Render MLproject entry points from the config dataclasses (one parameter per field)."""

from __future__ import annotations

import dataclasses
from typing import get_type_hints

HEADER = """\
# Generated from the config dataclasses: `python tests/test_mlproject.py` rewrites it, and the
# test suite fails when it is out of date. Every parameter defaults to '' = not given: the
# job's own default (or a `config` YAML file) applies, so nothing `mlflow run` logs on its run
# looks like a value you did not set. `python -m <module> --help` lists the defaults.
name: imgclf-platform

conda_env: conda.yaml

entry_points:
"""


def parameter_type(kind: type) -> str:
    """MLproject's parameter type of a field: numbers as float, everything else string."""
    return "float" if kind in (int, float) else "string"


def entry_point_block(name: str, module: str, config_class: type) -> str:
    """One entry point: every field a parameter with default '', every field a flag."""
    hints = get_type_hints(config_class)
    fields = [field.name for field in dataclasses.fields(config_class)]
    lines = [f"  {name}:", "    parameters:"]
    lines += [
        f'      {field}: {{type: {parameter_type(hints[field])}, default: ""}}' for field in fields
    ]
    lines += ["    command: >-", f"      python -m {module}"]
    lines += [f"      --{field} {{{field}}}" for field in fields]
    return "\n".join(lines) + "\n"


def render(entry_points: list[tuple[str, str, type]]) -> str:
    """The whole MLproject file for (name, module, config class) entries, in order."""
    blocks = [entry_point_block(*entry) for entry in entry_points]
    return HEADER + "\n".join(blocks)
