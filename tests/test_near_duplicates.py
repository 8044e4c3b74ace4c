"""``folds.group_near_duplicates``: near-duplicate train images (the data report's) stay in one fold,
joined with the group column's groups; ``init`` sets it when the report finds them."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from conftest import ID_COLUMN, write_dataset
from PIL import Image

from pipeline.config.paths import Paths
from pipeline.core.errors import PipelineError
from pipeline.data.images import PATH
from pipeline.data.splits import fold_groups
from pipeline.data.tables import read_train_table
from pipeline.stages.folds import run_folds
from pipeline.stages.init import run_init


def _with_twins(root, n_train=100, **kwargs) -> tuple[dict, list[tuple[str, str]]]:
    """The digits dataset with every odd train image replaced by its predecessor with one pixel
    a little brighter: a near-duplicate pair (not the same bytes, a few pHash bits apart) per two rows."""
    data = write_dataset(root, n_train=n_train, **kwargs)
    pairs = []
    for i in range(1, n_train, 2):
        first, second = root / "train" / f"img_{i - 1:04d}.png", root / "train" / f"img_{i:04d}.png"
        pixels = np.array(Image.open(first))
        pixels[3, 3] = min(255, int(pixels[3, 3]) + 12)
        Image.fromarray(pixels).save(second)
        pairs.append((f"img_{i - 1:04d}", f"img_{i:04d}"))
    return data, pairs


def _folds(cfg) -> pd.Series:
    frame = pd.read_csv(Paths(cfg).folds_csv, dtype={ID_COLUMN: str})
    return frame.set_index(ID_COLUMN)["fold"]


def test_near_duplicate_pairs_stay_in_one_fold(make_config, tmp_path):
    data, pairs = _with_twins(tmp_path / "twins")
    plain = make_config("folds.n_splits=5", data=data)
    run_folds(plain)
    fold = _folds(plain)
    assert any(fold[a] != fold[b] for a, b in pairs)  # without it, twins land in different folds
    grouped = make_config("folds.n_splits=5", "folds.group_near_duplicates=true", data=data,
                          folds_dir=str(tmp_path / "grouped"))
    run_folds(grouped)
    fold = _folds(grouped)
    assert all(fold[a] == fold[b] for a, b in pairs)
    assert fold.nunique() == 5


def test_near_duplicate_groups_join_the_group_columns(make_config, tmp_path):
    data, pairs = _with_twins(tmp_path / "twins", group=True)
    cfg = make_config("folds.group_near_duplicates=true", data=data)
    table = read_train_table(cfg)
    groups = pd.Series(fold_groups(table, cfg), index=table[ID_COLUMN])
    writers = table.set_index(ID_COLUMN)["writer"]
    for a, b in pairs:
        assert groups[a] == groups[b]
    # rows 4 and 5 are twins across the writers w000 (rows 0-4) and w001 (rows 5-9): one group of ten
    assert writers["img_0004"] != writers["img_0005"]
    assert groups[[f"img_{i:04d}" for i in range(10)]].nunique() == 1
    # every row of a writer stays with it
    assert (groups.groupby(writers).nunique() == 1).all()
    assert PATH in table


def test_too_few_joined_groups_is_one_line(make_config, tmp_path):
    data, _ = _with_twins(tmp_path / "twins", n_train=12, group=True)  # writers of 5 rows joined by twins
    cfg = make_config("folds.n_splits=3", "folds.group_near_duplicates=true", data=data)
    joined = "group column 'writer' joined with the near-duplicate groups has 2 distinct groups, fewer than"
    with pytest.raises(PipelineError, match=joined):
        run_folds(cfg)


def test_init_sets_it_when_the_report_finds_near_duplicates(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # init writes runs/<name>/data_report.md here
    _with_twins(tmp_path / "twins")
    train = pd.read_csv(tmp_path / "twins" / "train.csv")
    train.drop(columns="writer").to_csv(tmp_path / "twins" / "train.csv", index=False)  # no group column
    text = run_init(tmp_path / "twins").read_text()
    assert "group_near_duplicates: true" in text
    assert re.search(r"found \d+ near-duplicate groups inside train", text)
    assert "set folds.group_near_duplicates: true" in capsys.readouterr().out
    # a table with a group column that init uses keeps its groups only
    _with_twins(tmp_path / "grouped", group=True)
    grouped = run_init(tmp_path / "grouped").read_text()
    assert "group_column: writer" in grouped and "group_near_duplicates" not in grouped
