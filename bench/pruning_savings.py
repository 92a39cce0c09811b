"""Bench: training epochs and seconds the median pruner saves against the same trials unpruned.

The pruned arm is a real study: TPE, the median pruner, the base config enqueued first. The
unpruned arm re-runs each pruned trial's parameters to the end with no pruner. A completed
trial ran exactly as it would have without a pruner (the pruner only decides whether to stop),
so completed trials count as they ran and only pruned ones are re-run. The replay also shows
what pruning cost: whether a pruned trial would have beaten the study's best.

    .venv/bin/python -m training.demo_data             # data/demo, once
    .venv/bin/python bench/pruning_savings.py          # the demo study (12 trials), ~15 minutes
    .venv/bin/python bench/pruning_savings.py --quick  # smoke: tiny model, seconds
    # the real-photo study (../shared/data/hymenoptera/train, 15 trials at 128 px), ~6 min;
    # tune flags after -- override the study's, e.g. its name or seed
    .venv/bin/python bench/pruning_savings.py --real [--pruner SPEC] [-- --study_name S --seed N]
    # an existing study, e.g. one run with `python -m tuning.tune <flags>`: replay its pruned
    # trials (the same flags rebuild the base config; the study itself is only read)
    .venv/bin/python bench/pruning_savings.py --study demo-study -- <the tune flags>
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import real_data_folder, scratch_store, write_digits  # noqa: E402
from training.config import parse_cli  # noqa: E402
from training.demo_data import write_demo_data  # noqa: E402
from tuning.config import TuneConfig  # noqa: E402
from tuning.job import run as tune  # noqa: E402
from tuning.study import create_storage  # noqa: E402

DEMO = ROOT / "data" / "demo"
# The demo study of the README: 12 trials of the demo config (1 + 5 epochs each).
DEMO_STUDY = [
    *("--config", "configs/demo.yaml", "--search_space", "configs/demo_space.yaml"),
    *("--n_trials", "12", "--study_name", "bench-median"),
]
# The smoke test's study: a tiny model on 50 digits (written to a scratch folder, never into
# the repo); a threshold no F1 reaches prunes every trial at its first epoch, so the replay
# path always runs.
QUICK_IMAGES = 50
QUICK_STUDY = [
    *("--model", "test_efficientnet", "--pretrained", "none"),
    *("--image_size", "32", "--batch_size", "16", "--unfreeze_blocks", "2"),
    *("--stage1_epochs", "1", "--stage2_epochs", "1", "--val_fraction", "0.5"),
    *("--n_trials", "2", "--pruner", "threshold:lower=1.01", "--study_name", "bench-quick"),
]


# The real-photo study: ants vs bees (`train/` only, the usual holdout objective), 15 trials of
# the default search space at 128 px so it runs in minutes; `augment=flip` lets stage 1 train
# on cached features, so stage 2 is what a trial's time is spent on and what pruning can save.
REAL_STUDY = [
    *("--model", "tf_efficientnet_lite0", "--pretrained", "lite0-pypi"),
    *("--image_size", "128", "--augment", "flip", "--stage1_epochs", "5"),
    *("--stage2_epochs", "10", "--n_trials", "15", "--study_name", "bench-real"),
]
# Successive halving from the third epoch (min_resource=2; steps count from 0), a third kept
# per rung: 45-58 % of epochs saved in three studies (seeds 42, 0, 1), the best kept in two and
# one holdout photo lost in the third; Hyperband at the same rungs saved 19-44 % and always
# kept the best (BENCHMARKS item 6b).
REAL_PRUNER = "successive_halving:min_resource=2,reduction_factor=3"


def real_study(pruner: str) -> list[str]:
    data = real_data_folder() / "train"
    if not data.is_dir():
        raise SystemExit(f"no real photos at {data} (REAL_DATA=<hymenoptera folder> overrides)")
    return [*REAL_STUDY, "--data", str(data), "--pruner", pruner]


def base_config(argv: list[str], demo_data: bool = True) -> TuneConfig:
    """The tune flags as a config whose file paths hold from any working directory; the
    demo digits are written to data/demo first when asked (not by the smoke test)."""
    saved = Path.cwd()
    os.chdir(ROOT)  # relative paths in the flags and in a --config file mean the repo's
    try:
        if demo_data and not (DEMO / "train.csv").is_file():
            write_demo_data(DEMO)
        cfg = parse_cli(TuneConfig, argv, "")
    finally:
        os.chdir(saved)
    absolute = {
        name: str((ROOT / getattr(cfg, name)).resolve())
        for name in ("data", "search_space")
        if getattr(cfg, name)
    }
    return dataclasses.replace(cfg, config="", **absolute)


def epochs(trial: FrozenTrial) -> int:
    return len(trial.intermediate_values)


def curve(trial: FrozenTrial) -> list[float]:
    """The pruned metric after each epoch."""
    return [round(trial.intermediate_values[step], 3) for step in sorted(trial.intermediate_values)]


def seconds(trial: FrozenTrial) -> float:
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def replay_unpruned(cfg: TuneConfig, pruned: list[FrozenTrial], folder: Path) -> list[FrozenTrial]:
    """Each pruned trial's parameters, in order, trained to the end with no pruner."""
    storage = f"sqlite:///{folder / 'replay.db'}"
    name = f"{cfg.study_name}-unpruned"
    study = optuna.create_study(storage=create_storage(storage), study_name=name)
    for trial in pruned:
        study.enqueue_trial(trial.params)
    replay = dataclasses.replace(
        cfg,
        study_name=name,
        storage=storage,
        pruner="none",
        enqueue_base=False,
        n_trials=len(pruned),
        experiment_name="bench-pruning-replay",
        best_config=str(folder / "best_replay.yaml"),
        run_name="",
    )
    tune(replay)
    return optuna.load_study(study_name=name, storage=create_storage(storage)).trials


def compare(cfg: TuneConfig, study: optuna.Study, folder: Path) -> dict:
    """Epochs, seconds and best value of the study against the same trials unpruned."""
    trials = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    replayed = replay_unpruned(cfg, pruned, folder) if pruned else []
    if [t.params for t in replayed] != [t.params for t in pruned]:
        raise RuntimeError("the replay did not run the pruned trials' parameters")
    unpruned = complete + replayed
    best = max((t.value for t in complete), default=None)
    best_unpruned = max((t.value for t in unpruned if t.value is not None), default=None)
    epochs_pruned, epochs_none = sum(map(epochs, trials)), sum(map(epochs, unpruned))
    seconds_pruned, seconds_none = sum(map(seconds, trials)), sum(map(seconds, unpruned))
    return {
        "study": study.study_name,
        "model": cfg.model,
        "seed": cfg.seed,  # the TPE sampler's and every trial's training seed
        "trials": len(trials),
        "epochs_per_trial": cfg.stage1_epochs + cfg.stage2_epochs,
        "pruner": cfg.pruner,
        "trials_pruned": len(pruned),
        "epochs_pruned": epochs_pruned,
        "epochs_none": epochs_none,
        "epoch_saving": round(1 - epochs_pruned / epochs_none, 3),
        "seconds_pruned": round(seconds_pruned, 1),
        "seconds_none": round(seconds_none, 1),
        "time_saving": round(1 - seconds_pruned / seconds_none, 3),
        "best_value_pruned": best,
        "best_value_none": best_unpruned,
        "curves_complete": {t.number: curve(t) for t in complete},
        # Per pruned trial: where it stopped, its score then, and where it would have ended.
        "pruned_trials": [
            {
                "number": t.number,
                "stopped_after_epochs": epochs(t),
                "value_when_pruned": round(t.intermediate_values[max(t.intermediate_values)], 4),
                "value_unpruned": None if r.value is None else round(r.value, 4),
                "curve": curve(t),
                "curve_unpruned": curve(r),
            }
            for t, r in zip(pruned, replayed, strict=True)
        ],
    }


def run(quick: bool = False, study_argv: list[str] | None = None, mode: str = "demo study") -> dict:
    """Run the demo (or smoke, or given) study, then replay its pruned trials unpruned; the
    demo digits are written first for the demo study only."""
    argv = study_argv or (QUICK_STUDY if quick else DEMO_STUDY)
    mode = "quick" if quick else mode
    cfg = base_config(argv, demo_data=mode == "demo study")
    with scratch_store() as folder:
        cfg = dataclasses.replace(
            cfg,
            data=str(write_digits(folder / "digits", QUICK_IMAGES)) if quick else cfg.data,
            storage=f"sqlite:///{folder / 'optuna.db'}",
            experiment_name="bench-pruning",
            best_config=str(folder / "best.yaml"),
        )
        tune(cfg)
        study = optuna.load_study(study_name=cfg.study_name, storage=create_storage(cfg.storage))
        return {"mode": mode, **compare(cfg, study, folder)}


def replay_study(study_name: str, study_argv: list[str]) -> dict:
    """An existing study (its storage from the flags, '' = mlruns/optuna.db) replayed."""
    cfg = base_config([*study_argv, "--study_name", study_name])
    storage = cfg.storage or f"sqlite:///{ROOT / 'mlruns' / 'optuna.db'}"
    study = optuna.load_study(study_name=study_name, storage=create_storage(storage))
    with scratch_store() as folder:
        return {"mode": f"replay of {study_name}", **compare(cfg, study, folder)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--study", default="", help="replay this existing study's pruned trials")
    parser.add_argument("--real", action="store_true", help="the study over the real photos")
    parser.add_argument("--pruner", default=REAL_PRUNER, help="with --real: the pruner spec")
    parser.add_argument("tune_flags", nargs="*", help="after --: the study's tune flags")
    args = parser.parse_args(argv)
    if args.study:
        result = replay_study(args.study, args.tune_flags)
    elif args.real:
        # Flags after -- override the study's (e.g. --study_name: Hyperband's brackets hash it).
        argv = [*real_study(args.pruner), *args.tune_flags]
        result = run(study_argv=argv, mode="real-photo study")
    elif args.tune_flags:
        result = run(study_argv=args.tune_flags, mode="study of the given flags")
    else:
        result = run(args.quick)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
