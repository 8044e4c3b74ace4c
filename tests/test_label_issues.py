"""``label-issues`` (cleanlab on the OOF probabilities) and ``data.exclude_ids``.

The ranking tests feed synthetic out-of-fold probabilities (a model that knows the true class)
with planted flipped labels; the stage tests write a real tiny digits competition, its folds, and a
synthetic ``oof.csv``/``cv.json`` where training would put them, so no model trains here.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import ID_COLUMN, write_dataset

from pipeline.cli import main
from pipeline.config.paths import Paths
from pipeline.config.schema import dump_config
from pipeline.core import artifacts
from pipeline.data.tables import read_folds, read_train_table, task_spec
from pipeline.domain.tasks import TaskSpec
from pipeline.ensembles.label_issues import COLUMNS, rank_label_issues
from pipeline.stages.folds import run_folds


def confident_probs(true: np.ndarray, k: int, rng: np.random.Generator, peak: float = 8.0) -> np.ndarray:
    """Softmax probabilities of a model that mostly knows each row's true class (some rows unsure)."""
    logits = rng.normal(0.0, 1.0, (len(true), k))
    logits[np.arange(len(true)), true] += peak * rng.uniform(0.3, 1.0, len(true))
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def flip(true: np.ndarray, k: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``true`` with ``n`` rows given another class; returns the given labels and the flipped rows."""
    rows = rng.choice(len(true), n, replace=False)
    given = true.copy()
    given[rows] = (true[rows] + rng.integers(1, k, n)) % k
    return given, rows


def test_planted_flips_rank_on_top_multiclass():
    rng = np.random.default_rng(0)
    k, n, planted = 4, 400, 20
    true = rng.integers(0, k, n)
    given, rows = flip(true, k, planted, rng)
    spec = TaskSpec("multiclass", ("label",), ("a", "b", "c", "d"))
    ids = [f"r{i:03d}" for i in range(n)]
    frame = rank_label_issues(spec, ids, given, confident_probs(true, k, rng), "id")
    planted_ids = {ids[i] for i in rows}
    top = set(frame["id"].head(planted))
    assert len(top & planted_ids) >= planted - 1, "the planted flips should fill the top-k"
    issues = set(frame.loc[frame["issue"], "id"])
    assert len(issues & planted_ids) >= 0.8 * planted, "cleanlab's issue set should hold most flips"
    assert len(issues & planted_ids) >= 0.9 * len(issues), "and little else"
    assert list(frame["rank"]) == list(range(1, n + 1))
    for part in (frame[frame["issue"]], frame[~frame["issue"]]):  # issues first, each part by quality
        assert part["label_quality"].is_monotonic_increasing
    assert frame["issue"].iloc[: int(frame["issue"].sum())].all()
    first = frame.iloc[0]
    row = ids.index(first["id"])
    assert first["given_label"] == spec.classes[given[row]] and first["predicted_label"] == spec.classes[true[row]]


def test_planted_flips_rank_on_top_binary():
    """A binary ``pred`` is P(positive class) = classes[1]: flipped rows are found and named right."""
    rng = np.random.default_rng(1)
    n, planted = 300, 15
    true = rng.integers(0, 2, n)
    given, rows = flip(true, 2, planted, rng)
    spec = TaskSpec("binary", ("label",), ("cat", "dog"))
    p_dog = confident_probs(true, 2, rng)[:, 1]
    ids = [f"r{i:03d}" for i in range(n)]
    frame = rank_label_issues(spec, ids, given.astype(np.float32), p_dog, "id")
    planted_ids = {ids[i] for i in rows}
    assert len(set(frame["id"].head(planted)) & planted_ids) >= planted - 1
    flagged = frame[frame["id"].isin(planted_ids)]
    for r in flagged.itertuples():
        i = ids.index(r.id)
        assert (r.given_label, r.predicted_label) == (spec.classes[given[i]], spec.classes[true[i]])


# ---------------------------------------------------------------------------- the stage


def competition(tmp_path, make_config, task="multiclass", n_train=90, flips=6, seed=0, **data):
    """A digits competition with ``flips`` labels changed in train.csv, its folds, and a synthetic
    ``oof.csv``/``cv.json`` of a model that knows the true digits; returns (cfg, config path, flipped ids)."""
    section = write_dataset(tmp_path / "data", task, n_train=n_train, n_test=6)
    section.update(data)
    train_csv = tmp_path / "data" / "train.csv"
    table = pd.read_csv(train_csv, dtype=str)
    rng = np.random.default_rng(seed)
    flipped = []
    if task in ("binary", "multiclass"):
        values = sorted(table["label"].unique())
        true = table["label"].map(values.index).to_numpy()
        given, rows = flip(true, len(values), flips, rng)
        table["label"] = [values[g] for g in given]
        table.to_csv(train_csv, index=False)
        flipped = table[ID_COLUMN].iloc[rows].tolist()
    cfg = make_config(data=section)
    path = tmp_path / "exp.yaml"
    path.write_text(dump_config(cfg))
    if task not in ("binary", "multiclass"):
        return cfg, path, flipped
    run_folds(cfg)
    folds = read_folds(cfg)
    spec = task_spec(cfg, folds)
    true_by_id = dict(zip(table[ID_COLUMN], true))
    probs = confident_probs(np.array([true_by_id[i] for i in folds[ID_COLUMN]]), len(values), rng)
    oof = spec.predictions_frame(folds[ID_COLUMN], probs[:, 1] if task == "binary" else probs, ID_COLUMN)
    oof.insert(1, "fold", folds["fold"])
    model = cfg.backbones[0].slug
    artifacts.write_csv(Paths(cfg).oof_csv(model), oof)
    artifacts.write_json(Paths(cfg).cv_json(model), {"metric": cfg.metric, "greater_is_better": True,
                                                     "folds": [0.9, 0.9, 0.9], "oof": 0.9, "cv_mean": 0.9})
    return cfg, path, flipped


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_the_stage_writes_the_csv_contract_and_the_png(tmp_path, make_config, capsys):
    cfg, path, flipped = competition(tmp_path, make_config)
    assert main(["label-issues", "-c", str(path)]) == 0
    out = capsys.readouterr().out
    csv = Paths(cfg).exp_dir / "label_issues.csv"
    frame = pd.read_csv(csv, dtype={ID_COLUMN: str, "given_label": str, "predicted_label": str})
    assert list(frame.columns) == [ID_COLUMN, *COLUMNS]
    assert len(frame) == 90 and frame[ID_COLUMN].is_unique and frame["issue"].dtype == bool
    assert list(frame["rank"]) == list(range(1, 91))
    assert set(frame[ID_COLUMN].head(len(flipped))) == set(flipped)
    assert (frame["given_label"] != frame["predicted_label"]).head(len(flipped)).all()
    png = Paths(cfg).exp_dir / "label_issues.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "of 90 train rows" in out and "data.exclude_ids" in out and frame[ID_COLUMN][0] in out
    assert main(["label-issues", "-c", str(path)]) == 0
    assert "up to date" in capsys.readouterr().out


def test_binary_through_the_stage(tmp_path, make_config, capsys):
    cfg, path, flipped = competition(tmp_path, make_config, task="binary", n_train=80, flips=4)
    assert main(["label-issues", "-c", str(path), "--model", cfg.backbones[0].slug]) == 0
    frame = pd.read_csv(Paths(cfg).exp_dir / "label_issues.csv", dtype=str)
    assert set(frame[ID_COLUMN].head(4)) == set(flipped)
    assert set(frame["given_label"]) == {"even", "odd"}


def test_regression_and_multilabel_get_one_clear_line(tmp_path, make_config, capsys):
    for task in ("regression", "multilabel"):
        _, path, _ = competition(tmp_path / task, make_config, task=task, n_train=30)
        err = one_line_error(capsys, ["label-issues", "-c", str(path)])
        assert "classification only" in err and task in err


def test_an_unknown_model_names_the_ones_there(tmp_path, make_config, capsys):
    cfg, path, _ = competition(tmp_path, make_config, n_train=60, flips=3)
    err = one_line_error(capsys, ["label-issues", "-c", str(path), "--model", "nope"])
    assert "--model nope" in err and cfg.backbones[0].slug in err


# ---------------------------------------------------------------------------- data.exclude_ids


def test_exclude_ids_drops_rows_and_the_folds_follow(tmp_path, make_config, capsys):
    cfg, path, flipped = competition(tmp_path, make_config)
    assert main(["label-issues", "-c", str(path)]) == 0
    issues = pd.read_csv(Paths(cfg).exp_dir / "label_issues.csv", dtype=str)
    copy = tmp_path / "data" / "exclude_ids.csv"
    issues.to_csv(copy, index=False)  # the whole file: only rows with issue True are dropped
    dropped = set(issues.loc[issues["issue"] == "True", ID_COLUMN])
    assert set(flipped) <= dropped
    raw = yaml.safe_load(path.read_text())
    raw["data"]["exclude_ids"] = "exclude_ids.csv"  # relative to data.root
    path.write_text(yaml.safe_dump(raw))
    stale = one_line_error(capsys, ["label-issues", "-c", str(path)])  # the old folds no longer match
    assert "make folds" in stale
    assert main(["folds", "-c", str(path)]) == 0
    capsys.readouterr()
    from pipeline.config.schema import load_config
    ecfg = load_config(path)
    folds = read_folds(ecfg)
    assert len(folds) == 90 - len(dropped) and not dropped & set(folds[ID_COLUMN])
    assert len(read_train_table(ecfg, check_readable=False)) == len(folds)
    keep = min(dropped)  # a row kept after all: the folds are redone, not "up to date"
    issues.loc[issues[ID_COLUMN] == keep, "issue"] = "False"
    issues.to_csv(copy, index=False)
    assert main(["folds", "-c", str(path)]) == 0
    assert "up to date" not in capsys.readouterr().out
    assert keep in set(read_folds(ecfg)[ID_COLUMN])


def test_a_plain_id_list_works_and_an_absolute_path_too(tmp_path, make_config):
    section = write_dataset(tmp_path / "data", "multiclass", n_train=60, n_test=6)
    ids = ["img_0003", "img_0010"]
    pd.DataFrame({ID_COLUMN: ids}).to_csv(tmp_path / "drop.csv", index=False)
    cfg = make_config(data={**section, "exclude_ids": str(tmp_path / "drop.csv")})
    run_folds(cfg)
    folds = read_folds(cfg)
    assert len(folds) == 58 and not set(ids) & set(folds[ID_COLUMN])


@pytest.mark.parametrize("case", ["missing", "no_id_column", "unknown_ids", "bad_issue", "not_csv"])
def test_bad_exclude_ids_are_one_line_before_anything_is_written(tmp_path, make_config, capsys, case):
    section = write_dataset(tmp_path / "data", "multiclass", n_train=60, n_test=6)
    target = tmp_path / "data" / "drop.csv"
    if case == "no_id_column":
        pd.DataFrame({"id": ["img_0001"]}).to_csv(target, index=False)
    elif case == "unknown_ids":
        pd.DataFrame({ID_COLUMN: ["img_0001", "img_9999"]}).to_csv(target, index=False)
    elif case == "bad_issue":
        pd.DataFrame({ID_COLUMN: ["img_0001"], "issue": ["maybe"]}).to_csv(target, index=False)
    cfg = make_config(data=section)
    path = tmp_path / "exp.yaml"
    raw = yaml.safe_load(dump_config(cfg))
    raw["data"]["exclude_ids"] = "drop.txt" if case == "not_csv" else "drop.csv"
    path.write_text(yaml.safe_dump(raw))
    err = one_line_error(capsys, ["folds", "-c", str(path)])
    assert "data.exclude_ids" in err
    if case != "not_csv":
        assert str(target) in err
    expected = {"missing": "does not exist", "no_id_column": f"no column '{ID_COLUMN}'",
                "unknown_ids": "img_9999", "bad_issue": "'maybe'", "not_csv": "name a CSV file"}[case]
    assert expected in err
    assert not Paths(cfg).folds_csv.exists()
