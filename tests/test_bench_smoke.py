"""The bench scripts still run: each run(quick=True) returns its figures as finite positive
numbers, and the report renders from them. No timing assertions: speed targets live in
BENCHMARKS.md (make bench), not in tests."""

from __future__ import annotations

import math

import pytest

from bench import run_all

# Figures each bench must return as finite positive numbers.
EXPECTED = {
    "train_throughput": [
        "bare_images_per_s",
        "project_images_per_s",
        "ratio",
        "project_epoch_s",
    ],
    "logging_cost": ["sqlite_s_per_epoch", "http_s_per_epoch", "sqlite_share", "http_share"],
    "stage_speed": ["stage1_epoch_s", "stage2_epoch_s", "all_epoch_s", "ratio"],
    "ensemble_speed": [
        "bare_images_per_s",
        "ensemble_images_per_s",
        "ratio",
        "onnx_images_per_s",
        "eager_images_per_s",
    ],
    "memory": ["project_increase_mb", "seed_increase_mb", "ratio"],
    "pruning_savings": ["epochs_median", "epochs_none", "seconds_median", "seconds_none"],
}


@pytest.fixture(scope="module")
def quick_results() -> dict[str, dict]:
    """Every bench once at smoke size, in this process (run_all's children add start-up)."""
    import importlib

    results = {}
    for name in run_all.ORDER:
        module = importlib.import_module(f"bench.{name}")
        if name == "logging_cost":  # a fixed epoch: the throughput bench is not run twice
            results[name] = module.run(quick=True, epoch_seconds=1.0)
        else:
            results[name] = module.run(quick=True)
    return results


@pytest.mark.parametrize("name", list(EXPECTED))
def test_bench_quick_returns_its_figures(quick_results, name):
    result = quick_results[name]
    for key in EXPECTED[name]:
        value = result[key]
        assert isinstance(value, int | float), (key, value)
        assert math.isfinite(value) and value > 0, (key, value)
    if "status" in result:
        assert result["status"] in ("met", "missed")


def test_report_renders_every_figure(quick_results):
    text = run_all.render(quick_results, "python -m bench.run_all --quick", 1.0)
    assert text.startswith("# Benchmarks")
    for number in range(1, 7):
        assert f"| {number}. " in text
    for name in run_all.ORDER:
        assert f"### {name}" in text
