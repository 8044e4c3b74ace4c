"""Speed and scale: the image cache, fold-parallel training, DDP under torchrun, the bench smoke run."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.config.paths import Paths
from pipeline.config.schema import dump_config
from pipeline.data.cache import ImageCache
from pipeline.data.images import load_image
from pipeline.data.tables import read_folds
from pipeline.domain.transforms import eval_transform
from pipeline.stages.folds import run_folds
from pipeline.stages.train import run_train

FAST = ["train.num_workers=0", "augment.train=[]", "folds.n_splits=2"]


def _oof(cfg) -> pd.DataFrame:
    return pd.read_csv(Paths(cfg).oof_csv(cfg.backbones[0].name))


def test_image_cache_serves_the_same_pixels_as_the_files(make_config):
    cfg = make_config()
    run_folds(cfg)
    paths = list(read_folds(cfg)["_path"][:20])
    cache = ImageCache(paths, 32, "bicubic")
    resize = eval_transform(32, "bicubic")
    for i, path in enumerate(paths):
        np.testing.assert_array_equal(cache[i], resize(image=load_image(path))["image"].permute(1, 2, 0).numpy())
    assert ImageCache.bytes_needed(len(paths), 32) == cache.array.nbytes


def test_training_with_the_image_cache_gives_the_same_predictions(make_config, tmp_path):
    results = []
    for cached in (False, True):
        cfg = make_config(*FAST, f"train.cache_images={cached}", f"runs_dir={tmp_path / str(cached)}")
        run_folds(cfg)
        run_train(cfg)
        results.append(_oof(cfg))
    pd.testing.assert_frame_equal(results[0], results[1])


def test_augmented_training_does_not_depend_on_the_number_of_loader_workers(make_config, tmp_path):
    """Each row's augmentation is seeded by (epoch seed, row): 0 or 2 worker processes (persistent
    across epochs) load the same augmented batches, so training ends with the same predictions."""
    results = []
    for workers in (0, 2):
        cfg = make_config("folds.n_splits=2", "train.unfrozen.epochs=2", f"train.num_workers={workers}",
                          f"runs_dir={tmp_path / str(workers)}")
        assert cfg.augment.train, "the test needs random augmentation"
        run_folds(cfg)
        run_train(cfg, fold=0)
        fold0 = Paths(cfg).fold_dir(cfg.backbones[0].name, 0)
        results.append(pd.read_csv(fold0 / "oof.csv"))
    pd.testing.assert_frame_equal(results[0], results[1])


def test_seeded_sampler_gives_every_row_once_with_the_epoch_seed():
    from pipeline.data.datasets import SeededSampler, row_seed

    sampler = SeededSampler(10)
    sampler.set_epoch(7)
    first = list(sampler)
    assert sorted(i for i, _ in first) == list(range(10)) and {s for _, s in first} == {7}
    sampler.set_epoch(8)
    assert [i for i, _ in sampler] != [i for i, _ in first]  # a new order each epoch
    sampler.set_epoch(7)
    assert list(sampler) == first
    assert len({row_seed(7, i) for i in range(1000)} | {row_seed(8, i) for i in range(1000)}) == 2000


def test_fold_parallel_training_writes_the_same_files_as_sequential(make_config, tmp_path):
    seq = make_config(*FAST, f"runs_dir={tmp_path / 'seq'}")
    par = make_config(*FAST, f"runs_dir={tmp_path / 'par'}")
    run_folds(seq)
    run_train(seq)
    run_train(par, jobs=2)
    a, b = _oof(seq), _oof(par)
    assert list(a.columns) == list(b.columns) and a["image_id"].tolist() == b["image_id"].tolist()
    pred = [c for c in a.columns if c.startswith("pred")]
    np.testing.assert_allclose(a[pred].to_numpy(), b[pred].to_numpy(), atol=2e-3)
    name = seq.backbones[0].name
    for cfg in (seq, par):
        for k in range(2):
            assert (Paths(cfg).fold_dir(name, k) / "best.safetensors").exists()
        assert Paths(cfg).test_csv(name).exists() and Paths(cfg).cv_json(name).exists()


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun not installed next to this Python")
def test_ddp_with_two_cpu_processes_writes_complete_files_close_to_single_process(make_config, tmp_path):
    words = [*FAST, "train.frozen.epochs=2", "train.unfrozen.epochs=1"]
    single = make_config(*words, f"runs_dir={tmp_path / 'single'}")
    run_folds(single)
    run_train(single)
    ddp = make_config(*words, f"runs_dir={tmp_path / 'ddp'}")
    config_path = tmp_path / "ddp.yaml"
    config_path.write_text(dump_config(ddp))
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "pipeline", "train",
                           "-c", str(config_path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    oof, table = _oof(ddp), read_folds(ddp)
    assert sorted(oof["image_id"]) == sorted(table["image_id"]) and oof["image_id"].is_unique
    test = pd.read_csv(Paths(ddp).test_csv(ddp.backbones[0].name))
    assert len(test) == len(pd.read_csv(Paths(ddp).sample_submission))
    a = json.loads(Paths(single).cv_json(single.backbones[0].name).read_text())["oof"]
    b = json.loads(Paths(ddp).cv_json(ddp.backbones[0].name).read_text())["oof"]
    assert abs(a - b) <= 0.15, (a, b)


def test_bench_quick_prints_every_ratio_with_its_goal(make_config, tmp_path, capsys):
    from pipeline.bench.report import run_bench

    cfg = make_config(*FAST)
    out = run_bench(cfg, quick=True, output=str(tmp_path / "BENCHMARKS.md"))
    printed = capsys.readouterr().out
    for row in ("train step", "inference with TTA", "cached / one bare fwd pass", "through the model / cached",
                "peak RSS"):
        assert row in printed and row in out.read_text()
    assert ">= 0.9" in printed and "<= 1.2" in printed and ">= 10" in printed


def test_quality_benches_write_their_sections_and_keep_the_others(make_config, tmp_path, capsys):
    from pipeline.bench import quality as bench_quality
    from pipeline.bench import report as bench

    cfg = make_config(*FAST)
    tune_md = bench_quality.bench_tune(cfg, trials=3, eval_folds=(1,))
    for label in ("pipeline defaults", "experiment config", "Optuna best"):
        assert f"| {label} |" in tune_md
    assert "Pruning stopped" in tune_md and "3 trials" in tune_md
    lpft_md = bench_quality.bench_lpft(cfg, folds=(0,))
    assert "linear probe" in lpft_md and lpft_md.count("| mean |") == 2

    out = tmp_path / "BENCHMARKS.md"
    bench._write_section(out, "tune", "## tune\n\nfirst")
    bench._write_section(out, "speed", "## speed\n\ntable")
    bench._write_section(out, "tune", "## tune\n\nsecond")
    text = out.read_text()
    assert "second" in text and "first" not in text and "table" in text
    assert text.index("## tune") < text.index("## speed")  # a section keeps its place
