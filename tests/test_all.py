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


def test_the_most_epochs_that_fit_for_every_fold():
    costs = RunCosts(frozen_s=1.0, epoch_s=10.0, predict_s=0.0, n_folds=5)
    assert epochs_that_fit(costs, 3, 1, False, seconds=1000) == 3
    assert epochs_that_fit(costs, 3, 1, False, seconds=100) == 2  # 5 folds x 2 epochs = 100 s
    assert epochs_that_fit(costs, 3, 3, True, seconds=100) == 1  # the screening's 2 epochs take the second
    assert epochs_that_fit(costs, 3, 1, False, seconds=49) == 0


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
        assert step["epochs"] == 1 and step["unfrozen_done"] and step["unfroze"]
        history = pd.read_csv(Paths(cfg).fold_dir(slug, 0) / "history.csv")
        assert set(history["phase"]) == {"frozen", "unfrozen"}  # the fine-tuned run replaced the frozen-only one
    first = min(state["models"], key=lambda s: -state["models"][s]["frozen_cv"])
    assert out.index(f"{first}: 1 unfrozen epoch") < out.index(f"{sorted(set(state['models']) - {first})[0]}: 1 unf")
    assert board.exists() and (Paths(cfg).submissions_dir / "demo-mean.csv").exists()
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
    assert "frozen-only, " in out.splitlines()[-1] and "of 5 min" in out.splitlines()[-1]


def test_a_bad_budget_is_one_line(make_config, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    from pipeline.config.schema import dump_config
    path.write_text(dump_config(make_config()))
    assert cli.main(["all", "-c", str(path), "--budget", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--budget 0" in err
    assert not (tmp_path / "runs").exists()  # nothing written
