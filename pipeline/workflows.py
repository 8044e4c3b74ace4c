"""``python -m pipeline all -c CFG [--budget MIN]`` (``make all BUDGET=30``): folds -> train ->
ensemble -> leaderboard in one command.

With a budget (``--budget``, or the config's top-level ``time_budget_min``) the run is planned
across all backbones together instead of giving each a fixed share, cheapest sure step first:

1. the frozen-only path of every backbone through one view (a linear probe per fold on cached
   features: one forward pass per image), so a complete submission exists early;
2. most promising backbone first (by its frozen-only CV), the configured TTA views (``augment.tta``
   plus ``zoom`` under ``augment.frozen_zoom``) for the frozen-only models, where they fit: the
   identity features are cached, so each extra view costs one forward pass per image;
3. then, most promising first, a fine-tuned variant ``<id>-ft`` of each backbone beside its
   frozen-only model: as many of ``train.unfrozen.epochs`` as fit for every fold, with
   ``train.unfreeze: auto`` deciding on fold 0 whether they pay. Fold 0 runs first and the rest
   is re-planned from its real time: when the other folds do not fit, or ``auto`` finds no gain,
   the variant is dropped and the time goes to the next backbone;
4. the ensembles and the leaderboard over the models trained (frozen-only and fine-tuned side by
   side: the blends and the leaderboard's honest scores choose between them).

Estimates come from the backbones' speeds measured on this machine (the model's steps after
warm-up calls, the median of several, and the reading of a few real image files through the
train transform). What a frozen-only run took beyond its estimate (model creation, the probe
fits) is counted again for the later runs of that backbone, which repeat it. The plan is
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


CHEAP_VIEWS = {"tta": ["identity"], "frozen_zoom": False}  # the first frozen-only pass: one view per image
FINE_TUNED = "-ft"  # the fine-tuned variant's id: <id>-ft, beside the frozen-only <id>


def _with_train(cfg: Config, **changes) -> Config:
    """``cfg`` with ``changes`` to every backbone's training (merged into each entry's own ``train``
    overrides, so that a variant's overrides cannot undo them); the whole-run plan replaces
    ``train.time_budget_min``'s per-stage plan."""
    return cfg.replace(backbones=[_entry_with(b, train=changes) for b in cfg.backbones])


def _entry_with(entry: BackboneConfig, train: dict | None = None, augment: dict | None = None,
                **fields) -> BackboneConfig:
    """``entry`` with ``train``/``augment`` changes merged into its own overrides (mappings key by
    key), ``time_budget_min`` off (the whole run plans), and other ``fields`` replaced."""
    def merged(own: dict, changes: dict) -> dict:
        out = dict(own)
        for key, value in changes.items():
            out[key] = {**out.get(key, {}), **value} if isinstance(value, dict) else value
        return out

    return dataclasses.replace(entry, train=merged({**entry.train, "time_budget_min": None}, train or {}),
                               augment=merged(entry.augment, augment or {}), **fields)


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
        for entry in self.by_promise(trained):
            self.views_pass(entry, costs[entry.slug], force)
        tuned = [e for e in (self.unfreeze_pass(b, costs[b.slug], force) for b in self.by_promise(trained)) if e]
        done = cfg.replace(backbones=[self.as_trained(b) for b in trained] + tuned)  # what the ensembles blend
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
                                          frozen_views=1)  # frozen_s: one view; views_pass scales it
        self.save()
        return costs

    def print_plan(self, costs: dict[str, RunCosts]) -> None:
        cfg = self.cfg
        lines = [f"time budget {self.minutes:g} min for folds, train, ensemble and leaderboard, planned across "
                 f"{len(cfg.backbones)} backbone(s) (estimates from speeds measured on this machine):",
                 "  1. the frozen-only path of every backbone, one view per image: " + ", ".join(
                     f"{slug} ~{c.frozen_s / 60:.1f} min" for slug, c in costs.items())]
        views = {e.slug: self.views(e) for e in cfg.backbones}
        if any(len(v) > 1 for v in views.values()):
            lines.append("  2. most promising first (by frozen-only CV), the frozen-only models through their TTA "
                         "views where they fit: " + ", ".join(
                             f"{slug} {'+'.join(views[slug])} ~{(len(views[slug]) - 1) * c.frozen_s / 60:.1f} min"
                             for slug, c in costs.items() if len(views[slug]) > 1))
        else:
            lines.append("  2. no more TTA views (augment.tta lists one)")
        tuning = [e for e in cfg.backbones if self.fine_tunes(e)]
        if not tuning:
            lines.append("  3. no fine-tuned variants (train.unfreeze: never, or no unfrozen epochs)")
        else:
            parts = []
            for entry in tuning:
                t = cfg.variant(entry)[0].train
                seconds = costs[entry.slug].unfreeze_s(t.unfrozen.epochs, len(self.screened_lrs(entry)),
                                                       t.unfreeze == "auto")
                parts.append(f"{entry.slug}{FINE_TUNED} ~{seconds / 60:.1f} min for {t.unfrozen.epochs} epochs")
            how = ("fold 0 first decides whether they pay (train.unfreeze: auto)"
                   if any(cfg.variant(e)[0].train.unfreeze == "auto" for e in tuning) else "every fold")
            lines.append(f"  3. then most promising first, a fine-tuned variant beside each frozen-only model, as many "
                         f"unfrozen epochs as fit, re-planned after fold 0; {how}: " + ", ".join(parts))
        lines.append("  4. the ensembles and the leaderboard over the models trained")
        print("\n".join(lines))

    def screened_lrs(self, entry: BackboneConfig) -> list[float]:
        t = self.cfg.variant(entry)[0].train
        return list(dict.fromkeys([t.unfrozen.lr, *t.unfreeze_lrs]))

    def views(self, entry: BackboneConfig) -> list[str]:
        """The TTA views of the backbone's frozen-only model as configured (``zoom`` added by
        ``augment.frozen_zoom``)."""
        return self.cfg.variant(entry)[0].augment.views(frozen_only=True)

    def fine_tunes(self, entry: BackboneConfig) -> bool:
        t = self.cfg.variant(entry)[0].train
        return t.unfreeze != "never" and t.unfrozen.epochs > 0

    def as_trained(self, entry: BackboneConfig) -> BackboneConfig:
        """The entry as its frozen-only model was last trained: one view, or its TTA views."""
        views = {} if self.model(entry).get("views_done") else CHEAP_VIEWS
        return _entry_with(entry, train={"unfreeze": "never"}, augment=views)

    # ---------------------------------------------------------------- the steps
    def _train_frozen(self, entry: BackboneConfig, force: bool) -> float:
        """Train the entry's frozen-only model as :meth:`as_trained` says; its seconds and CV."""
        start = time.perf_counter()
        trained = self.as_trained(entry)
        run_train(self.cfg.replace(backbones=[trained if b is entry else b for b in self.cfg.backbones]),
                  backbone=entry.slug, force=force)
        cv = artifacts.read_json(Paths(self.cfg).cv_json(entry.slug))
        return time.perf_counter() - start, cv

    def frozen_pass(self, entry: BackboneConfig, costs: RunCosts, force: bool) -> bool:
        """The backbone's frozen-only run through one view; False when it does not fit what is left
        (the first backbone always runs: a run without a model has nothing to submit)."""
        step = self.model(entry)
        if "frozen_s" not in step:
            if entry is not self.cfg.backbones[0] and costs.frozen_s > self.left():
                step["skipped"] = f"its frozen-only path (~{costs.frozen_s / 60:.1f} min) did not fit"
                print(f"{entry.slug}: skipped: {step['skipped']} in the {max(self.left(), 0) / 60:.1f} min left")
                self.save()
                return False
            step["frozen_s"], cv = self._train_frozen(entry, force)
            step["frozen_cv"], step["greater_is_better"] = cv["cv_mean"], cv["greater_is_better"]
            self.save()
        return "frozen_cv" in step

    def by_promise(self, trained: list[BackboneConfig]) -> list[BackboneConfig]:
        sign = {True: -1.0, False: 1.0}
        return sorted(trained, key=lambda b: sign[self.model(b)["greater_is_better"]] * self.model(b)["frozen_cv"])

    def _fixed_s(self, entry: BackboneConfig, costs: RunCosts) -> float:
        """What the frozen-only run took beyond its estimate (model creation, probe fits): repeated
        by every later run of the backbone."""
        return max(self.model(entry)["frozen_s"] - costs.frozen_s, 0.0)

    def views_pass(self, entry: BackboneConfig, costs: RunCosts, force: bool) -> None:
        """The frozen-only model again through its configured TTA views, when they fit (the identity
        features are cached: each extra view is one forward pass per image)."""
        step, views = self.model(entry), self.views(entry)
        if len(views) == 1 or step.get("views_done") or step.get("views_skipped"):
            return
        estimate = self._fixed_s(entry, costs) + (len(views) - 1) * costs.frozen_s
        if estimate > self.left():
            step["views_skipped"] = f"{'+'.join(views)} (~{estimate / 60:.1f} min) did not fit"
            print(f"{entry.slug}: keeps one view: {step['views_skipped']} in the {max(self.left(), 0) / 60:.1f} "
                  f"min left")
            self.save()
            return
        print(f"{entry.slug}: frozen-only through {'+'.join(views)} (~{estimate / 60:.1f} min; "
              f"{self.left() / 60:.1f} min left)")
        step["views_done"] = True  # as_trained now names the configured views (a killed run resumes them)
        step["views_s"], cv = self._train_frozen(entry, force)
        step["views_cv"] = cv["cv_mean"]
        self.save()

    def unfreeze_pass(self, entry: BackboneConfig, costs: RunCosts, force: bool) -> BackboneConfig | None:
        """A fine-tuned variant ``<id>-ft`` beside the frozen-only model: fold 0, then the other
        folds when the re-plan from fold 0's real time says they fit; None when it was not trained
        or was dropped."""
        if not self.fine_tunes(entry):
            return None
        t, step = self.cfg.variant(entry)[0].train, self.model(entry)
        if "epochs" not in step:  # planned once: a resumed run trains the same epochs
            fixed, lrs, decides = self._fixed_s(entry, costs), len(self.screened_lrs(entry)), t.unfreeze == "auto"
            step["epochs"] = epochs_that_fit(costs, t.unfrozen.epochs, lrs, decides, self.left() - fixed)
            step["estimate_s"] = fixed + costs.unfreeze_s(step["epochs"], lrs, decides) if step["epochs"] else 0
            self.save()
        if step["epochs"] == 0:
            print(f"{entry.slug}: stays frozen-only: not one unfrozen epoch of every fold fits the "
                  f"{max(self.left(), 0) / 60:.1f} min left")
            return None
        tuned = _entry_with(entry, train={"unfrozen": {"epochs": step["epochs"]}},
                            id=f"{entry.slug}{FINE_TUNED}", seed_group=None)
        cfg = self.cfg.replace(backbones=[*self.cfg.backbones, tuned])
        if step.get("dropped"):
            return None
        if not step.get("unfrozen_done"):
            if not self._fold0_then_rest(entry, tuned, cfg, costs, force):
                return None
            cv = artifacts.read_json(Paths(cfg).cv_json(tuned.slug))
            step.update(unfrozen_done=True, cv=cv["cv_mean"])
            self.save()
        return tuned

    def _fold0_then_rest(self, entry: BackboneConfig, tuned: BackboneConfig, cfg: Config, costs: RunCosts,
                         force: bool) -> bool:
        step = self.model(entry)
        print(f"{tuned.slug}: {step['epochs']} unfrozen epoch(s) per fold (~{step['estimate_s'] / 60:.1f} min; "
              f"{self.left() / 60:.1f} min left before the ensembles); fold 0 first")
        start = time.perf_counter()
        run_train(cfg, backbone=tuned.slug, fold=0, force=force)
        fold0_s = step.setdefault("fold0_s", time.perf_counter() - start)
        self.save()
        decision = Paths(cfg).backbone_dir(tuned.slug) / "unfreeze.json"
        if decision.exists() and not artifacts.read_json(decision)["decision"]["unfreeze"]:
            return self._drop(entry, f"fold 0 found no gain in fine-tuning (train.unfreeze: auto; {decision})")
        # fold 0 also computed the features of every image (about one frozen-only pass) and made the model
        per_fold = max(fold0_s - costs.frozen_s - self._fixed_s(entry, costs),
                       step["epochs"] * costs.epoch_s + costs.predict_s)
        rest_s = per_fold * (costs.n_folds - 1)
        if rest_s > self.left():
            return self._drop(entry, f"fold 0 took {fold0_s / 60:.1f} min, so the other {costs.n_folds - 1} folds "
                                     f"(~{rest_s / 60:.1f} min) do not fit the {max(self.left(), 0) / 60:.1f} min left")
        print(f"{tuned.slug}: fold 0 took {fold0_s / 60:.1f} min; the other folds ~{rest_s / 60:.1f} min")
        start = time.perf_counter()
        run_train(cfg, backbone=tuned.slug, force=force)
        step["unfrozen_s"] = fold0_s + time.perf_counter() - start
        return True

    def _drop(self, entry: BackboneConfig, why: str) -> bool:
        step = self.model(entry)
        step["dropped"] = why
        print(f"{entry.slug}{FINE_TUNED}: dropped: {why}; {entry.slug} stays frozen-only")
        self.save()
        return False

    def summary(self, trained: list[BackboneConfig]) -> str:
        parts = []
        for entry in trained:
            step = self.model(entry)
            views = "+".join(self.views(entry)) if step.get("views_done") else "identity"
            minutes = (step["frozen_s"] + step.get("views_s", 0)) / 60
            part = f"{entry.slug}: frozen-only through {views}, {minutes:.1f} min"
            if step.get("unfrozen_done"):
                part += f"; {entry.slug}{FINE_TUNED}: fine-tuned {step['epochs']} epoch(s), " \
                        f"{step['unfrozen_s'] / 60:.1f} min"
            elif step.get("dropped"):
                part += f"; {entry.slug}{FINE_TUNED} dropped"
            parts.append(part)
        used = self.elapsed()
        return (f"time budget: used {used / 60:.1f} of {self.minutes:g} min ({100 * used / self.budget_s:.0f}%): "
                + "; ".join(parts) + f" -> {self.path}")
