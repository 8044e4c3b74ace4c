"""Quality per minute on a photo set with hidden test labels (``configs/scenes.yaml``): whole train
stages of the experiment's first backbone under a few recipes, each in a fresh runs folder (no
cache shared between recipes, so each wall time includes its own feature passes), scored by the
fold mean (CV) and on the hidden test labels (``solution.csv``).

* **frozen**: the plain linear probe against the probe trained on the cached features of several
  views of each train image (``train.probe_views``), all frozen-only (``train.unfreeze: never``);
* **unfreeze**: always / ``auto`` (fold 0 decides, with a paired test, whether and at which LR
  the remaining folds unfreeze); never is the frozen section's plain probe.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.bench.quality import solution_targets
from pipeline.config.paths import Paths
from pipeline.config.schema import Config, config_from_dict, dump_config
from pipeline.core import artifacts
from pipeline.data.tables import read_folds, read_test_table, task_spec
from pipeline.domain.metrics import get_metric
from pipeline.engine.fit import score
from pipeline.stages.folds import run_folds

RECIPES = {
    "frozen": {"probe": {"train.unfreeze": "never", "train.probe_views": ["identity"]},
               "probe + hflip views": {"train.unfreeze": "never", "train.probe_views": ["identity", "hflip"]}},
    "unfreeze": {"auto": {"train.unfreeze": "auto"}, "always": {"train.unfreeze": "always"}},
}
SEEDS = {("unfreeze", "always"): (42,)}  # recipes measured on fewer seeds (their cost), by (section, recipe)


def _variant(cfg: Config, overrides: dict, seed: int, root: Path) -> Config:
    raw = __import__("yaml").safe_load(dump_config(cfg.replace(backbones=[cfg.backbones[0]])))
    raw.update(runs_dir=str(root / "runs"), folds_dir=str(root / "folds"), submissions_dir=str(root / "subs"))
    raw["train"]["seed"] = seed
    raw["train"]["use_tuned"] = "false"
    for key, value in overrides.items():
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return config_from_dict(raw)


def hidden_test_score(cfg: Config, model: str) -> float:
    """The model's fold-averaged ``test.csv`` scored against ``solution.csv`` beside the sample."""
    table = read_folds(cfg)
    spec, test = task_spec(cfg, table), read_test_table(cfg)
    frame = pd.read_csv(Paths(cfg).test_csv(model), dtype={cfg.data.id_column: str}, keep_default_na=False)
    metric = get_metric(cfg.metric, spec.task)
    return float(score(metric, spec, solution_targets(cfg, spec, test), spec.predictions_from_frame(frame)))


def run_recipes(cfg: Config, section: str, seeds: tuple[int, ...] = (42, 43, 44)) -> str:
    """Markdown: per recipe and seed, CV, hidden test and the train stage's wall time; then the
    means per recipe."""
    from pipeline.stages.train import run_train

    rows = []
    for name, overrides in RECIPES[section].items():
        for seed in SEEDS.get((section, name), seeds):
            root = Path(cfg.runs_dir) / "bench" / f"{section}-{name.replace(' ', '_').replace('+', '')}-s{seed}"
            vcfg = _variant(cfg, overrides, seed, root)
            run_folds(vcfg)
            start = time.perf_counter()
            run_train(vcfg)
            seconds = time.perf_counter() - start
            model = vcfg.backbones[0].slug
            cv = artifacts.read_json(Paths(vcfg).cv_json(model))
            rows.append({"recipe": name, "seed": seed, "cv": cv["cv_mean"], "test": hidden_test_score(vcfg, model),
                         "seconds": seconds, "decision": (cv.get("unfreeze") or {}).get("summary", "")})
            print(rows[-1], flush=True)
    frame = pd.DataFrame(rows)
    lines = ["| recipe | seed | CV | hidden test | test - CV | train stage s | decision |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r.recipe} | {r.seed} | {r.cv:.4f} | {r.test:.4f} | {r.test - r.cv:+.4f} | {r.seconds:.0f} | "
              f"{r.decision} |" for r in frame.itertuples()]
    means = frame.groupby("recipe", sort=False)[["cv", "test", "seconds"]].mean()
    lines += ["", "| recipe | mean CV | mean hidden test | mean train stage s |", "|---|---|---|---|"]
    lines += [f"| {name} | {m.cv:.4f} | {m.test:.4f} | {m.seconds:.0f} |" for name, m in means.iterrows()]
    b = cfg.backbones[0]
    lines += ["", f"{b.name} ({b.weights}) at {b.image_size} px, {cfg.folds.n_splits} folds, TTA "
              f"{', '.join(cfg.augment.tta)}; seeds {', '.join(map(str, seeds))} (train.seed); every run in "
              f"its own runs folder."]
    return "\n".join(lines)


def feature_ensemble(cfg: Config, members: tuple[str, ...] = ("efficientnet_lite0", "efficientnet_lite1",
                                                             "efficientnet_lite2"), seeds: tuple[int, ...] = (42,),
                     probe_views: tuple[str, ...] = ("identity",)) -> str:
    """Markdown: one probe over the concatenated frozen features of several backbones, against the
    mean of their separate probes (and each probe alone), per seed: CV and hidden test."""
    import torch

    from pipeline.engine.fit import activate_mean, make_loss
    from pipeline.engine.probe import fit_linear_probe
    from pipeline.stages.train import run_train
    from pipeline.training.trainer import FoldJob, FoldTrainer

    rows = []
    for seed in seeds:
        root = Path(cfg.runs_dir) / "bench" / f"features-s{seed}"
        base = _variant(cfg, {"train.unfreeze": "never", "train.probe_views": list(probe_views)}, seed, root)
        members_cfg = [base.replace(backbones=[dataclasses.replace(base.backbones[0], name=m, id=m)]) for m in members]
        table, spec, test = None, None, None
        feats, preds = {}, {}
        for mcfg in members_cfg:
            run_folds(mcfg)
            run_train(mcfg)
            table = read_folds(mcfg)
            spec, test = task_spec(mcfg, table), read_test_table(mcfg)
            bcfg = mcfg.backbones[0]
            trainer = FoldTrainer(FoldJob(mcfg, bcfg, spec, table, 0, test=test, progress=False,
                                          feature_cache_dir=Paths(mcfg).feature_cache_dir(bcfg.slug)))
            views = list(mcfg.augment.tta)
            feats[bcfg.slug] = {(v, t): trainer.frozen_features(v, t).cpu() for v in views for t in (False, True)}
            preds[bcfg.slug] = (pd.read_csv(Paths(mcfg).oof_csv(bcfg.slug), dtype={cfg.data.id_column: str}),
                                pd.read_csv(Paths(mcfg).test_csv(bcfg.slug), dtype={cfg.data.id_column: str}))
        metric, y = get_metric(cfg.metric, spec.task), spec.encode(table)
        y_test = solution_targets(base, spec, test)
        folds = table["fold"].to_numpy()

        def scores(oof: np.ndarray, test_preds: np.ndarray) -> tuple[float, float]:
            cv = np.mean([score(metric, spec, y[folds == k], oof[folds == k]) for k in range(cfg.folds.n_splits)])
            return float(cv), float(score(metric, spec, y_test, test_preds))

        for m in members:
            oof, tst = preds[m]
            rows.append({"model": f"probe {m}", "seed": seed, **dict(zip(("cv", "test"), scores(
                spec.predictions_from_frame(oof), spec.predictions_from_frame(tst))))})
        mean_oof = np.mean([spec.predictions_from_frame(preds[m][0]) for m in members], axis=0)
        mean_test = np.mean([spec.predictions_from_frame(preds[m][1]) for m in members], axis=0)
        rows.append({"model": "mean of the probes", "seed": seed, **dict(zip(("cv", "test"), scores(mean_oof, mean_test)))})
        views = list(base.augment.tta)
        concat = {key: torch.cat([feats[m][key] for m in members], dim=1) for key in feats[members[0]]}
        loss_fn = make_loss(spec, base.train)
        oof, test_sum = np.zeros((len(table), spec.num_outputs)), []
        y_t = torch.as_tensor(y)
        for k in range(cfg.folds.n_splits):
            tr, va = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
            weight, bias, _ = fit_linear_probe(spec, loss_fn, [concat[v, False][tr] for v in probe_views], y_t[tr],
                                               seed=seed + k)
            oof[va] = activate_mean(spec, [concat[v, False][va] @ weight.T + bias for v in views])
            test_sum.append(activate_mean(spec, [concat[v, True] @ weight.T + bias for v in views]))
        rows.append({"model": "one probe on the concatenated features", "seed": seed,
                     **dict(zip(("cv", "test"), scores(oof, np.mean(test_sum, axis=0))))})
        print(rows[-2:], flush=True)
    frame = pd.DataFrame(rows)
    lines = ["| model | seed | CV | hidden test |", "|---|---|---|---|"]
    lines += [f"| {r.model} | {r.seed} | {r.cv:.4f} | {r.test:.4f} |" for r in frame.itertuples()]
    means = frame.groupby("model", sort=False)[["cv", "test"]].mean()
    lines += ["", "| model | mean CV | mean hidden test |", "|---|---|---|"]
    lines += [f"| {name} | {m.cv:.4f} | {m.test:.4f} |" for name, m in means.iterrows()]
    lines += ["", f"{', '.join(members)} ({cfg.backbones[0].weights}) at {cfg.backbones[0].image_size} px, frozen-only, "
              f"{cfg.folds.n_splits} folds, probe views {', '.join(probe_views)}, TTA {', '.join(cfg.augment.tta)}; "
              f"seeds {', '.join(map(str, seeds))} (train.seed)."]
    return "\n".join(lines)
