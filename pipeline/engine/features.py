"""Frozen-phase feature cache.

While the backbone is frozen (eval mode, no augmentation), the pooled features an image
produces are fixed. They are computed once per backbone and image - one forward pass over the
train images serves every fold and every frozen epoch - and the head trains on them. The
cache lives in a :class:`FeatureStore` owned by the run (bounded, in memory) and on disk
(safetensors) for other processes and runs.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.core import artifacts
from pipeline.domain.transforms import TTA_VIEWS
from pipeline.engine.backbones import pooled_features
from pipeline.engine.fit import Runtime


@torch.no_grad()
def compute_features(model: nn.Module, loader, runtime: Runtime, view: str = "identity") -> torch.Tensor:
    """Pooled features (N, D) in the loader's order, through the frozen backbone in eval mode, of
    the images as the test-time augmentation ``view`` shows them."""
    model.eval()
    chunks, transform = [], TTA_VIEWS[view]
    for x, _ in loader:
        with runtime.autocast():
            chunks += [pooled_features(model, part).float()
                       for part in runtime.passes(runtime.layout(transform(runtime.images(x))))]
    return torch.cat(chunks)


class FeatureStore:
    """Tensors (frozen features, re-estimated BatchNorm buffers) by key, held in memory for whoever
    owns the store (one train or tune run: every fold and trial reuses them), the least recently
    used dropped past ``max_bytes``; features also on disk, for other processes and runs."""

    def __init__(self, max_bytes: int = 4 << 30):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, object] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(v) for v in self._items.values())

    def remember(self, key: str, compute):
        """``compute()``'s value for ``key``, computed once while it stays in the store."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        return self._put(key, compute())

    def features(self, key: str, cache_dir: Path | None, compute, name: str = "train") -> tuple[torch.Tensor, str]:
        """Features for ``key`` from memory, disk, or ``compute()``; returns (features, source).
        ``name`` starts the file name (``train``, ``test-hflip``, ...)."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key], "memory"
        path = cache_dir / f"{name}-{key[:16]}.safetensors" if cache_dir else None
        if path is not None and path.exists():
            feats = load_file(str(path))["features"]
            source = "disk"
        else:
            feats = compute().cpu()
            source = "computed"
            if path is not None:
                with artifacts.atomic_path(path) as tmp:
                    save_file({"features": feats.contiguous()}, str(tmp))
        return self._put(key, feats), source

    def clear(self) -> None:
        self._items.clear()

    def _put(self, key: str, value):
        self._items[key] = value
        while len(self._items) > 1 and self.nbytes > self.max_bytes:
            self._items.popitem(last=False)
        return value


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    return 0
