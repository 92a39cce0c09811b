"""Bench: the project's recipes against a bare seed-000 script and a linear probe, on real photos.

The ants-vs-bees photos of the PyTorch transfer-learning tutorial (`../shared/data/hymenoptera`:
245 `train/`, 153 `val/` photos). Every arm trains on `train/` only and is scored on `val/`,
which no training or selection sees, in the same run on the same images:

- `linear probe`: logistic regression (scikit-learn) on frozen Lite0 features;
- `bare seed-000 script` (bench/bare_seed_script.py): seed 000's recipe without the platform;
- `project defaults` / `project modern`: `train` (its own holdout split of `train/` for
  validation) with the default recipe and with `recipe=modern`, then the logged model
  predicts `val/` through the ensemble pyfunc's code (one member, no TTA);
- with `--kfold`: 5-fold jobs of both recipes on `train/` (the honest estimate beside the
  best-epoch mean), each promoted as top-1 / top-3 / all folds and predicting `val/`.

    .venv/bin/python -m bench.real_data            # make bench-real: writes BENCHMARKS.md's section
    .venv/bin/python -m bench.real_data --quick    # smoke: 64 px, 1 + 1 epochs, no BENCHMARKS
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import bare_seed_script  # noqa: E402
from bench.common import real_data_folder, scratch_store  # noqa: E402
from registry.ensemble import EnsembleModel, MemberSpec, ensemble_config  # noqa: E402
from training.config import TrainConfig, resolve_config  # noqa: E402
from training.data import LabelledImages, load_labelled_images  # noqa: E402
from training.engine import ImageArrayDataset, make_loader  # noqa: E402
from training.feature_cache import backbone_features  # noqa: E402
from training.metrics import classification_metrics  # noqa: E402
from training.model import create_classifier, view_crop_pct  # noqa: E402
from training.transforms import decode_side, eval_transform  # noqa: E402

RESULTS = ROOT / "bench" / "real_results.json"
BENCHMARKS = ROOT / "BENCHMARKS.md"
START, END = "<!-- bench-real:start -->", "<!-- bench-real:end -->"
LITE0 = {"model": "tf_efficientnet_lite0", "pretrained": "lite0-pypi"}
CROP_PCT = view_crop_pct(LITE0["model"], "crop")  # the default `resize`; the bare script squashes
FULL = {"image_size": 224}
QUICK = {"image_size": 64, "stage1_epochs": 1, "stage2_epochs": 1}
TUTORIAL = (
    "PyTorch tutorial (ResNet-18, 224 px, same `val/`): about 0.93 accuracy fine-tuned, "
    "about 0.95 with the frozen backbone"
)


@dataclasses.dataclass
class Photos:
    """A folder of class sub-folders, decoded once (the bare script decodes its own way)."""

    data: LabelledImages

    @property
    def paths(self) -> list[str]:
        return list(self.data.table["path"])

    @property
    def labels(self) -> np.ndarray:
        return self.data.labels

    @property
    def class_names(self) -> list[str]:
        return self.data.class_names


def photos(folder: Path, size: int) -> Photos:
    """Decoded as `train` decodes by default (the shorter side kept for Lite0's centre crop)."""
    return Photos(load_labelled_images(folder, decode_side(size, CROP_PCT), progress=False))


def scores(labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    metrics = classification_metrics(labels, probs)
    return {"f1_macro": round(metrics["f1_macro"], 4), "accuracy": round(metrics["accuracy"], 4)}


def load() -> float:
    return round(os.getloadavg()[0], 1)


def linear_probe(train: Photos, val: Photos, size: int) -> dict:
    """Frozen Lite0 features (the project's default eval view: centre crop, resize, normalise)
    + scikit-learn's logistic regression."""
    from sklearn.linear_model import LogisticRegression

    start = time.perf_counter()
    model, info = create_classifier(LITE0["model"], 2, 0.0, LITE0["pretrained"])
    transform = eval_transform(size, info.mean, info.std, CROP_PCT)

    def features(folder: Photos) -> np.ndarray:
        dataset = ImageArrayDataset(folder.data.images, folder.labels, transform)
        loader = make_loader(dataset, 64, False, 0)
        return backbone_features(model.backbone, loader, torch.device("cpu"))[0].numpy()

    classifier = LogisticRegression(max_iter=5000).fit(features(train), train.labels)
    seconds = time.perf_counter() - start
    probs = classifier.predict_proba(features(val))
    return {"arm": "linear probe", "train_seconds": round(seconds, 1), **scores(val.labels, probs)}


def bare_script(train: Photos, val: Photos, size: int, quick: bool) -> dict:
    epochs = (1, 1) if quick else (15, 20)
    predict, seconds = bare_seed_script.run(train.paths, train.labels, size, epochs=epochs)
    probs = predict(val.paths)
    return {"arm": "bare seed-000 script", "train_seconds": round(seconds, 1)} | scores(
        val.labels, probs
    )


def single_member(model_uri: str, class_names: list[str]) -> EnsembleModel:
    """The served ensemble's code with one member: preprocessing from the model's metadata."""
    local = mlflow.artifacts.download_artifacts(model_uri)
    spec = MemberSpec("member_0", 0, "", model_uri, "val_f1_macro", 1.0, 1.0)
    ensemble = EnsembleModel()
    ensemble.setup(ensemble_config([spec], class_names, "arithmetic", 1), {"member_0": local})
    return ensemble


def predict_val(model: EnsembleModel, val: Photos) -> np.ndarray:
    frame = model.predict(None, pd.DataFrame({"path": val.paths}), params={"tta": 1})
    return frame[[f"prob_{name}" for name in val.class_names]].to_numpy(dtype=float)


def project(name: str, flags: dict, train_dir: Path, val: Photos) -> dict:
    """`train` with these flags (as a user would give them), then predict val/."""
    from training import train

    cfg = resolve_config(TrainConfig, {**flags, "data": str(train_dir)})
    start = time.perf_counter()
    outcome = train.run(cfg, progress=False)
    seconds = time.perf_counter() - start
    probs = predict_val(single_member(outcome.model_uri, val.class_names), val)
    run = mlflow.get_run(outcome.run_id)
    return {
        "arm": name,
        "train_seconds": round(seconds, 1),
        **scores(val.labels, probs),
        "holdout_f1_macro": round(outcome.best["val_f1_macro"], 4),
        "recipe": cfg.recipe,
        "stage1_feature_cache": run.data.params.get("stage1_feature_cache", ""),
        "kept": f"stage {run.data.params['best_stage']} epoch {run.data.params['best_epoch']}",
        "epochs_run": len(outcome.history),
    }


def kfold_arm(name: str, flags: dict, train_dir: Path, val: Photos) -> dict:
    """A 5-fold job: its honest estimate and best-epoch mean, then ensembles of its top-1,
    top-3 and all folds (ranked by best_val_f1_macro, as promote does) predicting val/."""
    from registry.selection import fold_models, select_top_k
    from registry.voting import combine
    from training import kfold

    cfg = resolve_config(kfold.KFoldConfig, {**flags, "data": str(train_dir), "folds": 5})
    start = time.perf_counter()
    outcome = kfold.run_kfold(cfg)
    seconds = time.perf_counter() - start
    parent = mlflow.get_run(outcome.parent_run_id)
    folds = fold_models(parent)
    member_probs = {
        fold.fold: predict_val(single_member(fold.model_uri, val.class_names), val)
        for fold in folds
    }
    result = {
        "arm": f"{name} k-fold",
        "train_seconds": round(seconds, 1),
        "honest_f1_macro": round(outcome.summary["honest_val_f1_macro"], 4),
        "honest_std": round(outcome.summary["honest_std_val_f1_macro"], 4),
        "mean_best_epoch_f1": round(outcome.summary["mean_val_f1_macro"], 4),
        "oof_f1_macro": round(outcome.summary["oof_f1_macro"], 4),
    }
    for k in (1, 3, len(folds)):
        chosen = select_top_k(folds, "best_val_f1_macro", k, "max")
        logs = np.stack([np.log(np.clip(member_probs[f.fold], 1e-12, 1)) for f in chosen])
        _, probs = combine(logs, "arithmetic", [1.0 / k] * k)
        for metric, value in scores(val.labels, probs).items():
            result[f"top{k}_{metric}"] = value
    return result


def run(quick: bool = False, with_kfold: bool = False) -> dict:
    settings = QUICK if quick else FULL
    size = settings["image_size"]
    real = real_data_folder()
    train_dir, val_dir = real / "train", real / "val"
    train, val = photos(train_dir, size), photos(val_dir, size)
    base = {**LITE0, **settings, "experiment_name": "bench-real"}
    recipes = {"project defaults": base, "project modern": {**base, "recipe": "modern"}}
    arms = []
    with scratch_store():
        for name, step in (
            ("linear probe", lambda: linear_probe(train, val, size)),
            ("bare seed-000 script", lambda: bare_script(train, val, size, quick)),
            *((n, (lambda f=f, n=n: project(n, f, train_dir, val))) for n, f in recipes.items()),
        ):
            print(f"== {name} (load {load()})", file=sys.stderr, flush=True)
            arms.append({**step(), "load_before": load()})
            print(json.dumps(arms[-1]), file=sys.stderr, flush=True)
        if with_kfold:
            for name, flags in recipes.items():
                print(f"== {name} k-fold (load {load()})", file=sys.stderr, flush=True)
                arms.append({**kfold_arm(name, flags, train_dir, val), "load_before": load()})
                print(json.dumps(arms[-1]), file=sys.stderr, flush=True)
    return {
        "image_size": size,
        "view": f"the centre {CROP_PCT:g} of the shorter side (`resize=crop`)",
        "train_images": len(train.paths),
        "val_images": len(val.paths),
        "arms": arms,
    }


def table(result: dict) -> list[str]:
    lines = [
        "| arm | val macro F1 | val accuracy | train wall time | notes |",
        "|---|---|---|---|---|",
    ]
    for arm in result["arms"]:
        if "honest_f1_macro" in arm:
            continue
        notes = []
        if "holdout_f1_macro" in arm:
            notes.append(f"own holdout F1 {arm['holdout_f1_macro']}, kept {arm['kept']}")
        if arm.get("stage1_feature_cache", "").startswith("on"):
            notes.append("stage 1 on cached features")
        lines.append(
            f"| {arm['arm']} | {arm['f1_macro']:.4f} | {arm['accuracy']:.4f} | "
            f"{arm['train_seconds']:.0f} s | {'; '.join(notes)} |"
        )
    folds = [arm for arm in result["arms"] if "honest_f1_macro" in arm]
    if folds:
        lines += [
            "",
            "| 5-fold job on train/ | honest F1 | best-epoch mean F1 | val F1 top-1 | val F1 "
            "top-3 | val F1 all 5 | wall time |",
            "|---|---|---|---|---|---|---|",
        ]
        for arm in folds:
            lines.append(
                f"| {arm['arm']} | {arm['honest_f1_macro']:.4f} ± {arm['honest_std']:.4f} | "
                f"{arm['mean_best_epoch_f1']:.4f} | {arm['top1_f1_macro']:.4f} | "
                f"{arm['top3_f1_macro']:.4f} | {arm['top5_f1_macro']:.4f} | "
                f"{arm['train_seconds']:.0f} s |"
            )
    return lines


def section(result: dict, command: str, minutes: float, notes: str = "") -> str:
    lines = [
        START,
        "## Real data: ants vs bees (make bench-real)",
        "",
        f"- Date: {result['date']}; command `{command}` ({minutes:.1f} minutes, 2 shared cores)",
        f"- {result['train_images']} training photos (`train/`), scored on the "
        f"{result['val_images']} photos of `val/` that no arm trains or selects on; "
        f"{result['image_size']} px, EfficientNet-Lite0 with the offline ImageNet weights; "
        f"the project's arms and the probe see {result.get('view', 'the squashed photo')}, "
        "the bare script the squashed photo.",
        f"- Published reference: {TUTORIAL}.",
        "",
        *table(result),
        "",
    ]
    if notes:
        lines += [notes.strip(), ""]
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_section(text: str, path: Path = BENCHMARKS) -> None:
    """Replace (or append) the marked real-data section; the rest of the file is kept."""
    current = path.read_text() if path.is_file() else ""
    if START in current and END in current:
        head, rest = current.split(START, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        current = head + text + ("\n" + tail if tail else "")
    else:
        current = current.rstrip("\n") + "\n\n" + text
    path.write_text(current)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke sizes, nothing written")
    parser.add_argument("--kfold", action="store_true", help="also 5-fold jobs of both recipes")
    parser.add_argument("--render", action="store_true", help=f"rewrite from {RESULTS.name}")
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    notes_file = Path(__file__).with_name("real_notes.md")
    notes = notes_file.read_text() if notes_file.is_file() else ""
    if args.render:
        saved = json.loads(RESULTS.read_text())
        write_section(section(saved, saved["command"], saved["minutes"], notes))
        return 0
    start = time.perf_counter()
    result = run(args.quick, args.kfold)
    minutes = (time.perf_counter() - start) / 60
    result["date"] = f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    command = "make bench-real" + (" (with --kfold)" if args.kfold else "")
    print(section(result, command, minutes, notes))
    if not args.quick:
        result.update(command=command, minutes=round(minutes, 1))
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        write_section(section(result, command, minutes, notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
