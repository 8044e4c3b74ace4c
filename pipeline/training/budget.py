"""``train.time_budget_min``: fit the train stage into a wall-clock budget.

A few training and inference steps of the real backbone, at its batch and image size on this
machine, give images per second; from those and the data's size the plan takes the largest
number of unfrozen epochs (0 included: the frozen-only path) for which every fold of every
backbone fits the budget, and the number of fold processes (one per GPU). The plan is printed
before training and saved in ``runs/<exp>/<backbone>/plan.json``, so a re-run (or a resumed
run) keeps the same epochs instead of re-measuring into a different plan.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.config.paths import Paths
from pipeline.config.schema import BackboneConfig, Config, PhaseConfig
from pipeline.core import artifacts
from pipeline.domain.tasks import TaskSpec
from pipeline.engine.backbones import create_backbone, data_config
from pipeline.engine.fit import (
    Runtime,
    Stepper,
    build_optimizer,
    build_scheduler,
    default_workers,
    make_loss,
    pass_losses,
)
from pipeline.training.phases import train_mode


@dataclass(frozen=True)
class Speeds:
    train_img_s: float  # forward + backward + optimizer step, unfrozen
    infer_img_s: float  # forward only
    load_img_s: float = float("inf")  # image files read, decoded and transformed (inf: not measured)
    overlap: int = 0  # loader workers that hide the loading behind the model (on a GPU); 0: it adds up

    def train_s(self) -> float:
        """Seconds per image of a training pass, loading included."""
        return self._with_loading(1 / self.train_img_s)

    def infer_s(self) -> float:
        """Seconds per image of an inference pass, loading included."""
        return self._with_loading(1 / self.infer_img_s)

    def _with_loading(self, compute_s: float) -> float:
        load_s = 1 / self.load_img_s
        return max(compute_s, load_s / self.overlap) if self.overlap else compute_s + load_s


@dataclass(frozen=True)
class Plan:
    unfrozen_epochs: int
    jobs: int
    seconds: float  # the estimate for every fold of this backbone
    budget_s: float

    def describe(self, name: str, speeds: Speeds) -> str:
        path = "frozen-only (the head on cached features)" if self.unfrozen_epochs == 0 else \
            f"{self.unfrozen_epochs} unfrozen epochs per fold"
        return (f"{name}: time budget {self.budget_s / 60:.1f} min -> {path}, {self.jobs} fold process(es); "
                f"estimated {self.seconds / 60:.1f} min from {speeds.train_img_s:.0f} train / "
                f"{speeds.infer_img_s:.0f} inference images/s measured on this machine")


def measure_speeds(cfg: Config, bcfg: BackboneConfig, spec: TaskSpec, targets: np.ndarray, steps: int = 3,
                   batch: int | None = None, image_paths=None) -> Speeds:
    """Images/s of the backbone's training step and forward pass on random uint8 images with real
    encoded ``targets`` (the median of ``steps`` timed steps after two untimed ones), at the configured
    batch or a smaller ``batch`` (a quicker, on a GPU more pessimistic, measurement); with
    ``image_paths``, also of reading a few of those files through the train transform."""
    model = create_backbone(bcfg, spec.num_outputs, Paths(cfg).exp_dir)
    dc = data_config(model, bcfg, cfg.augment.crop_pct)
    rt = Runtime.create(cfg.train, dc["mean"], dc["std"])
    rt.prepare_model(model)
    size = dc["size"]
    batch = min(batch or 10**9, bcfg.batch_size or cfg.train.batch_size)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    y = torch.from_numpy(np.resize(targets, (batch, *targets.shape[1:])))
    phase = PhaseConfig(epochs=1, lr=1e-4)
    optimizer = build_optimizer(model, cfg.train, phase, frozen=False)
    stepper = Stepper(optimizer, build_scheduler(optimizer, phase, steps + 1), rt, cfg.train, model.parameters())
    loss_fn = make_loss(spec, cfg.train)

    def train_step():
        train_mode(model, cfg.train)  # as the unfrozen phase trains (frozen BatchNorm statistics are faster)
        images, targets = rt.images(x), y.to(rt.device)
        chunk = rt.train_chunk(model, images) or len(images)  # in the passes the unfrozen phase makes
        for loss, _, share in pass_losses(rt, loss_fn, model, images, targets, chunk):
            stepper.backward_part(loss, share)
        stepper.end_batch(last=True)

    @torch.no_grad()
    def infer_step():
        model.eval()
        with rt.autocast():
            model(rt.images(x))

    train_img_s = batch / _seconds_per_call(train_step, steps, rt)
    infer_img_s = batch / _seconds_per_call(infer_step, steps, rt)
    if image_paths is None:
        return Speeds(train_img_s, infer_img_s)
    workers = default_workers(rt, cfg.train.num_workers)
    return Speeds(train_img_s, infer_img_s, load_img_s=_load_speed(cfg, dc, image_paths),
                  overlap=workers if rt.cuda else 0)


LOAD_IMAGES = 12  # files read to time the loading (after one untimed)


def _load_speed(cfg: Config, dc: dict, image_paths) -> float:
    """Images/s of reading, decoding and transforming image files as a train loader does."""
    from pipeline.data.datasets import ImageDataset
    from pipeline.domain.transforms import scaled_side, train_transform

    paths = list(image_paths)[:LOAD_IMAGES + 1]
    aug = cfg.augment
    dataset = ImageDataset(np.asarray(paths), None, train_transform(aug.train, dc["size"], dc["interpolation"],
                                                                   aug.resize, dc["crop_pct"]),
                           decode=(scaled_side(dc["size"], dc["crop_pct"]), aug.resize))
    dataset[0]
    start = time.perf_counter()
    for i in range(1, len(paths)):
        dataset[i]
    return max(len(paths) - 1, 1) / max(time.perf_counter() - start, 1e-9)


def _seconds_per_call(fn, calls: int, rt: Runtime, warmups: int = 2) -> float:
    """The median seconds of ``calls`` timed calls of ``fn``, after ``warmups`` untimed ones
    (allocations, thread pools, oneDNN and cuDNN kernel choice: the first calls of a process ran at
    half the speed of later ones). A median of single calls, not a mean, so that one call slowed by
    another process does not set the plan."""
    for _ in range(warmups):
        fn()
    times = []
    for _ in range(max(calls, 1)):
        if rt.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if rt.cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def plan_epochs(speeds: Speeds, n_train: int, n_test: int, n_folds: int, views: int, max_epochs: int,
                budget_s: float, jobs: int = 1, frozen_views: int | None = None) -> Plan:
    """The most unfrozen epochs (up to ``max_epochs``) whose estimated time fits ``budget_s``.

    Per backbone: one forward pass over the train images for the frozen features; per fold and
    unfrozen epoch, a training pass over the fold's train rows and a validation pass; per fold,
    the TTA predictions of the validation and test rows. Folds split over ``jobs`` processes.
    The frozen-only path predicts from cached features: one pass per image and view, all folds
    (``frozen_views`` of them: ``augment.frozen_zoom`` adds one; default ``views``)."""
    valid = n_train / n_folds
    features = n_train * speeds.infer_s()

    def seconds(epochs: int) -> float:
        if epochs == 0:
            fv = frozen_views or views
            return features + (n_train * (fv - 1) + n_test * fv) * speeds.infer_s()
        per_epoch = (n_train - valid) * speeds.train_s() + valid * speeds.infer_s()
        per_fold = epochs * per_epoch + (valid + n_test) * views * speeds.infer_s()
        return features + per_fold * -(-n_folds // jobs)

    epochs = max([e for e in range(max_epochs + 1) if seconds(e) <= budget_s], default=0)
    return Plan(epochs, jobs, seconds(epochs), budget_s)


def planned_config(cfg: Config, bcfg: BackboneConfig, spec: TaskSpec, targets: np.ndarray, n_test: int,
                   jobs: int) -> tuple[Config, Plan | None]:
    """``cfg`` with the unfrozen epochs the time budget allows and the budget itself spent
    (``time_budget_min: null``, so that fold processes and resumed runs train the same plan);
    unchanged without a budget. The budget is shared equally by the backbones; a saved plan for
    the same settings is reused. ``targets``: every train row, encoded."""
    minutes, n_train = cfg.train.time_budget_min, len(targets)
    if minutes is None:
        return cfg, None
    path = Paths(cfg).backbone_dir(bcfg.slug) / "plan.json"
    key = artifacts.fingerprint({"budget": minutes, "backbone": dataclasses.asdict(bcfg), "jobs": jobs,
                                 "train": dataclasses.asdict(cfg.train), "rows": [n_train, n_test],
                                 "folds": cfg.folds.n_splits, "tta": list(cfg.augment.tta),
                                 "frozen_zoom": cfg.augment.frozen_zoom, "backbones": len(cfg.backbones)})
    saved = artifacts.read_json(path) if path.exists() else None
    if saved is not None and saved.get("key") == key:
        plan, speeds = Plan(**saved["plan"]), Speeds(**saved["speeds"])
    else:
        speeds = measure_speeds(cfg, bcfg, spec, targets)
        plan = plan_epochs(speeds, n_train, n_test, cfg.folds.n_splits, len(cfg.augment.tta),
                           cfg.train.unfrozen.epochs, minutes * 60 / len(cfg.backbones), jobs,
                           frozen_views=len(cfg.augment.views(frozen_only=True)))
        artifacts.write_json(path, {"key": key, "plan": dataclasses.asdict(plan), "speeds": dataclasses.asdict(speeds)})
    print(plan.describe(bcfg.slug, speeds))
    unfrozen = dataclasses.replace(cfg.train.unfrozen, epochs=plan.unfrozen_epochs)
    return cfg.replace(train=dataclasses.replace(cfg.train, unfrozen=unfrozen, time_budget_min=None)), plan


# ---------------------------------------------------------------- the whole run (``make all BUDGET=``)


@dataclass(frozen=True)
class RunCosts:
    """Estimated seconds of one backbone's steps in a budgeted whole run, from measured speeds."""

    frozen_s: float  # the frozen-only path: features of every image and view, probe, predictions
    epoch_s: float  # one unfrozen epoch of one fold: train rows through forward+backward, validation forward
    predict_s: float  # one fold's TTA predictions of its validation and test rows
    n_folds: int

    def unfreeze_s(self, epochs: int, screened_lrs: int, decides: bool) -> float:
        """Every fold unfrozen for ``epochs`` (fold 0 first screens ``screened_lrs`` LRs for one
        epoch each when ``decides``: ``train.unfreeze: auto``; the chosen one's run becomes fold 0)."""
        screening = (screened_lrs - 1) * self.epoch_s if decides else 0.0
        return screening + self.n_folds * (epochs * self.epoch_s + self.predict_s)

    def decision_s(self, epochs: int, screened_lrs: int) -> float:
        """What ``auto`` spends before it knows (fold 0's screening and finishing), all of it lost
        when it decides frozen-only."""
        return (screened_lrs + epochs - 1) * self.epoch_s


def run_costs(speeds: Speeds, n_train: int, n_test: int, n_folds: int, views: int,
              frozen_views: int | None = None) -> RunCosts:
    """``frozen_views``: the frozen-only path's TTA views (``augment.frozen_zoom`` adds one; default ``views``)."""
    valid = n_train / n_folds
    frozen = (n_train + n_test) * (frozen_views or views) * speeds.infer_s()
    epoch = (n_train - valid) * speeds.train_s() + valid * speeds.infer_s()
    return RunCosts(frozen, epoch, (valid + n_test) * views * speeds.infer_s(), n_folds)


def epochs_that_fit(costs: RunCosts, max_epochs: int, screened_lrs: int, decides: bool, seconds: float) -> int:
    """The most unfrozen epochs (up to ``max_epochs``; 0: none) whose run of every fold, should
    the folds unfreeze, fits in ``seconds``."""
    return max([e for e in range(1, max_epochs + 1) if costs.unfreeze_s(e, screened_lrs, decides) <= seconds],
               default=0)
