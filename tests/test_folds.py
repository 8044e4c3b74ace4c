"""Folds stage: every strategy's invariants, determinism, skip-if-unchanged, and config mismatches.

The file contract (DESIGN.md): ``folds/<exp>.csv`` holds the id, the target column(s) exactly as
in the train table, the group column when configured, and ``fold`` (0..k-1); every train row
exactly once.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import GROUP_COLUMN, MULTILABEL_LABELS, write_dataset, write_png

from pipeline.cli import main
from pipeline.config.paths import Paths
from pipeline.core.errors import PipelineError
from pipeline.data.splits import assign_folds
from pipeline.data.tables import read_train_table, task_spec
from pipeline.stages.folds import run_folds


def _read(path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def check_contract(cfg) -> pd.DataFrame:
    """Assert the folds file contract against train.csv; return the folds file."""
    d, k = cfg.data, cfg.folds.n_splits
    folds = _read(Paths(cfg).folds_csv)
    train = _read(Paths(cfg).train_csv)
    expected = [d.id_column, *d.target_columns, *([d.group_column] if d.group_column else []), "fold"]
    assert list(folds.columns) == expected
    assert folds[d.id_column].is_unique
    assert sorted(folds[d.id_column]) == sorted(train[d.id_column])  # every row exactly once
    assert set(folds["fold"].astype(int)) == set(range(k))  # no empty fold, nothing else
    merged = train.merge(folds, on=d.id_column, suffixes=("", "_folds"))
    for col in expected[1:-1]:  # targets and group exactly as in the train table
        assert (merged[col] == merged[f"{col}_folds"]).all(), col
    folds["fold"] = folds["fold"].astype(int)
    return folds


def _fold_sizes_balanced(folds: pd.DataFrame) -> None:
    sizes = folds["fold"].value_counts()
    assert sizes.max() - sizes.min() <= 1


def _groups_not_split(folds: pd.DataFrame) -> None:
    per_group = folds.groupby(GROUP_COLUMN)["fold"].nunique()
    assert (per_group == 1).all(), f"groups split across folds: {list(per_group[per_group > 1].index)}"


# ---------------------------------------------------------------------------- strategies


def test_kfold_puts_every_row_in_exactly_one_balanced_fold(make_config):
    cfg = make_config("folds.strategy=kfold")
    run_folds(cfg)
    folds = check_contract(cfg)
    _fold_sizes_balanced(folds)


@pytest.mark.parametrize("task", ["multiclass", "binary"])
def test_stratified_keeps_per_class_counts_within_one(make_config, tmp_path, task):
    data = write_dataset(tmp_path / "data", task, n_train=95, n_test=4)
    cfg = make_config("folds.strategy=stratified", "folds.n_splits=4", data=data)
    run_folds(cfg)
    folds = check_contract(cfg)
    counts = pd.crosstab(folds["label"], folds["fold"])
    assert ((counts.max(axis=1) - counts.min(axis=1)) <= 1).all(), counts
    _fold_sizes_balanced(folds)


def test_stratified_on_the_shared_digits(make_config):
    cfg = make_config()  # demo.yaml: stratified
    assert cfg.folds.strategy == "stratified"
    run_folds(cfg)
    folds = check_contract(cfg)
    counts = pd.crosstab(folds["label"], folds["fold"])
    assert ((counts.max(axis=1) - counts.min(axis=1)) <= 1).all(), counts


def test_group_never_splits_a_group(make_config, tmp_path):
    data = write_dataset(tmp_path / "data", "multiclass", n_train=90, n_test=4, group=True)
    cfg = make_config("folds.strategy=group", data=data)
    run_folds(cfg)
    folds = check_contract(cfg)
    _groups_not_split(folds)
    assert folds[GROUP_COLUMN].nunique() == 18


@pytest.mark.parametrize("task", ["binary", "regression"])
def test_stratified_group_never_splits_a_group_and_spreads_the_target(make_config, tmp_path, task):
    data = write_dataset(tmp_path / "data", task, n_train=120, n_test=4, group=True)
    cfg = make_config("folds.strategy=stratified_group", "folds.n_bins=4", data=data)
    run_folds(cfg)
    folds = check_contract(cfg)
    _groups_not_split(folds)
    if task == "binary":
        share = pd.crosstab(folds["fold"], folds["label"], normalize="index")["odd"]
        overall = (folds["label"] == "odd").mean()
        assert (share - overall).abs().max() < 0.15, share
    else:
        means = folds.assign(t=folds["target"].astype(float)).groupby("fold")["t"].mean()
        assert means.max() - means.min() < 1.5, means


@pytest.mark.parametrize("task", ["multilabel", "multilabel_columns"])
@pytest.mark.parametrize("strategy", ["multilabel_stratified", "stratified"])
def test_multilabel_stratified_keeps_label_frequencies(make_config, tmp_path, task, strategy):
    data = write_dataset(tmp_path / "data", task, n_train=150, n_test=4)
    cfg = make_config(f"folds.strategy={strategy}", data=data)  # stratified: iterative for multilabel
    run_folds(cfg)
    folds = check_contract(cfg)
    table = read_train_table(cfg, check_readable=False)
    y = task_spec(cfg, table).encode(folds)  # folds keep the train table's target columns
    assert y.shape == (150, len(MULTILABEL_LABELS))
    expected = y.sum(axis=0) / 3  # iterative stratification balances each label's positives
    for k in range(3):
        in_fold = y[folds["fold"].to_numpy() == k]
        assert np.abs(in_fold.sum(axis=0) - expected).max() <= 1, (k, in_fold.sum(axis=0), expected)
        assert np.abs(in_fold.mean(axis=0) - y.mean(axis=0)).max() < 0.06  # frequencies too
    sizes = folds["fold"].value_counts()  # iterative stratification trades exact sizes for label balance
    assert (sizes - 50).abs().max() <= 6, sizes


@pytest.mark.parametrize("strategy", ["stratified_regression", "stratified"])
def test_stratified_regression_spreads_the_target_over_folds(make_config, tmp_path, strategy):
    data = write_dataset(tmp_path / "data", "regression", n_train=150, n_test=4)
    cfg = make_config(f"folds.strategy={strategy}", "folds.n_bins=5", data=data)
    run_folds(cfg)
    folds = check_contract(cfg)
    target = folds["target"].astype(float)
    bins = pd.qcut(target, 5, labels=False)
    counts = pd.crosstab(bins, folds["fold"])
    assert ((counts.max(axis=1) - counts.min(axis=1)) <= 2).all(), counts  # quantile edges may differ by a row
    means = target.groupby(folds["fold"]).mean()
    assert means.max() - means.min() < 0.5, means
    _fold_sizes_balanced(folds)


def test_assign_folds_does_not_modify_the_table(make_config):
    cfg = make_config()
    table = read_train_table(cfg, check_readable=False)
    before = table.copy()
    fold = assign_folds(table, task_spec(cfg, table), cfg)
    pd.testing.assert_frame_equal(table, before)
    assert fold.shape == (len(table),) and fold.dtype.kind == "i"


# ---------------------------------------------------------------------------- determinism and skipping


@pytest.mark.parametrize("strategy", ["kfold", "stratified", "group", "stratified_group"])
def test_same_seed_gives_a_byte_identical_file(make_config, tmp_path, strategy):
    data = write_dataset(tmp_path / "data", "multiclass", n_train=120, n_test=4, group=True)
    first = run_folds(make_config(f"folds.strategy={strategy}", f"folds_dir={tmp_path / 'a'}", data=data))
    second = run_folds(make_config(f"folds.strategy={strategy}", f"folds_dir={tmp_path / 'b'}", data=data))
    assert first != second and first.read_bytes() == second.read_bytes()
    other = run_folds(make_config(f"folds.strategy={strategy}", "folds.seed=7", f"folds_dir={tmp_path / 'c'}",
                                  data=data))
    assert other.read_bytes() != first.read_bytes(), "another seed should give another split"


def test_rerun_with_unchanged_inputs_leaves_the_file_untouched(make_config, capsys):
    cfg = make_config()
    out = run_folds(cfg)
    assert "wrote" in capsys.readouterr().out
    stat, data = out.stat(), out.read_bytes()
    assert run_folds(make_config()) == out  # a fresh, equal config object
    assert "up to date" in capsys.readouterr().out
    assert out.stat().st_mtime_ns == stat.st_mtime_ns and out.stat().st_ino == stat.st_ino
    assert out.read_bytes() == data


def test_force_rewrites(make_config, capsys):
    cfg = make_config()
    out = run_folds(cfg)
    capsys.readouterr()
    inode = out.stat().st_ino
    run_folds(cfg, force=True)
    assert "wrote" in capsys.readouterr().out
    assert out.stat().st_ino != inode  # atomically replaced


@pytest.mark.parametrize("change", ["folds.seed=1", "folds.n_splits=4", "folds.strategy=kfold"])
def test_changed_folds_config_redoes_the_split(make_config, capsys, change):
    out = run_folds(make_config())
    capsys.readouterr()
    run_folds(make_config(change))
    assert "wrote" in capsys.readouterr().out
    assert check_contract(make_config(change))["fold"].nunique() == make_config(change).folds.n_splits
    assert out.exists()


def test_changed_train_table_redoes_the_split(make_config, tmp_path, capsys):
    data = write_dataset(tmp_path / "data", "multiclass", n_train=60, n_test=4)
    cfg = make_config(data=data)
    run_folds(cfg)
    train_csv = tmp_path / "data" / "train.csv"
    train = _read(train_csv)
    train.iloc[:-1].to_csv(train_csv, index=False)  # drop a row
    capsys.readouterr()
    run_folds(cfg)
    assert "wrote" in capsys.readouterr().out
    assert len(check_contract(cfg)) == 59


def test_class_folder_layout_redoes_the_split_when_images_change(make_config, tmp_path, capsys):
    data = write_dataset(tmp_path / "data", "multiclass", n_train=60, n_test=4, layout="folders")
    cfg = make_config(data=data)
    run_folds(cfg)
    write_png(tmp_path / "data" / "train" / "3" / "extra.png", np.zeros((8, 8), np.uint8))
    capsys.readouterr()
    run_folds(cfg)
    assert "wrote" in capsys.readouterr().out
    assert len(pd.read_csv(Paths(cfg).folds_csv)) == 61


# ---------------------------------------------------------------------------- strategy/task mismatches


def _nothing_written(cfg) -> None:
    out = Paths(cfg).folds_csv
    assert not out.exists()
    assert not (out.parent / f".{out.name}.stamp").exists()


def test_group_strategy_without_group_column_is_an_error(make_config):
    cfg = make_config("folds.strategy=group")
    with pytest.raises(PipelineError, match="data.group_column"):
        run_folds(cfg)
    _nothing_written(cfg)


def test_multilabel_stratified_on_a_multiclass_task_is_an_error(make_config):
    cfg = make_config("folds.strategy=multilabel_stratified")
    with pytest.raises(PipelineError, match="needs data.task: multilabel"):
        run_folds(cfg)
    _nothing_written(cfg)


def test_stratified_group_on_multilabel_is_an_error(make_config, tmp_path):
    data = write_dataset(tmp_path / "data", "multilabel", n_train=30, n_test=4, group=True)
    cfg = make_config("folds.strategy=stratified_group", data=data)
    with pytest.raises(PipelineError, match="multilabel_stratified"):
        run_folds(cfg)
    _nothing_written(cfg)


def test_fewer_rows_than_folds_is_an_error(make_config, tmp_path):
    data = write_dataset(tmp_path / "data", "multiclass", n_train=4, n_test=2)
    cfg = make_config("folds.strategy=kfold", "folds.n_splits=5", data=data)
    with pytest.raises(PipelineError, match="4 train rows cannot fill folds.n_splits=5"):
        run_folds(cfg)
    _nothing_written(cfg)


@pytest.mark.parametrize("strategy", ["group", "stratified_group"])
def test_fewer_groups_than_folds_is_a_clear_error(make_config, tmp_path, strategy):
    data = write_dataset(tmp_path / "data", "binary", n_train=10, n_test=2, group=True)  # 2 writers
    cfg = make_config(f"folds.strategy={strategy}", data=data)
    with pytest.raises(PipelineError, match="groups"):
        run_folds(cfg)
    _nothing_written(cfg)


def test_stratified_regression_on_a_classification_task_is_an_error(make_config):
    cfg = make_config("folds.strategy=stratified_regression")
    with pytest.raises(PipelineError, match="regression"):
        run_folds(cfg)
    _nothing_written(cfg)


# ---------------------------------------------------------------------------- CLI


def test_cli_folds_writes_the_file_then_skips(make_config, tmp_path, capsys):
    cfg = make_config()
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    assert main(["folds", "-c", str(path), "folds.strategy=kfold"]) == 0
    assert "wrote" in capsys.readouterr().out
    check_contract(make_config("folds.strategy=kfold"))
    assert main(["folds", "-c", str(path), "folds.strategy=kfold"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_cli_bad_data_exits_2_without_traceback(make_config, tmp_path, capsys):
    data = write_dataset(tmp_path / "data", "multiclass", n_train=30, n_test=4)
    (tmp_path / "data" / "train" / "img_0004.png").unlink()
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(make_config(data=data).to_dict()))
    assert main(["folds", "-c", str(path)]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("error: ") and "img_0004" in err and "Traceback" not in out + err


def test_group_folds_need_scikit_learn_1_6_and_say_so(make_config, tmp_path, monkeypatch):
    """GroupKFold(shuffle=...) is scikit-learn 1.6's: an older one is a clear error, not a TypeError."""
    import pipeline.data.splits as folds_mod

    class OldGroupKFold:  # scikit-learn < 1.6: no shuffle, no random_state
        def __init__(self, n_splits=5):
            self.n_splits = n_splits

    monkeypatch.setattr(folds_mod, "GroupKFold", OldGroupKFold)
    cfg = make_config("folds.strategy=group", data=write_dataset(tmp_path / "data", "multiclass", n_train=30,
                                                                 n_test=2, group=True))
    with pytest.raises(PipelineError, match=r"needs scikit-learn >= 1\.6 .*pip install 'scikit-learn>=1\.6'"):
        run_folds(cfg)
