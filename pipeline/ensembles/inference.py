"""Predict stage: a test folder predicted from saved fold checkpoints, blended by a saved ensemble.

``python -m pipeline predict -c CFG [--test-dir D --sample S] [--ensemble METHOD] [--out F]``
loads every fold checkpoint of the models an ensemble method blends (``train.keep``'s weights in
``best.safetensors``), predicts the images with the configured TTA views, averages the folds (and
a ``seeds:`` entry's seeds), applies the method's saved parameters (``params.json``) and writes a
validated submission. On the competition's own test set the result equals the ensemble stage's
submission. ``--ensemble`` also takes a model id (one model's fold average). Without it, the method
with the best honest score (nested CV) is used.

A checkpoint is refused when the config it was trained with differs from the current one in
anything that changes its predictions (the differences are listed): retrain, or predict with the
config it was trained with. A bundle (the bundle stage) runs this same code on Kaggle.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.config.paths import Paths
from pipeline.config.run_only import result_settings, setting_changes
from pipeline.config.schema import BackboneConfig, Config, flatten, load_config
from pipeline.core import artifacts, locks
from pipeline.core.errors import PipelineError
from pipeline.data.datasets import ImageDataset
from pipeline.data.images import PATH
from pipeline.data.tables import read_test_table
from pipeline.domain.tasks import TaskSpec
from pipeline.domain.transforms import eval_transform, scaled_side
from pipeline.engine import checkpoints
from pipeline.engine.backbones import create_backbone, data_config
from pipeline.engine.fit import Runtime, activate_mean, default_workers, predict_logits
from pipeline.ensembles import postprocess
from pipeline.ensembles.submission import write_submission
from pipeline.training import all_rows
from pipeline.training.fingerprint import AFTER_FOLDS

# the LRs a tune study may have replaced (the backbone's lr_source.json says so)
TUNED_KEYS = ("train.frozen.lr", "train.unfrozen.lr", "train.unfrozen.backbone_lr_mult", "train.weight_decay")


# chosen by train.time_budget_min's plan, which the checkpoint's resolved config holds: the config's value is a maximum
BUDGETED_KEYS = ("train.unfrozen.epochs",)


# what acts after the folds (the all-rows probe): a fold's weights do not depend on it
AFTER_FOLD_KEYS = tuple(f"train.{k}" for k in AFTER_FOLDS)


DATA_KEYS = ("task", "target_columns", "id_column", "positive_class", "label_separator")


# what to do about a damaged fold checkpoint (a copy cut short, a full disk)
RETRAIN = "train the fold again (make train-folds retrains a damaged fold), then re-run this command"


def prediction_settings(cfg: Config, bcfg: BackboneConfig) -> dict:
    """Everything a fold checkpoint's predictions depend on, as dotted keys: the task, the folds,
    the model entry, the training and augmentation settings (a changed one means other weights),
    without the run-only keys (:mod:`pipeline.config.run_only`)."""
    return result_settings(flatten({"data": {k: getattr(cfg.data, k) for k in DATA_KEYS},
                                    "folds": dataclasses.asdict(cfg.folds), "backbone": dataclasses.asdict(bcfg),
                                    "train": dataclasses.asdict(cfg.train), "augment": dataclasses.asdict(cfg.augment)},
                                   keep_empty=False))


def checkpoint_differences(saved: dict, current: dict, tuned: bool, budgeted: bool = False) -> list[str]:
    """``key: checkpoint X, config Y`` for each setting that differs (run-only keys never; the tuned
    LRs not when ``tuned``; the planned epochs not when the current config has a time budget)."""
    ignore = (TUNED_KEYS if tuned else ()) + (BUDGETED_KEYS if budgeted else ()) + AFTER_FOLD_KEYS
    return [f"{k}: checkpoint {saved.get(k)!r}, config {current.get(k)!r}"
            for k in setting_changes(saved, current, ignore)]


@dataclasses.dataclass(frozen=True)
class FoldCheckpoint:
    """One fold's kept weights with the config and task spec they were trained with."""

    fold_dir: Path
    cfg: Config  # the fold's resolved config (runs/<exp>/<id>/fold<k>/config.yaml)
    bcfg: BackboneConfig
    spec: TaskSpec  # with the fold's regression target scaling

    @classmethod
    def load(cls, cfg: Config, entry: BackboneConfig, fold: int) -> "FoldCheckpoint":
        paths = Paths(cfg)
        fold_dir = paths.fold_dir(entry.slug, fold)
        needed = [fold_dir / f for f in ("best.safetensors", "kept.json", "config.yaml")]
        missing = [p for p in needed if not p.exists()]
        if missing:
            raise PipelineError(f"model {entry.slug} has no checkpoint for fold {fold} ({missing[0]} is missing); "
                                f"train it first: make train-folds")
        checkpoints.check_checkpoint(fold_dir / "best.safetensors", RETRAIN)  # size, header and bytes as written
        kept = artifacts.read_json(fold_dir / "kept.json")
        if "spec" not in kept:
            raise PipelineError(f"{fold_dir / 'kept.json'} was written by an older version without the task spec; "
                                f"retrain: make train-folds ARGS=--force")
        saved = load_config(fold_dir / "config.yaml")
        from pipeline.training.unfreeze import as_trained

        vcfg, bcfg = cfg.variant(entry)
        vcfg = as_trained(vcfg, bcfg)  # train.unfreeze never / auto: the settings the folds resolved to
        lr_source = paths.backbone_dir(entry.slug) / "lr_source.json"
        tuned = lr_source.exists() and "tuned" in artifacts.read_json(lr_source)
        diffs = checkpoint_differences(prediction_settings(saved, saved.backbones[0]),
                                       prediction_settings(vcfg, bcfg), tuned, vcfg.train.time_budget_min is not None)
        if diffs:
            shown = "; ".join(diffs[:5]) + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")
            raise PipelineError(f"{fold_dir} was trained with another config ({shown}); retrain it "
                                f"(make train-folds) or predict with the config it was trained with")
        spec = kept["spec"]
        spec = TaskSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()})
        return cls(fold_dir, saved, saved.backbones[0], spec)

    def model(self) -> torch.nn.Module:
        """The timm model with these weights (built without pretrained weights: no hub, no download)."""
        model = create_backbone(dataclasses.replace(self.bcfg, weights="none"), self.spec.num_outputs)
        checkpoints.load_weights(self.fold_dir / "best.safetensors", model, RETRAIN)
        return model

    @torch.no_grad()
    def predict(self, image_paths: list[str], head: tuple[dict, TaskSpec] | None = None) -> np.ndarray:
        """Activated predictions ``(images, columns)``, averaged over the TTA views; ``head``: another
        head's weights and task spec on this fold's backbone (the all-rows probe)."""
        model, train, aug = self.model(), self.cfg.train, self.cfg.augment
        spec = self.spec
        if head is not None:
            model.get_classifier().load_state_dict(head[0])
            spec = head[1]
        dc = data_config(model, self.bcfg, aug.crop_pct)
        runtime = Runtime.create(train, dc["mean"], dc["std"])
        runtime.prepare_model(model)
        dataset = ImageDataset(image_paths, None, eval_transform(dc["size"], dc["interpolation"], aug.resize,
                                                                 dc["crop_pct"]),
                               decode=(scaled_side(dc["size"], dc["crop_pct"]), aug.resize))  # as train reads them
        loader = torch.utils.data.DataLoader(dataset, batch_size=self.bcfg.batch_size or train.batch_size,
                                             num_workers=default_workers(runtime, train.num_workers),
                                             pin_memory=runtime.cuda)
        batch = self.bcfg.batch_size or train.batch_size
        return activate_mean(spec, predict_logits(model, loader, runtime, aug.tta,
                                                  max_images=None if runtime.cuda else batch))


def predict_model(cfg: Config, model_id: str, image_paths: list[str]) -> tuple[np.ndarray, TaskSpec]:
    """One model's predictions: the mean over its variants (a seeds: entry) of the mean over folds."""
    members = {**cfg.models(seed_mean=False), **cfg.seed_groups()}.get(model_id)
    if members is None:
        raise PipelineError(f"'{model_id}' is neither an ensemble method with saved parameters nor a model id of "
                            f"this config; valid models: {', '.join(cfg.models(seed_mean=False))}")
    per_member, spec = [], None
    for entry in members:
        folds = [FoldCheckpoint.load(cfg, entry, k) for k in range(cfg.folds.n_splits)]
        spec = dataclasses.replace(folds[0].spec, target_mean=0.0, target_std=1.0)
        wanted = cfg.variant(entry)[0].train.all_rows_probe and all_rows.applies(folds[0].cfg, switch=False)
        head = all_rows.saved_head(Paths(cfg).backbone_dir(entry.slug)) if wanted else None
        # a frozen-only model: its probe on all train rows (train.all_rows_probe) on fold 0's backbone, once
        units = ([("all-rows probe on fold 0's backbone", folds[0])] if head is not None
                 else [(f"fold {k}", ckpt) for k, ckpt in enumerate(folds)])
        preds = []
        for what, ckpt in units:
            print(f"predict: {entry.slug} {what}: {len(image_paths)} images x {len(ckpt.cfg.augment.tta)} views")
            preds.append(ckpt.predict(image_paths, head))
        per_member.append(np.mean(preds, axis=0))
    return np.mean(per_member, axis=0), spec


def wait_for_training(cfg: Config, reader: str) -> None:
    """Wait while a train run of the experiment runs (it marks ``runs/<exp>/`` with :func:`locks.rewriting`),
    with one line: it rewrites the models' files fold by fold, and a ``--force`` retrain leaves the old
    ones in place until then, so a reader would take half-retrained models for up-to-date ones."""
    locks.wait_for_writers(Paths(cfg).exp_dir, reader, f"the models of {cfg.name} are being trained")


def best_method(cfg: Config) -> str:
    """The ensemble method with saved parameters and the best honest score (nested CV)."""
    paths, best, best_score = Paths(cfg), None, None
    for method in cfg.ensemble.methods:
        folder = paths.ensemble_method_dir(method)
        if not (folder / "params.json").exists() or not (folder / "cv.json").exists():
            continue
        cv = artifacts.read_json(folder / "cv.json")
        value = cv.get("nested_cv", cv.get("cv_mean"))
        if value is None:
            continue
        if best is None or (value > best_score if cv["greater_is_better"] else value < best_score):
            best, best_score = method, value
    if best is None:
        raise PipelineError(f"no ensemble has saved parameters under {paths.ensemble_dir}; run `make ensemble` "
                            f"first, or name one model: --ensemble <model id>")
    return best


def predict_frame(cfg: Config, method: str, test: pd.DataFrame) -> tuple[pd.DataFrame, TaskSpec, list | None]:
    """Predictions frame (``<id>`` + prediction columns) of ``method`` (or a model id) for ``test``."""
    from pipeline.ensembles.blend import apply_params  # scikit-learn is only needed to fit blends

    image_paths = list(test[PATH])
    params_path = Paths(cfg).ensemble_method_dir(method) / "params.json"
    if method in cfg.ensemble.methods and params_path.exists():
        saved = artifacts.read_json(params_path)
        outputs = [predict_model(cfg, m, image_paths) for m in saved["models"]]
        spec = outputs[0][1]
        preds = apply_params(saved["params"], np.stack([p for p, _ in outputs]))
        if saved.get("postprocess"):
            preds = postprocess.apply(saved["postprocess"], preds)
        thresholds = saved.get("thresholds")
        thresholds = [thresholds[c] for c in spec.classes] if thresholds else None
    elif method in cfg.ensemble.methods:
        raise PipelineError(f"{params_path} is missing: run `make ensemble` first (it saves what each method learned)")
    else:
        preds, spec = predict_model(cfg, method, image_paths)
        thresholds = None
    return spec.predictions_frame(test[cfg.data.id_column], preds, cfg.data.id_column), spec, thresholds


def predict_submission(cfg: Config, test_dir: str | None = None, sample: str | None = None, method: str | None = None,
                out: str | None = None) -> Path:
    """Predict a test folder (default: the competition's) and write a validated submission."""
    data = cfg.data
    if test_dir is not None:
        data = dataclasses.replace(data, test_dir=str(Path(test_dir).resolve()))
    if sample is not None:
        data = dataclasses.replace(data, sample_submission=str(Path(sample).resolve()))
    pcfg = cfg.replace(data=data)
    wait_for_training(cfg, "predict")
    method = method or best_method(cfg)
    test = read_test_table(pcfg)  # every image there and readable, before any model runs
    frame, spec, thresholds = predict_frame(pcfg, method, test)
    path = Path(out) if out else Paths(cfg).submissions_dir / f"{cfg.name}-{method}-predict.csv"
    write_submission(pcfg, spec, frame, path, thresholds=thresholds)
    print(f"predict: {method} on {len(test)} images of {Paths(pcfg).test_dir} -> {path}")
    return path
