"""torch.distributed under ``torchrun``: one model trained by several processes (DDP).

``torchrun --nproc_per_node=N -m pipeline train -c CFG`` sets RANK/WORLD_SIZE/LOCAL_RANK;
every rank trains on its shard of each batch stream, predictions are sharded and gathered,
and rank 0 alone writes files, so the outputs are those of a single-process run.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def enabled() -> bool:
    return world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init() -> None:
    """Join the process group when launched by torchrun (NCCL on GPUs, gloo on CPUs)."""
    if not enabled() or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def barrier() -> None:
    if enabled() and dist.is_initialized():
        dist.barrier()


def shard(indices):
    """This rank's share of ``indices`` (strided, no padding: every row once over all ranks)."""
    return indices[rank()::world_size()] if enabled() else indices


def gather_rows(local: torch.Tensor) -> torch.Tensor:
    """Undo :func:`shard`: rows from every rank back in their original order (CPU tensors)."""
    if not enabled():
        return local
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, local.cpu())
    n = sum(len(p) for p in parts)
    out = torch.empty((n, *parts[0].shape[1:]), dtype=parts[0].dtype)
    for r, part in enumerate(parts):
        out[r::world_size()] = part
    return out
