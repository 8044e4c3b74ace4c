"""Every ``make bench`` section end to end on a tiny set, and the copies the input rows read.

Each section in :data:`pipeline.bench.report.SECTIONS` runs through ``run_bench`` on the digits (a
tiny stand-in for the photo sets, with the same layout: ``train.csv``, ``sample_submission.csv``
and the hidden labels ``solution.csv``), shrunk by the config (the tiny ``test_efficientnet`` at 32
px, two folds, one epoch per phase) and by ``run_bench``'s per-section ``settings`` (one seed, few
trials, small sides), and must write its block into a BENCHMARKS.md under ``tmp_path``. A section
that cannot run here says why in one line and writes nothing.
"""
from __future__ import annotations

import pandas as pd
import pytest
from conftest import _digits, write_dataset

from pipeline.bench.inputs import scaled_copy
from pipeline.data.images import PATH
from pipeline.data.tables import read_test_table, read_train_table


def with_solution(root, n_train: int = 60, n_test: int = 20, **layout) -> dict:
    """``write_dataset`` plus ``solution.csv`` (the test rows' true digits), as the demo data and the
    development photo sets have it."""
    data = write_dataset(root, "multiclass", n_train=n_train, n_test=n_test, **layout)
    suffix = ".png" if layout.get("id_extension") else ""
    labels = _digits()[1][n_train:n_train + n_test]
    pd.DataFrame({"image_id": [f"test_{i:04d}{suffix}" for i in range(n_test)],
                  "label": [str(v) for v in labels]}).to_csv(root / "solution.csv", index=False)
    return data


# ---------------------------------------------------------------------------- the input rows' copies


@pytest.mark.parametrize("layout", [{}, {"id_extension": True}, {"layout": "folders"}],
                         ids=["bare ids", "ids with .png", "class folders"])
def test_a_scaled_copy_is_read_through_the_pipelines_own_id_resolution(make_config, tmp_path, layout):
    """PNGs re-saved as JPEGs: the copy's tables resolve every id (bare, with the original's
    extension, or a class folder's) to its JPEG, in the original's order, labels kept."""
    cfg = make_config(data=with_solution(tmp_path / "data", 12, 4, **layout))
    copy = scaled_copy(cfg, 40, tmp_path / "copy")
    for read in (read_train_table, read_test_table):
        source, copied = read(cfg), read(copy)
        assert list(copied[cfg.data.id_column]) == list(source[cfg.data.id_column])
        assert all(p.endswith(".jpg") and p.startswith(str(tmp_path / "copy")) for p in copied[PATH])
        pd.testing.assert_frame_equal(copied.drop(columns=[PATH]), source.drop(columns=[PATH]))
    assert (tmp_path / "copy" / "solution.csv").is_file()
    made = (tmp_path / "copy" / ".complete").stat().st_mtime_ns
    assert scaled_copy(cfg, 40, tmp_path / "copy") == copy  # made once, kept
    assert (tmp_path / "copy" / ".complete").stat().st_mtime_ns == made


def test_the_reduced_decode_probe_scores_copies_of_images_whose_ids_lack_the_extension(make_config, tmp_path):
    """The demo's case (issue 36): ids without an extension, PNGs copied as JPEGs, the probe row
    scoring the copies' test images against solution.csv."""
    from pipeline.bench.inputs import bench_reduced_decode

    cfg = make_config(data=with_solution(tmp_path / "data", 30, 10))
    r = bench_reduced_decode(scaled_copy(cfg, 64, tmp_path / "copy"), 32, probe=True)
    assert r["metric"] == "accuracy" and 0 <= r["full_score"] <= 1 and 0 <= r["reduced_score"] <= 1
