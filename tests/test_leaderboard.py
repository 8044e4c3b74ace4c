"""Leaderboard: every model and ensemble listed, sorted in the metric's direction, merged across experiments.

The ``cv.json``/``oof.csv`` files are written by the test with known numbers.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.config.paths import Paths
from pipeline.config.schema import config_from_dict
from pipeline.core.errors import PipelineError
from pipeline.ensembles.scores import COLUMNS
from pipeline.stages.leaderboard import run_leaderboard

OOF = {  # model -> (kind, oof score)
    "alpha": ("backbone", 0.80), "beta": ("backbone", 0.70),
    "mean": ("ensemble", 0.85), "hill_climb": ("ensemble", 0.75),
}


def make_board(tmp_path, metric="accuracy", name="exp", scores=OOF, nested=None):
    """Config and fake backbone/ensemble outputs (cv.json with per-fold scores, oof.csv); an
    ensemble's ``nested_cv`` is its OOF score - 0.01 unless ``nested`` gives it."""
    cfg = config_from_dict({
        "name": name, "metric": metric, "runs_dir": str(tmp_path / "runs"), "folds_dir": str(tmp_path / "folds"),
        "submissions_dir": str(tmp_path / "submissions"), "data": {"id_column": "image_id"},
        "backbones": [{"name": m, "weights": "none"} for m, (k, _) in scores.items() if k == "backbone"],
        "ensemble": {"methods": [m for m, (k, _) in scores.items() if k == "ensemble"]}})
    paths, rng = Paths(cfg), np.random.default_rng(0)
    for model, (kind, oof) in scores.items():
        d = paths.backbone_dir(model) if kind == "backbone" else paths.ensemble_method_dir(model)
        d.mkdir(parents=True, exist_ok=True)
        cv = {"metric": metric, "greater_is_better": metric == "accuracy", "folds": [oof - 0.02, oof + 0.02],
              "oof": oof}
        if kind == "ensemble":
            cv["nested_cv"] = (nested or {}).get(model, oof - 0.01)
        (d / "cv.json").write_text(json.dumps(cv))
        oof_frame = pd.DataFrame({"image_id": [f"i{k}" for k in range(20)], "fold": [0, 1] * 10,
                                  "pred_a": rng.uniform(size=20), "pred_b": rng.uniform(size=20)})
        oof_frame.to_csv(d / "oof.csv", index=False)
    return cfg


def test_lists_every_model_sorted_for_a_greater_is_better_metric(tmp_path, capsys):
    cfg = make_board(tmp_path, "accuracy")
    path = run_leaderboard(cfg)
    board = pd.read_csv(path)
    assert list(board.columns) == COLUMNS
    assert board["model"].tolist() == ["mean", "alpha", "hill_climb", "beta"]
    assert board.set_index("model")["kind"].to_dict() == {m: k for m, (k, _) in OOF.items()}
    assert board["cv_mean"].tolist() == pytest.approx([0.85, 0.80, 0.75, 0.70])
    assert board["cv_std"].tolist() == pytest.approx([0.02] * 4)
    nested = board.set_index("model")["nested_cv"]
    assert nested["mean"] == pytest.approx(0.84) and np.isnan(nested["alpha"])
    assert board["score"].tolist() == pytest.approx([0.84, 0.80, 0.74, 0.70])  # nested_cv, else cv_mean
    assert path.with_suffix(".md").read_text().count("\n") == 2 + len(OOF)
    assert path.with_suffix(".png").stat().st_size > 1000
    out = capsys.readouterr().out
    assert all(m in out for m in OOF)


def test_sorted_ascending_for_a_lower_is_better_metric(tmp_path):
    cfg = make_board(tmp_path, "log_loss")
    board = pd.read_csv(run_leaderboard(cfg))
    assert board["model"].tolist() == ["beta", "hill_climb", "alpha", "mean"]
    assert (board["metric"] == "log_loss").all()


def test_keeps_other_experiments_and_replaces_its_own_rows(tmp_path):
    other = make_board(tmp_path, "accuracy", name="other", scores={"gamma": ("backbone", 0.6)})
    run_leaderboard(other)
    cfg = make_board(tmp_path, "accuracy")
    run_leaderboard(cfg)
    run_leaderboard(cfg)  # rebuilding does not duplicate rows
    board = pd.read_csv(Paths(cfg).leaderboard_csv)
    assert sorted(board["experiment"].value_counts().items()) == [("exp", 4), ("other", 1)]
    assert board.loc[board["experiment"] == "other", "model"].tolist() == ["gamma"]


def test_public_score_and_submission_columns(tmp_path):
    cfg = make_board(tmp_path)
    paths = Paths(cfg)
    paths.submissions_dir.mkdir(parents=True, exist_ok=True)
    paths.submission("mean").write_text("image_id,label\n")
    pd.DataFrame({"created_at": ["2026-01-01T00:00:00", "2026-01-02T00:00:00"], "experiment": "exp",
                  "competition": "c", "file": [f"elsewhere/{paths.submission('mean').name}"] * 2,
                  "message": ["a", "b"], "status": "complete", "public_lb": [0.5, 0.9]}
                 ).to_csv(paths.submissions_log, index=False)
    board = pd.read_csv(run_leaderboard(cfg)).set_index("model")
    assert board.loc["mean", "public_lb"] == pytest.approx(0.9)  # the newest score of that file
    assert board.loc["mean", "submission"] == str(paths.submission("mean"))
    assert np.isnan(board.loc["alpha", "public_lb"]) and pd.isna(board.loc["alpha", "submission"])


def test_no_scores_is_a_clear_error(tmp_path):
    cfg = config_from_dict({"name": "empty", "runs_dir": str(tmp_path / "runs"),
                            "submissions_dir": str(tmp_path / "submissions")})
    with pytest.raises(PipelineError, match="make train-folds"):
        run_leaderboard(cfg)
    assert not Paths(cfg).leaderboard_csv.exists()


def test_shows_where_each_backbones_learning_rates_came_from(tmp_path):
    cfg = make_board(tmp_path, "accuracy")
    paths = Paths(cfg)
    (paths.backbone_dir("alpha") / "lr_source.json").write_text(json.dumps(
        {"lr_source": "runs/exp/alpha/tune/best.json", "frozen_lr": 0.01, "unfrozen_lr": 0.002,
         "backbone_lr_mult": 0.5, "weight_decay": 0.01}))
    (paths.backbone_dir("beta") / "lr_source.json").write_text(json.dumps(
        {"lr_source": "config", "frozen_lr": 0.003, "unfrozen_lr": 0.001, "backbone_lr_mult": 0.1}))
    lrs = pd.read_csv(run_leaderboard(cfg)).set_index("model")["lrs"]
    assert lrs["alpha"] == "tuned: frozen 1e-02, unfrozen 2e-03, backbone x0.5"
    assert lrs["beta"] == "config: frozen 3e-03, unfrozen 1e-03, backbone x0.1"
    assert lrs[["mean", "hill_climb"]].isna().all()


# in-sample OOF flatters the blends fitted on it; their nested CV says they do not beat alpha
HONEST = {"alpha": ("backbone", 0.80), "beta": ("backbone", 0.70), "mean": ("ensemble", 0.82),
          "hill_climb": ("ensemble", 0.86), "weighted": ("ensemble", 0.85)}
NESTED = {"mean": 0.82, "hill_climb": 0.78, "weighted": 0.79}


@pytest.mark.parametrize("metric, order", [
    ("accuracy", ["mean", "alpha", "weighted", "hill_climb", "beta"]),
    ("log_loss", ["beta", "hill_climb", "weighted", "alpha", "mean"]),
])
def test_ranked_by_the_honest_score_not_the_in_sample_oof(tmp_path, metric, order):
    cfg = make_board(tmp_path, metric, scores=HONEST, nested=NESTED)
    board = pd.read_csv(run_leaderboard(cfg))
    assert board["model"].tolist() == order  # by OOF: hill_climb, weighted, mean, alpha, beta
    score = board.set_index("model")["score"]
    assert score[["hill_climb", "weighted", "mean"]].tolist() == pytest.approx([0.78, 0.79, 0.82])  # nested_cv
    assert score[["alpha", "beta"]].tolist() == pytest.approx([0.80, 0.70])  # cv_mean


@pytest.mark.parametrize("metric", ["accuracy", "log_loss"])
def test_a_tie_goes_to_the_ensemble_then_to_the_steadier_folds(tmp_path, metric):
    # steel, 2026-12-07: lite2 and the mean of three tied at 0.9967 CV; the member, listed first,
    # was the pick and scored 0.9667 on the hidden test against the mean's 0.9833
    cfg = make_board(tmp_path, metric, scores={"alpha": ("backbone", 0.80), "beta": ("backbone", 0.80),
                                               "mean": ("ensemble", 0.80)}, nested={"mean": 0.80})
    for model, folds in (("alpha", [0.70, 0.90]), ("beta", [0.79, 0.81])):
        path = Paths(cfg).backbone_dir(model) / "cv.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "folds": folds}))
    board = pd.read_csv(run_leaderboard(cfg))
    assert board["model"].tolist() == ["mean", "beta", "alpha"]


def test_ranked_breaks_ties_without_moving_a_better_score():
    from pipeline.ensembles.scores import ranked

    frame = pd.DataFrame({"model": ["a", "m", "b", "c"], "kind": ["backbone", "ensemble", "backbone", "backbone"],
                          "score": [0.9, 0.8, 0.9, float("nan")], "cv_std": [0.02, 0.0, 0.01, 0.0]})
    assert ranked(frame, True)["model"].tolist() == ["b", "a", "m", "c"]
    assert ranked(frame, False)["model"].tolist() == ["m", "b", "a", "c"]
