"""Pretrain stage: train a backbone on another labelled image set, then fine-tune from it.

``python -m pipeline pretrain -c CFG [--backbone ID]`` trains each entry of ``pretrain.backbones``
on ``pretrain.data`` (the keys and layouts of ``data.*``: a CSV and an image folder, or class
sub-folders) with the train stage's own fold trainer: one "fold" whose validation rows are a
held-out share (``pretrain.holdout``, stratified like the folds) that monitors the run and picks
the kept epoch (``train.keep``). ``pretrain.train`` overrides ``train.*`` keys for it.

Per entry, in ``runs/<exp>/<id>/``: ``pretrain/`` (the fold trainer's ``history.csv``,
``best.safetensors``, held-out ``oof.csv``, ``kept.json``; a killed run resumes after its last
epoch), ``pretrained.safetensors`` (the kept weights with ``timm_name``, ``num_classes`` - the
head's outputs - ``classes``, ``task`` and the held-out score in its metadata) and
``pretrained.json`` (the same, readable). A competition backbone then starts from it with
``weights: pretrained:<id>``: same architecture required (a one-line error otherwise), the head
kept when its size matches and replaced by a new zero one when it does not.

Example
-------
>>> run_pretrain(load_config("configs/pretrain_demo.yaml"))  # doctest: +SKIP
PosixPath('runs/pretrain_demo')
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
from safetensors.torch import load_file, save_file

from pipeline.config.paths import Paths
from pipeline.config.run_only import digest_section
from pipeline.config.schema import BackboneConfig, Config, FoldsConfig, dump_config
from pipeline.core import artifacts, locks
from pipeline.core.errors import PipelineError
from pipeline.data.splits import assign_folds
from pipeline.data.tables import read_train_table, task_spec
from pipeline.domain.metrics import get_metric
from pipeline.domain.tasks import TaskSpec
from pipeline.engine.backbones import PRETRAINED, check_model_name, check_weights, pretrained_file
from pipeline.engine.fit import LR_SCHEDULE
from pipeline.training.fingerprint import result_train_config
from pipeline.training.trainer import FoldJob, train_fold


def pretrain_config(cfg: Config) -> Config:
    """The config the pretraining runs under: ``pretrain.data`` as the data, and a metric that
    applies to its task (the competition's when it does, else accuracy or rmse)."""
    p = cfg.pretrain
    if p.data is None:
        raise PipelineError("config key pretrain.data is not set: name the labelled set to pretrain on "
                            "(the keys of data.*: root, task, train_csv, train_dir, id_column, target_columns, ...)")
    if not p.backbones:
        raise PipelineError("config key pretrain.backbones is empty: list the backbones to pretrain "
                            "(name, id, weights, image_size), then use weights: pretrained:<id> in backbones")
    return cfg.replace(data=p.data)


def pretrain_metric(cfg: Config, task: str) -> str:
    try:
        get_metric(cfg.metric, task)
        return cfg.metric
    except PipelineError:
        return "rmse" if task == "regression" else "accuracy"


def holdout_split(table, spec: TaskSpec, cfg: Config, holdout: float) -> np.ndarray:
    """0 for the held-out rows (about ``holdout`` of them), 1 for the rest: fold 0 of
    ``round(1 / holdout)`` folds, stratified by class, label set or binned target (and by group
    when ``pretrain.data.group_column`` is set)."""
    n_splits = max(2, round(1 / holdout))
    strategy = "stratified_group" if cfg.data.group_column else "stratified"
    split_cfg = cfg.replace(folds=FoldsConfig(n_splits=n_splits, strategy=strategy, seed=cfg.folds.seed))
    try:
        folds = assign_folds(table, spec, split_cfg)
    except PipelineError as exc:
        raise PipelineError(f"pretrain.holdout {holdout} (a held-out fold of {n_splits}): {exc}") from None
    return (folds != 0).astype(int)


def pretrain_digest(cfg: Config, bcfg: BackboneConfig, holdout: float) -> str:
    """What the checkpoint depends on: the pretraining data, training settings and backbone."""
    paths = Paths(cfg)
    part = {"data": digest_section("data", dataclasses.asdict(cfg.data)), "metric": cfg.metric,
            "train": result_train_config(cfg),
            "augment": dataclasses.asdict(cfg.augment), "backbone": dataclasses.asdict(bcfg), "holdout": holdout,
            "seed": cfg.folds.seed, "lr_schedule": LR_SCHEDULE}
    inputs = [paths.train_csv] if paths.train_csv else []
    if bcfg.weights.startswith(PRETRAINED):  # pretraining in stages: from an earlier checkpoint
        inputs.append(pretrained_file(bcfg.weights, paths.exp_dir))
    return artifacts.fingerprint(part, inputs)


def save_pretrained(path: Path, weights: Path, bcfg: BackboneConfig, spec: TaskSpec, summary: dict) -> None:
    """The kept weights with what fine-tuning checks in the safetensors metadata (text values)."""
    meta = {"format": "pipeline-pretrained", "timm_name": bcfg.name, "num_classes": str(spec.num_outputs),
            "classes": json.dumps(list(spec.classes)), "task": spec.task,
            "summary": json.dumps(summary, default=str)}
    with artifacts.atomic_path(path) as tmp:
        save_file(load_file(str(weights)), str(tmp), metadata=meta)


def run_pretrain(cfg: Config, backbone: str | None = None, force: bool = False) -> Path:
    """Pretrain every ``pretrain.backbones`` entry (or the one ``backbone`` names); returns runs/<exp>/."""
    pre = pretrain_config(cfg)
    paths = Paths(cfg)
    entries = [b for b in cfg.pretrain.backbones if backbone in (None, b.slug)]
    if not entries:
        raise PipelineError(f"--backbone {backbone} is not an id in pretrain.backbones; valid: "
                            f"{', '.join(b.slug for b in cfg.pretrain.backbones)}")
    for b in entries:  # before any training: names and weights files
        key = f"pretrain.backbones[{cfg.pretrain.backbones.index(b)}]"
        check_model_name(b.name)
        check_weights(b, f"{key}.weights", paths.exp_dir)
    table = read_train_table(pre)
    spec = task_spec(pre, table)
    pre = pre.replace(metric=pretrain_metric(cfg, spec.task))
    table["fold"] = holdout_split(table, spec, pre, cfg.pretrain.holdout)
    artifacts.check_writable(paths.exp_dir)
    for entry in entries:
        i = cfg.pretrain.backbones.index(entry)
        run_cfg, bcfg = pre.variant(cfg.pretrain.backbone_variant(entry), f"pretrain.backbones[{i}]")
        _pretrain_one(run_cfg, bcfg, spec, table, force)
    return paths.exp_dir


def _pretrain_one(cfg: Config, bcfg: BackboneConfig, spec: TaskSpec, table, force: bool) -> None:
    paths = Paths(cfg)
    out_dir = paths.backbone_dir(bcfg.slug) / "pretrain"
    target = pretrained_file(PRETRAINED + bcfg.slug, paths.exp_dir)
    digest = pretrain_digest(cfg, bcfg, cfg.pretrain.holdout)
    if not force and artifacts.is_up_to_date([target], digest):
        print(f"pretrain: {target} is up to date (use --force to redo)")
        return
    with locks.hold(out_dir, f"pretraining of {bcfg.slug}", "is running") as held:
        if not held:
            return
        artifacts.write_text(out_dir / "config.yaml", dump_config(cfg.replace(backbones=[bcfg])))
        held_out = int((table["fold"] == 0).sum())
        print(f"pretrain: {bcfg.slug} ({bcfg.name}, weights {bcfg.weights}) on {cfg.data.root}: "
              f"{len(table) - held_out} rows, {held_out} held out, {spec.num_outputs} outputs")
        start = time.perf_counter()
        job = FoldJob(cfg, bcfg, spec, table, 0, None, out_dir, digest, feature_cache_dir=out_dir / "features")
        if force:
            (out_dir / "resume.safetensors").unlink(missing_ok=True)
        result = train_fold(job)
        for note in result.notes:
            print(note)
        summary = {"timm_name": bcfg.name, "num_classes": spec.num_outputs, "classes": list(spec.classes),
                   "task": spec.task, "data": cfg.data.root, "train_rows": len(table) - held_out,
                   "holdout_rows": held_out, "metric": cfg.metric, f"holdout_{cfg.metric}": result.best_score,
                   "kept": result.kept, "epochs": len(result.history),
                   "seconds": round(time.perf_counter() - start, 1)}
        save_pretrained(target, out_dir / "best.safetensors", bcfg, spec, summary)
        artifacts.write_json(target.with_suffix(".json"), summary)
        artifacts.mark_done([target], digest)
    print(f"pretrain: {bcfg.slug}: kept {result.kept}, held-out {cfg.metric} {result.best_score:.4f} -> {target}; "
          f"fine-tune from it with weights: {PRETRAINED}{bcfg.slug}")
