"""A frozen-only model's test predictions from one linear probe fitted on every train row.

The fold heads give a frozen-only model's OOF predictions and its CV; each saw (k-1)/k of the
rows. The backbone is the same pretrained one in every fold, so one more probe on the cached
features of all rows costs a few seconds, and it predicts the test set instead of the mean of the
fold heads (``train.all_rows_probe``). On the four development sets this scored at least the
fold heads' mean on the hidden test on 4 of 4 (benchmarks/studies/probe_variants.txt). The CV is
still the fold heads' (honest: nothing was chosen on their validation rows); the test
predictions come from a head that the CV did not score, as a refit on all data always does.

Files, beside the model's folds: ``runs/<exp>/<model>/all_rows/head.safetensors`` (the head's
weight and bias), ``head.json`` (the chosen L2, the rows, the task spec) and ``test.csv``.
``predict`` and a bundle apply the head to fold 0's backbone: one backbone pass per test image
and view instead of one per fold.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from pipeline.config.paths import Paths
from pipeline.config.schema import BackboneConfig, Config
from pipeline.core import artifacts
from pipeline.domain.tasks import TaskSpec
from pipeline.engine.fit import activate_mean, make_loss
from pipeline.engine.probe import fit_linear_probe
from pipeline.training.fingerprint import fold_digest

DIR = "all_rows"


def directory(cfg: Config, bcfg: BackboneConfig) -> Path:
    return Paths(cfg).backbone_dir(bcfg.slug) / DIR


def outputs(cfg: Config, bcfg: BackboneConfig) -> list[Path]:
    d = directory(cfg, bcfg)
    return [d / "head.safetensors", d / "head.json", d / "test.csv"]


def applies(cfg: Config, switch: bool = True) -> bool:
    """``cfg`` (the model's resolved config) trains frozen-only folds with the linear probe on cached
    features, without pseudo-labelled rows (they train one fold each: no all-rows set exists), and
    (``switch``) asks for the all-rows probe."""
    t, a = cfg.train, cfg.augment
    return ((t.all_rows_probe or not switch) and t.linear_probe and t.unfrozen.epochs == 0 and t.cache_features
            and not (a.frozen_phase and a.train) and not t.pseudo_labels)


def digest(cfg: Config, bcfg: BackboneConfig) -> str:
    """What the head depends on: what every fold does, with 'all rows' in place of the fold."""
    return fold_digest(cfg, bcfg, DIR)


def is_done(cfg: Config, bcfg: BackboneConfig) -> bool:
    return artifacts.is_up_to_date(outputs(cfg, bcfg), digest(cfg, bcfg))


def fit(cfg: Config, bcfg: BackboneConfig, spec: TaskSpec, table: pd.DataFrame, test: pd.DataFrame,
        store) -> str:
    """Fit the probe on every train row's cached features, predict the test rows under the TTA views,
    write the head and ``test.csv``; returns a line for the console."""
    from pipeline.training.trainer import FoldJob, FoldTrainer

    paths = Paths(cfg)
    job = FoldJob(cfg, bcfg, spec, table, 0, test, None, progress=False, store=store,
                  feature_cache_dir=paths.feature_cache_dir(bcfg.slug))
    trainer = FoldTrainer(job)  # fold 0's set-up: the same backbone, data config and feature keys
    rows = np.flatnonzero(table["fold"].to_numpy() >= 0)
    spec_all = spec.fit_targets(trainer.data.y[rows])
    loss_fn = spec_all.scaled_loss(make_loss(spec, cfg.train))
    views = [trainer.frozen_features(v) for v in cfg.train.probe_views]
    index = torch.as_tensor(rows, device=views[0].device)
    y = trainer.data.y_t[rows].to(views[0].device)
    weight, bias, strength = fit_linear_probe(spec_all, loss_fn, [v[index] for v in views], y,
                                              seed=cfg.train.seed + cfg.folds.n_splits)
    head = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
        logits = [head(trainer.frozen_features(v, test=True).float().cpu()).float() for v in cfg.augment.tta]
    frame = spec.predictions_frame(test[cfg.data.id_column], activate_mean(spec_all, logits), cfg.data.id_column)
    head_path, json_path, test_path = outputs(cfg, bcfg)
    with artifacts.atomic_path(head_path) as tmp:
        save_file({"weight": weight.cpu().contiguous(), "bias": bias.cpu().contiguous()}, str(tmp))
    fold_config = paths.fold_dir(bcfg.slug, 0) / "config.yaml"  # the backbone and views the head goes with
    artifacts.write_json(json_path, {"l2": strength, "rows": len(rows), "probe_views": list(cfg.train.probe_views),
                                     "tta": list(cfg.augment.tta), "spec": dataclasses.asdict(spec_all),
                                     "fold0_config_sha256": artifacts.sha256_digest(fold_config)})
    artifacts.write_csv(test_path, frame)
    artifacts.mark_done(outputs(cfg, bcfg), digest(cfg, bcfg))
    return (f"{bcfg.slug}: test predictions from one linear probe on all {len(rows)} train rows "
            f"(L2 {strength:g}; the CV is the fold heads') -> {test_path}")


def saved_head(model_dir: Path) -> tuple[dict[str, torch.Tensor], TaskSpec] | None:
    """The all-rows head and its task spec under a model's folder (a run's or a bundle's), or None
    when there is none, its files are not whole, or fold 0 was trained since with another config
    (then the fold heads predict, as the model's ``test.csv`` then holds)."""
    d = model_dir / DIR
    head_path, json_path, fold_config = d / "head.safetensors", d / "head.json", model_dir / "fold0" / "config.yaml"
    if not (head_path.exists() and json_path.exists() and fold_config.exists()):
        return None
    if artifacts.file_problem(head_path) is not None or artifacts.file_problem(json_path) is not None:
        return None
    saved = artifacts.read_json(json_path)
    if saved.get("fold0_config_sha256") != artifacts.sha256_digest(fold_config):
        return None
    spec = TaskSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved["spec"].items()})
    return load_file(str(head_path)), spec
