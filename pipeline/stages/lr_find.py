"""LR range test (fastai's ``lr_find``, Lightning's ``Tuner.lr_find``) for both training phases.

On fold 0's train rows the LR grows exponentially from ``1e-7`` to ``10`` over at most 100
optimizer steps, one batch each, and the training loss is recorded with its bias-corrected
exponential moving average. The sweep stops when the smoothed loss exceeds 4x its best value
(or a loss is NaN/inf). Unlike fastai and Lightning (beta 0.98, an average over ~50 of the 100
steps, whose lag moves the steepest point about a decade to the right), the average uses beta
0.9 while sweeping, and the recorded ``smoothed_loss`` runs it forwards and then backwards:
a curve without lag. Two sweeps per backbone:

* **frozen**: the fresh head on the cached pooled features of the frozen backbone (as the frozen
  phase trains it): costs milliseconds;
* **unfrozen**: the whole network, starting from the head the frozen phase would hand over
  (``train.frozen`` trained on the cached features first, or the linear probe with
  ``train.linear_probe``), the backbone's parameter groups at
  ``lr x backbone_lr_mult`` (or timm's layer-wise decay) throughout: the discriminative ratio of
  the unfrozen phase is kept and the head's LR is what the sweep reports. On CPU it takes 60
  steps (100 on a GPU).

The suggested LR is where the smoothed loss falls fastest: the steepest negative slope of the
smoothed loss against log10(LR), between the 10th step and the minimum (Lightning's rule,
limited to the descent). When the curve never falls it is the LR of the minimum smoothed loss
divided by 10 (fastai's ``valley``-era rule of thumb); ``suggestion.json`` says which.

Outputs (``runs/<exp>/<backbone>/lr_find/``): ``frozen.csv`` and ``unfrozen.csv`` (``lr, loss,
smoothed_loss``), ``lr_find.png`` (loss against LR on a log axis, suggestions marked) and
``suggestion.json`` (``{"frozen_lr": ..., "unfrozen_lr": ..., "method": ..., per-phase
details}``). Nothing else is written: the weights the sweeps wreck stay in memory.
"""
from __future__ import annotations

import dataclasses
import gc
import math
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pandas as pd
import torch

from pipeline.config.paths import Paths
from pipeline.config.run_only import digest_section
from pipeline.config.schema import Config
from pipeline.core import artifacts
from pipeline.data.datasets import SeededSampler
from pipeline.data.tables import read_folds, task_spec
from pipeline.engine.backbones import (
    check_model_name,
    freeze_batchnorm_stats,
    frozen_train_mode,
    pooled_features,
    set_frozen,
)
from pipeline.engine.fit import Stepper, build_optimizer, restored_torch_flags, seed_everything
from pipeline.training.fingerprint import result_train_config
from pipeline.training.trainer import FoldJob, FoldTrainer
from pipeline.training.tuned import apply_tuned

START_LR = 1e-7
END_LR = 10.0
STEPS = 100
UNFROZEN_STEPS_CPU = 60  # the unfrozen sweep trains the whole network: keep it short on a CPU
DIVERGE = 4.0  # stop when the smoothed loss exceeds this multiple of its best
BETA = 0.9  # smoothing of the loss (exponential moving average, bias-corrected): ~10 steps
SKIP_BEGIN = 10  # the first steps of the curve are noise: not searched for the steepest slope
METHOD = ("steepest negative gradient of the smoothed loss against log10(lr), between step 10 and the minimum "
          "(fallback: lr of the minimum smoothed loss / 10)")
OUTPUTS = ("frozen.csv", "unfrozen.csv", "lr_find.png", "suggestion.json")


# ----------------------------------------------------------------------------- the sweep


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group at ``lr x lr_scale``: the backbone/head ratio of the phase is kept."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def ema(values: np.ndarray, beta: float = BETA) -> np.ndarray:
    """Bias-corrected exponential moving average (fastai's smoothed loss)."""
    out, average = np.empty(len(values)), 0.0
    for i, value in enumerate(values):
        average = beta * average + (1 - beta) * value
        out[i] = average / (1 - beta ** (i + 1))
    return out


def zero_lag_smooth(values: np.ndarray, beta: float = BETA) -> np.ndarray:
    """The moving average run forwards, then backwards over the result: smooth and unshifted."""
    return ema(ema(np.asarray(values, dtype=float), beta)[::-1], beta)[::-1]


def range_test(step: Callable[[], float], optimizer: torch.optim.Optimizer, lrs: np.ndarray,
               diverge: float = DIVERGE, beta: float = BETA) -> tuple[pd.DataFrame, str]:
    """Run ``step()`` (one batch: forward, backward, optimizer step; returns the loss) at each LR.

    Returns the curve (``lr, loss, smoothed_loss``) and why it stopped.
    """
    used, losses, average, best = [], [], 0.0, math.inf
    stopped = "end of the sweep"
    for i, lr in enumerate(lrs):
        set_lr(optimizer, float(lr))
        loss = step()
        if not math.isfinite(loss):
            stopped = "the loss became NaN/inf"
            break
        used.append(float(lr))
        losses.append(loss)
        average = beta * average + (1 - beta) * loss
        smoothed = average / (1 - beta ** (i + 1))
        if smoothed > diverge * best:
            stopped = f"the smoothed loss passed {diverge:g}x its best"
            break
        best = min(best, smoothed)
    smoothed = zero_lag_smooth(np.array(losses), beta) if losses else np.array([])
    return pd.DataFrame({"lr": used, "loss": losses, "smoothed_loss": smoothed}), stopped


def suggest_lr(curve: pd.DataFrame, skip_begin: int = SKIP_BEGIN) -> tuple[float, str]:
    """The LR where the smoothed loss falls fastest, and the rule used (``steepest`` or
    ``min_loss/10``); NaN for an empty curve."""
    if curve.empty:
        return math.nan, "none"
    lrs, smoothed = curve["lr"].to_numpy(), curve["smoothed_loss"].to_numpy()
    end = int(np.argmin(smoothed)) + 1
    begin = min(skip_begin, max(0, end - 3))
    if end - begin >= 3:
        slope = np.gradient(smoothed[begin:end], np.log10(lrs[begin:end]))
        i = int(np.argmin(slope))
        if slope[i] < 0:
            return float(lrs[begin + i]), "steepest"
    return float(lrs[end - 1] / 10), "min_loss/10"


# ----------------------------------------------------------------------------- one backbone


def _index_batches(rows: np.ndarray, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Shuffled batches of ``rows``, epoch after epoch."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = rows[torch.randperm(len(rows), generator=generator).numpy()]
        yield from (order[i:i + batch_size] for i in range(0, len(order), batch_size))


def _image_batches(trainer: FoldTrainer, augment: bool, seed: int) -> Iterator:
    """Shuffled (images, targets) batches of the train rows, epoch after epoch (the train stage's
    loader and per-row augmentation seeds)."""
    dataset = trainer.data.dataset(trainer.data.train_idx, train=augment)
    drop_last = len(dataset) > trainer.data.batch_size  # no BatchNorm batch of one
    sampler = SeededSampler(len(dataset))
    loader = trainer.data.loader(dataset, sampler=sampler, drop_last=drop_last, persistent=True)
    epoch = 0
    while True:
        sampler.set_epoch(seed + epoch)
        yield from loader
        epoch += 1


def sweep_frozen(trainer: FoldTrainer, lrs: np.ndarray, seed: int) -> tuple[pd.DataFrame, str]:
    """The head alone, the backbone frozen (on cached features when the frozen phase uses them)."""
    model, rt, tcfg = trainer.model, trainer.rt, trainer.tcfg
    set_frozen(model, True)
    frozen_train_mode(model)
    head = model.get_classifier()
    optimizer = build_optimizer(model, tcfg, tcfg.frozen, frozen=True)
    stepper = Stepper(optimizer, None, rt, tcfg, head.parameters())
    y = trainer.data.y_t.to(rt.device)
    if trainer.use_feature_cache():
        feats = trainer.frozen_features()
        batches = _index_batches(trainer.data.train_idx, trainer.data.batch_size, seed)

        def inputs():
            idx = torch.as_tensor(next(batches), device=feats.device)
            return feats[idx], y[idx]
    else:
        images = _image_batches(trainer, trainer.job.cfg.augment.frozen_phase, seed)

        def inputs():
            x, target = next(images)
            with torch.no_grad(), rt.autocast():
                return pooled_features(model, rt.images(x)).float(), target.to(rt.device)

    def step() -> float:
        x, target = inputs()
        with rt.autocast():
            loss = trainer.loss_fn(head(x), target)
        stepper.backward(loss, last=True)
        return float(loss.detach())

    return range_test(step, optimizer, lrs)


def sweep_unfrozen(trainer: FoldTrainer, lrs: np.ndarray, seed: int) -> tuple[pd.DataFrame, str]:
    """The whole network in train mode, backbone groups at the phase's ratio to the head."""
    model, rt, tcfg = trainer.model, trainer.rt, trainer.tcfg
    set_frozen(model, False)
    model.train()
    if tcfg.freeze_bn:
        freeze_batchnorm_stats(model)
    optimizer = build_optimizer(model, tcfg, tcfg.unfrozen, frozen=False)
    stepper = Stepper(optimizer, None, rt, tcfg, model.parameters())
    images = _image_batches(trainer, True, seed)

    def step() -> float:
        x, target = next(images)
        with rt.autocast():
            loss = trainer.loss_fn(model(rt.images(x)), target.to(rt.device))
        stepper.backward(loss, last=True)
        return float(loss.detach())

    return range_test(step, optimizer, lrs)


def lr_find_backbone(cfg: Config, bcfg, spec, table, lrs: np.ndarray, unfrozen_steps: int) -> dict:
    """Both sweeps for one backbone; returns ``{phase: (curve, stopped)}``."""
    job = FoldJob(cfg=cfg, bcfg=bcfg, spec=spec, table=table, fold=0, progress=False, feature_cache_dir=None)
    with restored_torch_flags():
        trainer = FoldTrainer(job)
        seed = seed_everything(cfg.train.seed, 0, 7919)
        fresh_head = {k: v.detach().clone() for k, v in trainer.model.get_classifier().state_dict().items()}
        curves = {"frozen": sweep_frozen(trainer, lrs, seed)}
        trainer.model.get_classifier().load_state_dict(fresh_head)
        if cfg.train.linear_probe:  # the unfrozen phase starts from the head the frozen phase hands over
            trainer.linear_probe_phase()
        elif cfg.train.frozen.epochs > 0:
            trainer.frozen_phase(cfg.train.frozen, 0)
        sweep = np.geomspace(lrs[0], lrs[-1], unfrozen_steps)
        curves["unfrozen"] = sweep_unfrozen(trainer, sweep, seed)
    del trainer, job
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return curves


# ----------------------------------------------------------------------------- outputs


def plot_curves(curves: dict, suggestions: dict, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5.5 * len(curves), 4.2), squeeze=False)
    for ax, (phase, (curve, stopped)) in zip(axes[0], curves.items()):
        if not curve.empty:
            ax.plot(curve["lr"], curve["loss"], color="tab:blue", alpha=0.3, lw=1, label="loss")
            ax.plot(curve["lr"], curve["smoothed_loss"], color="tab:blue", lw=2, label="smoothed loss")
            low, high = curve["smoothed_loss"].min(), curve["smoothed_loss"].max()
            ax.set_ylim(low - 0.05 * (high - low + 1e-12), high + 0.1 * (high - low + 1e-12))
        lr, method = suggestions[phase]
        if math.isfinite(lr):
            ax.axvline(lr, color="tab:red", ls="--", label=f"suggested {lr:.1e} ({method})")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (head)")
        ax.set_ylabel("training loss")
        ax.set_title(f"{phase} phase ({len(curve)} steps; stopped: {stopped})", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(title)
    fig.tight_layout()
    with artifacts.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _digest(cfg: Config, bcfg, sweep: dict) -> str:
    paths = Paths(cfg)
    train = result_train_config(cfg)
    part = {"data": digest_section("data", {k: v for k, v in dataclasses.asdict(cfg.data).items() if k != "root"}),
            "backbone": dataclasses.asdict(bcfg), "train": train, "augment": dataclasses.asdict(cfg.augment),
            "sweep": sweep}
    return artifacts.fingerprint(part, [paths.folds_csv] + ([paths.train_csv] if paths.train_csv else []))


def run_lr_find(cfg: Config, backbone: str | None = None, force: bool = False, *, start_lr: float = START_LR,
                end_lr: float = END_LR, steps: int = STEPS, unfrozen_steps: int | None = None) -> Path:
    """LR range test per backbone (or one): ``runs/<exp>/<backbone>/lr_find/``.

    ``unfrozen_steps`` None: ``steps`` on a GPU, at most 60 on a CPU. Returns the output folder
    (of the last backbone).

    Example
    -------
    >>> run_lr_find(load_config("configs/demo.yaml"), "efficientnet_lite0")  # doctest: +SKIP
    """
    paths = Paths(cfg)
    table = read_folds(cfg)
    spec = task_spec(cfg, table)
    backbones = [cfg.backbone(backbone)] if backbone else list(cfg.backbones)
    for bcfg in backbones:
        check_model_name(bcfg.name)
    if unfrozen_steps is None:
        unfrozen_steps = (steps if torch.cuda.is_available() and cfg.train.device != "cpu"
                          else min(steps, UNFROZEN_STEPS_CPU))
    lrs = np.geomspace(start_lr, end_lr, steps)
    for entry in backbones:
        bcfg_cfg, bcfg = cfg.variant(entry)
        bcfg_cfg, source = apply_tuned(bcfg_cfg, bcfg)
        out = paths.lr_find_dir(bcfg.slug)
        outputs = [out / name for name in OUTPUTS]
        digest = _digest(bcfg_cfg, bcfg, {"start": start_lr, "end": end_lr, "steps": steps, "unfrozen": unfrozen_steps})
        if not force and artifacts.is_up_to_date(outputs, digest):
            print(f"lr-find {bcfg.slug}: {out} is up to date; skipped (--force to redo)")
            continue
        ratio = bcfg_cfg.train.unfrozen.layer_decay
        ratio_text = f"layer decay {ratio}" if ratio is not None else f"x{bcfg_cfg.train.unfrozen.backbone_lr_mult:g}"
        print(f"lr-find {bcfg.slug}: {start_lr:.0e} -> {end_lr:g} on fold 0's {int((table['fold'] != 0).sum())} train "
              f"rows: frozen phase {steps} steps, unfrozen phase {unfrozen_steps} steps (backbone LR {ratio_text}; "
              f"LRs from {source['lr_source']})")
        curves = lr_find_backbone(bcfg_cfg, bcfg, spec, table, lrs, unfrozen_steps)
        suggestions = {phase: suggest_lr(curve) for phase, (curve, _) in curves.items()}
        write_outputs(out, bcfg.slug, curves, suggestions, bcfg_cfg)
        artifacts.mark_done(outputs, digest)
    return paths.lr_find_dir(backbones[-1].slug)


def write_outputs(out: Path, name: str, curves: dict, suggestions: dict, cfg: Config) -> dict:
    for phase, (curve, _) in curves.items():
        artifacts.write_csv(out / f"{phase}.csv", curve)
    plot_curves(curves, suggestions, out / "lr_find.png", f"LR range test: {name}")
    result = {"frozen_lr": suggestions["frozen"][0], "unfrozen_lr": suggestions["unfrozen"][0], "method": METHOD}
    for phase, (curve, stopped) in curves.items():
        lr, method = suggestions[phase]
        best = curve.loc[curve["smoothed_loss"].idxmin()] if not curve.empty else None
        result[phase] = {"lr": lr, "method": method, "steps": len(curve), "stopped": stopped,
                         "min_smoothed_loss": None if best is None else float(best["smoothed_loss"]),
                         "min_loss_lr": None if best is None else float(best["lr"])}
    result["unfrozen"]["backbone_lr_mult"] = cfg.train.unfrozen.backbone_lr_mult
    result["unfrozen"]["layer_decay"] = cfg.train.unfrozen.layer_decay
    artifacts.write_json(out / "suggestion.json", json_safe(result))
    _print_result(out, name, result)
    return result


def json_safe(value):
    """NaN/inf to null: suggestion.json stays valid JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _print_result(out: Path, name: str, result: dict) -> None:
    frozen, unfrozen = result["frozen"], result["unfrozen"]
    print(f"lr-find {name}: frozen phase suggests {frozen['lr']:.1e} ({frozen['method']}; {frozen['steps']} steps, "
          f"stopped: {frozen['stopped']}), unfrozen phase {unfrozen['lr']:.1e} ({unfrozen['method']}; "
          f"{unfrozen['steps']} steps, stopped: {unfrozen['stopped']}) -> {out}")
    good = [(k, result[k]) for k in ("frozen_lr", "unfrozen_lr") if result[k] and math.isfinite(result[k])]
    if good:
        train_words = " ".join(f"train.{k.split('_')[0]}.lr={v:.1e}" for k, v in good)
        tune_words = " ".join(f"tune.{k}=[{v / 10:.1e},{v * 3:.1e}]" for k, v in good)
        print(f"  train with them: make train-folds ARGS=\"{train_words}\"")
        print(f"  or search around them: make tune ARGS=\"{tune_words}\"")
