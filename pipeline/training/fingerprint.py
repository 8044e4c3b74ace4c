"""What a fold's result depends on: the fold digest that decides whether a finished fold is still
current (the run-only keys it leaves out are :mod:`pipeline.config.run_only`'s one list)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline.config.paths import Paths
from pipeline.config.run_only import digest_section
from pipeline.config.schema import BackboneConfig, Config
from pipeline.core import artifacts
from pipeline.engine.backbones import PRETRAINED, pretrained_file
from pipeline.engine.fit import LR_SCHEDULE


def fold_outputs(fold_dir: Path, with_test: bool) -> list[Path]:
    outs = [fold_dir / "oof.csv", fold_dir / "history.csv", fold_dir / "best.safetensors", fold_dir / "kept.json"]
    return outs + [fold_dir / "test.csv"] if with_test else outs


# train keys that act after the folds (on the model's test predictions), so no fold depends on them
AFTER_FOLDS = ("all_rows_probe",)


def result_train_config(cfg: Config) -> dict:
    """``cfg.train`` as a dict as digests hash it: its run-only keys and :data:`AFTER_FOLDS` cannot
    change the digest."""
    values = {k: v for k, v in dataclasses.asdict(cfg.train).items() if k not in AFTER_FOLDS}
    return digest_section("train", values)


def fold_digest(cfg: Config, bcfg: BackboneConfig, fold: int) -> str:
    """What a fold's result depends on: data, folds, task, metric, training and augmentation (the
    resolved config: its tuned LRs and planned epochs), but no run-only key."""
    paths = Paths(cfg)
    train = result_train_config(cfg)
    part = {"data": digest_section("data", dataclasses.asdict(cfg.data)), "metric": cfg.metric, "train": train,
            "augment": dataclasses.asdict(cfg.augment), "backbone": dataclasses.asdict(bcfg), "fold": fold,
            "lr_schedule": LR_SCHEDULE}
    inputs = [paths.folds_csv, paths.sample_submission] + ([paths.train_csv] if paths.train_csv else [])
    if bcfg.weights.startswith(PRETRAINED):  # a re-run of the pretrain stage retrains the folds
        inputs.append(pretrained_file(bcfg.weights, paths.exp_dir))
    if cfg.train.pseudo_labels:  # a changed pseudo-label set retrains the folds
        inputs.append(Path(cfg.train.pseudo_labels))
    return artifacts.fingerprint(part, inputs)


def fold_is_done(cfg: Config, bcfg: BackboneConfig, fold: int) -> bool:
    """The fold's files are there, written under its digest, and whole (:func:`artifacts.file_problem`)."""
    fold_dir = Paths(cfg).fold_dir(bcfg.slug, fold)
    return artifacts.is_up_to_date(fold_outputs(fold_dir, True), fold_digest(cfg, bcfg, fold))


def discard_damaged(cfg: Config, bcfg: BackboneConfig, fold: int) -> list[str]:
    """Remove the fold's files that are not what was written (a checkpoint cut short by a full disk or a
    killed copy, or changed: SHA-256), with their stamps, so that the fold is trained again; one line
    per file. Once per fold and train run: it reads every file whole."""
    lines = []
    for out in fold_outputs(Paths(cfg).fold_dir(bcfg.slug, fold), True):
        problem = artifacts.file_problem(out, digest=True) if out.exists() else None
        if problem:
            artifacts.discard(out)
            lines.append(f"{bcfg.slug} fold {fold}: {out} is damaged ({problem}); training the fold again")
    return lines


def total_epochs(train) -> int:
    """Epochs a fold runs: the frozen ones (one for a linear probe) plus the unfrozen ones."""
    return (1 if train.linear_probe else train.frozen.epochs) + train.unfrozen.epochs
