"""configs/seed_recipe.yaml: the source's recipe validates, and the same recipe trains through with
a tiny timm ResNet (``test_resnet``, ``weights: none``) on 32 px digits; per-phase optimizers."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO_ROOT, write_dataset

from pipeline.config.paths import Paths
from pipeline.config.schema import config_from_dict, load_config
from pipeline.core.errors import PipelineError
from pipeline.engine.backbones import create_backbone
from pipeline.engine.fit import build_optimizer
from pipeline.stages.folds import run_folds
from pipeline.stages.train import run_train

SEED_RECIPE = REPO_ROOT / "configs" / "seed_recipe.yaml"


def _tiny_recipe(tmp_path, *overrides):
    """The recipe exactly as shipped (optimizers, LRs, phases), on tiny data and a tiny ResNet."""
    raw = yaml.safe_load(SEED_RECIPE.read_text())
    raw["data"] = write_dataset(tmp_path / "data", "multiclass", n_train=60, n_test=12)
    raw["backbones"] = [{"name": "test_resnet", "weights": "none", "image_size": 32}]
    raw["folds"]["n_splits"] = 2
    raw["train"]["unfrozen"]["epochs"] = 1
    raw["train"]["num_workers"] = 0
    raw["augment"]["tta"] = ["identity"]
    for key in ("runs_dir", "folds_dir", "submissions_dir"):
        raw[key] = str(tmp_path / key)
    return config_from_dict(raw, list(overrides))


def test_the_seed_recipe_validates_as_the_source_describes_it():
    cfg = load_config(SEED_RECIPE)
    (bcfg,) = cfg.backbones
    assert (bcfg.name, bcfg.weights) == ("resnet50", "hub")
    t = cfg.train
    assert not t.linear_probe, "the probe would replace the SGD-trained head"
    assert (t.frozen.optimizer, t.frozen.lr) == ("momentum", 1e-3)
    assert t.unfrozen.epochs >= 1


def test_the_frozen_phase_runs_classical_sgd_with_momentum_0_9(tmp_path):
    cfg = _tiny_recipe(tmp_path)
    model = create_backbone(cfg.backbones[0], 10)
    frozen = build_optimizer(model, cfg.train, cfg.train.frozen, frozen=True)
    assert type(frozen) is torch.optim.SGD
    for group in frozen.param_groups:
        assert group["momentum"] == 0.9 and group["nesterov"] is False and group["lr"] == 1e-3
    unfrozen = build_optimizer(model, cfg.train, cfg.train.unfrozen, frozen=False)
    assert type(unfrozen) is torch.optim.AdamW


def test_the_tiny_seed_recipe_trains_through(tmp_path, one_torch_thread):
    cfg = _tiny_recipe(tmp_path)
    run_folds(cfg)
    run_train(cfg)
    paths = Paths(cfg)
    model_id = cfg.backbones[0].slug
    history = pd.read_csv(paths.fold_dir(model_id, 0) / "history.csv")
    frozen = history[history["phase"] == "frozen"]
    assert len(frozen) == cfg.train.frozen.epochs and (history["phase"] == "unfrozen").sum() == 1
    assert frozen["lr_head"].iloc[0] == pytest.approx(1e-3)  # no warmup: the source's LR from the first step
    assert paths.cv_json(model_id).exists() and paths.oof_csv(model_id).exists()


def test_a_phase_without_its_own_optimizer_uses_train_optimizer(tmp_path):
    cfg = _tiny_recipe(tmp_path, "train.frozen.optimizer=null", "train.optimizer=sgd")
    model = create_backbone(cfg.backbones[0], 10)
    group = build_optimizer(model, cfg.train, cfg.train.frozen, frozen=True).param_groups[0]
    assert group["nesterov"] is True  # timm's `sgd` is Nesterov SGD


def test_a_frozen_optimizer_under_the_linear_probe_is_refused(tmp_path):
    with pytest.raises(PipelineError, match="train.frozen.optimizer.*linear_probe"):
        _tiny_recipe(tmp_path, "train.linear_probe=true")
    with pytest.raises(PipelineError, match="not a timm optimizer"):
        _tiny_recipe(tmp_path, "train.unfrozen.optimizer=sgdd")
