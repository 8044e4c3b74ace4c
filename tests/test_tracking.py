"""Tracked experiments: an MLflow run written to the local store (SQLite, no server) and read back;
TensorBoard event files; ``none`` writes nothing."""
from __future__ import annotations

import pandas as pd
import pytest

from pipeline import tracking
from pipeline.config.paths import Paths
from pipeline.core.errors import PipelineError
from pipeline.stages.ensemble import run_ensemble
from pipeline.stages.folds import run_folds
from pipeline.stages.leaderboard import run_leaderboard
from pipeline.stages.train import run_train

TINY = ["train.num_workers=0", "augment.train=[]", "folds.n_splits=2", "ensemble.methods=[mean]"]


def _train(cfg):
    run_folds(cfg)
    run_train(cfg)
    return cfg.backbones[0]


def test_an_mlflow_run_is_written_and_read_back(make_config, one_torch_thread):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    cfg = make_config(*TINY, "tracking.backend=mlflow")
    bcfg = _train(cfg)
    run_ensemble(cfg)  # its hook logs a run per method
    client = MlflowClient(tracking_uri=tracking.default_uri(cfg))
    assert tracking.default_uri(cfg).endswith("mlruns/mlflow.db")
    run_id = tracking.run_id_for(cfg, bcfg.slug)
    run = client.get_run(run_id)
    assert run.info.run_name == bcfg.slug and run.info.status == "FINISHED"
    assert float(run.data.params["train.unfrozen.lr"]) == cfg.train.unfrozen.lr
    assert run.data.tags["mlflow.source.git.commit"] and run.data.tags["git.dirty"] in ("true", "false", "unknown")
    cv = (Paths(cfg).cv_json(bcfg.slug)).read_text()
    assert run.data.metrics["cv_mean"] == pytest.approx(__import__("json").loads(cv)["cv_mean"])
    files = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "cv.json", f"{cfg.name}-{bcfg.slug}.csv"} <= files

    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    assert sorted(r.info.run_name for r in children) == ["fold0", "fold1"]
    curve = client.get_metric_history(children[0].info.run_id, "valid_accuracy")
    assert [m.step for m in sorted(curve, key=lambda m: m.step)] == [0, 1]  # one frozen, one unfrozen epoch
    assert {"lr_head", "lr_backbone", "train_loss", "valid_loss"} <= set(children[0].data.metrics)

    ensemble_run = client.get_run(tracking.run_id_for(cfg, "mean"))
    assert "nested_cv" in ensemble_run.data.metrics
    assert f"{cfg.name}-mean.csv" in {a.path for a in client.list_artifacts(ensemble_run.info.run_id)}
    board = pd.read_csv(run_leaderboard(cfg)).set_index("model")
    assert board.loc[bcfg.slug, "run_id"] == run_id and board.loc["mean", "run_id"] == ensemble_run.info.run_id

    # a re-run of the same config continues the run; a fold that was not logged is added from disk
    client.delete_run(children[1].info.run_id)
    run_train(cfg)
    assert tracking.run_id_for(cfg, bcfg.slug) == run_id
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    assert sorted(r.info.run_name for r in children) == ["fold0", "fold1"]


def test_tensorboard_event_files_hold_each_folds_curves(make_config, one_torch_thread):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = make_config(*TINY, "tracking.backend=tensorboard", "folds.n_splits=2")
    bcfg = _train(cfg)
    run_dir = Paths(cfg).exp_dir.parent.parent / "tensorboard" / tracking.run_id_for(cfg, bcfg.slug)
    events = EventAccumulator(str(run_dir / "fold0")).Reload()
    assert [e.step for e in events.Scalars("valid_accuracy")] == [0, 1]
    assert events.Scalars("lr_head")[-1].value > 0
    assert (run_dir / "files" / "config.yaml").exists() and (run_dir / "files" / "cv.json").exists()


def test_backend_none_writes_nothing(make_config, one_torch_thread):
    cfg = make_config(*TINY)
    bcfg = _train(cfg)
    assert tracking.run_id_for(cfg, bcfg.slug) is None
    assert not (Paths(cfg).backbone_dir(bcfg.slug) / tracking.TRACKING_FILE).exists()


def test_an_unusable_tracking_uri_stops_before_training(make_config):
    pytest.importorskip("mlflow")
    cfg = make_config(*TINY, "tracking.backend=mlflow", "tracking.uri=nosuchscheme://host/x")
    run_folds(cfg)
    with pytest.raises(PipelineError, match="tracking.uri nosuchscheme"):
        run_train(cfg)
    assert not Paths(cfg).fold_dir(cfg.backbones[0].slug, 0).joinpath("history.csv").exists()


def test_params_and_history_metrics():
    assert tracking.as_params({"train": {"frozen": {"lr": 0.001, "optimizer": None}}, "tta": ["identity"]}) == {
        "train.frozen.lr": "0.001", "train.frozen.optimizer": "null", "tta": "[identity]"}
    rows = [{"epoch": 0, "phase": "frozen", "lr_head": float("nan"), "valid_loss": 0.5}]
    assert tracking.history_metrics(rows) == [("valid_loss", 0.5, 0)]
