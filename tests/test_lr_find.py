"""LR range test: the sweep stops at divergence, the suggestion sits where the loss falls fastest,
and the stage writes its curves, plot and suggestion (which the tune stage turns into a hint).

CPU, timm's tiny ``test_efficientnet`` (``weights: none``, 32 px) on the shared digits data.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.config.paths import Paths
from pipeline.core import artifacts
from pipeline.stages.folds import run_folds
from pipeline.stages.lr_find import range_test, run_lr_find, suggest_lr, zero_lag_smooth
from pipeline.stages.tune import run_tune

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _optimizer(lr_scale: float = 1.0):
    param = torch.zeros(1, requires_grad=True)
    return torch.optim.SGD([{"params": [param], "lr_scale": lr_scale}], lr=1.0)


def test_range_test_sweeps_exponentially_and_stops_when_the_loss_explodes():
    optimizer = _optimizer(lr_scale=0.1)
    seen = []

    def step():  # loss falls around 1e-3, explodes past 1e-1
        lr = optimizer.param_groups[0]["lr"]
        seen.append(lr)
        return 100.0 if lr > 1e-2 else 2.0 - 1.0 / (1.0 + math.exp(-4 * (math.log10(lr * 10) + 3)))

    lrs = np.geomspace(1e-7, 10, 100)
    curve, stopped = range_test(step, optimizer, lrs)
    assert "4x" in stopped and len(curve) < 100
    assert list(curve.columns) == ["lr", "loss", "smoothed_loss"]
    np.testing.assert_allclose(seen, lrs[:len(seen)] * 0.1)  # the group keeps its lr_scale
    lr, method = suggest_lr(curve)
    assert method == "steepest" and 10 ** -3.7 < lr < 10 ** -2.3  # the steepest fall, at 1e-3


def test_suggestion_falls_back_to_min_loss_over_ten_on_a_rising_curve():
    lrs = np.geomspace(1e-6, 1, 30)
    curve = pd.DataFrame({"lr": lrs, "loss": np.linspace(1, 2, 30), "smoothed_loss": np.linspace(1, 2, 30)})
    lr, method = suggest_lr(curve)
    assert method == "min_loss/10" and lr == lrs[0] / 10
    assert math.isnan(suggest_lr(curve.iloc[:0])[0])


def test_zero_lag_smoothing_does_not_shift_a_step():
    values = np.r_[np.full(50, 2.0), np.full(50, 1.0)]
    smooth = zero_lag_smooth(values)
    assert abs(int(np.argmin(np.gradient(smooth))) - 49.5) <= 1  # the fall stays where it is


def test_lr_find_writes_curves_plot_and_a_sane_suggestion(make_config, capsys):
    cfg = make_config("train.num_workers=0", "train.batch_size=16", "tune.trials=1", "tune.frozen_epochs=1",
                      "tune.unfrozen_epochs=0")
    run_folds(cfg)
    out = run_lr_find(cfg, steps=60, unfrozen_steps=15)
    assert out == Paths(cfg).lr_find_dir("test_efficientnet")
    for phase, steps in (("frozen", 60), ("unfrozen", 15)):
        curve = pd.read_csv(out / f"{phase}.csv")
        assert list(curve.columns) == ["lr", "loss", "smoothed_loss"]
        assert 1 <= len(curve) <= steps and curve["lr"].is_monotonic_increasing
        assert curve["lr"].iloc[0] == 1e-7 and np.isfinite(curve[["loss", "smoothed_loss"]].to_numpy()).all()
    assert (out / "lr_find.png").stat().st_size > 1000
    suggestion = artifacts.read_json(out / "suggestion.json")
    for key in ("frozen_lr", "unfrozen_lr"):
        assert math.isfinite(suggestion[key]) and 1e-8 <= suggestion[key] <= 10, key
    assert suggestion["frozen"]["method"] in ("steepest", "min_loss/10") and "steepest" in suggestion["method"]
    assert not Paths(cfg).feature_cache_dir("test_efficientnet").exists()  # nothing but the outputs
    assert sorted(p.name for p in Paths(cfg).backbone_dir("test_efficientnet").iterdir()) == ["lr_find"]

    stamp = (out / "frozen.csv").stat().st_mtime_ns
    run_lr_find(cfg, steps=60, unfrozen_steps=15)  # unchanged: skipped
    assert (out / "frozen.csv").stat().st_mtime_ns == stamp

    capsys.readouterr()
    run_tune(cfg)  # the tune stage points at the suggestion
    lo, hi = suggestion["frozen_lr"] / 10, suggestion["frozen_lr"] * 3
    assert f"tune.frozen_lr=[{lo:.1e},{hi:.1e}]" in capsys.readouterr().out
