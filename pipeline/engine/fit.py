"""The training machinery shared by the train, tune and lr-find stages.

Device and precision set-up, the loss per task, optimizers and schedulers from timm's
factories, one optimizer step (accumulation, clipping, AMP scaling, EMA), one epoch over
batches, evaluation, and prediction with test-time augmentation.
"""
from __future__ import annotations

import math
import os
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from torch import nn
from tqdm.auto import tqdm

from pipeline.config.schema import PhaseConfig, TrainConfig
from pipeline.core import distributed
from pipeline.core.errors import PipelineError
from pipeline.domain.tasks import TaskSpec
from pipeline.domain.transforms import TTA_VIEWS, normalize
from pipeline.engine.backbones import split_parameters


class NonFiniteLoss(PipelineError):
    """The loss became NaN or infinite."""


# ---------------------------------------------------------------------------- runtime


CPU_PASS_PIXELS = 16 * 192 * 192  # a CPU's inference passes: 16 images at 160-192 px, 8 at 224-260 px


@dataclass
class Runtime:
    """Where and in which precision tensors live; normalises uint8 batches on the device."""

    device: torch.device
    mean: torch.Tensor
    std: torch.Tensor
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    scaler: torch.amp.GradScaler | None = field(default=None, repr=False)
    compile: bool = False
    _compiled: dict = field(default_factory=dict, repr=False)
    compile_failure: str | None = None  # why torch.compile failed here: this runtime stops trying

    @classmethod
    def create(cls, tcfg: TrainConfig, mean, std, device: str | None = None) -> "Runtime":
        name = device or tcfg.device
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise PipelineError(f"train.device is '{name}' but CUDA is not available; use train.device=cpu or auto")
        dev = torch.device(name)
        set_cudnn(tcfg, dev)
        amp_dtype = choose_amp_dtype(tcfg, dev)
        scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
        shape = (1, 3, 1, 1)
        return cls(dev, torch.tensor(mean, device=dev).view(shape), torch.tensor(std, device=dev).view(shape),
                   amp_dtype, tcfg.channels_last, scaler, tcfg.compile)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def images(self, x: torch.Tensor) -> torch.Tensor:
        return self.layout(normalize(x.to(self.device, non_blocking=True), self.mean, self.std))

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the memory layout the model runs in (``train.channels_last``)."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def passes(self, x: torch.Tensor, max_images: int | None = None) -> tuple[torch.Tensor, ...]:
        """``x`` split into the forward passes of an inference: at most ``max_images`` images (None:
        all of them); on a CPU also at most the power of two of images that holds about
        ``CPU_PASS_PIXELS`` pixels, since there large passes run slower per image (BENCHMARKS.md,
        CPU passes). Powers of two keep the passes of different loader batches aligned, so the
        same image meets the same kernels in training's predictions and in ``predict``."""
        limit = max_images or len(x)
        if not self.cuda:
            fit = max(CPU_PASS_PIXELS // (x.shape[-1] * x.shape[-2]), 1)
            limit = min(limit, 1 << (fit.bit_length() - 1))
        return x.split(max(limit, 1))

    def train_chunk(self, model: nn.Module, x: torch.Tensor) -> int | None:
        """Images per forward+backward pass of the training batch ``x``, or None for the whole batch
        at once. On a CPU a training step runs slower per image in large passes (EfficientNet-Lite2
        at 260 px, batch 64: 4-5 img/s whole, 13-14 in passes; benchmarks/studies/cpu_train_passes.py), so the
        batch goes through in the passes :meth:`passes` sizes and their gradients add up before
        the one optimizer step. That is the same step, since every loss is a mean over the batch's
        rows, as long as no BatchNorm layer normalises with the batch's own statistics
        (``train.freeze_bn``, the default, keeps them frozen); otherwise, on CUDA and under DDP
        the batch goes through whole."""
        if self.cuda or distributed.enabled() or any(
                isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()):
            return None
        chunk = len(self.passes(x)[0])
        return chunk if chunk < len(x) else None

    def prepare_model(self, model: nn.Module) -> nn.Module:
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model

    def maybe_compile(self, model: nn.Module) -> Callable:
        """``train.compile``: the model's ``torch.compile`` wrapper, made once per model, for
        forward passes only; weights are saved from ``model`` itself, so their keys carry no
        ``_orig_mod.`` prefix. Where compiling is unsupported or fails, says so once and runs
        the model uncompiled."""
        if not self.compile:
            return model
        if id(model) not in self._compiled:
            self._compiled[id(model)] = (model, CompileOrEager(model, self))  # the model kept alive: ids stay unique
        return self._compiled[id(model)][1]


def choose_amp_dtype(tcfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """``train.amp_dtype`` on CUDA: bf16 where the GPU computes it natively (compute capability
    8.0+: A100, L4, H100, RTX 30xx+), else fp16 with a GradScaler. ``is_bf16_supported()`` is not
    asked: it is also true where bf16 is emulated (T4, V100, P100), which is slow."""
    if device.type != "cuda" or not tcfg.amp:
        return None
    native_bf16 = torch.cuda.get_device_capability(device) >= (8, 0)
    if tcfg.amp_dtype == "bf16" and not native_bf16:
        print("train.amp_dtype: bf16 is emulated on this GPU (compute capability < 8.0) and slow; fp16 is faster")
    if tcfg.amp_dtype == "auto":
        return torch.bfloat16 if native_bf16 else torch.float16
    return torch.bfloat16 if tcfg.amp_dtype == "bf16" else torch.float16


def set_cudnn(tcfg: TrainConfig, device: torch.device) -> None:
    """``train.deterministic``: :func:`make_deterministic`; otherwise, on CUDA, cuDNN's autotuner
    (``cudnn.benchmark``): every input has one size (the resize policy makes each image square at
    the backbone's size), so the fastest kernels are found once per shape and reused."""
    if tcfg.deterministic:
        make_deterministic()
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True


@contextmanager
def restored_torch_flags():
    """The process-wide settings a run may change (``train.deterministic``, cuDNN's autotuner, the
    cuBLAS workspace), put back as they were when the run ends: a tune trial or a benchmark in the
    same process starts from the process's own settings, not the last run's."""
    cudnn = torch.backends.cudnn
    saved = (cudnn.benchmark, cudnn.deterministic, torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    try:
        yield
    finally:
        cudnn.benchmark, cudnn.deterministic = saved[0], saved[1]
        torch.use_deterministic_algorithms(saved[2], warn_only=saved[3])
        if saved[4] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[4]


def make_deterministic() -> None:
    """``train.deterministic``: deterministic kernels where torch has them (a warning, not an error,
    where it has none), cuDNN without autotuning, and cuBLAS's deterministic workspace. Slower."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


class CompileOrEager:
    """Calls ``torch.compile(model)``; compilation happens at the first call (and at a new input
    shape), so that is where it can fail: then one line says why and the model runs eagerly.
    After one failure its runtime (one fold) stops trying (``Runtime.compile_failure``), so the
    fold's later models and epochs do not pay again."""

    def __init__(self, model: nn.Module, runtime: "Runtime"):
        self.model, self.runtime, self.compiled = model, runtime, None
        if runtime.compile_failure is None:
            reason = _compile_unsupported()
            try:
                self.compiled = None if reason else torch.compile(model)
            except Exception as exc:  # e.g. older torch on Windows or a new Python
                reason = f"torch.compile is unsupported here ({type(exc).__name__}: {_first_line(exc)})"
            if reason:
                self.give_up(reason)

    def __call__(self, *args, **kwargs):
        if self.compiled is not None and self.runtime.compile_failure is None:
            try:
                return self.compiled(*args, **kwargs)
            except torch.OutOfMemoryError:
                raise  # not the compiler's fault
            except Exception as exc:  # dynamo/inductor raise many types (no C compiler, no Triton, ...)
                self.give_up(f"torch.compile failed ({type(exc).__name__}: {_first_line(exc)})")
        return self.model(*args, **kwargs)

    def give_up(self, reason: str) -> None:
        self.runtime.compile_failure, self.compiled = reason, None
        print(f"train.compile: {reason}; running uncompiled")

    def __getattr__(self, name):  # train()/eval() and friends act on the model
        return getattr(self.model, name)


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:200]


def _compile_unsupported() -> str | None:
    """Why ``torch.compile`` cannot run here, or None."""
    try:
        from torch._dynamo.eval_frame import is_dynamo_supported
    except ImportError:
        return f"torch {torch.__version__} has no torch.compile"
    if not is_dynamo_supported():
        return f"torch {torch.__version__} does not support torch.compile on this Python/platform"
    return None


def seed_everything(*parts: int) -> int:
    """Seed Python, NumPy and torch from a tuple (e.g. seed, fold, epoch); returns the seed."""
    seed = int(np.random.SeedSequence(list(parts)).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return seed


PROCESSES_ENV = "PIPELINE_PROCESSES"  # set by the parent of parallel fold processes: how many share the machine


def training_processes() -> int:
    """How many training processes share this machine's cores: torchrun's ranks on this node
    (``LOCAL_WORLD_SIZE``), the fold processes of ``--jobs N`` (:data:`PROCESSES_ENV`), else 1."""
    for name in ("LOCAL_WORLD_SIZE", PROCESSES_ENV):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


def default_workers(runtime: Runtime, configured: int | None, processes: int | None = None) -> int:
    """``train.num_workers``, or this process's share of the CPU cores: on a GPU every core but
    one (the process's own) of its share feeds the model; on a CPU the workers compete with the
    model's threads, so at most 4 and two cores left to the model."""
    if configured is not None:
        return configured
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = max(1, cpus // (processes or training_processes()))
    return max(1, share - 1) if runtime.cuda else max(0, min(4, share - 2))


# ---------------------------------------------------------------------------- loss


def make_loss(spec: TaskSpec, tcfg: TrainConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Loss on raw logits (N, outputs) against encoded targets; soft targets from mixup allowed."""
    kind = tcfg.loss
    if kind == "auto":
        kind = {"multiclass": "ce", "binary": "bce", "multilabel": "bce", "regression": "mse"}[spec.task]
    smoothing = tcfg.label_smoothing
    if kind == "ce":
        if spec.task != "multiclass":
            raise PipelineError(f"train.loss ce is for multiclass; task is {spec.task} (use auto or bce)")

        def ce(logits, y):
            if y.ndim == 2:  # soft targets (mixup/cutmix already smoothed them)
                return torch.sum(-y * F.log_softmax(logits.float(), dim=1), dim=1).mean()
            return F.cross_entropy(logits.float(), y.long(), label_smoothing=smoothing)
        return ce
    if kind == "bce":
        if spec.task not in ("binary", "multilabel"):
            raise PipelineError(f"train.loss bce is for binary/multilabel; task is {spec.task}")

        def bce(logits, y):
            y = y.float().view_as(logits) * (1 - smoothing) + 0.5 * smoothing
            return F.binary_cross_entropy_with_logits(logits.float(), y)
        return bce
    if spec.task != "regression":
        raise PipelineError(f"train.loss {kind} is for regression; task is {spec.task}")
    fn = F.mse_loss if kind == "mse" else F.huber_loss
    return lambda logits, y: fn(logits.float(), y.float().view_as(logits))


# ---------------------------------------------------------------------------- optimizer


def _decay_groups(named, lr_scale: float, is_head: bool) -> list[dict]:
    """Weight decay on weights only: biases and norm parameters (1-D) get none."""
    decay = [p for n, p in named if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in named if not (p.ndim > 1 and not n.endswith(".bias"))]
    groups = [{"params": decay, "lr_scale": lr_scale, "is_head": is_head},
              {"params": no_decay, "weight_decay": 0.0, "lr_scale": lr_scale, "is_head": is_head}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, tcfg: TrainConfig, phase: PhaseConfig, frozen: bool) -> torch.optim.Optimizer:
    """timm optimizer: head only when frozen; otherwise backbone at ``lr x backbone_lr_mult``
    (or timm's layer-wise decay) and head at ``lr``. Group LRs are ``lr x lr_scale`` so the
    scheduler keeps the ratio through warmup and decay."""
    backbone, head = split_parameters(model)
    opt = phase.optimizer or tcfg.optimizer  # train.<phase>.optimizer, else train.optimizer
    if frozen:
        groups = _decay_groups(head, 1.0, True)
    elif phase.layer_decay is not None:
        return create_optimizer_v2(model, opt=opt, lr=phase.lr, weight_decay=tcfg.weight_decay,
                                   layer_decay=phase.layer_decay, **fused_kwargs(opt, model))
    else:
        groups = _decay_groups(backbone, phase.backbone_lr_mult, False) + _decay_groups(head, 1.0, True)
    # every group's base LR is the head LR; the scheduler applies each group's lr_scale
    return create_optimizer_v2(groups, opt=opt, lr=phase.lr, weight_decay=tcfg.weight_decay,
                               **fused_kwargs(opt, model))


FUSED = ("adam", "adamw")  # timm names of torch.optim classes with a fused CUDA kernel


def fused_kwargs(optimizer: str, model: nn.Module) -> dict:
    """``fused=True`` for torch's Adam/AdamW when every parameter is on CUDA: one kernel per step
    instead of several per parameter tensor (works with the fp16 GradScaler and clipping)."""
    if optimizer.lower() not in FUSED:
        return {}
    return {"fused": True} if all(p.is_cuda for p in model.parameters()) else {}


LR_SCHEDULE = "warmup within the phase, cosine to lr x min_lr_ratio at its last update"  # tune studies record it


def lr_factor(update: int, total: int, warmup: int, min_ratio: float) -> float:
    """The LR of 0-based ``update`` as a fraction of the peak: linear from ``min_ratio`` to 1 over
    ``warmup`` updates, then cosine to exactly ``min_ratio`` at the last update (``total - 1``).
    A pure function of the update index, so a resumed run follows the same schedule."""
    if total <= 1:
        return 1.0  # one update: there is no schedule to follow, it runs at the peak
    warmup = min(warmup, total - 2)  # warmup is part of the budget; the last update decays
    if update < warmup:
        return min_ratio + (1.0 - min_ratio) * update / warmup
    progress = min(1.0, (update - warmup) / (total - 1 - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class PhaseSchedule:
    """Per-update LR of one phase: ``step_update(n)`` sets the LR that update ``n`` (0-based) uses,
    ``lr x lr_factor(n) x`` each group's ``lr_scale`` (backbone multiplier, timm's layer decay).
    Warmup is inside the phase's ``epochs``, so its last update runs at ``lr x min_lr_ratio``."""

    def __init__(self, optimizer, phase: PhaseConfig, updates_per_epoch: int):
        self.optimizer, self.lr, self.min_ratio = optimizer, phase.lr, phase.min_lr_ratio
        per_epoch = max(updates_per_epoch, 1)
        self.total = max(phase.epochs, 1) * per_epoch
        self.warmup = int(phase.warmup_epochs * per_epoch + 0.5)  # fractional epochs: nearest update
        self.step_update(0)

    def factor(self, update: int) -> float:
        return lr_factor(update, self.total, self.warmup, self.min_ratio)

    def step_update(self, num_updates: int, metric=None) -> None:
        lr = self.lr * self.factor(num_updates)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)


def build_scheduler(optimizer, phase: PhaseConfig, updates_per_epoch: int) -> PhaseSchedule:
    """Linear warmup from ``lr x min_lr_ratio`` to ``lr``, then cosine to ``lr x min_lr_ratio`` at
    the phase's last update, stepped per optimizer update (group LRs keep their ``lr_scale`` ratio).
    timm's cosine scheduler is not used: it adds the warmup on top of ``num_epochs``, which cuts
    the cosine off early (the last update of a 1-epoch phase ran at half the peak LR)."""
    return PhaseSchedule(optimizer, phase, updates_per_epoch)


def group_lrs(optimizer) -> dict[str, float]:
    head = [g["lr"] for g in optimizer.param_groups if g.get("is_head", g.get("lr_scale", 1.0) == 1.0)]
    body = [g["lr"] for g in optimizer.param_groups if not g.get("is_head", g.get("lr_scale", 1.0) == 1.0)]
    return {"lr_head": max(head) if head else float("nan"), "lr_backbone": max(body) if body else 0.0}


# ---------------------------------------------------------------------------- one step


class Stepper:
    """Backward and (every ``accum`` batches) an optimizer step with clipping, AMP scaling,
    the LR schedule and EMA. Non-finite losses are detected without a per-step sync."""

    def __init__(self, optimizer, scheduler, runtime: Runtime, tcfg: TrainConfig, params, ema=None,
                 steps_per_epoch: int = 1, start_update: int = 0):
        self.optimizer, self.scheduler, self.runtime = optimizer, scheduler, runtime
        self.accum, self.clip, self.params, self.ema = tcfg.grad_accum, tcfg.grad_clip, list(params), ema
        self.updates = start_update
        self.total_updates_per_epoch = steps_per_epoch
        self._pending = 0
        self._bad = torch.zeros((), dtype=torch.bool, device=runtime.device)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.backward_part(loss)
        self.end_batch(last)

    def backward_part(self, loss: torch.Tensor, share: float = 1.0) -> None:
        """The gradients of one pass of a batch, ``share`` of its rows (1.0: the whole batch)."""
        self._bad |= ~torch.isfinite(loss.detach())
        scaled = loss / self.accum if share == 1.0 else loss * (share / self.accum)
        (self.runtime.scaler.scale(scaled) if self.runtime.scaler else scaled).backward()

    def end_batch(self, last: bool) -> None:
        """One batch's gradients are in: the optimizer steps every ``accum`` batches and after the last."""
        self._pending += 1
        if self._pending == self.accum or last:
            self._step()

    def _step(self) -> None:
        scaler = self.runtime.scaler
        if self.clip:
            if scaler:
                scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        if scaler:
            scaler.step(self.optimizer)
            scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._pending = 0
        self.updates += 1
        if self.scheduler is not None:
            self.scheduler.step_update(self.updates)
        if self.ema is not None:
            self.ema.update(self.ema_source, step=self.updates)

    ema_source: nn.Module | None = None

    def check_finite(self, where: str) -> None:
        if bool(self._bad):
            raise NonFiniteLoss(f"the loss became NaN/inf ({where}); the fold stopped. "
                                f"Lower the learning rate (train.frozen.lr / train.unfrozen.lr), enable "
                                f"train.grad_clip, or check the targets for extreme values")


def run_batches(batches: Iterable, step_fn: Callable, stepper: Stepper, n_batches: int, desc: str,
                progress: bool = True) -> dict:
    """Loop over batches calling ``step_fn(batch) -> (loss, n_images)``; returns loss and speed."""
    total, images, start = torch.zeros((), device=stepper.runtime.device), 0, time.perf_counter()
    bar = tqdm(batches, total=n_batches, desc=desc, leave=False, disable=not progress, mininterval=1.0)
    for i, batch in enumerate(bar):
        out = step_fn(batch)  # (loss, images), or an iterator of (loss, images, share) per pass of the batch
        for loss, n, share in ([(*out, 1.0)] if isinstance(out, tuple) else out):
            stepper.backward_part(loss, share)
            total += loss.detach().float() * n
            images += n
        stepper.end_batch(last=i == n_batches - 1)
        if progress and i % 5 == 0:
            stepper.check_finite(desc)
            bar.set_postfix(loss=f"{total.item() / max(images, 1):.4f}",
                            img_s=f"{images / (time.perf_counter() - start):.0f}")
    stepper.check_finite(desc)
    seconds = time.perf_counter() - start
    return {"train_loss": total.item() / max(images, 1), "seconds": seconds,
            "images_per_s": images / max(seconds, 1e-9)}


def pass_losses(runtime: Runtime, loss_fn: Callable, net: Callable, x: torch.Tensor, y: torch.Tensor, chunk: int):
    """A training batch in passes of ``chunk`` images (:meth:`Runtime.train_chunk`): each pass's
    loss (a mean over its rows), its images and its share of the batch. The caller takes each
    pass's backward (``Stepper.backward_part(loss, share)``) before the next pass's forward, so
    one pass's activations are held at a time."""
    for xs, ys in zip(x.split(chunk), y.split(chunk)):
        with runtime.autocast():
            loss = loss_fn(net(xs), ys)
        yield loss, len(xs), len(xs) / len(x)


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict_logits(model: nn.Module, loader, runtime: Runtime, views=("identity",),
                   max_images: int | None = None) -> list[torch.Tensor]:
    """Logits per TTA view for every image in ``loader`` (order preserved), on the CPU.

    The views of a batch are stacked on the batch axis and go through the model together, in
    forward passes of at most ``max_images`` images (None: the whole stack): one large pass
    instead of one per view. The model is in eval mode, so each image's logits do not depend on
    its batch-mates (up to the float rounding of other kernel choices)."""
    model.eval()
    net = runtime.maybe_compile(model)
    out: list[list[torch.Tensor]] = [[] for _ in views]
    fns = [TTA_VIEWS[v] for v in views]
    for x, _ in loader:
        x = runtime.images(x)
        stacked = torch.cat([fn(x) for fn in fns]) if len(fns) > 1 else x
        with runtime.autocast():
            logits = torch.cat([net(part).float() for part in runtime.passes(runtime.layout(stacked),
                                                                             max_images)]).cpu()
        for k, part in enumerate(logits.split(len(x))):
            out[k].append(part)
    return [torch.cat(o) for o in out]


def activate_mean(spec: TaskSpec, logits_per_view: list[torch.Tensor]) -> np.ndarray:
    """TTA: average the activated predictions (probabilities or values) over views."""
    return np.mean([spec.activate(v.numpy()) for v in logits_per_view], axis=0)


def score(metric, spec: TaskSpec, y: np.ndarray, preds: np.ndarray) -> float:
    try:
        return metric(y, preds, spec.task)
    except ValueError:  # e.g. AUC with one class present in a tiny fold
        return float("nan")
