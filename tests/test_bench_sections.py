"""Every ``make bench`` section end to end on a tiny set, and the copies the input rows read.

Each section in :data:`pipeline.bench.report.SECTIONS` runs through ``run_bench`` on the digits (a
tiny stand-in for the photo sets, with the same layout: ``train.csv``, ``sample_submission.csv``
and the hidden labels ``solution.csv``), shrunk by the config (the tiny ``test_efficientnet`` at 32
px, two folds, one epoch per phase) and by ``run_bench``'s per-section ``settings`` (one seed, few
trials, small sides), and must write its block into a BENCHMARKS.md under ``tmp_path``. A section
that cannot run here says why in one line and writes nothing.
"""
from __future__ import annotations

import sys

import pandas as pd
import pytest
import torch
from conftest import _digits, write_dataset

from pipeline.bench.inputs import scaled_copy
from pipeline.bench.report import SECTIONS, run_bench
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
    extension, or a class folder's) to its JPEG, in the original's order, labels kept (issue 36: the
    demo's bare ids once sent the input rows to ``test/digit_0002``, a file that does not exist)."""
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


# ---------------------------------------------------------------------------- every section, end to end

# run_bench's settings per section: the smallest run that still goes through all of its code
SPEED = {"model": "test_efficientnet", "size": 32, "batch": 16, "steps": 2, "repeats": 1, "epochs": 1}
INPUT = {"size": 32, "rows": 32, "repeats": 1, "large_side": 48, "decode_side": 64, "probe": True}
SMOKE = {
    "speed": {"speed": SPEED, "input": INPUT},
    "input": {"input": INPUT},
    "cpu": {},
    "timeline": {},
    "tune": {"tune": {"trials": 2, "eval_folds": (1,)}},
    "lpft": {"lpft": {"folds": (0,)}},
    "finetune": {"finetune": {"seeds": (42,)}},
    "frozen": {"frozen": {"seeds": (42,)}},
    "tta": {"tta": {"members": ()}},
    "features": {"features": {"members": ("test_efficientnet", "test_resnet")}},
    "unfreeze": {"unfreeze": {"seeds": (42,)}},
    "pairs": {"pairs": {"seeds": (42,), "pairs": {"easy": ("0", "1")}}},
    "lrs": {},
    "gpu": {"gpu": {"models": (("test_efficientnet", 32),), "side": 48, "steps": 2, "repeats": 1}},
    "ray": {"ray": {"folds": 2}},
    "labels": {},
    "presets": {"presets": {"presets": ("fast",), "keep": ("backbones",)}},
}
OWN_TEST = {"suite"}  # sections with a test of their own: tests/test_bench_suite.py
TINY = ["folds.n_splits=2", "train.num_workers=0", "augment.train=[]"]


@pytest.fixture
def stand_in(make_config, tmp_path):
    """The digits as a stand-in for a photo set: train.csv, sample submission and solution.csv."""
    return make_config(*TINY, data=with_solution(tmp_path / "data"))


@pytest.mark.slow
@pytest.mark.parametrize("section", [s for s in SECTIONS if s not in OWN_TEST])
def test_every_section_runs_end_to_end_and_writes_its_block(section, stand_in, tmp_path, capsys, one_torch_thread):
    assert section in SMOKE, f"bench section {section!r} has no smoke settings here: add the smallest run of it"
    if section == "gpu" and not torch.cuda.is_available():
        pytest.skip("no GPU: test_a_section_that_cannot_run_here_says_so_and_writes_nothing covers this machine")
    out = run_bench(stand_in, output=str(tmp_path / "BENCHMARKS.md"), sections=(section,), settings=SMOKE[section])
    text = out.read_text()
    for name in (section, "input") if section == "speed" else (section,):  # speed runs the input rows too
        block = text.split(f"<!-- bench:{name} -->\n", 1)[1].split(f"<!-- /bench:{name} -->", 1)[0]
        assert block.startswith("## ") and "|---|" in block, block
    assert "nothing measured" not in capsys.readouterr().out


# ---------------------------------------------------------------------------- sections that cannot run here

HIDDEN_LABELS = ("cpu", "finetune", "frozen", "tta", "features", "unfreeze", "pairs", "lrs", "labels", "presets")


def _no_gpu(monkeypatch, make_config, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return make_config(*TINY)


def _no_ray(monkeypatch, make_config, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as where it is not installed
    return make_config(*TINY)


def _no_hidden_labels(monkeypatch, make_config, tmp_path):
    return make_config(*TINY)  # the shared digits: no solution.csv


def _no_scene_classes(monkeypatch, make_config, tmp_path):
    return make_config(*TINY, data=with_solution(tmp_path / "data"))  # digits: no forest, sea, glacier, mountain


def _class_folders(monkeypatch, make_config, tmp_path):
    return make_config(*TINY, data=with_solution(tmp_path / "data", layout="folders"))


@pytest.mark.parametrize("sections, where, why", [
    (("gpu",), _no_gpu, "no GPU found (torch.cuda.is_available() is False)"),
    (("ray",), _no_ray, "ray is not installed"),
    (HIDDEN_LABELS, _no_hidden_labels, "it scores on the hidden test labels, and "),
    (("pairs",), _no_scene_classes, "are cut from the scene photos (CONFIG=configs/scenes.yaml)"),
    (("pairs", "labels"), _class_folders, "is read from class sub-folders (data.train_csv: null)"),
], ids=["gpu without a GPU", "ray without ray", "without solution.csv", "pairs on the digits",
        "a class-folder layout"])
def test_a_section_that_cannot_run_here_says_so_and_writes_nothing(sections, where, why, make_config, tmp_path,
                                                                     monkeypatch, capsys):
    out = run_bench(where(monkeypatch, make_config, tmp_path), output=str(tmp_path / "BENCHMARKS.md"),
                    sections=sections)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("--sections ")]
    assert sorted(line.split(":")[0] for line in lines) == sorted(f"--sections {s}" for s in sections)
    assert all(why in line and line.endswith("; nothing measured") for line in lines), lines
    assert not out.exists()
