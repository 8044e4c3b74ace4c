"""Tuned LRs are used only for the objective they were tuned for: best.json records the study's
objective, and ``apply_tuned`` compares it with the config (``auto``: the config's LRs when they
differ; ``true``: the tuned ones anyway), printing the differences either way.

CPU, timm's tiny ``test_efficientnet`` (``weights: none``, 32 px); frozen-only studies on cached
features, so a trial costs a fraction of a second.
"""
from __future__ import annotations

import pytest

from pipeline.config.paths import Paths
from pipeline.core import artifacts
from pipeline.stages.folds import run_folds
from pipeline.stages.train import run_train
from pipeline.stages.tune import run_tune
from pipeline.training.tuned import apply_tuned

FROZEN_ONLY = ["train.num_workers=0", "augment.train=[]", "tune.frozen_epochs=1", "tune.unfrozen_epochs=0",
               "tune.trials=2"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def tuned(make_config):
    """A config whose study is tuned (best.json written), and the best.json, whose best LR is set
    apart from the config's (on 2 trials the config's own may win)."""
    cfg = make_config(*FROZEN_ONLY)
    run_folds(cfg)
    run_tune(cfg)
    path = Paths(cfg).tuned_params("test_efficientnet")
    best = artifacts.read_json(path)
    best["params"]["frozen_lr"] = cfg.train.frozen.lr / 7
    artifacts.write_json(path, best)
    return cfg, best


def test_best_json_records_the_objective_and_a_matching_config_uses_it(tuned, capsys):
    cfg, best = tuned
    objective = best["objective"]
    assert objective["backbone.image_size"] == 32 and objective["tune.frozen_epochs"] == 1
    assert "augment.train" in objective and any(k.startswith("inputs.") for k in objective)
    capsys.readouterr()
    tuned_cfg, source = apply_tuned(cfg, cfg.backbones[0])
    assert source["lr_source"].endswith("best.json") and "objective_changes" not in source
    assert tuned_cfg.train.frozen.lr == best["params"]["frozen_lr"]
    assert "another objective" not in capsys.readouterr().out


def test_stale_best_json_is_not_used_under_auto(tuned, make_config, capsys):
    cfg, best = tuned
    bigger = make_config(*FROZEN_ONLY, "backbones.0.image_size=40")
    capsys.readouterr()
    out_cfg, source = apply_tuned(bigger, bigger.backbones[0])
    out = capsys.readouterr().out
    assert out_cfg.train.frozen.lr == bigger.train.frozen.lr != best["params"]["frozen_lr"]
    assert source["lr_source"] == "config" and source["stale_tuned"].endswith("best.json")
    assert "was tuned for another objective (backbone.image_size: 32 -> 40); using the config's LRs" in out
    assert source["objective_changes"] == ["backbone.image_size: 32 -> 40"]

    run_train(bigger)  # the resolved config and lr_source.json say where the LRs came from
    lr_source = artifacts.read_json(Paths(bigger).backbone_dir("test_efficientnet") / "lr_source.json")
    assert lr_source["lr_source"] == "config" and lr_source["frozen_lr"] == bigger.train.frozen.lr


def test_stale_best_json_is_used_with_a_warning_under_true(tuned, make_config, capsys):
    cfg, best = tuned
    changed = make_config(*FROZEN_ONLY, "backbones.0.image_size=40", "augment.train=[{name: HorizontalFlip}]",
                          "train.use_tuned=true")
    capsys.readouterr()
    out_cfg, source = apply_tuned(changed, changed.backbones[0])
    out = capsys.readouterr().out
    assert out_cfg.train.frozen.lr == best["params"]["frozen_lr"] and source["lr_source"].endswith("best.json")
    assert "train.use_tuned is true: using the LRs of" in out and "tuned for another objective" in out
    assert "backbone.image_size: 32 -> 40" in out and "augment.train: [] -> [{'name': 'HorizontalFlip'}]" in out
    assert len(source["objective_changes"]) == 2


@pytest.mark.parametrize("change", ["train.frozen.epochs=3", "folds.seed=7"])
def test_a_changed_budget_or_data_makes_best_json_stale(tuned, make_config, change, capsys):
    """With tune.frozen_epochs null the budget is train.frozen.epochs (1 when tuned, now 3). New
    folds change the data the study scored on."""
    cfg, best = tuned
    if change.startswith("train."):
        changed = make_config(*FROZEN_ONLY, "tune.frozen_epochs=null", change)
        expected = "tune.frozen_epochs: 1 -> 3"
    else:
        changed = make_config(*FROZEN_ONLY, change)
        run_folds(changed)  # folds.seed: other folds, the same file name
        expected = "inputs.demo.csv:"
    capsys.readouterr()
    out_cfg, source = apply_tuned(changed, changed.backbones[0])
    assert source["lr_source"] == "config" and any(c.startswith(expected) for c in source["objective_changes"])
    assert expected in capsys.readouterr().out


def test_best_json_without_an_objective_is_not_trusted_under_auto(tuned, capsys):
    cfg, best = tuned
    path = Paths(cfg).tuned_params("test_efficientnet")
    artifacts.write_json(path, {k: v for k, v in best.items() if k != "objective"})  # an older tune stage's
    out_cfg, source = apply_tuned(cfg, cfg.backbones[0])
    assert source["lr_source"] == "config" and "records no objective" in capsys.readouterr().out
    capsys.readouterr()
    run_tune(cfg)  # the study is complete: only the report is rewritten, now with the objective
    assert "objective" in artifacts.read_json(path) and "trial" not in capsys.readouterr().err
    assert apply_tuned(cfg, cfg.backbones[0])[1]["lr_source"] == str(path)
