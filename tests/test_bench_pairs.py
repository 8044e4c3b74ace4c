"""The bench's two-class sets cut from a photo set (``make bench ARGS="--sections pairs"``): the
cut keeps exactly the pair's rows in train, sample and solution, and the section trains never,
auto and always on it and reports auto against always."""
from __future__ import annotations

import pandas as pd
import pytest
from conftest import _digits, write_dataset

from pipeline.bench import photos


def _with_solution(tmp_path, n_train=80, n_test=30) -> dict:
    data = write_dataset(tmp_path / "data", "multiclass", n_train=n_train, n_test=n_test)
    labels = _digits()[1][n_train:n_train + n_test]
    pd.DataFrame({"image_id": [f"test_{i:04d}" for i in range(n_test)], "label": [str(v) for v in labels]}).to_csv(
        tmp_path / "data" / "solution.csv", index=False)
    return data


def test_the_cut_keeps_the_pairs_rows_only(make_config, tmp_path):
    cfg = make_config(data=_with_solution(tmp_path))
    data = photos._class_subset(cfg, ("1", "7"), tmp_path / "cut")
    root = tmp_path / "cut"
    train, solution = pd.read_csv(root / "train.csv", dtype=str), pd.read_csv(root / "solution.csv", dtype=str)
    sample = pd.read_csv(root / "sample_submission.csv", dtype=str)
    full = pd.read_csv(tmp_path / "data" / "train.csv", dtype=str)
    assert set(train.label) == {"1", "7"} and len(train) == full.label.isin(["1", "7"]).sum()
    assert set(solution.label) == {"1", "7"} and list(sample.image_id) == list(solution.image_id)
    assert data["data.root"] == str(root) and data["data.sample_submission"] == "sample_submission.csv"
    cut = photos._variant(cfg, data, 42, tmp_path / "run")
    from pipeline.data.tables import read_test_table, read_train_table

    assert len(read_train_table(cut)) == len(train) and len(read_test_table(cut)) == len(solution)


@pytest.mark.slow
def test_the_pairs_section_trains_never_auto_always_and_compares_auto_with_always(make_config, tmp_path, monkeypatch,
                                                                                   one_torch_thread):
    monkeypatch.setattr(photos, "PAIRS", {"easy": ("0", "1")})
    cfg = make_config("folds.n_splits=2", "train.unfrozen.epochs=1", data=_with_solution(tmp_path, 120, 40))
    md = photos.unfreeze_pairs(cfg, seeds=(42,))
    assert md.startswith("**The easy pair: 0 against 1**")
    rows = [line for line in md.splitlines() if line.startswith(("| never | 42", "| auto | 42", "| always | 42"))]
    assert len(rows) == 3
    auto = next(r for r in rows if r.startswith("| auto"))
    assert "unfreeze at" in auto or "frozen-only" in auto  # the decision with its evidence
    assert "`auto` unfroze in " in md and "against `always`: mean train stage" in md
    for recipe in ("never", "auto", "always"):  # each recipe trained in its own runs folder
        cv = list((tmp_path / "runs" / "bench" / f"pairs-easy-{recipe}-s42" / "runs").rglob("cv.json"))
        assert len(cv) == 1, recipe
