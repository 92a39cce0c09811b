"""Promotion of a real tiny k-fold job, the ensemble pyfunc, predict, ONNX and a served model."""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import requests
import torch
from conftest import TINY
from PIL import Image, ImageOps
from sklearn.datasets import load_digits
from sklearn.metrics import f1_score

from registry import explain as explain_job
from registry import onnx_export, predict
from registry import promote as promote_job
from registry.config import ExplainConfig, OnnxExportConfig, PredictConfig, PromoteConfig
from registry.ensemble import FORWARD_BATCH
from registry.images import Preprocessing, member_batch
from registry.tta import MAX_VIEWS, tta_views
from training import gradcam
from training.calibration import fit_temperature, scaled_log_probs
from training.data import decode_image
from training.fold_runs import latest_finished_fold_runs
from training.kfold_folds import train_fold
from training.kfold_job import KFoldConfig, prepare_job
from training.kfold_pipeline import run_kfold
from training.model import create_classifier
from training.tracking import load_artifact_csv
from training.transforms import decode_side, eval_transform, to_tensor

JOB = {**TINY, "stage1_epochs": 1, "stage2_epochs": 1, "folds": 3}
MODEL = "digits"


@pytest.fixture(scope="module")
def reg(tmp_path_factory, digits_dir, migrated_store):
    """A real k-fold job (3 folds) promoted once (top 2); shared by every test here."""
    folder = tmp_path_factory.mktemp("registry")
    shutil.copy(migrated_store, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
            patch.delenv(name, raising=False)
        patch.chdir(folder)
        mlflow.set_tracking_uri(uri)
        kfold = run_kfold(KFoldConfig(data=str(digits_dir), **JOB))
        cfg = PromoteConfig(experiment_name="tests", top_k=2, model_name=MODEL)
        outcome = promote_job.promote(cfg)
        yield SimpleNamespace(
            folder=folder,
            uri=uri,
            kfold=kfold,
            cfg=cfg,
            outcome=outcome,
            client=mlflow.MlflowClient(),
            model=mlflow.pyfunc.load_model(f"models:/{MODEL}@champion"),
        )


def _versions(client, name: str) -> list:
    return client.search_model_versions(f"name = '{name}'")


def _runs(client) -> list:
    experiment = client.get_experiment_by_name("tests")
    return client.search_runs([experiment.experiment_id])


def _job_runs(client, job: str) -> list:
    """Runs of one job, newest first."""
    runs = [r for r in _runs(client) if r.data.tags.get("job") == job]
    return sorted(runs, key=lambda r: r.info.start_time, reverse=True)


def _model_id(version) -> str:
    """The LoggedModel behind a registry version (the SQL registry keeps it in `source`)."""
    return version.model_id or version.source.removeprefix("models:/")


def _champion(client) -> str:
    return str(client.get_model_version_by_alias(MODEL, "champion").version)


def _image_paths(root: Path, per_class: int = 2) -> list[str]:
    return [str(p) for c in "0123" for p in sorted((root / c).glob("*.png"))[:per_class]]


def _b64(path: str | Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def test_top_k_folds_are_registered_as_members_with_tags(reg):
    runs = {r: reg.client.get_run(r) for r in reg.kfold.fold_run_ids}
    best = sorted(runs, key=lambda r: -runs[r].data.metrics["best_val_f1_macro"])[:2]
    members = _versions(reg.client, f"{MODEL}-members")
    assert sorted(v.tags["source_run_id"] for v in members) == sorted(best)
    for version in members:
        run = runs[version.tags["source_run_id"]]
        assert version.tags["fold"] == run.data.tags["fold"]
        assert version.tags["kfold_run_id"] == reg.kfold.parent_run_id
        assert version.tags["metric"] == "best_val_f1_macro"
        assert float(version.tags["metric_value"]) == run.data.metrics["best_val_f1_macro"]
    tags = reg.client.get_model_version(MODEL, reg.outcome.version).tags
    assert tags["kfold_run_id"] == reg.kfold.parent_run_id
    assert [tags[k] for k in ("top_k", "metric", "method", "tta")] == [
        "2",
        "best_val_f1_macro",
        "arithmetic",
        "2",
    ]
    promote_run = reg.client.get_run(reg.outcome.run_id)
    assert promote_run.data.tags["job"] == "promote" and promote_run.info.status == "FINISHED"


def test_alias_resolves_to_the_self_contained_ensemble(reg, tmp_path):
    assert _champion(reg.client) == reg.outcome.version
    info = mlflow.models.get_model_info(f"models:/{MODEL}@champion")
    assert "python_function" in info.flavors and "pytorch" not in info.flavors
    folds = reg.client.get_model_version(MODEL, reg.outcome.version).tags["folds"]
    assert ",".join(str(m["fold"]) for m in info.metadata["members"]) == folds
    assert {p.name for p in info.signature.params.params} == {"method", "tta", "calibrated"}
    local = Path(
        mlflow.artifacts.download_artifacts(f"models:/{MODEL}@champion", dst_path=str(tmp_path))
    )
    members, _ = onnx_export.find_members(local)
    assert len(members) == 2 and all((m.folder / "MLmodel").is_file() for m in members)


def test_promoting_again_creates_no_new_versions(reg):
    before = (len(_versions(reg.client, MODEL)), len(_versions(reg.client, f"{MODEL}-members")))
    again = promote_job.promote(reg.cfg)
    assert again.reused and again.version == reg.outcome.version
    assert again.member_versions == reg.outcome.member_versions
    assert (
        len(_versions(reg.client, MODEL)),
        len(_versions(reg.client, f"{MODEL}-members")),
    ) == before
    # Another voting default is another ensemble; its members are the same versions.
    other = PromoteConfig(
        experiment_name="tests", top_k=2, model_name=MODEL, method="geometric", alias="challenger"
    )
    challenger = promote_job.promote(other)
    assert not challenger.reused and challenger.version != reg.outcome.version
    assert challenger.member_versions == reg.outcome.member_versions
    assert len(_versions(reg.client, f"{MODEL}-members")) == before[1]
    assert _champion(reg.client) == reg.outcome.version


def _fan_out(digits_dir, **flags):
    """One invocation of the k-fold job with the fan-out flags (prepare_only, parent, fold)."""
    return run_kfold(KFoldConfig(data=str(digits_dir), **JOB, **flags))


def test_promotion_follows_the_fold_runs_that_finished_since(tracking, digits_dir):
    """A partly finished job is promoted, another fold finishes, a fold is re-run: each
    promotion names the runs it chose, and a changed choice is a new ensemble version."""
    job = _fan_out(digits_dir, prepare_only=True).parent_run_id
    _fan_out(digits_dir, parent_run_id=job, fold=0)
    client = mlflow.MlflowClient()

    def promote(direction: str, top_k: int = 1):
        cfg = PromoteConfig(
            kfold_run_id=job,
            top_k=top_k,
            metric="best_val_loss",  # continuous: two folds do not tie
            direction=direction,
            model_name=MODEL,
            alias=f"{direction}{top_k}",
        )
        return promote_job.promote(cfg)

    # Both directions pick fold 0 now; once fold 1 exists exactly one of them picks it.
    first = {direction: promote(direction) for direction in ("min", "max")}
    fold0_run = first["min"].plan.member_run_ids
    assert fold0_run == first["max"].plan.member_run_ids and len(fold0_run) == 1
    assert first["min"].plan.calibration.folds == [0]  # calibrated on what has finished
    _fan_out(digits_dir, parent_run_id=job, fold=1)
    moved = []
    for direction, before in first.items():
        after = promote(direction)
        chosen = after.plan.member_run_ids
        moved.append(chosen != fold0_run)
        # Fold 1's out-of-fold predictions change the temperature and the figures: a new
        # version even where the chosen run stayed; the same promotion again reuses it.
        assert not after.reused and after.version != before.version
        assert after.plan.calibration.folds == [0, 1]
        again = promote(direction)
        assert again.reused and again.version == after.version
        tags = client.get_model_version(MODEL, after.version).tags
        assert tags["member_run_ids"] == ",".join(chosen)
        assert tags["promotion_key"] == after.plan.key
        assert tags["oof_folds"] == "0,1"
        # The members' fold aliases follow the ensemble alias: a fold that left is unaliased.
        aliases = client.get_registered_model(f"{MODEL}-members").aliases
        prefix = f"{direction}1-fold-"
        assert {a for a in aliases if a.startswith(prefix)} == {
            f"{prefix}{fold.fold}" for fold in after.plan.selected
        }
    assert moved.count(True) == 1

    # A second FINISHED run of fold 0 (a retry, or two fan-out processes on one fold):
    # the newest run of the fold counts, in the fold-run rule and in the ensemble.
    rerun = train_fold(prepare_job(KFoldConfig(data=str(digits_dir), **JOB)), 0, job)
    counted = latest_finished_fold_runs(job, 3)
    assert sorted(counted) == [0, 1] and counted[0].info.run_id == rerun
    both = promote("min", top_k=2)
    assert not both.reused
    assert sorted(both.plan.member_run_ids) == sorted([rerun, counted[1].info.run_id])
    members = mlflow.models.get_model_info(f"models:/{MODEL}@min2").metadata["members"]
    assert {member["run_id"] for member in members} == set(both.plan.member_run_ids)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--top_k", "4"], "parameter 'top_k': 4 is more than the 3 finished fold run(s)"),
        (["--metric", "best_val_f2"], "parameter 'metric': unknown metric 'best_val_f2'"),
        (["--kfold_run_id", "FOLD0"], "is not a k-fold parent run (its tag job is 'train'"),
        (["--experiment_name", "nope"], "parameter 'experiment_name': no experiment 'nope'"),
    ],
)
def test_promote_errors_exit_2_and_write_nothing(reg, capsys, argv, message):
    argv = [reg.kfold.fold_run_ids[0] if a == "FOLD0" else a for a in argv]
    before = (len(_versions(reg.client, MODEL)), len(_runs(reg.client)))
    code = promote_job.main(["--experiment_name", "tests", "--model_name", MODEL, *argv])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert (len(_versions(reg.client, MODEL)), len(_runs(reg.client))) == before


def test_temperature_is_fitted_on_the_out_of_fold_predictions(reg):
    """T minimises the NLL of the k-fold job's out-of-fold probabilities (logs as logits);
    the promote run carries it, ECE and NLL before / after, and both reliability diagrams."""
    oof = load_artifact_csv(
        reg.kfold.parent_run_id, "evaluation/oof_predictions.csv", dtype={"label": str}
    )
    names = reg.outcome.plan.class_names
    targets = oof["label"].map({name: i for i, name in enumerate(names)}).to_numpy()
    log_probs = np.log(oof[[f"prob_{name}" for name in names]].to_numpy())
    temperature = fit_temperature(log_probs, targets)
    run = reg.client.get_run(reg.outcome.run_id)
    metrics = run.data.metrics
    assert metrics["temperature"] == pytest.approx(temperature, rel=1e-6)

    def nll(t: float) -> float:
        return float(-scaled_log_probs(log_probs, t)[np.arange(len(targets)), targets].mean())

    assert metrics["oof_nll_uncalibrated"] == pytest.approx(nll(1.0), rel=1e-6)
    assert metrics["oof_nll_calibrated"] == pytest.approx(nll(temperature), rel=1e-6)
    assert metrics["oof_nll_calibrated"] < metrics["oof_nll_uncalibrated"]
    assert {"oof_ece_uncalibrated", "oof_ece_calibrated"} <= set(metrics)
    names = {a.path for a in reg.client.list_artifacts(run.info.run_id, "calibration")}
    assert names == {
        "calibration/temperature.json",
        "calibration/oof_reliability_uncalibrated.png",
        "calibration/oof_reliability_calibrated.png",
    }


def test_champion_version_shows_its_out_of_fold_figures_and_folds(reg):
    """The version's LoggedModel holds the job's out-of-fold figures; the version says in
    one line which job, folds, F1 and temperature; each member version says its fold, and
    <alias>-fold-<n> aliases point at the champion's members."""
    version = reg.client.get_model_version(MODEL, reg.outcome.version)
    parent = reg.client.get_run(reg.kfold.parent_run_id)
    logged = mlflow.get_logged_model(_model_id(version))
    on_model = {metric.key: metric.value for metric in logged.metrics}
    for key in ("oof_f1_macro", "oof_accuracy", "oof_precision_macro", "oof_recall_macro"):
        assert on_model[key] == pytest.approx(parent.data.metrics[key])
    assert on_model["oof_ece_uncalibrated"] == pytest.approx(parent.data.metrics["oof_ece"])
    assert on_model["temperature"] == pytest.approx(reg.outcome.plan.calibration.temperature)
    assert version.run_id == reg.outcome.run_id == version.tags["promote_run_id"]
    assert version.tags["kfold_run_id"] == reg.kfold.parent_run_id
    description = version.description
    assert "\n" not in description and parent.info.run_name in description
    assert f"Out-of-fold macro F1 {parent.data.metrics['oof_f1_macro']:.4f}" in description
    assert f"temperature {reg.outcome.plan.calibration.temperature:.3f}" in description
    folds = [fold.fold for fold in reg.outcome.plan.selected]
    assert f"Folds {', '.join(map(str, folds))} (top 2" in description
    assert logged.tags["mlflow.note.content"] == description  # the model page says it too
    members = f"{MODEL}-members"
    for fold, number in zip(folds, reg.outcome.member_versions, strict=True):
        member = reg.client.get_model_version(members, number)
        assert member.description.startswith(f"fold {fold} of k-fold run '{parent.info.run_name}'")
        by_alias = reg.client.get_model_version_by_alias(members, f"champion-fold-{fold}")
        assert str(by_alias.version) == number


def _member_logits(member_uri: str, paths: list[str]) -> np.ndarray:
    info = mlflow.models.get_model_info(member_uri).metadata
    model = mlflow.pytorch.load_model(member_uri)
    size, crop_pct = info["image_size"], info["crop_pct"]
    transform = eval_transform(size, info["mean"], info["std"], crop_pct)
    side = decode_side(size, crop_pct)
    batch = torch.stack([to_tensor(transform(image=decode_image(p, side))["image"]) for p in paths])
    with torch.no_grad():
        return model(batch).numpy()


def test_ensemble_matches_its_members_computed_by_hand(reg, digits_dir):
    """Calibrated (the default): each member's logits / T, softmax, weighted mean; with
    calibrated=false the same without T (the ensemble as it was before calibration)."""
    paths = _image_paths(digits_dir)
    meta = mlflow.models.get_model_info(f"models:/{MODEL}@champion").metadata
    temperature = reg.outcome.plan.calibration.temperature
    assert meta["temperature"] == temperature and temperature != 1.0
    logits = [_member_logits(member["model_uri"], paths) for member in meta["members"]]
    weights = [member["weight"] for member in meta["members"]]
    for params, t in [({}, temperature), ({"calibrated": False}, 1.0)]:
        out = reg.model.predict(
            pd.DataFrame({"path": paths}), params={"method": "weighted", "tta": 1, **params}
        )
        expected = sum(
            w * torch.softmax(torch.from_numpy(z) / t, 1).numpy()
            for w, z in zip(weights, logits, strict=True)
        )
        probs = out[[f"prob_{c}" for c in meta["class_names"]]].to_numpy(dtype=float)
        assert np.allclose(probs, expected, atol=1e-6), params
        assert out["label"].tolist() == [meta["class_names"][i] for i in expected.argmax(1)]
        assert (out["error"] == "").all()
    # The temperature really changes the answer (T of these barely trained members is far
    # from 1), so the two comparisons above check different things.
    assert abs(np.log(temperature)) > 0.1


def test_chunked_requests_give_the_same_answer(reg, digits_dir):
    """A request is decoded, viewed and forwarded in chunks of images; the chunk size (here
    one image per chunk) changes nothing, error rows included."""
    paths = _image_paths(digits_dir, 3)
    paths[4:4] = ["/no/such/file.png"]
    frame = pd.DataFrame({"path": paths})
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")  # not the shared one
    ensemble = model.unwrap_python_model()
    for method in ("geometric", "hard"):
        whole = model.predict(frame, params={"method": method, "tta": 3})  # 13 x 3 <= 64
        ensemble.forward_batch = 3
        chunked = model.predict(frame, params={"method": method, "tta": 3})
        ensemble.forward_batch = FORWARD_BATCH
        assert "file not found" in chunked.loc[4, "error"]
        pd.testing.assert_frame_equal(chunked, whole, check_exact=False, rtol=1e-6, atol=1e-7)


MEMORY_PROBE = """
import json, sys
import pandas as pd
from registry.ensemble import EnsembleModel

def status_mb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024

config, artifacts, images = json.load(open(sys.argv[1]))
model = EnsembleModel()
model.setup(config, artifacts)
request = pd.DataFrame({"image": images})
model.predict(None, request.head(8))  # torch's first-call allocations are not the request's
before = status_mb("VmRSS")
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # restart the peak (VmHWM) from the current RSS
out = model.predict(None, request)
peak = status_mb("VmHWM")
print(json.dumps({"before": before, "peak": peak, "rows": len(out), "errors": int(any(out.error))}))
"""
# Peak RSS growth allowed for the 1,000-image request: it measures 65-90 MB alone, once 162 MB
# in a full parallel run; with no chunking (the defect this guards) it grows by ~1,800 MB.
REQUEST_MEMORY_BOUND_MB = 200


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_a_large_request_runs_in_bounded_memory(digits_dir, tmp_path):
    """1,000 base64 images x 2 views at 96 px are 221 MB of float32 if built at once (the
    code before chunking did, twice over while stacking: ~410 MB over the loaded model);
    in chunks of FORWARD_BATCH views the request's peak stays at ~65 MB over it."""
    model, _ = create_classifier("test_efficientnet", 4, 0.0, "none")
    meta = {"class_names": list("0123"), "image_size": 96, "mean": [0.5] * 3, "std": [0.5] * 3}
    folder = tmp_path / "member_0"
    mlflow.pytorch.save_model(
        model.eval(),
        str(folder),
        serialization_format="pickle",
        metadata=meta,
        pip_requirements=["torch"],
    )
    member = {"key": "member_0", "fold": 0, "run_id": "r0", "model_uri": "models:/m/1"}
    member |= {"metric": "best_val_f1_macro", "metric_value": 1.0, "weight": 1.0}
    config = {"class_names": meta["class_names"], "method": "arithmetic", "tta": 2}
    images = [_b64(path) for path in _image_paths(digits_dir, 10)] * 25
    request = tmp_path / "request.json"
    request.write_text(
        json.dumps([{**config, "members": [member]}, {"member_0": str(folder)}, images])
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    probe = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(request)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert probe.returncode == 0, probe.stderr[-3000:]
    figures = json.loads(probe.stdout.strip().splitlines()[-1])
    assert figures["rows"] == 1000 and not figures["errors"]
    grown = figures["peak"] - figures["before"]
    print(f"request peak RSS {figures['peak']:.0f} MB, {grown:.0f} MB over the loaded model")
    assert grown < REQUEST_MEMORY_BOUND_MB


def test_tta_is_deterministic(reg, digits_dir):
    frame = pd.DataFrame({"path": _image_paths(digits_dir, 1)})
    np.random.seed(0)
    torch.manual_seed(0)
    first = reg.model.predict(frame, params={"tta": 5})
    np.random.seed(1)
    torch.manual_seed(1)
    pd.testing.assert_frame_equal(first, reg.model.predict(frame, params={"tta": 5}))
    single = reg.model.predict(frame, params={"tta": 1})
    assert not np.allclose(first["prob_0"], single["prob_0"])  # the views do change the input


def test_base64_and_path_rows_agree_and_bad_rows_become_errors(reg, digits_dir):
    path = _image_paths(digits_dir, 1)[0]
    frame = pd.DataFrame(
        {
            "image": [_b64(path), None, "%%% not base64", _b64(__file__), None],
            "path": [None, path, None, None, "/no/such/file.png"],
        }
    )
    out = reg.model.predict(frame)
    assert out.loc[0, "label"] and out.loc[0, "error"] == ""
    assert out.loc[0, "prob_0"] == out.loc[1, "prob_0"]
    assert "not valid base64" in out.loc[2, "error"]
    assert "unreadable image" in out.loc[3, "error"]
    assert "file not found" in out.loc[4, "error"]
    assert out.loc[2:, "label"].eq("").all() and out.loc[2:, "prob_0"].isna().all()


def test_predict_job_scores_labelled_folder_and_survives_a_corrupt_image(
    reg, digits_dir, tmp_path, capsys
):
    data = tmp_path / "test"
    shutil.copytree(digits_dir, data)
    (data / "2" / "corrupt.png").write_bytes(b"\x89PNG not really")
    output = tmp_path / "out" / "predictions.csv"
    argv = ["--model_name", MODEL, "--data", str(data), "--output", str(output)]
    explain_runs = len(_job_runs(reg.client, "explain"))
    argv += ["--explain", "2"]  # then Grad-CAM of 2 of the images, in the same process
    assert predict.main([*argv, "--experiment_name", "tests", "--batch_size", "16"]) == 0
    table = pd.read_csv(output, dtype={"label": str, "predicted": str}, keep_default_na=False)
    assert len(table) == 41 and list(table.columns[:4]) == [
        "image_id",
        "path",
        "label",
        "predicted",
    ]
    bad = table[table["image_id"] == "2/corrupt.png"].iloc[0]
    assert "unreadable image" in bad["error"] and bad["predicted"] == ""
    good = table[table["error"] == ""]
    assert len(good) == 40 and good["predicted"].isin(["0", "1", "2", "3"]).all()
    f1 = f1_score(good["label"], good["predicted"], average="macro")
    printed = capsys.readouterr().out
    assert f"test macro F1 {f1:.4f}" in printed
    assert "macro F1 [95% CI]" in printed and "member 0 (fold" in printed  # the comparison
    run = [r for r in _runs(reg.client) if r.data.tags.get("job") == "predict"][0]
    assert run.data.metrics["test_f1_macro"] == pytest.approx(f1)
    assert run.data.metrics["error_rows"] == 1
    assert run.data.params["model_version"] == reg.outcome.version
    names = {a.path for a in reg.client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/confusion_matrix.png", "evaluation/confusion_matrix.json"} <= names
    explained = _job_runs(reg.client, "explain")
    assert len(explained) == explain_runs + 1
    # The version predict scored, pinned (the alias may move), both classes explained.
    assert explained[0].data.tags["model_uri"] == f"models:/{MODEL}/{reg.outcome.version}"
    assert explained[0].data.params["target"] == "both"
    assert 1 <= explained[0].data.metrics["explained_images"] <= 2  # the corrupt one skipped
    assert "image(s) explained" in printed


def test_predict_flat_folder_to_submission_format_logs_no_run(reg, digits_dir, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for path in _image_paths(digits_dir, 1):
        shutil.copy(path, flat / Path(path).name)
    before = len(_runs(reg.client))
    output = tmp_path / "submission.csv"
    argv = ["--model_name", MODEL, "--data", str(flat), "--output", str(output)]
    assert predict.main([*argv, "--format", "submission", "--method", "hard", "--tta", "3"]) == 0
    table = pd.read_csv(output, dtype=str)
    assert list(table.columns) == ["ImageID", "ans"] and len(table) == 4
    assert table["ans"].isin(["0", "1", "2", "3"]).all()
    assert len(_runs(reg.client)) == before  # nothing to score: no predict run


def test_predict_from_a_csv_of_relative_paths(reg, digits_dir, tmp_path):
    cfg = PredictConfig(
        model_name=MODEL,
        data=str(digits_dir / "manifest.csv"),
        output=str(tmp_path / "p.csv"),
        experiment_name="tests",
        method="geometric",
    )
    outcome = predict.run(cfg, progress=False)
    assert len(outcome.table) == 40 and (outcome.table["error"] == "").all()
    assert outcome.table["image_id"].iloc[0] == "0/d0000.png"  # as written in the CSV
    assert outcome.metrics is not None and 0 <= outcome.metrics["test_f1_macro"] <= 1


def test_labelled_predict_scores_the_version_and_compares_the_variants(reg, digits_dir, tmp_path):
    """The test figures land on the version's LoggedModel, the run records that model as
    its input, and one table compares members, voting methods, TTA and calibration."""
    cfg = PredictConfig(
        model_name=MODEL, data=str(digits_dir), output=str(tmp_path / "p.csv"), seed=3
    )
    outcome = predict.run(cfg, progress=False)
    run = reg.client.get_run(outcome.run_id)
    version = reg.client.get_model_version(MODEL, reg.outcome.version)
    on_model = {m.key: m.value for m in mlflow.get_logged_model(_model_id(version)).metrics}
    for key in ("test_f1_macro", "test_accuracy", "test_ece_calibrated", "test_ece_uncalibrated"):
        assert on_model[key] == pytest.approx(run.data.metrics[key])
    assert [i.model_id for i in run.inputs.model_inputs] == [_model_id(version)]
    assert run.data.params["model_id"] == _model_id(version)
    assert run.data.metrics["test_ece_calibrated"] != run.data.metrics["test_ece_uncalibrated"]
    # The job's table (from cached log-probabilities) is what the pyfunc answers.
    direct = reg.model.predict(pd.DataFrame({"path": outcome.table["path"]}))
    pd.testing.assert_frame_equal(
        outcome.table[direct.columns[1:]].reset_index(drop=True), direct[direct.columns[1:]]
    )
    assert outcome.table["predicted"].tolist() == direct["label"].tolist()

    table = outcome.comparison
    folds = [fold.fold for fold in reg.outcome.plan.selected]
    members = [(f"member {r} (fold {f})", "-", n, "-") for r, f in enumerate(folds) for n in (1, 2)]
    ensemble = [
        ("ensemble", method, n, calibrated)
        for method in ("arithmetic", "geometric", "weighted", "hard")
        for n in (1, 2)
        for calibrated in (("-",) if method == "geometric" else ("no", "yes"))
    ]
    rows = list(table[["model", "method", "tta", "calibrated"]].itertuples(index=False, name=None))
    assert rows == members + ensemble
    assert (table["f1_low"] <= table["f1_macro"]).all()
    assert (table["f1_macro"] <= table["f1_high"]).all()
    assert table.loc[0, "latency_x"] == 1.0 and (table["latency_x"] > 0).all()
    used = table[(table["method"] == "arithmetic") & (table["tta"] == 2)]
    used = used[used["calibrated"] == "yes"].iloc[0]
    assert used["f1_macro"] == pytest.approx(run.data.metrics["test_f1_macro"])
    assert used["accuracy"] == pytest.approx(run.data.metrics["test_accuracy"])
    names = {a.path for a in reg.client.list_artifacts(run.info.run_id, "evaluation")}
    assert {
        "evaluation/comparison.json",
        "evaluation/comparison.csv",
        "evaluation/misclassified.csv",
        "evaluation/misclassified.png",
    } <= names
    wrong = load_artifact_csv(run.info.run_id, "evaluation/misclassified.csv", dtype=str)
    labelled = outcome.table.set_index("image_id")
    assert len(wrong) == int((labelled["predicted"] != labelled["label"]).sum())
    assert (wrong["predicted"] == labelled.loc[wrong["image_id"], "predicted"].to_numpy()).all()


def test_onnx_export_matches_torch(reg, digits_dir, tmp_path):
    member_uri = f"models:/{MODEL}-members/{reg.outcome.member_versions[0]}"
    cfg = OnnxExportConfig(model_uri=member_uri, output=str(tmp_path / "onnx"))
    [description] = onnx_export.run(cfg)
    meta = mlflow.models.get_model_info(member_uri).metadata
    prep = Preprocessing.from_metadata(meta)
    images = [decode_image(p, prep.image_size) for p in _image_paths(digits_dir)]
    batch = member_batch(images, tta_views(2), prep).numpy()
    with torch.no_grad():
        expected = mlflow.pytorch.load_model(member_uri)(torch.from_numpy(batch)).numpy()
    got = onnx_export.onnx_logits(description.with_suffix(".onnx"), batch)
    assert got.shape == (16, 4) and np.abs(got - expected).max() < 1e-4
    assert (tmp_path / "onnx" / "ensemble.json").is_file()


# The ONNX ensemble reproduced from its files with numpy, PIL and onnxruntime only.


def _np_decode(path: str, size: int) -> np.ndarray:
    """Member JSON 'preprocessing' up to the view: RGB uint8, shorter side shrunk to size."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
        if min(img.size) > size:
            scale = size / min(img.size)
            shrunk = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
            img = img.resize(shrunk, Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8)


def _np_view(image: np.ndarray, view: dict) -> np.ndarray:
    """ensemble.json 'view_recipe' (Python's round rounds halves to even, as it says)."""
    rows, cols = image.shape[:2]
    top, left = round(view["top"] * rows), round(view["left"] * cols)
    bottom = min(rows, max(top + 1, round((view["top"] + view["height"]) * rows)))
    right = min(cols, max(left + 1, round((view["left"] + view["width"]) * cols)))
    crop = image[top:bottom, left:right]
    return crop[:, ::-1] if view["flip"] else crop


def _np_centre_square(image: np.ndarray, crop_pct: float) -> np.ndarray:
    """Member JSON 'preprocessing', the centre crop (none when crop_pct is 0)."""
    if not crop_pct:
        return image
    rows, cols = image.shape[:2]
    side = max(1, round(crop_pct * min(rows, cols)))
    top, left = (rows - side) // 2, (cols - side) // 2
    return image[top : top + side, left : left + side]


def _wide_photos(folder: Path, count: int = 3) -> list[str]:
    """Non-square colour images larger than the members' input, bright at both ends: there
    the centre crop changes what a member sees (the 8 px digits are too small for a crop)."""
    digits = load_digits()
    paths = []
    for index in range(count):
        grey = (digits.images[index] * (255 / 16)).astype(np.uint8)
        image = np.repeat(np.kron(grey, np.ones((5, 7), dtype=np.uint8))[..., None], 3, axis=2)
        image[:, :8] = (255, 200, 0)
        image[:, -8:] = (0, 200, 255)
        path = folder / f"wide{index}.png"
        Image.fromarray(image).save(path)
        paths.append(str(path))
    return paths


def _linear_taps(src: int, dst: int, clamp_weights: bool) -> tuple:
    """Source indices and 11-bit weights of OpenCV's INTER_LINEAR (half-pixel centres; at the
    left/right edges the weights are clamped, at the top/bottom only the row indices)."""
    at = ((np.arange(dst) + 0.5) * (1 / (dst / src)) - 0.5).astype(np.float32)
    first = np.floor(at).astype(np.int64)
    frac = at - first.astype(np.float32)
    if clamp_weights:
        frac = np.where((first < 0) | (first >= src - 1), np.float32(0), frac)
        first = np.clip(first, 0, src - 1)
    weight0 = np.rint((1 - frac) * np.float32(2048)).astype(np.int64)
    weight1 = np.rint(frac * np.float32(2048)).astype(np.int64)
    return np.clip(first, 0, src - 1), np.clip(first + 1, 0, src - 1), weight0, weight1


def _np_resize(image: np.ndarray, size: int) -> np.ndarray:
    """cv2.resize(INTER_LINEAR) of uint8 HWC, bit for bit (its fixed-point arithmetic); a
    plain float bilinear differs by 1 grey level on ~10% of the pixels."""
    r0, r1, b0, b1 = _linear_taps(image.shape[0], size, clamp_weights=False)
    c0, c1, a0, a1 = _linear_taps(image.shape[1], size, clamp_weights=True)
    wide = image.astype(np.int64)
    rows = wide[:, c0] * a0[:, None] + wide[:, c1] * a1[:, None]
    top = (rows[r0] >> 4) * b0[:, None, None] >> 16
    bottom = (rows[r1] >> 4) * b1[:, None, None] >> 16
    return np.clip((top + bottom + 2) >> 2, 0, 255).astype(np.uint8)


def _np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _onnx_ensemble(folder: Path, paths: list[str], method: str, tta: int) -> tuple:
    """(labels, probabilities) from the exported files, following ensemble.json's recipes."""
    ensemble = json.loads((folder / "ensemble.json").read_text())
    temperature = ensemble["temperature"]
    views = ensemble["views"][:tta]
    members, weights = [], []
    for name in ensemble["members"]:
        spec = json.loads((folder / name).read_text())
        size, mean, std = spec["image_size"], spec["mean"], spec["std"]
        crop_pct = spec["crop_pct"]
        inputs = []
        for path in paths:
            image = _np_decode(path, math.ceil(size / crop_pct) if crop_pct else size)
            for view in views:
                seen = _np_centre_square(_np_view(image, view), crop_pct)
                pixels = _np_resize(seen, size).astype(np.float32)
                normal = (pixels / 255 - np.float32(mean)) / np.float32(std)
                inputs.append(normal.transpose(2, 0, 1))
        session = ort.InferenceSession(str(folder / spec["file"]))
        logits = session.run([spec["output"]], {spec["input"]: np.stack(inputs)})[0]
        scaled = logits.astype(np.float64) / temperature
        per_view = _np_log_softmax(scaled).reshape(len(paths), len(views), -1)
        if method == "geometric":
            members.append(_np_log_softmax(per_view.mean(axis=1)))
        else:
            members.append(np.log(np.exp(per_view).mean(axis=1)))
        weights.append(spec["weight"] if method == "weighted" else 1.0)
    log_probs = np.stack(members)
    if method == "hard":
        votes = np.eye(log_probs.shape[-1])[log_probs.argmax(axis=-1)].sum(axis=0)
        soft = np.exp(log_probs).mean(axis=0)
        tied = votes == votes.max(axis=1, keepdims=True)
        return np.where(tied, soft, -np.inf).argmax(axis=1), votes / len(members)
    if method == "geometric":
        probs = np.exp(_np_log_softmax(log_probs.mean(axis=0)))
    else:
        probs = np.tensordot(np.asarray(weights) / sum(weights), np.exp(log_probs), axes=1)
    return probs.argmax(axis=1), probs


def test_onnx_ensemble_reproduces_the_pyfunc_with_tta(reg, digits_dir, tmp_path):
    folder = tmp_path / "onnx"
    onnx_export.run(OnnxExportConfig(model_name=MODEL, output=str(folder)))  # the champion
    ensemble = json.loads((folder / "ensemble.json").read_text())
    assert (ensemble["method"], ensemble["tta"]) == ("arithmetic", 2)
    assert ensemble["temperature"] == reg.outcome.plan.calibration.temperature != 1.0
    assert "temperature" in ensemble["voting_recipe"]
    assert ensemble["views"] == [dataclasses.asdict(view) for view in tta_views(MAX_VIEWS)]
    specs = [json.loads((folder / name).read_text()) for name in ensemble["members"]]
    assert {spec["crop_pct"] for spec in specs} == {0.95}  # test_efficientnet's timm crop
    paths = _image_paths(digits_dir, 4) + _wide_photos(tmp_path)
    names = ensemble["class_names"]
    for method, tta in [("arithmetic", 2), ("weighted", 3), ("geometric", 4), ("hard", 5)]:
        labels, probs = _onnx_ensemble(folder, paths, method, tta)
        out = reg.model.predict(
            pd.DataFrame({"path": paths}), params={"method": method, "tta": tta}
        )
        expected = out[[f"prob_{name}" for name in names]].to_numpy(dtype=float)
        # Exact up to ~1e-9 here. Tighter than 1e-4 on purpose: these barely trained members
        # give probabilities within ~0.01 of each other, so a wrong view (a crop rounded
        # down, a missed flip) moves them by only 3e-4 to 6e-4.
        assert np.abs(probs - expected).max() < 1e-6, method
        assert [names[i] for i in labels] == out["label"].tolist(), method


def test_explain_champion_ensemble_averages_its_members(reg, digits_dir, tmp_path):
    cfg = ExplainConfig(
        model_name=MODEL, data=str(digits_dir), max_images=3, experiment_name="tests"
    )
    outcome = explain_job.run(cfg)
    run = mlflow.get_run(outcome.run_id)
    assert run.data.tags["job"] == "explain" and run.data.params["members"] == "2"
    assert run.data.params["model_version"] == _champion(reg.client)
    assert 0 <= run.data.metrics["deletion_check_fraction"] <= 1
    # The ensemble's heatmap is the mean of its members' heatmaps for the ensemble's class.
    loaded = explain_job.load_explainable(cfg.resolved_model_uri, tmp_path)
    images = [decode_image(p, 32) for p in outcome.table["path"]]
    joint = gradcam.explain(loaded.members, images)
    own = [gradcam.member_heatmaps(m, images, joint.classes)[0] for m in loaded.members]
    for row, heat in enumerate(joint.heatmaps):
        mean = (own[0][row] + own[1][row]) / 2
        expected = (mean - mean.min()) / (mean.max() - mean.min())
        np.testing.assert_allclose(heat, expected, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_served_model_answers_base64_png(reg, digits_dir, tmp_path):
    port = _free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": reg.uri,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}@champion"]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    log_file = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        command,
        env=env,
        cwd=reg.folder,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: uvicorn goes down with it
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "server not up in 60 s"
            time.sleep(1)
        image = _b64(_image_paths(digits_dir, 1)[1])
        body = {"dataframe_split": {"columns": ["image"], "data": [[image], ["not base64!"]]}}
        answer = requests.post(f"{url}/invocations", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        good, bad = answer.json()["predictions"]
        assert good["label"] in {"0", "1", "2", "3"} and good["error"] == ""
        assert sum(good[f"prob_{c}"] for c in "0123") == pytest.approx(1.0)
        assert bad["label"] == "" and bad["prob_0"] is None and "base64" in bad["error"]
        body["params"] = {"calibrated": False}  # the raw logits: other probabilities
        raw = requests.post(f"{url}/invocations", json=body, timeout=60).json()["predictions"][0]
        assert sum(raw[f"prob_{c}"] for c in "0123") == pytest.approx(1.0)
        assert max(abs(raw[f"prob_{c}"] - good[f"prob_{c}"]) for c in "0123") > 1e-4
        body["params"] = {"method": "hard", "tta": 1}
        hard = requests.post(f"{url}/invocations", json=body, timeout=60).json()["predictions"][0]
        assert sorted(hard[f"prob_{c}"] for c in "0123") in ([0, 0, 0, 1], [0, 0, 0.5, 0.5])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log_file.close()
