"""Tune stage: a pruned Optuna study hands its LRs to train, resumes, shares a study between
worker processes, and refuses bad input without writing anything.

CPU, timm's tiny ``test_efficientnet`` (``weights: none``, 32 px) on the shared digits data. Most
studies are frozen-only (``tune.unfrozen_epochs=0``): the frozen phase trains the head on cached
features, so a trial costs a fraction of a second.
"""
from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time

import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from pipeline.cli import main
from pipeline.config.paths import Paths
from pipeline.config.schema import dump_config
from pipeline.core import artifacts
from pipeline.core.errors import PipelineError
from pipeline.stages import tune as tune_mod
from pipeline.stages.folds import run_folds
from pipeline.stages.train import run_train
from pipeline.stages.tune import FINISHED, run_tune, storage_url, study_name
from pipeline.training.tuned import apply_tuned

FAST = ["train.num_workers=0", "augment.train=[]"]
FROZEN_ONLY = [*FAST, "tune.frozen_epochs=1", "tune.unfrozen_epochs=0"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _study(cfg) -> optuna.Study:
    bcfg = cfg.backbones[0]
    return optuna.load_study(study_name=study_name(cfg, bcfg), storage=storage_url(cfg, bcfg))


def _tune_dir(cfg):
    return Paths(cfg).tune_dir(cfg.backbones[0].name)


def test_pruned_study_writes_best_json_that_train_uses(make_config):
    cfg = make_config(*FAST, "tune.trials=4", "tune.frozen_epochs=1", "tune.unfrozen_epochs=2", "tune.pruner=median")
    run_folds(cfg)
    out = run_tune(cfg)

    bcfg = cfg.backbones[0]
    best_path = Paths(cfg).tuned_params(bcfg.name)
    assert out == best_path.parent
    best = artifacts.read_json(best_path)
    assert set(best["params"]) == {"frozen_lr", "unfrozen_lr", "backbone_lr_mult"}
    for name, value in best["params"].items():
        low, high = getattr(cfg.tune, name)
        assert low <= value <= high
    assert best["metric"] == "accuracy" and 0 <= best["value"] <= 1
    assert best["trials"] == 4 and best["study"] == "demo-test_efficientnet"
    assert best["storage"].startswith("sqlite:///") and best["storage"].endswith("tune/study.db")

    study = _study(cfg)
    trials = study.get_trials()
    assert len(trials) == 4 and all(t.state in FINISHED for t in trials)
    assert best["pruned"] == sum(t.state == TrialState.PRUNED for t in trials)
    assert best["value"] == pytest.approx(study.best_value)
    assert trials[0].user_attrs.get("config_params") and trials[0].params == {  # the config's own LRs first
        "frozen_lr": cfg.train.frozen.lr, "unfrozen_lr": cfg.train.unfrozen.lr,
        "backbone_lr_mult": cfg.train.unfrozen.backbone_lr_mult}
    for t in trials:  # one report per epoch, steps 0..2; pruned after an unfrozen epoch, never the last
        assert set(t.intermediate_values) <= {0, 1} and 0 in t.intermediate_values  # unfrozen epochs only
        assert t.user_attrs["epochs"] == len(t.intermediate_values) + 1
        assert t.user_attrs["epochs"] == (2 if t.state == TrialState.PRUNED else 3)

    frame = pd.read_csv(out / "trials.csv")
    assert len(frame) == 4 and {"number", "state", "value", "params_frozen_lr"} <= set(frame.columns)
    for png in ("optimization_history.png", "intermediate_values.png", "lr_vs_score.png"):
        assert (out / png).stat().st_size > 1000, png
    yaml.safe_load((out / "config.yaml").read_text())

    tuned_cfg, source = apply_tuned(cfg, bcfg)  # train.use_tuned: auto and best.json exists
    assert source["lr_source"] == str(best_path)
    assert tuned_cfg.train.frozen.lr == best["params"]["frozen_lr"]
    assert tuned_cfg.train.unfrozen.lr == best["params"]["unfrozen_lr"]
    assert tuned_cfg.train.unfrozen.backbone_lr_mult == best["params"]["backbone_lr_mult"]


def test_rerun_continues_the_same_study(make_config, capsys):
    cfg = make_config(*FROZEN_ONLY, "tune.trials=2", "tune.weight_decay=[1e-4,1e-1]")
    run_folds(cfg)
    run_tune(cfg)
    first = [(t.number, t.state, t.value, t.params) for t in _study(cfg).get_trials()]
    assert len(first) == 2 and set(first[0][3]) == {"frozen_lr", "weight_decay"}

    cfg4 = make_config(*FROZEN_ONLY, "tune.trials=4", "tune.weight_decay=[1e-4,1e-1]")
    run_tune(cfg4)
    trials = _study(cfg4).get_trials()
    assert [(t.number, t.state, t.value, t.params) for t in trials[:2]] == first
    assert len(trials) == 4 and all(t.state in FINISHED for t in trials)
    assert trials[2].params != trials[0].params and trials[3].params != trials[1].params  # new draws, not replays
    assert artifacts.read_json(Paths(cfg4).tuned_params("test_efficientnet"))["trials"] == 4

    capsys.readouterr()
    run_tune(cfg4)  # target reached, report current: nothing to do
    assert "skipped" in capsys.readouterr().out
    assert len(_study(cfg4).get_trials()) == 4


def test_two_workers_share_one_study(make_config, monkeypatch):
    """The parent's first trial waits until the worker process has started one, so both run
    trials at the same time; the study still ends with exactly tune.trials finished trials."""
    cfg = make_config(*FROZEN_ONLY, "tune.trials=6", "tune.pruner=none")
    run_folds(cfg)
    real_train_fold, waited = tune_mod.train_fold, []

    def train_fold_after_the_worker_joined(job):
        deadline = time.time() + 120
        while not waited and time.time() < deadline:
            pids = {t.user_attrs.get("pid") for t in _study(cfg).get_trials(deepcopy=False)}
            if pids - {None, os.getpid()}:
                break
            time.sleep(0.2)
        waited.append(True)
        return real_train_fold(job)

    monkeypatch.setattr(tune_mod, "train_fold", train_fold_after_the_worker_joined)
    run_tune(cfg, workers=2)

    trials = _study(cfg).get_trials()
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) == 6
    numbers = [t.number for t in trials]
    assert len(numbers) == len(set(numbers)) and sorted(numbers) == list(range(len(trials)))
    assert all(t.state != TrialState.RUNNING for t in trials)
    assert all(t.user_attrs.get("surplus") for t in trials if t.state == TrialState.FAIL)
    assert len({t.user_attrs["pid"] for t in finished}) == 2, "both processes ran trials"
    assert artifacts.read_json(Paths(cfg).tuned_params("test_efficientnet"))["trials"] == 6
    assert (_tune_dir(cfg) / "worker1.log").exists()


def test_steps_of_different_folds_do_not_collide(make_config):
    cfg = make_config(*FAST, "tune.trials=2", "tune.folds=[0,2]", "tune.frozen_epochs=2", "tune.unfrozen_epochs=0")
    run_folds(cfg)
    run_tune(cfg)
    for t in _study(cfg).get_trials():
        assert sorted(t.intermediate_values) == [0, 1, 2, 3]  # fold position x 2 epochs + epoch

    cfg = make_config(*FROZEN_ONLY, "tune.trials=2", "tune.folds=[0,1,2]", "tune.pruner=wilcoxon",
                      "runs_dir=" + str(Paths(cfg).exp_dir.parent / "wilcoxon"))
    run_tune(cfg)
    for t in _study(cfg).get_trials():
        assert sorted(t.intermediate_values) == [0, 1, 2]  # one value per fold, step = fold
        assert t.value == pytest.approx(sum(t.intermediate_values.values()) / 3)


def test_failed_trials_do_not_count_and_bad_input_stops_at_once(make_config, monkeypatch):
    cfg = make_config(*FROZEN_ONLY, "tune.trials=2")
    run_folds(cfg)
    real_train_fold, calls = tune_mod.train_fold, []

    def crash_once(job):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_train_fold(job)

    monkeypatch.setattr(tune_mod, "train_fold", crash_once)
    run_tune(cfg)
    trials = _study(cfg).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert "out of memory" in trials[0].user_attrs["error"]
    assert artifacts.read_json(Paths(cfg).tuned_params("test_efficientnet"))["trials"] == 2

    def always_crash(job):
        raise RuntimeError("broken")

    monkeypatch.setattr(tune_mod, "train_fold", always_crash)
    cfg = make_config(*FROZEN_ONLY, "tune.trials=4")
    with pytest.raises(PipelineError, match="3 trials in a row failed.*broken"):
        run_tune(cfg)

    def bad_input(job):
        raise PipelineError("image x.png cannot be read")

    monkeypatch.setattr(tune_mod, "train_fold", bad_input)
    n_before = len(_study(cfg).get_trials())
    with pytest.raises(PipelineError, match="cannot be read"):
        run_tune(cfg)
    assert len(_study(cfg).get_trials()) == n_before + 1  # no second trial after bad input


def test_a_killed_run_leaves_no_trial_running(make_config):
    cfg = make_config(*FROZEN_ONLY, "tune.trials=2")
    run_folds(cfg)
    run_tune(make_config(*FROZEN_ONLY, "tune.trials=1"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    study = _study(cfg)
    zombie = study.ask()  # as a process killed mid-trial leaves it
    zombie.set_user_attr("host", __import__("socket").gethostname())
    zombie.set_user_attr("pid", dead.pid)
    run_tune(cfg)
    trials = _study(cfg).get_trials()
    assert trials[zombie.number].state == TrialState.FAIL
    assert sum(t.state in FINISHED for t in trials) == 2


def test_changed_objective_is_an_error_and_force_starts_over(make_config):
    cfg = make_config(*FROZEN_ONLY, "tune.trials=1")
    run_folds(cfg)
    run_tune(cfg)
    changed = make_config(*FAST, "tune.trials=1", "tune.frozen_epochs=2", "tune.unfrozen_epochs=0")
    with pytest.raises(PipelineError, match="tune.frozen_epochs.*--force"):
        run_tune(changed)
    run_tune(changed, force=True)
    trials = _study(changed).get_trials()
    assert len(trials) == 1 and sorted(trials[0].intermediate_values) == [0, 1]


@pytest.mark.parametrize("words, key", [
    (["tune.trials=0"], "tune.trials"),
    (["tune.frozen_lr=[]"], "tune.frozen_lr"),
    (["tune.unfrozen_lr=[1e-2,1e-4]"], "tune.unfrozen_lr"),
    (["tune.backbone_lr_mult=[0,1]"], "tune.backbone_lr_mult"),
    (["tune.weight_decay=[1e-2]"], "tune.weight_decay"),
    (["tune.pruner=sometimes"], "tune.pruner"),
    (["tune.sampler=grid"], "tune.sampler"),
])
def test_bad_config_is_refused_by_the_config(make_config, words, key):
    with pytest.raises(PipelineError, match=key.replace(".", r"\.")):
        make_config(*words)


@pytest.mark.parametrize("words, match", [
    (["tune.storage=postgresql://nobody@127.0.0.1:1/x"], r"tune\.storage.*postgresql://nobody@127\.0\.0\.1:1/x"),
    (["tune.storage=not-a-url"], r"tune\.storage"),
    (["tune.folds=[3]"], r"tune\.folds"),
    (["tune.frozen_epochs=0", "tune.unfrozen_epochs=0"], r"tune\.frozen_epochs"),
])
def test_bad_input_writes_nothing(make_config, words, match):
    cfg = make_config(*FAST, *words)
    run_folds(cfg)
    with pytest.raises(PipelineError, match=match):
        run_tune(cfg)
    assert not Paths(cfg).exp_dir.exists()


def test_cli_reports_an_unreachable_storage_without_a_traceback(make_config, tmp_path, capsys):
    cfg = make_config(*FAST)
    run_folds(cfg)
    path = tmp_path / "exp.yaml"
    path.write_text(dump_config(cfg))
    assert main(["tune", "-c", str(path), "tune.storage=postgresql://nobody@127.0.0.1:1/x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "tune.storage" in err and "Traceback" not in err
    assert not Paths(cfg).exp_dir.exists()


def test_pruning_summary_counts_saved_epochs_and_seconds():
    start = datetime.datetime(2025, 1, 1)

    def trial(number, state, seconds, epochs):
        return optuna.trial.FrozenTrial(number, state, 0.5 if state == TrialState.COMPLETE else None, start,
                                        start + datetime.timedelta(seconds=seconds), {}, {},
                                        {"epochs": epochs, "budget_epochs": 4}, {}, {0: 0.1}, number)

    trials = [trial(0, TrialState.COMPLETE, 10.0, 4), trial(1, TrialState.COMPLETE, 12.0, 4),
              trial(2, TrialState.PRUNED, 2.0, 1), trial(3, TrialState.FAIL, 1.0, 0)]
    saving = tune_mod.pruning_saving(trials)
    assert saving["pruned"] == 1 and saving["epochs_saved"] == 3 and saving["epochs_budget"] == 12
    assert saving["seconds_full_trial"] == pytest.approx(11.0) and saving["seconds_saved"] == pytest.approx(9.0)
    assert saving["fraction_saved"] == pytest.approx(9.0 / 33.0)


def test_linear_probe_has_no_frozen_lr_to_tune(make_config):
    cfg = make_config(*FAST, "train.linear_probe=true", "tune.trials=1", "tune.frozen_epochs=3",
                      "tune.unfrozen_epochs=1")
    run_folds(cfg)
    run_tune(cfg)
    trial = _study(cfg).get_trials()[0]
    assert set(trial.params) == {"unfrozen_lr", "backbone_lr_mult"}
    assert sorted(trial.intermediate_values) == [0]  # the unfrozen epoch; the probe (epoch 0) is not judged
    assert trial.user_attrs["epochs"] == 2


def test_a_good_frozen_score_does_not_shield_a_bad_unfrozen_trial_from_pruning(make_config, monkeypatch):
    """The median pruner compares a trial's best reported value: frozen-phase scores must not be in it."""
    cfg = make_config(*FAST, "tune.trials=5", "tune.frozen_epochs=1", "tune.unfrozen_epochs=3")
    run_folds(cfg)
    calls = []

    def scripted(job):  # frozen epoch 0.99 for every trial; unfrozen 0.8 for the first two, then 0.5
        calls.append(1)
        unfrozen = 0.8 if len(calls) <= 2 else 0.5
        for epoch, value in enumerate([0.99, unfrozen, unfrozen, unfrozen]):
            job.report(epoch, value)
        return tune_mod.FoldResult(best_score=unfrozen, best_epoch=3, history=[])

    monkeypatch.setattr(tune_mod, "train_fold", scripted)
    run_tune(cfg)
    trials = _study(cfg).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2 + [TrialState.PRUNED] * 3
    assert all(t.intermediate_values == {0: 0.5} and t.user_attrs["epochs"] == 2 for t in trials[2:])
    best = artifacts.read_json(Paths(cfg).tuned_params("test_efficientnet"))
    assert best["pruned"] == 3 and best["pruning"]["epochs_saved"] == 3 * 2


def test_hyperband_pruner_runs_a_study_to_its_total(make_config, monkeypatch):
    cfg = make_config(*FAST, "tune.trials=6", "tune.frozen_epochs=1", "tune.unfrozen_epochs=3", "tune.pruner=hyperband")
    run_folds(cfg)

    def scripted(job):  # the score grows with the unfrozen LR: a clear ranking for the brackets
        value = min(1.0, job.cfg.train.unfrozen.lr * 300)
        for epoch in range(4):
            job.report(epoch, value * (epoch + 1) / 4)
        return tune_mod.FoldResult(best_score=value, best_epoch=3, history=[])

    monkeypatch.setattr(tune_mod, "train_fold", scripted)
    run_tune(cfg)
    trials = _study(cfg).get_trials()
    assert len(trials) == 6 and all(t.state in FINISHED for t in trials)
    assert all(set(t.intermediate_values) <= {0, 1, 2} for t in trials)
    best = artifacts.read_json(Paths(cfg).tuned_params("test_efficientnet"))
    assert best["value"] == pytest.approx(max(t.value for t in trials if t.state == TrialState.COMPLETE))


def test_train_says_in_its_resolved_config_where_the_tuned_lrs_came_from(make_config):
    cfg = make_config(*FROZEN_ONLY, "tune.trials=2", "train.unfrozen.epochs=0")
    run_folds(cfg)
    run_tune(cfg)
    best = artifacts.read_json(Paths(cfg).tuned_params("test_efficientnet"))
    run_train(cfg)
    text = (Paths(cfg).backbone_dir("test_efficientnet") / "config.yaml").read_text()
    assert text.splitlines()[0].startswith(f"# learning rates from {Paths(cfg).tuned_params('test_efficientnet')} "
                                           "(tuned; train.use_tuned: auto)")
    assert yaml.safe_load(text)["train"]["frozen"]["lr"] == pytest.approx(best["params"]["frozen_lr"])


@pytest.mark.parametrize("error", ["SurplusTrial", "TrialFailed"])
def test_a_trial_failed_on_purpose_is_logged_in_one_line_without_a_traceback(error):
    """Optuna logs a failed trial with its traceback; for the stage's own reasons (another worker took
    the last trial, a trial's crash already recorded) the filter run_tune installs keeps the line only."""
    import io
    import logging

    import optuna

    from pipeline.stages import tune as tune_stage

    exc = getattr(tune_stage, error)

    def objective(trial):
        raise exc("not run: another worker took the last one")

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    optuna_logger, trial_logger = logging.getLogger("optuna"), logging.getLogger(tune_stage.OPTUNA_TRIAL_LOGGER)
    optuna_logger.addHandler(handler)
    trial_logger.addFilter(tune_stage._without_traceback)
    try:
        optuna.create_study().optimize(objective, n_trials=1, catch=(exc,))
    finally:
        trial_logger.removeFilter(tune_stage._without_traceback)
        optuna_logger.removeHandler(handler)
    logged = stream.getvalue()
    assert "another worker took the last one" in logged and "Traceback" not in logged
