"""``train.all_rows_probe``: a frozen-only model's test predictions from one probe fitted on every
train row; the fold heads keep the OOF and the CV; predict and a bundle apply the same head."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from pipeline.config.paths import Paths
from pipeline.core import artifacts
from pipeline.data.tables import read_folds, task_spec
from pipeline.engine.fit import make_loss
from pipeline.engine.probe import fit_linear_probe
from pipeline.ensembles.inference import predict_model
from pipeline.stages.folds import run_folds
from pipeline.stages.train import run_train
from pipeline.training import all_rows
from pipeline.training.fingerprint import fold_digest
from pipeline.training.unfreeze import as_trained

FROZEN = ["train.unfreeze=never", "train.linear_probe=true", "train.unfrozen.epochs=0", "folds.n_splits=3",
          "augment.tta=[identity,hflip]"]


def _csv(path):
    return pd.read_csv(path, dtype={"id": str}, keep_default_na=False)


@pytest.fixture
def frozen_run(make_config, one_torch_thread):
    cfg = make_config(*FROZEN)
    run_folds(cfg)
    run_train(cfg)
    return cfg


def test_the_test_predictions_come_from_a_probe_on_every_train_row(frozen_run):
    bcfg, paths = frozen_run.backbones[0], Paths(frozen_run)
    cfg = as_trained(frozen_run, bcfg)  # as the train stage resolved it (frozen-only: + the zoom view)
    model_dir = paths.backbone_dir(bcfg.slug)
    assert all_rows.is_done(cfg, bcfg)
    assert artifacts.read_json(paths.cv_json(bcfg.slug))["test_from"].startswith("one linear probe on all")
    # the model's test.csv is the all-rows head's, not the fold heads' mean
    model_test, head_test = _csv(paths.test_csv(bcfg.slug)), _csv(model_dir / "all_rows" / "test.csv")
    pred = [c for c in model_test.columns if c.startswith("pred")]
    np.testing.assert_allclose(model_test[pred].to_numpy(), head_test[pred].to_numpy(), atol=1e-6)
    folds_mean = np.mean([_csv(paths.fold_dir(bcfg.slug, k) / "test.csv")[pred].to_numpy() for k in range(3)], 0)
    assert np.abs(model_test[pred].to_numpy() - folds_mean).max() > 1e-4
    # the head is the probe fitted on all rows' cached features (the same search, the same seed)
    table = read_folds(cfg)
    spec = task_spec(cfg, table)
    feats = [load_file(str(f))["features"] for f in paths.feature_cache_dir(bcfg.slug).glob("train-[!hz]*")]
    assert len(feats) == 1  # the identity view's (not train-hflip-*, train-zoom-*)
    weight, bias, _ = fit_linear_probe(spec, make_loss(spec, cfg.train), [feats[0]],
                                       torch.from_numpy(np.array(spec.encode(table))),
                                       seed=cfg.train.seed + cfg.folds.n_splits)
    head = load_file(str(model_dir / "all_rows" / "head.safetensors"))
    torch.testing.assert_close(head["weight"], weight, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(head["bias"], bias, atol=1e-4, rtol=1e-3)


def test_predict_applies_the_same_head_once_on_fold_0s_backbone(frozen_run, capsys):
    cfg = frozen_run
    bcfg, paths = cfg.backbones[0], Paths(cfg)
    test = _csv(paths.test_csv(bcfg.slug))
    capsys.readouterr()
    preds, _ = predict_model(cfg, bcfg.slug, _test_paths(cfg))
    assert "all-rows probe on fold 0's backbone" in capsys.readouterr().out
    pred = [c for c in test.columns if c.startswith("pred")]
    np.testing.assert_allclose(preds.reshape(len(test), -1), test[pred].to_numpy(), atol=1e-4)


def test_switching_it_off_keeps_the_folds_and_restores_the_fold_mean(frozen_run, make_config, capsys):
    cfg = frozen_run
    bcfg, paths = cfg.backbones[0], Paths(cfg)
    off = make_config(*FROZEN, "train.all_rows_probe=false")
    assert fold_digest(off, off.backbones[0], 0) == fold_digest(cfg, bcfg, 0)  # no fold depends on the switch
    capsys.readouterr()
    run_train(off)
    out = capsys.readouterr().out
    assert "fold 0:" not in out  # nothing retrained
    test = _csv(paths.test_csv(bcfg.slug))
    pred = [c for c in test.columns if c.startswith("pred")]
    folds_mean = np.mean([_csv(paths.fold_dir(bcfg.slug, k) / "test.csv")[pred].to_numpy() for k in range(3)], 0)
    np.testing.assert_allclose(test[pred].to_numpy(), folds_mean, atol=1e-6)
    assert artifacts.read_json(paths.cv_json(bcfg.slug))["test_from"] == "the mean of the 3 fold models"
    capsys.readouterr()
    predict_model(off, bcfg.slug, _test_paths(off))
    assert "all-rows probe" not in capsys.readouterr().out


def test_a_fine_tuned_model_has_no_all_rows_head(make_config, one_torch_thread):
    cfg = make_config("train.unfreeze=always", "train.unfrozen.epochs=1", "folds.n_splits=2")
    assert not all_rows.applies(cfg)
    assert all_rows.applies(make_config(*FROZEN))
    assert not all_rows.applies(make_config(*FROZEN, "train.linear_probe=false"))


def test_a_head_left_by_another_fold_config_is_not_used(frozen_run):
    cfg = frozen_run
    model_dir = Paths(cfg).backbone_dir(cfg.backbones[0].slug)
    assert all_rows.saved_head(model_dir) is not None
    config = model_dir / "fold0" / "config.yaml"
    config.write_text(config.read_text() + "\n# retrained with other settings\n")
    assert all_rows.saved_head(model_dir) is None


def _test_paths(cfg):
    from pipeline.data.images import PATH
    from pipeline.data.tables import read_test_table

    return list(read_test_table(cfg)[PATH])


def test_a_bundle_carries_the_head_and_predicts_what_predict_does(frozen_run, tmp_path):
    from pipeline.ensembles.inference import predict_submission
    from pipeline.stages.bundle import predict_from_bundle, run_bundle

    cfg = frozen_run
    slug, paths = cfg.backbones[0].slug, Paths(cfg)
    bundle = run_bundle(cfg, method=slug, out=str(tmp_path / "bundle"))
    assert (bundle / "runs" / cfg.name / slug / "all_rows" / "head.safetensors").exists()
    expected = predict_submission(cfg, method=slug, out=str(tmp_path / "expected.csv"))
    assert predict_from_bundle(bundle, str(paths.test_dir), str(paths.sample_submission),
                               str(tmp_path / "bundled.csv"), slug) == 0
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "bundled.csv"), pd.read_csv(expected))


@pytest.mark.parametrize("task, metric", [("binary", "roc_auc"), ("regression", "rmse"), ("multilabel", "f1")])
def test_every_task_gets_the_all_rows_head_and_predict_agrees(make_config, tmp_path, one_torch_thread, task, metric):
    """The head's task spec travels with it: a regression head predicts in the target's units
    (standardised with all rows' mean and std), a multilabel one through sigmoids."""
    from conftest import write_dataset

    cfg = make_config(*FROZEN, f"metric={metric}", data=write_dataset(tmp_path / task, task, n_train=48, n_test=10))
    run_folds(cfg)
    run_train(cfg)
    bcfg, paths = cfg.backbones[0], Paths(cfg)
    assert artifacts.read_json(paths.cv_json(bcfg.slug))["test_from"].startswith("one linear probe on all 48")
    test = _csv(paths.test_csv(bcfg.slug))
    pred = [c for c in test.columns if c.startswith("pred")]
    preds, _ = predict_model(cfg, bcfg.slug, _test_paths(cfg))
    np.testing.assert_allclose(preds.reshape(len(test), -1), test[pred].to_numpy(), atol=1e-4)
    if task == "regression":  # in the digits' units (0..9), not standardised ones
        assert 0 < test["pred"].mean() < 9 and test["pred"].std() > 0.1
