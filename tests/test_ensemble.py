"""Ensemble stage: each method on hand-computed arrays, honest nested CV, and the stage on fake backbones.

Backbone outputs are written by the test with known numbers (no training): a tiny Kaggle-layout
dataset in ``tmp_path``, a folds file, and per backbone ``oof.csv``/``test.csv``/``cv.json``.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.config.paths import Paths
from pipeline.config.schema import ENSEMBLE_METHODS, config_from_dict
from pipeline.core.errors import PipelineError
from pipeline.data.tables import task_spec
from pipeline.domain.metrics import get_metric
from pipeline.domain.tasks import TaskSpec
from pipeline.ensembles import blend as ensemble
from pipeline.ensembles.blend import Inputs, fit_weights, hill_climb, mean_blend, rank_blend, run_method
from pipeline.stages.ensemble import run_ensemble

CLASSES = ["cat", "dog", "emu"]
LABELS = ["round", "small"]
N_FOLDS = 3


# ---------------------------------------------------------------------------- a fake experiment


def _targets(task: str, i: int) -> dict:
    if task == "multiclass":
        return {"label": CLASSES[i % 3]}
    if task == "binary":
        return {"label": ["neg", "pos"][i % 2]}
    return {"labels": " ".join(lab for k, lab in enumerate(LABELS) if (i >> k) & 1)}  # multilabel


def _fake_predictions(spec: TaskSpec, y: np.ndarray, quality: float, rng) -> np.ndarray:
    """Probabilities that lean towards the truth by ``quality`` (plus noise)."""
    if spec.task == "multiclass":
        logits = quality * np.eye(len(spec.classes))[y] + rng.normal(size=(len(y), len(spec.classes)))
        return np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = y.reshape(len(y), -1)
    return 1 / (1 + np.exp(-(quality * (2 * y - 1) + rng.normal(size=y.shape))))


def write_experiment(root, task="multiclass", metric="accuracy", methods=ENSEMBLE_METHODS,
                     models=("alpha", "beta", "gamma"), n_train=30, n_test=6, **sections):
    """A dataset, config, folds file and fake backbone outputs under ``root``; returns the config."""
    data = root / "data"
    ids = [f"img_{i:03d}" for i in range(n_train)]
    test_ids = [f"tst_{i:03d}" for i in range(n_test)]
    for split, names in (("train", ids), ("test", test_ids)):
        (data / split).mkdir(parents=True)
        for name in names:
            Image.fromarray(np.full((8, 8), 40, np.uint8)).save(data / split / f"{name}.png")
    train = pd.DataFrame([{"image_id": i, **_targets(task, k)} for k, i in enumerate(ids)])
    train.to_csv(data / "train.csv", index=False)
    target = list(train.columns[1:])
    pd.DataFrame({"image_id": test_ids, target[0]: train[target[0]].iloc[0]}).to_csv(
        data / "sample_submission.csv", index=False)
    cfg = config_from_dict({
        "name": "exp", "metric": metric, "runs_dir": str(root / "runs"), "folds_dir": str(root / "folds"),
        "submissions_dir": str(root / "submissions"), "folds": {"n_splits": N_FOLDS},
        "data": {"root": str(data), "task": task, "id_column": "image_id", "target_columns": target},
        "backbones": [{"name": m, "weights": "none"} for m in models],
        "ensemble": {"methods": list(methods), "hill_climb_max_iter": 20}, **sections})
    folds = train.assign(fold=(np.arange(n_train) // 4) % N_FOLDS)  # every class in every fold
    Paths(cfg).folds_csv.parent.mkdir(parents=True)
    folds.to_csv(Paths(cfg).folds_csv, index=False)
    write_backbones(cfg, folds, test_ids)
    return cfg


def write_backbones(cfg, folds: pd.DataFrame, test_ids: list[str]) -> None:
    paths, spec = Paths(cfg), task_spec(cfg, folds)
    y, metric = spec.encode(folds), get_metric(cfg.metric)
    rng = np.random.default_rng(0)
    for quality, b in zip((3.0, 1.5, 0.5), cfg.backbones):
        oof = _fake_predictions(spec, y, quality, rng)
        frame = spec.predictions_frame(folds["image_id"], oof, "image_id")
        frame.insert(1, "fold", folds["fold"])
        paths.backbone_dir(b.name).mkdir(parents=True)
        frame.to_csv(paths.oof_csv(b.name), index=False)
        shape = (len(test_ids), len(spec.pred_columns))
        test = rng.dirichlet(np.ones(shape[1]), shape[0]) if spec.task == "multiclass" else rng.uniform(size=shape)
        spec.predictions_frame(test_ids, test, "image_id").to_csv(paths.test_csv(b.name), index=False)
        pred = oof[:, 0] if spec.task == "binary" else oof
        scores = [metric(y[folds["fold"] == k], pred[folds["fold"] == k], spec.task) for k in range(N_FOLDS)]
        paths.cv_json(b.name).write_text(json.dumps({"metric": metric.name, "folds": scores,
                                                     "greater_is_better": metric.greater_is_better,
                                                     "oof": metric(y, pred, spec.task)}))


@pytest.fixture(scope="module")
def plain_cfg():
    return config_from_dict({"name": "arrays", "ensemble": {"hill_climb_max_iter": 20}})


def make_inputs(P: np.ndarray, y: np.ndarray, folds: np.ndarray, task="binary", metric="accuracy") -> Inputs:
    spec = TaskSpec(task, ("label",), ("0", "1") if task == "binary" else ())
    return Inputs(spec=spec, metric=get_metric(metric, task), names=[f"m{i}" for i in range(len(P))],
                  ids=np.array([f"r{i}" for i in range(len(y))]), folds=folds, y=y, oof=P,
                  test_ids=np.array(["t0", "t1"]), test=P[:, :2])


# ---------------------------------------------------------------------------- methods on arrays


def test_mean_blend_averages_models():
    P = np.array([[[0.2, 0.8], [0.6, 0.4]], [[0.4, 0.6], [1.0, 0.0]]])
    np.testing.assert_allclose(mean_blend(P), [[0.3, 0.7], [0.8, 0.2]])


def test_rank_blend_scales_ranks_to_unit_interval_and_averages():
    P = np.array([[[0.1], [0.9], [0.5]], [[0.3], [0.2], [0.8]]])  # ranks [0, 1, .5] and [.5, 0, 1]
    np.testing.assert_allclose(rank_blend(P)[:, 0], [0.25, 0.5, 0.75])
    values = rank_blend(P * 100, task="regression")[:, 0]  # back on the values' scale, rank order kept
    np.testing.assert_allclose(sorted(values), sorted(mean_blend(P * 100)[:, 0]))
    assert np.argsort(values).tolist() == [0, 1, 2]


def test_fit_weights_hand_computed():
    y = np.array([0.0, 1.0, 2.0, 3.0])
    P = np.stack([y + 1, y - 1])[:, :, None]  # errors cancel exactly at (0.5, 0.5)
    np.testing.assert_allclose(fit_weights(P, y, "regression"), [0.5, 0.5], atol=1e-4)
    yb = np.array([0.0, 1.0, 0.0, 1.0])
    good, bad = np.array([0.2, 0.8, 0.2, 0.8]), np.array([0.8, 0.2, 0.8, 0.2])
    w = fit_weights(np.stack([bad, good])[:, :, None], yb, "binary")
    assert w.min() >= 0 and w.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(w, [0.0, 1.0], atol=1e-4)


def test_hill_climb_starts_from_best_single_and_never_ends_below_it():
    metric = get_metric("accuracy")
    for seed in range(8):
        rng = np.random.default_rng(seed)
        y = rng.integers(0, 3, 40)
        P = rng.dirichlet(np.ones(3), size=(4, 40)) + 0.6 * np.eye(3)[y] * rng.uniform(0, 1, (4, 1, 1))
        singles = [metric(y, p, "multiclass") for p in P]
        chosen = hill_climb(P, y, metric, "multiclass", max_iter=25)
        assert chosen[0] == int(np.argmax(singles))
        blend = np.mean(P[chosen], axis=0)
        assert metric(y, blend, "multiclass") >= max(singles)


def test_hill_climb_on_a_lower_is_better_metric():
    metric = get_metric("rmse")
    y = np.array([0.0, 1.0, 2.0, 3.0])
    P = np.stack([y + 1, y - 1, y + 3])[:, :, None]
    chosen = hill_climb(P, y, metric, "regression", max_iter=10)
    assert chosen[:2] in ([0, 1], [1, 0])  # the pair whose errors cancel
    assert metric(y, np.mean(P[chosen], axis=0)[:, 0], "regression") == pytest.approx(0.0)


def test_stacking_outputs_probabilities_per_task():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 60)
    P = rng.dirichlet(np.ones(3), size=(2, 60))
    multi = ensemble.fit_stacking(P, y, "multiclass").predict(P)
    assert multi.shape == (60, 3) and np.allclose(multi.sum(axis=1), 1)
    yb = (y > 0).astype(float)
    binary = ensemble.fit_stacking(P[:, :, 1:], yb, "binary").predict(P[:, :, 1:])
    assert binary.shape == (60, 1) and ((binary >= 0) & (binary <= 1)).all()
    ym = np.column_stack([yb, np.zeros(60)])  # a label never present: prior, no crash
    assert ensemble.fit_stacking(P[:, :, :2], ym, "multilabel").predict(P[:, :, :2]).shape == (60, 2)


# ---------------------------------------------------------------------------- honest nested CV


def _swapped_models():
    """Two folds: model A is right on fold 0 and wrong on fold 1, model B the opposite.

    Anything learned on a fold's own labels scores 1.0 there; learned on the other fold, 0.0.
    """
    y = np.tile([0.0, 1.0], 8)
    folds = np.repeat([0, 1], 8)
    right, wrong = np.where(y == 1, 0.9, 0.1), np.where(y == 1, 0.1, 0.9)
    A, B = np.where(folds == 0, right, wrong), np.where(folds == 0, wrong, right)
    return make_inputs(np.stack([A, B])[:, :, None], y, folds)


@pytest.mark.parametrize("method", ["weighted", "hill_climb", "stacking"])
def test_nested_cv_never_fits_on_the_scored_fold(method, plain_cfg):
    _, _, cv, _ = run_method(method, _swapped_models(), plain_cfg)
    assert cv["nested_folds"] == [0.0, 0.0]  # leaking the fold's labels would give 1.0
    assert cv["nested_cv"] == 0.0


@pytest.mark.parametrize("method", ["weighted", "hill_climb", "stacking"])
def test_nested_fits_see_exactly_the_other_folds(method, plain_cfg, monkeypatch):
    inputs = _swapped_models()
    inputs = Inputs(**{**inputs.__dict__, "folds": np.arange(16) % 4})
    calls = []
    real = ensemble.fit_rows

    def spy(method_, inputs_, rows, cfg_):
        calls.append(np.sort(rows))
        return real(method_, inputs_, rows, cfg_)

    monkeypatch.setattr(ensemble, "fit_rows", spy)
    run_method(method, inputs, plain_cfg)
    all_rows = np.arange(16)
    assert any(np.array_equal(c, all_rows) for c in calls)  # the final fit, for test predictions
    nested = [c for c in calls if not np.array_equal(c, all_rows)]
    assert len(nested) == 4
    for k in range(4):
        assert any(np.array_equal(c, np.flatnonzero(inputs.folds != k)) for c in nested)
    for c in nested:  # each nested fit misses exactly one whole fold
        assert len(set(range(4)) - set(inputs.folds[c])) == 1


def test_unlearned_methods_report_cv_mean_as_nested(plain_cfg):
    inputs = _swapped_models()
    for method in ("mean", "rank"):
        _, _, cv, _ = run_method(method, inputs, plain_cfg)
        assert cv["nested_cv"] == pytest.approx(cv["cv_mean"])
        assert cv["oof_in_sample"] is False


def test_stacking_oof_is_cross_fitted(plain_cfg):
    oof, _, cv, _ = run_method("stacking", _swapped_models(), plain_cfg)
    assert cv["oof"] == 0.0 and cv["oof_in_sample"] is False  # no meta-model saw its own fold


# ---------------------------------------------------------------------------- the stage


def test_run_ensemble_writes_every_method_and_submission(tmp_path, capsys):
    cfg = write_experiment(tmp_path, submission={"format": "labels"})
    paths = Paths(cfg)
    out = run_ensemble(cfg)
    assert out == paths.ensemble_dir
    ids = pd.read_csv(paths.folds_csv)["image_id"]
    sample = pd.read_csv(paths.sample_submission)
    for method in ENSEMBLE_METHODS:
        d = paths.ensemble_method_dir(method)
        oof = pd.read_csv(d / "oof.csv")
        assert list(oof.columns) == ["image_id", "fold"] + [f"pred_{c}" for c in CLASSES]
        assert oof["image_id"].tolist() == ids.tolist()
        test = pd.read_csv(d / "test.csv")
        assert test["image_id"].tolist() == sample["image_id"].tolist()
        cv = json.loads((d / "cv.json").read_text())
        assert {"metric", "greater_is_better", "folds", "oof", "nested_cv"} <= set(cv)
        assert cv["metric"] == "accuracy" and len(cv["folds"]) == N_FOLDS
        assert cv["oof"] > 0.6 and cv["nested_cv"] > 0.6  # chance is 1/3
        sub = pd.read_csv(paths.submission(method), dtype=str)
        assert list(sub.columns) == list(sample.columns) and set(sub["label"]) <= set(CLASSES)
    weighted = json.loads((paths.ensemble_method_dir("weighted") / "cv.json").read_text())
    assert sum(weighted["weights"].values()) == pytest.approx(1.0)
    assert "surrogate" in weighted["objective_note"]
    climb = json.loads((paths.ensemble_method_dir("hill_climb") / "cv.json").read_text())
    best_single = max(json.loads(paths.cv_json(b.name).read_text())["oof"] for b in cfg.backbones)
    assert climb["oof"] >= best_single and climb["selection"]
    for b in cfg.backbones:
        assert paths.submission(b.slug).exists()

    capsys.readouterr()
    run_ensemble(cfg)
    assert "up to date" in capsys.readouterr().out
    before = paths.submission("mean").stat().st_mtime_ns
    run_ensemble(cfg, force=True)
    assert paths.submission("mean").stat().st_mtime_ns >= before
    assert "up to date" not in capsys.readouterr().out


def test_multilabel_thresholds_are_tuned_and_stored(tmp_path):
    cfg = write_experiment(tmp_path, task="multilabel", metric="f1_macro", methods=["mean", "stacking"])
    run_ensemble(cfg)
    paths = Paths(cfg)
    for method in ("mean", "stacking"):
        cv = json.loads((paths.ensemble_method_dir(method) / "cv.json").read_text())
        assert set(cv["thresholds"]) == set(LABELS)
        sub = pd.read_csv(paths.submission(method), dtype=str, keep_default_na=False)
        assert all(t in LABELS for cell in sub["labels"] for t in cell.split())
    backbones = json.loads((paths.ensemble_dir / "backbones.json").read_text())
    assert set(backbones["alpha"]["thresholds"]) == set(LABELS)


def test_binary_probability_metric_writes_probabilities(tmp_path):
    cfg = write_experiment(tmp_path, task="binary", metric="roc_auc", methods=["rank", "weighted"],
                           submission={"per_backbone": False})
    run_ensemble(cfg)
    sub = pd.read_csv(Paths(cfg).submission("rank"))
    assert sub["label"].between(0, 1).all() and sub["label"].nunique() > 2
    assert not Paths(cfg).submission("alpha").exists()


def test_missing_backbones_are_skipped_and_none_is_an_error(tmp_path, capsys):
    cfg = write_experiment(tmp_path, methods=["mean"])
    paths = Paths(cfg)
    paths.oof_csv("gamma").unlink()
    run_ensemble(cfg)
    assert "skipping gamma" in capsys.readouterr().out
    assert json.loads((paths.ensemble_method_dir("mean") / "cv.json").read_text())["models"] == ["alpha", "beta"]
    for name in ("alpha", "beta"):
        paths.test_csv(name).unlink()
    with pytest.raises(PipelineError, match="make train-folds"):
        run_ensemble(cfg)


def test_oof_from_other_folds_is_refused(tmp_path):
    cfg = write_experiment(tmp_path, methods=["weighted"])
    path = Paths(cfg).oof_csv("beta")
    frame = pd.read_csv(path)
    frame["fold"] = (frame["fold"] + 1) % N_FOLDS
    frame.to_csv(path, index=False)
    with pytest.raises(PipelineError, match="other folds"):
        run_ensemble(cfg)
