"""Wall time of real ensemble and single-member calls on a sample of images, best of a few."""

from __future__ import annotations

import logging
import timeit

import numpy as np
import pandas as pd

from registry.ensemble import EnsembleModel

log = logging.getLogger(__name__)

LATENCY_IMAGES = 32  # images in the timed sample
LATENCY_REPEATS = 3  # timed calls per variant; the fastest counts (the least disturbed)


def timed_sample(paths: list[str], seed: int) -> pd.DataFrame:
    """Up to LATENCY_IMAGES of `paths` (seeded), as a request frame."""
    rng = np.random.default_rng(seed)
    count = min(LATENCY_IMAGES, len(paths))
    chosen = sorted(rng.choice(len(paths), size=count, replace=False).tolist())
    return pd.DataFrame({"path": [paths[i] for i in chosen]})


def measure(
    ensemble: EnsembleModel, request: pd.DataFrame, ttas: list[int]
) -> dict[tuple[str, int], float]:
    """Seconds of a whole predict call (decode, views, forward passes, voting) for each
    member alone and for the ensemble, at each view count in `ttas`: the best of
    LATENCY_REPEATS calls on the same request. Keyed (`member <rank>` | `ensemble`, views).

    The voting method and the temperature are not timed apart: they are arithmetic on an
    (members, images, classes) array, next to nothing beside the forward passes."""
    calls = {
        (f"member {rank}", tta): ensemble.only(rank)
        for rank in range(len(ensemble.members))
        for tta in ttas
    }
    calls |= {("ensemble", tta): ensemble for tta in ttas}
    seconds = dict.fromkeys(calls, float("inf"))
    # Round robin, not each variant's repeats in a row: on a shared machine the load drifts,
    # and every variant should see the same spread of it.
    for _ in range(LATENCY_REPEATS):
        for (who, tta), model in calls.items():
            timer = timeit.Timer(lambda m=model, n=tta: m.predict(None, request, {"tta": n}))
            seconds[(who, tta)] = min(seconds[(who, tta)], timer.timeit(number=1))
    for (who, tta), value in seconds.items():
        log.info("%s, %d view(s): %.3f s for %d images", who, tta, value, len(request))
    return seconds
