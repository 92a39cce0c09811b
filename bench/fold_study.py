"""Evidence on `train/` alone: k-fold cross-validation of a `train` config on the real photos.

`val/` is the benchmark's test set, so no default may be chosen by its score there. This
study splits the 245 `train/` photos into stratified folds; per fold it fits the config on
the other folds (with the usual holdout split inside them for selection) and counts how
many of the fold's own unseen photos each way of using the fitted weights gets right:

- `kept`: the weights `train` keeps (best epoch by `monitor`, any stage);
- `stage1` / `stage2`: the best weights of each stage; `last`: the last epoch's;
- `average`: stage 1's and stage 2's weights averaged (WiSE-FT's interpolation, alpha 0.5);
- `vote`: stage 1's and stage 2's probabilities averaged;
- `+flip`: with a mirrored second view (test-time augmentation).

`val/` is scored too, for reference only. One JSON line per fold; `--summary` sums them.

    python bench/fold_study.py --out /tmp/folds.jsonl --seed 42 -- --image_size 256
    python bench/fold_study.py --summary /tmp/folds.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.recipe_study import BASE, REAL, holdout_plan  # noqa: E402
from training import fit as fit_module  # noqa: E402
from training.config import TrainConfig, parse_cli  # noqa: E402
from training.data import load_labelled_images  # noqa: E402
from training.engine import ImageArrayDataset, make_loader, pick_device, predict_probs  # noqa: E402
from training.pipeline import fit_inputs, fit_plan  # noqa: E402
from training.transforms import decode_side, eval_transform  # noqa: E402


def fold_folders(source: Path, seed: int, folds: int, root: Path) -> list[tuple[Path, Path]]:
    """(fit folder, unseen folder) per stratified fold of an image folder, under `root`:
    symbolic links to the photos of `source`."""
    photos = sorted(p for p in source.glob("*/*") if p.is_file())
    labels = [p.parent.name for p in photos]
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    pairs = []
    for k, (fit_rows, unseen_rows) in enumerate(splitter.split(photos, labels)):
        pair = (root / f"fold{k}" / "fit", root / f"fold{k}" / "unseen")
        for folder, rows in zip(pair, (fit_rows, unseen_rows), strict=True):
            for row in rows:
                link = folder / labels[row] / photos[row].name
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(photos[row])
        pairs.append(pair)
    return pairs


def weight_variants(result: fit_module.FitResult) -> dict[str, dict]:
    """The state dicts compared: kept, each stage's best, the last, and their average."""
    stages = [state for state, _ in result.stage_best.values()]
    first, second = stages[0], stages[-1]
    average = {
        name: (first[name] + second[name]) / 2 if first[name].is_floating_point() else second[name]
        for name in first
    }
    return {
        "kept": result.best_state,
        "stage1": first,
        "stage2": second,
        "last": result.final_state,
        "average": average,
    }


def correct_counts(plan, states: dict[str, dict], folder: Path, device) -> dict[str, int]:
    """Photos of `folder` each variant classifies correctly, seen as validation photos are."""
    size, crop_pct, info = plan.cfg.image_size, plan.crop_pct, plan.model_info
    photos = load_labelled_images(folder, decode_side(size, crop_pct), progress=False)
    view = eval_transform(size, info.mean, info.std, crop_pct)
    mirrored = [np.ascontiguousarray(image[:, ::-1]) for image in photos.images]
    loaders = [
        make_loader(ImageArrayDataset(images, photos.labels, view), 64, False, 0)
        for images in (photos.images, mirrored)
    ]
    probs = {}
    for name, state in states.items():
        plan.model.load_state_dict(state)
        views = [predict_probs(plan.model, loader, device, progress=False)[0] for loader in loaders]
        probs[name], probs[f"{name}+flip"] = views[0], (views[0] + views[1]) / 2
    probs["vote"] = (probs["stage1"] + probs["stage2"]) / 2
    labels = np.asarray(photos.labels)
    return {name: int((p.argmax(axis=1) == labels).sum()) for name, p in probs.items()}


def run_fold(fit_dir: Path, unseen_dir: Path, flags: list[str], seed: int) -> dict:
    cfg = parse_cli(
        TrainConfig,
        [*BASE, "--seed", str(seed), *flags, "--data", str(fit_dir)],
        "",
    )
    plan = holdout_plan(cfg)
    device = pick_device(cfg.device)
    start = time.perf_counter()
    result = fit_plan(plan, fit_inputs(plan), device, progress=False)
    seconds = time.perf_counter() - start
    states = weight_variants(result)
    return {
        "flags": flags,
        "seed": seed,
        "seconds": round(seconds, 1),
        "kept": f"stage {result.best_epoch['stage']} epoch {result.best_epoch['epoch']}",
        "unseen": correct_counts(plan, states, unseen_dir, device),
        "unseen_photos": sum(1 for p in unseen_dir.glob("*/*")),
        "val": correct_counts(plan, states, REAL / "val", device),
    }


def summary(path: Path) -> None:
    """Per config and seed: photos right out of all unseen folds, and mean val/ photos."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for line in path.read_text().splitlines():
        row = json.loads(line)
        groups[(" ".join(row["flags"]) or "(defaults)", row["seed"])].append(row)
    for (flags, seed), rows in groups.items():
        seconds = np.mean([r["seconds"] for r in rows])
        print(f"== {flags}, seed {seed}: {len(rows)} folds, {seconds:.0f} s per fit")
        total = sum(r["unseen_photos"] for r in rows)
        for name in rows[0]["unseen"]:
            unseen = sum(r["unseen"][name] for r in rows)
            val = np.mean([r["val"][name] for r in rows])
            print(f"  {name:14s} folds {unseen}/{total} ({unseen / total:.3f})  val/ {val:.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="append one JSON line per fold here")
    parser.add_argument("--seed", type=int, default=42, help="fold split and training seed")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--summary", type=Path, help="sum up a file of fold lines")
    parser.add_argument("train_flags", nargs="*", help="after --: TrainConfig flags")
    args = parser.parse_args(argv)
    if args.summary:
        summary(args.summary)
        return 0
    if args.out is None:
        parser.error("--out is required unless --summary is given")
    with tempfile.TemporaryDirectory(prefix="fold-study-") as scratch:
        for k, (fit_dir, unseen_dir) in enumerate(
            fold_folders(REAL / "train", args.seed, args.folds, Path(scratch))
        ):
            row = run_fold(fit_dir, unseen_dir, args.train_flags, args.seed)
            with args.out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            right, photos = row["unseen"]["kept"], row["unseen_photos"]
            print(f"fold {k}: kept {row['kept']}, {right}/{photos} unseen photos right")
    return 0


if __name__ == "__main__":
    sys.exit(main())
