"""Pretrain stage: a checkpoint with its architecture and class count in the metadata, which
``weights: pretrained:<id>`` loads (head replaced when the class count differs, a clear error when
the architecture differs); the held-out split; a changed checkpoint retrains the fine-tuned folds."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from conftest import DEMO_CONFIG, write_dataset
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline.cli import main
from pipeline.config.paths import Paths
from pipeline.core.errors import PipelineError
from pipeline.engine.backbones import create_backbone, split_parameters
from pipeline.stages.folds import run_folds
from pipeline.stages.pretrain import run_pretrain
from pipeline.stages.train import run_train
from pipeline.training.fingerprint import fold_is_done
from pipeline.training.unfreeze import as_trained

FAST = ["train.num_workers=0", "augment.train=[]", "folds.n_splits=2"]
PRE_ID = "pre-digits"


@pytest.fixture
def pretrained(tmp_path, make_config, one_torch_thread):
    """A config whose pretrain section trains test_efficientnet on 100 multiclass digits, run once."""
    def make(*overrides, **sections):
        pretrain = {"data": write_dataset(tmp_path / "pre", "multiclass", n_train=100, n_test=4),
                    "backbones": [{"name": "test_efficientnet", "id": PRE_ID, "weights": "none", "image_size": 32}],
                    "holdout": 0.2, "train": {"unfrozen": {"epochs": 1}}}
        return make_config(*FAST, *overrides, pretrain=pretrain, **sections)
    cfg = make()
    run_pretrain(cfg)
    return make, cfg


def test_pretrain_writes_a_checkpoint_with_its_architecture_and_classes(pretrained):
    _, cfg = pretrained
    folder = Paths(cfg).backbone_dir(PRE_ID)
    with safe_open(str(folder / "pretrained.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["timm_name"] == "test_efficientnet" and meta["num_classes"] == "10"
    assert json.loads(meta["classes"]) == [str(d) for d in range(10)]
    summary = json.loads((folder / "pretrained.json").read_text())
    assert (summary["train_rows"], summary["holdout_rows"]) == (80, 20)  # pretrain.holdout 0.2, stratified
    history = pd.read_csv(folder / "pretrain" / "history.csv")
    assert list(history["phase"]) == ["frozen", "unfrozen"]
    oof = pd.read_csv(folder / "pretrain" / "oof.csv")
    assert len(oof) == 20  # the held-out rows were scored, never trained on
    kept = load_file(str(folder / "pretrain" / "best.safetensors"))
    saved = load_file(str(folder / "pretrained.safetensors"))
    assert kept.keys() == saved.keys() and all(torch.equal(kept[k], saved[k]) for k in kept)


def test_a_second_run_is_skipped_and_force_retrains(pretrained, capsys):
    _, cfg = pretrained
    target = Paths(cfg).backbone_dir(PRE_ID) / "pretrained.safetensors"
    before = target.stat().st_mtime_ns
    run_pretrain(cfg)
    assert "up to date" in capsys.readouterr().out and target.stat().st_mtime_ns == before
    run_pretrain(cfg, force=True)
    assert target.stat().st_mtime_ns != before


def test_fine_tuning_starts_from_the_pretrained_backbone_with_a_new_head(pretrained, tmp_path):
    make, cfg = pretrained
    saved = load_file(str(Paths(cfg).backbone_dir(PRE_ID) / "pretrained.safetensors"))
    binary = make(data=write_dataset(tmp_path / "bin", "binary", n_train=40, n_test=8),
                  backbones=[{"name": "test_efficientnet", "weights": f"pretrained:{PRE_ID}", "image_size": 32}])
    model = create_backbone(binary.backbones[0], 1, Paths(binary).exp_dir)
    body, head = split_parameters(model)
    assert all(torch.equal(p.detach(), saved[n]) for n, p in body)
    assert all(not p.detach().any() for _, p in head), "a 10-class head on a binary task must be replaced (zeros)"
    run_folds(binary)
    run_train(binary)
    assert Paths(binary).cv_json(binary.backbones[0].slug).exists()

    same = make(backbones=[{"name": "test_efficientnet", "weights": f"pretrained:{PRE_ID}", "image_size": 32}])
    model = create_backbone(same.backbones[0], 10, Paths(same).exp_dir)
    assert all(torch.equal(p.detach(), saved[n]) for n, p in split_parameters(model)[1]), "same classes: head kept"


def test_another_architecture_is_refused_before_training(pretrained):
    make, _ = pretrained
    cfg = make(backbones=[{"name": "test_resnet", "weights": f"pretrained:{PRE_ID}", "image_size": 32}])
    run_folds(cfg)
    with pytest.raises(PipelineError, match=r"holds a pretrained test_efficientnet.*test_resnet.*architectures differ"):
        run_train(cfg)
    assert not Paths(cfg).fold_dir(cfg.backbones[0].slug, 0).exists()


def test_a_missing_checkpoint_names_the_pretrain_command(make_config, capsys):
    cfg = make_config(*FAST, backbones=[{"name": "test_efficientnet", "weights": "pretrained:nothing-here"}])
    run_folds(cfg)
    with pytest.raises(PipelineError, match="does not exist; run `python -m pipeline pretrain"):
        run_train(cfg)
    assert main(["pretrain", "-c", str(DEMO_CONFIG), "runs_dir=" + str(cfg.runs_dir)]) == 2
    assert "pretrain.data is not set" in capsys.readouterr().err


def test_a_new_checkpoint_makes_the_fine_tuned_folds_stale(pretrained):
    make, cfg = pretrained
    tuned = make(backbones=[{"name": "test_efficientnet", "weights": f"pretrained:{PRE_ID}", "image_size": 32}],
                 train={"unfrozen": {"epochs": 0}})
    run_folds(tuned)
    run_train(tuned, fold=0)
    bcfg = tuned.backbones[0]
    trained = as_trained(tuned, bcfg)  # as the train stage resolved it (frozen-only: the zoom view added)
    assert fold_is_done(trained, bcfg, 0)
    run_pretrain(cfg, force=True)  # new weights under the same id
    assert not fold_is_done(trained, bcfg, 0)


def test_pretrain_config_errors_name_the_key(make_config):
    with pytest.raises(PipelineError, match="pretrain.train.unfrozn"):
        make_config("pretrain.train={unfrozn: {epochs: 1}}")
    with pytest.raises(PipelineError, match="pretrain.holdout"):
        make_config("pretrain.holdout=0.9")


def test_a_checkpoint_of_another_experiment_is_named_exp_slash_id():
    from pathlib import Path

    from pipeline.engine.backbones import pretrained_file
    assert pretrained_file("pretrained:x", Path("runs/exp")) == Path("runs/exp/x/pretrained.safetensors")
    assert pretrained_file("pretrained:other/x", Path("runs/exp")) == Path("runs/other/x/pretrained.safetensors")
