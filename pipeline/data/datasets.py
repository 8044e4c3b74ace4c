"""Torch datasets and samplers: images with their targets, seeded per row so that an epoch's
augmentations depend on (seed, fold, epoch, row) only."""
from __future__ import annotations

import numpy as np
import torch

from pipeline.core.errors import PipelineError
from pipeline.data.images import load_image


class ImageDataset(torch.utils.data.Dataset):
    """Images with optional targets, through an albumentations transform.

    ``cache`` (a :class:`pipeline.data.cache.ImageCache` or None) serves decoded, pre-resized
    images from memory instead of reading files. ``decode`` (``(size, resize policy)`` or None)
    lets :func:`load_image` decode large JPEGs at reduced scale before the transform's resize,
    as the cache does: the same pixels with or without it.
    """

    def __init__(self, paths, targets=None, transform=None, cache=None, decode: tuple[int, str] | None = None):
        self.paths = list(paths)
        self.targets = None if targets is None else np.asarray(targets)
        self.transform = transform
        self.cache = cache
        self.decode = decode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item):
        """``item``: a row, or ``(row, epoch_seed)`` from :class:`SeededSampler`, which seeds the
        transform from both: a row's augmentation then depends on the epoch and the row only, not
        on the number of loader workers or on which of them loads it."""
        i, seed = item if isinstance(item, tuple) else (item, None)
        if self.cache is not None:
            image = self.cache[i]
        else:
            image = load_image(self.paths[i], *(self.decode or ()))
        if self.transform is not None:
            if seed is not None:
                seed_transform(self.transform, row_seed(seed, i))
            image = self.transform(image=image)["image"]
        target = self.targets[i] if self.targets is not None else np.float32(0)
        return image, target


SEEDING_NEEDS = "albumentations >= 1.4.21 (Compose.set_random_seed)"


def require_seedable_transforms() -> None:
    """Per-row augmentation seeding needs ``Compose.set_random_seed``. Without it a row's
    augmentation would depend on the loader worker that draws it, and a resumed run would differ
    from an uninterrupted one: refuse instead of skipping the seeding silently."""
    import albumentations

    if not hasattr(albumentations.Compose, "set_random_seed"):
        raise PipelineError(f"per-row augmentation seeding needs {SEEDING_NEEDS}; installed albumentations "
                            f"{albumentations.__version__}: pip install 'albumentations>=1.4.21'")


def seed_transform(transform, seed: int) -> None:
    """Seed one transform (see :func:`require_seedable_transforms`); an error when it cannot be."""
    setter = getattr(transform, "set_random_seed", None)
    if setter is None:
        raise PipelineError(f"transform {type(transform).__name__} cannot be seeded per row: it needs "
                            f"{SEEDING_NEEDS}; pip install 'albumentations>=1.4.21'")
    setter(seed)


def row_seed(epoch_seed: int, row: int) -> int:
    """A 32-bit seed for one row in one epoch (a multiplicative hash: distinct rows, distinct seeds)."""
    return (int(epoch_seed) * 0x9E3779B1 + int(row) * 0x85EBCA77 + 1) % 2**32


class SeededSampler(torch.utils.data.Sampler):
    """Rows as ``(row, epoch_seed)`` pairs, shuffled by the epoch seed (``set_epoch``).

    The sampler runs in the main process, so one DataLoader with persistent workers serves every
    epoch: the new order and seed reach the workers through the indices. Under DDP it wraps
    :class:`~torch.utils.data.distributed.DistributedSampler` (each rank its shard).
    """

    def __init__(self, n: int, distributed: bool = False, drop_last: bool = False):
        require_seedable_transforms()  # in the main process, before any worker starts
        self.n, self.seed = n, 0
        self.inner = None
        if distributed:
            from torch.utils.data.distributed import DistributedSampler
            self.inner = DistributedSampler(range(n), shuffle=True, seed=0, drop_last=drop_last)

    def set_epoch(self, seed: int) -> None:
        self.seed = int(seed)
        if self.inner is not None:
            self.inner.set_epoch(self.seed)  # its permutation is seeded by seed + epoch = this seed

    def __iter__(self):
        if self.inner is not None:
            order = list(self.inner)
        else:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed)).tolist()
        return ((i, self.seed) for i in order)

    def __len__(self) -> int:
        return len(self.inner) if self.inner is not None else self.n


class CacheRows:
    """Rows of an :class:`ImageCache` by index."""

    def __init__(self, cache, rows):
        self.cache, self.rows = cache, np.asarray(rows)

    def __getitem__(self, i):
        return self.cache[self.rows[i]]


def seed_worker(worker_id: int) -> None:
    """NumPy's global state per worker (augmentations are seeded per row, by SeededSampler)."""
    np.random.seed(torch.utils.data.get_worker_info().seed % 2**32)
