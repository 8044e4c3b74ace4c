"""A fold's data: which rows train and validate, their targets, datasets and loaders.

Pseudo-labelled test rows (``train.pseudo_labels``) carry fold ``-1 - k``: they train fold k only
and never validate. The image cache (``train.cache_images``) and the evaluation loaders are owned
here, for the fold's lifetime.
"""
from __future__ import annotations

import numpy as np
import torch

from pipeline.config.paths import Paths
from pipeline.core import distributed, locks
from pipeline.core.errors import PipelineError
from pipeline.data.cache import ImageCache
from pipeline.data.datasets import CacheRows, ImageDataset, seed_worker
from pipeline.data.images import PATH
from pipeline.domain.transforms import eval_transform, scaled_side, train_transform
from pipeline.engine.fit import Runtime, default_workers


def updates_per_epoch(rows: int, batch_size: int, grad_accum: int, drop_last: bool = False) -> int:
    """Optimizer updates in one epoch of ``rows``: the Stepper steps every ``grad_accum`` batches,
    and a short last batch counts unless it is dropped."""
    batches = rows // batch_size if drop_last else -(-rows // batch_size)
    return -(-batches // grad_accum)


class FoldData:
    """Rows, targets, datasets and loaders of fold ``job.fold``, at the backbone's input size."""

    def __init__(self, job, data_cfg: dict, runtime: Runtime):
        self.job, self.dc, self.rt = job, data_cfg, runtime
        tcfg = job.cfg.train
        self.batch_size = job.bcfg.batch_size or tcfg.batch_size
        self.rank_batch_size = max(1, self.batch_size // distributed.world_size())  # DDP: same global batch
        self.workers = default_workers(runtime, tcfg.num_workers)
        folds = job.table["fold"].to_numpy()
        self.train_idx = np.flatnonzero(np.where(folds >= 0, folds != job.fold, folds == -1 - job.fold))
        self.valid_idx = np.flatnonzero(folds == job.fold)
        if len(self.valid_idx) == 0:
            raise PipelineError(f"fold {job.fold} has no validation rows; folds run 0..{folds.max()}")
        self.y = job.spec.encode(job.table)
        self.y_t = torch.from_numpy(np.array(self.y))
        self.cache = self.image_cache()
        self._test_cache = None
        self._test_cache_built = False
        self._eval_loaders: dict = {}

    @property
    def eval_batch_size(self) -> int:
        """Evaluation batches: twice the training batch (no gradients or activations are kept)."""
        return 2 * self.batch_size

    def table(self, test: bool = False):
        return self.job.test if test else self.job.table

    def image_cache(self, test: bool = False):
        """``train.cache_images``: the train (or test) images decoded and resized once per (image
        files, size, interpolation, resize policy) into ``runs/<exp>/cache/`` and memory-mapped
        (:class:`ImageCache`): every fold, tune trial, prediction pass and parallel process reads the
        same file; the first process that needs it builds it while others wait on its lock. None when
        the option is off, or when the file would take over half the free disk space (said once)."""
        if not self.job.cfg.train.cache_images:
            return None
        table = self.table(test)
        size, interp, resize = self.dc["size"], self.dc["interpolation"], self.job.cfg.augment.resize
        crop_pct = self.dc["crop_pct"]
        path = ImageCache.file_for(Paths(self.job.cfg).image_cache_dir, table[PATH], size, interp, resize, crop_pct)
        if not path.exists() and not ImageCache.fits_on_disk(path, len(table), size):
            print(f"image cache: {len(table)} images at {size}px would take "
                  f"{ImageCache.bytes_needed(len(table), size) / 2**30:.1f} GiB, over half the free space "
                  f"under {path.parent}; reading the image files instead")
            return None
        if distributed.enabled() or not path.exists():  # under torchrun every rank takes part in the lock
            with locks.hold(path, f"image cache {path.name}", "is being built", wait=True):
                if distributed.is_main() and ImageCache.build(path, table[PATH], size, interp, resize,
                                                                      crop_pct=crop_pct):
                    print(f"image cache: {len(table)} {'test' if test else 'train'} images at {size}px decoded "
                          f"once into {path} ({ImageCache.bytes_needed(len(table), size) / 2**20:.1f} MiB, "
                          f"memory-mapped by every fold and process)")
            distributed.barrier()
        return ImageCache.open(path)

    def cache_for(self, test: bool):
        """The train cache (built with the fold), or the test cache (built at its first use)."""
        if not test:
            return self.cache
        if not self._test_cache_built:
            self._test_cache, self._test_cache_built = self.image_cache(test=True), True
        return self._test_cache

    def dataset(self, rows: np.ndarray, train: bool, test: bool = False) -> ImageDataset:
        size, interp = self.dc["size"], self.dc["interpolation"]
        aug = self.job.cfg.augment
        crop_pct = self.dc["crop_pct"]
        transform = (train_transform(aug.train, size, interp, aug.resize, crop_pct) if train
                     else eval_transform(size, interp, aug.resize, crop_pct))
        cache = self.cache_for(test)
        targets = None if test else self.y[rows]
        return ImageDataset(self.table(test)[PATH].to_numpy()[rows], targets, transform,
                            None if cache is None else CacheRows(cache, rows),
                            decode=(scaled_side(size, crop_pct), aug.resize))

    def loader(self, dataset, sampler=None, batch_sampler=None, drop_last=False, persistent=False):
        """Pinned memory on CUDA; workers sized to the machine; ``persistent`` keeps them for every
        epoch (the train loader, whose :class:`SeededSampler` carries each epoch's seed to them).
        Without a sampler it is an evaluation loader, of :attr:`eval_batch_size`."""
        kwargs = dict(num_workers=self.workers, pin_memory=self.rt.cuda,
                      persistent_workers=persistent and self.workers > 0)
        if self.workers:
            kwargs.update(worker_init_fn=seed_worker, prefetch_factor=4)
        if batch_sampler is not None:
            return torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, **kwargs)
        batch_size = self.rank_batch_size if sampler is not None else self.eval_batch_size
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                                           **kwargs)

    def eval_loader(self, rows: np.ndarray, test: bool):
        """One evaluation loader per row set for the fold's lifetime: the validation rows are
        predicted after every epoch, by the same (persistent) workers."""
        key = (test, np.asarray(rows).tobytes())
        if key not in self._eval_loaders:
            dataset = self.dataset(distributed.shard(rows), train=False, test=test)
            self._eval_loaders[key] = self.loader(dataset, persistent=True)
        return self._eval_loaders[key]

    @property
    def open_eval_loaders(self) -> int:
        return len(self._eval_loaders)

    def release_eval_loaders(self) -> None:
        """The fold's last pass is done: its loader workers can go."""
        self._eval_loaders.clear()

    def updates_per_epoch(self, drop_last: bool = False) -> int:
        return updates_per_epoch(len(self.train_idx), self.batch_size, self.job.cfg.train.grad_accum, drop_last)
