"""The input path: the shared image cache file, reduced JPEG decoding, prediction with stacked TTA
views, the GPU settings (CUDA mocked), bundled weights mapped once, and the input/gpu benchmarks."""
from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.config.paths import Paths
from pipeline.config.schema import TrainConfig
from pipeline.data.cache import ImageCache
from pipeline.data.datasets import ImageDataset
from pipeline.data.images import PATH, decode_reduction, load_image
from pipeline.data.tables import read_folds, task_spec
from pipeline.domain.transforms import eval_transform
from pipeline.engine import fit
from pipeline.engine.fit import Runtime, default_workers, fused_kwargs, predict_logits
from pipeline.stages.folds import run_folds

FAST = ["train.num_workers=0", "augment.train=[]", "folds.n_splits=2"]


def _photo(path, side: int, seed: int = 0) -> str:
    """A smooth, photo-like RGB JPEG of ``side`` x ``side`` pixels."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(small).resize((side, side), Image.BICUBIC).save(path, quality=92)
    return str(path)


def _trainer(cfg, fold: int = 0, test: bool = False):
    from pipeline.data.tables import read_test_table
    from pipeline.training.trainer import FoldJob, FoldTrainer

    run_folds(cfg)
    table = read_folds(cfg)
    job = FoldJob(cfg, cfg.backbones[0], task_spec(cfg, table), table, fold,
                  test=read_test_table(cfg) if test else None, progress=False)
    return FoldTrainer(job)


# ---------------------------------------------------------------------------- the image cache file


def test_the_cache_file_is_built_once_and_shared_by_every_fold(make_config, monkeypatch, capsys):
    cfg = make_config(*FAST, "train.cache_images=true")
    builds = []
    original = ImageCache.build
    monkeypatch.setattr(ImageCache, "build", staticmethod(lambda *a, **k: builds.append(a[0]) or original(*a, **k)))
    first, second = _trainer(cfg, 0, test=True), _trainer(cfg, 1)
    files = sorted((Paths(cfg).exp_dir / "cache").glob("images-*.npy"))
    assert len(files) == 1 and first.data.cache.path == second.data.cache.path == files[0]
    assert isinstance(first.data.cache.array, np.memmap)
    assert "decoded once" in capsys.readouterr().out
    first.data.dataset(np.arange(3), train=False, test=True)  # the test images: a second file, at first use
    assert len(list((Paths(cfg).exp_dir / "cache").glob("images-*.npy"))) == 2
    assert builds[0] == files[0] and len(builds) == 2  # the second fold found the train file built
    table = read_folds(cfg)
    resize = eval_transform(first.dc["size"], first.dc["interpolation"], cfg.augment.resize)
    for i in (0, len(table) - 1):
        expected = resize(image=load_image(table[PATH][i]))["image"].permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(first.data.cache[i], expected)


def _build(args) -> bool:
    path, paths = args
    return ImageCache.build(path, paths, 48, "bicubic")


def test_processes_racing_to_build_the_cache_leave_one_complete_file(tmp_path):
    paths = [_photo(tmp_path / f"{i}.jpg", 96, i) for i in range(24)]
    path = ImageCache.file_for(tmp_path / "cache", paths, 48, "bicubic")
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        wrote = pool.map(_build, [(path, paths)] * 3)
    assert 1 <= sum(wrote) <= 3 and ImageCache.build(path, paths, 48, "bicubic") is False
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    np.testing.assert_array_equal(ImageCache.open(path).array, ImageCache(paths, 48, "bicubic").array)


def test_the_cache_key_follows_the_files_the_size_and_the_policy(tmp_path):
    paths = [_photo(tmp_path / f"{i}.jpg", 64, i) for i in range(3)]
    key = ImageCache.file_for(tmp_path, paths, 32, "bicubic")
    assert key == ImageCache.file_for(tmp_path, paths, 32, "bicubic")
    assert len({key, ImageCache.file_for(tmp_path, paths, 48, "bicubic"),
                ImageCache.file_for(tmp_path, paths, 32, "bilinear"),
                ImageCache.file_for(tmp_path, paths, 32, "bicubic", "pad"),
                ImageCache.file_for(tmp_path, paths[:2], 32, "bicubic")}) == 5
    _photo(tmp_path / "0.jpg", 80, 9)  # a changed file: a new key
    assert ImageCache.file_for(tmp_path, paths, 32, "bicubic") != key


def test_a_cache_that_would_fill_the_disk_is_skipped(make_config, monkeypatch, capsys):
    cfg = make_config(*FAST, "train.cache_images=true")
    monkeypatch.setattr(ImageCache, "fits_on_disk", staticmethod(lambda *a: False))
    trainer = _trainer(cfg)
    assert trainer.data.cache is None and "reading the image files instead" in capsys.readouterr().out
    assert trainer.data.dataset(np.arange(2), train=False)[0][0].shape[0] == 3


# ---------------------------------------------------------------------------- reduced JPEG decoding


def test_reduced_decoding_keeps_twice_the_target_along_the_fitted_side():
    assert decode_reduction(4000, 3000, 224) == 4  # 3000 / 4 = 750 >= 448; / 8 = 375 is not
    assert decode_reduction(4000, 3000, 224, "pad") == 8  # the longer side: 4000 / 8 = 500 >= 448
    assert decode_reduction(500, 500, 224) == 1 and decode_reduction(500, 500, 224, gap=1) == 2
    assert decode_reduction(100, 100, 224) == 1


def test_only_large_jpegs_are_decoded_at_reduced_scale(tmp_path):
    big = _photo(tmp_path / "big.jpg", 800)
    assert load_image(big).shape == (800, 800, 3)
    assert load_image(big, 100).shape == (200, 200, 3)  # 1/4: 200 >= 2 x 100
    assert load_image(big, 300).shape == (800, 800, 3)  # 800 / 2 < 600: full
    png = tmp_path / "big.png"
    Image.open(big).save(png)
    assert load_image(str(png), 100).shape == (800, 800, 3)  # DCT scaling is a JPEG feature
    full = eval_transform(100, "bicubic")(image=load_image(big))["image"].float()
    reduced = eval_transform(100, "bicubic")(image=load_image(big, 100))["image"].float()
    assert (full - reduced).abs().mean() < 2.0  # of 255: a fair resample either way


def test_cached_and_uncached_datasets_serve_the_same_reduced_pixels(tmp_path):
    paths = [_photo(tmp_path / f"{i}.jpg", 600, i) for i in range(4)]
    transform = eval_transform(64, "bicubic")
    cache = ImageCache(paths, 64, "bicubic")
    plain = ImageDataset(paths, transform=transform, decode=(64, "crop"))
    cached = ImageDataset(paths, transform=transform, cache=cache, decode=(64, "crop"))
    for i in range(len(paths)):
        assert torch.equal(plain[i][0], cached[i][0])


# ---------------------------------------------------------------------------- prediction


def test_stacked_tta_views_give_the_per_view_logits():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=3).eval()
    rt = Runtime(torch.device("cpu"), torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25))
    batches = [(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8), torch.zeros(n)) for n in (5, 3)]
    views = ("identity", "hflip", "vflip")
    stacked = predict_logits(model, batches, rt, views)
    chunked = predict_logits(model, batches, rt, views, max_images=4)
    with torch.no_grad():
        expected = [torch.cat([model(rt.images(fit.TTA_VIEWS[v](x))) for x, _ in batches]) for v in views]
    for got in (stacked, chunked):
        assert [g.shape for g in got] == [(8, 3)] * 3
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size, expected", [(160, 16), (192, 16), (224, 8), (260, 8), (48, 64), (8, 64)])
def test_a_cpu_predicts_in_passes_of_a_power_of_two_sized_to_the_image(size, expected):
    rt = Runtime(torch.device("cpu"), torch.zeros(1), torch.ones(1))
    x = torch.zeros(64, 3, size, size)
    assert [len(p) for p in rt.passes(x)] == [expected] * (64 // expected)
    assert [len(p) for p in rt.passes(x, max_images=4)] == [4] * 16  # the caller's limit still holds
    gpu = Runtime(torch.device("cuda"), torch.zeros(1), torch.ones(1))  # only its device type is read
    assert [len(p) for p in gpu.passes(x)] == [64] and [len(p) for p in gpu.passes(x, 48)] == [48, 16]


def test_channels_last_is_used_on_a_cpu_too():
    from pipeline.config.schema import TrainConfig

    rt = Runtime.create(TrainConfig(device="cpu"), [0.5] * 3, [0.25] * 3)
    assert rt.channels_last and rt.images(torch.zeros(2, 3, 8, 8, dtype=torch.uint8)).is_contiguous(
        memory_format=torch.channels_last)
    off = Runtime.create(TrainConfig(device="cpu", channels_last=False), [0.5] * 3, [0.25] * 3)
    assert not off.channels_last and off.images(torch.zeros(2, 3, 8, 8, dtype=torch.uint8)).is_contiguous()


def test_frozen_features_are_the_same_in_cpu_passes_and_channels_last():
    import timm

    from pipeline.engine.backbones import pooled_features
    from pipeline.engine.features import compute_features

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=3).eval()
    batches = [(torch.randint(0, 256, (n, 3, 200, 200), dtype=torch.uint8), torch.zeros(n)) for n in (20, 7)]
    rt = Runtime(torch.device("cpu"), torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25), channels_last=True)
    assert [len(p) for p in rt.passes(torch.zeros(20, 3, 200, 200))] == [8, 8, 4]
    with torch.no_grad():  # one contiguous pass per loader batch, as before
        expected = torch.cat([pooled_features(model, fit.TTA_VIEWS["hflip"]((x.float() / 255 - 0.5) / 0.25))
                              for x, _ in batches])
    torch.testing.assert_close(compute_features(model, batches, rt, "hflip"), expected, rtol=1e-4, atol=1e-4)


def test_a_fold_keeps_one_evaluation_loader_and_predicts_as_before(make_config):
    trainer = _trainer(make_config(*FAST))
    rows = trainer.data.valid_idx
    loader = trainer.data.eval_loader(rows, False)
    assert trainer.data.eval_loader(rows, False) is loader and loader.batch_size == 2 * trainer.data.batch_size
    trainer.final_model = trainer.model
    views = ("identity", "hflip")
    new = trainer.predict(trainer.model, rows, views=views)
    before = torch.utils.data.DataLoader(trainer.data.dataset(rows, train=False), batch_size=trainer.data.batch_size)
    old = predict_logits(trainer.model, before, trainer.rt, views, max_images=trainer.data.batch_size)
    for n, o in zip(new, old):
        torch.testing.assert_close(n, o, rtol=1e-4, atol=1e-5)
    oof, _ = trainer.predictions()
    assert len(oof) == len(rows) and trainer.data.open_eval_loaders == 0  # released after the last pass


# ---------------------------------------------------------------------------- GPU settings (CUDA mocked)


def test_cudnn_autotunes_on_cuda_unless_deterministic(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    fit.set_cudnn(TrainConfig(), torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    fit.set_cudnn(TrainConfig(), torch.device("cuda"))
    assert torch.backends.cudnn.benchmark is True
    monkeypatch.setattr(torch, "use_deterministic_algorithms", lambda *a, **k: None)
    fit.set_cudnn(TrainConfig(deterministic=True), torch.device("cuda"))
    assert torch.backends.cudnn.benchmark is False


def test_fused_adamw_only_where_every_parameter_is_on_cuda():
    on_gpu = SimpleNamespace(parameters=lambda: [SimpleNamespace(is_cuda=True)] * 2)
    mixed = SimpleNamespace(parameters=lambda: [SimpleNamespace(is_cuda=True), SimpleNamespace(is_cuda=False)])
    assert fused_kwargs("adamw", on_gpu) == {"fused": True} == fused_kwargs("AdamW", on_gpu)
    assert fused_kwargs("adam", on_gpu) == {"fused": True}
    assert fused_kwargs("sgd", on_gpu) == {} and fused_kwargs("lookahead_adamw", on_gpu) == {}
    assert fused_kwargs("adamw", mixed) == {} and fused_kwargs("adamw", torch.nn.Linear(2, 2)) == {}
    from timm.optim import create_optimizer_v2  # timm passes the keyword through to torch's class
    optimizer = create_optimizer_v2(torch.nn.Linear(2, 2), opt="adamw", lr=1e-3, fused=False)
    assert optimizer.defaults["fused"] is False


@pytest.mark.parametrize("cuda, cpus, env, expected", [
    (True, 16, {}, 15), (True, 16, {"PIPELINE_PROCESSES": "4"}, 3), (True, 16, {"LOCAL_WORLD_SIZE": "8"}, 1),
    (True, 64, {}, 63), (True, 2, {}, 1), (False, 2, {}, 0), (False, 16, {}, 4),
    (False, 16, {"PIPELINE_PROCESSES": "4"}, 2),
])
def test_loader_workers_are_this_process_share_of_the_cores(monkeypatch, cuda, cpus, env, expected):
    monkeypatch.setattr(fit.os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    for name in ("PIPELINE_PROCESSES", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert default_workers(SimpleNamespace(cuda=cuda), None) == expected
    assert default_workers(SimpleNamespace(cuda=cuda), 3) == 3  # train.num_workers wins


def test_loaders_pin_memory_on_cuda(make_config):
    trainer = _trainer(make_config(*FAST))
    dataset = trainer.data.dataset(trainer.data.valid_idx, train=False)
    assert trainer.data.loader(dataset).pin_memory is False
    trainer.data.rt = Runtime(torch.device("cuda"), trainer.rt.mean, trainer.rt.std)  # only its device type is read
    assert trainer.data.loader(dataset).pin_memory is True


# ---------------------------------------------------------------------------- bundled weights


def test_bundled_weights_are_mapped_once_per_process(monkeypatch):
    import timm

    from pipeline.config.schema import BackboneConfig
    from pipeline.engine import backbones

    built = []
    original = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, **kw: built.append(kw.get("num_classes")) or
                        original(name, **kw))
    backbones.bundled_state_dict.cache_clear()
    bcfg = BackboneConfig(name="efficientnet_lite0", weights="bundled", image_size=64)
    first, second = (backbones.create_backbone(bcfg, 3) for _ in range(2))
    assert built == [3, 1000, 3]  # the 1000-class reference (on the meta device) once, not per model
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(TypeError):
        backbones.bundled_state_dict("efficientnet_lite0")["x"] = torch.zeros(1)  # read-only


# ---------------------------------------------------------------------------- the benchmarks


def test_input_bench_rows_run_on_a_tiny_set(make_config, tmp_path, capsys):
    from pipeline.bench.inputs import input_rows

    cfg = make_config(*FAST, f"runs_dir={tmp_path / 'runs'}")
    rows = input_rows(cfg, quick=True, bench_dir=tmp_path / "bench")
    names = " | ".join(r[0] for r in rows)
    for part in ("pipeline epoch through the real loader", "prediction with TTA through the real loader",
                 "train loader alone", "image cache: build time", "reduced JPEG decode"):
        assert part in names
    assert all(np.isfinite(r[1]) and r[1] > 0 for r in rows if "reduced" not in r[0])
    assert sum("cache on" in r[0] for r in rows) == 6  # 2 image sets x (epoch, prediction, loader alone)


def test_the_gpu_section_says_there_is_no_gpu_and_writes_nothing(make_config, tmp_path, capsys, monkeypatch):
    from pipeline.bench.report import run_bench

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = run_bench(make_config(*FAST), output=str(tmp_path / "BENCHMARKS.md"), sections=("gpu",))
    assert "no GPU found" in capsys.readouterr().out
    assert not out.exists()


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun not installed next to this Python")
def test_ddp_ranks_share_one_cache_file(make_config, tmp_path):
    """Under torchrun rank 0 builds each cache file while the other ranks wait at the lock and a
    barrier, then every rank maps it: the run completes with one file per image set."""
    from pipeline.config.schema import dump_config

    cfg = make_config(*FAST, "train.cache_images=true", "train.unfrozen.epochs=1", f"runs_dir={tmp_path / 'runs'}")
    run_folds(cfg)
    config_path = tmp_path / "ddp.yaml"
    config_path.write_text(dump_config(cfg))
    torchrun = str(Path(sys.executable).parent / "torchrun")
    proc = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "pipeline", "train", "-c",
                           str(config_path), "--fold", "0"], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(list((Paths(cfg).exp_dir / "cache").glob("images-*.npy"))) == 2  # train and test
    assert proc.stdout.count("decoded once") == 2  # by rank 0 only
    oof = pd.read_csv(Paths(cfg).fold_dir(cfg.backbones[0].slug, 0) / "oof.csv")
    assert len(oof) == (read_folds(cfg)["fold"] == 0).sum()
