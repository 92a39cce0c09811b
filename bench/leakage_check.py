"""Bench: the near-duplicate check's cost and accuracy on the demo digits and on 224-px photos.

Planted copies (exact, resized, JPEG q=70, ~5 % crop at an offset, 3-6 % horizontal shift) of
random originals: how many are found, how many reported pairs are false; the natural look-alike
pairs of the whole digits set; the time on the demo's 1,527 training digits against a k-fold
job of the demo config (5 folds x 6 epochs, about 5.5 minutes here, README).

    .venv/bin/python -m bench.leakage_check [--quick] [--photos /path/to/photo/folders]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from training.data import decode_image, load_labelled_images
from training.demo_data import write_demo_data
from training.leakage import duplicate_groups, find_near_duplicates, pairs_across
from training.splits import assign_folds

KINDS = ("exact", "resized", "jpeg70", "crop5", "shift")
KFOLD_SECONDS = 330.0  # the demo k-fold job on this machine (5 folds x (1 + 5) epochs)
TARGET_SHARE = 0.10  # the check may add at most 10 % to that job
PHOTOS = Path("/work/shared/data/hymenoptera")  # real ants/bees photos (read only), if present


def _decoded(image: Image.Image, max_side: int, fmt: str = "PNG", **options) -> np.ndarray:
    """Written as a file and read back the way training reads it."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    buffer.seek(0)
    return decode_image(buffer, max_side)


def _digit_copy(source: Image.Image, kind: str, rng: np.random.Generator) -> np.ndarray:
    if kind == "exact":
        return _decoded(source, 32)
    if kind == "resized":  # 8x8 -> 32x32
        return _decoded(source.resize((32, 32), Image.Resampling.BILINEAR), 32)
    if kind == "jpeg70":
        return _decoded(source, 32, "JPEG", quality=70)
    if kind == "crop5":  # 94-96 % of each side, at a random offset, of a 32-48 px enlargement
        size = int(rng.choice([32, 40, 48]))
        keep = round(size * rng.uniform(0.94, 0.96))
        big = np.asarray(source.resize((size, size), Image.Resampling.BILINEAR))
        top, left = rng.integers(0, size - keep + 1, 2)
        return _decoded(Image.fromarray(big[top : top + keep, left : left + keep]), 32)
    # shift: 1-2 px (3-6 %) to the right at 32 px, the vacated strip black like the background
    big = np.asarray(source.resize((32, 32), Image.Resampling.BILINEAR))
    step = int(rng.integers(1, 3))
    shifted = np.zeros_like(big)
    shifted[:, step:] = big[:, :-step]
    return _decoded(Image.fromarray(shifted), 32)


def plant_digit_copies(seed: int, originals: int = 300, per_kind: int = 10):
    """`originals` random real digits (8x8 PNGs decoded at <= 32 px, as in the demo) plus
    `per_kind` copies of each kind, each of a different original. Returns the images, their
    labels and the planted pairs (original index, copy index, kind)."""
    digits = load_digits()
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(digits.images), originals, replace=False)
    sources = [
        Image.fromarray((digits.images[i] * (255 / 16)).round().astype(np.uint8), mode="L")
        for i in chosen
    ]
    images = [_decoded(source, 32) for source in sources]
    labels = list(digits.target[chosen])
    planted = []
    for number, original in enumerate(rng.choice(originals, per_kind * len(KINDS), False)):
        kind = KINDS[number // per_kind]
        planted.append((int(original), len(images), kind))
        images.append(_digit_copy(sources[original], kind, rng))
        labels.append(labels[original])
    return images, np.array(labels), planted


def _photo_copy(path: Path, kind: str, rng: np.random.Generator) -> np.ndarray:
    with Image.open(path) as opened:
        source = opened.convert("RGB")
    width, height = source.size
    if kind == "exact":
        return decode_image(path, 224)
    if kind == "resized":
        return _decoded(source.resize((width // 3, height // 3), Image.Resampling.BICUBIC), 224)
    if kind == "jpeg70":
        return _decoded(source, 224, "JPEG", quality=70)
    if kind == "crop5":
        keep = rng.uniform(0.94, 0.96)
        w, h = round(width * keep), round(height * keep)
        left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        return _decoded(source.crop((left, top, left + w, top + h)), 224, "JPEG", quality=90)
    step = round(width * rng.uniform(0.03, 0.06))  # shift right, the strip filled by its edge
    pixels = np.asarray(source)
    shifted = np.concatenate([np.repeat(pixels[:, :1], step, axis=1), pixels[:, :-step]], 1)
    return _decoded(Image.fromarray(shifted), 224, "JPEG", quality=90)


def plant_photo_copies(folder: Path, seed: int = 0, per_kind: int = 10):
    """Every photo under `folder` (decoded at <= 224 px) plus planted copies of some."""
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    images = [decode_image(path, 224) for path in paths]
    rng = np.random.default_rng(seed)
    planted = []
    for number, original in enumerate(rng.choice(len(paths), per_kind * len(KINDS), False)):
        kind = KINDS[number // per_kind]
        planted.append((int(original), len(images), kind))
        images.append(_photo_copy(paths[original], kind, rng))
    return images, planted


def score_planted(pairs, planted) -> dict[str, int]:
    reported = set(zip(pairs["index_a"].tolist(), pairs["index_b"].tolist(), strict=True))
    truth = {(a, b) for a, b, _ in planted}
    missed = sorted(kind for a, b, kind in planted if (a, b) not in reported)
    return {"found": len(reported & truth), "false": len(reported - truth), "missed": missed}


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, round(time.perf_counter() - start, 2)


def run(quick: bool = False, photos: Path = PHOTOS) -> dict:
    seeds = range(2 if quick else 10)
    planted = [
        score_planted(find_near_duplicates(images), p)
        for images, _, p in (plant_digit_copies(seed) for seed in seeds)
    ]
    found, false = sum(r["found"] for r in planted), sum(r["false"] for r in planted)
    result = {
        "digits_planted": 50 * len(seeds),
        "digits_found": found,
        "digits_false": false,
        "digits_found_share": round(found / (50 * len(seeds)), 4),
        "digits_false_share": round(false / max(1, found + false), 4),
        "digits_missed_kinds": sorted(k for r in planted for k in r["missed"]),
    }
    with tempfile.TemporaryDirectory() as folder:
        demo = write_demo_data(Path(folder) / "demo")
        data = load_labelled_images(demo / "train", 32, progress=False)
        subset = data.images[: 200 if quick else None]
        pairs, seconds = timed(find_near_duplicates, subset)
    labels = data.labels[: len(subset)]
    folds = assign_folds(labels, None, 5, 42)
    grouped = assign_folds(labels, duplicate_groups(len(subset), pairs), 5, 42)
    result.update(
        {
            "demo_images": len(subset),
            "demo_seconds": seconds,
            "demo_pairs": len(pairs),
            "demo_pairs_across_folds": pairs_across(pairs, folds),
            "demo_pairs_across_grouped_folds": pairs_across(pairs, grouped),
            "kfold_seconds": KFOLD_SECONDS,
            "share_of_kfold": round(seconds / KFOLD_SECONDS, 4),
            "target": TARGET_SHARE,
            "status": "met" if seconds / KFOLD_SECONDS <= TARGET_SHARE else "missed",
        }
    )
    if not quick:
        digits = load_digits()
        every = [
            _decoded(Image.fromarray((d * (255 / 16)).round().astype(np.uint8), mode="L"), 32)
            for d in digits.images
        ]
        natural, seconds = timed(find_near_duplicates, every)
        result.update(
            {
                "all_digits": len(every),
                "all_digits_seconds": seconds,
                "all_digits_natural_pairs": len(natural),
                "all_digits_natural_share": len(natural) / (len(every) * (len(every) - 1) / 2),
            }
        )
    if photos.is_dir():
        images, planted = plant_photo_copies(photos)
        pairs, seconds = timed(find_near_duplicates, images)
        scored = score_planted(pairs, planted)
        result.update(
            {
                "photos": len(images),
                "photos_seconds": seconds,
                "photos_found": scored["found"],
                "photos_false": scored["false"],
                "photos_missed_kinds": scored["missed"],
            }
        )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--photos", default=str(PHOTOS), help="a folder of photos (read only)")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.quick, Path(args.photos)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
