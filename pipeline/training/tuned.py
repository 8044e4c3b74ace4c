"""The tuned-LR contract between the tune and train stages: what a study's objective was
(recorded in best.json), and a config with the tuned LRs when they still apply."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from pipeline.config.paths import Paths
from pipeline.config.run_only import result_settings, setting_changes
from pipeline.config.schema import BackboneConfig, Config, flatten
from pipeline.core import artifacts
from pipeline.core.errors import PipelineError
from pipeline.engine.fit import LR_SCHEDULE


def apply_tuned(cfg: Config, bcfg: BackboneConfig) -> tuple[Config, dict]:
    """Config with the tune stage's best LRs when ``train.use_tuned`` says so; and where each
    LR came from (``config`` or the best.json path).

    LRs tuned for one objective (image size, budget, augmentation, data, ...) are no evidence
    for another, so best.json's recorded objective is compared with this config's: ``auto``
    then falls back to the config's LRs, ``true`` uses the tuned ones; both print the changes."""
    path = Paths(cfg).tuned_params(bcfg.slug)
    use = cfg.train.use_tuned == "true" or (cfg.train.use_tuned == "auto" and path.exists())
    if not use:
        return cfg, {"lr_source": "config"}
    if not path.exists():
        raise PipelineError(f"train.use_tuned is true but {path} does not exist; run `make tune` first")
    best = artifacts.read_json(path)
    params = best["params"]
    changes = tuned_objective_changes(cfg, bcfg, best)
    if changes and cfg.train.use_tuned == "auto":
        print(f"{bcfg.slug}: {path} was tuned for another objective ({'; '.join(changes)}); using the config's "
              f"LRs (`make tune` re-tunes; train.use_tuned=true uses the tuned LRs anyway)")
        return cfg, {"lr_source": "config", "stale_tuned": str(path), "objective_changes": changes}
    if changes:
        print(f"{bcfg.slug}: train.use_tuned is true: using the LRs of {path}, tuned for another objective "
              f"({'; '.join(changes)})")
    frozen, unfrozen, train = cfg.train.frozen, cfg.train.unfrozen, cfg.train
    frozen = dataclasses.replace(frozen, lr=params.get("frozen_lr", frozen.lr))
    unfrozen = dataclasses.replace(unfrozen, lr=params.get("unfrozen_lr", unfrozen.lr),
                                   backbone_lr_mult=params.get("backbone_lr_mult", unfrozen.backbone_lr_mult))
    train = dataclasses.replace(train, frozen=frozen, unfrozen=unfrozen,
                                weight_decay=params.get("weight_decay", train.weight_decay))
    source = {"lr_source": str(path), "tuned": params}
    return cfg.replace(train=train), {**source, "objective_changes": changes} if changes else source


def tuned_objective_changes(cfg: Config, bcfg: BackboneConfig, best: dict) -> list[str]:
    """``key: tuned -> now`` for each setting of the study's objective (recorded in best.json by the
    tune stage) that this config changes; empty when they match."""
    recorded = best.get("objective")
    if recorded is None:
        return ["best.json records no objective (written by an older version; `make tune` rewrites it)"]
    try:
        current = objective_parts(cfg, bcfg, tune_budget(cfg), dict.fromkeys(best["params"]))
    except PipelineError as exc:
        return [f"the tune settings no longer apply ({exc})"]
    current = json.loads(json.dumps(current))  # as best.json holds it (lists, not tuples)
    return [f"{k}: {_short(recorded.get(k))} -> {_short(current.get(k))}" for k in setting_changes(recorded, current)]


def _short(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass(frozen=True)
class Budget:
    """What one trial trains: these folds, each for these epochs."""

    folds: tuple[int, ...]
    frozen_epochs: int
    unfrozen_epochs: int

    @property
    def epochs_per_fold(self) -> int:
        return self.frozen_epochs + self.unfrozen_epochs

    @property
    def total_epochs(self) -> int:
        return len(self.folds) * self.epochs_per_fold

    @property
    def judged_offset(self) -> int:
        """The first epoch of a fold that is reported to the pruner: the first unfrozen one when
        the budget has any (a frozen-phase score judges the head LR alone, and Optuna's pruners
        compare a trial's *best* reported value, which a good frozen score would inflate)."""
        return self.frozen_epochs if self.unfrozen_epochs else 0

    @property
    def judged_per_fold(self) -> int:
        return self.epochs_per_fold - self.judged_offset

    @property
    def total_judged(self) -> int:
        return len(self.folds) * self.judged_per_fold


def tune_budget(cfg: Config) -> Budget:
    t = cfg.tune
    folds = tuple(t.folds)
    bad = [k for k in folds if not 0 <= k < cfg.folds.n_splits]
    if bad or len(set(folds)) != len(folds):
        raise PipelineError(f"config key 'tune.folds': {list(folds)} must be distinct folds in "
                            f"0..{cfg.folds.n_splits - 1} (folds.n_splits is {cfg.folds.n_splits})")
    frozen = cfg.train.frozen.epochs if t.frozen_epochs is None else t.frozen_epochs
    unfrozen = cfg.train.unfrozen.epochs if t.unfrozen_epochs is None else t.unfrozen_epochs
    if cfg.train.linear_probe:  # the probe replaces the frozen epochs: one step (epoch 0), no LR
        frozen = 1
    if frozen < 0 or unfrozen < 0 or frozen + unfrozen == 0:
        raise PipelineError(f"config keys 'tune.frozen_epochs'/'tune.unfrozen_epochs' give {frozen} and {unfrozen} "
                            f"epochs: a trial needs at least one epoch (e.g. tune.frozen_epochs=1)")
    return Budget(folds, frozen, unfrozen)


def objective_parts(cfg: Config, bcfg: BackboneConfig, budget: Budget, space: dict) -> dict:
    """What a trial's score depends on besides its parameters (flat ``key: value`` pairs), no
    run-only key among them (compare two with :func:`~pipeline.config.run_only.setting_changes`)."""
    paths = Paths(cfg)
    train = dataclasses.asdict(cfg.train)
    for phase in ("frozen", "unfrozen"):
        train[phase].pop("epochs")
    tuned_keys = {"frozen_lr": ("frozen", "lr"), "unfrozen_lr": ("unfrozen", "lr"),
                  "backbone_lr_mult": ("unfrozen", "backbone_lr_mult")}
    for name in space:
        if name in tuned_keys:
            train[tuned_keys[name][0]].pop(tuned_keys[name][1])
        else:
            train.pop(name)
    data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k != "root"}  # a path: may differ per machine
    inputs = [paths.folds_csv] + ([paths.train_csv] if paths.train_csv else [])
    parts = {"data": data, "metric": cfg.metric, "backbone": dataclasses.asdict(bcfg), "train": train,
             "augment": dataclasses.asdict(cfg.augment), "tune.folds": list(budget.folds),
             "tune.frozen_epochs": budget.frozen_epochs, "tune.unfrozen_epochs": budget.unfrozen_epochs,
             "lr_schedule": LR_SCHEDULE,  # trials scored under another schedule shape do not compare
             "inputs": {p.name: artifacts.file_digest(p) for p in inputs}}
    return result_settings(flatten(parts))
