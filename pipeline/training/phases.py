"""The phases of a fold, each a loop you can read top to bottom: the frozen head (on cached
features, or through the frozen model when it augments), the linear probe (LP-FT), and the
unfrozen network (EMA, mixup/cutmix, DDP, SWA).

Each takes the fold's :class:`~pipeline.training.trainer.FoldTrainer` (``trainer``), whose public
parts they use: the model and runtime, the fold's data and state, and ``end_epoch``.
"""
from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from pipeline.config.schema import PhaseConfig, TrainConfig
from pipeline.core import distributed
from pipeline.core.errors import PipelineError
from pipeline.data.datasets import SeededSampler
from pipeline.engine.backbones import freeze_batchnorm_stats, frozen_train_mode, pooled_features, set_frozen
from pipeline.engine.fit import (
    Stepper,
    build_optimizer,
    build_scheduler,
    group_lrs,
    pass_losses,
    run_batches,
    seed_everything,
)
from pipeline.engine.probe import fit_linear_probe

NO_LRS = {"lr_head": float("nan"), "lr_backbone": 0.0}  # the linear probe's history row: no LR


def frozen(trainer, phase: PhaseConfig, start_epoch: int) -> None:
    """The head's epochs on the frozen backbone, from ``start_epoch`` (resumed) on."""
    model, data, tcfg, rt = trainer.model, trainer.data, trainer.tcfg, trainer.rt
    set_frozen(model, True)
    head = model.get_classifier()
    optimizer = build_optimizer(model, tcfg, phase, frozen=True)
    updates = data.updates_per_epoch()
    scheduler = build_scheduler(optimizer, phase, updates)
    if start_epoch > 0:
        trainer.state.load_resume(model, optimizer, scaler=rt.scaler)
    stepper = Stepper(optimizer, scheduler, rt, tcfg, head.parameters(), steps_per_epoch=updates,
                      start_update=start_epoch * updates)
    scheduler.step_update(stepper.updates)
    feats = trainer.frozen_features() if trainer.use_feature_cache() else None
    y_dev = data.y_t.to(rt.device)
    for epoch in range(start_epoch, phase.epochs):
        seed = seed_everything(tcfg.seed, trainer.job.fold, epoch)
        order = data.train_idx[torch.randperm(len(data.train_idx),
                                              generator=torch.Generator().manual_seed(seed)).numpy()]
        batches = [order[i:i + data.batch_size] for i in range(0, len(order), data.batch_size)]
        frozen_train_mode(model)
        lrs = group_lrs(optimizer)
        desc = trainer.desc("frozen", epoch)
        if feats is not None:
            step = lambda idx: head_loss(trainer, head, feats[torch.as_tensor(idx, device=feats.device)], y_dev[idx])  # noqa: E731
            stats = run_batches(batches, step, stepper, len(batches), desc, trainer.job.progress)
            with torch.no_grad():
                valid_logits = head(feats[torch.as_tensor(data.valid_idx, device=feats.device)]).float().cpu()
        else:
            augmented = trainer.job.cfg.augment.frozen_phase
            loader = data.loader(data.dataset(np.arange(len(trainer.job.table)), train=augmented),
                                 batch_sampler=[[(int(i), seed) for i in b] for b in batches] if augmented else batches)
            stats = run_batches(loader, lambda b: frozen_model_loss(trainer, head, b), stepper, len(batches), desc,
                                trainer.job.progress)
            valid_logits = trainer.predict(model, data.valid_idx)[0]
        if trainer.end_epoch(epoch, "frozen", lrs, stats, valid_logits, optimizer):
            break
    set_frozen(model, False)


def linear_probe(trainer) -> None:
    """LP-FT: fit the head to convergence on cached features (one history row, epoch 0)."""
    model, data = trainer.model, trainer.data
    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise PipelineError(f"train.linear_probe needs a plain Linear head; {trainer.job.bcfg.slug} has "
                            f"{type(head).__name__}. Set train.linear_probe=false")
    set_frozen(model, True)
    frozen_train_mode(model)
    feats = trainer.frozen_features()
    views = [feats if v == "identity" else trainer.frozen_features(v) for v in trainer.tcfg.probe_views]
    start = time.perf_counter()
    tr, va = (torch.as_tensor(i, device=feats.device) for i in (data.train_idx, data.valid_idx))
    y_train = data.y_t[data.train_idx].to(feats.device)
    weight, bias, strength = fit_linear_probe(trainer.job.spec, trainer.loss_fn, [v[tr] for v in views], y_train,
                                              seed=trainer.tcfg.seed + trainer.job.fold)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
        train_loss = float(trainer.loss_fn(head(feats[tr]).float(), y_train))
        valid_logits = head(feats[va]).float().cpu()
    seconds = time.perf_counter() - start
    on = "" if len(views) == 1 else f" on {len(views)} views ({', '.join(trainer.tcfg.probe_views)})"
    trainer.notes.append(f"linear probe{on}: L2 {strength:g} chosen by held-out loss on the train rows, "
                         f"fitted in {seconds:.1f} s")
    stats = {"train_loss": train_loss, "seconds": seconds, "images_per_s": len(tr) / max(seconds, 1e-9)}
    trainer.end_epoch(0, "frozen", NO_LRS, stats, valid_logits, None)
    set_frozen(model, False)


def head_loss(trainer, head: nn.Module, feats: torch.Tensor, y: torch.Tensor):
    with trainer.rt.autocast():
        return trainer.loss_fn(head(feats), y), len(y)


def frozen_model_loss(trainer, head: nn.Module, batch):
    x, y = batch
    with torch.no_grad(), trainer.rt.autocast():
        feats = pooled_features(trainer.model, trainer.rt.images(x)).float()
    return head_loss(trainer, head, feats, y.to(trainer.rt.device))


def unfrozen(trainer, phase: PhaseConfig, first_epoch: int, start_epoch: int) -> None:
    """The whole network's epochs ``first_epoch ..``, from ``start_epoch`` (resumed) on."""
    model, data, tcfg, rt, state = trainer.model, trainer.data, trainer.tcfg, trainer.rt, trainer.state
    model.train()
    optimizer = build_optimizer(model, tcfg, phase, frozen=False)
    mixup = make_mixup(tcfg, trainer.job.spec)
    drop_last = mixup is not None and len(data.train_idx) > data.batch_size
    updates = data.updates_per_epoch(drop_last)
    scheduler = build_scheduler(optimizer, phase, updates)
    trainer.ema = make_ema(tcfg, model)
    done = start_epoch - first_epoch
    if done > 0:
        state.load_resume(model, optimizer, trainer.ema_module, rt.scaler)
        if state.swa_count:
            state.swa_average()
    swa_from = first_epoch + phase.epochs - tcfg.swa_epochs  # train.keep swa: the epochs averaged
    stepper = Stepper(optimizer, scheduler, rt, tcfg, model.parameters(), trainer.ema, updates,
                      start_update=done * updates)
    stepper.ema_source = model
    scheduler.step_update(stepper.updates)
    train_ds = data.dataset(data.train_idx, train=True)
    sampler = SeededSampler(len(train_ds), distributed=distributed.enabled(), drop_last=drop_last)
    loader = data.loader(train_ds, sampler=sampler, drop_last=drop_last, persistent=True)  # one for all epochs
    net = rt.maybe_compile(ddp(model, rt))  # forward only; weights are saved from the model itself
    for epoch in range(start_epoch, first_epoch + phase.epochs):
        seed = seed_everything(tcfg.seed, trainer.job.fold, epoch)
        sampler.set_epoch(seed)
        train_mode(model, tcfg)
        lrs = group_lrs(optimizer)
        stats = run_batches(loader, lambda b: model_loss(trainer, net, b, mixup), stepper, len(loader),
                            trainer.desc("unfrozen", epoch), trainer.job.progress)
        if tcfg.keep == "swa" and epoch >= swa_from:
            trainer.swa_update()
        valid_logits = trainer.predict(trainer.eval_model, data.valid_idx)[0]
        if trainer.end_epoch(epoch, "unfrozen", lrs, stats, valid_logits, optimizer):
            if epoch < first_epoch + phase.epochs - 1:
                print(f"fold {trainer.job.fold}: early stopping after epoch {epoch}")
            break


def train_mode(model: nn.Module, tcfg: TrainConfig) -> None:
    """The unfrozen phase's mode: everything trains, BatchNorm statistics too unless ``train.freeze_bn``."""
    model.train()
    if tcfg.freeze_bn:
        freeze_batchnorm_stats(model)


def model_loss(trainer, net, batch, mixup):
    """The batch's loss and images, or on a CPU an iterator over its passes
    (:meth:`~pipeline.engine.fit.Runtime.train_chunk`): each pass's loss, images and share."""
    x, y = batch
    x, y = trainer.rt.images(x), y.to(trainer.rt.device, non_blocking=True)
    if mixup is not None:
        x, y = mixup(x, y.long())
    chunk = trainer.rt.train_chunk(trainer.model, x)
    if chunk is not None:
        return chunk_losses(trainer, net, x, y, chunk)
    with trainer.rt.autocast():
        loss = trainer.loss_fn(net(x), y)
    if trainer.batch_losses is not None:  # the finetune benchmark's record (a device sync per batch)
        trainer.batch_losses.append(float(loss.detach()))
    return loss, len(x)


def chunk_losses(trainer, net, x, y, chunk: int):
    """One batch in passes of ``chunk`` images: each pass's loss (a mean over its rows), images
    and share of the batch, its backward taken before the next pass's forward."""
    batch_loss = 0.0
    for loss, n, share in pass_losses(trainer.rt, trainer.loss_fn, net, x, y, chunk):
        yield loss, n, share
        if trainer.batch_losses is not None:
            batch_loss += float(loss.detach()) * share
    if trainer.batch_losses is not None:
        trainer.batch_losses.append(batch_loss)


def ddp(model: nn.Module, rt) -> nn.Module:
    if not distributed.enabled():
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[rt.device.index] if rt.cuda else None)


def make_mixup(tcfg: TrainConfig, spec):
    if tcfg.mixup_alpha <= 0 and tcfg.cutmix_alpha <= 0:
        return None
    if spec.task != "multiclass":
        raise PipelineError(f"train.mixup_alpha/cutmix_alpha apply to multiclass tasks; task is {spec.task}")
    from timm.data import Mixup
    return Mixup(mixup_alpha=tcfg.mixup_alpha, cutmix_alpha=tcfg.cutmix_alpha, prob=tcfg.mixup_prob,
                 label_smoothing=tcfg.label_smoothing, num_classes=spec.num_outputs)


def make_ema(tcfg: TrainConfig, model: nn.Module):
    if not tcfg.ema:
        return None
    from timm.utils import ModelEmaV3
    # warmup: decay 1 - (1 + update)^(-2/3), capped at ema_decay, so that a short run's EMA follows
    # the fine-tuning (with a fixed 0.998, after 50 updates it is still 90% the weights of update 1)
    return ModelEmaV3(model, decay=tcfg.ema_decay, use_warmup=True)
