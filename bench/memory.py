"""Bench: peak RSS of load_labelled_images vs holding float32 arrays as the seed did.

Each arm runs in its own fresh subprocess over the same generated JPEGs; the figure is the
peak RSS (ru_maxrss) above the RSS the process had, imports done, just before loading.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.common import verdict, write_photos

TARGET = 0.25  # the project's increase at most a quarter of the seed's
FULL = {"images": 5000, "source_size": 256, "image_size": 224}
QUICK = {"images": 300, "source_size": 160, "image_size": 128}  # data above loader noise
ROOT = Path(__file__).resolve().parents[1]


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def peak_rss_mb() -> float:
    """This process's peak RSS since its exec (VmHWM). Not getrusage's ru_maxrss: Linux carries
    that across exec from the forked parent, so a child of a 1 GB pytest worker read ~1 GB
    in both arms and the smoke test compared noise."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def load_project(folder: Path, size: int) -> int:
    from training.data import load_labelled_images

    return len(load_labelled_images(folder, size, progress=False))


def load_seed(folder: Path, size: int) -> int:
    """The seed's way: every image resized to size x size and kept as float32 in [0, 1]."""
    from PIL import Image

    arrays = []
    for path in sorted(folder.rglob("*.jpg")):
        with Image.open(path) as image:
            resized = image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
        arrays.append(np.asarray(resized, dtype=np.float32) / 255.0)
    return len(arrays)


def child(arm: str, folder: Path, size: int) -> dict:
    """Runs inside the subprocess: imports first, then baseline, load, peak."""
    import training.data  # noqa: F401 - both arms pay the same imports before the baseline

    baseline = current_rss_mb()
    count = (load_project if arm == "project" else load_seed)(folder, size)
    peak = peak_rss_mb()
    return {
        "images": count,
        "baseline_mb": baseline,
        "peak_mb": peak,
        "increase_mb": peak - baseline,
    }


def measure(arm: str, folder: Path, size: int) -> dict:
    command = [sys.executable, "-m", "bench.memory", "--child", arm, str(folder), str(size)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(quick: bool = False) -> dict:
    """Both arms over the same generated images; ratio of their RSS increases."""
    settings = QUICK if quick else FULL
    size = settings["image_size"]
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        folder = write_photos(Path(tmp), settings["images"], settings["source_size"], classes=4)
        project = measure("project", folder, size)
        seed = measure("seed", folder, size)
    ratio = project["increase_mb"] / seed["increase_mb"]
    return {
        "images": project["images"],
        "source_size": settings["source_size"],
        "image_size": size,
        "project_increase_mb": round(project["increase_mb"], 1),
        "seed_increase_mb": round(seed["increase_mb"], 1),
        "project_baseline_mb": round(project["baseline_mb"], 1),
        "seed_baseline_mb": round(seed["baseline_mb"], 1),
        "pixel_data_mb": round(project["images"] * size * size * 3 / 2**20, 1),  # uint8
        "ratio": round(ratio, 3),
        "target": TARGET,
        "status": verdict(ratio, TARGET, higher_is_better=False),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--child", nargs=3, metavar=("ARM", "FOLDER", "SIZE"))
    args = parser.parse_args(argv)
    if args.child:
        arm, folder, size = args.child
        print(json.dumps(child(arm, Path(folder), int(size))))
    else:
        print(json.dumps(run(args.quick), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
