"""Experiment config: one YAML file per experiment, validated into frozen dataclasses.

Every section is a dataclass; unknown keys, wrong types and out-of-range values raise a
:class:`PipelineError` that names the key and lists the valid ones. ``key.sub=value``
words on the command line override the file (values are parsed as YAML, so
``train.unfrozen.lr=3e-4`` is a float and ``augment.tta=[identity,hflip]`` a list). A top-level
``preset`` (:mod:`pipeline.config.presets`) lies under both: schema defaults < preset < file < words.

Example
-------
>>> cfg = load_config("configs/demo.yaml", ["train.unfrozen.epochs=1"])  # doctest: +SKIP
>>> cfg.train.unfrozen.epochs  # doctest: +SKIP
1
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from pipeline.config.presets import PRESETS, preset_raw
from pipeline.core.errors import PipelineError

TASKS = ("binary", "multiclass", "multilabel", "regression")
FOLD_STRATEGIES = ("kfold", "stratified", "group", "stratified_group", "multilabel_stratified", "stratified_regression")
WEIGHTS_KINDS = ("hub", "bundled", "none")  # or a local file path
ENSEMBLE_METHODS = ("mean", "weighted", "rank", "hill_climb", "stacking")
PRUNERS = ("median", "hyperband", "wilcoxon", "none")
SAMPLERS = ("tpe", "random")
AMP_DTYPES = ("auto", "bf16", "fp16")
KEEP = ("best", "last", "swa")  # which weights of a fold are kept (train.keep)
UNFREEZE = ("always", "never", "auto")
EXECUTORS = ("local", "ray")  # where train-folds runs the folds (train.executor)
RAY_ADDRESS = re.compile(r"^(ray://)?[A-Za-z0-9._-]+:\d{1,5}$")  # host:port, or Ray Client's ray://host:port


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise PipelineError(f"config key '{key}': {message}")


@dataclass(frozen=True)
class DataConfig:
    root: str = "data"
    task: str = "multiclass"
    train_csv: Optional[str] = "train.csv"  # null: read class sub-folders of train_dir
    train_dir: str = "train"
    test_dir: str = "test"
    sample_submission: str = "sample_submission.csv"
    id_column: str = "id"
    target_columns: list[str] = field(default_factory=lambda: ["label"])
    group_column: Optional[str] = None
    image_extension: Optional[str] = None  # appended to ids that carry none; null: detect
    label_separator: str = " "  # multilabel labels in one column
    classes: Optional[list[str]] = None  # fixed class order; null: sorted unique values
    positive_class: Optional[str] = None  # binary: the class `pred` is the probability of; null: second sorted
    max_image_pixels: Optional[int] = 89_478_485  # larger images are refused; Pillow's default limit; null: none
    exclude_ids: str | None = None  # CSV of train ids to drop before folds (relative to root, or absolute)

    def validate(self, key: str) -> None:
        _check(self.task in TASKS, f"{key}.task", f"'{self.task}' is not a task; valid: {', '.join(TASKS)}")
        _check(self.positive_class is None or self.task == "binary", f"{key}.positive_class",
               f"applies to binary tasks; data.task is {self.task} (set it to null)")
        _check(len(self.target_columns) >= 1, f"{key}.target_columns", "name at least one target column")
        _check(self.max_image_pixels is None or self.max_image_pixels >= 1, f"{key}.max_image_pixels",
               f"must be a positive number of pixels or null (no limit), got {self.max_image_pixels}")
        _check(self.exclude_ids is None or (self.exclude_ids.strip() != "" and
                                            self.exclude_ids.strip().lower().endswith(".csv")),
               f"{key}.exclude_ids", f"{self.exclude_ids!r}: name a CSV file (.csv) of train ids to drop, relative to "
                                     f"data.root or absolute (e.g. a copy of runs/<exp>/label_issues.csv), or null")


@dataclass(frozen=True)
class FoldsConfig:
    n_splits: int = 5
    strategy: str = "stratified"
    seed: int = 42
    n_bins: int = 10  # stratified_regression: quantile bins of the target
    # train images within a few pHash bits of each other (the data report's near-duplicates) stay in one fold,
    # joined with data.group_column's groups; stratified and kfold then split groups (stratified_group, group)
    group_near_duplicates: bool = False

    def validate(self, key: str) -> None:
        _check(self.n_splits >= 2, f"{key}.n_splits", f"must be at least 2, got {self.n_splits}")
        _check(self.strategy in FOLD_STRATEGIES, f"{key}.strategy",
               f"'{self.strategy}' is not a strategy; valid: {', '.join(FOLD_STRATEGIES)}")
        _check(self.n_bins >= 2, f"{key}.n_bins", "must be at least 2")


ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a model id is a file name on every OS


@dataclass(frozen=True)
class BackboneConfig:
    """One model variant: a timm architecture with its weights, size and (optionally) its own
    ``train.*``/``augment.*`` settings; ``seeds`` expands one entry into one variant per seed."""

    name: str = "efficientnet_lite0"
    id: Optional[str] = None  # the variant's name in every path, column and row; null: the timm name
    weights: str = "bundled"  # hub | bundled | none | path to .safetensors/.pth/.bin
    image_size: Optional[int] = None  # null: the model's pretrained input size
    batch_size: Optional[int] = None  # null: train.batch_size
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    train: dict = field(default_factory=dict)  # this variant's overrides of train.* keys
    augment: dict = field(default_factory=dict)  # this variant's overrides of augment.* keys
    seeds: Optional[list[int]] = None  # one variant per seed: <id>-s<seed>, averaged as <id>
    seed_group: Optional[str] = None  # set by `seeds`: the entry's id, which names the seed-mean model

    @property
    def slug(self) -> str:
        """The variant's id (the timm name with ``/`` replaced when no ``id`` is given)."""
        return self.id or self.name.replace("/", "_")

    def validate(self, key: str) -> None:
        _check(bool(self.name), f"{key}.name", "give a timm model name")
        _check(ID_PATTERN.match(self.slug) is not None, f"{key}.id",
               f"'{self.slug}' is not a file-name-safe id; use letters, digits, '.', '_' and '-'")
        _check(self.seeds is None or len(self.seeds) >= 1, f"{key}.seeds", "list at least one seed, or null")
        _check(self.image_size is None or self.image_size >= 8, f"{key}.image_size", "must be at least 8")
        _check(self.batch_size is None or self.batch_size >= 1, f"{key}.batch_size", "must be at least 1")
        _check(0.0 <= self.drop_rate < 1.0, f"{key}.drop_rate", "must be in [0, 1)")


@dataclass(frozen=True)
class PhaseConfig:
    epochs: int = 1
    lr: float = 1e-3
    backbone_lr_mult: float = 0.1  # unfrozen phase: backbone LR = head LR x this
    layer_decay: Optional[float] = None  # unfrozen phase: timm layer-wise decay instead of the mult
    warmup_epochs: float = 0.0
    min_lr_ratio: float = 0.01
    optimizer: Optional[str] = None  # this phase's timm optimizer; null: train.optimizer

    def validate(self, key: str) -> None:
        _check(self.epochs >= 0, f"{key}.epochs", f"must be >= 0, got {self.epochs}")
        if self.optimizer is not None:
            _check_optimizer(self.optimizer, f"{key}.optimizer")
        _check(0 < self.lr < 10, f"{key}.lr", f"must be in (0, 10), got {self.lr}")
        _check(0 < self.backbone_lr_mult <= 10, f"{key}.backbone_lr_mult", "must be in (0, 10]")
        _check(self.layer_decay is None or 0 < self.layer_decay <= 1, f"{key}.layer_decay", "must be in (0, 1]")
        _check(self.warmup_epochs >= 0, f"{key}.warmup_epochs", "must be >= 0")
        _check(0 <= self.min_lr_ratio <= 1, f"{key}.min_lr_ratio", "must be in [0, 1]")


@dataclass(frozen=True)
class TrainConfig:
    frozen: PhaseConfig = field(default_factory=lambda: PhaseConfig(epochs=1, lr=3e-3))
    # photo defaults measured on ../shared/devdata/scenes (docs/training.md): one LR for the whole
    # network, low enough that the probe's head and the pretrained features are not thrown away
    unfrozen: PhaseConfig = field(default_factory=lambda: PhaseConfig(epochs=3, lr=1e-4, backbone_lr_mult=1.0,
                                                                      warmup_epochs=0.5))
    batch_size: int = 64
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    loss: str = "auto"  # auto | ce | bce | mse | huber
    label_smoothing: float = 0.0
    grad_accum: int = 1
    grad_clip: Optional[float] = None
    ema: bool = False
    ema_decay: float = 0.998
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mixup_prob: float = 1.0
    early_stopping_patience: Optional[int] = None
    time_budget_min: Optional[float] = None  # fit train-folds into this many minutes (chooses unfrozen epochs)
    min_unfrozen_epochs: int = 1  # early stopping never ends the unfrozen phase before this many epochs
    keep: str = "best"  # best (epoch by the validation score) | last | swa (average of the last swa_epochs)
    unfreeze: str = "auto"  # always | never (frozen-only) | auto: fold 0 decides, with a paired test, whether to
    unfreeze_lrs: list[float] = field(default_factory=list)  # auto: other unfrozen LRs fold 0 screens (one epoch each)
    unfreeze_alpha: float = 0.5  # auto: unfreeze when the paired bootstrap's one-sided p of no gain is below this
    swa_epochs: int = 2
    freeze_bn: bool = True  # unfrozen phase: BatchNorm keeps its pretrained running statistics
    adapt_bn: bool = False  # re-estimate BatchNorm statistics on the train images before the frozen phase
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: bool = True  # CUDA only
    amp_dtype: str = "auto"  # auto (bf16 on compute capability 8.0+, else fp16) | bf16 | fp16
    channels_last: bool = True  # NHWC memory layout: faster convolutions on CUDA and on CPUs
    compile: bool = False  # torch.compile the training forward and prediction (falls back to eager)
    num_workers: Optional[int] = None  # null: sized to the machine
    cache_images: bool = False  # decoded, resized images in memory
    cache_features: bool = True  # frozen phase on cached pooled features when possible
    linear_probe: bool = True  # fit the head to convergence on cached features (LP-FT)
    probe_views: list[str] = field(default_factory=lambda: ["identity"])  # TTA views the probe trains on
    # frozen-only models with the linear probe: the test set is predicted by one more probe fitted on every train
    # row (the fold heads still give the OOF predictions and the CV); false: by the mean of the fold heads
    all_rows_probe: bool = True
    use_tuned: str = "auto"  # auto (use tune/best.json when present) | true | false
    seed: int = 42
    deterministic: bool = False  # deterministic kernels, cuDNN without autotuning (slower)
    pseudo_labels: Optional[str] = None  # CSV of pseudo-labelled test rows (`pipeline pseudo`): they only ever train
    executor: str = "local"  # local (this machine's processes) | ray (each fold a task on a Ray cluster)
    ray_address: Optional[str] = None  # executor ray: null (start a Ray instance here) | auto | host:port | ray://host:port

    def validate(self, key: str) -> None:
        self.frozen.validate(f"{key}.frozen")
        self.unfrozen.validate(f"{key}.unfrozen")
        _check(self.batch_size >= 1, f"{key}.batch_size", "must be at least 1")
        _check(self.loss in ("auto", "ce", "bce", "mse", "huber"), f"{key}.loss",
               f"'{self.loss}' is not a loss; valid: auto, ce, bce, mse, huber")
        _check(0 <= self.label_smoothing < 1, f"{key}.label_smoothing", "must be in [0, 1)")
        _check(self.grad_accum >= 1, f"{key}.grad_accum", "must be at least 1")
        _check(self.grad_clip is None or self.grad_clip > 0, f"{key}.grad_clip", "must be > 0 or null")
        _check(0 < self.ema_decay < 1, f"{key}.ema_decay", "must be in (0, 1)")
        _check(self.mixup_alpha >= 0 and self.cutmix_alpha >= 0, f"{key}.mixup_alpha",
               "mixup_alpha and cutmix_alpha must be >= 0")
        _check(self.early_stopping_patience is None or self.early_stopping_patience >= 1,
               f"{key}.early_stopping_patience", "must be >= 1 or null")
        _check(self.use_tuned in ("auto", "true", "false"), f"{key}.use_tuned", "valid: auto, true, false")
        _check(self.keep in KEEP, f"{key}.keep", f"'{self.keep}' is not a choice; valid: {', '.join(KEEP)}")
        _check(self.swa_epochs >= 1, f"{key}.swa_epochs", "must be at least 1")
        _check(self.unfreeze in UNFREEZE, f"{key}.unfreeze",
               f"'{self.unfreeze}' is not a choice; valid: {', '.join(UNFREEZE)}")
        _check(all(isinstance(lr, (int, float)) and lr > 0 for lr in self.unfreeze_lrs), f"{key}.unfreeze_lrs",
               f"{self.unfreeze_lrs}: list positive learning rates (or none: screen only train.unfrozen.lr)")
        _check(0 < self.unfreeze_alpha <= 1, f"{key}.unfreeze_alpha",
               f"{self.unfreeze_alpha}: must be in (0, 1] (0.5: a gain more likely than not; 0.05: a significant one)")
        _check(self.time_budget_min is None or self.time_budget_min > 0, f"{key}.time_budget_min",
               "must be > 0 minutes or null")
        _check(self.min_unfrozen_epochs >= 0, f"{key}.min_unfrozen_epochs", "must be >= 0")
        _check(self.amp_dtype in AMP_DTYPES, f"{key}.amp_dtype",
               f"'{self.amp_dtype}' is not a precision; valid: {', '.join(AMP_DTYPES)}")
        _check(self.num_workers is None or self.num_workers >= 0, f"{key}.num_workers", "must be >= 0")
        _check_optimizer(self.optimizer, f"{key}.optimizer")
        from pipeline.domain.transforms import TTA_VIEWS  # local import: transforms import albumentations
        _check(len(self.probe_views) >= 1 and all(v in TTA_VIEWS for v in self.probe_views), f"{key}.probe_views",
               f"{self.probe_views}: list one or more TTA views; valid: {', '.join(TTA_VIEWS)}")
        _check(self.frozen.optimizer is None or not self.linear_probe, f"{key}.frozen.optimizer",
               f"'{self.frozen.optimizer}' would never run: train.linear_probe is true, which fits the head with "
               f"L-BFGS instead of frozen epochs; set train.linear_probe=false or train.frozen.optimizer=null")
        _check(self.executor in EXECUTORS, f"{key}.executor",
               f"'{self.executor}' is not an executor; valid: {', '.join(EXECUTORS)}")
        _check(self.ray_address in (None, "auto") or RAY_ADDRESS.match(self.ray_address) is not None,
               f"{key}.ray_address", f"'{self.ray_address}' is not a Ray address; give auto (this machine's cluster), "
                                     f"host:6379 (a head node), ray://host:10001 (Ray Client) or null (start one here)")
        import importlib.util  # only asks whether ray is there: importing it takes a second
        _check(self.executor != "ray" or importlib.util.find_spec("ray") is not None, f"{key}.executor",
               "ray is not installed; pip install -e '.[scale]' (on the driver and on every node of the cluster)")


def _check_optimizer(name: str, key: str) -> None:
    """The optimizer must be one timm's ``create_optimizer_v2`` knows (``lookahead_`` prefix allowed)."""
    import timm.optim  # local import: timm is heavy and most keys do not need it

    if not hasattr(timm.optim, "list_optimizers"):  # timm < 1.0.10: no registry to ask
        return
    known = timm.optim.list_optimizers()
    base = name.lower().removeprefix("lookahead_")
    if base not in known:
        import difflib
        close = difflib.get_close_matches(base, known, n=5, cutoff=0.6)
        hint = f"did you mean: {', '.join(close)}" if close else "common ones: adamw, adam, sgd, lamb, lion"
        raise PipelineError(f"config key '{key}': '{name}' is not a timm optimizer; {hint} "
                            f"(timm.optim.list_optimizers() lists all {len(known)})")


@dataclass(frozen=True)
class AugmentConfig:
    # albumentations transform names with their arguments, applied to train images only
    train: list[dict] = field(default_factory=lambda: [{"name": "HorizontalFlip", "p": 0.5}])
    frozen_phase: bool = False  # augment during the frozen phase too (disables the feature cache)
    resize: str = "crop"  # crop (shorter side, centre) | squash | pad: how every image becomes square
    # crop and squash: scale to image_size / crop_pct, keep the central image_size square; 1.0: the whole image;
    # null: each backbone's pretrained crop_pct (timm's eval framing, 0.875-0.95 for most timm models)
    crop_pct: Optional[float] = 1.0
    tta: list[str] = field(default_factory=lambda: ["identity", "hflip"])
    # a backbone whose folds are frozen-only (unfreeze never, auto deciding frozen-only, no unfrozen epoch)
    # predicts through the zoom view too (the central 80%, resized back): it helped probes, not fine-tuned models
    frozen_zoom: bool = True

    def views(self, frozen_only: bool) -> list[str]:
        """The TTA views of a model: ``tta``, plus ``zoom`` for a frozen-only one when ``frozen_zoom``."""
        return [*self.tta, "zoom"] if frozen_only and self.frozen_zoom and "zoom" not in self.tta else list(self.tta)

    def validate(self, key: str) -> None:
        from pipeline.domain.transforms import TTA_VIEWS  # local import: augment imports albumentations
        for i, spec in enumerate(self.train):
            _check(isinstance(spec, dict) and "name" in spec, f"{key}.train[{i}]",
                   "each transform is a mapping with a 'name' (an albumentations class) and its arguments")
        for i, spec in enumerate(self.train):  # names and arguments now, not after a phase has written files
            _check_transform(spec, f"{key}.train[{i}]", i)
        _check(len(self.tta) >= 1, f"{key}.tta", "list at least one view (identity)")
        _check(self.resize in ("crop", "squash", "pad"), f"{key}.resize",
               f"'{self.resize}' is not a resize policy; valid: crop, squash, pad")
        _check(self.crop_pct is None or (isinstance(self.crop_pct, (int, float)) and 0.5 <= self.crop_pct <= 1.0),
               f"{key}.crop_pct", f"{self.crop_pct!r}: a share of each side in [0.5, 1.0], or null for the "
                                  f"backbone's pretrained framing")
        for view in self.tta:
            _check(view in TTA_VIEWS, f"{key}.tta", f"'{view}' is not a TTA view; valid: {', '.join(TTA_VIEWS)}")


def _check_transform(spec: dict, key: str, index: int) -> None:
    """Build the transform once; albumentations only warns about an unknown argument (``pp: 0.5``
    for ``p``), which would silently train without it: refuse that too."""
    import warnings

    from pipeline.domain.transforms import build_user_transform

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            build_user_transform(spec, index)
        except PipelineError as exc:  # pydantic's validation report spans lines: one line of it
            lines = [line.strip() for line in str(exc).splitlines() if "further information" not in line]
            raise PipelineError("; ".join(line for line in lines if line)) from None
    for w in caught:
        if "not valid for transform" in str(w.message):
            raise PipelineError(f"config key {key} ({spec['name']}): {' '.join(str(w.message).split())}; "
                                f"check the argument names in albumentations' documentation")


@dataclass(frozen=True)
class TuneConfig:
    trials: int = 8
    folds: list[int] = field(default_factory=lambda: [0])
    frozen_epochs: Optional[int] = None  # null: train.frozen.epochs
    unfrozen_epochs: Optional[int] = None  # null: train.unfrozen.epochs
    frozen_lr: list[float] = field(default_factory=lambda: [1e-4, 3e-2])
    unfrozen_lr: list[float] = field(default_factory=lambda: [1e-5, 3e-3])
    backbone_lr_mult: list[float] = field(default_factory=lambda: [0.01, 1.0])
    weight_decay: Optional[list[float]] = None
    sampler: str = "tpe"
    pruner: str = "median"
    storage: Optional[str] = None  # null: sqlite file under runs/<exp>/<backbone>/tune/
    seed: int = 42
    timeout: Optional[float] = None

    def validate(self, key: str) -> None:
        _check(self.trials >= 1, f"{key}.trials", f"must be at least 1, got {self.trials}")
        _check(len(self.folds) >= 1, f"{key}.folds", "list at least one fold")
        for name in ("frozen_lr", "unfrozen_lr", "backbone_lr_mult", "weight_decay"):
            bounds = getattr(self, name)
            if bounds is None:
                continue
            _check(len(bounds) == 2, f"{key}.{name}", "give [low, high]")
            _check(0 < bounds[0] < bounds[1], f"{key}.{name}",
                   f"bounds must satisfy 0 < low < high (log-uniform), got {bounds}")
        _check(self.sampler in SAMPLERS, f"{key}.sampler",
               f"'{self.sampler}' is not a sampler; valid: {', '.join(SAMPLERS)}")
        _check(self.pruner in PRUNERS, f"{key}.pruner", f"'{self.pruner}' is not a pruner; valid: {', '.join(PRUNERS)}")


@dataclass(frozen=True)
class EnsembleConfig:
    methods: list[str] = field(default_factory=lambda: ["mean", "weighted", "hill_climb"])
    hill_climb_max_iter: int = 50
    seed_mean: bool = True  # a `seeds:` entry's variants enter the blends as one model, their mean
    postprocess: str = "auto"  # auto (thresholds / class bias / QWK cut-points fitted on OOF, nested-scored) | none

    def validate(self, key: str) -> None:
        _check(self.hill_climb_max_iter >= 1, f"{key}.hill_climb_max_iter", "must be at least 1")
        _check(self.postprocess in ("auto", "none"), f"{key}.postprocess",
               f"'{self.postprocess}' is not a choice; valid: auto, none")
        for m in self.methods:
            _check(m in ENSEMBLE_METHODS, f"{key}.methods",
                   f"'{m}' is not a method; valid: {', '.join(ENSEMBLE_METHODS)}")


@dataclass(frozen=True)
class SubmissionConfig:
    competition: Optional[str] = None  # Kaggle slug for `make submit`
    format: str = "auto"  # auto | labels | probabilities
    per_backbone: bool = True
    float_format: str = "%.6f"

    def validate(self, key: str) -> None:
        _check(self.format in ("auto", "labels", "probabilities"), f"{key}.format",
               "valid: auto, labels, probabilities")


@dataclass(frozen=True)
class PretrainConfig:
    data: Optional[DataConfig] = None  # the labelled set to pretrain on: the keys and layouts of data.*
    backbones: list[BackboneConfig] = field(default_factory=list)  # each -> runs/<exp>/<id>/pretrained.safetensors
    holdout: float = 0.1  # share of pretrain.data's rows held out to monitor (and pick the epoch of) pretraining
    train: dict = field(default_factory=dict)  # train.* overrides while pretraining, e.g. {unfrozen: {epochs: 10}}

    def validate(self, key: str, cfg: "Config") -> None:
        _check(0 < self.holdout <= 0.5, f"{key}.holdout", f"must be in (0, 0.5], got {self.holdout}")
        if self.data is not None:
            self.data.validate(f"{key}.data")
        ids = [b.slug for b in self.backbones]
        _check(len(set(ids)) == len(ids), f"{key}.backbones", f"ids must be unique, got {ids}")
        cfg.variant(BackboneConfig(train=self.train), key)  # pretrain.train names train.* keys
        for i, b in enumerate(self.backbones):
            b.validate(f"{key}.backbones[{i}]")
            _check(not b.seeds, f"{key}.backbones[{i}].seeds", "pretraining saves one checkpoint per id: no seeds")
            cfg.variant(self.backbone_variant(b), f"{key}.backbones[{i}]")  # the train overrides build a valid config

    def backbone_variant(self, b: BackboneConfig) -> BackboneConfig:
        """The entry with ``pretrain.train`` merged under its own ``train`` overrides."""
        return dataclasses.replace(b, train=_merge(self.train, b.train, "pretrain.train"))


TRACKING_BACKENDS = ("none", "mlflow", "tensorboard")


@dataclass(frozen=True)
class TrackingConfig:
    backend: str = "none"  # none | mlflow | tensorboard
    uri: Optional[str] = None  # MLflow tracking URI or TensorBoard folder; null: mlruns/ or tensorboard/ by runs_dir

    def validate(self, key: str) -> None:
        import importlib.util  # only asks whether the package is there: importing mlflow takes a second
        _check(self.backend in TRACKING_BACKENDS, f"{key}.backend",
               f"'{self.backend}' is not a backend; valid: {', '.join(TRACKING_BACKENDS)}")
        package = {"mlflow": "mlflow", "tensorboard": "tensorboard"}.get(self.backend)
        _check(package is None or importlib.util.find_spec(package) is not None, f"{key}.backend",
               f"{self.backend} is not installed; pip install -e '.[tracking]' (mlflow-skinny and tensorboard)")


@dataclass(frozen=True)
class Config:
    name: str
    data: DataConfig = field(default_factory=DataConfig)
    folds: FoldsConfig = field(default_factory=FoldsConfig)
    metric: str = "accuracy"
    backbones: list[BackboneConfig] = field(default_factory=lambda: [BackboneConfig()])
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)
    submission: SubmissionConfig = field(default_factory=SubmissionConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    runs_dir: str = "runs"
    folds_dir: str = "folds"
    submissions_dir: str = "submissions"
    time_budget_min: Optional[float] = None  # `make all`: the whole run in this many minutes, planned across backbones

    def validate(self) -> None:
        from pipeline.domain.metrics import METRICS  # local import keeps config import-light
        _check(bool(self.name) and "/" not in self.name, "name", "give a plain experiment name (used in file names)")
        self.data.validate("data")
        self.folds.validate("folds")
        _check(self.metric in METRICS, "metric",
               f"'{self.metric}' is not a metric; valid: {', '.join(sorted(METRICS))}")
        _check(len(self.backbones) >= 1, "backbones", "list at least one backbone")
        for i, b in enumerate(self.backbones):
            b.validate(f"backbones[{i}]")
        ids = [b.slug for b in self.backbones]
        dup = sorted({x for x in ids if ids.count(x) > 1})
        _check(not dup, "backbones", f"model ids must be unique, {dup} appears twice; give one of the entries "
                                     f"an `id:` (e.g. {dup[0] if dup else ''}-224)")
        groups = {b.seed_group for b in self.backbones if b.seed_group}
        clash = (set(ids) | groups) & set(ENSEMBLE_METHODS + ("ensemble",))
        _check(not clash, "backbones", f"{sorted(clash)} is also an ensemble method name; their submission "
                                       f"files would collide: give the entry another `id:`")
        clash = groups & set(ids)
        _check(not clash, "backbones", f"{sorted(clash)} names both a model and the seed-mean of a `seeds:` entry; "
                                       f"give one of them another `id:`")
        _check(self.time_budget_min is None or self.time_budget_min > 0, "time_budget_min",
               "give the whole run's minutes (> 0), or null for no budget")
        self.train.validate("train")
        self.augment.validate("augment")
        self.tune.validate("tune")
        self.ensemble.validate("ensemble")
        self.submission.validate("submission")
        self.tracking.validate("tracking")
        self.pretrain.validate("pretrain", self)

    def backbone(self, name: str) -> BackboneConfig:
        """The variant with this id (or the only variant of this timm name)."""
        for b in self.backbones:
            if name == b.slug:
                return b
        by_name = [b for b in self.backbones if b.name == name]
        if len(by_name) == 1:
            return by_name[0]
        raise PipelineError(f"model '{name}' is not an id in config key 'backbones'; "
                            f"valid: {', '.join(b.slug for b in self.backbones)}")

    def seed_groups(self) -> dict[str, list[BackboneConfig]]:
        """``seeds:`` entries: the seed-mean model's id -> its per-seed variants."""
        groups: dict[str, list[BackboneConfig]] = {}
        for b in self.backbones:
            if b.seed_group:
                groups.setdefault(b.seed_group, []).append(b)
        return groups

    def models(self, seed_mean: bool = True) -> dict[str, list[BackboneConfig]]:
        """Model id -> the variants whose predictions it averages, in config order: one entry per
        variant, and with ``seed_mean`` a ``seeds:`` entry's variants as one model (their mean)."""
        out: dict[str, list[BackboneConfig]] = {}
        for b in self.backbones:
            if seed_mean and b.seed_group:
                out.setdefault(b.seed_group, []).append(b)
            else:
                out[b.slug] = [b]
        return out

    def variant(self, bcfg: BackboneConfig, key: str | None = None) -> tuple["Config", BackboneConfig]:
        """This config as one variant trains it: the entry's ``train``/``augment`` overrides merged
        into those sections, and the entry without them (their effect now lives in the sections,
        so fingerprints and resolved configs count each setting once)."""
        key = key or f"backbones[{self.backbones.index(bcfg)}]"
        if not bcfg.train and not bcfg.augment:
            return self, bcfg
        sections = {}
        for name, cls in (("train", TrainConfig), ("augment", AugmentConfig)):
            raw = _merge(dataclasses.asdict(getattr(self, name)), getattr(bcfg, name), f"{key}.{name}")
            sections[name] = _build(cls, raw, f"{key}.{name}")
            sections[name].validate(f"{key}.{name}")
        return self.replace(**sections), dataclasses.replace(bcfg, train={}, augment={})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------- building from dicts


def _strip_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    tp, optional = _strip_optional(tp)
    if value is None:
        _check(optional, key, "may not be null")
        return None
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), key, f"expected a mapping, got {value!r}")
        return _build(tp, value, key)
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            value = [value]  # a single item where a list is expected
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is dict:
        _check(isinstance(value, dict), key, f"expected a mapping of keys to override, got {value!r}")
        return value
    if tp is bool:
        _check(isinstance(value, bool), key, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key,
               f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool):  # YAML reads `use_tuned: false` as a boolean
            return "true" if value else "false"
        _check(isinstance(value, (str, int, float)) and not isinstance(value, bool), key,
               f"expected text, got {value!r}")
        return str(value)
    return value


def _build(cls, data: dict, key: str = ""):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = f"{key}.{unknown[0]}" if key else unknown[0]
        valid = [*fields, *(LOADER_KEYS if cls is Config else ())]
        raise PipelineError(f"unknown config key '{where}'; valid keys{' in ' + key if key else ''}: "
                            f"{', '.join(valid)}")
    hints = typing.get_type_hints(cls)
    data = {name: _with_section_defaults(fields[name], value) for name, value in data.items()}
    kwargs = {name: _coerce(value, hints[name], f"{key}.{name}" if key else name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required key is missing
        raise PipelineError(f"config section '{key or 'top level'}': {exc}") from None


def _with_section_defaults(f: dataclasses.Field, value: Any) -> Any:
    """A partly given section keeps its own defaults for the keys not given: ``train: {unfrozen:
    {epochs: 5}}`` is the default unfrozen phase (its LR, multiplier, warmup) with 5 epochs, not a
    bare ``PhaseConfig`` with the generic defaults of every phase."""
    if not isinstance(value, dict) or f.default_factory is dataclasses.MISSING:
        return value
    default = f.default_factory()
    if not dataclasses.is_dataclass(default):
        return value
    return _merge(dataclasses.asdict(default), value, f.name)


def apply_override(raw: dict, word: str) -> None:
    """Apply one ``key.sub=value`` word to a raw config mapping, in place."""
    if "=" not in word:
        raise PipelineError(f"override '{word}' is not of the form key.sub=value (e.g. train.unfrozen.lr=3e-4)")
    dotted, text = word.split("=", 1)
    try:
        value = yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError as exc:
        raise PipelineError(f"override '{word}': the value is not valid YAML ({exc})") from None
    parts = dotted.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        node = _descend(node, part, ".".join(parts[: i + 1]))
    last = parts[-1]
    if not isinstance(node, (dict, list)):
        raise PipelineError(f"override key '{dotted}': '{'.'.join(parts[:-1])}' is a value, not a section")
    if isinstance(node, list):
        node[_index(node, last, dotted)] = value
    else:
        node[last] = value


def _index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise PipelineError(f"override key '{key}': '{part}' is not an index of a list of {len(node)} items")
    return int(part)


def _descend(node: Any, part: str, key: str) -> Any:
    if isinstance(node, list):
        return node[_index(node, part, key)]
    if not isinstance(node, dict):
        raise PipelineError(f"override key '{key}': its parent is not a section")
    child = node.get(part)
    if child is None:
        child = node[part] = {}
    return child


def _merge(base: dict, changes: dict, key: str) -> dict:
    """``base`` with ``changes`` merged in, recursively for sections (unknown keys are left for
    :func:`_build` to refuse with the valid ones)."""
    out = dict(base)
    for k, v in changes.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v, f"{key}.{k}")
        else:
            out[k] = v
    return out


def expand_seeds(backbones: list[BackboneConfig]) -> list[BackboneConfig]:
    """Every entry with its ``id`` resolved; an entry with ``seeds: [a, b]`` becomes the variants
    ``<id>-s<a>``, ``<id>-s<b>`` (``train.seed`` set, ``seed_group`` = ``<id>``)."""
    out = []
    for b in backbones:
        if not b.seeds:
            out.append(dataclasses.replace(b, id=b.slug))
            continue
        for seed in b.seeds:
            out.append(dataclasses.replace(b, id=f"{b.slug}-s{seed}", seeds=None, seed_group=b.slug,
                                           train={**b.train, "seed": seed}))
    return out


LOADER_KEYS = ("preset",)  # top-level keys the loader reads before building the Config (not fields of it)


def chosen_preset(raw: dict, overrides: list[str] | tuple = ()) -> str | None:
    """The preset a raw config and its override words choose: the last ``preset=...`` word's, else
    the file's ``preset`` (None: no preset); an unknown name is an error listing the valid ones."""
    name = raw.get("preset")
    for word in overrides:
        dotted, _, text = word.partition("=")
        if dotted.strip() == "preset":
            try:
                name = yaml.safe_load(text) if text != "" else None
            except yaml.YAMLError:
                name = text
    _check(name is None or (isinstance(name, str) and name in PRESETS), "preset",
           f"{name!r} is not a preset; valid: {', '.join(PRESETS)} (or null: none)")
    return name


def _with_preset(raw: dict, name: str | None) -> dict:
    """``raw`` over the preset ``name``'s keys (mappings merged, lists replaced), without the key
    ``preset``; the override words go on top of this (:func:`config_from_dict`)."""
    raw = {k: v for k, v in raw.items() if k != "preset"}
    return raw if name is None else _merge(preset_raw(name), raw, "preset")


def config_from_dict(raw: dict, overrides: list[str] | tuple = ()) -> Config:
    """The validated Config of a raw mapping (a YAML file's) and ``key=value`` words: schema
    defaults < the chosen ``preset``'s keys < ``raw`` < the words (docs/configuration.md)."""
    raw = yaml.safe_load(yaml.safe_dump(raw))  # deep copy through YAML types
    preset = chosen_preset(raw, overrides)  # from the last word first: the words then override the preset too
    raw = _with_preset(raw, preset)
    for word in overrides:
        apply_override(raw, word)
    _check(raw.pop("preset", preset) == preset, "preset",
           f"give one name ({', '.join(PRESETS)}) or null, not a section")
    cfg = _build(Config, raw)
    for i, b in enumerate(cfg.backbones):  # each entry's overrides make a valid config (keys as written)
        cfg.variant(b, f"backbones[{i}]")
    cfg = cfg.replace(backbones=expand_seeds(cfg.backbones))
    cfg.validate()
    return cfg


def load_config(path: str | Path, overrides: list[str] | tuple = ()) -> Config:
    """Read, override and validate an experiment config."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"config file {path} does not exist; see configs/ for examples (configs/demo.yaml)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise PipelineError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise PipelineError(f"config file {path} must be a mapping of sections (name, data, folds, ...)")
    raw.setdefault("name", path.stem)
    try:
        return config_from_dict(raw, overrides)
    except PipelineError as exc:
        raise PipelineError(f"{path}: {exc}") from None


def dump_config(cfg: Config) -> str:
    """The config as YAML, with a password in ``tune.storage`` shown as ``***`` (resolved configs are
    written beside every run; the storage URL is run-only, so nothing reads it back)."""
    raw = cfg.to_dict()
    storage = raw.get("tune", {}).get("storage")
    if isinstance(storage, str):
        raw["tune"]["storage"] = re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", storage)
    return yaml.safe_dump(raw, sort_keys=False)


def flatten(tree: dict, prefix: str = "", keep_empty: bool = True) -> dict[str, Any]:
    """A nested mapping as dotted keys: ``{"train": {"frozen": {"lr": 0.001}}}`` ->
    ``{"train.frozen.lr": 0.001}``. Values (lists included) are kept as they are; an empty mapping
    is a value ``{}`` too, or left out with ``keep_empty=False``.

    >>> flatten({"train": {"frozen": {"lr": 0.001}, "tta": ["identity"]}, "backbone": {"train": {}}})
    {'train.frozen.lr': 0.001, 'train.tta': ['identity'], 'backbone.train': {}}
    """
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and (value or not keep_empty):
            flat.update(flatten(value, name + ".", keep_empty))
        else:
            flat[name] = value
    return flat
