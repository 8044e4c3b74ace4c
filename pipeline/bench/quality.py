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

from pipeline.bench.measure import require_hidden_labels
from pipeline.config.paths import Paths
from pipeline.config.schema import Config, TrainConfig
from pipeline.core import artifacts
from pipeline.data.tables import read_folds, task_spec
from pipeline.domain.metrics import get_metric
from pipeline.stages.folds import run_folds
from pipeline.training.trainer import FoldJob, train_fold


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
                                feature_cache_dir=Paths(cfg).feature_cache_dir(bcfg.slug)))
    key = next(k for k in result.history[0] if k.startswith("valid_") and k != "valid_loss")
    frozen = [row[key] for row in result.history if row["phase"] == "frozen"]
    return (frozen[-1] if frozen else float("nan")), result.best_score, time.perf_counter() - start


def _with_lrs(train: TrainConfig, frozen_lr: float, unfrozen_lr: float, mult: float) -> TrainConfig:
    return dataclasses.replace(train, frozen=dataclasses.replace(train.frozen, lr=frozen_lr),
                               unfrozen=dataclasses.replace(train.unfrozen, lr=unfrozen_lr, backbone_lr_mult=mult))


def bench_tune(cfg: Config, trials: int = 12, eval_folds: tuple[int, ...] = (1, 2)) -> str:
    """Default vs config vs tuned LRs on held-out folds; pruning's count and saving. Markdown."""
    from pipeline.stages.tune import run_tune

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
                         ("linear probe (L-BFGS, L2 by held-out loss on the train rows)", True)):
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


# ----------------------------------------------------------------------------- finetune and keep


def solution_targets(cfg: Config, spec, test) -> np.ndarray:
    """The hidden test labels (``solution.csv`` beside the sample submission) in the test's order;
    :class:`~pipeline.bench.measure.CannotRun` where the data has none."""
    from pipeline.data.tables import read_csv, require_columns

    path = require_hidden_labels(cfg)
    id_col = cfg.data.id_column
    solution = read_csv(path, "solution file")
    require_columns(solution, [id_col, *cfg.data.target_columns], path, "data.target_columns")
    return spec.encode(solution.set_index(id_col).loc[test[id_col].astype(str)].reset_index())


def _fold_trajectory(cfg: Config, table, spec, test, fold: int) -> dict:
    """One fold trained with ``keep: swa``; the validation and test predictions of the frozen head
    and of every unfrozen epoch (through the job's report hook), of the SWA weights, and the loss
    of every unfrozen batch."""
    from pipeline.engine.fit import activate_mean
    from pipeline.training.trainer import FoldTrainer

    bcfg, views = cfg.backbones[0], cfg.augment.tta
    epochs: list[dict] = []
    job = FoldJob(cfg, bcfg, spec, table, fold, test=test, progress=False,
                  feature_cache_dir=Paths(cfg).feature_cache_dir(bcfg.slug))
    trainer = None

    def record(epoch: int, value: float) -> None:
        model = trainer.eval_model
        epochs.append({"epoch": epoch, "valid_score": value,
                       "valid": activate_mean(spec, trainer.predict(model, trainer.data.valid_idx, views=views)),
                       "test": activate_mean(spec, trainer.predict(model, np.arange(len(test)), True, views))})

    job.report = record
    trainer = FoldTrainer(job)
    trainer.batch_losses = []
    result = trainer.run()
    frozen = [row for row in result.history if row["phase"] == "frozen"]
    swa_valid = spec.predictions_from_frame(result.oof.drop(columns=["fold"]))
    return {"valid_idx": trainer.data.valid_idx, "epochs": epochs, "n_frozen": len(frozen),
            "frozen_train_loss": frozen[-1]["train_loss"] if frozen else float("nan"),
            "batch_losses": trainer.batch_losses, "swa": {"valid": swa_valid,
                                                          "test": spec.predictions_from_frame(result.test)}}


def _variants(run: dict, metric) -> dict[str, dict]:
    """The predictions ``train.keep`` would keep: the frozen head, best epoch, last epoch, SWA."""
    epochs, frozen = run["epochs"], run["epochs"][run["n_frozen"] - 1]
    best = frozen
    for e in epochs:
        if metric.better(e["valid_score"], best["valid_score"]):
            best = e
    return {"probe": frozen, "best": best, "last": epochs[-1], "swa": run["swa"]}


def bench_finetune(cfg: Config, seeds: tuple[int, ...] = (42, 43, 44)) -> str:
    """Does fine-tuning beat the frozen head it starts from, and which weights to keep? Markdown.

    For each seed (of the folds and of training) every fold is trained once with the experiment's
    settings; from that one trajectory come the frozen head's (or probe's) predictions, each
    unfrozen epoch's, and those of the SWA average, so that ``train.keep: best | last | swa`` are
    compared on the same runs: CV (the folds' own validation rows) against the score of the
    fold-averaged submission on the hidden test labels (``solution.csv``)."""
    from pipeline.data.tables import read_test_table
    from pipeline.engine.fit import score

    require_hidden_labels(cfg)
    t = cfg.train
    base = _bench_config(cfg, "bench_finetune", dataclasses.replace(t, keep="swa"))
    per_fold = ["| seed | fold | frozen head | each unfrozen epoch | kept by best | first 10 unfrozen batch losses "
                "(frozen phase's last) |", "|---|---|---|---|---|---|"]
    summary = ["| seed | weights (train.keep) | CV | hidden test | test - CV |", "|---|---|---|---|---|"]
    beats, worst_first = [], 0.0
    for seed in seeds:
        c = base.replace(name=f"bench_finetune_s{seed}", folds=dataclasses.replace(base.folds, seed=seed),
                         train=dataclasses.replace(base.train, seed=seed))
        run_folds(c)
        table = read_folds(c)
        spec, test = task_spec(c, table), read_test_table(c)
        metric = get_metric(c.metric, spec.task)
        y, y_test = spec.encode(table), solution_targets(c, spec, test)
        chance = float(np.log(spec.num_outputs)) if spec.task == "multiclass" else float(np.log(2))
        kept: dict[str, dict] = {}
        for fold in range(c.folds.n_splits):
            start = time.perf_counter()
            run = _fold_trajectory(c, table, spec, test, fold)
            variants = _variants(run, metric)
            for name, v in variants.items():
                entry = kept.setdefault(name, {"folds": [], "test": []})
                entry["folds"].append(score(metric, spec, y[run["valid_idx"]], v["valid"]))
                entry["test"].append(v["test"])
            first = run["batch_losses"][:10]
            worst_first = max([worst_first, *first])
            scores = [e["valid_score"] for e in run["epochs"][run["n_frozen"]:]]
            per_fold.append(f"| {seed} | {fold} | {variants['probe']['valid_score']:.4f} | "
                            f"{', '.join(f'{s:.4f}' for s in scores)} | epoch {variants['best']['epoch']} | "
                            f"{' '.join(f'{x:.2f}' for x in first)} ({run['frozen_train_loss']:.3f}) |")
            print(f"bench finetune: seed {seed} fold {fold}: {per_fold[-1]} {time.perf_counter() - start:.0f} s")
        tests = {}
        for name, entry in kept.items():
            cv = float(np.mean(entry["folds"]))
            tests[name] = score(metric, spec, y_test, np.mean(entry["test"], axis=0))
            summary.append(f"| {seed} | {name} | {cv:.4f} | {tests[name]:.4f} | {tests[name] - cv:+.4f} |")
        beats.append(all(metric.better(tests[k], tests["probe"]) for k in ("best", "last", "swa")))
    return ("\n".join(summary) + "\n\n" + "\n".join(per_fold) + "\n\n"
            f"{cfg.backbones[0].name} at {cfg.backbones[0].image_size or 'its default'} px, {c.folds.n_splits} folds, "
            f"{'a linear probe' if t.linear_probe else f'{t.frozen.epochs} frozen epochs'}, then {t.unfrozen.epochs} "
            f"unfrozen epochs at lr {t.unfrozen.lr:g} (backbone x{t.unfrozen.backbone_lr_mult:g}), "
            f"freeze_bn {t.freeze_bn}, adapt_bn {t.adapt_bn}; SWA over the last {t.swa_epochs} epochs. "
            f"\"probe\" is the frozen head the unfrozen phase starts from. Fine-tuned (best, last and swa) above the "
            f"frozen head on the hidden test in {sum(beats)} of {len(beats)} seeds; the highest loss of a first-10 "
            f"unfrozen batch was {worst_first:.2f} (chance: {chance:.2f}).\n")
