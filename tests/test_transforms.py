"""The input view: the centre square timm's pretrained models were evaluated on, or the squash,
the same in training, the feature cache, prediction and explanations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from registry.images import Preprocessing, decode_bytes, member_batch
from registry.tta import View
from training.gradcam import ExplainedModel, predict_probs, seen_views
from training.model import create_classifier, view_crop_pct
from training.transforms import centre_square, decode_side, eval_transform, train_transform

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def _landscape() -> np.ndarray:
    """40 x 60: bright 12-pixel bands at the left and right ends, a grey middle."""
    image = np.full((40, 60, 3), 100, dtype=np.uint8)
    image[:, :12] = 255
    image[:, -12:] = 255
    return image


def test_the_crop_view_is_the_centre_square_of_the_shorter_side():
    image = _landscape()
    square = centre_square(image, 0.875)
    assert square.shape[:2] == (35, 35)  # round(0.875 * 40)
    assert (square == 100).all()  # the bright ends (12 px each side) are outside it
    cropped = eval_transform(32, MEAN, STD, 0.875)(image=image)["image"]
    squashed = eval_transform(32, MEAN, STD)(image=image)["image"]
    assert cropped.shape == squashed.shape == (32, 32, 3)
    assert np.allclose(cropped, (100 / 255 - 0.5) / 0.5)
    assert squashed.max() == pytest.approx(1.0)  # the squash keeps the bright ends


def test_decoding_keeps_enough_pixels_for_the_crop():
    assert decode_side(224, 0.875) == 256
    assert decode_side(224, 0.0) == 224


def test_the_crop_comes_from_the_models_pretrained_config():
    assert view_crop_pct("tf_efficientnet_lite0", "crop") == 0.875
    assert view_crop_pct("test_efficientnet", "crop") == 0.95
    assert view_crop_pct("test_efficientnet", "squash") == 0.0


def test_a_flip_mirrors_exactly_what_the_model_sees():
    """The stage-1 feature cache stores the eval view and its mirror: a flipped training
    image must be one of the two (an odd margin must not shift the crop by a pixel)."""
    image = np.random.default_rng(0).integers(0, 256, (41, 65, 3), dtype=np.uint8)
    plain = eval_transform(32, MEAN, STD, 0.875)(image=image)["image"]
    flip = train_transform("flip", 32, MEAN, STD, seed=0, crop_pct=0.875)
    seen = [flip(image=image)["image"] for _ in range(12)]
    assert all(np.array_equal(v, plain) or np.array_equal(v, plain[:, ::-1]) for v in seen)
    assert any(np.array_equal(v, plain[:, ::-1]) for v in seen)


def test_models_logged_before_the_crop_keep_the_squash(tmp_path):
    old = Preprocessing.from_metadata({"image_size": 32, "mean": MEAN, "std": STD})
    new = Preprocessing.from_metadata(
        {"image_size": 32, "mean": MEAN, "std": STD, "crop_pct": 0.875}
    )
    assert (old.crop_pct, old.decode_side) == (0.0, 32)
    assert (new.crop_pct, new.decode_side) == (0.875, 37)
    image = _landscape()
    path = tmp_path / "wide.png"
    Image.fromarray(image).save(path)
    batches = [
        member_batch([decode_bytes(path.read_bytes(), prep)], [View()], prep) for prep in (old, new)
    ]
    assert batches[0].max() == pytest.approx(1.0)  # squash: the bright ends are in view
    assert batches[1].max() < 0  # crop: only the grey middle


def test_explanations_cover_exactly_the_pixels_the_prediction_used():
    torch.manual_seed(0)
    model, info = create_classifier("test_efficientnet", 3, 0.0, "none")
    member = ExplainedModel(model, 32, info.mean, info.std, crop_pct=0.875)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (40, 60, 3), dtype=np.uint8) for _ in range(3)]
    (seen_member,), seen = seen_views([member], images)
    assert seen_member.crop_pct == 0.0
    assert [image.shape[:2] for image in seen] == [(35, 35)] * 3
    assert np.allclose(predict_probs([seen_member], seen), predict_probs([member], images))
