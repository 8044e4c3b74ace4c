"""``python -m pipeline all -c CFG [--budget MIN]`` (``make all BUDGET=30``): folds -> train ->
ensemble -> leaderboard in one command.

With a budget (``--budget``, or the config's top-level ``time_budget_min``) the run is planned
across all backbones together instead of giving each a fixed share:

1. the frozen-only path of every backbone (a linear probe per fold on cached features: cheap, and
   on photos near ImageNet's often as good as fine-tuning), so a complete submission exists early;
2. then, most promising backbone first (by its frozen-only CV), the unfrozen epochs that the rest
   of the budget allows: as many of ``train.unfrozen.epochs`` as fit for every fold, with
   ``train.unfreeze: auto`` deciding on fold 0 whether they pay. A backbone that ``auto`` keeps
   frozen-only spends only fold 0's screening, and the rest goes to the next backbone;
3. the ensembles and the leaderboard over the models trained.

Estimates come from the backbones' speeds measured on this machine (the model's steps, and the
reading of a few real image files through the train transform). What a frozen-only run took
beyond its estimate (model creation, the probe fits) is counted again for that backbone's
unfrozen run, which repeats it; the epochs themselves are estimated from the speeds. The plan is
printed first and kept in ``runs/<exp>/budget.json`` with the time spent, so a killed run resumes
with the same command and the same plan (the time a killed step had spent is not counted).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from pipeline.config.paths import Paths
from pipeline.config.schema import BackboneConfig, Config
from pipeline.core import artifacts
from pipeline.core.errors import PipelineError
from pipeline.data.images import PATH
from pipeline.data.tables import read_folds, read_test_table, task_spec
from pipeline.stages.ensemble import run_ensemble
from pipeline.stages.folds import run_folds
from pipeline.stages.leaderboard import run_leaderboard
from pipeline.stages.train import run_train
from pipeline.training.budget import RunCosts, Speeds, epochs_that_fit, measure_speeds, run_costs

RESERVE_S, RESERVE_SHARE = 15.0, 0.03  # kept back for the ensembles and the leaderboard
# 4-7 s per backbone on 2 CPU cores, out of the budget (batch 8 and one timed step read lite0 at half its speed)
MEASURE_BATCH, MEASURE_STEPS = 16, 2


def run_all(cfg: Config, budget_min: float | None = None, force: bool = False) -> Path:
    """Folds, train, ensemble and leaderboard; planned across backbones when there is a budget."""
    minutes = budget_min if budget_min is not None else cfg.time_budget_min
    if minutes is not None and not minutes > 0:
        raise PipelineError(f"--budget {minutes:g}: give the whole run's minutes (> 0), or leave it out for no budget")
    if minutes is None:
        run_folds(cfg, force=force)
        run_train(cfg, force=force)
        run_ensemble(cfg, force=force)
        return run_leaderboard(cfg)
    return BudgetedRun(cfg, minutes).run(force)


def _with_train(cfg: Config, **changes) -> Config:
    """``cfg`` with ``changes`` to every backbone's training (merged into each entry's own ``train``
    overrides, so that a variant's overrides cannot undo them); the whole-run plan replaces
    ``train.time_budget_min``'s per-stage plan."""
    def merged(bcfg: BackboneConfig) -> BackboneConfig:
        train = {**bcfg.train, "time_budget_min": None}
        for key, value in changes.items():
            train[key] = {**train.get(key, {}), **value} if isinstance(value, dict) else value
        return dataclasses.replace(bcfg, train=train)

    return cfg.replace(backbones=[merged(b) for b in cfg.backbones])


class BudgetedRun:
    """One budgeted whole run: the plan, its steps, and the time they spent (``budget.json``)."""

    def __init__(self, cfg: Config, minutes: float):
        self.cfg, self.minutes, self.budget_s = cfg, minutes, minutes * 60
        self.path = Paths(cfg).exp_dir / "budget.json"
        key = artifacts.fingerprint({"minutes": minutes, "config": cfg.to_dict()})
        saved = artifacts.read_json(self.path) if self.path.exists() else None
        self.state = saved if saved is not None and saved.get("key") == key else {"key": key, "spent_s": 0.0,
                                                                                  "models": {}}
        self.resumed = saved is self.state
        self.started = time.perf_counter()
        self.spent_before = float(self.state["spent_s"])

    # ---------------------------------------------------------------- time
    def elapsed(self) -> float:
        return self.spent_before + time.perf_counter() - self.started

    def left(self) -> float:
        return self.budget_s - self.elapsed() - max(RESERVE_S, RESERVE_SHARE * self.budget_s)

    def save(self) -> None:
        self.state["spent_s"] = self.elapsed()
        artifacts.write_json(self.path, self.state)

    def model(self, bcfg: BackboneConfig) -> dict:
        return self.state["models"].setdefault(bcfg.slug, {})

    # ---------------------------------------------------------------- the run
    def run(self, force: bool) -> Path:
        cfg = self.cfg
        if self.resumed:
            print(f"time budget {self.minutes:g} min: resuming the plan in {self.path} "
                  f"({self.spent_before / 60:.1f} min spent before)")
        run_folds(cfg, force=force)
        costs = self.measure()
        self.print_plan(costs)
        trained = [b for b in cfg.backbones if self.frozen_pass(b, costs[b.slug], force)]
        for bcfg in self.by_promise(trained):
            self.unfreeze_pass(bcfg, costs[bcfg.slug], force)
        done = cfg.replace(backbones=trained)  # the ensembles blend the models that were trained
        run_ensemble(done, force=force)
        board = run_leaderboard(done)
        self.save()
        print(self.summary(trained))
        return board

    def measure(self) -> dict[str, RunCosts]:
        """Each backbone's step costs from its speeds on this machine (measured once per plan)."""
        cfg = self.cfg
        table, test = read_folds(cfg), read_test_table(cfg)
        spec = task_spec(cfg, table)
        costs = {}
        for entry in cfg.backbones:
            vcfg, bcfg = cfg.variant(entry)
            saved = self.model(entry).get("speeds")
            files = None if vcfg.train.cache_images else [p for p in table[PATH] if isinstance(p, str)] or None
            speeds = Speeds(**saved) if saved else measure_speeds(vcfg, bcfg, spec, spec.encode(table),
                                                                  steps=MEASURE_STEPS, batch=MEASURE_BATCH,
                                                                  image_paths=files)
            self.model(entry)["speeds"] = dataclasses.asdict(speeds)
            costs[entry.slug] = run_costs(speeds, len(table), len(test), cfg.folds.n_splits, len(vcfg.augment.tta),
                                          frozen_views=len(vcfg.augment.views(frozen_only=True)))
        self.save()
        return costs

    def print_plan(self, costs: dict[str, RunCosts]) -> None:
        cfg, t = self.cfg, self.cfg.train
        lines = [f"time budget {self.minutes:g} min for folds, train, ensemble and leaderboard, planned across "
                 f"{len(cfg.backbones)} backbone(s) (estimates from speeds measured on this machine):",
                 "  1. the frozen-only path of every backbone: " + ", ".join(
                     f"{slug} ~{c.frozen_s / 60:.1f} min" for slug, c in costs.items())]
        if t.unfreeze == "never":
            lines.append("  2. no unfrozen epochs (train.unfreeze: never)")
        else:
            lrs = len(self.screened_lrs(cfg.backbones[0]))
            how = ("fold 0 first decides whether they pay (train.unfreeze: auto)" if t.unfreeze == "auto"
                   else "every fold (train.unfreeze: always)")
            lines.append(f"  2. most promising first (by frozen-only CV), up to {t.unfrozen.epochs} unfrozen epochs "
                         f"where the rest of the budget allows; {how}: " + ", ".join(
                             f"{slug} ~{c.unfreeze_s(t.unfrozen.epochs, lrs, t.unfreeze == 'auto') / 60:.1f} min"
                             for slug, c in costs.items()))
        lines.append("  3. the ensembles and the leaderboard over the models trained")
        print("\n".join(lines))

    def screened_lrs(self, entry: BackboneConfig) -> list[float]:
        t = self.cfg.variant(entry)[0].train
        return list(dict.fromkeys([t.unfrozen.lr, *t.unfreeze_lrs]))

    # ---------------------------------------------------------------- the steps
    def frozen_pass(self, entry: BackboneConfig, costs: RunCosts, force: bool) -> bool:
        """The backbone's frozen-only run; False when it does not fit what is left (the first
        backbone always runs: a run without a model has nothing to submit)."""
        step = self.model(entry)
        if "frozen_s" not in step:
            if entry is not self.cfg.backbones[0] and costs.frozen_s > self.left():
                step["skipped"] = f"its frozen-only path (~{costs.frozen_s / 60:.1f} min) did not fit"
                print(f"{entry.slug}: skipped: {step['skipped']} in the {max(self.left(), 0) / 60:.1f} min left")
                self.save()
                return False
            start = time.perf_counter()
            run_train(_with_train(self.cfg, unfreeze="never"), backbone=entry.slug, force=force)
            step["frozen_s"] = time.perf_counter() - start
            cv = artifacts.read_json(Paths(self.cfg).cv_json(entry.slug))
            step["frozen_cv"], step["greater_is_better"] = cv["cv_mean"], cv["greater_is_better"]
            self.save()
        return "frozen_cv" in step

    def by_promise(self, trained: list[BackboneConfig]) -> list[BackboneConfig]:
        sign = {True: -1.0, False: 1.0}
        return sorted(trained, key=lambda b: sign[self.model(b)["greater_is_better"]] * self.model(b)["frozen_cv"])

    def unfreeze_pass(self, entry: BackboneConfig, costs: RunCosts, force: bool) -> None:
        vcfg = self.cfg.variant(entry)[0]
        t, step = vcfg.train, self.model(entry)
        if t.unfreeze == "never" or t.unfrozen.epochs == 0 or step.get("unfrozen_done"):
            return
        if "epochs" not in step:  # planned once: a resumed run trains the same epochs
            fixed = max(step["frozen_s"] - costs.frozen_s, 0.0)  # model creation, probe fits: repeated when unfrozen
            lrs = len(self.screened_lrs(entry))
            decides = t.unfreeze == "auto"
            step["epochs"] = epochs_that_fit(costs, t.unfrozen.epochs, lrs, decides, self.left() - fixed)
            step["estimate_s"] = fixed + costs.unfreeze_s(step["epochs"], lrs, decides) if step["epochs"] else 0
            self.save()
        if step["epochs"] == 0:
            print(f"{entry.slug}: stays frozen-only: not one unfrozen epoch of every fold fits the "
                  f"{max(self.left(), 0) / 60:.1f} min left")
            return
        print(f"{entry.slug}: {step['epochs']} unfrozen epoch(s) per fold (~{step['estimate_s'] / 60:.1f} min; "
              f"{self.left() / 60:.1f} min left before the ensembles)")
        start = time.perf_counter()
        run_train(_with_train(self.cfg, unfrozen={"epochs": step["epochs"]}), backbone=entry.slug, force=force)
        cv = artifacts.read_json(Paths(self.cfg).cv_json(entry.slug))
        step.update(unfrozen_done=True, unfrozen_s=time.perf_counter() - start, cv=cv["cv_mean"],
                    unfroze=bool((cv.get("unfreeze") or {"unfreeze": t.unfreeze == "always"})["unfreeze"]))
        self.save()

    def summary(self, trained: list[BackboneConfig]) -> str:
        parts = []
        for entry in trained:
            step = self.model(entry)
            if step.get("unfrozen_done"):
                how = (f"fine-tuned {step['epochs']} epoch(s)" if step["unfroze"]
                       else "frozen-only (fold 0 found no gain)")
                parts.append(f"{entry.slug}: {how}, {(step['frozen_s'] + step['unfrozen_s']) / 60:.1f} min")
            else:
                parts.append(f"{entry.slug}: frozen-only, {step['frozen_s'] / 60:.1f} min")
        used = self.elapsed()
        return (f"time budget: used {used / 60:.1f} of {self.minutes:g} min ({100 * used / self.budget_s:.0f}%): "
                + "; ".join(parts) + f" -> {self.path}")
