"""Measurements the benchmark sections share: a training step, inference, the frozen phase, peak memory;
and what a section needs to run at all (:class:`CannotRun`)."""
from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config.paths import Paths
from pipeline.config.schema import BackboneConfig, Config, PhaseConfig
from pipeline.core.errors import PipelineError
from pipeline.domain.tasks import TaskSpec
from pipeline.engine.backbones import create_backbone
from pipeline.engine.fit import (
    Runtime,
    Stepper,
    build_optimizer,
    build_scheduler,
    make_loss,
    predict_logits,
    run_batches,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class CannotRun(PipelineError):
    """A section that cannot run where it is asked (no GPU, no hidden test labels, no Ray): the
    message says why in one line; ``run_bench`` prints it and writes no block for the section."""


def solution_path(cfg: Config) -> Path:
    """The hidden test labels the quality sections score against: ``solution.csv`` beside the
    sample submission (the demo data and the development sets have one; a competition does not)."""
    return Paths(cfg).sample_submission.parent / "solution.csv"


def require_hidden_labels(cfg: Config) -> Path:
    """``solution_path(cfg)``, or :class:`CannotRun` where it does not exist."""
    path = solution_path(cfg)
    if not path.is_file():
        raise CannotRun(f"it scores on the hidden test labels, and {path} does not exist; run it on a set that has "
                        f"them (the demo data, or CONFIG=configs/scenes.yaml)")
    return path


def _timed(fn, repeats: int) -> float:
    """Best of ``repeats`` timings of ``fn()`` (seconds): the least disturbed run."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def _batches(n_batches: int, batch: int, size: int, classes: int):
    g = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g),
             torch.randint(0, classes, (batch,), generator=g)) for _ in range(n_batches)]


def bench_train_step(cfg: Config, name: str, size: int, batch: int, steps: int, repeats: int) -> dict:
    spec = TaskSpec("multiclass", ("label",), tuple(str(i) for i in range(10)))
    model = create_backbone(BackboneConfig(name=name, weights="none"), 10)
    rt = Runtime.create(cfg.train, MEAN, STD)
    rt.prepare_model(model).train()
    data = _batches(steps, batch, size, 10)
    phase = PhaseConfig(epochs=1, lr=1e-3, backbone_lr_mult=0.5)
    optimizer = build_optimizer(model, cfg.train, phase, frozen=False)
    stepper = Stepper(optimizer, build_scheduler(optimizer, phase, steps), rt, cfg.train, model.parameters())
    loss_fn = make_loss(spec, cfg.train)

    def pipeline_step(b):
        x, y = rt.images(b[0]), b[1].to(rt.device, non_blocking=True)
        with rt.autocast():
            return loss_fn(model(x), y), len(x)

    bare_opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    bare_x = [((x.float() / 255 - rt.mean.cpu()) / rt.std.cpu()).to(rt.device) for x, _ in data]
    bare_y = [y.to(rt.device) for _, y in data]

    def bare():
        for x, y in zip(bare_x, bare_y):
            with rt.autocast():
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            bare_opt.step()
            bare_opt.zero_grad(set_to_none=True)

    def pipe():
        run_batches(data, pipeline_step, stepper, len(data), "bench", progress=False)

    bare(), pipe()  # warm-up (allocations, cudnn autotune)
    t_bare, t_pipe = [], []
    for _ in range(repeats):  # interleaved so that drift hits both alike
        t_bare.append(_timed(bare, 1))
        t_pipe.append(_timed(pipe, 1))
    n = steps * batch
    return {"pipeline_img_s": n / min(t_pipe), "bare_img_s": n / min(t_bare)}


def bench_inference(cfg: Config, name: str, size: int, batch: int, steps: int, repeats: int, views) -> dict:
    model = create_backbone(BackboneConfig(name=name, weights="none"), 10).eval()
    rt = Runtime.create(cfg.train, MEAN, STD)
    rt.prepare_model(model)
    data = _batches(steps, batch, size, 10)
    bare_x = [((x.float() / 255 - rt.mean.cpu()) / rt.std.cpu()).to(rt.device) for x, _ in data]

    @torch.no_grad()
    def bare():
        for x in bare_x:
            with rt.autocast():
                model(x)

    pipe = lambda: predict_logits(model, data, rt, views)  # noqa: E731
    bare(), pipe()
    t_bare = [_timed(bare, 1) for _ in range(repeats)]
    t_pipe = [_timed(pipe, 1) for _ in range(repeats)]
    n = steps * batch
    return {"pipeline_img_s": n / min(t_pipe), "bare_img_s": n / min(t_bare), "views": len(views)}


def bench_frozen_phase(cfg: Config, epochs: int, image_size: int | None = None, through_model: bool = True) -> dict:
    """All folds' frozen phase with the feature cache vs one bare forward pass, and vs the model.

    The cache's cost is one forward pass plus the head's steps, which do not depend on the
    resolution; so the ratio to one forward pass is lowest at realistic resolutions and highest
    on tiny images (the demo's 48 px), where the forward pass itself takes about a second."""
    from pipeline.data.tables import read_folds, task_spec
    from pipeline.engine.features import FeatureStore
    from pipeline.stages.folds import run_folds
    from pipeline.training.trainer import FoldJob, FoldTrainer

    run_folds(cfg)
    table = read_folds(cfg)
    spec = task_spec(cfg, table)
    bcfg = cfg.backbones[0] if image_size is None else dataclasses.replace(cfg.backbones[0], image_size=image_size)
    base = dataclasses.replace(cfg.train, unfrozen=dataclasses.replace(cfg.train.unfrozen, epochs=0),
                               frozen=dataclasses.replace(cfg.train.frozen, epochs=epochs))

    def phase(cache: bool) -> float:
        """Seconds of every fold's frozen phase; the trainers (model creation, weight loading: the
        same with or without the cache, and outside the bare pass too) are built before the clock."""
        c = cfg.replace(train=dataclasses.replace(base, cache_features=cache))
        store = FeatureStore()  # a fresh run: the folds share it, as run_train's do
        trainers = [FoldTrainer(FoldJob(c, bcfg, spec, table, k, progress=False, store=store))
                    for k in range(cfg.folds.n_splits)]
        start = time.perf_counter()
        for trainer in trainers:
            trainer.frozen_phase(c.train.frozen, 0)
        return time.perf_counter() - start

    trainer = FoldTrainer(FoldJob(cfg, bcfg, spec, table, 0, progress=False))
    loader = trainer.data.loader(trainer.data.dataset(np.arange(len(table)), train=False))
    bare = _timed(lambda: predict_logits(trainer.model, loader, trainer.rt), 2)
    cached = min(phase(True), phase(True))  # best of two, like the bare pass (each recomputes the features)
    full = phase(False) if through_model else float("nan")
    return {"cached_s": cached, "bare_forward_s": bare, "through_model_s": full, "folds": cfg.folds.n_splits,
            "epochs": epochs, "images": len(table), "size": trainer.dc["size"]}


def bench_frozen_only(cfg: Config, image_size: int | None = None) -> dict:
    """The whole train stage with nothing unfrozen (every fold's probe, OOF and test predictions
    with TTA) vs one bare forward pass over the train and test images per view: the frozen-only
    path sends each image and view through the backbone once per backbone, not once per fold."""
    from pipeline.data.tables import read_folds, read_test_table, task_spec
    from pipeline.engine.features import FeatureStore
    from pipeline.stages.folds import run_folds
    from pipeline.training.trainer import FoldJob, FoldTrainer

    run_folds(cfg)
    table, test = read_folds(cfg), read_test_table(cfg)
    spec = task_spec(cfg, table)
    bcfg = cfg.backbones[0] if image_size is None else dataclasses.replace(cfg.backbones[0], image_size=image_size)
    c = cfg.replace(train=dataclasses.replace(cfg.train, linear_probe=True, unfrozen=dataclasses.replace(
        cfg.train.unfrozen, epochs=0)), augment=dataclasses.replace(cfg.augment, tta=["identity", "hflip"]))
    store = FeatureStore()
    trainers = [FoldTrainer(FoldJob(c, bcfg, spec, table, k, test=test, progress=False, store=store))
                for k in range(c.folds.n_splits)]
    start = time.perf_counter()
    for trainer in trainers:
        trainer.run()
    stage = time.perf_counter() - start
    trainer = trainers[0]
    loaders = [trainer.data.loader(trainer.data.dataset(np.arange(len(table)), train=False)),
               trainer.data.loader(trainer.data.dataset(np.arange(len(test)), train=False, test=True))]
    bare = _timed(lambda: [predict_logits(trainer.model, loader, trainer.rt, c.augment.tta) for loader in loaders], 2)
    return {"stage_s": stage, "bare_forward_s": bare, "folds": c.folds.n_splits, "images": len(table) + len(test),
            "views": len(c.augment.tta), "size": trainer.dc["size"]}


_PEAK_RSS = """
import sys
from pipeline.core.memory import peak_mib  # this process's own high-water mark (VmHWM on Linux)
import torch, timm, albumentations, sklearn, pandas, optuna
print("PEAK_IMPORTS", peak_mib())
from pipeline.cli import main
main(sys.argv[1:])
print("PEAK_TOTAL", peak_mib())
"""


def peak_memory_of_training(config_path: Path) -> tuple[float, float]:
    """Peak RSS (MiB) of a child process training one fold, and of its imports alone."""
    out = subprocess.run([sys.executable, "-c", _PEAK_RSS, "train", "-c", str(config_path), "--fold", "0", "--force"],
                         capture_output=True, text=True, check=True).stdout
    found = dict(line.split() for line in out.splitlines() if line.startswith("PEAK_"))
    return float(found["PEAK_TOTAL"]), float(found["PEAK_IMPORTS"])


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, torch {torch.__version__}"
