"""The suite bench (``make bench-suite``): the probe anchor, ``fast`` and ``budget`` on a tiny
stand-in set with the devdata layout, each as its own process, scored against ``solution.csv``,
appended to ``benchmarks/suite.csv`` with its contract's columns and written as a Markdown table."""
from __future__ import annotations

import pandas as pd
import pytest
from conftest import _digits, write_dataset

from pipeline.bench import suite

TINY = "backbones=[{name: test_efficientnet, weights: none, image_size: 32}]"


def _stand_in(data_dir, name="tiny", n_train=60, n_test=20):
    """A devdata-like set: ``<data>/<name>/`` in Kaggle layout plus ``solution.csv``."""
    write_dataset(data_dir / name, "multiclass", n_train=n_train, n_test=n_test)
    labels = _digits()[1][n_train:n_train + n_test]
    pd.DataFrame({"image_id": [f"test_{i:04d}" for i in range(n_test)], "label": [str(v) for v in labels]}).to_csv(
        data_dir / name / "solution.csv", index=False)


def test_the_table_has_a_row_per_set_and_every_recipes_columns():
    frame = pd.DataFrame([{"set": "a", "recipe": "anchor", "test_score": 0.9, "cv": "", "honesty": "none: no folds",
                           "wall_s": 40.0, "date": "2026-12-07", "commit": "abc"},
                          {"set": "a", "recipe": "fast", "test_score": 0.92, "cv": 0.91,
                           "honesty": "untouched folds", "wall_s": 30.0, "date": "2026-12-07", "commit": "abc"}],
                         columns=suite.COLUMNS)
    md = suite.suite_table(frame, suite.SuiteOptions(recipes=("anchor", "fast")))
    lines = md.splitlines()
    assert lines[0] == "| set | anchor test | anchor s | fast test | fast s | fast CV (honesty) |"
    assert lines[2] == "| a | 0.9000 | 40 | 0.9200 | 30 | 0.9100 (untouched folds) |"
    assert "commit abc" in md


def test_options_from_the_command_line():
    opts = suite.options_from_words(suite.SuiteOptions(), "d", "a, b", "fast", 5.0)
    assert (str(opts.data), opts.sets, opts.recipes, opts.budget_min) == ("d", ("a", "b"), ("fast",), 5.0)
    assert suite.options_from_words(suite.SuiteOptions()).sets == suite.SETS


def test_a_missing_set_is_one_line_before_anything_runs(tmp_path):
    from pipeline.core.errors import PipelineError

    with pytest.raises(PipelineError, match="nope not found under"):
        suite.bench_suite(suite.SuiteOptions(data=tmp_path, sets=("nope",)), csv_path=tmp_path / "s.csv")
    assert not (tmp_path / "s.csv").exists()


@pytest.mark.slow
def test_every_recipe_runs_as_a_process_and_its_rows_are_appended(tmp_path, monkeypatch):
    data = tmp_path / "devdata"
    _stand_in(data)
    monkeypatch.chdir(tmp_path)
    opts = suite.SuiteOptions(data=data, sets=("tiny",), budget_min=1.0, work_dir=tmp_path / "work",
                              words=(TINY, "folds.n_splits=2", "train.unfrozen.epochs=1", "train.batch_size=16"),
                              anchor_args=("--models", "test_efficientnet", "--weights", "none"))
    csv = tmp_path / "benchmarks" / "suite.csv"
    md = suite.bench_suite(opts, csv_path=csv)
    rows = pd.read_csv(csv)
    assert list(rows.columns) == suite.COLUMNS
    assert list(rows["recipe"]) == ["anchor", "fast", "budget"] and set(rows["set"]) == {"tiny"}
    assert rows["test_score"].between(0, 1).all() and (rows["wall_s"] > 0).all()
    anchor = rows.recipe == "anchor"
    assert rows.loc[~anchor, "cv"].notna().all() and rows.loc[anchor, "cv"].isna().all()  # the anchor has no folds
    for recipe in ("anchor", "fast", "budget"):  # each in a fresh folder of its own, with its config from init
        assert (tmp_path / "work" / "tiny" / recipe / "configs" / "tiny.yaml").exists()
    assert md.splitlines()[2].startswith("| tiny | ")
    suite.bench_suite(opts.__class__(**{**opts.__dict__, "recipes": ("anchor",)}), csv_path=csv)
    assert len(pd.read_csv(csv)) == 4  # appended, the earlier rows kept
