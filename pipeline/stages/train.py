"""Train stage: every backbone on every fold, frozen head first, then the whole network.

Per fold (``runs/<exp>/<backbone>/fold<k>/``): ``history.csv``, ``best.safetensors``,
``oof.csv`` (the fold's validation rows), ``test.csv`` (TTA predictions), and while running a
``resume.safetensors`` written after every epoch. Per backbone: ``oof.csv`` (every train row
once), fold-averaged ``test.csv`` and ``cv.json``.

A fold's randomness is a function of (seed, fold, epoch) only - every epoch re-seeds - so a
run killed after epoch e and resumed ends exactly where an uninterrupted run would.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from pipeline import tracking
from pipeline.config.paths import Paths
from pipeline.config.schema import BackboneConfig, Config, dump_config
from pipeline.core import artifacts, distributed, locks
from pipeline.core.errors import PipelineError
from pipeline.data.images import check_images_readable, record_verified, verified_dir
from pipeline.data.tables import read_folds, read_test_table, task_spec
from pipeline.domain.metrics import get_metric
from pipeline.engine.backbones import check_model_name, check_weights
from pipeline.engine.features import FeatureStore
from pipeline.engine.fit import PROCESSES_ENV
from pipeline.training import all_rows
from pipeline.training.aggregate import aggregate_backbone, aggregate_seed_mean, fmt_score, honesty_note
from pipeline.training.budget import planned_config
from pipeline.training.executors import RayFolds
from pipeline.training.fingerprint import discard_damaged, fold_digest, fold_is_done
from pipeline.training.pseudo_labels import with_pseudo_labels
from pipeline.training.trainer import FoldJob, FoldResult, train_fold
from pipeline.training.tuned import apply_tuned
from pipeline.training.unfreeze import resolve_unfreeze


def _summary(bcfg: BackboneConfig, fold: int, result: FoldResult, metric: str, seconds: float) -> str:
    epochs = len(result.history)
    return (f"{bcfg.slug} fold {fold}: kept {result.kept}, validation {metric} {result.best_score:.4f} "
            f"({epochs} epochs, {seconds:.0f} s)")


def run_train(cfg: Config, backbone: str | None = None, fold: int | None = None, jobs: int = 1,
              force: bool = False) -> Path:
    paths = Paths(cfg)
    distributed.init()
    main = distributed.is_main()
    table = read_folds(cfg)
    spec = task_spec(cfg, table)
    test = read_test_table(cfg)
    fit_table = with_pseudo_labels(cfg, spec, table)  # + train.pseudo_labels' rows, which only ever train
    get_metric(cfg.metric, spec.task)
    if fold is not None and not 0 <= fold < cfg.folds.n_splits:
        raise PipelineError(f"--fold {fold} is out of range; folds are 0..{cfg.folds.n_splits - 1}")
    backbones = [cfg.backbone(backbone)] if backbone else list(cfg.backbones)
    gpus = torch.cuda.device_count()  # train.time_budget_min: one fold process per GPU
    if cfg.train.time_budget_min is not None and distributed.enabled():
        raise PipelineError("train.time_budget_min plans single-process runs; under torchrun set "
                            "train.unfrozen.epochs yourself (train.time_budget_min=null)")
    for bcfg in backbones:  # fail before any training on a typo in a later backbone
        check_model_name(bcfg.name)
        check_weights(bcfg, f"backbones[{cfg.backbones.index(bcfg)}].weights", paths.exp_dir)
    check_images_readable(table, cfg.data.id_column, paths.train_dir, verified_dir(cfg))  # before any write
    artifacts.check_writable(paths.exp_dir)
    if main:  # one rank clears: on a shared file system another node's rank 0 may be writing a temp now
        artifacts.remove_stale_temps(paths.exp_dir, recursive=True)
    if main:  # everything is valid: the next train run (or fold process) skips decoding these images
        record_verified(table, verified_dir(cfg))
        record_verified(test, verified_dir(cfg))
    with locks.rewriting(paths.exp_dir, f"training of {cfg.name}"):  # ensemble, predict, bundle wait
        store = FeatureStore()  # frozen features and BatchNorm statistics, shared by this run's folds
        remote: RayFolds | None = None  # train.executor ray: the run's folds as tasks on a Ray cluster
        on_ray: list[tuple] = []  # (config, entry, LR source, unfreeze decision) of the models sent there
        for entry in backbones:
            bcfg_cfg, bcfg = cfg.variant(entry)
            bcfg_cfg, source = apply_tuned(bcfg_cfg, bcfg)
            bcfg_cfg, plan = planned_config(bcfg_cfg, bcfg, spec, spec.encode(table), len(test), max(jobs, gpus))
            bcfg_cfg, decision = resolve_unfreeze(bcfg_cfg, bcfg, spec, fit_table, store)  # train.unfreeze
            bdir = paths.backbone_dir(bcfg.slug)
            if main:
                _write_resolved(bcfg_cfg, bcfg, source, bdir)
                tracking.begin_model(bcfg_cfg, bcfg)  # tracking.backend: the run, before any fold trains
            print(f"{bcfg.slug}: LRs from {source['lr_source']} (frozen {bcfg_cfg.train.frozen.lr:.2e}, unfrozen "
                  f"{bcfg_cfg.train.unfrozen.lr:.2e} x{bcfg_cfg.train.unfrozen.backbone_lr_mult:.3g} for the backbone)")
            folds = [fold] if fold is not None else list(range(cfg.folds.n_splits))
            for k in folds if main else []:  # a checkpoint cut short (full disk, killed copy) is not a done fold
                for line in discard_damaged(bcfg_cfg, bcfg, k):
                    print(line)
            todo = [k for k in folds if force or not fold_is_done(bcfg_cfg, bcfg, k)]
            if bcfg_cfg.train.executor == "ray":  # its folds train on the cluster while the next model resolves
                if todo:
                    remote = remote or _connect(bcfg_cfg, spec, fit_table, test)
                    _check_address(remote, bcfg_cfg)
                    remote.submit(bcfg_cfg, bcfg, todo, force)
                on_ray.append((bcfg_cfg, bcfg, source, decision))
                continue
            n_jobs = plan.jobs if plan is not None else jobs
            if n_jobs > 1 and len(todo) > 1:
                _train_parallel(bcfg, todo, n_jobs, bdir / "config.yaml", force)
            else:
                for k in todo:  # a fold that another run is training is skipped (core.locks)
                    what = f"fold {k} of {bcfg.slug}"
                    with locks.hold(paths.fold_dir(bcfg.slug, k), what, "is being trained") as held:
                        if held and (force or not fold_is_done(bcfg_cfg, bcfg, k)):  # done by it meanwhile: skip
                            _train_one(bcfg_cfg, bcfg, spec, fit_table, test, k, store)
                    distributed.barrier()
            if main:
                _aggregate(bcfg_cfg, bcfg, source, decision, spec, table, test, store if fold is None else None)
        if remote is not None:
            try:
                _train_on_ray(remote)
            finally:
                remote.close()
        for bcfg_cfg, bcfg, source, decision in on_ray if main else []:  # empty without train.executor ray
            _aggregate(bcfg_cfg, bcfg, source, decision, spec, table, test, store)
        for group, members in cfg.seed_groups().items():  # not in a --fold child: its config holds one variant
            if (main and fold is None and any(m in backbones for m in members)
                    and all(paths.cv_json(m.slug).exists() for m in members)):
                cv = aggregate_seed_mean(cfg, group, members, spec, table)
                print(f"{group}: mean of seeds {', '.join(m.slug for m in members)}: CV {cv['metric']} "
                      f"{fmt_score(cv['cv_mean'])} +- {fmt_score(cv['cv_std'])}, OOF {fmt_score(cv['oof'])} "
                      f"-> {paths.cv_json(group)}")
    return paths.exp_dir


def _aggregate(cfg: Config, bcfg: BackboneConfig, source: dict, decision, spec, table, test,
               store: FeatureStore | None) -> None:
    """The model's OOF, test predictions and cv.json, once all its folds are done; first, for a
    frozen-only model, the all-rows probe (``store``: None in a ``--fold`` process, which leaves it
    to the run that aggregates)."""
    paths = Paths(cfg)
    if all(fold_is_done(cfg, bcfg, k) for k in range(cfg.folds.n_splits)):
        if store is not None and test is not None and all_rows.applies(cfg) and not all_rows.is_done(cfg, bcfg):
            print(all_rows.fit(cfg, bcfg, spec, table, test, store))
        tuned_folds = list(cfg.tune.folds) if "tuned" in source else []
        cv = aggregate_backbone(cfg, bcfg, spec, table, test, tuned_folds, decision)
        tracking.end_model(cfg, bcfg, cv)
        print(f"{bcfg.slug}: CV {cv['metric']} {fmt_score(cv['cv_mean'])} +- {fmt_score(cv['cv_std'])}, "
              f"OOF {fmt_score(cv['oof'])} -> {paths.cv_json(bcfg.slug)}\n  {honesty_note(cv)}")


def _write_resolved(cfg: Config, bcfg: BackboneConfig, source: dict, bdir: Path) -> None:
    """The resolved config the backbone trains with, and where each learning rate came from."""
    t = cfg.train
    origin = ("the config" if source["lr_source"] == "config"
              else f"{source['lr_source']} (tuned; train.use_tuned: {t.use_tuned})")
    header = (f"# learning rates from {origin}: train.frozen.lr {t.frozen.lr:.3g}, train.unfrozen.lr "
              f"{t.unfrozen.lr:.3g}, train.unfrozen.backbone_lr_mult {t.unfrozen.backbone_lr_mult:.3g}, "
              f"train.weight_decay {t.weight_decay:.3g}\n")
    artifacts.write_text(bdir / "config.yaml", header + dump_config(cfg.replace(backbones=[bcfg])))
    artifacts.write_json(bdir / "lr_source.json", {**source, "frozen_lr": t.frozen.lr, "unfrozen_lr": t.unfrozen.lr,
                                                  "backbone_lr_mult": t.unfrozen.backbone_lr_mult,
                                                  "weight_decay": t.weight_decay})


def _train_one(cfg: Config, bcfg: BackboneConfig, spec, table, test, k: int, store: FeatureStore) -> FoldResult:
    paths = Paths(cfg)
    fold_dir = paths.fold_dir(bcfg.slug, k)
    if distributed.is_main():
        artifacts.write_text(fold_dir / "config.yaml", dump_config(cfg.replace(backbones=[bcfg])))
    start = time.perf_counter()
    job = FoldJob(cfg, bcfg, spec, table, k, test, fold_dir, fold_digest(cfg, bcfg, k),
                  feature_cache_dir=paths.feature_cache_dir(bcfg.slug), store=store)
    result = train_fold(job)
    tracking.log_fold(cfg, bcfg, k, result.history)
    for note in result.notes:
        print(note)
    print(_summary(bcfg, k, result, cfg.metric, time.perf_counter() - start))
    return result


def _train_parallel(bcfg: BackboneConfig, folds: list[int], jobs: int, config_path: Path, force: bool) -> None:
    """Folds in ``jobs`` processes: one GPU each when there are GPUs, else a share of the CPU cores."""
    gpus = torch.cuda.device_count()
    cpus = os.cpu_count() or 1

    def launch(i_fold: tuple[int, int]) -> tuple[int, int, str]:
        slot, k = i_fold
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
        else:
            env["OMP_NUM_THREADS"] = str(max(1, cpus // jobs))
        cmd = [sys.executable, "-m", "pipeline", "train", "-c", str(config_path), "--backbone", bcfg.slug,
               "--fold", str(k), "train.use_tuned=false"] + (["--force"] if force else [])
        env[PROCESSES_ENV] = str(jobs)  # each fold process sizes its loader workers to its CPU share
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        return k, proc.returncode, (proc.stdout + proc.stderr)[-2000:]

    print(f"{bcfg.slug}: training folds {folds} in {jobs} parallel processes")
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(launch, [(i % jobs, k) for i, k in enumerate(folds)]))
    failed = [(k, out) for k, rc, out in results if rc != 0]
    for k, rc, out in results:
        last = [line for line in out.splitlines() if line.strip()]
        print(f"[fold {k}] {last[-1] if last else ''}")
    if failed:
        k, out = failed[0]
        raise PipelineError(f"{len(failed)} of {len(folds)} parallel folds failed; fold {k} said:\n{out}")


def _connect(cfg: Config, spec, table, test) -> RayFolds:
    if distributed.enabled():
        raise PipelineError("train.executor ray runs each fold as one Ray task; under torchrun set "
                            "train.executor=local")
    remote = RayFolds(cfg.train.ray_address, spec, table, test)
    print(f"train.executor ray: {remote.describe()}")
    return remote


def _check_address(remote: RayFolds, cfg: Config) -> None:
    if cfg.train.ray_address != remote.address:
        raise PipelineError(f"train.ray_address: one run uses one Ray cluster; a model entry names "
                            f"{cfg.train.ray_address}, the run joined {remote.address}")


def _train_on_ray(remote: RayFolds) -> None:
    """Wait for the run's fold tasks: one line per fold as its files arrive (with its node), a bar over folds."""
    from tqdm import tqdm

    if not remote.pending:  # every fold was done (or is being trained by another run)
        return
    with tqdm(total=len(remote.pending), desc="folds on Ray", unit="fold", dynamic_ncols=True) as bar:
        for done in remote.finished():
            result = done.out.result
            tracking.log_fold(done.cfg, done.bcfg, done.fold, result.history)
            for note in result.notes:
                bar.write(note)
            resumed = f", resumed after epoch {done.out.resumed_epochs - 1}" if done.out.resumed_epochs else ""
            bar.write(f"{_summary(done.bcfg, done.fold, result, done.cfg.metric, done.out.seconds)} on node "
                      f"{done.node}{resumed}")
            bar.update()
