"""Run every benchmark, each in a fresh process, and rewrite BENCHMARKS.md with the figures.

.venv/bin/python -m bench.run_all            # full sizes (make bench), a few minutes
.venv/bin/python -m bench.run_all --quick --output /tmp/b.md   # smoke sizes
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTES = Path(__file__).with_name("notes.md")  # hand-written analysis, appended verbatim
RESULTS = Path(__file__).with_name("results.json")  # the last full run's raw figures
ORDER = (
    "train_throughput",
    "logging_cost",
    "stage_speed",
    "ensemble_speed",
    "memory",
    "pruning_savings",
    "scale_out",
)


def run_one(name: str, quick: bool, epoch_seconds: float | None, out: Path) -> None:
    """Inside the child process: run one bench and write its figures as JSON."""
    module = importlib.import_module(f"bench.{name}")
    if name == "logging_cost":
        result = module.run(quick, epoch_seconds=epoch_seconds)
    else:
        result = module.run(quick)
    out.write_text(json.dumps(result))


def run_isolated(name: str, quick: bool, epoch_seconds: float | None = None) -> dict:
    """One bench in a fresh process: no thread pools, heap or MLflow state carried over."""
    with tempfile.TemporaryDirectory(prefix="bench-result-") as folder:
        out = Path(folder) / "result.json"
        command = [sys.executable, "-m", "bench.run_all", "--one", name, "--out", str(out)]
        if quick:
            command.append("--quick")
        if epoch_seconds is not None:
            command += ["--epoch-seconds", str(epoch_seconds)]
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True, env={**os.environ, "TQDM_DISABLE": "1"})
        result = json.loads(out.read_text())
    result["bench_seconds"] = round(time.perf_counter() - start, 1)
    return result


def machine() -> dict[str, str]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory_kb = int(Path("/proc/meminfo").read_text().split()[1])
    import torch

    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "memory": f"{memory_kb / 2**20:.0f} GiB",
        "python": platform.python_version(),
        **{name: version(name) for name in ("torch", "timm", "mlflow", "optuna", "onnxruntime")},
    }


def _row(figure: str, project: str, baseline: str, ratio: str, target: str, status: str) -> str:
    return f"| {figure} | {project} | {baseline} | {ratio} | {target} | {status} |"


def summary_rows(r: dict[str, dict]) -> list[str]:
    t, lg, s = r["train_throughput"], r["logging_cost"], r["stage_speed"]
    e, m, p = r["ensemble_speed"], r["memory"], r["pruning_savings"]
    so = r["scale_out"]
    return [
        "| figure | project | bare baseline | ratio | target | |",
        "|---|---|---|---|---|---|",
        _row(
            f"1. training throughput ({t['model']}, {t['image_size']} px, batch {t['batch_size']})",
            f"{t['project_images_per_s']} img/s",
            f"{t['bare_images_per_s']} img/s",
            f"{t['ratio']}",
            f">= {t['target']}",
            t["status"],
        ),
        _row(
            f"2. stage 1 on cached features (both flip views, spread over "
            f"{s['cached']['stage1_epochs']} epochs) vs stage 2 epoch ({s['model']}, "
            f"{s['image_size']} px, {s['images']} images, "
            f"unfreeze_blocks={s['unfreeze_blocks']})",
            f"stage 1 {s['stage1_cached_epoch_s']} s",
            f"stage 2 {s['stage2_epoch_s']} s",
            f"{s['cached_ratio']}x",
            f">= {s['target']}x",
            s["status"],
        ),
        _row(
            "2b. stage 1 uncached (augment=base, the default) vs stage 2 epoch",
            f"stage 1 {s['stage1_epoch_s']} s",
            f"stage 2 {s['stage2_epoch_s']} s",
            f"{s['ratio']}x",
            f">= {s['target']}x",
            s["uncached_status"],
        ),
        _row(
            f"3. ensemble predict ({e['members']} x {e['model']}, {e['tta_views']} TTA views, "
            f"{e['image_size']} px)",
            f"{e['ensemble_images_per_s']} img/s",
            f"{e['bare_images_per_s']} img/s",
            f"{e['ratio']}",
            f">= {e['target']}",
            e["status"],
        ),
        _row(
            "3b. ONNX Runtime vs torch eager (one member)",
            f"{e['onnx_images_per_s']} img/s",
            f"{e['eager_images_per_s']} img/s",
            f"{e['onnx_vs_eager']}",
            "(info)",
            "",
        ),
        _row(
            f"4. MLflow logging per epoch ({lg['metrics_per_epoch']} metrics), SQLite",
            f"{lg['sqlite_s_per_epoch'] * 1000:.1f} ms",
            f"epoch {lg['epoch_s']} s",
            f"{lg['sqlite_share']:.2%}",
            f"<= {lg['target']:.0%}",
            "met" if lg["sqlite_share"] <= lg["target"] else "missed",
        ),
        _row(
            "4. MLflow logging per epoch, HTTP tracking server",
            f"{lg['http_s_per_epoch'] * 1000:.1f} ms",
            f"epoch {lg['epoch_s']} s",
            f"{lg['http_share']:.2%}",
            f"<= {lg['target']:.0%}",
            "met" if lg["http_share"] <= lg["target"] else "missed",
        ),
        _row(
            f"5. peak RSS increase, {m['images']:,} images at {m['image_size']} px",
            f"{m['project_increase_mb']} MB",
            f"{m['seed_increase_mb']} MB (float32)",
            f"{m['ratio']}",
            f"<= {m['target']}",
            m["status"],
        ),
        _row(
            f"6. tuning epochs, median pruner vs the same trials unpruned ({p['mode']}, "
            f"{p['trials']} trials x {p['epochs_per_trial']} epochs, "
            f"{p['trials_pruned']} pruned)",
            f"{p['epochs_pruned']} epochs, {p['seconds_pruned']} s",
            f"{p['epochs_none']} epochs, {p['seconds_none']} s",
            f"{1 - p['epoch_saving']:.2f} (saves {p['epoch_saving']:.0%} of epochs, "
            f"{p['time_saving']:.0%} of time)",
            "(info)",
            "",
        ),
        _row(
            f"7. scale-out: {so['mode']} ({so['folds']} folds, {so['images']} images), Ray "
            "with two one-thread workers vs one process with two threads, 2 cores",
            f"{so['ray_wall_s']} s",
            f"{so['local_wall_s']} s",
            f"{so['speedup']}x (Ray start {so['ray_start_s']} s)",
            "(info)",
            "",
        ),
    ]


def details(results: dict[str, dict]) -> list[str]:
    lines = ["## Raw figures", ""]
    for name in ORDER:
        lines += [f"### {name}", "", "```json", json.dumps(results[name], indent=2), "```", ""]
    return lines


KEPT = ("<!-- bench-real:start -->", "<!-- bench-real:end -->")  # bench/real_data.py's part


def kept_section(path: Path) -> str:
    """The real-data section another bench writes into the same file (kept verbatim)."""
    text = path.read_text() if path.is_file() else ""
    start, end = KEPT
    if start not in text or end not in text:
        return ""
    return start + text.split(start, 1)[1].split(end, 1)[0] + end + "\n"


def with_kept(text: str, path: Path) -> str:
    kept = kept_section(path)
    return text + ("\n" + kept if kept else "")


def render(results: dict[str, dict], command: str, seconds: float, date: str = "") -> str:
    info = machine()
    date = date or f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    lines = [
        "# Benchmarks",
        "",
        "Speed and memory of the platform against bare baselines measured in the same run "
        "(`bench/`, one module per figure; each module runs in a fresh process).",
        "",
        f"- Date: {date}",
        f"- Command: `{command}` ({seconds / 60:.1f} minutes)",
        "- Machine: "
        + ", ".join(f"{k} {v}" if k != "cpu" else v for k, v in info.items() if k != "python")
        + f", Python {info['python']}, no GPU",
        "",
        "## Summary",
        "",
        *summary_rows(results),
        "",
    ]
    if NOTES.is_file():
        lines += [NOTES.read_text().strip(), ""]
    lines += details(results)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke sizes")
    parser.add_argument("--output", default=str(ROOT / "BENCHMARKS.md"))
    parser.add_argument("--only", nargs="*", choices=ORDER, help="a subset (prints JSON only)")
    parser.add_argument(
        "--render", action="store_true", help=f"rewrite the report from {RESULTS.name}, no runs"
    )
    parser.add_argument("--one", choices=ORDER, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--epoch-seconds", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        run_one(args.one, args.quick, args.epoch_seconds, Path(args.out))
        return 0
    if args.render:  # e.g. after editing notes.md
        saved = json.loads(RESULTS.read_text())
        meta = saved["meta"]
        text = render(saved["figures"], meta["command"], meta["seconds"], meta["date"])
        Path(args.output).write_text(with_kept(text, Path(args.output)))
        return 0
    start = time.perf_counter()
    results: dict[str, dict] = {}
    for name in args.only or ORDER:
        # Logging cost is a share of the project's epoch from the throughput bench.
        epoch = results.get("train_throughput", {}).get("project_epoch_s")
        print(f"== {name}", file=sys.stderr, flush=True)
        results[name] = run_isolated(name, args.quick, epoch)
        print(json.dumps(results[name]), file=sys.stderr, flush=True)
    seconds = time.perf_counter() - start
    if args.only:
        print(json.dumps(results, indent=2))
        return 0
    command = "make bench" if not args.quick else "python -m bench.run_all --quick"
    date = f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    text = render(results, command, seconds, date)
    Path(args.output).write_text(with_kept(text, Path(args.output)))
    if not args.quick:
        meta = {"date": date, "command": command, "seconds": round(seconds, 1)}
        RESULTS.write_text(json.dumps({"meta": meta, "figures": results}, indent=2) + "\n")
    print(f"{args.output} written ({seconds / 60:.1f} minutes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
