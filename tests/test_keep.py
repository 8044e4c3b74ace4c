"""Which weights a fold keeps (train.keep best | last | swa), early stopping across the BatchNorm
switch, and the frozen-only fast path. CPU, timm's tiny ``test_efficientnet``, digits at 32 px."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from pipeline.config.paths import Paths
from pipeline.core import artifacts
from pipeline.data.tables import read_folds, read_test_table, task_spec
from pipeline.engine.features import FeatureStore
from pipeline.stages.folds import run_folds
from pipeline.stages.train import run_train
from pipeline.training.fold_state import FoldState
from pipeline.training.trainer import FoldJob, FoldTrainer

FAST = ["train.num_workers=0", "augment.train=[]"]


def _job(cfg, fold=0, **kwargs) -> FoldJob:
    run_folds(cfg)
    table = read_folds(cfg)
    return FoldJob(cfg, cfg.backbones[0], task_spec(cfg, table), table, fold, progress=False, **kwargs)


def _scripted_scores(monkeypatch, scores: list[float]) -> None:
    """Each epoch's validation score comes from ``scores`` (in epoch order) instead of the model."""
    it = iter(scores)
    monkeypatch.setattr("pipeline.training.trainer.score", lambda *args, **kwargs: next(it))


@pytest.mark.parametrize("keep, kept_epoch", [("best", 1), ("last", 3)])
def test_keep_best_takes_the_best_epoch_and_last_the_final_one(make_config, monkeypatch, keep, kept_epoch):
    cfg = make_config(*FAST, "train.frozen.epochs=1", "train.unfrozen.epochs=3", f"train.keep={keep}")
    trainer = FoldTrainer(_job(cfg))
    saved = {}
    original = FoldState.keep

    def remember(self, model):  # the weights each epoch leaves behind, by epoch
        saved[self.epoch] = {k: v.clone() for k, v in model.state_dict().items()}
        original(self, model)

    monkeypatch.setattr(FoldState, "keep", remember)
    _scripted_scores(monkeypatch, [0.5, 0.9, 0.6, 0.7])  # epochs 0 (frozen) .. 3
    result = trainer.run()
    assert result.kept.startswith(f"epoch {kept_epoch}")
    assert result.best_score == {1: 0.9, 3: 0.7}[kept_epoch]
    for name, tensor in trainer.final_model.state_dict().items():
        torch.testing.assert_close(tensor, saved[kept_epoch][name])


def test_keep_best_says_when_the_frozen_head_is_kept(make_config, monkeypatch):
    cfg = make_config(*FAST, "train.frozen.epochs=1", "train.unfrozen.epochs=2", "train.keep=best")
    _scripted_scores(monkeypatch, [0.9, 0.5, 0.6])
    result = FoldTrainer(_job(cfg)).run()
    assert result.kept == "epoch 0 (frozen)"
    assert any("no unfrozen epoch beat the frozen head" in note for note in result.notes)


def test_keep_swa_averages_the_last_epochs_weights(make_config, monkeypatch):
    """With BatchNorm statistics frozen, the kept float weights are exactly the mean of the last
    ``swa_epochs`` epochs' weights."""
    cfg = make_config(*FAST, "train.frozen.epochs=1", "train.unfrozen.epochs=3", "train.keep=swa",
                      "train.swa_epochs=2", "train.freeze_bn=true")
    trainer = FoldTrainer(_job(cfg))
    snapshots = {}
    original = FoldTrainer.swa_update

    def remember(self):
        snapshots[self.state.swa_count] = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        original(self)

    monkeypatch.setattr(FoldTrainer, "swa_update", remember)
    result = trainer.run()
    assert sorted(snapshots) == [0, 1] and result.kept == "swa of 2 unfrozen epochs"
    final = trainer.final_model.state_dict()
    for name, tensor in final.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor, (snapshots[0][name] + snapshots[1][name]) / 2)
    assert np.isfinite(result.best_score)


def test_keep_swa_recomputes_batchnorm_statistics(make_config):
    cfg = make_config(*FAST, "train.frozen.epochs=1", "train.unfrozen.epochs=2", "train.keep=swa")
    trainer = FoldTrainer(_job(cfg))
    trainer.run()
    assert trainer.state.swa is not None
    bn = [k for k in trainer.state.swa if k.endswith("running_var")][0]
    assert not torch.equal(trainer.final_model.state_dict()[bn],
                           trainer.state.swa[bn].to(trainer.final_model.state_dict()[bn].dtype))


def test_keep_swa_resumes_to_the_same_weights(make_config, tmp_path, monkeypatch):
    words = [*FAST, "folds.n_splits=2", "train.frozen.epochs=1", "train.unfrozen.epochs=3", "train.keep=swa"]
    straight = make_config(*words, f"runs_dir={tmp_path / 'straight'}")
    run_folds(straight)
    run_train(straight, fold=0)
    resumed = make_config(*words, f"runs_dir={tmp_path / 'resumed'}")
    original = FoldTrainer.end_epoch

    def die_after_epoch_2(self, epoch, *args, **kwargs):
        stop = original(self, epoch, *args, **kwargs)
        if epoch == 2:  # one epoch averaged, one to go
            raise KeyboardInterrupt
        return stop

    monkeypatch.setattr(FoldTrainer, "end_epoch", die_after_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run_train(resumed, fold=0)
    monkeypatch.setattr(FoldTrainer, "end_epoch", original)
    run_train(resumed, fold=0)
    name = straight.backbones[0].name
    a = load_file(str(Paths(straight).fold_dir(name, 0) / "best.safetensors"))
    b = load_file(str(Paths(resumed).fold_dir(name, 0) / "best.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    kept = artifacts.read_json(Paths(resumed).fold_dir(name, 0) / "kept.json")
    assert kept["kept"] == "swa of 2 unfrozen epochs" and kept["keep"] == "swa"


def test_early_stopping_counts_against_the_unfrozen_best_and_waits_for_min_epochs(make_config, monkeypatch):
    """A frozen head at 0.9 and an unfrozen phase that starts at 0.5 and climbs slowly: patience 1
    must not stop it after the first unfrozen epoch (the old rule compared against 0.9)."""
    cfg = make_config(*FAST, "train.frozen.epochs=1", "train.unfrozen.epochs=4", "train.early_stopping_patience=1",
                      "train.min_unfrozen_epochs=1", "train.keep=best")
    _scripted_scores(monkeypatch, [0.9, 0.5, 0.6, 0.55, 0.99])
    result = FoldTrainer(_job(cfg)).run()
    assert [row["epoch"] for row in result.history] == [0, 1, 2, 3]  # 0.55 < 0.6: stopped after epoch 3


def test_min_unfrozen_epochs_holds_early_stopping_back(make_config, monkeypatch):
    cfg = make_config(*FAST, "train.frozen.epochs=1", "train.unfrozen.epochs=4", "train.early_stopping_patience=1",
                      "train.min_unfrozen_epochs=4", "train.keep=best")
    _scripted_scores(monkeypatch, [0.9, 0.5, 0.4, 0.3, 0.2])
    result = FoldTrainer(_job(cfg)).run()
    assert len(result.history) == 5


def test_cv_json_reports_the_selection_and_the_untuned_folds(make_config):
    cfg = make_config(*FAST, "folds.n_splits=2", "train.frozen.epochs=1", "train.unfrozen.epochs=1",
                      "train.keep=last")
    run_folds(cfg)
    run_train(cfg)
    cv = artifacts.read_json(Paths(cfg).cv_json(cfg.backbones[0].name))
    assert cv["keep"] == "last" and cv["selection"].startswith("none")
    assert cv["tuned_folds"] == [] and cv["cv_untuned"] == pytest.approx(cv["cv_mean"])
    assert len(cv["kept"]) == 2 and all(k.startswith("epoch 1") for k in cv["kept"])


def test_frozen_only_predicts_from_cached_features_equal_to_the_model(make_config, monkeypatch):
    """unfrozen.epochs 0: OOF and test predictions come from per-view cached features (the backbone
    runs once per image and view for all folds) and equal a forward pass through the whole model."""
    cfg = make_config(*FAST, "folds.n_splits=2", "train.frozen.epochs=1", "train.unfrozen.epochs=0",
                      "augment.tta=[identity,hflip]")
    run_folds(cfg)
    table = read_folds(cfg)
    test = read_test_table(cfg)
    store = FeatureStore()  # the run's store: both folds share it, as run_train's folds do
    calls = []
    trainers = []
    for fold in (0, 1):
        trainer = FoldTrainer(FoldJob(cfg, cfg.backbones[0], task_spec(cfg, table), table, fold, test=test,
                                      progress=False, store=store))
        forward = trainer.model.forward_features
        trainer.model.forward_features = lambda x, f=forward: (calls.append(len(x)), f(x))[1]
        trainers.append((trainer, trainer.run()))
    assert sum(calls) == 2 * (len(table) + len(test))  # every image once per view, for both folds
    trainer, result = trainers[1]
    del trainer.model.forward_features
    monkeypatch.setattr(FoldTrainer, "frozen_only", lambda self: False)
    oof, test_frame = trainer.predictions()
    pd.testing.assert_frame_equal(oof, result.oof, rtol=1e-4, atol=1e-5)
    pd.testing.assert_frame_equal(test_frame, result.test, rtol=1e-4, atol=1e-5)


def test_finetune_bench_compares_the_kept_weights_on_the_hidden_labels(make_config, tmp_path):
    """The finetune benchmark on a tiny set with a solution file: one row per seed and weights
    (probe, best, last, swa) with CV, hidden-test score and their difference; a per-fold table
    with the first unfrozen batch losses."""
    from conftest import _digits, write_dataset

    from pipeline.bench.quality import bench_finetune

    data = write_dataset(tmp_path / "data", "multiclass", n_train=60, n_test=12)
    labels = _digits()[1][60:72]
    pd.DataFrame({"image_id": [f"test_{i:04d}" for i in range(12)], "label": [str(v) for v in labels]}).to_csv(
        tmp_path / "data" / "solution.csv", index=False)
    cfg = make_config(*FAST, "folds.n_splits=2", "folds.strategy=kfold", "train.unfrozen.epochs=2",
                      "train.linear_probe=true", data=data)
    md = bench_finetune(cfg, seeds=(1,))
    for weights in ("probe", "best", "last", "swa"):
        assert f"| 1 | {weights} |" in md
    assert md.count("| 1 | 0 |") == 1 and md.count("| 1 | 1 |") == 1
    assert "of 1 seeds" in md and "chance: 2.30" in md


def test_finetune_bench_needs_the_hidden_labels(make_config):
    from pipeline.bench.quality import bench_finetune
    from pipeline.core.errors import PipelineError

    with pytest.raises(PipelineError, match="solution.csv"):
        bench_finetune(make_config(*FAST), seeds=(1,))
