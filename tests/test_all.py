"""``make all`` / ``python -m pipeline all``: the stages in one command, and the whole run's time
budget planned across backbones (frozen-only first, then unfrozen epochs where they fit)."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from pipeline import cli, workflows
from pipeline.config.paths import Paths
from pipeline.training.budget import RunCosts, Speeds, epochs_that_fit, run_costs

TWO = [{"name": "test_efficientnet", "weights": "none", "image_size": 32},
       {"name": "test_resnet", "weights": "none", "image_size": 32}]


def test_costs_count_the_screening_once_and_every_fold_epoch():
    costs = run_costs(Speeds(train_img_s=10.0, infer_img_s=100.0), n_train=500, n_test=100, n_folds=5, views=2)
    assert costs.frozen_s == pytest.approx((500 * 2 + 100 * 2) / 100)
    assert costs.epoch_s == pytest.approx(400 / 10 + 100 / 100)
    always = costs.unfreeze_s(3, screened_lrs=3, decides=False)
    assert always == pytest.approx(5 * (3 * costs.epoch_s + costs.predict_s))
    # auto: two extra first epochs on fold 0 (the chosen LR's run is fold 0)
    assert costs.unfreeze_s(3, 3, decides=True) == pytest.approx(always + 2 * costs.epoch_s)
    assert costs.decision_s(3, 3) == pytest.approx(5 * costs.epoch_s)
    # augment.frozen_zoom: the frozen-only path predicts through one view more; fine-tuned folds do not
    zoomed = run_costs(Speeds(train_img_s=10.0, infer_img_s=100.0), n_train=500, n_test=100, n_folds=5, views=2,
                       frozen_views=3)
    assert zoomed.frozen_s == pytest.approx((500 + 100) * 3 / 100) and zoomed.predict_s == costs.predict_s


def test_the_most_epochs_that_fit_for_every_fold():
    costs = RunCosts(frozen_s=1.0, epoch_s=10.0, predict_s=0.0, n_folds=5)
    assert epochs_that_fit(costs, 3, 1, False, seconds=1000) == 3
    assert epochs_that_fit(costs, 3, 1, False, seconds=100) == 2  # 5 folds x 2 epochs = 100 s
    assert epochs_that_fit(costs, 3, 3, True, seconds=100) == 1  # the screening's 2 epochs take the second
    assert epochs_that_fit(costs, 3, 1, False, seconds=49) == 0


def test_loading_adds_to_the_model_on_a_cpu_and_hides_behind_it_with_gpu_workers():
    cpu = Speeds(train_img_s=10.0, infer_img_s=100.0, load_img_s=50.0)
    assert cpu.train_s() == pytest.approx(0.1 + 0.02) and cpu.infer_s() == pytest.approx(0.01 + 0.02)
    gpu = Speeds(train_img_s=10.0, infer_img_s=100.0, load_img_s=50.0, overlap=4)
    assert gpu.train_s() == pytest.approx(0.1) and gpu.infer_s() == pytest.approx(0.01)  # 4 workers load 200 images/s
    assert Speeds(train_img_s=10.0, infer_img_s=100.0).train_s() == pytest.approx(0.1)  # loading not measured
    costs = run_costs(cpu, n_train=500, n_test=100, n_folds=5, views=2)
    assert costs.epoch_s == pytest.approx(400 * 0.12 + 100 * 0.03)


def test_the_measured_speeds_include_reading_the_image_files(make_config, one_torch_thread):
    from pipeline.data.images import PATH
    from pipeline.data.tables import read_train_table, task_spec
    from pipeline.training.budget import measure_speeds

    cfg = make_config()
    table = read_train_table(cfg)
    spec = task_spec(cfg, table)
    speeds = measure_speeds(cfg, cfg.backbones[0], spec, spec.encode(table), steps=1, batch=4,
                            image_paths=table[PATH])
    assert 0 < speeds.load_img_s < float("inf") and speeds.overlap == 0  # on the CPU it adds up
    assert speeds.train_s() > 1 / speeds.train_img_s


class _Stop(Exception):
    pass


def test_the_frozen_runs_time_beyond_its_estimate_is_counted_again_for_the_unfrozen_run(make_config, monkeypatch):
    """Model creation and the probe fits are in the frozen-only run's real time, not in its estimate,
    and an unfrozen run repeats them: the epochs are planned in what is left after them."""
    cfg = make_config("train.unfreeze=always", "train.unfrozen.epochs=3")
    entry = cfg.backbones[0]
    costs = RunCosts(frozen_s=100.0, epoch_s=30.0, predict_s=0.0, n_folds=5)  # 150 s per epoch of every fold

    def raise_stop(*args, **kwargs):
        raise _Stop

    monkeypatch.setattr(workflows, "run_train", raise_stop)
    planned = {}
    for frozen_s in (100.0, 400.0):  # as estimated, and 300 s over
        run = workflows.BudgetedRun(cfg, minutes=10)  # about 580 s left after the reserve
        run.state["models"] = {entry.slug: {"frozen_s": frozen_s, "frozen_cv": 0.5, "greater_is_better": True}}
        with pytest.raises(_Stop):
            run.unfreeze_pass(entry, costs, force=False)
        planned[frozen_s] = run.model(entry)
    assert planned[100.0]["epochs"] == 3 and planned[100.0]["estimate_s"] == pytest.approx(450)
    assert planned[400.0]["epochs"] == 1 and planned[400.0]["estimate_s"] == pytest.approx(300 + 150)


class _Clock:
    """A fake perf_counter that the fake stages move forward."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_fine_tuned_variant_whose_other_folds_do_not_fit_after_fold_0_is_dropped(make_config, monkeypatch):
    """Fold 0 took far longer than planned: the re-plan from its real time drops the variant before
    the other folds train, and the frozen-only model stays the backbone's model."""
    cfg = make_config("train.unfreeze=always", "train.unfrozen.epochs=3")
    entry = cfg.backbones[0]
    costs = RunCosts(frozen_s=10.0, epoch_s=10.0, predict_s=0.0, n_folds=5)  # planned: 3 epochs, ~160 s
    clock, calls = _Clock(), []
    monkeypatch.setattr(workflows.time, "perf_counter", clock)

    def fake_train(cfg, backbone=None, fold=None, force=False):
        calls.append((backbone, fold))
        clock.now += 250.0  # fold 0 alone: 250 s, so four more folds would need about 1000 s

    monkeypatch.setattr(workflows, "run_train", fake_train)
    run = workflows.BudgetedRun(cfg, minutes=10)
    run.state["models"] = {entry.slug: {"frozen_s": 10.0, "frozen_cv": 0.5, "greater_is_better": True}}
    assert run.unfreeze_pass(entry, costs, force=False) is None
    assert calls == [(f"{entry.slug}-ft", 0)]  # the other folds never started
    step = run.model(entry)
    assert step["epochs"] == 3 and "do not fit" in step["dropped"]
    assert run.unfreeze_pass(entry, costs, force=False) is None and len(calls) == 1  # resumed: still dropped


def test_views_are_added_where_they_fit_and_skipped_where_not(make_config, monkeypatch):
    cfg = make_config("augment.tta=[identity,hflip]", "augment.frozen_zoom=true")
    entry = cfg.backbones[0]
    trained = []
    monkeypatch.setattr(workflows.BudgetedRun, "_train_frozen",
                        lambda self, e, force: (trained.append(self.as_trained(e)) or 1.0, {"cv_mean": 0.6}))
    for frozen_s, fits in ((10.0, True), (400.0, False)):  # per view; two more views: 20 s or 800 s
        trained.clear()
        run = workflows.BudgetedRun(cfg, minutes=10)
        run.state["models"] = {entry.slug: {"frozen_s": frozen_s, "frozen_cv": 0.5, "greater_is_better": True}}
        run.views_pass(entry, RunCosts(frozen_s=frozen_s, epoch_s=1.0, predict_s=0.0, n_folds=5), force=False)
        assert bool(trained) is fits and bool(run.model(entry).get("views_done")) is fits
        if fits:
            assert trained[0].augment == {} and trained[0].train["unfreeze"] == "never"  # the configured views
        else:
            assert "did not fit" in run.model(entry)["views_skipped"]
            assert run.as_trained(entry).augment == workflows.CHEAP_VIEWS


def _speeds(train_img_s: float):
    return lambda cfg, bcfg, spec, targets, **how: Speeds(train_img_s=train_img_s, infer_img_s=1000.0)


@pytest.mark.slow
def test_a_generous_budget_runs_frozen_first_then_unfreezes_in_cv_order(make_config, monkeypatch, capsys,
                                                                       one_torch_thread):
    monkeypatch.setattr(workflows, "measure_speeds", _speeds(1e4))  # everything fits
    cfg = make_config("train.unfreeze=always", backbones=TWO)
    board = workflows.run_all(cfg, budget_min=60)
    out = capsys.readouterr().out
    assert "1. the frozen-only path of every backbone" in out and "time budget: used" in out
    assert out.index("1. the frozen-only path") < out.index("fold 0")  # the plan is printed first
    state = json.loads((Paths(cfg).exp_dir / "budget.json").read_text())
    for slug in ("test_efficientnet", "test_resnet"):
        step = state["models"][slug]
        assert step["epochs"] == 1 and step["unfrozen_done"] and step["views_done"]
        history = pd.read_csv(Paths(cfg).fold_dir(f"{slug}-ft", 0) / "history.csv")
        assert set(history["phase"]) == {"frozen", "unfrozen"}  # a fine-tuned variant beside the frozen-only model
        assert set(pd.read_csv(Paths(cfg).fold_dir(slug, 0) / "history.csv")["phase"]) == {"frozen"}
    first = min(state["models"], key=lambda s: -state["models"][s]["frozen_cv"])
    second = sorted(set(state["models"]) - {first})[0]
    assert out.index(f"{first}-ft: 1 unfrozen epoch") < out.index(f"{second}-ft: 1 unfrozen epoch")
    assert out.index(f"{first}: frozen-only through identity+") < out.index(f"{first}-ft: 1 unfrozen epoch")
    assert board.exists() and (Paths(cfg).submissions_dir / "demo-mean.csv").exists()
    models = set(pd.read_csv(board)["model"])
    assert {"test_efficientnet", "test_resnet", "test_efficientnet-ft", "test_resnet-ft"} <= models
    # the same command again resumes the plan and trains nothing
    written = {p: p.stat().st_mtime_ns for p in Paths(cfg).exp_dir.rglob("fold*/best.safetensors")}
    workflows.run_all(cfg, budget_min=60)
    assert "resuming the plan" in capsys.readouterr().out
    assert written and written == {p: p.stat().st_mtime_ns for p in written}


@pytest.mark.slow
def test_a_tight_budget_keeps_every_backbone_frozen_only(make_config, monkeypatch, capsys, one_torch_thread):
    monkeypatch.setattr(workflows, "measure_speeds", _speeds(1e-3))  # one unfrozen epoch would take days
    cfg = make_config("train.unfreeze=auto", backbones=TWO)
    workflows.run_all(cfg, budget_min=5)
    out = capsys.readouterr().out
    assert out.count("stays frozen-only: not one unfrozen epoch") == 2
    for slug in ("test_efficientnet", "test_resnet"):
        assert set(pd.read_csv(Paths(cfg).fold_dir(slug, 0) / "history.csv")["phase"]) == {"frozen"}
    assert "frozen-only through " in out.splitlines()[-1] and "of 5 min" in out.splitlines()[-1]


def test_a_bad_budget_is_one_line(make_config, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    from pipeline.config.schema import dump_config
    path.write_text(dump_config(make_config()))
    assert cli.main(["all", "-c", str(path), "--budget", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--budget 0" in err
    assert not (tmp_path / "runs").exists()  # nothing written
