"""Checkpoints as safetensors only: model weights, and resume state in one file.

A resume file holds the model, the optimizer's tensors and the EMA weights as tensors, and
everything else (epoch, optimizer hyper-parameters, scheduler, scaler, history) as JSON in
the safetensors metadata, so one atomic rename publishes a consistent state and nothing is
ever unpickled.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from pipeline.core import artifacts
from pipeline.core.errors import PipelineError


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def save_weights(path: Path, model: nn.Module) -> None:
    with artifacts.atomic_path(path) as tmp:
        save_file(_contiguous(model.state_dict()), str(tmp))


def check_checkpoint(path: Path, fix: str) -> None:
    """Refuse a checkpoint that is not whole, in one line naming it and saying how to ``fix`` it: its
    size, its header and its bytes (SHA-256) against what was written (the stamp beside it; a file
    without one, as in a bundle, is checked for its header)."""
    problem = artifacts.file_problem(path, digest=True)
    if problem:
        raise PipelineError(f"checkpoint {path} is damaged ({problem}); {fix}")


def load_weights(path: Path, model: nn.Module, fix: str = "retrain it") -> None:
    """``model`` with the weights of ``path``, checked first (:func:`check_checkpoint`)."""
    check_checkpoint(path, fix)
    try:
        tensors = load_file(str(path))
    except SafetensorError as exc:
        raise PipelineError(f"checkpoint {path} cannot be read ({exc}); {fix}") from None
    model.load_state_dict(tensors)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, slots in state["state"].items():
        for name, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt.{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    slots: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        slots.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        slots.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": slots, "param_groups": meta["param_groups"]})


def save_resume(path: Path, model: nn.Module, optimizer, info: dict, ema: nn.Module | None = None,
                scaler=None, extra: dict[str, torch.Tensor] | None = None) -> None:
    """Model + optimizer (+ EMA) tensors, JSON ``info`` and the AMP GradScaler's state (its loss
    scale and growth counter: fp16 steps after a resume scale like the uninterrupted run's) in
    one atomically written file."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt_tensors, opt_meta = _optimizer_tensors(optimizer) if optimizer is not None else ({}, None)
    tensors.update(opt_tensors)
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    tensors.update({f"extra.{k}": v for k, v in (extra or {}).items()})  # e.g. the SWA running average
    metadata = {"info": json.dumps(info, default=float), "optimizer": json.dumps(opt_meta),
                "scaler": json.dumps(scaler.state_dict() if scaler is not None else {})}
    with artifacts.atomic_path(path) as tmp:
        save_file(_contiguous(tensors), str(tmp), metadata=metadata)


def resume_problem(path: Path) -> str | None:
    """What is wrong with a resume file (one cut short by a copy or a full disk), else None."""
    return artifacts.safetensors_problem(path) if path.exists() else None


def read_resume_info(path: Path) -> dict | None:
    """The resume file's info; None without a whole one (:func:`resume_problem` says what is wrong)."""
    if not path.exists() or resume_problem(path):
        return None
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["info"])


def read_resume_extra(path: Path) -> dict[str, torch.Tensor]:
    """The ``extra`` tensors :func:`save_resume` stored (empty when there were none)."""
    return {k[len("extra."):]: v for k, v in load_file(str(path)).items() if k.startswith("extra.")}


def load_resume(path: Path, model: nn.Module, optimizer, ema: nn.Module | None = None, scaler=None) -> dict:
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    model.load_state_dict(part("model."))
    if ema is not None:
        ema.load_state_dict(part("ema."))
    opt_meta = json.loads(meta["optimizer"])
    if optimizer is not None and opt_meta is not None:
        _restore_optimizer(optimizer, {k: v for k, v in tensors.items() if k.startswith("opt.")}, opt_meta)
    scaler_state = json.loads(meta.get("scaler", "{}"))
    if scaler is not None and scaler_state:  # {}: saved without AMP scaling (or by an older version)
        scaler.load_state_dict(scaler_state)
    return json.loads(meta["info"])
