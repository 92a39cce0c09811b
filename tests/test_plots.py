"""Figures drawn cheaply still show what a figure of their own would."""

from __future__ import annotations

import matplotlib.style
import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from training import plots


def _pixels(figure) -> np.ndarray:
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3]


# Optuna's contour plot switches the whole process to ggplot (grid lines over the cells): a
# redraw that skips part of the figure (blitting) then differs from a figure of its own.
@pytest.mark.parametrize("style", ["default", "ggplot"])
def test_confusion_frames_equal_a_figure_drawn_for_each_step(style):
    with matplotlib.style.context(style):
        _frames_equal_figures()


def _frames_equal_figures():
    names = ["cat", "dog", "fox"]
    confusions = {
        0: np.array([[5, 1, 0], [2, 3, 1], [0, 0, 6]]),
        1: np.array([[6, 0, 0], [0, 6, 0], [1, 0, 5]]),
        7: np.array([[0, 6, 0], [6, 0, 0], [0, 0, 0]]),  # an empty row stays 0, no warning
    }
    frames = dict(plots.confusion_matrix_frames(confusions, names))
    assert list(frames) == [0, 1, 7]
    for step, counts in confusions.items():
        alone = plots.confusion_matrix_figure(counts.tolist(), names, f"validation, step {step}")
        assert np.array_equal(frames[step], _pixels(alone)), step
    assert not np.array_equal(frames[0], frames[1])


def test_no_steps_no_frames():
    assert list(plots.confusion_matrix_frames({}, ["a", "b"])) == []
