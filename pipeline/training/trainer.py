"""One fold's training: the frozen head (or linear probe), then the whole network, then
predictions. :class:`FoldTrainer` coordinates; read its ``run`` first."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline.config.paths import Paths
from pipeline.config.schema import BackboneConfig, Config, PhaseConfig
from pipeline.core import artifacts, distributed
from pipeline.data.images import PATH
from pipeline.domain.metrics import get_metric
from pipeline.domain.tasks import TaskSpec
from pipeline.engine.backbones import adapt_batchnorm, create_backbone, data_config
from pipeline.engine.features import FeatureStore
from pipeline.engine.fit import NonFiniteLoss, Runtime, make_loss, restored_torch_flags, score, seed_everything
from pipeline.training import phases
from pipeline.training.fingerprint import fold_outputs
from pipeline.training.fold_data import FoldData
from pipeline.training.fold_predict import FoldPredictor
from pipeline.training.fold_state import FoldState


@dataclass
class FoldJob:
    """Everything one fold needs. ``out_dir`` None: train in memory only (tuning)."""

    cfg: Config
    bcfg: BackboneConfig
    spec: TaskSpec
    table: pd.DataFrame  # the folds table with image paths
    fold: int
    test: pd.DataFrame | None = None
    out_dir: Path | None = None
    digest: str = ""
    report: Callable[[int, float], None] | None = None  # after each epoch (tuning/pruning)
    progress: bool = True
    feature_cache_dir: Path | None = None
    store: FeatureStore | None = None  # the run's in-memory features (shared by its folds); None: the fold's own


@dataclass
class FoldResult:
    best_score: float
    best_epoch: int
    history: list[dict]
    oof: pd.DataFrame | None = None
    test: pd.DataFrame | None = None
    notes: list[str] = field(default_factory=list)
    kept: str = ""  # which weights the fold kept (train.keep), e.g. "epoch 3 (unfrozen)"


class FoldTrainer:
    """One fold: set-up, the frozen and unfrozen phases, predictions. Read :meth:`run` first.

    Collaborators: :class:`FoldData` (rows, targets, loaders), :class:`FoldState` (history, kept
    weights, early stopping, resume), :class:`FoldPredictor` (logits, features, prediction frames)
    and the loops of :mod:`pipeline.training.phases`."""

    def __init__(self, job: FoldJob):
        cfg, self.tcfg = job.cfg, job.cfg.train
        self.metric = get_metric(cfg.metric, job.spec.task)
        seed_everything(self.tcfg.seed)  # same initial model in every fold
        self.model = create_backbone(job.bcfg, job.spec.num_outputs, Paths(cfg).exp_dir)
        self.dc = data_config(self.model, job.bcfg, cfg.augment.crop_pct)
        device = f"cuda:{distributed.local_rank()}" if distributed.enabled() and torch.cuda.is_available() else None
        self.rt = Runtime.create(self.tcfg, self.dc["mean"], self.dc["std"], device)
        self.rt.prepare_model(self.model)
        loss_fn = make_loss(job.spec, self.tcfg)
        self.data = FoldData(job, self.dc, self.rt)
        # regression: the loss and head in units of this fold's train targets; predictions in the original
        self.job = job = dataclasses.replace(job, spec=job.spec.fit_targets(self.data.y[self.data.train_idx]))
        self.loss_fn = job.spec.scaled_loss(loss_fn)
        self.state = FoldState(self.tcfg, self.metric, job.fold, job.out_dir, job.digest)
        self.store = job.store if job.store is not None else FeatureStore()
        self.predictor = FoldPredictor(self.data, self.rt, self.store, self.images_key())
        self.batch_losses: list[float] | None = None  # set to a list to record every unfrozen batch's loss
        self.ema = None
        self.final_model: nn.Module | None = None  # the kept weights, after run()
        self.notes: list[str] = []
        if self.tcfg.adapt_bn:
            self.adapt_batchnorm()

    # ------------------------------------------------------------------ the fold
    def run(self) -> FoldResult:
        train, state = self.tcfg, self.state
        n_frozen, n_unfrozen = (1 if train.linear_probe else train.frozen.epochs), train.unfrozen.epochs
        state.resume()
        start = state.epoch + 1
        if state.fold_dir is not None and start > 0 and start >= n_frozen:  # frozen phase already done
            state.load_resume(self.model, None, scaler=self.rt.scaler)
        if start < n_frozen and train.linear_probe:
            self.linear_probe_phase()
        elif start < n_frozen:
            self.frozen_phase(train.frozen, start)
        start = state.epoch + 1
        if n_unfrozen > 0 and start < n_frozen + n_unfrozen and not state.stopped_early():
            self.unfrozen_phase(train.unfrozen, n_frozen, max(start, n_frozen))
        if train.keep == "swa" and state.swa_count:
            self.finish_swa()
        elif state.best_epoch < 0:  # no epoch ran: the initial weights are the best we have
            state.keep(self.model)
        self.notes += state.describe_kept(train.linear_probe)
        self.final_model = state.load_best(self.eval_model)
        oof = test = None
        if state.fold_dir is not None or self.job.test is not None:
            oof, test = self.predictions()
        return FoldResult(state.result_score, state.best_epoch, state.history, oof, test, self.notes, state.kept)

    def frozen_phase(self, phase: PhaseConfig, start_epoch: int) -> None:
        phases.frozen(self, phase, start_epoch)

    def linear_probe_phase(self) -> None:
        phases.linear_probe(self)

    def unfrozen_phase(self, phase: PhaseConfig, first_epoch: int, start_epoch: int) -> None:
        phases.unfrozen(self, phase, first_epoch, start_epoch)

    def end_epoch(self, epoch: int, phase: str, lrs: dict, train_stats: dict, valid_logits: torch.Tensor,
                  optimizer) -> bool:
        """Score the epoch, log it, checkpoint it; True when early stopping says stop."""
        valid_idx = self.data.valid_idx
        valid_loss = float(self.loss_fn(valid_logits, self.data.y_t[valid_idx]))
        if not (np.isfinite(valid_loss) and bool(torch.isfinite(valid_logits).all())):  # diverged: stop, save nothing
            raise NonFiniteLoss(f"the validation outputs became NaN/inf ({self.desc(phase, epoch)}): training "
                                f"diverged. Lower the learning rate (train.frozen.lr / train.unfrozen.lr) or enable "
                                f"train.grad_clip")
        value = score(self.metric, self.job.spec, self.data.y[valid_idx], self.job.spec.activate(valid_logits.numpy()))
        row = {"epoch": epoch, "phase": phase, **lrs, "train_loss": train_stats["train_loss"],
               "valid_loss": valid_loss, f"valid_{self.metric.name}": value,
               "seconds": train_stats["seconds"], "images_per_s": train_stats["images_per_s"]}
        improved = self.state.record(epoch, phase, row, value)
        self.state.save_epoch(phase, self.model, self.eval_model, optimizer, self.ema_module, self.rt.scaler,
                              keep=improved if self.tcfg.keep == "best" else True)
        if self.job.report is not None:
            self.job.report(epoch, value)
        return phase == "unfrozen" and self.state.stopped_early()

    # ------------------------------------------------------------------ models and weights
    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    @property
    def ema_module(self) -> nn.Module | None:
        return self.ema.module if self.ema is not None else None

    def swa_update(self) -> None:
        self.state.swa_update(self.eval_model)

    def finish_swa(self) -> None:
        """``train.keep: swa``: the averaged weights, with BatchNorm statistics recomputed for them on
        the fold's train images (unless ``train.freeze_bn`` keeps them fixed), become the kept model,
        scored on the validation rows like an epoch."""
        model, swa = self.eval_model, self.state.swa_average()
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in swa.items()}, strict=False)
        if not self.tcfg.freeze_bn:
            loader = self.data.loader(self.data.dataset(self.data.train_idx, train=False))
            with torch.no_grad(), self.rt.autocast():
                adapt_batchnorm(model, (self.rt.images(x) for x, _ in loader))
        self.state.keep(model)
        preds = self.job.spec.activate(self.predict(model, self.data.valid_idx)[0].numpy())
        self.state.kept = f"swa of {self.state.swa_count} unfrozen epochs"
        self.state.kept_score = score(self.metric, self.job.spec, self.data.y[self.data.valid_idx], preds)

    def adapt_batchnorm(self) -> None:
        """``train.adapt_bn``: BatchNorm statistics re-estimated on every train image (no labels),
        once per backbone and run (the store's), so that the frozen head trains on the statistics
        the unfrozen phase starts from rather than ImageNet's."""
        def estimate() -> dict:
            loader = self.data.loader(self.data.dataset(np.arange(len(self.job.table)), train=False))
            with self.rt.autocast():
                stats = adapt_batchnorm(self.model, (self.rt.images(x) for x, _ in loader))
            print(f"adapt_bn: BatchNorm statistics of {self.job.bcfg.slug} re-estimated on "
                  f"{len(self.job.table)} train images")
            return stats
        self.model.load_state_dict(self.store.remember("adapt_bn-" + self.images_key(), estimate), strict=False)

    def images_key(self) -> str:
        """What the frozen backbone's outputs depend on: weights, size, images and their order."""
        framing = {"shrink": "area", **({"crop_pct": self.dc["crop_pct"]} if self.dc["crop_pct"] < 1.0 else {})}
        return artifacts.fingerprint({"backbone": dataclasses.asdict(self.job.bcfg), "size": self.dc["size"],
                                      "seed": self.tcfg.seed, "adapt_bn": self.tcfg.adapt_bn,
                                      "resize": self.job.cfg.augment.resize, **framing,
                                      "ids": list(map(str, self.job.table.iloc[:, 0])),
                                      "paths": list(self.job.table[PATH])})

    # ------------------------------------------------------------------ features and predictions
    def use_feature_cache(self) -> bool:
        if not self.tcfg.cache_features:
            return False
        if self.job.cfg.augment.frozen_phase and self.job.cfg.augment.train:
            self.notes.append("frozen phase: augmentation is on, so the feature cache is off (full model)")
            return False
        return True

    def frozen_only(self) -> bool:
        """Nothing is unfrozen and the head trained on cached features: the backbone is the
        pretrained one in every fold, so predictions are the head applied to cached features."""
        t, a = self.tcfg, self.job.cfg.augment
        return t.unfrozen.epochs == 0 and t.cache_features and not (a.frozen_phase and a.train)

    def frozen_features(self, view: str = "identity", test: bool = False) -> torch.Tensor:
        return self.predictor.frozen_features(self.model, view, test)

    def predict(self, model: nn.Module, rows: np.ndarray, test: bool = False, views=("identity",)):
        return self.predictor.logits(model, rows, test, views)

    def predictions(self) -> tuple[pd.DataFrame, pd.DataFrame | None]:
        """OOF (validation rows) and test predictions of the kept weights, averaged over TTA views."""
        return self.predictor.frames(self.job, self.final_model, head_only=self.frozen_only())

    def desc(self, phase: str, epoch: int) -> str:
        return f"{self.job.bcfg.slug} fold {self.job.fold} {phase} epoch {epoch}"


def train_fold(job: FoldJob) -> FoldResult:
    """Train one fold (resuming when a matching resume file exists); write its files."""
    if job.out_dir is not None and distributed.is_main():  # its files are rewritten from now on: not done
        artifacts.unstamp(fold_outputs(job.out_dir, job.test is not None))  # until all are (and a killed
        # --force run leaves no old oof.csv called done beside a new checkpoint)
    with restored_torch_flags():
        trainer = FoldTrainer(job)
        try:
            result = trainer.run()
        except NonFiniteLoss as exc:  # say what is kept: nothing when the first epoch already diverged
            epochs = len(trainer.state.history)
            kept = (f"the last good epoch ({trainer.state.epoch}) is kept in {job.out_dir}" if epochs and job.out_dir
                    else "no epoch finished, so no checkpoint was kept")
            raise NonFiniteLoss(f"{exc}; {kept}") from None
    if job.out_dir is not None and distributed.is_main():
        artifacts.write_csv(job.out_dir / "oof.csv", result.oof)
        artifacts.write_json(job.out_dir / "kept.json", {"kept": result.kept, "keep": job.cfg.train.keep,
                                                         "valid_score": result.best_score, "notes": result.notes,
                                                         # what `predict` needs besides the weights: classes,
                                                         # and a regression fold's target scaling
                                                         "spec": dataclasses.asdict(trainer.job.spec)})
        if result.test is not None:
            artifacts.write_csv(job.out_dir / "test.csv", result.test)
        artifacts.mark_done(fold_outputs(job.out_dir, job.test is not None), job.digest)
        (job.out_dir / "resume.safetensors").unlink(missing_ok=True)
    return result
