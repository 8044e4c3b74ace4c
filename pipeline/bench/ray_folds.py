"""Folds as Ray tasks (``train.executor: ray``) against one local process, measured in one run.

A local 2-node Ray cluster (Ray's own cluster utilities: a head and a worker node, one CPU each, on
the loopback address) trains the experiment's folds with the tiny ``test_efficientnet`` (32 px, 1+1
epochs, one thread per fold); the same folds trained one after another in this process (one thread)
are the reference. Reported: the train stage's wall time both ways and their ratio (fold-task
throughput; 2.0 is the most two one-CPU nodes can give), and per task: the start-up (submitted on
the driver -> the fold starts on its worker; cold: a fresh worker process imports torch and the
pipeline; warm: Ray reuses it), the file return (the fold's files read on the worker -> written into
``runs/`` here) and the fold's own time inside the task against in this process.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.bench.measure import CannotRun
from pipeline.config.schema import BackboneConfig, Config
from pipeline.core.errors import PipelineError
from pipeline.data.tables import read_folds, read_test_table, task_spec
from pipeline.stages.folds import run_folds
from pipeline.stages.train import run_train
from pipeline.training.executors import FinishedFold, RayFolds, ray_module
from pipeline.training.pseudo_labels import with_pseudo_labels

TINY = BackboneConfig(name="test_efficientnet", id="tiny", weights="none", image_size=32)
OBJECT_STORE = 100 * 1024 ** 2  # bytes per node


def _tiny(cfg: Config, root: Path, folds: int) -> Config:
    train = dataclasses.replace(cfg.train, frozen=dataclasses.replace(cfg.train.frozen, epochs=1),
                                unfrozen=dataclasses.replace(cfg.train.unfrozen, epochs=1), num_workers=0,
                                use_tuned="false", time_budget_min=None, unfreeze="always")
    return cfg.replace(name="bench_ray", runs_dir=str(root / "local"), folds_dir=str(root / "folds"), backbones=[TINY],
                       train=train, folds=dataclasses.replace(cfg.folds, n_splits=folds),
                       augment=dataclasses.replace(cfg.augment, tta=["identity"]))


def _on_ray(cfg: Config, root: Path, address: str) -> Config:
    return cfg.replace(runs_dir=str(root), train=dataclasses.replace(cfg.train, executor="ray", ray_address=address))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _tasks(cfg: Config, folds: int) -> tuple[float, list[FinishedFold]]:
    """Every fold as a task straight through :class:`RayFolds`: the wall time and each fold's record."""
    table = read_folds(cfg)
    spec = task_spec(cfg, table)
    start = time.perf_counter()
    remote = RayFolds(cfg.train.ray_address, spec, with_pseudo_labels(cfg, spec, table), read_test_table(cfg))
    try:
        remote.submit(cfg, cfg.backbones[0], list(range(folds)), force=True)
        done = list(remote.finished())
    finally:
        remote.close()
    return time.perf_counter() - start, done


def _first_wave(done: list[FinishedFold], nodes: int) -> list[FinishedFold]:
    """The tasks that found a free node (the first submitted, one per node): their start-up is not queueing."""
    return sorted(done, key=lambda d: d.submitted)[:nodes]


def _median(values) -> float:
    return statistics.median(values)


def bench_ray(cfg: Config, folds: int = 4) -> str:
    """The Ray executor against one local process on a local 2-node cluster (Markdown);
    :class:`~pipeline.bench.measure.CannotRun` where ray is not installed."""
    if "ray" not in sys.modules:  # the nodes on 127.0.0.1: nothing leaves the machine (read when ray is imported)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        ray = ray_module()
    except PipelineError:
        raise CannotRun("ray is not installed (pip install -e '.[scale]')") from None
    from ray.cluster_utils import Cluster

    root = Path(cfg.runs_dir) / "bench" / "ray"
    shutil.rmtree(root, ignore_errors=True)
    tiny = _tiny(cfg, root, folds)
    run_folds(tiny)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a worker with one CPU
    try:
        local_s = _timed(lambda: run_train(tiny))
    finally:
        torch.set_num_threads(threads)

    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: the nodes' sockets live here
    os.makedirs("/tmp/ray", exist_ok=True)  # Ray writes the current cluster's address there, whatever temp_dir says
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                          "object_store_memory": OBJECT_STORE, "temp_dir": temp})
    try:
        cluster_s = _timed(lambda: nodes.add_node(num_cpus=1, object_store_memory=OBJECT_STORE, temp_dir=temp))
        ray.init(address=nodes.address, log_to_driver=False)
        cold_s, cold = _tasks(_on_ray(tiny, root / "cold", nodes.address), folds)  # fresh worker processes
        ray_s = _timed(lambda: run_train(_on_ray(tiny, root / "ray", nodes.address)))
        warm_s, warm = _tasks(_on_ray(tiny, root / "warm", nodes.address), folds)
    finally:
        ray.shutdown()
        nodes.shutdown()
        shutil.rmtree(temp, ignore_errors=True)

    first_cold, first_warm = _first_wave(cold, 2), _first_wave(warm, 2)
    startup_cold = _median(d.out.started - d.submitted for d in first_cold)
    startup_warm = _median(d.out.started - d.submitted for d in first_warm)
    back = _median(d.written - d.out.finished for d in warm)
    kib = _median(sum(len(b) for b in d.out.files.values()) for d in warm) / 1024
    in_task = _median(d.out.seconds for d in warm)
    ratio = local_s / ray_s
    rows = [
        ("train stage, one local process (1 thread)", f"{local_s:.1f} s", f"{folds / local_s:.2f} folds/s"),
        ("train stage, `train.executor=ray` on 2 nodes x 1 CPU (warm workers)", f"{ray_s:.1f} s",
         f"{folds / ray_s:.2f} folds/s"),
        ("**fold-task throughput, Ray / local**", f"**{ratio:.2f}**", "2.0 at best: two one-CPU nodes"),
        ("all folds as tasks, cold / warm workers (submit -> last fold written)", f"{cold_s:.1f} s / {warm_s:.1f} s",
         "cold: the first tasks of a fresh cluster start their worker processes"),
        ("per task start-up, cold worker (submitted -> fold starts)", f"{startup_cold:.2f} s",
         "a new Python process importing torch, timm and the pipeline"),
        ("per task start-up, warm worker", f"{startup_warm:.2f} s", "Ray reuses the worker process"),
        ("per task file return (files read on the worker -> written in runs/)", f"{back:.3f} s",
         f"{kib:.0f} KiB per fold through the object store"),
        ("a fold inside its task / in the local process", f"{in_task:.1f} s / {local_s / folds:.1f} s",
         "the fold's own training and prediction (local: stage time / folds)"),
        ("adding the worker node to the cluster", f"{cluster_s:.1f} s", "Ray's start-up, once per cluster"),
    ]
    images = len(read_folds(tiny))
    head = (f"{folds} folds of {TINY.name} ({TINY.image_size} px, 1+1 epochs, {images} train images of "
            f"{tiny.data.root}), medians over the tasks\n\n| measure | value | note |\n|---|---|---|\n")
    return head + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
