"""Frozen-phase feature cache.

While the backbone is frozen (eval mode, no augmentation), the pooled features an image
produces are fixed. They are computed once per backbone and image - one forward pass over the
train images serves every fold and every frozen epoch - and the head trains on them. The
cache lives in memory for the process and on disk (safetensors) for other processes and runs.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.core import artifacts
from pipeline.domain.transforms import TTA_VIEWS
from pipeline.engine.backbones import pooled_features
from pipeline.engine.fit import Runtime

_MEMORY: dict[str, torch.Tensor] = {}


@torch.no_grad()
def compute_features(model: nn.Module, loader, runtime: Runtime, view: str = "identity") -> torch.Tensor:
    """Pooled features (N, D) in the loader's order, through the frozen backbone in eval mode, of
    the images as the test-time augmentation ``view`` shows them."""
    model.eval()
    chunks, transform = [], TTA_VIEWS[view]
    for x, _ in loader:
        with runtime.autocast():
            chunks.append(pooled_features(model, transform(runtime.images(x))).float())
    return torch.cat(chunks)


def cached_features(key: str, cache_dir: Path | None, compute, name: str = "train") -> tuple[torch.Tensor, str]:
    """Features for ``key`` from memory, disk, or ``compute()``; returns (features, source).
    ``name`` starts the file name (``train``, ``test-hflip``, ...)."""
    if key in _MEMORY:
        return _MEMORY[key], "memory"
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
    _MEMORY[key] = feats
    return feats, source


def clear_memory() -> None:
    _MEMORY.clear()
