"""A fold's progress: the history, which weights are kept (``train.keep``: best / last / swa),
early stopping, and the resume file written after every epoch.

The resume file's info holds exactly :attr:`FoldState.KEYS` (plus the fold digest and phase), so a
run killed after epoch e resumes where an uninterrupted run would be.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from torch import nn

from pipeline.config.schema import TrainConfig
from pipeline.core import artifacts, distributed
from pipeline.domain.metrics import Metric
from pipeline.engine import checkpoints


class FoldState:
    """History and kept weights of one fold; ``fold_dir`` None keeps the weights in memory (tuning)."""

    KEYS = ("epoch", "updates", "best", "best_epoch", "best_unfrozen", "bad_epochs", "swa_count", "history")

    def __init__(self, tcfg: TrainConfig, metric: Metric, fold: int, fold_dir: Path | None, digest: str):
        self.tcfg, self.metric, self.fold, self.fold_dir, self.digest = tcfg, metric, fold, fold_dir, digest
        self.epoch, self.updates, self.best, self.best_epoch = -1, 0, None, -1
        self.best_unfrozen, self.bad_epochs, self.swa_count = None, 0, 0
        self.history: list[dict] = []
        self.kept, self.kept_score = "", None
        self.best_in_memory: dict | None = None  # the kept weights when there is no fold folder
        self.swa: dict[str, torch.Tensor] | None = None  # train.keep swa: running average of the eval weights

    @property
    def resume_file(self) -> Path | None:
        return None if self.fold_dir is None else self.fold_dir / "resume.safetensors"

    def info(self) -> dict:
        return {k: getattr(self, k) for k in self.KEYS}

    def resume(self) -> bool:
        """Continue from the resume file when it was written for this fold's digest."""
        if self.fold_dir is None:
            return False
        problem = checkpoints.resume_problem(self.resume_file)
        if problem:
            print(f"fold {self.fold}: {self.resume_file} is damaged ({problem}); training the fold from its start")
            self.resume_file.unlink(missing_ok=True)
            return False
        info = checkpoints.read_resume_info(self.resume_file)
        if info is None or info.get("digest") != self.digest:
            return False
        for key in self.KEYS:
            setattr(self, key, info[key])
        print(f"fold {self.fold}: resuming after epoch {info['epoch']} ({info['phase']} phase)")
        return True

    # ------------------------------------------------------------------ epochs
    def record(self, epoch: int, phase: str, row: dict, value: float) -> bool:
        """Log an epoch's row and score; True when it is the best so far."""
        improved = self.metric.better(value, self.best)
        if improved:
            self.best, self.best_epoch = value, epoch
        if phase == "unfrozen":  # patience counts against the unfrozen phase's own best: the BatchNorm
            # switch may cost the first epochs a drop below the frozen head that later ones recover
            if self.metric.better(value, self.best_unfrozen):
                self.best_unfrozen, self.bad_epochs = value, 0
            else:
                self.bad_epochs += 1
        self.history.append(row)
        self.epoch = epoch
        return improved

    def stopped_early(self) -> bool:
        patience = self.tcfg.early_stopping_patience
        unfrozen = sum(row["phase"] == "unfrozen" for row in self.history)
        return patience is not None and self.bad_epochs >= patience and unfrozen >= self.tcfg.min_unfrozen_epochs

    def keep(self, model: nn.Module) -> None:
        """These weights are the fold's model so far: ``best.safetensors`` (in memory when tuning)."""
        if self.fold_dir is None or not distributed.is_main():
            self.best_in_memory = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            checkpoints.save_weights(self.fold_dir / "best.safetensors", model)

    def save_epoch(self, phase: str, model: nn.Module, eval_model: nn.Module, optimizer, ema_module, scaler,
                   keep: bool) -> None:
        """After an epoch: the kept weights (when ``keep``), ``history.csv`` and the resume file."""
        if keep:
            self.keep(eval_model)
        if self.fold_dir is None or not distributed.is_main():
            return
        artifacts.write_csv(self.fold_dir / "history.csv", pd.DataFrame(self.history))
        info = {**self.info(), "digest": self.digest, "phase": phase}
        checkpoints.save_resume(self.resume_file, model, optimizer, info, ema_module, scaler, self.swa)

    def load_resume(self, model: nn.Module, optimizer, ema_module=None, scaler=None) -> None:
        checkpoints.load_resume(self.resume_file, model, optimizer, ema_module, scaler)

    def load_best(self, target: nn.Module) -> nn.Module:
        """``target`` with the kept weights loaded."""
        if self.best_in_memory is None and self.fold_dir is not None and (self.fold_dir / "best.safetensors").exists():
            checkpoints.load_weights(self.fold_dir / "best.safetensors", target)
        elif self.best_in_memory is not None:
            target.load_state_dict(self.best_in_memory)
        return target

    # ------------------------------------------------------------------ train.keep swa
    def swa_update(self, eval_model: nn.Module) -> None:
        """Fold this epoch's evaluated weights into the running average (float tensors only)."""
        n = self.swa_count
        current = {k: v.detach().float().clone() for k, v in eval_model.state_dict().items() if v.is_floating_point()}
        if self.swa is None:
            self.swa = current
        else:
            for k, v in current.items():
                self.swa[k] += (v - self.swa[k]) / (n + 1)
        self.swa_count = n + 1

    def swa_average(self) -> dict[str, torch.Tensor]:
        """The running average, read back from the resume file when the run resumed after the last epoch."""
        if self.swa is None:
            self.swa = checkpoints.read_resume_extra(self.resume_file)
        return self.swa

    # ------------------------------------------------------------------ the end
    def describe_kept(self, linear_probe: bool) -> list[str]:
        """Which weights the fold keeps and their validation score; a note when the unfrozen phase
        ended below the frozen head it started from."""
        history, key = self.history, f"valid_{self.metric.name}"
        if not history:
            return []
        frozen = [row[key] for row in history if row["phase"] == "frozen"]
        unfrozen = [row[key] for row in history if row["phase"] == "unfrozen"]
        head = "linear probe" if linear_probe else "frozen head"
        if self.tcfg.keep == "best":
            best = history[[row["epoch"] for row in history].index(self.best_epoch)]
            self.kept, self.kept_score = f"epoch {best['epoch']} ({best['phase']})", best[key]
        elif self.tcfg.keep == "last" or not self.swa_count:
            last = history[-1]
            self.kept, self.kept_score = f"epoch {last['epoch']} ({last['phase']}, last)", last[key]
        if not (frozen and unfrozen):
            return []
        probe = frozen[-1]
        if self.tcfg.keep == "best" and self.kept.endswith("(frozen)"):
            return [f"fold {self.fold}: no unfrozen epoch beat the {head} on the validation rows "
                    f"({self.metric.name} {probe:.4f}); the {head} is kept"]
        if self.tcfg.keep != "best" and not self.metric.better(self.kept_score, probe):
            return [f"fold {self.fold}: the kept weights ({self.kept}) score {self.kept_score:.4f} on the "
                    f"validation rows, below the {head}'s {probe:.4f}"]
        return []

    @property
    def result_score(self) -> float:
        return self.kept_score if self.kept_score is not None else self.best
