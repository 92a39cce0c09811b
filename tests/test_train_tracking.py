"""A real tiny `train` run against a real MLflow SQLite store: what lands in the run."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY, all_runs

from training import train
from training.checkpoints import load_checkpoint
from training.engine import ImageArrayDataset, make_loader, predict_probs
from training.pipeline import execute, plan_training
from training.splits import holdout_split
from training.tracking import HEADLINE_VIEW, SAVED_VIEW_TAG, RunTracker
from training.transforms import decode_side, eval_transform


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, digits_dir):
    """One tiny run on its own store, shared by the assertions below."""
    folder = tmp_path_factory.mktemp("run")
    data = shutil.copytree(digits_dir, folder / "digits")  # the session's copy stays as it is
    (data / "2" / "corrupt.png").write_bytes(b"\x89PNG broken")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.chdir(folder)
        mlflow.set_tracking_uri(uri)
        from conftest import TINY

        from training.config import TrainConfig

        # val_loss falls a little every epoch on this tiny run (val F1 stays flat): the best
        # epoch is a later one, so the model is linked to a step other than 0.
        cfg = TrainConfig(data=str(data), **{**TINY, "monitor": "val_loss"})
        outcome = train.run(cfg, progress=False)
        run = mlflow.get_run(outcome.run_id)
        client = mlflow.MlflowClient()
        artifacts = {
            f.path
            for top in client.list_artifacts(outcome.run_id)
            for f in ([top] if not top.is_dir else client.list_artifacts(outcome.run_id, top.path))
        }
        local = mlflow.artifacts.download_artifacts(run_id=outcome.run_id, dst_path=str(folder))
        history = client.get_metric_history(outcome.run_id, "val/f1_macro")
        model = mlflow.pytorch.load_model(outcome.model_uri)
        yield {
            "cfg": cfg,
            "outcome": outcome,
            "run": run,
            "artifacts": artifacts,
            "local": local,
            "history": history,
            "model": model,
        }


def test_run_finished_with_every_param(finished_run):
    run, cfg = finished_run["run"], finished_run["cfg"]
    assert run.info.status == "FINISHED"
    for field in dataclasses.fields(cfg):
        assert field.name in run.data.params, field.name
    assert run.data.params["stage2_lr"] == "0.001"
    assert run.data.params["weights_source"] == "none (random init)"
    assert run.data.params["skipped_images"] == "1"
    # The run says what stage 2 unfroze and why stage 1 did not train on cached features.
    assert run.data.params["stage2_unfrozen"] == "blocks.3, blocks.4, conv_head, bn2"
    assert run.data.params["stage1_feature_cache"].startswith("off: augment=base changes pixels")


def test_metrics_per_epoch_with_stage(finished_run):
    run = finished_run["run"]
    assert [m.step for m in finished_run["history"]] == [0, 1, 2]
    curves = ["train/loss", "train/accuracy", "train/lr", "train/seconds", "train/stage"]
    curves += ["val/loss", "val/accuracy", "val/f1_macro", "val/ece", "val/recall_macro"]
    curves += [f"val_{kind}/{c}" for kind in ("f1", "precision", "recall") for c in "0123"]
    for key in curves:
        assert key in run.data.metrics, key
    stages = mlflow.MlflowClient().get_metric_history(run.info.run_id, "train/stage")
    assert [m.value for m in stages] == [1, 2, 2]  # the stage boundary on the step axis
    # One-value summaries have no prefix (the UI lists them after the curves); housekeeping
    # of the kept epoch is a param.
    summaries = {k for k in run.data.metrics if "/" not in k}
    assert summaries == {
        "best_val_f1_macro",
        "best_val_accuracy",
        "best_val_loss",
        "best_val_precision_macro",
        "best_val_recall_macro",
        "best_val_ece",
        "skipped_images",
        "near_duplicate_pairs",
        "near_duplicates_across_split",
    }
    assert {"best_step", "best_stage", "best_epoch"} <= set(run.data.params)


def test_run_and_model_are_named_and_described(finished_run):
    run = finished_run["run"]
    assert run.info.run_name == "train digits test_efficientnet"
    assert run.data.tags["mlflow.note.content"].startswith("val macro F1 0.")
    logged = mlflow.get_logged_model(finished_run["outcome"].model_uri.removeprefix("models:/"))
    assert logged.name == "train-digits-test_efficientnet"


def test_per_class_metrics_equal_scikit_learn_on_the_kept_predictions(finished_run):
    from sklearn.metrics import f1_score, precision_score, recall_score

    run, local = finished_run["run"], finished_run["local"]
    table = pd.read_csv(f"{local}/evaluation/val_predictions.csv", dtype={"label": str})
    truth, predicted = table["label"], table["predicted"].astype(str)
    step = int(run.data.params["best_step"])
    client = mlflow.MlflowClient()
    for kind, score in (("f1", f1_score), ("precision", precision_score), ("recall", recall_score)):
        expected = score(truth, predicted, labels=list("0123"), average=None, zero_division=0)
        for name, value in zip("0123", expected, strict=True):
            history = client.get_metric_history(run.info.run_id, f"val_{kind}/{name}")
            logged = next(m.value for m in history if m.step == step)
            assert logged == pytest.approx(value), (kind, name)


def test_the_gallery_has_exactly_one_row_per_wrong_image(finished_run):
    local = finished_run["local"]
    table = pd.read_csv(f"{local}/evaluation/val_predictions.csv", dtype=str)
    wrong = pd.read_csv(f"{local}/evaluation/misclassified.csv", dtype={"true": str})
    assert list(wrong.columns) == ["path", "true", "predicted", "p_predicted", "p_true"]
    expected = table.loc[table["label"] != table["predicted"], "path"]
    assert sorted(wrong["path"]) == sorted(expected)
    assert (wrong["p_true"] <= wrong["p_predicted"]).all()
    assert wrong["p_true"].is_monotonic_increasing  # the most confidently wrong first


def test_confusion_matrix_images_are_logged_per_step(finished_run):
    client = mlflow.MlflowClient()
    run_id = finished_run["run"].info.run_id
    files = [f.path for f in client.list_artifacts(run_id, "images")]
    # MLflow names them images/<key>+step+<step>+timestamp+...png (plus a .webp thumbnail)
    steps = {
        int(name.split("+step+")[1].split("+")[0])
        for name in files
        if name.startswith("images/confusion_matrix+") and name.endswith(".png")
    }
    assert steps == {0, 1, 2}


def test_every_artifact_is_logged(finished_run):
    expected = {
        "config.yaml",
        "data/split.csv",
        "data/skipped_images.csv",
        "evaluation/confusion_matrix.json",
        "evaluation/confusion_matrix.png",
        "evaluation/classification_report.json",
        "evaluation/classification_report.txt",
        "evaluation/val_predictions.csv",
        "evaluation/misclassified.csv",
        "evaluation/misclassified.png",
        "evaluation/reliability.json",
        "plots/learning_curves.png",
        "plots/probability_distribution.png",
        "plots/reliability.png",
        "checkpoints/best_stage1.pt",
        "checkpoints/best_stage2.pt",
        "checkpoints/final.pt",
    }
    assert expected <= finished_run["artifacts"]
    local = finished_run["local"]
    matrix = json.loads(open(f"{local}/evaluation/confusion_matrix.json").read())
    assert np.asarray(matrix["counts"]).sum() == 8  # 40 readable images, 20 % validation
    skipped = pd.read_csv(f"{local}/data/skipped_images.csv")
    assert skipped["path"].str.endswith("corrupt.png").all()
    split = pd.read_csv(f"{local}/data/split.csv")
    assert set(split["split"]) == {"train", "val"} and len(split) == 40


def test_dataset_is_a_run_input_with_digest(finished_run):
    inputs = finished_run["run"].inputs.dataset_inputs
    assert len(inputs) == 1
    assert inputs[0].dataset.digest
    assert any(t.key == "content_digest" for t in inputs[0].tags)


def test_logged_model_reloads_and_predicts_like_the_checkpoint(finished_run):
    model = finished_run["model"]
    assert not model.training
    info = mlflow.models.get_model_info(finished_run["outcome"].model_uri)
    meta = info.metadata
    assert meta["class_names"] == ["0", "1", "2", "3"] and meta["image_size"] == 32
    assert info.signature is not None
    # The best epoch's stage checkpoint holds the very weights of the logged model.
    reloaded = load_checkpoint(f"{finished_run['local']}/checkpoints/best_stage{meta['stage']}.pt")
    images = np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        logged = model(torch.from_numpy(images)).numpy()
        from_checkpoint = reloaded(torch.from_numpy(images)).numpy()
    pyfunc = mlflow.pyfunc.load_model(finished_run["outcome"].model_uri).predict(images)
    assert np.allclose(logged, np.asarray(pyfunc), atol=1e-5)
    assert np.allclose(logged, from_checkpoint, atol=1e-5)
    other_stage = load_checkpoint(
        f"{finished_run['local']}/checkpoints/best_stage{3 - meta['stage']}.pt"
    )
    with torch.no_grad():  # and the check can fail: the other stage's weights differ
        assert not np.allclose(logged, other_stage(torch.from_numpy(images)).numpy(), atol=1e-3)


def test_the_logged_model_is_linked_to_the_epoch_whose_weights_it_holds(finished_run):
    outcome = finished_run["outcome"]
    best_step = next(
        r["step"] for r in outcome.history if r["val_loss"] == outcome.best["val_loss"]
    )
    assert best_step > 0
    logged = mlflow.get_logged_model(outcome.model_uri.removeprefix("models:/"))
    linked = {m.key: m for m in logged.metrics}
    assert linked["val/f1_macro"].step == best_step
    assert linked["val/f1_macro"].value == pytest.approx(outcome.best["val_f1_macro"])
    assert linked["val/loss"].value == pytest.approx(outcome.best["val_loss"])


def test_val_predictions_match_the_logged_model(finished_run, digits_dir):
    outcome, model = finished_run["outcome"], finished_run["model"]
    table = pd.read_csv(f"{finished_run['local']}/evaluation/val_predictions.csv")
    from training.data import decode_image

    meta = mlflow.models.get_model_info(outcome.model_uri).metadata
    run = mlflow.get_run(outcome.run_id)
    # What ran is what the model carries: test_efficientnet's timm crop, logged as a param.
    assert meta["crop_pct"] == float(run.data.params["crop_pct"]) == 0.95
    transform = eval_transform(meta["image_size"], meta["mean"], meta["std"], meta["crop_pct"])
    images = [decode_image(p, decode_side(32, meta["crop_pct"])) for p in table["path"]]
    labels = [int(v) for v in table["label"]]
    loader = make_loader(ImageArrayDataset(images, labels, transform), 8, False, 0)
    probs, _ = predict_probs(model, loader, torch.device("cpu"), progress=False)
    stored = table[[c for c in table.columns if c.startswith("prob_")]].to_numpy()
    assert np.allclose(probs, stored, atol=1e-4)
    assert np.allclose(outcome.val_probs, stored, atol=1e-6)


def test_an_image_at_a_step_is_logged_before_the_call_returns(tracking):
    """mlflow.log_image's default queues it: the run's end then idled up to 1 s (a poll of
    that queue) per run, about 4 s of a k-fold job."""
    with RunTracker("tests") as tracker:
        tracker.log_image_at_step(np.zeros((8, 8, 3), dtype=np.uint8), "confusion_matrix", 3)
        store = mlflow.tracking._get_store()
        assert store._async_logging_queue.is_idle()  # nothing queued for end_run to wait on
        files = [f.path for f in mlflow.MlflowClient().list_artifacts(tracker.run_id, "images")]
        assert any(name.startswith("images/confusion_matrix+step+3+") for name in files)


def test_a_run_that_raises_ends_failed(tracking, tiny_config):
    from training.job_data import load_job_data as load_data

    data = load_data(tiny_config)
    plan = plan_training(tiny_config, data, holdout_split(data.labels, None, 0.2, 0))

    def explode(record):
        raise RuntimeError("boom in epoch callback")

    with pytest.raises(RuntimeError, match="boom"):
        with RunTracker("tests") as tracker:
            execute(plan, tracker, on_epoch=explode, progress=False)
    runs = all_runs()
    assert runs["status"].tolist() == ["FAILED"]
    assert "boom" in runs["tags.error"].iloc[0]


def test_an_interrupted_run_ends_killed(tracking):
    with pytest.raises(KeyboardInterrupt):
        with RunTracker("tests"):
            raise KeyboardInterrupt
    assert all_runs()["status"].tolist() == ["KILLED"]


def test_the_mlflow_run_launcher_is_nested_under_the_jobs_own_run(tracking, monkeypatch):
    """`mlflow run` logs every MLproject parameter as typed ('' = not given) on the run it
    makes; the job's resolved values go on the job's own top run, the launcher under it."""
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("tests")
    launcher = client.create_run(experiment, tags={"mlflow.project.entryPoint": "train"})
    launcher_id = launcher.info.run_id
    client.log_param(launcher_id, "model", "''")
    monkeypatch.setenv("MLFLOW_RUN_ID", launcher_id)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment)
    with RunTracker("", params={"model": "tf_efficientnet_lite0"}) as job:
        assert job.run_id != launcher_id
        with RunTracker("", "fold-0", parent_run_id=job.run_id) as child:
            pass
    job_run, moved = mlflow.get_run(job.run_id), mlflow.get_run(launcher_id)
    assert "mlflow.parentRunId" not in job_run.data.tags  # the job's run is at the top
    assert job_run.data.params["model"] == "tf_efficientnet_lite0"
    assert moved.data.tags["mlflow.parentRunId"] == job.run_id
    assert moved.data.tags["mlflow.runName"] == "mlflow run -e train"
    assert "command line as typed" in moved.data.tags["mlflow.note.content"]
    assert mlflow.get_run(child.run_id).data.tags["mlflow.parentRunId"] == job.run_id
    assert "MLFLOW_RUN_ID" not in os.environ  # no later run can mistake itself for it


def test_a_jobs_experiment_has_the_headline_view_of_its_runs_table(tracking):
    """The MLflow UI's default runs table shows no metric: each job's experiment gets a saved
    view (the UI's "Views" list) with the headline metric columns, written once."""
    with RunTracker("tests") as job:
        with RunTracker("tests", "fold 0", parent_run_id=job.run_id):
            pass
    experiment = mlflow.get_experiment_by_name("tests")
    view = json.loads(experiment.tags[SAVED_VIEW_TAG + HEADLINE_VIEW])
    assert view["name"] == "headline metrics" and isinstance(view["createdAt"], int)
    columns = json.loads(view["state"])["selectedColumns"]
    assert columns[:4] == [
        "metrics.`honest_val_f1_macro`",  # the k-fold number to quote, first
        "metrics.`oof_f1_macro`",
        "metrics.`mean_val_f1_macro`",
        "metrics.`std_val_f1_macro`",
    ]
    with RunTracker("tests"):
        pass  # a later job leaves the saved view as it was
    again = mlflow.get_experiment_by_name("tests").tags[SAVED_VIEW_TAG + HEADLINE_VIEW]
    assert json.loads(again) == view


def test_experiment_name_naming_another_experiment_than_mlflow_runs_is_refused(
    tracking, monkeypatch, tiny_config, capsys
):
    experiment = mlflow.MlflowClient().create_experiment("launched-here")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment)
    argv = [f"--{k}={v}" for k, v in TINY.items() if k != "experiment_name"]
    argv += ["--data", tiny_config.data, "--experiment_name", "elsewhere"]
    assert train.main(argv) == 2
    error = capsys.readouterr().err
    assert "parameter 'experiment_name': 'elsewhere'" in error
    assert "mlflow run --experiment-name elsewhere" in error
    assert mlflow.search_runs(experiment_ids=[experiment]).empty
    assert mlflow.get_experiment_by_name("elsewhere") is None
