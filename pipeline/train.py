"""Train stage: every backbone on every fold, frozen head first, then the whole network.

Per fold (``runs/<exp>/<backbone>/fold<k>/``): ``history.csv``, ``best.safetensors``,
``oof.csv`` (the fold's validation rows), ``test.csv`` (TTA predictions), and while running a
``resume.safetensors`` written after every epoch. Per backbone: ``oof.csv`` (every train row
once), fold-averaged ``test.csv`` and ``cv.json``.

A fold's randomness is a function of (seed, fold, epoch) only - every epoch re-seeds - so a
run killed after epoch e and resumed ends exactly where an uninterrupted run would.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline import artifacts, checkpoints, distributed, locks, tracking
from pipeline.augment import ImageCache, eval_transform, train_transform
from pipeline.budget import planned_config
from pipeline.backbones import (PRETRAINED, adapt_batchnorm, check_model_name, check_weights, create_backbone,
                                data_config, freeze_batchnorm_stats, frozen_train_mode, pooled_features,
                                pretrained_file, set_frozen)
from pipeline.config import BackboneConfig, Config, PhaseConfig, dump_config
from pipeline.data import (PATH, ImageDataset, SeededSampler, check_images_readable, read_folds, read_test_table,
                           record_verified, task_spec, verified_dir)
from pipeline.errors import PipelineError
from pipeline.features import cached_features, compute_features
from pipeline.fit import (LR_SCHEDULE, PROCESSES_ENV, NonFiniteLoss, Runtime, Stepper, activate_mean, build_optimizer,
                          build_scheduler, default_workers, group_lrs, make_loss, predict_logits, run_batches, score,
                          seed_everything)
from pipeline.metrics import get_metric
from pipeline.paths import Paths
from pipeline.pseudo import with_pseudo_labels
from pipeline.tasks import TaskSpec

# ----------------------------------------------------------------------------- tuned LRs


def apply_tuned(cfg: Config, bcfg: BackboneConfig) -> tuple[Config, dict]:
    """Config with the tune stage's best LRs when ``train.use_tuned`` says so; and where each
    LR came from (``config`` or the best.json path).

    LRs tuned for one objective (image size, budget, augmentation, data, ...) are no evidence
    for another, so best.json's recorded objective is compared with this config's: ``auto``
    then falls back to the config's LRs, ``true`` uses the tuned ones; both print the changes."""
    path = Paths(cfg).tuned_params(bcfg.slug)
    use = cfg.train.use_tuned == "true" or (cfg.train.use_tuned == "auto" and path.exists())
    if not use:
        return cfg, {"lr_source": "config"}
    if not path.exists():
        raise PipelineError(f"train.use_tuned is true but {path} does not exist; run `make tune` first")
    best = artifacts.read_json(path)
    params = best["params"]
    changes = tuned_objective_changes(cfg, bcfg, best)
    if changes and cfg.train.use_tuned == "auto":
        print(f"{bcfg.slug}: {path} was tuned for another objective ({'; '.join(changes)}); using the config's "
              f"LRs (`make tune` re-tunes; train.use_tuned=true uses the tuned LRs anyway)")
        return cfg, {"lr_source": "config", "stale_tuned": str(path), "objective_changes": changes}
    if changes:
        print(f"{bcfg.slug}: train.use_tuned is true: using the LRs of {path}, tuned for another objective "
              f"({'; '.join(changes)})")
    frozen, unfrozen, train = cfg.train.frozen, cfg.train.unfrozen, cfg.train
    frozen = dataclasses.replace(frozen, lr=params.get("frozen_lr", frozen.lr))
    unfrozen = dataclasses.replace(unfrozen, lr=params.get("unfrozen_lr", unfrozen.lr),
                                   backbone_lr_mult=params.get("backbone_lr_mult", unfrozen.backbone_lr_mult))
    train = dataclasses.replace(train, frozen=frozen, unfrozen=unfrozen,
                                weight_decay=params.get("weight_decay", train.weight_decay))
    source = {"lr_source": str(path), "tuned": params}
    return cfg.replace(train=train), {**source, "objective_changes": changes} if changes else source


def tuned_objective_changes(cfg: Config, bcfg: BackboneConfig, best: dict) -> list[str]:
    """``key: tuned -> now`` for each setting of the study's objective (recorded in best.json by the
    tune stage) that this config changes; empty when they match."""
    from pipeline.tune import objective_parts, tune_budget  # tune imports this module

    recorded = best.get("objective")
    if recorded is None:
        return ["best.json records no objective (written by an older version; `make tune` rewrites it)"]
    try:
        current = objective_parts(cfg, bcfg, tune_budget(cfg), dict.fromkeys(best["params"]))
    except PipelineError as exc:
        return [f"the tune settings no longer apply ({exc})"]
    current = json.loads(json.dumps(current))  # as best.json holds it (lists, not tuples)
    return [f"{k}: {_short(recorded.get(k))} -> {_short(current.get(k))}"
            for k in sorted(set(recorded) | set(current)) if recorded.get(k) != current.get(k)]


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ----------------------------------------------------------------------------- one fold


_BN_STATS: dict[str, dict] = {}  # train.adapt_bn: re-estimated BatchNorm buffers per backbone and images


@dataclass
class FoldJob:
    """Everything one fold needs. ``out_dir`` None: train in memory only (tuning)."""

    cfg: Config
    bcfg: BackboneConfig
    spec: TaskSpec
    table: pd.DataFrame  # the folds table with image paths
    fold: int
    test: pd.DataFrame | None = None
    out_dir: Path | None = None
    digest: str = ""
    report: Callable[[int, float], None] | None = None  # after each epoch (tuning/pruning)
    progress: bool = True
    feature_cache_dir: Path | None = None


@dataclass
class FoldResult:
    best_score: float
    best_epoch: int
    history: list[dict]
    oof: pd.DataFrame | None = None
    test: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)
    kept: str = ""  # which weights the fold kept (train.keep), e.g. "epoch 3 (unfrozen)"


class FoldTrainer:
    """One fold: set-up, the frozen and unfrozen phases, predictions. Read ``run`` first."""

    def __init__(self, job: FoldJob):
        self.job, cfg = job, job.cfg
        self.tcfg = cfg.train
        self.metric = get_metric(cfg.metric, job.spec.task)
        seed_everything(self.tcfg.seed)  # same initial model in every fold
        self.model = create_backbone(job.bcfg, job.spec.num_outputs, Paths(cfg).exp_dir)
        self.dc = data_config(self.model, job.bcfg)
        device = f"cuda:{distributed.local_rank()}" if distributed.enabled() and torch.cuda.is_available() else None
        self.rt = Runtime.create(self.tcfg, self.dc["mean"], self.dc["std"], device)
        self.rt.prepare_model(self.model)
        self.loss_fn = make_loss(job.spec, self.tcfg)
        self.batch_size = job.bcfg.batch_size or self.tcfg.batch_size
        self.rank_batch_size = max(1, self.batch_size // distributed.world_size())  # DDP: same global batch
        self.workers = default_workers(self.rt, self.tcfg.num_workers)
        folds = job.table["fold"].to_numpy()
        # fold < 0: a pseudo-labelled test row (pipeline.pseudo) that trains fold -1 - fold only, never validates
        self.train_idx = np.flatnonzero(np.where(folds >= 0, folds != job.fold, folds == -1 - job.fold))
        self.valid_idx = np.flatnonzero(folds == job.fold)
        if len(self.valid_idx) == 0:
            raise PipelineError(f"fold {job.fold} has no validation rows; folds run 0..{folds.max()}")
        self.y = job.spec.encode(job.table)
        # regression: the loss and head in units of this fold's train targets; predictions in the original
        self.job = job = dataclasses.replace(job, spec=job.spec.fit_targets(self.y[self.train_idx]))
        self.loss_fn = job.spec.scaled_loss(self.loss_fn)
        self.y_t = torch.from_numpy(np.array(self.y))
        self.cache = self._image_cache()
        self.state = {"epoch": -1, "updates": 0, "best": None, "best_epoch": -1, "best_unfrozen": None,
                      "bad_epochs": 0, "swa_count": 0, "history": []}
        self.best_in_memory: dict | None = None  # the kept weights when there is no fold folder (tuning)
        self.swa: dict[str, torch.Tensor] | None = None  # train.keep swa: running average of the eval weights
        self.batch_losses: list[float] | None = None  # set to a list to record every unfrozen batch's loss
        self.ema = None
        self.notes: list[str] = []
        if self.tcfg.adapt_bn:
            self._adapt_batchnorm()

    def _adapt_batchnorm(self) -> None:
        """``train.adapt_bn``: BatchNorm statistics re-estimated on every train image (no labels),
        once per backbone and process, so that the frozen head trains on the statistics the
        unfrozen phase starts from rather than ImageNet's."""
        key = "adapt_bn-" + self._images_key()
        if key not in _BN_STATS:
            loader = self._loader(self._dataset(np.arange(len(self.job.table)), train=False))
            with self.rt.autocast():
                _BN_STATS[key] = adapt_batchnorm(self.model, (self.rt.images(x) for x, _ in loader))
            print(f"adapt_bn: BatchNorm statistics of {self.job.bcfg.slug} re-estimated on {len(self.job.table)} train images")
        self.model.load_state_dict(_BN_STATS[key], strict=False)

    def _images_key(self) -> str:
        return artifacts.fingerprint({"backbone": dataclasses.asdict(self.job.bcfg), "size": self.dc["size"],
                                      "seed": self.tcfg.seed, "adapt_bn": self.tcfg.adapt_bn,
                                      "resize": self.job.cfg.augment.resize,
                                      "ids": list(map(str, self.job.table.iloc[:, 0])),
                                      "paths": list(self.job.table[PATH])})

    # ------------------------------------------------------------------ data
    def _image_cache(self, test: bool = False):
        """``train.cache_images``: the train (or test) images decoded and resized once per (image
        files, size, interpolation, resize policy) into ``runs/<exp>/cache/`` and memory-mapped
        (:class:`ImageCache`): every fold, tune trial, prediction pass and parallel process reads the
        same file; the first process that needs it builds it while others wait on its lock. None when
        the option is off, or when the file would take over half the free disk space (said once)."""
        if not self.tcfg.cache_images:
            return None
        table = self.job.test if test else self.job.table
        size, interp, resize = self.dc["size"], self.dc["interpolation"], self.job.cfg.augment.resize
        path = ImageCache.file_for(Paths(self.job.cfg).image_cache_dir, table[PATH], size, interp, resize)
        if not path.exists() and not ImageCache.fits_on_disk(path, len(table), size):
            print(f"image cache: {len(table)} images at {size}px would take "
                  f"{ImageCache.bytes_needed(len(table), size) / 2**30:.1f} GiB, over half the free space "
                  f"under {path.parent}; reading the image files instead")
            return None
        if distributed.enabled() or not path.exists():  # under torchrun every rank takes part in the lock
            with locks.hold(path, f"image cache {path.name}", "is being built", wait=True):
                if distributed.is_main() and ImageCache.build(path, table[PATH], size, interp, resize):
                    print(f"image cache: {len(table)} {'test' if test else 'train'} images at {size}px decoded "
                          f"once into {path} ({ImageCache.bytes_needed(len(table), size) / 2**20:.1f} MiB, "
                          f"memory-mapped by every fold and process)")
            distributed.barrier()
        return ImageCache.open(path)

    def _cache_for(self, test: bool):
        """The train cache (built with the trainer), or the test cache (built at its first use)."""
        if not test:
            return self.cache
        if "_test_cache" not in self.__dict__:
            self._test_cache = self._image_cache(test=True)
        return self._test_cache

    def _dataset(self, rows: np.ndarray, train: bool, test: bool = False) -> ImageDataset:
        size, interp = self.dc["size"], self.dc["interpolation"]
        aug = self.job.cfg.augment
        transform = train_transform(aug.train, size, interp, aug.resize) if train else eval_transform(size, interp, aug.resize)
        table = self.job.test if test else self.job.table
        cache = self._cache_for(test)
        targets = None if test else self.y[rows]
        return ImageDataset(table[PATH].to_numpy()[rows], targets, transform,
                            None if cache is None else _Subset(cache, rows), decode=(size, aug.resize))

    @property
    def eval_batch_size(self) -> int:
        """Evaluation batches: twice the training batch (no gradients or activations are kept)."""
        return 2 * self.batch_size

    def _loader(self, dataset, sampler=None, batch_sampler=None, drop_last=False, persistent=False):
        """Pinned memory on CUDA; workers sized to the machine; ``persistent`` keeps them for every
        epoch (the train loader, whose :class:`SeededSampler` carries each epoch's seed to them).
        Without a sampler it is an evaluation loader, of :attr:`eval_batch_size`."""
        kwargs = dict(num_workers=self.workers, pin_memory=self.rt.cuda, persistent_workers=persistent and self.workers > 0)
        if self.workers:
            kwargs.update(worker_init_fn=_seed_worker, prefetch_factor=4)
        if batch_sampler is not None:
            return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, **kwargs)
        return torch.utils.data.DataLoader(dataset, batch_size=self.rank_batch_size if sampler is not None else self.eval_batch_size,
                                           sampler=sampler, drop_last=drop_last, **kwargs)

    # ------------------------------------------------------------------ bookkeeping
    @property
    def fold_dir(self) -> Path | None:
        return self.job.out_dir

    def _resume(self) -> None:
        if self.fold_dir is None:
            return
        info = checkpoints.read_resume_info(self.fold_dir / "resume.safetensors")
        if info is None or info.get("digest") != self.job.digest:
            return
        self.state.update(info)
        print(f"fold {self.job.fold}: resuming after epoch {info['epoch']} ({info['phase']} phase)")

    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def _keep(self, model: nn.Module) -> None:
        """These weights are the fold's model so far: ``best.safetensors`` (in memory when tuning)."""
        if self.fold_dir is None or not distributed.is_main():
            self.best_in_memory = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            checkpoints.save_weights(self.fold_dir / "best.safetensors", model)

    def _save_epoch(self, row: dict, optimizer, keep: bool) -> None:
        if keep:
            self._keep(self.eval_model)
        if self.fold_dir is None or not distributed.is_main():
            return
        artifacts.write_csv(self.fold_dir / "history.csv", pd.DataFrame(self.state["history"]))
        info = {**self.state, "digest": self.job.digest, "phase": row["phase"]}
        checkpoints.save_resume(self.fold_dir / "resume.safetensors", self.model, optimizer, info,
                                self.ema.module if self.ema is not None else None, self.rt.scaler, self.swa)

    def _end_epoch(self, epoch: int, phase: str, lrs: dict, train_stats: dict, valid_logits: torch.Tensor,
                   optimizer) -> bool:
        """Score the epoch, log it, checkpoint it; True when early stopping says stop."""
        valid_y = self.y_t[self.valid_idx]
        valid_loss = float(self.loss_fn(valid_logits, valid_y))
        if not (np.isfinite(valid_loss) and bool(torch.isfinite(valid_logits).all())):  # diverged: stop, save nothing
            raise NonFiniteLoss(f"the validation outputs became NaN/inf ({self._desc(phase, epoch)}): training "
                                f"diverged. Lower the learning rate (train.frozen.lr / train.unfrozen.lr) or enable "
                                f"train.grad_clip")
        preds = self.job.spec.activate(valid_logits.numpy())
        value = score(self.metric, self.job.spec, self.y[self.valid_idx], preds)
        improved = self.metric.better(value, self.state["best"])
        if improved:
            self.state.update(best=value, best_epoch=epoch)
        if phase == "unfrozen":  # patience counts against the unfrozen phase's own best: the BatchNorm
            # switch may cost the first epochs a drop below the frozen head that later ones recover
            if self.metric.better(value, self.state["best_unfrozen"]):
                self.state.update(best_unfrozen=value, bad_epochs=0)
            else:
                self.state["bad_epochs"] += 1
        row = {"epoch": epoch, "phase": phase, **lrs, "train_loss": train_stats["train_loss"],
               "valid_loss": valid_loss, f"valid_{self.metric.name}": value,
               "seconds": train_stats["seconds"], "images_per_s": train_stats["images_per_s"]}
        self.state["history"].append(row)
        self.state["epoch"] = epoch
        self._save_epoch(row, optimizer, keep=improved if self.tcfg.keep == "best" else True)
        if self.job.report is not None:
            self.job.report(epoch, value)
        return phase == "unfrozen" and self._stopped_early()

    # ------------------------------------------------------------------ frozen phase
    def use_feature_cache(self) -> bool:
        cfg = self.job.cfg
        if not self.tcfg.cache_features:
            return False
        if cfg.augment.frozen_phase and cfg.augment.train:
            self.notes.append("frozen phase: augmentation is on, so the feature cache is off (full model)")
            return False
        return True

    def frozen_features(self, view: str = "identity", test: bool = False) -> torch.Tensor:
        """Pooled features of every train (or test) row as TTA ``view`` shows them, through the frozen
        backbone: one pass per backbone, view and image set, cached in memory and on disk so that
        every fold (and, when nothing is unfrozen, every prediction) reuses it."""
        table = self.job.test if test else self.job.table
        name = f"{'test' if test else 'train'}{'' if view == 'identity' else '-' + view}"
        key = self._images_key() + ("" if name == "train" else "-" + name + artifacts.fingerprint(list(table[PATH])))
        loader = self._loader(self._dataset(distributed.shard(np.arange(len(table))), train=False, test=test))
        compute = lambda: distributed.gather_rows(compute_features(self.model, loader, self.rt, view))  # noqa: E731
        feats, source = cached_features(key, self.job.feature_cache_dir if distributed.is_main() else None, compute, name)
        if source != "memory":
            print(f"frozen backbone: features of {len(feats)} {name} images {source} "
                  f"({'cache' if source == 'disk' else 'one pass'})")
        return feats.to(self.rt.device)

    def frozen_only(self) -> bool:
        """Nothing is unfrozen and the head trained on cached features: the backbone is the
        pretrained one in every fold, so predictions are the head applied to cached features."""
        t, a = self.tcfg, self.job.cfg.augment
        return t.unfrozen.epochs == 0 and t.cache_features and not (a.frozen_phase and a.train)

    def frozen_phase(self, phase: PhaseConfig, start_epoch: int) -> None:
        set_frozen(self.model, True)
        head = self.model.get_classifier()
        optimizer = build_optimizer(self.model, self.tcfg, phase, frozen=True)
        steps = -(-len(self.train_idx) // self.batch_size)
        updates = -(-steps // self.tcfg.grad_accum)  # the Stepper steps every grad_accum batches
        scheduler = build_scheduler(optimizer, phase, updates)
        if start_epoch > 0:
            self._load_resume(optimizer)
        stepper = Stepper(optimizer, scheduler, self.rt, self.tcfg, head.parameters(), steps_per_epoch=updates,
                          start_update=start_epoch * updates)
        scheduler.step_update(stepper.updates)
        feats = self.frozen_features() if self.use_feature_cache() else None
        y_dev = self.y_t.to(self.rt.device)
        for epoch in range(start_epoch, phase.epochs):
            seed = seed_everything(self.tcfg.seed, self.job.fold, epoch)
            order = self.train_idx[torch.randperm(len(self.train_idx), generator=torch.Generator().manual_seed(seed)).numpy()]
            batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
            frozen_train_mode(self.model)
            lrs = group_lrs(optimizer)
            if feats is not None:
                step = lambda idx: self._head_loss(head, feats[torch.as_tensor(idx, device=feats.device)], y_dev[idx])  # noqa: E731
                stats = run_batches(batches, step, stepper, len(batches), self._desc("frozen", epoch),
                                    self.job.progress)
                with torch.no_grad():
                    valid_logits = head(feats[torch.as_tensor(self.valid_idx, device=feats.device)]).float().cpu()
            else:
                augmented = self.job.cfg.augment.frozen_phase
                loader = self._loader(self._dataset(np.arange(len(self.job.table)), train=augmented),
                                      batch_sampler=[[(int(i), seed) for i in b] for b in batches] if augmented else batches)
                stats = run_batches(loader, lambda b: self._frozen_model_loss(head, b), stepper, len(batches),
                                    self._desc("frozen", epoch), self.job.progress)
                valid_logits = self._predict(self.model, self.valid_idx)[0]
            if self._end_epoch(epoch, "frozen", lrs, stats, valid_logits, optimizer):
                break
        set_frozen(self.model, False)

    def linear_probe_phase(self) -> None:
        """LP-FT: fit the head to convergence on cached features (one history row, epoch 0)."""
        from pipeline.probe import fit_linear_probe

        head = self.model.get_classifier()
        if not isinstance(head, nn.Linear):
            raise PipelineError(f"train.linear_probe needs a plain Linear head; {self.job.bcfg.slug} has "
                                f"{type(head).__name__}. Set train.linear_probe=false")
        set_frozen(self.model, True)
        frozen_train_mode(self.model)
        feats = self.frozen_features()
        start = time.perf_counter()
        tr, va = (torch.as_tensor(i, device=feats.device) for i in (self.train_idx, self.valid_idx))
        weight, bias, strength = fit_linear_probe(self.job.spec, self.loss_fn, feats[tr],
                                                  self.y_t[self.train_idx].to(feats.device),
                                                  seed=self.tcfg.seed + self.job.fold)
        with torch.no_grad():
            head.weight.copy_(weight)
            head.bias.copy_(bias)
            train_loss = float(self.loss_fn(head(feats[tr]).float(), self.y_t[self.train_idx].to(feats.device)))
            valid_logits = head(feats[va]).float().cpu()
        seconds = time.perf_counter() - start
        self.notes.append(f"linear probe: L2 {strength:g} chosen by held-out loss on the train rows, "
                          f"fitted in {seconds:.1f} s")
        stats = {"train_loss": train_loss, "seconds": seconds, "images_per_s": len(tr) / max(seconds, 1e-9)}
        self._end_epoch(0, "frozen", {"lr_head": float("nan"), "lr_backbone": 0.0}, stats, valid_logits, None)
        set_frozen(self.model, False)

    def _head_loss(self, head: nn.Module, feats: torch.Tensor, y: torch.Tensor):
        with self.rt.autocast():
            return self.loss_fn(head(feats), y), len(y)

    def _frozen_model_loss(self, head: nn.Module, batch):
        x, y = batch
        with torch.no_grad(), self.rt.autocast():
            feats = pooled_features(self.model, self.rt.images(x)).float()
        return self._head_loss(head, feats, y.to(self.rt.device))

    # ------------------------------------------------------------------ unfrozen phase
    def unfrozen_phase(self, phase: PhaseConfig, first_epoch: int, start_epoch: int) -> None:
        self.model.train()
        optimizer = build_optimizer(self.model, self.tcfg, phase, frozen=False)
        drop_last = self._mixup() is not None and len(self.train_idx) > self.batch_size
        steps = len(self.train_idx) // self.batch_size if drop_last else -(-len(self.train_idx) // self.batch_size)
        updates_per_epoch = -(-steps // self.tcfg.grad_accum)
        scheduler = build_scheduler(optimizer, phase, updates_per_epoch)
        self.ema = self._make_ema()
        done = start_epoch - first_epoch
        if done > 0:
            self._load_resume(optimizer)
            if self.state["swa_count"]:
                self.swa = checkpoints.read_resume_extra(self.fold_dir / "resume.safetensors")
        swa_from = first_epoch + phase.epochs - self.tcfg.swa_epochs  # train.keep swa: the epochs averaged
        stepper = Stepper(optimizer, scheduler, self.rt, self.tcfg, self.model.parameters(), self.ema,
                          updates_per_epoch, start_update=done * updates_per_epoch)
        stepper.ema_source = self.model
        scheduler.step_update(stepper.updates)
        mixup = self._mixup()
        train_ds = self._dataset(self.train_idx, train=True)
        sampler = SeededSampler(len(train_ds), distributed=distributed.enabled(), drop_last=drop_last)
        loader = self._loader(train_ds, sampler=sampler, drop_last=drop_last, persistent=True)  # one for all epochs
        self.net = self.rt.maybe_compile(self._ddp(self.model))  # forward only; weights saved from self.model
        for epoch in range(start_epoch, first_epoch + phase.epochs):
            seed = seed_everything(self.tcfg.seed, self.job.fold, epoch)
            sampler.set_epoch(seed)
            self._train_mode()
            lrs = group_lrs(optimizer)
            stats = run_batches(loader, lambda b: self._model_loss(b, mixup), stepper, len(loader),
                                self._desc("unfrozen", epoch), self.job.progress)
            if self.tcfg.keep == "swa" and epoch >= swa_from:
                self._swa_update()
            valid_logits = self._predict(self.eval_model, self.valid_idx)[0]
            if self._end_epoch(epoch, "unfrozen", lrs, stats, valid_logits, optimizer):
                if epoch < first_epoch + phase.epochs - 1:
                    print(f"fold {self.job.fold}: early stopping after epoch {epoch}")
                break

    def _swa_update(self) -> None:
        """Fold this epoch's evaluated weights into the running average (float tensors only)."""
        n = self.state["swa_count"]
        current = {k: v.detach().float().clone() for k, v in self.eval_model.state_dict().items()
                   if v.is_floating_point()}
        if self.swa is None:
            self.swa = current
        else:
            for k, v in current.items():
                self.swa[k] += (v - self.swa[k]) / (n + 1)
        self.state["swa_count"] = n + 1

    def _finish_swa(self) -> None:
        """``train.keep: swa``: the averaged weights, with BatchNorm statistics recomputed for them on
        the fold's train images (unless ``train.freeze_bn`` keeps them fixed), become the kept model,
        scored on the validation rows like an epoch."""
        model = self.eval_model
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.swa.items()}, strict=False)
        if not self.tcfg.freeze_bn:
            loader = self._loader(self._dataset(self.train_idx, train=False))
            with torch.no_grad(), self.rt.autocast():
                adapt_batchnorm(model, (self.rt.images(x) for x, _ in loader))
        self._keep(model)
        value = score(self.metric, self.job.spec, self.y[self.valid_idx],
                      self.job.spec.activate(self._predict(model, self.valid_idx)[0].numpy()))
        self.state["kept"] = f"swa of {self.state['swa_count']} unfrozen epochs"
        self.state["kept_score"] = value

    def _train_mode(self) -> None:
        self.model.train()
        if self.tcfg.freeze_bn:
            freeze_batchnorm_stats(self.model)

    def _model_loss(self, batch, mixup):
        x, y = batch
        x, y = self.rt.images(x), y.to(self.rt.device, non_blocking=True)
        if mixup is not None:
            x, y = mixup(x, y.long())
        with self.rt.autocast():
            loss = self.loss_fn(self.net(x), y)
        if self.batch_losses is not None:  # the finetune benchmark's record (a device sync per batch)
            self.batch_losses.append(float(loss.detach()))
        return loss, len(x)

    def _ddp(self, model: nn.Module) -> nn.Module:
        if not distributed.enabled():
            return model
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[self.rt.device.index] if self.rt.cuda else None)

    def _mixup(self):
        t = self.tcfg
        if t.mixup_alpha <= 0 and t.cutmix_alpha <= 0:
            return None
        if self.job.spec.task != "multiclass":
            raise PipelineError(f"train.mixup_alpha/cutmix_alpha apply to multiclass tasks; task is {self.job.spec.task}")
        from timm.data import Mixup
        return Mixup(mixup_alpha=t.mixup_alpha, cutmix_alpha=t.cutmix_alpha, prob=t.mixup_prob,
                     label_smoothing=t.label_smoothing, num_classes=self.job.spec.num_outputs)

    def _make_ema(self):
        if not self.tcfg.ema:
            return None
        from timm.utils import ModelEmaV3
        # warmup: decay 1 - (1 + update)^(-2/3), capped at ema_decay, so that a short run's EMA follows
        # the fine-tuning (with a fixed 0.998, after 50 updates it is still 90% the weights of update 1)
        return ModelEmaV3(self.model, decay=self.tcfg.ema_decay, use_warmup=True)

    def _load_resume(self, optimizer) -> None:
        checkpoints.load_resume(self.fold_dir / "resume.safetensors", self.model, optimizer,
                                self.ema.module if self.ema is not None else None, self.rt.scaler)

    # ------------------------------------------------------------------ predictions
    def _predict(self, model: nn.Module, rows: np.ndarray, test: bool = False, views=("identity",)):
        """Logits per view for ``rows`` (sharded over DDP ranks and gathered back in order). On a GPU
        every view of a batch goes in one forward pass of up to twice :attr:`eval_batch_size`
        images; on a CPU passes of the training batch are faster (BENCHMARKS.md, input: 128-image
        passes ran at 0.73x a bare forward, 32-image ones at about 1x)."""
        max_images = 2 * self.eval_batch_size if self.rt.cuda else self.batch_size
        logits = predict_logits(model, self._eval_loader(rows, test), self.rt, views, max_images=max_images)
        return [distributed.gather_rows(v) for v in logits]

    def _eval_loader(self, rows: np.ndarray, test: bool):
        """One evaluation loader per row set for the fold's lifetime: the validation rows are
        predicted after every epoch, by the same (persistent) workers."""
        loaders = self.__dict__.setdefault("_eval_loaders", {})
        key = (test, np.asarray(rows).tobytes())
        if key not in loaders:
            loaders[key] = self._loader(self._dataset(distributed.shard(rows), train=False, test=test), persistent=True)
        return loaders[key]

    def _desc(self, phase: str, epoch: int) -> str:
        return f"{self.job.bcfg.slug} fold {self.job.fold} {phase} epoch {epoch}"

    def _load_best(self) -> None:
        target = self.ema.module if self.ema is not None else self.model
        if self.best_in_memory is None and self.fold_dir is not None and (self.fold_dir / "best.safetensors").exists():
            checkpoints.load_weights(self.fold_dir / "best.safetensors", target)
        elif self.best_in_memory is not None:
            target.load_state_dict(self.best_in_memory)
        self.final_model = target

    def predictions(self) -> tuple[pd.DataFrame, pd.DataFrame | None]:
        """OOF (validation rows) and test predictions of the best weights, averaged over TTA views."""
        spec, views, id_col = self.job.spec, self.job.cfg.augment.tta, self.job.cfg.data.id_column
        if self.frozen_only():
            return self._head_predictions()
        logits = self._predict(self.final_model, self.valid_idx, views=views)
        ids = self.job.table[id_col].to_numpy()[self.valid_idx]
        oof = spec.predictions_frame(ids, activate_mean(spec, logits), id_col)
        oof.insert(1, "fold", self.job.fold)
        test = None
        if self.job.test is not None:
            logits = self._predict(self.final_model, np.arange(len(self.job.test)), test=True, views=views)
            test = spec.predictions_frame(self.job.test[id_col], activate_mean(spec, logits), id_col)
        self.__dict__.pop("_eval_loaders", None)  # the fold's last pass: its loader workers can go
        return oof, test

    @torch.no_grad()
    def _head_predictions(self) -> tuple[pd.DataFrame, pd.DataFrame | None]:
        """:meth:`predictions` of a frozen-only model from cached per-view features: the backbone
        sees each image and view once per backbone, not once per fold."""
        spec, views, id_col = self.job.spec, self.job.cfg.augment.tta, self.job.cfg.data.id_column
        head = self.final_model.get_classifier().eval()
        rows = torch.as_tensor(self.valid_idx)

        def logits(view: str, test: bool, rows=None) -> torch.Tensor:
            feats = self.frozen_features(view, test)
            return head(feats if rows is None else feats[rows.to(feats.device)]).float().cpu()

        oof = spec.predictions_frame(self.job.table[id_col].to_numpy()[self.valid_idx],
                                     activate_mean(spec, [logits(v, False, rows) for v in views]), id_col)
        oof.insert(1, "fold", self.job.fold)
        test = None
        if self.job.test is not None:
            test = spec.predictions_frame(self.job.test[id_col], activate_mean(spec, [logits(v, True) for v in views]),
                                          id_col)
        return oof, test

    # ------------------------------------------------------------------ the fold
    def run(self) -> FoldResult:
        train = self.tcfg
        n_frozen, n_unfrozen = (1 if train.linear_probe else train.frozen.epochs), train.unfrozen.epochs
        self._resume()
        start = self.state["epoch"] + 1
        if self.fold_dir is not None and start > 0 and start >= n_frozen:  # frozen phase already done
            checkpoints.load_resume(self.fold_dir / "resume.safetensors", self.model, None, scaler=self.rt.scaler)
        if start < n_frozen and train.linear_probe:
            self.linear_probe_phase()
            start = self.state["epoch"] + 1
        elif start < n_frozen:
            self.frozen_phase(train.frozen, start)
            start = self.state["epoch"] + 1
        if n_unfrozen > 0 and start < n_frozen + n_unfrozen and not self._stopped_early():
            self.unfrozen_phase(train.unfrozen, n_frozen, max(start, n_frozen))
        if train.keep == "swa" and self.state["swa_count"]:
            if self.swa is None:  # resumed after the last epoch
                self.swa = checkpoints.read_resume_extra(self.fold_dir / "resume.safetensors")
            self._finish_swa()
        elif self.state["best_epoch"] < 0:  # no epoch ran: the initial weights are the best we have
            self._keep(self.model)
        self._describe_kept()
        self._load_best()
        oof = test = None
        if self.fold_dir is not None or self.job.test is not None:
            oof, test = self.predictions()
        return FoldResult(self.state.get("kept_score", self.state["best"]), self.state["best_epoch"],
                          self.state["history"], oof, test, self.notes, self.state.get("kept", ""))

    def _describe_kept(self) -> None:
        """Which weights the fold keeps (``train.keep``), their validation score, and a note when the
        unfrozen phase ended below the frozen head it started from."""
        history, key = self.state["history"], f"valid_{self.metric.name}"
        if not history:
            return
        frozen = [row[key] for row in history if row["phase"] == "frozen"]
        unfrozen = [row[key] for row in history if row["phase"] == "unfrozen"]
        head = "linear probe" if self.tcfg.linear_probe else "frozen head"
        if self.tcfg.keep == "best":
            best = history[[row["epoch"] for row in history].index(self.state["best_epoch"])]
            self.state.update(kept=f"epoch {best['epoch']} ({best['phase']})", kept_score=best[key])
        elif self.tcfg.keep == "last" or not self.state["swa_count"]:
            self.state.update(kept=f"epoch {history[-1]['epoch']} ({history[-1]['phase']}, last)",
                              kept_score=history[-1][key])
        if not (frozen and unfrozen):
            return
        probe = frozen[-1]
        if self.tcfg.keep == "best" and self.state["kept"].endswith("(frozen)"):
            self.notes.append(f"fold {self.job.fold}: no unfrozen epoch beat the {head} on the validation rows "
                              f"({self.metric.name} {probe:.4f}); the {head} is kept")
        elif self.tcfg.keep != "best" and not self.metric.better(self.state["kept_score"], probe):
            self.notes.append(f"fold {self.job.fold}: the kept weights ({self.state['kept']}) score "
                              f"{self.state['kept_score']:.4f} on the validation rows, below the {head}'s {probe:.4f}")

    def _stopped_early(self) -> bool:
        patience = self.tcfg.early_stopping_patience
        unfrozen = sum(row["phase"] == "unfrozen" for row in self.state["history"])
        return (patience is not None and self.state["bad_epochs"] >= patience
                and unfrozen >= self.tcfg.min_unfrozen_epochs)


class _Subset:
    """Rows of an :class:`ImageCache` by index."""

    def __init__(self, cache, rows):
        self.cache, self.rows = cache, np.asarray(rows)

    def __getitem__(self, i):
        return self.cache[self.rows[i]]


def _seed_worker(worker_id: int) -> None:
    """NumPy's global state per worker (augmentations are seeded per row, by SeededSampler)."""
    np.random.seed(torch.utils.data.get_worker_info().seed % 2**32)


def train_fold(job: FoldJob) -> FoldResult:
    """Train one fold (resuming when a matching resume file exists); write its files."""
    trainer = FoldTrainer(job)
    try:
        result = trainer.run()
    except NonFiniteLoss as exc:  # say what is kept: nothing when the first epoch already diverged
        epochs = len(trainer.state["history"])
        kept = (f"the last good epoch ({trainer.state['epoch']}) is kept in {job.out_dir}" if epochs and job.out_dir
                else "no epoch finished, so no checkpoint was kept")
        raise NonFiniteLoss(f"{exc}; {kept}") from None
    if job.out_dir is not None and distributed.is_main():
        artifacts.write_csv(job.out_dir / "oof.csv", result.oof)
        artifacts.write_json(job.out_dir / "kept.json", {"kept": result.kept, "keep": job.cfg.train.keep,
                                                         "valid_score": result.best_score, "notes": result.notes,
                                                         # what `predict` needs besides the weights: classes,
                                                         # and a regression fold's target scaling
                                                         "spec": dataclasses.asdict(trainer.job.spec)})
        if result.test is not None:
            artifacts.write_csv(job.out_dir / "test.csv", result.test)
        artifacts.mark_done(_fold_outputs(job.out_dir, job.test is not None), job.digest)
        (job.out_dir / "resume.safetensors").unlink(missing_ok=True)
    return result


def _fold_outputs(fold_dir: Path, with_test: bool) -> list[Path]:
    outs = [fold_dir / "oof.csv", fold_dir / "history.csv", fold_dir / "best.safetensors", fold_dir / "kept.json"]
    return outs + [fold_dir / "test.csv"] if with_test else outs


# ----------------------------------------------------------------------------- the stage


RUN_ONLY_KEYS = ("num_workers", "use_tuned", "device")  # train.* keys that change how, not what


def result_train_config(cfg: Config) -> dict:
    """``cfg.train`` as a dict without the keys that cannot change a result (for fingerprints)."""
    return {k: v for k, v in dataclasses.asdict(cfg.train).items() if k not in RUN_ONLY_KEYS}


def fold_digest(cfg: Config, bcfg: BackboneConfig, fold: int) -> str:
    """What a fold's result depends on: data, folds, task, metric, training and augmentation."""
    paths = Paths(cfg)
    train = result_train_config(cfg)
    part = {"data": dataclasses.asdict(cfg.data), "metric": cfg.metric, "train": train,
            "augment": dataclasses.asdict(cfg.augment), "backbone": dataclasses.asdict(bcfg), "fold": fold,
            "lr_schedule": LR_SCHEDULE}
    inputs = [paths.folds_csv, paths.sample_submission] + ([paths.train_csv] if paths.train_csv else [])
    if bcfg.weights.startswith(PRETRAINED):  # a re-run of the pretrain stage retrains the folds
        inputs.append(pretrained_file(bcfg.weights, paths.exp_dir))
    if cfg.train.pseudo_labels:  # a changed pseudo-label set retrains the folds
        inputs.append(Path(cfg.train.pseudo_labels))
    return artifacts.fingerprint(part, inputs)


def fold_is_done(cfg: Config, bcfg: BackboneConfig, fold: int) -> bool:
    fold_dir = Paths(cfg).fold_dir(bcfg.slug, fold)
    return artifacts.is_up_to_date(_fold_outputs(fold_dir, True), fold_digest(cfg, bcfg, fold))


def total_epochs(train) -> int:
    """Epochs a fold runs: the frozen ones (one for a linear probe) plus the unfrozen ones."""
    return (1 if train.linear_probe else train.frozen.epochs) + train.unfrozen.epochs


def aggregate_backbone(cfg: Config, bcfg: BackboneConfig, spec: TaskSpec, table: pd.DataFrame,
                       test: pd.DataFrame, tuned_folds: list[int] | None = None) -> dict:
    """Per-backbone ``oof.csv`` (every train row once), fold-averaged ``test.csv``, ``cv.json``.

    Two selections on validation rows make a CV optimistic, and cv.json says which happened:
    ``train.keep: best`` picks each fold's epoch by its own validation score (``selection``), and
    a tune study picked the LRs on ``tuned_folds``; ``cv_untuned`` is the mean over the other folds."""
    paths, id_col, metric = Paths(cfg), cfg.data.id_column, get_metric(cfg.metric, spec.task)
    n = cfg.folds.n_splits
    oofs = [pd.read_csv(paths.fold_dir(bcfg.slug, k) / "oof.csv", dtype={id_col: str}, keep_default_na=False)
            for k in range(n)]  # keep_default_na=False: an id 'NA' is an id
    oof = pd.concat(oofs, ignore_index=True).set_index(id_col)
    ids = table[id_col].astype(str)
    if oof.index.duplicated().any() or set(oof.index) != set(ids):
        raise PipelineError(f"fold OOF files of {bcfg.slug} do not cover every train row exactly once; "
                            f"re-run `make train-folds ARGS=--force`")
    oof = oof.loc[ids].reset_index()
    tests = [spec.predictions_from_frame(pd.read_csv(paths.fold_dir(bcfg.slug, k) / "test.csv", dtype={id_col: str},
                                                       keep_default_na=False))
             for k in range(n)]
    test_frame = spec.predictions_frame(test[id_col], np.mean(tests, axis=0), id_col)
    y = spec.encode(table)
    preds = spec.predictions_from_frame(oof)
    fold_scores = [score(metric, spec, y[table["fold"].to_numpy() == k], preds[table["fold"].to_numpy() == k])
                   for k in range(n)]
    finite = lambda v: float(v) if np.isfinite(v) else None  # noqa: E731  (JSON has no NaN)
    cv = {"metric": metric.name, "greater_is_better": metric.greater_is_better,
          "folds": [finite(v) for v in fold_scores], "oof": finite(score(metric, spec, y, preds)),
          "cv_mean": finite(np.nanmean(fold_scores)), "cv_std": finite(np.nanstd(fold_scores))}
    untouched = [s for k, s in enumerate(fold_scores) if k not in (tuned_folds or [])]
    kept = [artifacts.read_json(paths.fold_dir(bcfg.slug, k) / "kept.json")["kept"] for k in range(n)]
    cv.update(tuned_folds=sorted(tuned_folds or []),
              cv_untuned=finite(np.nanmean(untouched)) if untouched else None,
              keep=cfg.train.keep, kept=kept,
              selection=("optimistic: each fold's epoch was picked on its own validation rows"
                         if cfg.train.keep == "best" and total_epochs(cfg.train) > 1 else
                         "none: the kept weights were fixed before the validation rows were scored"))
    artifacts.write_csv(paths.oof_csv(bcfg.slug), oof)
    artifacts.write_csv(paths.test_csv(bcfg.slug), test_frame)
    artifacts.write_json(paths.cv_json(bcfg.slug), cv)
    return cv


def aggregate_seed_mean(cfg: Config, group: str, members: list[BackboneConfig], spec: TaskSpec,
                       table: pd.DataFrame) -> dict:
    """A ``seeds:`` entry's model: the mean of its variants' ``oof.csv`` and ``test.csv`` under
    ``runs/<exp>/<group>/``, scored like a backbone (no fitting: as honest as its members)."""
    paths, id_col, metric = Paths(cfg), cfg.data.id_column, get_metric(cfg.metric, spec.task)
    frames = [pd.read_csv(paths.oof_csv(m.slug), dtype={id_col: str}, keep_default_na=False) for m in members]
    tests = [pd.read_csv(paths.test_csv(m.slug), dtype={id_col: str}, keep_default_na=False) for m in members]
    oof = spec.predictions_frame(frames[0][id_col], np.mean([spec.predictions_from_frame(f) for f in frames], axis=0),
                                 id_col)
    oof.insert(1, "fold", frames[0]["fold"])
    test = spec.predictions_frame(tests[0][id_col], np.mean([spec.predictions_from_frame(f) for f in tests], axis=0),
                                  id_col)
    folds, y, preds = oof["fold"].to_numpy(), spec.encode(table), spec.predictions_from_frame(oof)
    finite = lambda v: float(v) if np.isfinite(v) else None  # noqa: E731  (JSON has no NaN)
    fold_scores = [score(metric, spec, y[folds == k], preds[folds == k]) for k in range(cfg.folds.n_splits)]
    member_cvs = [artifacts.read_json(paths.cv_json(m.slug)) for m in members]
    tuned = sorted({k for cv in member_cvs for k in cv.get("tuned_folds", [])})
    untouched = [s for k, s in enumerate(fold_scores) if k not in tuned]
    cv = {"metric": metric.name, "greater_is_better": metric.greater_is_better,
          "folds": [finite(v) for v in fold_scores], "oof": finite(score(metric, spec, y, preds)),
          "cv_mean": finite(np.nanmean(fold_scores)), "cv_std": finite(np.nanstd(fold_scores)),
          "members": [m.slug for m in members], "tuned_folds": tuned,
          "cv_untuned": finite(np.nanmean(untouched)) if untouched else None,
          "keep": member_cvs[0].get("keep"), "selection": member_cvs[0].get("selection", "")}
    if (table[id_col].astype(str).to_numpy() != oof[id_col].to_numpy(str)).any():
        raise PipelineError(f"the OOF files of {group}'s seeds list other rows; re-run `make train-folds ARGS=--force`")
    artifacts.write_csv(paths.oof_csv(group), oof)
    artifacts.write_csv(paths.test_csv(group), test)
    artifacts.write_json(paths.cv_json(group), cv)
    return cv


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
    artifacts.remove_stale_temps(paths.exp_dir, recursive=True)
    if main:  # everything is valid: the next train run (or fold process) skips decoding these images
        record_verified(table, verified_dir(cfg))
        record_verified(test, verified_dir(cfg))
    for entry in backbones:
        bcfg_cfg, bcfg = cfg.variant(entry)
        bcfg_cfg, source = apply_tuned(bcfg_cfg, bcfg)
        bcfg_cfg, plan = planned_config(bcfg_cfg, bcfg, spec, spec.encode(table), len(test), max(jobs, gpus))
        bdir = paths.backbone_dir(bcfg.slug)
        if main:
            _write_resolved(bcfg_cfg, bcfg, source, bdir)
            tracking.begin_model(bcfg_cfg, bcfg)  # tracking.backend: the run, before any fold trains
        print(f"{bcfg.slug}: LRs from {source['lr_source']} (frozen {bcfg_cfg.train.frozen.lr:.2e}, unfrozen "
              f"{bcfg_cfg.train.unfrozen.lr:.2e} x{bcfg_cfg.train.unfrozen.backbone_lr_mult:.3g} for the backbone)")
        todo = [k for k in ([fold] if fold is not None else range(cfg.folds.n_splits))
                if force or not fold_is_done(bcfg_cfg, bcfg, k)]
        n_jobs = plan.jobs if plan is not None else jobs
        if n_jobs > 1 and len(todo) > 1:
            _train_parallel(bcfg, todo, n_jobs, bdir / "config.yaml", force)
        else:
            for k in todo:  # a fold that another run is training is skipped (pipeline.locks)
                with locks.hold(paths.fold_dir(bcfg.slug, k), f"fold {k} of {bcfg.slug}", "is being trained") as held:
                    if held and (force or not fold_is_done(bcfg_cfg, bcfg, k)):  # done by it meanwhile: skip
                        _train_one(bcfg_cfg, bcfg, spec, fit_table, test, k)
                distributed.barrier()
        if main and all(fold_is_done(bcfg_cfg, bcfg, k) for k in range(cfg.folds.n_splits)):
            tuned_folds = list(cfg.tune.folds) if "tuned" in source else []
            cv = aggregate_backbone(bcfg_cfg, bcfg, spec, table, test, tuned_folds)
            tracking.end_model(bcfg_cfg, bcfg, cv)
            print(f"{bcfg.slug}: CV {cv['metric']} {_fmt(cv['cv_mean'])} +- {_fmt(cv['cv_std'])}, OOF {_fmt(cv['oof'])} "
                  f"-> {paths.cv_json(bcfg.slug)}\n  {honesty_note(cv)}")
    for group, members in cfg.seed_groups().items():  # not in a --fold child: its config holds one variant
        if (main and fold is None and any(m in backbones for m in members)
                and all(paths.cv_json(m.slug).exists() for m in members)):
            cv = aggregate_seed_mean(cfg, group, members, spec, table)
            print(f"{group}: mean of seeds {', '.join(m.slug for m in members)}: CV {cv['metric']} "
                  f"{_fmt(cv['cv_mean'])} +- {_fmt(cv['cv_std'])}, OOF {_fmt(cv['oof'])} -> {paths.cv_json(group)}")
    return paths.exp_dir


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def honesty_note(cv: dict) -> str:
    """One line on how far a backbone's CV can be trusted: epoch selection and tuning folds."""
    parts = [f"epoch selection {cv['selection']}"]
    if cv.get("tuned_folds"):
        parts.append(f"the LRs were tuned on folds {cv['tuned_folds']}, which are inside this CV; "
                     f"the untouched folds score {_fmt(cv['cv_untuned'])}")
    return "; ".join(parts)


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


def _train_one(cfg: Config, bcfg: BackboneConfig, spec, table, test, k: int) -> FoldResult:
    paths = Paths(cfg)
    fold_dir = paths.fold_dir(bcfg.slug, k)
    if distributed.is_main():
        artifacts.write_text(fold_dir / "config.yaml", dump_config(cfg.replace(backbones=[bcfg])))
    start = time.perf_counter()
    job = FoldJob(cfg, bcfg, spec, table, k, test, fold_dir, fold_digest(cfg, bcfg, k),
                  feature_cache_dir=paths.feature_cache_dir(bcfg.slug))
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
