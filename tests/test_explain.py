"""Grad-CAM on tiny real timm models (CNN and ViT), the deletion check, and the explain job on a
really logged model in a private MLflow store."""

from __future__ import annotations

import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY
from matplotlib.figure import Figure
from sklearn.datasets import load_digits

from registry import explain as explain_job
from training import train
from training.config import TrainConfig
from training.gradcam import (
    ExplainedModel,
    deletion_check,
    explain,
    find_target_layer,
    misclassified_figure,
)
from training.model import create_classifier

# (timm model, input size): the ViT has a fixed input size (160 px for test_vit).
MODELS = [("test_efficientnet", 32), ("test_vit", 160)]


def _images() -> list[np.ndarray]:
    """Real digits at their 8x8 size and enlarged, plus a non-square colour image."""
    digits = load_digits()
    grey = [(digits.images[i] * (255 / 16)).astype(np.uint8) for i in range(4)]
    rgb = [np.repeat(image[..., None], 3, axis=2) for image in grey]
    big = [np.kron(image, np.ones((5, 4, 1), dtype=np.uint8)) for image in rgb[:2]]  # 40x32
    rng = np.random.default_rng(0)
    return rgb + big + [rng.integers(0, 256, (30, 45, 3), dtype=np.uint8)]


@pytest.fixture(scope="module", params=MODELS, ids=[name for name, _ in MODELS])
def member(request) -> ExplainedModel:
    name, size = request.param
    torch.manual_seed(0)
    model, info = create_classifier(name, 4, 0.0, "none")
    return ExplainedModel(model, size, info.mean, info.std, name=name)


def test_target_layer_is_chosen_from_the_model():
    cnn, _ = create_classifier("test_efficientnet", 4, 0.0, "none")
    layer = find_target_layer(cnn, 32)
    # At 32 px the last stage is 1x1: the deepest stage with a 4x4 map is used instead.
    assert (layer.layout, layer.grid, layer.name) == ("NCHW", (4, 4), "blocks.2")
    assert find_target_layer(cnn, 224).name == "blocks.4"  # last stage, 7x7
    vit, _ = create_classifier("test_vit", 4, 0.0, "none")
    layer = find_target_layer(vit, 160)
    assert (layer.layout, layer.grid, layer.prefix_tokens) == ("tokens", (10, 10), 1)
    assert layer.name == "blocks.5.norm1"
    tokens = torch.randn(2, 101, 64)
    assert layer.reshape(tokens).shape == (2, 64, 10, 10)


def test_heatmaps_match_each_input_image(member):
    images = _images()
    result = explain([member], images)
    assert len(result.heatmaps) == len(images)
    for heat, image in zip(result.heatmaps, images, strict=True):
        assert heat.shape == image.shape[:2]
        assert heat.dtype == np.float32 and 0 <= heat.min() and heat.max() <= 1
    assert any(heat.std() > 0 for heat in result.heatmaps)
    assert (result.classes == result.probs.argmax(axis=1)).all()
    chosen = explain([member], images, classes=[3] * len(images))
    assert (chosen.classes == 3).all()


def test_deletion_check_runs_and_gives_a_fraction(member):
    images = _images()
    result = explain([member], images)
    check = deletion_check([member], images, result.heatmaps, result.classes, seed=1)
    assert 0.0 <= check.fraction <= 1.0
    for probs in (check.p_original, check.p_heat_masked, check.p_random_masked):
        assert probs.shape == (len(images),) and ((probs >= 0) & (probs <= 1)).all()
    np.testing.assert_allclose(check.p_original, result.probs[np.arange(7), result.classes])
    again = deletion_check([member], images, result.heatmaps, result.classes, seed=1)
    np.testing.assert_array_equal(again.p_random_masked, check.p_random_masked)  # seeded


def test_a_fully_frozen_model_is_still_explained():
    """grad-cam only hooks activation gradients; with every weight frozen (a stage-1 model)
    they exist only because the input requires grad."""
    model, info = create_classifier("test_resnet", 4, 0.0, "none")
    for param in model.parameters():
        param.requires_grad = False
    frozen = ExplainedModel(model, 32, info.mean, info.std)
    heat = explain([frozen], _images()[:2]).heatmaps
    assert all(h.shape == (8, 8) for h in heat) and any(h.std() > 0 for h in heat)
    assert not any(p.requires_grad for p in model.parameters())


def test_misclassified_figure_for_training_runs():
    torch.manual_seed(0)
    model, info = create_classifier("test_efficientnet", 4, 0.0, "none")
    member = ExplainedModel(model, 32, info.mean, info.std)
    images = _images()
    probs = explain([member], images).probs
    wrong = (probs.argmax(axis=1) + 1) % 4  # every image "misclassified"
    figure = misclassified_figure(member, images, wrong, list("abcd"), max_images=3)
    assert isinstance(figure, Figure)
    assert sum(ax.get_title().startswith("pred ") for ax in figure.axes) == 3
    assert misclassified_figure(member, images, probs.argmax(axis=1), list("abcd")) is None
    assert misclassified_figure(member, images, wrong, list("abcd"), max_images=0) is None


@pytest.fixture(scope="module")
def logged_model(tmp_path_factory, digits_dir, migrated_store):
    """One tiny real training run in a private store: its logged model URI."""
    folder = tmp_path_factory.mktemp("explain")
    shutil.copy(migrated_store, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
            patch.delenv(name, raising=False)
        patch.chdir(folder)
        mlflow.set_tracking_uri(uri)
        outcome = train.run(TrainConfig(data=str(digits_dir), **TINY), progress=False)
        yield outcome.model_uri
    mlflow.set_tracking_uri(None)


def _explain_runs() -> list:
    return mlflow.search_runs(
        experiment_names=["tests"], filter_string="tags.job = 'explain'", output_format="list"
    )


def test_explain_job_logs_overlays_and_the_deletion_metric(logged_model, digits_dir):
    argv = ["--model_uri", logged_model, "--data", str(digits_dir), "--max_images", "5"]
    assert explain_job.main([*argv, "--target", "both", "--experiment_name", "tests"]) == 0
    (run,) = _explain_runs()
    assert run.info.status == "FINISHED" and run.data.tags["model_uri"] == logged_model
    assert 0.0 <= run.data.metrics["deletion_check_fraction"] <= 1.0
    assert run.data.metrics["explained_images"] == 5
    assert run.data.params["target"] == "both"
    description = run.data.tags["mlflow.note.content"]  # the runs table's Description
    assert description.startswith(f"Grad-CAM of {logged_model} on 5 image(s)")
    client = mlflow.MlflowClient()
    files = {f.path for f in client.list_artifacts(run.info.run_id, "explain")}
    overlays = {path for path in files if path.endswith(".png") and "contact_sheet" not in path}
    assert len(overlays) == 5 and "explain/contact_sheet.png" in files
    local = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="explain/explanations.csv"
    )
    table = pd.read_csv(local)
    assert set(table["artifact"]) == overlays and table["label"].notna().all()
    assert run.data.metrics["deletion_check_fraction"] == table["heat_mask_lowered_more"].mean()


def test_explain_job_errors_name_the_parameter_and_log_nothing(
    logged_model, digits_dir, tmp_path, capsys
):
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(next((digits_dir / "1").glob("*.png")), flat / "one.png")
    before = len(_explain_runs())
    argv = ["--model_uri", logged_model, "--experiment_name", "tests"]
    assert explain_job.main([*argv, "--data", str(flat), "--target", "true"]) == 2
    assert "parameter 'target'" in capsys.readouterr().err
    assert explain_job.main([*argv, "--data", str(flat / "missing.png")]) == 2
    assert "parameter 'data'" in capsys.readouterr().err
    bad = ["--model_uri", "models:/no-such-model/1", "--data", str(flat)]
    assert explain_job.main([*bad, "--experiment_name", "tests"]) == 2
    assert "parameter 'model_uri'" in capsys.readouterr().err
    assert len(_explain_runs()) == before
    assert explain_job.main([*argv, "--data", str(flat / "one.png")]) == 0  # a single image
    assert len(_explain_runs()) == before + 1
