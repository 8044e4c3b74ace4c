"""``train.unfreeze`` (never / always / auto), the probe on several views, and the honesty labels
that follow from choices made on validation rows."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.config.paths import Paths
from pipeline.core.errors import PipelineError
from pipeline.data.tables import read_folds
from pipeline.engine.probe import L2_GRID, fit_linear_probe
from pipeline.ensembles.scores import honesty
from pipeline.stages.folds import run_folds
from pipeline.stages.train import run_train
from pipeline.training import unfreeze
from pipeline.training.unfreeze import mcnemar_p, paired_gain

FAST = ["train.linear_probe=true", "train.freeze_bn=true", "train.unfrozen.epochs=2", "train.unfrozen.lr=1e-3",
        "train.batch_size=32"]


# ---------------------------------------------------------------------------- the paired tests


def test_paired_gain_sees_a_consistent_improvement_and_not_noise():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.5, 1.5, 200)
    gain, p = paired_gain(base, base - 0.1 + rng.normal(0, 0.05, 200))
    assert gain == pytest.approx(0.1, abs=0.02) and p < 0.001
    gain, p = paired_gain(base, base + rng.normal(0, 0.3, 200))  # no change on average
    assert p > 0.05
    gain, p = paired_gain(base, base + 0.1)  # worse everywhere
    assert gain < 0 and p == 1.0


def test_mcnemar_counts_only_discordant_rows():
    base = np.array([True] * 50 + [False] * 10)
    new = base.copy()
    assert mcnemar_p(base, new) is None
    new[50:] = True  # 10 wins, no losses
    assert mcnemar_p(base, new) < 0.01
    new[:10] = False  # 10 wins, 10 losses
    assert mcnemar_p(base, new) > 0.5


class _FakeScreen:
    """Per-row losses (and rows right) as the screening runs would give them, for the decision rule alone."""
    losses: dict = {}

    def __init__(self, cfg, bcfg, spec, table, store, lr):
        self.lr = lr

    def first_epoch_losses(self):
        return self.losses["first"][self.lr]

    def probe_losses(self):
        return self.losses["probe"], self.losses.get("probe_right")

    def final_losses(self):
        return self.losses["final"][self.lr], self.losses.get("final_right")


class _Classes:
    task = "multiclass"


@pytest.mark.parametrize("final_shift, lr_shift, alpha, unfreezes, lr", [
    (-0.2, 0.0, 0.5, True, 1e-3),     # clearly better than the probe, no better LR: unfreeze at the config's LR
    (-0.2, -0.3, 0.5, True, 1e-2),    # and another LR clearly better after the first epoch: that LR
    (+0.1, 0.0, 0.5, False, 1e-3),    # worse: frozen-only
    (-0.002, 0.0, 0.5, True, 1e-3),   # a small gain, more likely than not: unfreeze (the default rule)
    (-0.002, 0.0, 0.05, False, 1e-3), # the same gain, where a significant one is asked for: frozen-only
    (0.0, -0.3, 0.05, False, 1e-2),   # noise around no change, significance asked for: frozen-only
])
def test_the_decision_follows_the_paired_evidence(make_config, monkeypatch, final_shift, lr_shift, alpha,
                                                  unfreezes, lr):
    rng = np.random.default_rng(1)
    probe = rng.uniform(0.2, 1.0, 120)
    def noise():  # centred: the shift is the mean change exactly
        z = rng.normal(0, 0.02, 120)
        return z - z.mean()

    _FakeScreen.losses = {"probe": probe,
                          "first": {1e-3: probe + noise(), 1e-2: probe + lr_shift + noise()},
                          "final": {1e-3: probe + final_shift + noise(), 1e-2: probe + final_shift + noise()}}
    monkeypatch.setattr(unfreeze, "_Screen", _FakeScreen)
    cfg = make_config(*FAST, "train.unfreeze=auto", "train.unfreeze_lrs=[1e-3,1e-2]", f"train.unfreeze_alpha={alpha}")
    decision = unfreeze.decide(cfg, cfg.backbones[0], None, None, None)
    assert (decision["unfreeze"], decision["lr"]) == (unfreezes, lr)
    assert decision["rows"] == 120 and decision["fold"] == 0 and decision["statistic"] == "loss"
    assert ("unfreeze at lr" if unfreezes else "frozen-only") in decision["summary"]
    assert f"p < {alpha:g} (train.unfreeze_alpha)" in decision["summary"]


@pytest.mark.parametrize("metric, statistic, unfreezes", [
    ("accuracy", "right", True),   # a metric of hard labels: rows right decide, though the loss got worse
    ("log_loss", "loss", False),   # a metric of probabilities: the per-row loss decides
])
def test_the_decision_compares_what_the_metric_scores(make_config, monkeypatch, metric, statistic, unfreezes):
    """On the scene photos the fine-tuned fold 0 got more rows right with a higher per-row loss: the
    decision reads the measure the competition scores."""
    probe = np.full(120, 0.28)
    probe_right = np.array([True] * 108 + [False] * 12)
    final_right = probe_right.copy()
    final_right[108:113] = True  # 5 rows won
    final_right[:1] = False  # 1 lost
    _FakeScreen.losses = {"probe": probe, "probe_right": probe_right, "first": {1e-3: probe + 0.02},
                          "final": {1e-3: probe + 0.02}, "final_right": final_right}
    monkeypatch.setattr(unfreeze, "_Screen", _FakeScreen)
    cfg = make_config(*FAST, "train.unfreeze=auto", f"metric={metric}")
    decision = unfreeze.decide(cfg, cfg.backbones[0], _Classes, None, None)
    assert decision["statistic"] == statistic and decision["unfreeze"] is unfreezes
    if statistic == "right":
        assert decision["gain"] == pytest.approx(4 / 120) and "+4 row(s) right" in decision["summary"]
    assert decision["loss_gain"] == pytest.approx(-0.02)


def test_a_tie_everywhere_is_no_evidence():
    same = np.ones(50)
    assert paired_gain(same, same) == (0.0, 0.5)


def test_an_unfreezing_auto_trains_the_folds_of_always(make_config):
    """The resolved config holds the decision; the decision's own keys do not move the folds' digests."""
    from pipeline.training.fingerprint import fold_digest

    auto = make_config(*FAST, "train.unfreeze=auto", "train.unfreeze_lrs=[1e-3,3e-3]", "train.unfreeze_alpha=0.1")
    always = make_config(*FAST, "train.unfreeze=always")
    never = make_config(*FAST, "train.unfreeze=never", "train.unfrozen.epochs=0")
    b = auto.backbones[0]
    assert fold_digest(unfreeze._with(auto, lr=1e-3), b, 1) == fold_digest(always, b, 1)
    assert fold_digest(unfreeze._with(auto, epochs=0), b, 1) == fold_digest(unfreeze._with(never, epochs=0), b, 1)


@pytest.mark.parametrize("words, frozen_only", [
    (["train.unfreeze=never"], True),
    (["train.unfreeze=auto", "train.unfrozen.epochs=0"], True),
    (["train.unfreeze=always", "train.unfrozen.epochs=0"], True),
    (["train.unfreeze=always"], False),
])
def test_frozen_only_folds_predict_through_zoom_too(make_config, words, frozen_only):
    """augment.frozen_zoom: the resolved config of frozen-only folds adds ``zoom`` to the TTA views,
    fine-tuned folds keep ``augment.tta``; as_trained (predict, bundle) resolves the same way."""
    cfg = make_config(*FAST, "augment.tta=[identity,hflip]", *words)
    b = cfg.backbones[0]
    expected = ["identity", "hflip", "zoom"] if frozen_only else ["identity", "hflip"]
    assert unfreeze._fixed(cfg).augment.tta == expected
    assert unfreeze.as_trained(cfg, b).augment.tta == expected
    off = make_config(*FAST, "augment.tta=[identity,hflip]", "augment.frozen_zoom=false", *words)
    assert unfreeze._fixed(off).augment.tta == ["identity", "hflip"]
    already = make_config(*FAST, "augment.tta=[zoom,identity]", *words)
    assert unfreeze._fixed(already).augment.tta == ["zoom", "identity"]  # never twice


def test_an_auto_decision_resolves_the_views_with_the_epochs(make_config):
    cfg = make_config(*FAST, "train.unfreeze=auto", "augment.tta=[identity]")
    frozen = unfreeze._decided_config(cfg, {"unfreeze": False, "lr": 1e-3})
    tuned = unfreeze._decided_config(cfg, {"unfreeze": True, "lr": 1e-3})
    assert frozen.train.unfrozen.epochs == 0 and frozen.augment.tta == ["identity", "zoom"]
    assert tuned.train.unfrozen.epochs == 2 and tuned.augment.tta == ["identity"]


def test_bad_unfreeze_keys_are_one_line(make_config):
    with pytest.raises(PipelineError, match="train.unfreeze.*valid: always, never, auto"):
        make_config("train.unfreeze=sometimes")
    with pytest.raises(PipelineError, match="train.unfreeze_lrs"):
        make_config("train.unfreeze_lrs=[-1]")
    with pytest.raises(PipelineError, match="train.unfreeze_alpha.*must be in"):
        make_config("train.unfreeze_alpha=0")
    with pytest.raises(PipelineError, match="train.probe_views.*valid: identity"):
        make_config("train.probe_views=[sideways]")


# ---------------------------------------------------------------------------- auto, end to end


@pytest.mark.slow
def test_auto_decides_on_fold_0_records_it_and_counts_it_as_a_selection(make_config, capsys, one_torch_thread):
    cfg = make_config(*FAST, "train.unfreeze=auto", "train.unfreeze_lrs=[1e-3,3e-3]", "folds.n_splits=3")
    run_folds(cfg)
    run_train(cfg)
    name = cfg.backbones[0].slug
    paths = Paths(cfg)
    cv = json.loads(paths.cv_json(name).read_text())
    decision = cv["unfreeze"]
    assert cv["decided_folds"] == [0] and decision["rows"] == int((read_folds(cfg)["fold"] == 0).sum())
    assert cv["cv_untuned"] == pytest.approx(np.mean(cv["folds"][1:]))
    assert ("unfreezing decided on folds [0]" in honesty(cv, "backbone")
            and honesty(cv, "backbone").startswith("optimistic"))
    out = capsys.readouterr().out
    assert "train.unfreeze auto:" in out and "paired bootstrap p" in out
    # the folds train with what was decided: frozen-only folds have no unfrozen epoch, or all folds unfreeze
    import pandas as pd
    phases = [set(pd.read_csv(paths.fold_dir(name, k) / "history.csv")["phase"]) for k in range(3)]
    assert all(p == ({"frozen", "unfrozen"} if decision["unfreeze"] else {"frozen"}) for p in phases)
    # the screening runs are resumable folders of their own; a re-run decides nothing again
    assert (paths.backbone_dir(name) / "unfreeze" / "lr0.001" / "losses.json").exists()
    run_train(cfg)
    assert "decided before" in capsys.readouterr().out


@pytest.mark.slow
def test_when_auto_unfreezes_fold_0_is_the_screening_run_not_trained_again(make_config, capsys, monkeypatch,
                                                                           one_torch_thread):
    monkeypatch.setattr(unfreeze, "paired_gain", lambda base, new, seed=0: (1.0, 0.0))  # the evidence says unfreeze
    cfg = make_config(*FAST, "train.unfreeze=auto", "train.unfreeze_lrs=[]", "folds.n_splits=2")
    run_folds(cfg)
    run_train(make_config(*FAST, "train.unfreeze=never", "folds.n_splits=2"))  # a fold 0 of other settings
    run_train(cfg)  # is replaced by the screening run
    import pandas as pd
    name, paths = cfg.backbones[0].slug, Paths(cfg)
    screened = pd.read_csv(paths.backbone_dir(name) / "unfreeze" / "lr0.001" / "history.csv")
    fold0 = pd.read_csv(paths.fold_dir(name, 0) / "history.csv")
    pd.testing.assert_frame_equal(fold0, screened)  # the same epochs, seconds included: they ran once
    out = capsys.readouterr().out
    assert "fold 0 reuses the screening run at lr 0.001" in out and "resuming after epoch 2" in out
    assert (paths.fold_dir(name, 0) / "test.csv").exists() and json.loads(paths.cv_json(name).read_text())["unfreeze"]


@pytest.mark.slow
def test_never_is_the_frozen_only_path(make_config, one_torch_thread):
    cfg = make_config(*FAST, "train.unfreeze=never", "folds.n_splits=2")
    run_folds(cfg)
    run_train(cfg)
    import pandas as pd
    history = pd.read_csv(Paths(cfg).fold_dir(cfg.backbones[0].slug, 0) / "history.csv")
    assert list(history["phase"]) == ["frozen"]


# ---------------------------------------------------------------------------- the probe


def _features(n=150, d=24, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=g) * 1.5
    y = torch.randint(0, classes, (n,), generator=g)
    return centres[y] + torch.randn(n, d, generator=g), y


class _Spec:
    num_outputs = 3


def _ce(logits, y):
    return torch.nn.functional.cross_entropy(logits.float(), y.long())


def test_the_probe_on_two_identical_views_is_the_probe_on_one():
    """The views of an image stay on one side of the inner split, so duplicating every row changes
    neither the held-out losses nor the optimum: the same strength and head."""
    x, y = _features()
    w1, b1, l2_one = fit_linear_probe(_Spec, _ce, x, y, seed=3)
    w2, b2, l2_two = fit_linear_probe(_Spec, _ce, [x, x.clone()], y, seed=3)
    assert l2_one == l2_two
    torch.testing.assert_close(w1, w2, atol=2e-3, rtol=1e-2)


def test_the_warm_started_search_picks_what_separate_tight_fits_pick():
    """The regularisation path with warm starts and looser stopping rules chooses the same strength
    as independent fits run to L-BFGS's default tolerances, and a head as good on new rows."""
    x, y = _features(n=240, seed=1)
    x_new, y_new = _features(n=400, seed=1)[0][240:], _features(n=400, seed=1)[1][240:]
    weight, bias, l2 = fit_linear_probe(_Spec, _ce, x, y, seed=0)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    parts = [order[k::3] for k in range(3)]
    losses = []
    for strength in L2_GRID:
        total = 0.0
        for k, held in enumerate(parts):
            rows = torch.cat([p for j, p in enumerate(parts) if j != k])
            w = torch.zeros(3, x.shape[1], requires_grad=True)
            b = torch.zeros(3, requires_grad=True)
            opt = torch.optim.LBFGS([w, b], max_iter=500, line_search_fn="strong_wolfe")

            def closure():
                opt.zero_grad()
                loss = _ce(x[rows] @ w.T + b, y[rows]) + strength * w.pow(2).sum()
                loss.backward()
                return loss

            opt.step(closure)
            total += float(_ce(x[held] @ w.detach().T + b.detach(), y[held])) * len(held)
        losses.append(total)
    assert l2 == L2_GRID[int(np.argmin(losses))]
    assert float(_ce(x_new @ weight.T + bias, y_new)) < 1.0
