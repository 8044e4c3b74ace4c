"""The ``score`` command compares a submission with the leaderboard's honest best: nested CV for a
blend fitted on OOF rows, CV for a backbone or plain average; older leaderboards without the
``score`` column are read the same way.
"""
from __future__ import annotations

import pandas as pd
import pytest
from test_leaderboard import HONEST, NESTED, make_board

from pipeline.config.paths import Paths
from pipeline.ensembles.scores import COLUMNS
from pipeline.stages.leaderboard import run_leaderboard
from pipeline.stages.submit import _best_cv


def test_best_cv_is_the_honest_score(tmp_path):
    cfg = make_board(tmp_path, "accuracy", scores=HONEST, nested=NESTED)
    run_leaderboard(cfg)
    # by in-sample OOF it would be hill_climb 0.86
    assert _best_cv(cfg, "accuracy") == "best CV on the leaderboard: mean 0.8200 (nested CV)"


def test_best_cv_of_a_backbone(tmp_path):
    cfg = make_board(tmp_path, "log_loss", scores=HONEST, nested=NESTED)
    run_leaderboard(cfg)
    assert _best_cv(cfg, "log_loss") == "best CV on the leaderboard: beta 0.7000 (CV)"


def test_a_leaderboard_without_the_score_column_is_read_the_same_way(tmp_path):
    cfg = make_board(tmp_path, "accuracy", scores=HONEST, nested=NESTED)
    path = run_leaderboard(cfg)
    old = pd.read_csv(path).drop(columns=["score"])
    old.to_csv(path, index=False)
    assert _best_cv(cfg, "accuracy") == "best CV on the leaderboard: mean 0.8200 (nested CV)"
    other = make_board(tmp_path, "accuracy", name="other", scores={"gamma": ("backbone", 0.6)})
    board = pd.read_csv(run_leaderboard(other))  # the old rows of 'exp' get their score filled in
    assert list(board.columns) == COLUMNS
    rows = board[board["experiment"] == "exp"].set_index("model")["score"]
    assert rows[["hill_climb", "alpha"]].tolist() == pytest.approx([0.78, 0.80])


def test_no_leaderboard_yet(tmp_path):
    cfg = make_board(tmp_path, "accuracy", scores=HONEST, nested=NESTED)
    assert not Paths(cfg).leaderboard_csv.exists()
    assert _best_cv(cfg, "accuracy") == "no leaderboard yet (make leaderboard)"
