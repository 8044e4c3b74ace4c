"""The bench's ``tta`` section: the configured TTA views against the same plus ``zoom``, frozen-only
and fine-tuned, each in its own runs folder, scored on CV and the hidden test."""
from __future__ import annotations

import pytest
from test_bench_pairs import _with_solution

from pipeline.bench import photos


@pytest.mark.slow
def test_the_tta_section_adds_zoom_to_the_configured_views(make_config, tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.setattr(photos, "ZOOM_MEMBERS", ())  # the first backbone only (the tiny test model)
    cfg = make_config("folds.n_splits=2", "train.unfrozen.epochs=1", "augment.tta=[identity,zoom]",
                      data=_with_solution(tmp_path, 60, 20))
    md = photos.tta_zoom(cfg)
    rows = [line for line in md.splitlines() if line.startswith("| test_efficientnet")]
    assert [r.split(" | ")[1] for r in rows] == ["identity", "identity, zoom"] * 2  # zoom in the base is dropped
    assert [r.split(" | ")[0] for r in rows][::2] == ["| test_efficientnet frozen-only",
                                                     "| test_efficientnet fine-tuned (always)"]
    assert "With `zoom` added: CV higher for " in md and "of 2 models" in md
    folders = sorted(p.name for p in (tmp_path / "runs" / "bench").iterdir() if p.name.startswith("tta-"))
    assert folders == ["tta-test_efficientnet-always-identity", "tta-test_efficientnet-always-identity-zoom",
                       "tta-test_efficientnet-never-identity", "tta-test_efficientnet-never-identity-zoom"]
    for name in folders:  # each run predicted with its own views
        config = next((tmp_path / "runs" / "bench" / name / "runs").rglob("config.yaml")).read_text()
        assert ("- zoom" in config) == name.endswith("zoom")
