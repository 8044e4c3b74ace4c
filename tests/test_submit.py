"""Submissions: the sample's exact format, the validator's rejections, the kaggle CLI, local scoring.

The kaggle CLI is a stand-in script in ``tmp_path`` put first on PATH: it records its arguments and
prints what the real CLI prints. Nothing here touches the network.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pandas as pd
import pytest

from pipeline.cli import lb_sync
from pipeline.config.paths import Paths
from pipeline.config.schema import config_from_dict
from pipeline.core.errors import PipelineError
from pipeline.ensembles.scores import read_submissions_log
from pipeline.ensembles.submission import format_submission, load_spec, validate_submission, write_submission
from pipeline.stages.submit import parse_kaggle_submissions, run_lb_sync, run_score, run_submit

CLASSES = ["cat", "dog", "emu"]
TEST_IDS = [f"tst_{i}" for i in range(5)]
TRAIN = {  # task kind -> (task, train target columns)
    "multiclass": ("multiclass", {"label": CLASSES * 2}),
    "binary": ("binary", {"label": ["neg", "pos"] * 3}),
    "multilabel": ("multilabel", {"labels": ["round", "small", "round small", "", "small", "round"]}),
    "multilabel_columns": ("multilabel", {"round": [1, 0, 1, 0, 1, 0], "small": [0, 1, 1, 0, 0, 1]}),
    "regression": ("regression", {"target": [0.5, 1.5, 2.5, 3.5, 4.5, 5.5]}),
}


def make_cfg(tmp_path, kind="multiclass", metric="accuracy", sample_columns=None, **submission):
    """Config, sample submission and folds file (the spec's source) for a task kind."""
    task, targets = TRAIN[kind]
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    columns = sample_columns or list(targets)
    pd.DataFrame({"image_id": TEST_IDS, **{c: 0 for c in columns}}).to_csv(data / "sample_submission.csv", index=False)
    cfg = config_from_dict({
        "name": "exp", "metric": metric, "runs_dir": str(tmp_path / "runs"), "folds_dir": str(tmp_path / "folds"),
        "submissions_dir": str(tmp_path / "submissions"),
        "data": {"root": str(data), "task": task, "id_column": "image_id", "target_columns": list(targets)},
        "backbones": [{"name": "alpha", "weights": "none"}], "ensemble": {"methods": ["mean"]},
        "submission": {"competition": "fake-comp", **submission}})
    folds = pd.DataFrame({"image_id": [f"img_{i}" for i in range(6)], **targets, "fold": [0, 1] * 3})
    Paths(cfg).folds_csv.parent.mkdir(parents=True, exist_ok=True)
    folds.to_csv(Paths(cfg).folds_csv, index=False)
    return cfg, load_spec(cfg)


def preds_frame(spec, preds, ids=TEST_IDS):
    return spec.predictions_frame(ids, np.asarray(preds), "image_id")


# ---------------------------------------------------------------------------- the format


def test_multiclass_labels_in_original_spelling(tmp_path):
    cfg, spec = make_cfg(tmp_path)
    P = np.eye(3)[[1, 0, 2, 2, 1]] * 0.7 + 0.1
    frame = format_submission(cfg, spec, TEST_IDS, P)
    assert list(frame.columns) == ["image_id", "label"]
    assert frame["label"].tolist() == ["dog", "cat", "emu", "emu", "dog"]


def test_binary_probabilities_for_a_probability_metric_labels_otherwise(tmp_path):
    p = [0.1, 0.7, 0.5, 0.2, 0.9]
    cfg, spec = make_cfg(tmp_path, "binary", metric="roc_auc")
    assert format_submission(cfg, spec, TEST_IDS, p)["label"].tolist() == p
    cfg, spec = make_cfg(tmp_path, "binary", metric="accuracy")
    assert format_submission(cfg, spec, TEST_IDS, p)["label"].tolist() == ["neg", "pos", "pos", "neg", "pos"]
    cfg, spec = make_cfg(tmp_path, "binary", metric="accuracy", format="probabilities")
    assert format_submission(cfg, spec, TEST_IDS, p)["label"].tolist() == p


def test_one_column_per_class_in_the_sample_order(tmp_path):
    cfg, spec = make_cfg(tmp_path, sample_columns=["emu", "cat", "dog"])
    P = np.array([[0.2, 0.3, 0.5]] * 5)  # cat, dog, emu
    frame = format_submission(cfg, spec, TEST_IDS, P)
    assert list(frame.columns) == ["image_id", "emu", "cat", "dog"]
    np.testing.assert_allclose(frame[["cat", "dog", "emu"]].to_numpy(), P)
    cfg, spec = make_cfg(tmp_path, sample_columns=["emu", "cat", "dog"], format="labels")
    assert format_submission(cfg, spec, TEST_IDS, P)[["emu", "cat", "dog"]].to_numpy().tolist() == [[1, 0, 0]] * 5


def test_multilabel_label_lists_use_tuned_thresholds(tmp_path):
    cfg, spec = make_cfg(tmp_path, "multilabel", metric="f1_macro")
    P = np.array([[0.4, 0.95], [0.2, 0.5], [0.35, 0.1], [0.9, 0.92], [0.0, 0.0]])  # round, small
    frame = format_submission(cfg, spec, TEST_IDS, P, thresholds=[0.3, 0.9])
    assert frame["labels"].tolist() == ["round small", "", "round", "round small", ""]
    validate_submission(cfg, spec, frame, "in memory")
    cfg, spec = make_cfg(tmp_path, "multilabel_columns", metric="f1_macro")
    frame = format_submission(cfg, spec, TEST_IDS, P, thresholds=[0.3, 0.9])
    assert frame[["round", "small"]].to_numpy().tolist() == [[1, 1], [0, 0], [1, 0], [1, 1], [0, 0]]


def test_regression_values_and_written_file(tmp_path):
    cfg, spec = make_cfg(tmp_path, "regression", metric="rmse")
    path = write_submission(cfg, spec, preds_frame(spec, [1.25, 2, 3, 4, 5]), tmp_path / "sub.csv")
    frame = pd.read_csv(path)
    assert list(frame.columns) == ["image_id", "target"] and frame["target"].tolist() == [1.25, 2, 3, 4, 5]


# ---------------------------------------------------------------------------- validation


def _swap(frame):
    return frame.iloc[[1, 0, 2, 3, 4]].reset_index(drop=True)


def _set(col, row, value):
    def mutate(frame):
        frame = frame.astype({col: object})
        frame.loc[row, col] = value
        return frame
    return mutate


BAD = {  # name -> (task kind, metric, mutation of a valid frame, expected message)
    "wrong ids": ("binary", "roc_auc", _set("image_id", 2, "nope"), "not in the sample"),
    "wrong order": ("binary", "roc_auc", _swap, "out of order"),
    "wrong count": ("binary", "roc_auc", lambda f: f.iloc[:-1], "has 4 rows"),
    "NaN": ("binary", "roc_auc", _set("label", 3, np.nan), "NaN"),
    "out of range": ("binary", "roc_auc", _set("label", 1, 1.5), r"outside \[0, 1\]"),
    "unknown label": ("multiclass", "accuracy", _set("label", 4, "yak"), "unknown labels.*yak"),
    "wrong columns": ("multiclass", "accuracy", lambda f: f.rename(columns={"label": "class"}), "columns"),
    "extra column": ("multiclass", "accuracy", lambda f: f.assign(extra=1), "columns"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_validator_rejects_bad_submissions(tmp_path, case):
    kind, metric, mutate, message = BAD[case]
    cfg, spec = make_cfg(tmp_path, kind, metric=metric)
    good = format_submission(cfg, spec, TEST_IDS, np.tile([0.2, 0.3, 0.5], (5, 1)) if kind == "multiclass"
                             else [0.1, 0.2, 0.3, 0.4, 0.5])
    validate_submission(cfg, spec, good, "good.csv")
    with pytest.raises(PipelineError, match=message) as err:
        validate_submission(cfg, spec, mutate(good), "bad.csv")
    assert "bad.csv" in str(err.value)


@pytest.mark.parametrize("case", ["wrong ids", "wrong order", "wrong count", "NaN", "out of range"])
def test_write_submission_writes_nothing_when_invalid(tmp_path, case):
    cfg, spec = make_cfg(tmp_path, "binary", metric="roc_auc")
    ids, p = list(TEST_IDS), [0.1, 0.2, 0.3, 0.4, 0.5]
    if case == "wrong ids":
        ids[0] = "nope"
    elif case == "wrong order":
        ids[0], ids[1] = ids[1], ids[0]
    elif case == "wrong count":
        ids, p = ids[:4], p[:4]
    else:
        p[2] = np.nan if case == "NaN" else 1.5
    path = tmp_path / "submissions" / "bad.csv"
    with pytest.raises(PipelineError, match="bad.csv"):
        write_submission(cfg, spec, preds_frame(spec, p, ids), path)
    assert not path.exists()
    assert not path.parent.exists() or not any(path.parent.iterdir())  # no temporary file left either


# ---------------------------------------------------------------------------- kaggle CLI stand-in

KAGGLE_CSV = """Warning: Looks like you're using an outdated API Version, please consider updating
fileName,date,description,status,publicScore,privateScore
exp-alpha.csv,2026-05-02 10:00:00,second try,SubmissionStatus.PENDING,None,None
exp-alpha.csv,2026-05-01 10:00:00,first try,SubmissionStatus.COMPLETE,0.91234,0.90000
someone-else.csv,2026-04-01 10:00:00,manual,SubmissionStatus.COMPLETE,0.5,0.5
"""


@pytest.fixture
def kaggle(tmp_path, monkeypatch):
    """A stand-in ``kaggle`` first on PATH; returns a function reading the recorded argument lists."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "kaggle_calls.jsonl"
    bin_dir.mkdir()
    listing = tmp_path / "kaggle_listing.csv"
    listing.write_text(KAGGLE_CSV)
    script = bin_dir / "kaggle"
    script.write_text(f"""#!{sys.executable}
import json, os, sys
with open({str(calls)!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if os.environ.get("FAKE_KAGGLE_FAIL"):
    sys.stderr.write("403 - Forbidden: you must accept this competition's rules\\n")
    sys.exit(1)
if sys.argv[1:3] == ["competitions", "submissions"]:
    sys.stdout.write(open({str(listing)!r}).read())
else:
    print("Successfully submitted to Fake Competition")
""")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    return lambda: [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []


def _submission_file(tmp_path, name="alpha"):
    cfg, spec = make_cfg(tmp_path)
    path = write_submission(cfg, spec, preds_frame(spec, np.tile([0.2, 0.3, 0.5], (5, 1))),
                            Paths(cfg).submission(name))
    return cfg, path


def test_submit_runs_the_kaggle_cli_and_logs(tmp_path, kaggle):
    cfg, path = _submission_file(tmp_path)
    run_submit(cfg, path, "first try")
    assert kaggle() == [["competitions", "submit", "fake-comp", "-f", str(path), "-m", "first try"]]
    log = read_submissions_log(cfg)
    assert log[["file", "message", "competition"]].values.tolist() == [[str(path), "first try", "fake-comp"]]
    assert log["created_at"].notna().all()


def test_invalid_file_is_not_sent(tmp_path, kaggle):
    cfg, path = _submission_file(tmp_path)
    pd.read_csv(path).iloc[:-1].to_csv(path, index=False)
    with pytest.raises(PipelineError, match="rows"):
        run_submit(cfg, path, "broken")
    assert kaggle() == [] and not Paths(cfg).submissions_log.exists()


def test_kaggle_failure_shows_its_stderr_and_logs_nothing(tmp_path, kaggle, monkeypatch):
    cfg, path = _submission_file(tmp_path)
    monkeypatch.setenv("FAKE_KAGGLE_FAIL", "1")
    with pytest.raises(PipelineError, match="403 - Forbidden"):
        run_submit(cfg, path, "first try")
    assert not Paths(cfg).submissions_log.exists()


def test_missing_cli_is_a_clear_error(tmp_path, monkeypatch):
    cfg, path = _submission_file(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    with pytest.raises(PipelineError, match="pip install kaggle") as err:
        run_submit(cfg, path, "first try")
    assert "kaggle.json" in str(err.value) and "KAGGLE_KEY" in str(err.value)
    with pytest.raises(PipelineError, match="pip install kaggle"):
        run_lb_sync(cfg)
    assert not Paths(cfg).submissions_log.exists()


def test_missing_competition_is_a_clear_error(tmp_path, kaggle):
    _, path = _submission_file(tmp_path)
    cfg, _ = make_cfg(tmp_path, competition=None)
    with pytest.raises(PipelineError, match="submission.competition"):
        run_submit(cfg, path, "first try")
    with pytest.raises(PipelineError, match="submission.competition"):
        run_lb_sync(cfg)
    assert kaggle() == [] and not Paths(cfg).submissions_log.exists()


def test_parse_kaggle_submissions_skips_warnings():
    frame = parse_kaggle_submissions(KAGGLE_CSV)
    assert frame["fileName"].tolist() == ["exp-alpha.csv", "exp-alpha.csv", "someone-else.csv"]
    with pytest.raises(PipelineError, match="fileName"):
        parse_kaggle_submissions("401 - Unauthorized")


def test_lb_sync_stores_public_scores_and_rebuilds_the_leaderboard(tmp_path, kaggle):
    cfg, path = _submission_file(tmp_path)
    run_submit(cfg, path, "first try")
    run_submit(cfg, path, "second try")
    cv = Paths(cfg).cv_json("alpha")
    cv.parent.mkdir(parents=True)
    cv.write_text(json.dumps({"metric": "accuracy", "greater_is_better": True, "folds": [0.9, 0.8], "oof": 0.85}))
    board = lb_sync(cfg)
    assert kaggle()[-1] == ["competitions", "submissions", "fake-comp", "-v"]
    log = read_submissions_log(cfg).set_index("message")
    assert log.loc["first try", "public_lb"] == pytest.approx(0.91234)
    assert np.isnan(log.loc["second try", "public_lb"]) and log.loc["second try", "status"] == "pending"
    row = pd.read_csv(board).set_index("model").loc["alpha"]
    assert row["public_lb"] == pytest.approx(0.91234) and row["submission"] == str(path)


# ---------------------------------------------------------------------------- local scoring


def test_score_against_a_solution(tmp_path, capsys):
    cfg, spec = make_cfg(tmp_path)
    sub = write_submission(cfg, spec, preds_frame(spec, np.eye(3)[[0, 1, 2, 0, 1]]), tmp_path / "sub.csv")
    solution = tmp_path / "solution.csv"
    pd.DataFrame({"image_id": TEST_IDS[::-1], "label": ["dog", "dog", "emu", "cat", "cat"]}).to_csv(solution,
                                                                                                  index=False)
    assert run_score(cfg, sub, solution) == pytest.approx(0.6)  # solution rows are matched by id
    assert "accuracy 0.6000" in capsys.readouterr().out


def test_score_of_labels_for_a_probability_metric_falls_back_to_accuracy(tmp_path, capsys):
    cfg, spec = make_cfg(tmp_path, "binary", metric="log_loss", format="labels")
    sub = write_submission(cfg, spec, preds_frame(spec, [0.9, 0.1, 0.8, 0.2, 0.7]), tmp_path / "sub.csv")
    solution = tmp_path / "solution.csv"
    pd.DataFrame({"image_id": TEST_IDS, "label": ["pos", "neg", "neg", "neg", "pos"]}).to_csv(solution, index=False)
    assert run_score(cfg, sub, solution) == pytest.approx(0.8)
    assert "scoring accuracy instead" in capsys.readouterr().out
    cfg, spec = make_cfg(tmp_path, "binary", metric="roc_auc")
    sub = write_submission(cfg, spec, preds_frame(spec, [0.9, 0.1, 0.8, 0.2, 0.7]), tmp_path / "sub.csv")
    assert run_score(cfg, sub, solution) == pytest.approx(5 / 6)  # one of six pos/neg pairs misordered
