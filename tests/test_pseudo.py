"""Pseudo-labelling (``python -m pipeline pseudo``): fold-wise labels from the source's fold models,
pseudo rows that train their fold and are never validated or scored, the printed per-class counts,
and clear errors (a bad ``--from``, regression).

The source experiment: ``test_efficientnet`` at 32 px, ``weights: none``, 3 folds of the digits
(200 train, 40 test), ensembles ``mean``, ``weighted`` and ``rank``; trained once for the module.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import shrunk_raw_config, write_dataset

from pipeline import cli
from pipeline.cli import pseudo_experiment
from pipeline.config.paths import Paths
from pipeline.config.schema import config_from_dict, dump_config
from pipeline.core.errors import PipelineError
from pipeline.data.images import PATH
from pipeline.data.tables import read_folds, read_test_table, task_spec
from pipeline.domain.tasks import TaskSpec
from pipeline.stages.ensemble import run_ensemble
from pipeline.stages.folds import run_folds
from pipeline.stages.pseudo import (
    PSEUDO_FILE,
    confident_labels,
    count_table,
    pseudo_label_frame,
    run_pseudo,
    source_fold_predictions,
)
from pipeline.stages.train import run_train
from pipeline.training import trainer as train_module
from pipeline.training.fingerprint import fold_digest
from pipeline.training.pseudo_labels import IMAGE_PATH, TRAIN_FOLD, with_pseudo_labels

MODEL = "test_efficientnet"


@pytest.fixture(scope="module")
def source(tmp_path_factory, digits_root):
    """The source experiment after folds, train and ensemble."""
    tmp = tmp_path_factory.mktemp("pseudo")
    raw = shrunk_raw_config(digits_root, tmp)
    raw["ensemble"]["methods"] = ["mean", "weighted", "rank"]
    cfg = config_from_dict(raw)
    run_folds(cfg)
    run_train(cfg)
    run_ensemble(cfg)
    return cfg, tmp


def _fold_test(cfg, k: int) -> np.ndarray:
    frame = pd.read_csv(Paths(cfg).fold_dir(MODEL, k) / "test.csv", dtype={cfg.data.id_column: str})
    return frame[[c for c in frame.columns if c.startswith("pred_")]].to_numpy()


@pytest.mark.slow
def test_pseudo_rows_train_their_fold_and_are_never_validated_or_scored(source, monkeypatch, capsys):
    cfg, _ = source
    seen = {}
    original = train_module.FoldTrainer.__init__

    def spy(self, job):  # the rows each fold of the new experiment trains and validates on
        original(self, job)
        if job.out_dir is not None:
            seen[job.fold] = (job.table.iloc[self.data.train_idx], job.table.iloc[self.data.valid_idx])

    monkeypatch.setattr(train_module.FoldTrainer, "__init__", spy)
    config_path = pseudo_experiment(cfg, "weighted", threshold=0.1)  # 10 classes: every row passes 0.1
    out = capsys.readouterr().out
    new_cfg = config_from_dict(yaml.safe_load(config_path.read_text()))
    assert new_cfg.name == f"{cfg.name}-pseudo" and new_cfg.train.pseudo_labels.endswith(PSEUDO_FILE)
    id_col, paths, new_paths = cfg.data.id_column, Paths(cfg), Paths(new_cfg)
    rows = pd.read_csv(new_cfg.train.pseudo_labels, dtype=str, keep_default_na=False)
    test = read_test_table(cfg)
    folds = read_folds(cfg)
    assert len(rows) == 3 * len(test) and set(rows[id_col]) == set(test[id_col])

    # the same validation rows: the folds file is the source's, byte for byte
    assert new_paths.folds_csv.read_bytes() == paths.folds_csv.read_bytes()
    # fold k trains on the other folds' real rows plus its own pseudo rows; validates on fold k's real rows only
    assert sorted(seen) == [0, 1, 2]
    for k, (train_rows, valid_rows) in seen.items():
        own = rows[rows[TRAIN_FOLD] == str(k)]
        pseudo = train_rows[train_rows["fold"] < 0]
        assert sorted(pseudo[PATH]) == sorted(own[IMAGE_PATH]) and (pseudo["fold"] == -1 - k).all()
        assert list(pseudo["label"]) == list(own.set_index(IMAGE_PATH).loc[pseudo[PATH], "label"])
        real = train_rows[train_rows["fold"] >= 0]
        assert sorted(real[id_col]) == sorted(folds.loc[folds["fold"] != k, id_col])
        assert sorted(valid_rows[id_col]) == sorted(folds.loc[folds["fold"] == k, id_col])
        assert not set(valid_rows[PATH]) & set(test[PATH])

    # OOF and CV: exactly the train rows, in the folds file's order; no test id anywhere
    oof = pd.read_csv(new_paths.oof_csv(MODEL), dtype={id_col: str}, keep_default_na=False)
    assert oof[id_col].tolist() == folds[id_col].tolist()
    for k in range(3):
        fold_oof = pd.read_csv(new_paths.fold_dir(MODEL, k) / "oof.csv", dtype={id_col: str})
        assert sorted(fold_oof[id_col]) == sorted(folds.loc[folds["fold"] == k, id_col])
    assert new_paths.cv_json(MODEL).exists()
    ens_oof = pd.read_csv(new_paths.ensemble_method_dir("mean") / "oof.csv", dtype={id_col: str})
    assert ens_oof[id_col].tolist() == folds[id_col].tolist()

    # the counts printed per class and fold are the file's
    spec = task_spec(cfg, folds)
    counts = count_table(spec, rows.assign(**{TRAIN_FOLD: rows[TRAIN_FOLD].astype(int)}), 3)
    assert counts.to_string() in out and int(counts.loc["(all)", "total"]) == len(rows)
    assert list(counts.loc["(all)", ["fold0", "fold1", "fold2"]]) == [len(test)] * 3
    # both experiments on the leaderboard, and the CV change printed
    board = pd.read_csv(paths.leaderboard_csv)
    assert {cfg.name, new_cfg.name} <= set(board["experiment"])
    assert "CV change with pseudo-labels" in out and f"  {MODEL}" in out


def test_labels_are_made_fold_by_fold_from_each_fold_model(source):
    """Fold k's labels come from fold k's model (never from a fold average that saw fold k's rows)."""
    cfg, _ = source
    folds, test = read_folds(cfg), read_test_table(cfg)
    spec = task_spec(cfg, folds)
    ids = test[cfg.data.id_column].to_numpy(str)
    by_model = source_fold_predictions(cfg, spec, MODEL, ids)
    by_mean = source_fold_predictions(cfg, spec, "mean", ids)  # one model: its mean is itself
    for k in range(3):
        np.testing.assert_allclose(by_model[k], _fold_test(cfg, k), atol=1e-9)
        np.testing.assert_allclose(by_mean[k], _fold_test(cfg, k), atol=1e-9)
    rows = pseudo_label_frame(cfg, spec, test, by_model, threshold=0.1)
    for k in range(3):
        labels = rows.loc[rows[TRAIN_FOLD] == k, "label"].tolist()
        assert labels == [spec.classes[i] for i in _fold_test(cfg, k).argmax(axis=1)]


def test_a_threshold_nothing_passes_names_the_highest_confidence(source):
    cfg, _ = source
    with pytest.raises(PipelineError, match=r"no test image reaches confidence 1.0 in any fold \(the highest is"):
        run_pseudo(cfg, MODEL, threshold=1.0, name="none-pass")


@pytest.mark.parametrize("bad, why", [("nope", "neither an ensemble method"), ("rank", "ranks, not probabilities"),
                                      ("", "neither an ensemble method")])
def test_a_bad_from_is_one_line_naming_the_valid_choices(source, tmp_path, capsys, bad, why):
    cfg, _ = source
    config = tmp_path / "cfg.yaml"
    config.write_text(dump_config(cfg))
    assert cli.main(["pseudo", "-c", str(config), "--from", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and why in err, err
    assert err.endswith(f"valid: mean, weighted, {MODEL}"), err


def test_regression_is_refused_in_one_line(make_config, tmp_path, capsys):
    cfg = make_config(data=write_dataset(tmp_path / "data", "regression"), metric="rmse")
    with pytest.raises(PipelineError, match="not supported for data.task regression"):
        run_pseudo(cfg, MODEL)
    config = tmp_path / "cfg.yaml"
    config.write_text(dump_config(cfg))
    assert cli.main(["pseudo", "-c", str(config), "--from", MODEL]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "regression" in err


def test_binary_and_multilabel_labels_are_spelled_as_the_train_table():
    binary = TaskSpec("binary", ("label",), ("even", "odd"))
    conf, labels = confident_labels(binary, np.array([[0.97], [0.02], [0.6]]))
    assert labels["label"].tolist() == ["odd", "even", "odd"] and np.allclose(conf, [0.97, 0.98, 0.6])
    text = TaskSpec("multilabel", ("labels",), ("odd", "round", "small"))
    p = np.array([[0.99, 0.01, 0.98], [0.99, 0.4, 0.98], [0.02, 0.03, 0.01]])
    conf, labels = confident_labels(text, p, separator=" ")
    assert labels["labels"].tolist() == ["odd small", "odd small", ""]
    assert np.allclose(conf, [0.98, 0.6, 0.97])  # the least certain label decides: row 2 fails 0.95
    columns = TaskSpec("multilabel", ("odd", "round", "small"), ("odd", "round", "small"))
    _, labels = confident_labels(columns, p)
    assert labels.to_dict("list") == {"odd": [1, 1, 0], "round": [0, 0, 0], "small": [1, 1, 0]}


def test_the_pseudo_file_is_in_the_fold_digest_and_checked(make_config, tmp_path):
    data = write_dataset(tmp_path / "data", "multiclass", n_train=30, n_test=6)
    path = tmp_path / "pseudo.csv"
    image = str(tmp_path / "data" / "test" / "test_0000.png")
    path.write_text(f"image_id,label,{IMAGE_PATH},{TRAIN_FOLD}\ntest_0000,3,{image},0\n")
    cfg = make_config(f"train.pseudo_labels={path}", data=data)
    before = fold_digest(cfg, cfg.backbones[0], 0)
    path.write_text(f"image_id,label,{IMAGE_PATH},{TRAIN_FOLD}\ntest_0000,4,{image},0\n")
    assert fold_digest(cfg, cfg.backbones[0], 0) != before  # a changed pseudo set retrains
    run_folds(cfg)
    folds = read_folds(cfg)
    spec = task_spec(cfg, folds)
    table = with_pseudo_labels(cfg, spec, folds)
    assert len(table) == len(folds) + 1 and table["fold"].iloc[-1] == -1 and table[PATH].iloc[-1] == image
    path.write_text(f"image_id,label,{IMAGE_PATH},{TRAIN_FOLD}\ntest_0000,cat,{image},0\n")
    with pytest.raises(PipelineError, match=r"pseudo.csv: column 'label' holds unknown classes"):
        with_pseudo_labels(cfg, spec, folds)
    path.write_text(f"image_id,label,{IMAGE_PATH},{TRAIN_FOLD}\ntest_0000,3,{image},7\n")
    with pytest.raises(PipelineError, match=r"must hold folds 0..2"):
        with_pseudo_labels(cfg, spec, folds)
