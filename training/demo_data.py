"""`demo_data` entry point: scikit-learn's bundled digits as PNG class folders + CSV manifest."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from training.cli import run_entry_point


def write_demo_data(root: str | Path, test_fraction: float = 0.15, seed: int = 0) -> Path:
    """Write root/train/<digit>/*.png, root/test/<digit>/*.png and root/manifest.csv.

    Deterministic and idempotent: the same files every time, existing ones left alone.
    The test folder is held out from training and k-fold, for inference later.
    """
    root = Path(root)
    digits = load_digits()
    # 0..16 grey levels → 0..255, white digit on black as in the source.
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    # "writer" groups: the source has no writer ids; consecutive blocks of 10 stand in so the
    # group-aware paths can be exercised on real images.
    groups = np.arange(len(images)) // 10
    indices = np.arange(len(images))
    train_idx, test_idx = train_test_split(
        indices, test_size=test_fraction, stratify=digits.target, random_state=seed
    )
    rows = []
    for split, chosen in (("train", train_idx), ("test", test_idx)):
        for i in sorted(chosen):
            label = str(digits.target[i])
            path = root / split / label / f"digit_{i:04d}.png"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[i], mode="L").save(path)
            rows.append((path.relative_to(root).as_posix(), label, f"w{groups[i]:03d}", split))
    manifest = pd.DataFrame(rows, columns=["path", "label", "writer", "split"])
    manifest.to_csv(root / "manifest.csv", index=False)
    manifest[manifest["split"] == "train"].to_csv(root / "train.csv", index=False)
    return root


@dataclass(frozen=True)
class DemoDataConfig:
    """Where to write the demo digits."""

    output: str = "data/demo"  # folder for train/, test/ and the CSV manifests


def run(cfg: DemoDataConfig) -> Path:
    return write_demo_data(cfg.output)


def report(root: Path) -> None:
    counts = pd.read_csv(root / "manifest.csv")["split"].value_counts().to_dict()
    print(f"demo data in {root}: {counts} (train/ for training, test/ held out)")


def main(argv: list[str] | None = None) -> int:
    return run_entry_point(DemoDataConfig, argv, __doc__, run, report)


if __name__ == "__main__":
    sys.exit(main())
