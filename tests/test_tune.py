"""Real tiny Optuna studies over `train`: parallel workers, pruning, resuming, divergence, CV,
a killed worker, bad parameters, and the best config fed back to `train`."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
import torch
import yaml
from conftest import all_runs

from training.config import ConfigError, TrainConfig, config_to_dict, parse_cli
from training.tracking import flatten_params, load_artifact_csv
from tuning import plots, tune
from tuning.config import TuneConfig
from tuning.space import DEFAULT_SPACE, base_trial, load_space, suggest
from tuning.study import (
    TrialSeededTPESampler,
    create_pruner,
    create_storage,
    mask_url,
    open_study,
    pruner_options,
    watching_stale_trials,
)

ROOT = Path(__file__).resolve().parents[1]


def tiny_argv(digits_dir: Path, *extra: str) -> list[str]:
    """Two epochs (one per stage) of a tiny random-init model on 40 digits."""
    return [
        *("--data", str(digits_dir), "--model", "test_efficientnet", "--pretrained", "none"),
        *("--image_size", "32", "--batch_size", "16", "--unfreeze_blocks", "2"),
        *("--stage1_epochs", "1", "--stage2_epochs", "1", "--experiment_name", "tests"),
        *extra,
    ]


def trial_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Trial runs (not fold runs, not parents)."""
    if "tags.fold" not in runs:
        runs = runs.assign(**{"tags.fold": None})
    return runs[runs["tags.trial_number"].notna() & runs["tags.fold"].isna()]


def artifact_paths(run_id: str) -> set[str]:
    client = mlflow.MlflowClient()
    found = set()
    for item in client.list_artifacts(run_id):
        children = client.list_artifacts(run_id, item.path) if item.is_dir else [item]
        found |= {child.path for child in children}
    return found


def test_two_worker_processes_share_one_study_and_a_rerun_adds_trials(
    tracking, digits_dir, tmp_path
):
    journal = tmp_path / "studies" / "shared.log"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": tracking,
        "PYTHONPATH": str(ROOT),
        "TQDM_DISABLE": "1",
    }
    # One worker never prunes, the other prunes every trial at its first report: both
    # outcomes happen for certain, and each must land under its own worker's parent run.
    workers = {
        "none": ["--pruner", "none", "--n_trials", "1"],
        "threshold:lower=1.01": ["--pruner", "threshold:lower=1.01", "--n_trials", "2"],
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tuning.tune"]
            + tiny_argv(digits_dir, "--storage", str(journal), "--study_name", "shared")
            + flags,
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for flags in workers.values()
    ]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs

    storage = create_storage(str(journal))
    study = optuna.load_study(study_name="shared", storage=storage)
    assert len(study.trials) == 3
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 3  # no repeats
    # Both workers raced to create the study; the base config was enqueued exactly once.
    origins = [t.user_attrs.get("origin", "sampled") for t in study.trials]
    assert origins.count("base config") == 1

    runs = all_runs()
    parents = runs[runs["tags.job"] == "tune"].set_index("params.pruner")
    assert sorted(parents.index) == sorted(workers)
    assert set(parents["params.storage"]) == {str(journal)}
    assert set(parents["params.storage_url"]) == {str(journal)}
    assert json.loads(parents["params.search_space_json"].iloc[0]).keys() == DEFAULT_SPACE.keys()
    assert set(parents["params.sampler"]) == {"TPESampler(seed=0, n_startup_trials=5)"}
    children = trial_runs(runs)
    assert len(children) == 3
    expected = {"none": ("COMPLETE", 1), "threshold:lower=1.01": ("PRUNED", 2)}
    for pruner, parent_id in parents["run_id"].items():
        mine = children[children["tags.mlflow.parentRunId"] == parent_id]
        state, count = expected[pruner]
        assert len(mine) == count, pruner
        assert set(mine["tags.trial_state"]) == {state}
        assert set(mine["status"]) == {"FINISHED"}

    # Optuna and MLflow agree trial by trial, and intermediate values are stepped metrics.
    by_run = children.set_index("run_id")
    client = mlflow.MlflowClient()
    for trial in study.trials:
        run_id = trial.user_attrs["mlflow_run_id"]
        assert by_run.loc[run_id, "tags.trial_state"] == trial.state.name
        assert by_run.loc[run_id, "tags.trial_number"] == str(trial.number)
        assert by_run.loc[run_id, "tags.trial_origin"] == trial.user_attrs.get("origin", "sampled")
        history = client.get_metric_history(run_id, "val/f1_macro")
        if trial.state == optuna.trial.TrialState.PRUNED:
            assert [m.step for m in history] == [0] == list(trial.intermediate_values)
            assert history[0].value == pytest.approx(trial.intermediate_values[0])
        else:
            assert [m.step for m in history] == [0, 1]
            assert by_run.loc[run_id, "metrics.trial_value"] == pytest.approx(trial.value)

    # The same command again continues the study: n_trials more, under a third parent.
    argv = tiny_argv(digits_dir, "--storage", str(journal), "--study_name", "shared")
    assert tune.main([*argv, "--n_trials", "1"]) == 0
    study = optuna.load_study(study_name="shared", storage=storage)
    assert len(study.trials) == 4
    runs = all_runs()
    parents = runs[runs["tags.job"] == "tune"]
    assert len(parents) == 3
    newest = parents.sort_values("start_time").iloc[-1]
    children = trial_runs(runs)
    assert set(children["tags.mlflow.parentRunId"]) == set(parents["run_id"])
    assert (children["tags.mlflow.parentRunId"] == newest["run_id"]).sum() == 1
    assert newest["metrics.best_value"] == pytest.approx(study.best_value)
    assert newest["params.best_trial_number"] == str(study.best_trial.number)
    assert newest["metrics.trials_complete"] == 2 and newest["metrics.trials_pruned"] == 2
    assert {
        "best_config.yaml",
        "trials.csv",
        "tune_config.yaml",
        "plots/optimization_history.png",
        "plots/param_importances.png",
        "plots/parallel_coordinate.png",
        "plots/intermediate_values.png",
    } <= artifact_paths(newest["run_id"])
    html = {p for p in artifact_paths(newest["run_id"]) if p.endswith(".html")}
    assert html == {f"plots/{name}.html" for name in plots.PLOTS}

    # The best config is a `train` config: --config accepts it and it holds the best params.
    best = parse_cli(TrainConfig, ["--config", "mlruns/best_config_shared.yaml"], "")
    for name, value in study.best_params.items():
        assert getattr(best, name) == pytest.approx(value), name
    assert (best.model, best.image_size, best.data) == ("test_efficientnet", 32, str(digits_dir))


def test_diverging_trials_are_pruned_and_the_study_goes_on(tracking, digits_dir, tmp_path, capsys):
    huge = tmp_path / "huge_lr.yaml"
    huge.write_text(yaml.safe_dump({"stage1_lr": 1e30, "stage2_lr": 1e30}))
    argv = tiny_argv(digits_dir, "--optimizer", "sgd", "--study_name", "wild")
    assert tune.main([*argv, "--search_space", str(huge), "--n_trials", "2"]) == 0
    assert "no completed trial yet" in capsys.readouterr().out
    study = optuna.load_study(study_name="wild", storage="sqlite:///mlruns/optuna.db")
    assert [t.state.name for t in study.trials] == ["PRUNED", "PRUNED"]
    runs = trial_runs(all_runs())
    assert set(runs["tags.trial_state"]) == {"PRUNED"}
    assert runs["tags.diverged"].str.contains("stage1 epoch 1: validation loss nan").all()
    assert not Path("mlruns/best_config_wild.yaml").exists()

    # Sane ranges on the same study: two trials in two threads, nested under the new parent.
    assert tune.main([*argv, "--n_trials", "2", "--n_jobs", "2"]) == 0
    study = optuna.load_study(study_name="wild", storage="sqlite:///mlruns/optuna.db")
    assert [t.state.name for t in study.trials[2:]] == ["COMPLETE", "COMPLETE"]
    runs = all_runs()
    newest = runs[runs["tags.job"] == "tune"].sort_values("start_time").iloc[-1]
    threaded = trial_runs(runs)
    threaded = threaded[threaded["tags.mlflow.parentRunId"] == newest["run_id"]]
    assert sorted(threaded["tags.trial_number"]) == ["2", "3"]
    assert set(threaded["tags.trial_state"]) == {"COMPLETE"}
    # two trials in threads share the cores instead of each taking them all
    threads = torch.get_num_threads()
    assert set(threaded["params.torch_threads"]) == {str(max(1, threads // 2))}
    best = parse_cli(TrainConfig, ["--config", "mlruns/best_config_wild.yaml"], "")
    assert best.stage1_lr == pytest.approx(study.best_params["stage1_lr"])
    assert best.stage1_lr < 1 and best.optimizer == "sgd"


def test_cv_objective_nests_one_run_per_fold_under_the_trial_run(tracking, digits_dir):
    argv = tiny_argv(digits_dir, "--cv", "2", "--pruner", "wilcoxon", "--n_trials", "1")
    assert tune.main([*argv, "--best_config", "best/cv.yaml"]) == 0
    runs = all_runs()
    parent = runs[runs["tags.job"] == "tune"]
    trial = trial_runs(runs)
    assert len(parent) == 1 and len(trial) == 1
    assert trial["tags.mlflow.parentRunId"].item() == parent["run_id"].item()
    folds = runs[runs["tags.mlflow.parentRunId"] == trial["run_id"].item()]
    assert sorted(folds["tags.fold"]) == ["0", "1"]
    assert set(folds["tags.job"]) == {"train"} and set(folds["status"]) == {"FINISHED"}
    # The value is the honest estimate: each fold read at the step where the other fold's
    # validation F1 peaks, never at its own best epoch.
    curves = [
        load_artifact_csv(run_id, "evaluation/history.csv").set_index("step")["val_f1_macro"]
        for run_id in folds.sort_values("tags.fold")["run_id"]
    ]
    honest = [curves[0][curves[1].idxmax()], curves[1][curves[0].idxmax()]]
    assert trial["metrics.trial_value"].item() == pytest.approx(sum(honest) / 2)
    history = mlflow.MlflowClient().get_metric_history(trial["run_id"].item(), "cv/val_f1_macro")
    # pruning saw fold 0 at its last step (nothing to choose on), fold 1 where fold 0 chose
    assert [m.value for m in history] == pytest.approx([curves[0].iloc[-1], honest[1]])
    study = optuna.load_study(study_name="tune", storage="sqlite:///mlruns/optuna.db")
    assert study.trials[0].value == pytest.approx(sum(honest) / 2)
    # A new study's first trial is the base config; the parent says what tuning gained on it.
    assert trial["tags.trial_origin"].item() == "base config"
    assert parent["metrics.base_value"].item() == pytest.approx(study.trials[0].value)
    assert parent["metrics.best_gain_over_base"].item() == 0
    assert Path("best/cv.yaml").is_file()


def test_under_mlflow_run_the_launchers_run_nests_under_the_study_parent(
    tracking, digits_dir, monkeypatch
):
    argv = tiny_argv(digits_dir, "--n_trials", "1", "--pruner", "threshold:lower=1.01")
    cfg = parse_cli(TuneConfig, argv, "")
    # What `mlflow run` does first: a run holding every parameter as text ('' quoted).
    launched = {k: v or "''" for k, v in flatten_params(config_to_dict(cfg)).items()}
    client = mlflow.MlflowClient()
    experiment_id = client.create_experiment("tests")
    launcher = client.create_run(experiment_id).info.run_id
    for key, value in launched.items():
        client.log_param(launcher, key, value)
    monkeypatch.setenv("MLFLOW_RUN_ID", launcher)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    assert tune.main(argv) == 0
    runs = all_runs()
    parent = runs[runs["tags.job"] == "tune"]
    assert len(parent) == 1 and parent["run_id"].item() != launcher
    assert trial_runs(runs)["tags.mlflow.parentRunId"].tolist() == parent["run_id"].tolist()
    moved = runs[runs["run_id"] == launcher]
    assert moved["tags.mlflow.parentRunId"].tolist() == parent["run_id"].tolist()
    assert parent["params.storage_url"].item() == "sqlite:///mlruns/optuna.db"


KILLED_WORKER = textwrap.dedent(
    """
    import sys, time
    from training.tracking import RunTracker
    from tuning.study import TrialSeededTPESampler, create_pruner, open_study

    sampler, pruner = TrialSeededTPESampler(0), create_pruner("none")
    study = open_study(sys.argv[1], "crash", sampler, pruner, heartbeat_seconds=1)

    def objective(trial):
        trial.suggest_float("x", 0, 1)
        if trial.number == 0:
            return 0.5
        with RunTracker("tests", run_name="worker") as parent:
            with RunTracker("tests", "trial-1", parent_run_id=parent.run_id) as run:
                trial.set_user_attr("mlflow_run_id", run.run_id)
                print("training", flush=True)
                time.sleep(600)

    study.optimize(objective, n_trials=2)
    """
)


def test_a_killed_workers_trial_ends_failed_and_nothing_else_is_lost(tracking, tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WORKER, url], cwd=tmp_path, env=env, stdout=subprocess.PIPE
    )
    assert proc.stdout.readline().strip() == b"training"
    proc.kill()  # SIGKILL: no cleanup of any kind
    proc.wait()
    time.sleep(2.5)  # past the grace period (2 x 1 s heartbeat)

    sampler, pruner = TrialSeededTPESampler(0), create_pruner("none")
    study = open_study(url, "crash", sampler, pruner, heartbeat_seconds=1)
    # The dead trial is failed and its parameters queued once more, marked as its retry.
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "WAITING"]
    failed, retry = study.trials[1:]
    assert retry.params == failed.params == {"x": failed.params["x"]}
    assert retry.system_attrs["failed_trial"] == 1
    assert study.best_value == 0.5
    runs = all_runs().set_index("tags.mlflow.runName")
    assert runs.loc["trial-1", "status"] == "FAILED"
    assert runs.loc["trial-1", "tags.trial_state"] == "FAIL"
    assert runs.loc["worker", "status"] == "KILLED"


@pytest.mark.parametrize(
    ("flag", "value", "named"),
    [
        ("--cv", "1", "cv"),
        ("--n_trials", "0", "n_trials"),
        ("--pruner", "patient", "pruner"),
        ("--pruner", "median:n_startup=1", "pruner"),
        ("--n_jobs", "0", "n_jobs"),
        ("--timeout", "-5", "timeout"),
        ("--storage", "optuna.db", "storage"),
        ("--study_trials", "-1", "study_trials"),
        ("--heartbeat_seconds", "0", "heartbeat_seconds"),
        ("--heartbeat_grace_seconds", "30", "heartbeat_grace_seconds"),
        ("--storage", "nosuchdb://user:secret@host/db", "storage"),
        ("--search_space", "missing.yaml", "search_space"),
        ("--stage2_lr", "-1", "stage2_lr"),
    ],
)
def test_bad_tune_params_name_the_parameter_before_any_run(
    tracking, digits_dir, capsys, flag, value, named
):
    assert tune.main([*tiny_argv(digits_dir), flag, value]) == 2
    err = capsys.readouterr().err
    assert f"parameter '{named}'" in err
    assert "secret" not in err
    assert all_runs().empty
    assert not Path("mlruns/optuna.db").exists()


def test_a_cv_the_data_cannot_fold_fails_before_any_run(tracking, digits_dir, capsys):
    assert tune.main([*tiny_argv(digits_dir), "--cv", "11"]) == 2
    assert "11" in capsys.readouterr().err
    assert all_runs().empty


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"learning_rate": {"low": 0.1, "high": 1}}, "unknown keys"),
        ({"dropout": {"low": 0.2, "high": 1.0}}, "'dropout' needs low <= high"),
        ({"stage1_lr": {"low": 0.0}}, "'stage1_lr' needs low > 0"),
        ({"class_weight_strength": {"low": 0.9, "high": 0.1}}, "'class_weight_strength'"),
        ({"dropout": {"low": 0.1, "step": 0.1}}, "number or a mapping"),
        ([1, 2], "must hold a mapping"),
    ],
)
def test_bad_search_space_files_name_the_parameter(tmp_path, content, message):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(ConfigError, match="parameter 'search_space'") as caught:
        load_space(path)
    assert message in str(caught.value)


def test_search_space_overrides_and_the_one_suggest_function(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("stage2_lr: {high: 0.01}\ndropout: 0.25\n")
    space = load_space(path)
    assert space["stage2_lr"] == {"low": 1e-5, "high": 0.01, "log": True}
    assert space["dropout"] == {"low": 0.25, "high": 0.25, "log": False}
    study = optuna.create_study(direction="maximize", sampler=TrialSeededTPESampler(3))
    base = TrainConfig(model="test_resnet", pretrained="none")
    params = suggest(study.ask(), space, base)
    assert set(params) == set(DEFAULT_SPACE) and params["dropout"] == 0.25
    assert 1e-5 <= params["stage2_lr"] <= 0.01
    cfg = dataclasses.replace(base, **params)  # every suggestion is a valid TrainConfig
    assert cfg.class_weight_strength == params["class_weight_strength"]
    # Fields that cannot matter are not searched.
    no_weights = dataclasses.replace(base, class_weights="none", stage1_epochs=0)
    assert set(suggest(study.ask(), space, no_weights)) == {"stage2_lr", "dropout"}


def test_trial_seeded_sampler_repeats_per_trial_number_not_per_process():
    def first_params(seed: int, n: int) -> list[dict]:
        study = optuna.create_study(sampler=TrialSeededTPESampler(seed))
        space = {"x": optuna.distributions.FloatDistribution(0, 1)}
        return [study.ask(space).params for _ in range(n)]

    one, again, other = first_params(0, 3), first_params(0, 3), first_params(1, 3)
    assert one == again  # reproducible
    assert one[0] != one[1] != one[2]  # a resumed or parallel trial n does not repeat trial 0
    assert one != other


def test_pruner_specs_and_masked_storage_urls():
    pruner = create_pruner("median:n_startup_trials=1,n_warmup_steps=3", warmup_steps=2)
    assert isinstance(pruner, optuna.pruners.MedianPruner)
    assert pruner._n_warmup_steps == 3 and pruner._n_startup_trials == 1  # the spec wins
    # The median pruner waits out stage 1 and half of stage 2 unless told otherwise; with cv
    # a step is a fold and there is nothing to wait for.
    cfg = TuneConfig(model="test_resnet", stage1_epochs=3, stage2_epochs=5)
    assert cfg.pruner_warmup_steps == 6
    assert dataclasses.replace(cfg, stage2_epochs=4).pruner_warmup_steps == 5
    assert dataclasses.replace(cfg, cv=3).pruner_warmup_steps == 0
    assert pruner_options("median", cfg.pruner_warmup_steps) == ("median", {"n_warmup_steps": 6})
    assert pruner_options("threshold:lower=0.1", 4) == ("threshold", {"lower": 0.1})
    assert isinstance(create_pruner("none"), optuna.pruners.NopPruner)
    assert isinstance(create_pruner("wilcoxon"), optuna.pruners.WilcoxonPruner)
    with pytest.raises(ConfigError, match="parameter 'pruner'"):
        create_pruner("threshold")  # needs lower or upper
    masked = mask_url("postgresql+psycopg2://optuna:s3cr3t@db.example:5432/studies")
    assert masked == "postgresql+psycopg2://optuna:***@db.example:5432/studies"
    assert mask_url("sqlite:///mlruns/optuna.db") == "sqlite:///mlruns/optuna.db"
    for password in ("pa/ss", "a:b/c", "p%2Fq", "x@y"):  # '/' used to end the masked part
        masked = mask_url(f"postgresql://optuna:{password}@db:5432/studies")
        assert password not in masked and masked.endswith("@db:5432/studies"), masked


def test_tune_config_inherits_train_validation():
    with pytest.raises(ConfigError, match="parameter 'dropout'"):
        TuneConfig(model="test_resnet", dropout=1.5)
    cfg = TuneConfig(model="test_resnet", cv=3, pruner="wilcoxon")
    assert isinstance(cfg, TrainConfig) and cfg.n_trials == 12


def test_a_new_study_starts_from_the_base_config_enqueued_once(tmp_path):
    base = TrainConfig(model="test_resnet", pretrained="none", stage1_lr=0.002, dropout=0.25)
    first = base_trial(load_space(), base)
    assert first == {
        "stage1_lr": 0.002,
        "stage2_lr": 1e-4,
        "dropout": 0.25,
        "class_weight_strength": 1.0,
    }
    outside = dataclasses.replace(base, stage2_lr=0.5)
    assert base_trial(load_space(), outside) is None  # never enqueue an out-of-range value
    no_weights = dataclasses.replace(base, class_weights="none")
    assert "class_weight_strength" not in base_trial(load_space(), no_weights)

    # Four workers open the same new study at once: only its creator enqueues the base.
    journal = str(tmp_path / "race.log")

    def open_one(_):
        sampler, pruner = TrialSeededTPESampler(0), create_pruner("none")
        return open_study(journal, "race", sampler, pruner, first_trial=first)

    with ThreadPoolExecutor(4) as pool:
        studies = list(pool.map(open_one, range(4)))
    waiting = studies[-1].get_trials(states=(optuna.trial.TrialState.WAITING,))
    assert [t.user_attrs for t in waiting] == [{"origin": "base config"}]
    trial = studies[0].ask()
    assert suggest(trial, load_space(), base) == first
    assert trial.user_attrs == {"origin": "base config"}


def test_the_pruner_judges_every_epoch_but_the_last():
    from tuning.objective import METRIC, _pruning_callback

    study = optuna.create_study(direction="maximize", pruner=create_pruner("threshold:lower=1.01"))
    early = study.ask()
    with pytest.raises(optuna.TrialPruned, match="pruned at step 0"):
        _pruning_callback(early, last_step=1)({"step": 0, METRIC: 0.5})
    last = study.ask()
    _pruning_callback(last, last_step=1)({"step": 1, METRIC: 0.5})  # stopping here saves nothing
    assert last.should_prune()  # the pruner would have; the callback did not ask
    assert study.trials[-1].intermediate_values == {1: 0.5}


def test_an_empty_storage_means_the_team_servers_database_when_it_runs(
    tracking, digits_dir, tmp_path, monkeypatch
):
    """OPTUNA_STORAGE (written by `python -m server start`) replaces the SQLite default;
    an explicit `storage` still wins."""
    team = f"sqlite:///{tmp_path / 'team-optuna.db'}"
    monkeypatch.setenv("OPTUNA_STORAGE", team)
    argv = tiny_argv(digits_dir, "--n_trials", "1", "--pruner", "none", "--stage2_epochs", "0")
    assert tune.main([*argv, "--study_name", "team"]) == 0
    assert len(optuna.load_study(study_name="team", storage=team).trials) == 1
    assert not Path("mlruns/optuna.db").exists()
    parent = all_runs().query("`tags.job` == 'tune'")
    assert parent["params.storage_url"].item() == team
    assert parent["params.storage"].item() == ""

    mine = f"sqlite:///{tmp_path / 'mine.db'}"
    assert tune.main([*argv, "--study_name", "team", "--storage", mine]) == 0
    assert len(optuna.load_study(study_name="team", storage=mine).trials) == 1
    assert len(optuna.load_study(study_name="team", storage=team).trials) == 1


def test_study_trials_stops_a_worker_once_the_study_holds_that_many(tracking, digits_dir):
    argv = tiny_argv(digits_dir, "--pruner", "none", "--stage2_epochs", "0")
    assert tune.main([*argv, "--n_trials", "1"]) == 0
    assert tune.main([*argv, "--n_trials", "5", "--study_trials", "2"]) == 0  # adds just one
    assert tune.main([*argv, "--n_trials", "5", "--study_trials", "2"]) == 0  # adds none
    study = optuna.load_study(study_name="tune", storage="sqlite:///mlruns/optuna.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    parents = all_runs().query("`tags.job` == 'tune'")
    assert sorted(parents["metrics.trials_this_run"]) == [0, 1, 1]
    # A queued trial (e.g. a dead worker's, queued for its retry) still runs in a full study.
    study.enqueue_trial(study.trials[1].params)
    assert tune.main([*argv, "--n_trials", "5", "--study_trials", "2"]) == 0
    study = optuna.load_study(study_name="tune", storage="sqlite:///mlruns/optuna.db")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used")  # ask() here
def test_a_running_worker_fails_a_dead_workers_trial_between_its_own_trials(tmp_path):
    """Optuna looks for stale trials only when a worker starts a trial; the watcher looks
    every heartbeat, so a long trial elsewhere does not keep a dead one RUNNING."""
    storage = create_storage(f"sqlite:///{tmp_path / 'stale.db'}", heartbeat_seconds=1)
    study = optuna.create_study(storage=storage, study_name="stale")
    dead = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    storage.record_heartbeat(dead._trial_id)  # its one and last heartbeat

    def state():
        return study.get_trials(deepcopy=False)[dead.number].state.name

    deadline = time.monotonic() + 60
    with watching_stale_trials(study, every_seconds=1):
        while state() == "RUNNING" and time.monotonic() < deadline:
            time.sleep(0.2)  # this worker is busy with its own trial meanwhile
    assert state() == "FAIL"
    retry = study.get_trials(deepcopy=False)[-1]
    assert retry.state.name == "WAITING" and retry.system_attrs["failed_trial"] == dead.number
    assert retry.params == dead.params
