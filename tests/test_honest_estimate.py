"""The honest cross-validation estimate: a fold is read where the other folds choose."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from training.honest_estimate import (
    fold_curves,
    honest_fold_scores,
    honest_summary,
    running_fold_score,
)


def history(f1: list[float], stage1_epochs: int = 2) -> pd.DataFrame:
    """A fold's per-epoch records as fit writes them (aligned steps, two stages)."""
    rows = []
    for step, value in enumerate(f1):
        stage = 1 if step < stage1_epochs else 2
        epoch = step + 1 if stage == 1 else step - stage1_epochs + 1
        rows.append(
            {
                "stage": stage,
                "epoch": epoch,
                "step": step,
                "val_f1_macro": value,
                "val_accuracy": value,
                "val_loss": 1 - value,
            }
        )
    return pd.DataFrame(rows)


CURVES = {
    0: [0.5, 0.6, 0.7, 0.9, 0.8],
    1: [0.5, 0.6, 0.8, 0.7, 0.75],
    2: [0.4, 0.7, 0.75, 0.85, 0.7],
}


def test_each_fold_is_read_at_the_step_the_other_folds_choose():
    scores = honest_fold_scores({k: history(v) for k, v in CURVES.items()}, "val_f1_macro", "max")
    # fold 0: others' mean per step = [.45, .65, .775, .775, .725] -> step 2 (earliest tie)
    # fold 1: [.45, .65, .725, .875, .75] -> step 3; fold 2: [.5, .6, .75, .8, .775] -> step 3
    assert scores["honest_step"].tolist() == [2, 3, 3]
    assert scores["honest_val_f1_macro"].tolist() == pytest.approx([0.7, 0.7, 0.85])
    summary = honest_summary(scores)
    assert summary["honest_val_f1_macro"] == pytest.approx(np.mean([0.7, 0.7, 0.85]))
    # Optimistic by construction: the mean of each fold's own best is higher.
    assert np.mean([max(v) for v in CURVES.values()]) > summary["honest_val_f1_macro"]


@pytest.mark.parametrize("fold", [0, 1, 2])
def test_a_fold_s_own_validation_scores_never_decide_where_it_is_read(fold):
    histories = {k: history(v) for k, v in CURVES.items()}
    before = honest_fold_scores(histories, "val_f1_macro", "max").set_index("fold").loc[fold]
    step = int(before["honest_step"])
    # Rewrite every other epoch of this fold (its own best moves anywhere): nothing changes.
    spoiled = histories[fold].copy()
    others = spoiled["step"] != step
    rng = np.random.default_rng(fold)
    for field in ("val_f1_macro", "val_accuracy", "val_loss"):
        spoiled.loc[others, field] = rng.uniform(0, 1, others.sum())
    spoiled.loc[spoiled["step"] == 0, "val_f1_macro"] = 1.0  # its own best is now step 0
    after = honest_fold_scores({**histories, fold: spoiled}, "val_f1_macro", "max")
    assert after.set_index("fold").loc[fold].to_dict() == before.to_dict()


def test_minimising_monitor_and_keep_last():
    histories = {k: history(v) for k, v in CURVES.items()}
    by_loss = honest_fold_scores(histories, "val_loss", "min")
    assert by_loss["honest_step"].tolist() == [2, 3, 3]
    last = honest_fold_scores(histories, "val_f1_macro", "max", keep="last")
    assert last["honest_step"].tolist() == [4, 4, 4]
    assert last["honest_val_f1_macro"].tolist() == pytest.approx([0.8, 0.75, 0.7])


def test_a_fold_that_stopped_a_stage_early_carries_its_last_value_to_the_stage_end():
    stopped = history([0.5, 0.6, 0.7, 0.9, 0.8], stage1_epochs=3).drop(index=[2])  # stage 1
    full = history([0.5, 0.6, 0.65, 0.9, 0.8], stage1_epochs=3)
    curves = fold_curves({0: stopped, 1: full}, "val_f1_macro")
    assert curves[0].tolist() == pytest.approx([0.5, 0.6, 0.6, 0.9, 0.8])


def test_running_score_reads_the_newest_fold_where_the_earlier_ones_choose():
    histories = [history(v) for v in CURVES.values()]
    assert running_fold_score(histories[:1], "val_f1_macro", "max") == pytest.approx(0.8)
    # fold 1 read where fold 0 peaks (step 3)
    assert running_fold_score(histories[:2], "val_f1_macro", "max") == pytest.approx(0.7)
    # fold 2 read where folds 0 and 1 peak on average (step 2: .75; step 3: .8)
    assert running_fold_score(histories, "val_f1_macro", "max") == pytest.approx(0.85)


def test_running_score_can_choose_by_loss_and_read_f1():
    """Tuning with `cv` reads macro F1 where the earlier folds' `monitor` (the loss by
    default) is best, as the k-fold job's honest estimate does."""
    histories = [history(v) for v in CURVES.values()]
    histories[0]["val_loss"] = [0.9, 0.8, 0.1, 0.5, 0.6]  # lowest at step 2, F1 peaks at 3
    by_loss = running_fold_score(histories[:2], "val_loss", "min", scored="val_f1_macro")
    assert by_loss == pytest.approx(0.8)  # fold 1's F1 at step 2
    assert running_fold_score(histories[:2], "val_loss", "min") == pytest.approx(0.2)
    assert running_fold_score(histories[:1], "val_loss", "min", scored="val_f1_macro") == 0.8


def test_one_finished_fold_has_no_honest_score_and_no_error():
    """Promotion reads the out-of-fold rows of a partly finished job: one fold has no other
    folds to choose its step, so its honest scores are NaN (it used to raise)."""
    scores = honest_fold_scores({1: history(CURVES[1])}, "val_f1_macro", "max")
    assert scores["fold"].tolist() == [1]
    assert scores.drop(columns="fold").isna().all(axis=None)
