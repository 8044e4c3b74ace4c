"""Train stage: phases, file contracts per task, resume, bundled weights, bad input.

CPU, timm's tiny ``test_efficientnet`` with ``weights: none``, 32 px digits written by the tests.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import write_dataset
from safetensors.torch import load_file

from pipeline.config.paths import Paths
from pipeline.config.schema import BackboneConfig, PhaseConfig
from pipeline.core.errors import PipelineError
from pipeline.data.tables import read_folds, read_test_table, task_spec
from pipeline.engine.backbones import split_parameters
from pipeline.engine.fit import build_optimizer, build_scheduler, group_lrs
from pipeline.stages.folds import run_folds
from pipeline.stages.train import run_train
from pipeline.training import trainer as train_mod
from pipeline.training.trainer import FoldJob, FoldTrainer

FAST = ["train.num_workers=0", "augment.train=[]"]


def _job(cfg, fold=0, **kwargs) -> FoldJob:
    run_folds(cfg)
    table = read_folds(cfg)
    return FoldJob(cfg, cfg.backbones[0], task_spec(cfg, table), table, fold, progress=False, **kwargs)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("cache", [True, False])
def test_frozen_phase_changes_only_the_head_and_keeps_batchnorm_stats(make_config, cache):
    cfg = make_config(*FAST, "train.frozen.epochs=2", "train.unfrozen.epochs=0", f"train.cache_features={cache}")
    trainer = FoldTrainer(_job(cfg))
    before = _state(trainer.model)
    head_names = {n for n, _ in split_parameters(trainer.model)[1]}
    trainer.run()
    after = trainer.model.state_dict()
    assert any("running_mean" in k for k in after), "the test model must have BatchNorm layers"
    for name, tensor in after.items():
        if name in head_names:
            assert not torch.equal(tensor, before[name]), f"head tensor {name} did not train"
        else:
            assert torch.equal(tensor, before[name]), f"backbone tensor {name} changed in the frozen phase"


def test_cached_feature_head_equals_full_model_head(make_config):
    heads = []
    for cache in (True, False):
        cfg = make_config(*FAST, "train.frozen.epochs=2", "train.unfrozen.epochs=0",
                          f"train.cache_features={cache}")
        trainer = FoldTrainer(_job(cfg))
        trainer.run()
        heads.append({k: v.clone() for k, v in trainer.model.get_classifier().state_dict().items()})
    for name in heads[0]:
        torch.testing.assert_close(heads[0][name], heads[1][name], rtol=1e-4, atol=1e-5)


def test_unfrozen_phase_has_two_lr_groups_with_the_configured_ratio(make_config):
    cfg = make_config(*FAST)
    trainer = FoldTrainer(_job(cfg))
    phase = PhaseConfig(epochs=2, lr=1e-3, backbone_lr_mult=0.1, warmup_epochs=0.5)
    optimizer = build_optimizer(trainer.model, cfg.train, phase, frozen=False)
    scheduler = build_scheduler(optimizer, phase, updates_per_epoch=4)
    backbone_ids = {id(p) for _, p in split_parameters(trainer.model)[0]}
    for update in (0, 1, 3, 6):
        scheduler.step_update(update)
        lrs = group_lrs(optimizer)
        assert lrs["lr_backbone"] == pytest.approx(0.1 * lrs["lr_head"])
        for group in optimizer.param_groups:
            is_backbone = any(id(p) in backbone_ids for p in group["params"])
            assert group["lr"] == pytest.approx(lrs["lr_backbone"] if is_backbone else lrs["lr_head"])
    frozen = build_optimizer(trainer.model, cfg.train, phase, frozen=True)
    assert all(id(p) not in backbone_ids for g in frozen.param_groups for p in g["params"])


TASKS = {
    "binary": ("roc_auc", "pred"),
    "multiclass": ("accuracy", None),
    "multilabel": ("f1_macro", None),
    "multilabel_columns": ("roc_auc", None),
    "regression": ("rmse", "pred"),
}


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_trains_end_to_end_and_meets_the_file_contracts(make_config, tmp_path, task):
    data = write_dataset(tmp_path / "data", task, n_train=60, n_test=12)
    metric, _ = TASKS[task]
    cfg = make_config(*FAST, "folds.n_splits=2", f"metric={metric}", "augment.tta=[identity,hflip]", data=data)
    run_folds(cfg)
    run_train(cfg)
    paths, id_col = Paths(cfg), cfg.data.id_column
    table, test_ids = read_folds(cfg), read_test_table(cfg)[id_col]
    spec = task_spec(cfg, table)
    name = cfg.backbones[0].name
    for k in range(2):
        fold_dir = paths.fold_dir(name, k)
        history = pd.read_csv(fold_dir / "history.csv")
        assert list(history.columns) == ["epoch", "phase", "lr_head", "lr_backbone", "train_loss", "valid_loss",
                                         f"valid_{metric}", "seconds", "images_per_s"]
        assert history["phase"].tolist() == ["frozen", "unfrozen"]
        unfrozen = history[history.phase == "unfrozen"]
        assert (unfrozen["lr_backbone"] > 0).all() and (unfrozen["lr_head"] > 0).all()
        assert (fold_dir / "best.safetensors").exists()
        fold_oof = pd.read_csv(fold_dir / "oof.csv", dtype={id_col: str})
        assert set(fold_oof[id_col]) == set(table.loc[table.fold == k, id_col])
        assert pd.read_csv(fold_dir / "test.csv", dtype={id_col: str})[id_col].tolist() == test_ids.tolist()
    oof = pd.read_csv(paths.oof_csv(name), dtype={id_col: str})
    assert list(oof.columns) == [id_col, "fold", *spec.pred_columns]
    assert sorted(oof[id_col]) == sorted(table[id_col]) and oof[id_col].is_unique
    test = pd.read_csv(paths.test_csv(name), dtype={id_col: str})
    assert list(test.columns) == [id_col, *spec.pred_columns]
    assert test[id_col].tolist() == test_ids.tolist()
    preds = oof[spec.pred_columns].to_numpy()
    assert np.isfinite(preds).all()
    if task != "regression":
        assert ((preds >= 0) & (preds <= 1)).all()
    if task == "multiclass":
        np.testing.assert_allclose(preds.sum(axis=1), 1.0, atol=1e-5)
    cv = json.loads(paths.cv_json(name).read_text())
    assert cv["metric"] == metric and len(cv["folds"]) == 2 and np.isfinite(cv["oof"])
    assert cv["greater_is_better"] == (metric not in ("rmse",))


def test_a_run_killed_after_one_epoch_resumes_to_the_same_result(make_config, tmp_path, monkeypatch):
    words = ["train.num_workers=0", "folds.n_splits=2", "train.frozen.epochs=1", "train.unfrozen.epochs=2"]
    straight = make_config(*words, f"runs_dir={tmp_path / 'straight'}")
    run_folds(straight)
    run_train(straight, fold=0)

    resumed = make_config(*words, f"runs_dir={tmp_path / 'resumed'}")
    original = FoldTrainer.end_epoch

    def end_epoch_then_die(self, epoch, *args, **kwargs):
        stop = original(self, epoch, *args, **kwargs)
        if epoch == 1:
            raise KeyboardInterrupt
        return stop

    monkeypatch.setattr(FoldTrainer, "end_epoch", end_epoch_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_train(resumed, fold=0)
    fold_dir = Paths(resumed).fold_dir(resumed.backbones[0].name, 0)
    assert (fold_dir / "resume.safetensors").exists() and not (fold_dir / "oof.csv").exists()
    monkeypatch.setattr(FoldTrainer, "end_epoch", original)
    run_train(resumed, fold=0)

    a_dir = Paths(straight).fold_dir(straight.backbones[0].name, 0)
    a, b = load_file(str(a_dir / "best.safetensors")), load_file(str(fold_dir / "best.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    pd.testing.assert_frame_equal(pd.read_csv(a_dir / "oof.csv"), pd.read_csv(fold_dir / "oof.csv"))
    assert len(pd.read_csv(fold_dir / "history.csv")) == 3
    assert not (fold_dir / "resume.safetensors").exists()


def test_finished_folds_are_skipped_on_rerun(make_config, capsys):
    cfg = make_config(*FAST, "folds.n_splits=2")
    run_folds(cfg)
    run_train(cfg)
    best = Paths(cfg).fold_dir(cfg.backbones[0].name, 0) / "best.safetensors"
    stamp = best.stat().st_mtime_ns
    capsys.readouterr()
    run_train(cfg)
    assert best.stat().st_mtime_ns == stamp
    assert "fold 0: best" not in capsys.readouterr().out


def test_bundled_efficientnet_lite0_recognises_the_china_photo():
    from sklearn.datasets import load_sample_image
    from timm.data import ImageNetInfo

    from pipeline.domain.transforms import eval_transform, normalize
    from pipeline.engine.backbones import create_backbone, data_config

    model = create_backbone(BackboneConfig(name="efficientnet_lite0", weights="bundled", image_size=224), 1000).eval()
    dc = data_config(model, BackboneConfig(name="efficientnet_lite0", image_size=224))
    x = eval_transform(dc["size"], dc["interpolation"])(image=load_sample_image("china.jpg"))["image"][None]
    x = normalize(x, torch.tensor(dc["mean"]).view(1, 3, 1, 1), torch.tensor(dc["std"]).view(1, 3, 1, 1))
    with torch.no_grad():
        top5 = model(x)[0].topk(5).indices.tolist()
    names = [ImageNetInfo().index_to_description(i) for i in top5]
    assert any(word in " ".join(names) for word in ("church", "palace", "bell cote", "monastery")), names


def test_nan_loss_stops_the_fold_and_keeps_the_last_good_checkpoint(make_config, monkeypatch):
    cfg = make_config(*FAST, "folds.n_splits=2", "train.frozen.epochs=1", "train.unfrozen.epochs=1")
    real_make_loss = train_mod.make_loss

    def poisoned(spec, tcfg):
        loss = real_make_loss(spec, tcfg)
        return lambda logits, y: loss(logits, y) * (float("nan") if logits.requires_grad and
                                                    torch.is_grad_enabled() and _in_unfrozen() else 1.0)

    monkeypatch.setattr(train_mod, "make_loss", poisoned)
    _in_unfrozen.on = False
    original = FoldTrainer.unfrozen_phase

    def unfrozen(self, *args, **kwargs):
        _in_unfrozen.on = True
        return original(self, *args, **kwargs)

    monkeypatch.setattr(FoldTrainer, "unfrozen_phase", unfrozen)
    run_folds(cfg)
    with pytest.raises(PipelineError, match="NaN"):
        run_train(cfg, fold=0)
    fold_dir = Paths(cfg).fold_dir(cfg.backbones[0].name, 0)
    assert (fold_dir / "best.safetensors").exists() and (fold_dir / "resume.safetensors").exists()
    assert len(pd.read_csv(fold_dir / "history.csv")) == 1  # the good frozen epoch
    assert not (fold_dir / "oof.csv").exists()


def _in_unfrozen() -> bool:
    return _in_unfrozen.on


def test_unknown_backbone_is_a_clear_error_before_training(make_config):
    cfg = make_config(*FAST, "backbones.0.name=efficientnet_lite7x")
    run_folds(cfg)
    with pytest.raises(PipelineError, match="not a timm model.*did you mean"):
        run_train(cfg)
    assert not Paths(cfg).exp_dir.exists() or not any(Paths(cfg).exp_dir.rglob("*.csv"))


def test_an_image_that_breaks_during_training_names_the_file(make_config, tmp_path):
    data = write_dataset(tmp_path / "data", "multiclass", n_train=40, n_test=8)
    cfg = make_config(*FAST, "folds.n_splits=2", data=data)
    run_folds(cfg)
    broken = sorted((tmp_path / "data" / data["train_dir"]).glob("*.png"))[3]
    broken.write_bytes(b"this is not a png")
    with pytest.raises(PipelineError, match=broken.name):
        run_train(cfg)


def test_linear_probe_fits_the_head_on_cached_features_before_fine_tuning(make_config):
    cfg = make_config(*FAST, "train.linear_probe=true", "train.frozen.epochs=3", "train.unfrozen.epochs=1")
    trainer = FoldTrainer(_job(cfg))
    before = _state(trainer.model)
    result = trainer.run()
    phases = [row["phase"] for row in result.history]
    assert phases == ["frozen", "unfrozen"]  # the probe is one frozen "epoch", whatever frozen.epochs says
    probe = result.history[0]
    assert np.isfinite(probe["valid_loss"]) and probe["valid_accuracy"] > 0.3  # far above chance (0.1)
    assert any("linear probe: L2" in note for note in result.notes)
    head = {n for n, _ in split_parameters(trainer.model)[1]}
    assert all(not torch.equal(trainer.model.state_dict()[n], before[n]) for n in head)


def test_adapt_bn_sets_the_first_batchnorm_to_the_data_statistics(make_config):
    """train.adapt_bn: the stem's BatchNorm ends with the mean/variance of the stem conv's outputs
    over every train image (computed here independently), and a fold then trains end to end."""
    cfg = make_config(*FAST, "train.adapt_bn=true", "train.unfrozen.epochs=1")
    trainer = FoldTrainer(_job(cfg))
    model = trainer.model
    loader = trainer.data.loader(trainer.data.dataset(np.arange(len(trainer.job.table)), train=False))
    with torch.no_grad():  # a cumulative average weighs every batch the same: average the batch statistics
        stems = [model.conv_stem(trainer.rt.images(x)) for x, _ in loader]
    bn = model.bn1
    torch.testing.assert_close(bn.running_mean, torch.stack([s.mean(dim=(0, 2, 3)) for s in stems]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([s.var(dim=(0, 2, 3)) for s in stems]).mean(0),
                               rtol=1e-5, atol=1e-4)  # float rounding: channels_last kernels on the CPU too
    assert bn.momentum == 0.1  # restored after the cumulative pass
    again = FoldTrainer(_job(cfg, fold=1))  # one pass per backbone: the next fold reuses the statistics
    torch.testing.assert_close(again.model.bn1.running_mean, bn.running_mean)
    result = trainer.run()
    assert np.isfinite(result.best_score) and len(result.history) == 2
