"""train.time_budget_min: the plan from measured speeds, and a run that follows it."""
from __future__ import annotations

import pandas as pd
import pytest

from pipeline.config.paths import Paths
from pipeline.stages.folds import run_folds
from pipeline.stages.train import run_train
from pipeline.training import budget
from pipeline.training.budget import Plan, Speeds, plan_epochs

SPEEDS = Speeds(train_img_s=100.0, infer_img_s=400.0)


def test_the_plan_takes_the_most_epochs_that_fit():
    args = dict(n_train=1000, n_test=200, n_folds=5, views=2, max_epochs=10)
    generous = plan_epochs(SPEEDS, budget_s=3600, **args)
    assert generous.unfrozen_epochs == 10 and generous.seconds <= 3600
    tight = plan_epochs(SPEEDS, budget_s=150, **args)
    # features 2.5 s; per fold and epoch 8 + 0.5 s, per fold 2 s of predictions: 5 folds x (8.5 e + 2) + 2.5
    assert tight.unfrozen_epochs == 3 and tight.seconds == pytest.approx(2.5 + 5 * (3 * 8.5 + 2))
    assert plan_epochs(SPEEDS, budget_s=1, **args).unfrozen_epochs == 0
    frozen = plan_epochs(SPEEDS, budget_s=1, **args)  # the frozen-only path, with one view more (frozen_zoom)
    assert plan_epochs(SPEEDS, budget_s=1, frozen_views=3, **args).seconds > frozen.seconds
    assert plan_epochs(SPEEDS, budget_s=150, jobs=5, **args).unfrozen_epochs == 10  # 5 folds at once: 2.5 + 8.5 e + 2


def test_a_tiny_budget_trains_frozen_only_and_the_plan_is_kept(make_config, capsys, monkeypatch):
    cfg = make_config("train.num_workers=0", "augment.train=[]", "folds.n_splits=2", "train.unfrozen.epochs=3",
                      "train.time_budget_min=0.0001")
    run_folds(cfg)
    run_train(cfg)
    out = capsys.readouterr().out
    assert "time budget" in out and "frozen-only" in out
    name = cfg.backbones[0].name
    history = pd.read_csv(Paths(cfg).fold_dir(name, 0) / "history.csv")
    assert set(history["phase"]) == {"frozen"}
    assert (Paths(cfg).backbone_dir(name) / "plan.json").exists()

    def no_measuring(*args, **kwargs):
        raise AssertionError("a saved plan for the same settings is reused, not re-measured")

    monkeypatch.setattr(budget, "measure_speeds", no_measuring)
    run_train(cfg)
    assert "frozen-only" in capsys.readouterr().out


def test_a_generous_budget_keeps_the_configured_epochs(make_config, monkeypatch):
    monkeypatch.setattr(budget, "measure_speeds", lambda *args, **kwargs: SPEEDS)
    cfg = make_config("train.num_workers=0", "augment.train=[]", "folds.n_splits=2", "train.unfrozen.epochs=2",
                      "train.time_budget_min=60")
    run_folds(cfg)
    from pipeline.data.tables import read_folds, task_spec
    table = read_folds(cfg)
    planned, plan = budget.planned_config(cfg, cfg.backbones[0], task_spec(cfg, table),
                                          task_spec(cfg, table).encode(table), 12, 1)
    assert isinstance(plan, Plan) and plan.unfrozen_epochs == 2
    assert planned.train.unfrozen.epochs == 2 and planned.train.time_budget_min is None
