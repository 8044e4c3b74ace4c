"""One fold's training: the frozen head (or linear probe), then the whole network, then
predictions. :class:`FoldTrainer` coordinates; read its ``run`` first."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline.config.paths import Paths
from pipeline.config.schema import BackboneConfig, Config, PhaseConfig
from pipeline.core import artifacts, distributed, locks
from pipeline.core.errors import PipelineError
from pipeline.data.cache import ImageCache
from pipeline.data.datasets import CacheRows, ImageDataset, SeededSampler, seed_worker
from pipeline.data.images import PATH
from pipeline.domain.metrics import get_metric
from pipeline.domain.tasks import TaskSpec
from pipeline.domain.transforms import eval_transform, train_transform
from pipeline.engine import checkpoints
from pipeline.engine.backbones import (
    adapt_batchnorm,
    create_backbone,
    data_config,
    freeze_batchnorm_stats,
    frozen_train_mode,
    pooled_features,
    set_frozen,
)
from pipeline.engine.features import cached_features, compute_features
from pipeline.engine.fit import (
    NonFiniteLoss,
    Runtime,
    Stepper,
    activate_mean,
    build_optimizer,
    build_scheduler,
    default_workers,
    group_lrs,
    make_loss,
    predict_logits,
    run_batches,
    score,
    seed_everything,
)
from pipeline.training.fingerprint import fold_outputs

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
        # fold < 0: a pseudo-labelled test row (training.pseudo_labels) that trains fold -1 - fold only, never validates
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
                            None if cache is None else CacheRows(cache, rows), decode=(size, aug.resize))

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
            kwargs.update(worker_init_fn=seed_worker, prefetch_factor=4)
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
        from pipeline.engine.probe import fit_linear_probe

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
        artifacts.mark_done(fold_outputs(job.out_dir, job.test is not None), job.digest)
        (job.out_dir / "resume.safetensors").unlink(missing_ok=True)
    return result
