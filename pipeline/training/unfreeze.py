"""``train.unfreeze``: whether (and at which LR) the folds fine-tune the whole network, decided per
backbone from evidence (``auto``), or fixed (``always``; ``never`` is the frozen-only path).

``auto`` looks at fold 0 only. Its linear probe is trained once, then fold 0 trains through its
unfrozen epochs at ``train.unfrozen.lr`` (with ``train.unfreeze_lrs``, each other LR first trains
one unfrozen epoch, and the LR that lowers the per-row validation loss most replaces the configured
one only on significant evidence: one-sided p < ``LR_ALPHA``). The remaining folds unfreeze when
that model beats the probe on fold 0's validation rows, by the competition's own measure: rows
right for a metric of hard labels (accuracy, F1, kappa), the per-row loss otherwise (log loss, AUC,
regression). "Beats" is a paired bootstrap over the rows: the one-sided p-value of no gain must be
below ``train.unfreeze_alpha``. Its default, 0.5, unfreezes when a gain is more likely than not, so
the two wrong answers cost alike: a needless unfreeze costs time (never more than ``always``,
since fold 0's run is kept as fold 0), a needless frozen-only run costs accuracy. 0.05 unfreezes
only on significant evidence. Otherwise every fold runs frozen-only, on cached features.

Fold 0's validation rows made the choice, so they count as a selection: ``cv.json`` lists fold 0
in ``tuned_folds`` (``cv_untuned`` is the mean of the other folds) and records the decision with
its evidence under ``unfreeze``. The screening runs live in ``runs/<exp>/<id>/unfreeze/``, resume
like any fold, and the decision is kept in ``unfreeze.json`` while fold 0's inputs and the rule
are unchanged.

A frozen-only resolution (``never``, ``auto`` deciding frozen-only, no unfrozen epoch) also adds
the ``zoom`` view to ``augment.tta`` under ``augment.frozen_zoom``: it helped probes, not
fine-tuned models (BENCHMARKS.md, the ``tta`` section).
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from pipeline.config.paths import Paths
from pipeline.config.schema import BackboneConfig, Config
from pipeline.core import artifacts
from pipeline.domain.metrics import get_metric
from pipeline.engine import checkpoints
from pipeline.engine.features import FeatureStore
from pipeline.training.fingerprint import fold_digest
from pipeline.training.trainer import FoldJob, FoldTrainer

LR_ALPHA = 0.05  # one-sided significance an LR other than the configured one needs
BOOTSTRAP = 4000
FOLD = 0  # the fold that decides


class _Paused(Exception):
    """A screening run stops after its first unfrozen epoch (its resume file is written)."""


def paired_gain(base: np.ndarray, new: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """Mean per-row improvement ``base - new`` (losses: positive is better) and the one-sided
    bootstrap p-value of no improvement (resampling rows, pairs kept together; a resample with no
    change counts half, so a tie everywhere gives 0.5)."""
    diff = np.asarray(base, dtype=float) - np.asarray(new, dtype=float)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(BOOTSTRAP, len(diff)))].mean(axis=1)
    return float(diff.mean()), float((means < 0).mean() + 0.5 * (means == 0).mean())


def mcnemar_p(base_right: np.ndarray, new_right: np.ndarray) -> float | None:
    """Exact one-sided McNemar p-value that ``new`` is right more often than ``base``."""
    from scipy.stats import binomtest

    wins, losses = int((new_right & ~base_right).sum()), int((base_right & ~new_right).sum())
    return None if wins + losses == 0 else float(binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue)


def resolve_unfreeze(cfg: Config, bcfg: BackboneConfig, spec, table, store: FeatureStore) -> tuple[Config, dict | None]:
    """The config the folds train with, and the decision record (None unless ``auto`` decided)."""
    if (fixed := _fixed(cfg)) is not None:
        return fixed, None
    path = _decision_path(cfg, bcfg)
    digest, rule = fold_digest(cfg, bcfg, FOLD), _rule(cfg.train)
    saved = artifacts.read_json(path) if path.exists() else None
    if saved is not None and saved.get("digest") == digest and saved.get("rule") == rule:
        decision = saved["decision"]
        print(f"{bcfg.slug}: train.unfreeze auto: {decision['summary']} (decided before: {path})")
    else:
        decision = decide(cfg, bcfg, spec, table, store)
        artifacts.write_json(path, {"digest": digest, "rule": rule, "decision": decision})
        print(f"{bcfg.slug}: train.unfreeze auto: {decision['summary']} -> {path}")
    resolved = _decided_config(cfg, decision)
    if decision["unfreeze"]:
        _Screen(cfg, bcfg, spec, table, store, decision["lr"]).adopt_as_fold(resolved)
    return resolved, decision


def as_trained(cfg: Config, bcfg: BackboneConfig) -> Config:
    """The config the backbone's folds were trained with, without deciding anything: ``never`` and a
    decided ``auto`` (its ``unfreeze.json`` under the same rule) resolved as the train stage resolves
    them, anything else as it is. What a checkpoint's own config is compared with before it predicts."""
    if (fixed := _fixed(cfg)) is not None:
        return fixed
    path = _decision_path(cfg, bcfg)
    saved = artifacts.read_json(path) if path.exists() else {}
    return _decided_config(cfg, saved["decision"]) if saved.get("rule") == _rule(cfg.train) else cfg


def _fixed(cfg: Config) -> Config | None:
    """The resolved config when nothing is to decide (``always``, ``never``, ``auto`` with 0 epochs)."""
    t = cfg.train
    if t.unfreeze == "never" or (t.unfreeze == "auto" and t.unfrozen.epochs == 0):
        return _with(cfg, epochs=0)
    return _frozen_views(cfg) if t.unfreeze == "always" else None


def _decision_path(cfg: Config, bcfg: BackboneConfig):
    return Paths(cfg).backbone_dir(bcfg.slug) / "unfreeze.json"


def _rule(train) -> dict:
    """The decision's own settings: a saved decision holds while they are unchanged."""
    return {"alpha": train.unfreeze_alpha, "lrs": list(train.unfreeze_lrs)}


def _decided_config(cfg: Config, decision: dict) -> Config:
    return _with(cfg, lr=decision["lr"]) if decision["unfreeze"] else _with(cfg, epochs=0)


def _with(cfg: Config, epochs: int | None = None, lr: float | None = None) -> Config:
    """The resolved config: ``unfreeze`` becomes ``always`` (the decision is in the epochs and LR) and
    the decision's own keys go back to their defaults, so fold processes do not decide again, the
    folds of an unfreezing ``auto`` have the digests of ``always`` and a frozen-only run those of
    ``never``."""
    unfrozen = cfg.train.unfrozen
    unfrozen = dataclasses.replace(unfrozen, epochs=unfrozen.epochs if epochs is None else epochs,
                                   lr=unfrozen.lr if lr is None else lr)
    return _frozen_views(cfg.replace(train=_decided(cfg.train, unfrozen=unfrozen)))


def _frozen_views(cfg: Config) -> Config:
    """A frozen-only config predicts through ``augment.views(frozen_only=True)`` (``zoom`` added
    under ``augment.frozen_zoom``); any other config is returned as it is."""
    views = cfg.augment.views(cfg.train.unfrozen.epochs == 0)
    return cfg if views == cfg.augment.tta else cfg.replace(augment=dataclasses.replace(cfg.augment, tta=views))


def _decided(train, **changes):
    """``train`` with ``unfreeze: always`` and the decision's keys at their defaults (plus ``changes``)."""
    defaults = type(train)()
    return dataclasses.replace(train, unfreeze="always", unfreeze_lrs=defaults.unfreeze_lrs,
                               unfreeze_alpha=defaults.unfreeze_alpha, **changes)


def _statistic(cfg: Config, spec) -> str:
    """What the decision compares per row: ``right`` for a metric of hard labels on a classification
    task, ``loss`` otherwise."""
    task = getattr(spec, "task", None)
    if task not in ("binary", "multiclass"):
        return "loss"
    return "loss" if get_metric(cfg.metric, task).needs_probabilities else "right"


def decide(cfg: Config, bcfg: BackboneConfig, spec, table, store: FeatureStore) -> dict:
    start, t = time.perf_counter(), cfg.train
    lrs = list(dict.fromkeys([t.unfrozen.lr, *t.unfreeze_lrs]))  # the configured LR is the incumbent
    if len(lrs) > 1:
        listed = ", ".join(f"{lr:g}" for lr in lrs)
        print(f"{bcfg.slug}: train.unfreeze auto: fold {FOLD} screens unfrozen LRs {listed} "
              f"(one epoch each), then finishes the best and compares it with the probe")
    else:
        print(f"{bcfg.slug}: train.unfreeze auto: fold {FOLD} trains its unfrozen epochs at lr {lrs[0]:g} and compares "
              f"the model with the probe (kept as fold {FOLD} when the folds unfreeze)")
    runs = {lr: _Screen(cfg, bcfg, spec, table, store, lr) for lr in lrs}
    first = {}
    for lr, run in runs.items():
        first[lr] = run.first_epoch_losses()
        print(f"{bcfg.slug}: fold {FOLD} at lr {lr:g}: validation loss {first[lr].mean():.4f} after one unfrozen "
              f"epoch (probe: {run.probe_losses()[0].mean():.4f})")
    chosen, lr_evidence = t.unfrozen.lr, {}
    if len(lrs) > 1:
        best = min(lrs, key=lambda lr: first[lr].mean())
        gain, p = paired_gain(first[t.unfrozen.lr], first[best], seed=t.seed)
        lr_evidence = {"first_epoch_loss": {f"{lr:g}": float(first[lr].mean()) for lr in lrs},
                       "best": best, "gain_over_config_lr": gain, "p": p}
        if best != t.unfrozen.lr and gain > 0 and p < LR_ALPHA:
            chosen = best
    probe, (tuned, tuned_right) = runs[chosen].probe_losses(), runs[chosen].final_losses()
    loss_gain, loss_p = paired_gain(probe[0], tuned, seed=t.seed)
    statistic = "right" if _statistic(cfg, spec) == "right" and probe[1] is not None else "loss"
    if statistic == "right":  # rows right: higher is better, so the "losses" are their negatives
        gain, p = paired_gain(-probe[1].astype(float), -tuned_right.astype(float), seed=t.seed)
    else:
        gain, p = loss_gain, loss_p
    alpha = t.unfreeze_alpha
    unfreeze = gain > 0 and p < alpha
    mcnemar = mcnemar_p(probe[1], tuned_right) if probe[1] is not None else None
    epochs, rows = t.unfrozen.epochs, len(tuned)
    verdict = (f"unfreeze at lr {chosen:g}" if unfreeze else "frozen-only (the probe)")
    if statistic == "right":
        right, probe_right = int(tuned_right.sum()), int(probe[1].sum())
        change = (f"get {right - probe_right:+d} row(s) right against the probe ({right} vs {probe_right}; "
                  f"paired bootstrap p = {p:.3f}, McNemar p = {mcnemar:.3f}; per-row loss {-loss_gain:+.4f})"
                  if mcnemar is not None else
                  f"get the same rows right as the probe ({right}; paired bootstrap p = {p:.3f}; "
                  f"per-row loss {-loss_gain:+.4f})")
    else:
        change = (f"change the per-row loss by {-gain:+.4f} against the probe (paired bootstrap p = {p:.3f}"
                  + (f", McNemar p = {mcnemar:.3f}" if mcnemar is not None else "") + ")")
    summary = (f"{verdict}: on fold {FOLD}'s {rows} validation rows, {epochs} unfrozen epochs at lr {chosen:g} "
               f"{change}; unfreezing needs a gain with p < {alpha:g} (train.unfreeze_alpha)")
    if len(lrs) > 1:
        summary += f"; LR {chosen:g} of {', '.join(f'{lr:g}' for lr in lrs)} (first-epoch p = {lr_evidence['p']:.3f})"
    return {"unfreeze": bool(unfreeze), "lr": chosen, "rows": rows, "fold": FOLD, "statistic": statistic,
            "gain": gain, "p": p, "loss_gain": loss_gain, "loss_p": loss_p, "mcnemar_p": mcnemar,
            "lrs": lr_evidence, "alpha": alpha, "unfrozen_epochs": epochs,
            "seconds": time.perf_counter() - start, "summary": summary}


def selection_folds(decision: dict | None) -> list[int]:
    """The folds whose validation rows made the decision (they are a selection, like tuning folds)."""
    return [] if decision is None else [decision["fold"]]


class _Screen:
    """Fold 0 trained at one unfrozen LR in its own folder (resumable), kept: the last epoch. Its
    per-row validation losses (and correctness, for classification) after the probe, after the
    first unfrozen epoch and after the last are written beside it, so a resumed decision reuses them."""

    def __init__(self, cfg: Config, bcfg: BackboneConfig, spec, table, store: FeatureStore, lr: float):
        # the fold's own keep policy (the decision reads the last epoch's weights through ``report``), so
        # that the chosen LR's run can become fold 0 when the folds unfreeze (see adopt_as_fold)
        train = _decided(cfg.train, early_stopping_patience=None,
                         unfrozen=dataclasses.replace(cfg.train.unfrozen, lr=lr))
        self.cfg, self.bcfg, self.spec, self.table, self.store = cfg.replace(train=train), bcfg, spec, table, store
        paths = Paths(self.cfg)
        self.dir = paths.backbone_dir(bcfg.slug) / "unfreeze" / f"lr{lr:g}"
        self.n_frozen = 1 if train.linear_probe else train.frozen.epochs
        self.digest = fold_digest(self.cfg, bcfg, FOLD)
        self.record_path = self.dir / "losses.json"
        record = artifacts.read_json(self.record_path) if self.record_path.exists() else {}
        self.record = record if record.get("digest") == self.digest else {"digest": self.digest}

    def first_epoch_losses(self) -> np.ndarray:
        if "first" not in self.record:
            self._train(pause=True)
        return np.asarray(self.record["first"]["loss"])

    def probe_losses(self) -> tuple[np.ndarray, np.ndarray | None]:
        if "probe" not in self.record:
            self._train(pause=True)
        return np.asarray(self.record["probe"]["loss"]), _right(self.record["probe"])

    def final_losses(self) -> tuple[np.ndarray, np.ndarray | None]:
        if "final" not in self.record:
            self._train(pause=False)
        return np.asarray(self.record["final"]["loss"]), _right(self.record["final"])

    def adopt_as_fold(self, resolved: Config) -> bool:
        """Copy this finished run into fold 0's folder when it trained exactly what fold 0 would
        (same digest: no early stopping configured), so that fold 0 only predicts instead of training
        its unfrozen epochs again; a fold 0 of other settings (the frozen-only run of a budgeted whole
        run) is replaced. True when copied."""
        fold_dir = Paths(resolved).fold_dir(self.bcfg.slug, FOLD)
        resume = self.dir / "resume.safetensors"
        present = checkpoints.read_resume_info(fold_dir / "resume.safetensors")  # a fold 0 trained before
        if (fold_digest(resolved, self.bcfg, FOLD) != self.digest or not resume.exists() or "final" not in self.record
                or (present is not None and present.get("digest") == self.digest)):
            return False
        fold_dir.mkdir(parents=True, exist_ok=True)
        artifacts.unstamp(p for p in fold_dir.iterdir() if not p.name.startswith("."))  # the replaced run's stamps
        for name in ("best.safetensors", "history.csv", "kept.json", "resume.safetensors"):  # resume last: a
            if (self.dir / name).exists():  # copy cut short is redone by the next run
                artifacts.copy_file(self.dir / name, fold_dir / name)
        print(f"{self.bcfg.slug}: fold {FOLD} reuses the screening run at lr {self.cfg.train.unfrozen.lr:g} "
              f"({self.dir}); it only predicts")
        return True

    def _train(self, pause: bool) -> None:
        holder: list[FoldTrainer] = []
        last = self.n_frozen + self.cfg.train.unfrozen.epochs - 1

        def report(epoch: int, value: float) -> None:
            trainer = holder[0]
            if epoch == self.n_frozen - 1:
                self._remember("probe", trainer, trainer.model)
            elif epoch == self.n_frozen:
                self._remember("first", trainer, trainer.eval_model)
                if pause and epoch < last:
                    raise _Paused
            if epoch == last:
                self._remember("final", trainer, trainer.eval_model)

        job = FoldJob(self.cfg, self.bcfg, self.spec, self.table, FOLD, None, self.dir, self.digest, report=report,
                      progress=False, feature_cache_dir=Paths(self.cfg).feature_cache_dir(self.bcfg.slug),
                      store=self.store)
        self.dir.mkdir(parents=True, exist_ok=True)
        holder.append(FoldTrainer(job))
        try:  # resumable: the fold's resume file is written after every epoch
            holder[0].run()
        except _Paused:
            pass
        missing = [k for k in ("probe", "first") + (() if pause else ("final",)) if k not in self.record]
        if missing and "probe" in missing:  # resumed past the probe: its rows come from a fresh probe
            self._probe_again()

    def _probe_again(self) -> None:
        train = dataclasses.replace(self.cfg.train, unfreeze="never",
                                    unfrozen=dataclasses.replace(self.cfg.train.unfrozen, epochs=0))
        cfg = self.cfg.replace(train=train)
        trainer = FoldTrainer(FoldJob(cfg, self.bcfg, self.spec, self.table, FOLD, progress=False,
                                      feature_cache_dir=Paths(cfg).feature_cache_dir(self.bcfg.slug), store=self.store))
        if train.linear_probe:
            trainer.linear_probe_phase()
        else:
            trainer.frozen_phase(train.frozen, 0)
        self._remember("probe", trainer, trainer.model)

    def _remember(self, name: str, trainer: FoldTrainer, model) -> None:
        rows = trainer.data.valid_idx
        logits = trainer.predict(model, rows)[0].float()
        y = trainer.data.y_t[rows]
        per_row = torch.func.vmap(lambda lo, t: trainer.loss_fn(lo[None], t[None]))(logits, y)
        entry = {"loss": per_row.tolist()}
        if self.spec.task in ("multiclass", "binary"):
            pred = logits.argmax(1) if self.spec.task == "multiclass" else (logits.view(-1) > 0).long()
            entry["right"] = (pred == y.view(-1).long()).tolist()
        self.record[name] = entry
        artifacts.write_json(self.record_path, self.record)


def _right(entry: dict) -> np.ndarray | None:
    return np.asarray(entry["right"], dtype=bool) if "right" in entry else None
