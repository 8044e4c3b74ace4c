"""Quality benchmarks on the demo data: what tuning and LP-FT change in the score, and at what cost.

Both train real folds with the experiment's first backbone, so they take minutes, not seconds
(``make bench`` runs them after the speed table; ``ARGS="--sections speed"`` skips them).

* **tune**: the pipeline's built-in default LRs (``TrainConfig()``), the experiment's own LRs and
  the LRs an Optuna study picked (``tune.trials`` trials on fold 0 with a short budget, median
  pruning), each trained with the experiment's full epochs on folds the study never saw; plus the
  trials pruned and the time pruning saved (from the study's own durations).
* **lpft**: per fold, the score after the frozen phase and after fine-tuning, with the frozen
  phase's few head epochs and with a linear probe fitted to convergence (``train.linear_probe``).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from pipeline import artifacts
from pipeline.config import Config, TrainConfig
from pipeline.data import read_folds, task_spec
from pipeline.folds import run_folds
from pipeline.metrics import get_metric
from pipeline.paths import Paths
from pipeline.train import FoldJob, train_fold


def _bench_config(cfg: Config, name: str, train: TrainConfig) -> Config:
    bench_dir = Path(cfg.runs_dir) / "bench"
    return cfg.replace(name=name, runs_dir=str(bench_dir), folds_dir=str(bench_dir / "folds"),
                       backbones=[cfg.backbones[0]], train=dataclasses.replace(train, use_tuned="false"))


def _train(cfg: Config, fold: int) -> tuple[float, float, float]:
    """(score after the frozen phase, best score, seconds) of one fold trained in memory."""
    table = read_folds(cfg)
    bcfg = cfg.backbones[0]
    start = time.perf_counter()
    result = train_fold(FoldJob(cfg, bcfg, task_spec(cfg, table), table, fold, progress=False,
                                feature_cache_dir=Paths(cfg).feature_cache_dir(bcfg.name)))
    key = next(k for k in result.history[0] if k.startswith("valid_") and k != "valid_loss")
    frozen = [row[key] for row in result.history if row["phase"] == "frozen"]
    return (frozen[-1] if frozen else float("nan")), result.best_score, time.perf_counter() - start


def _with_lrs(train: TrainConfig, frozen_lr: float, unfrozen_lr: float, mult: float) -> TrainConfig:
    return dataclasses.replace(train, frozen=dataclasses.replace(train.frozen, lr=frozen_lr),
                               unfrozen=dataclasses.replace(train.unfrozen, lr=unfrozen_lr, backbone_lr_mult=mult))


def bench_tune(cfg: Config, trials: int = 12, eval_folds: tuple[int, ...] = (1, 2)) -> str:
    """Default vs config vs tuned LRs on held-out folds; pruning's count and saving. Markdown."""
    from pipeline.tune import run_tune

    d = TrainConfig()
    default = _with_lrs(cfg.train, d.frozen.lr, d.unfrozen.lr, d.unfrozen.backbone_lr_mult)
    base = _bench_config(cfg, "bench_tune", default)
    base = base.replace(tune=dataclasses.replace(cfg.tune, trials=trials, folds=[0], frozen_epochs=1, unfrozen_epochs=2,
                                                 pruner="median", storage=None))
    run_folds(base)
    start = time.perf_counter()
    run_tune(base, force=True)
    tune_s = time.perf_counter() - start
    best = artifacts.read_json(Paths(base).tuned_params(base.backbones[0].name))
    p = best["params"]
    own = cfg.train
    variants = {
        "pipeline defaults": default,
        "experiment config": _with_lrs(own, own.frozen.lr, own.unfrozen.lr, own.unfrozen.backbone_lr_mult),
        "Optuna best": _with_lrs(cfg.train, p.get("frozen_lr", own.frozen.lr), p.get("unfrozen_lr", own.unfrozen.lr),
                                 p.get("backbone_lr_mult", own.unfrozen.backbone_lr_mult)),
    }
    metric = get_metric(cfg.metric, task_spec(base, read_folds(base)).task).name
    lines = [f"| LRs | frozen lr | unfrozen lr | backbone mult | {metric} per fold ({', '.join(map(str, eval_folds))}) "
             f"| mean |", "|---|---|---|---|---|---|"]
    for label, train in variants.items():
        c = base.replace(train=dataclasses.replace(train, use_tuned="false"))
        scores = [_train(c, k)[1] for k in eval_folds]
        print(f"bench tune: {label}: {scores}")
        lines.append(f"| {label} | {train.frozen.lr:.2e} | {train.unfrozen.lr:.2e} | "
                     f"{train.unfrozen.backbone_lr_mult:.3g} | {', '.join(f'{s:.4f}' for s in scores)} | "
                     f"{np.mean(scores):.4f} |")
    s = best["pruning"]
    e = cfg.train
    return ("\n".join(lines) + "\n\n"
            f"Study: {best['trials']} trials of {base.backbones[0].name} on fold 0 (1 frozen + 2 unfrozen epochs each, "
            f"TPE, median pruner) in {tune_s:.0f} s; best trial {best['best_trial']} scored {best['value']:.4f}. "
            f"Pruning stopped {s['pruned']} trials early: {s['epochs_saved']} of {s['epochs_budget']} epochs not run, "
            f"~{s['seconds_saved']:.0f} s saved (~{100 * s['fraction_saved']:.0f}% of the study's full-budget time). "
            f"Each row above then trains {e.frozen.epochs} frozen + {e.unfrozen.epochs} unfrozen epochs on folds the "
            f"study never scored.\n")


def bench_lpft(cfg: Config, folds: tuple[int, ...] = (0, 1, 2)) -> str:
    """Frozen-phase head epochs vs a linear probe, before and after fine-tuning. Markdown."""
    base = _bench_config(cfg, "bench_lpft", cfg.train)
    run_folds(base)
    metric = get_metric(cfg.metric, task_spec(base, read_folds(base)).task).name
    lines = [f"| head before unfreezing | fold | {metric} after frozen phase | {metric} after fine-tuning | seconds |",
             "|---|---|---|---|---|"]
    means = {}
    t = cfg.train
    for label, probe in ((f"{t.frozen.epochs} head epochs at lr {t.frozen.lr:g}", False),
                         ("linear probe (L-BFGS, L2 chosen on validation)", True)):
        c = base.replace(train=dataclasses.replace(base.train, linear_probe=probe))
        rows = [_train(c, k) for k in folds]
        print(f"bench lpft: {label}: {rows}")
        for k, (frozen, final, seconds) in zip(folds, rows):
            lines.append(f"| {label} | {k} | {frozen:.4f} | {final:.4f} | {seconds:.0f} |")
        means[label] = (np.mean([r[0] for r in rows]), np.mean([r[1] for r in rows]))
        lines.append(f"| {label} | mean | {means[label][0]:.4f} | {means[label][1]:.4f} | |")
    return ("\n".join(lines) + "\n\n"
            f"{base.backbones[0].name}, {t.unfrozen.epochs} unfrozen epochs at lr {t.unfrozen.lr:g} "
            f"(backbone x{t.unfrozen.backbone_lr_mult:g}) after either head.\n")
