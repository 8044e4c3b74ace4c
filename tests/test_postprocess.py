"""OOF post-processing (thresholds, class bias, QWK cut-points): each kind helps where it should,
is monotone, and is scored by nested CV that never fits on the scored fold."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.config.schema import config_from_dict
from pipeline.domain.metrics import get_metric
from pipeline.domain.tasks import TaskSpec
from pipeline.ensembles import blend as ensemble
from pipeline.ensembles import postprocess
from pipeline.ensembles.blend import Inputs, run_method


def _inputs(P, y, folds, task, metric, classes=()):
    spec = TaskSpec(task, ("label",), classes)
    return Inputs(spec=spec, metric=get_metric(metric, task), names=[f"m{i}" for i in range(len(P))],
                  ids=np.array([f"r{i}" for i in range(len(y))]), folds=folds, y=y, oof=P,
                  test_ids=np.array(["t0", "t1", "t2"]), test=P[:, :3])


def _skewed_binary(rng, n=300):
    """Positives are rare and under-confident: the best F1 threshold is far below 0.5."""
    y = (rng.random(n) < 0.15).astype(float)
    p = np.clip(0.12 + 0.2 * y + rng.normal(0, 0.06, n), 0.001, 0.999)
    return p[:, None], y


@pytest.mark.parametrize("kind, task", [("threshold", "binary"), ("class_bias", "multiclass"),
                                        ("cutpoints", "regression")])
def test_each_kind_is_chosen_for_decision_metrics_only(kind, task):
    metric = {"binary": "f1", "multiclass": "accuracy", "regression": "qwk"}[task]
    assert postprocess.choose_kind(task, metric) == kind
    assert postprocess.choose_kind(task, "log_loss" if task != "regression" else "rmse") is None


def test_threshold_fit_finds_the_f1_threshold_and_maps_it_to_one_half():
    p, y = _skewed_binary(np.random.default_rng(0))
    metric = get_metric("f1", "binary")
    params = postprocess.fit("threshold", y, p, metric, "binary")
    t = params["thresholds"][0]
    assert t < 0.35
    mapped = postprocess.apply(params, p)
    np.testing.assert_array_equal(mapped[:, 0] >= 0.5, p[:, 0] >= t)  # the decision moves to 0.5
    assert np.all(np.diff(mapped[np.argsort(p[:, 0]), 0]) >= 0)  # monotone
    assert metric(y, mapped[:, 0], "binary") > metric(y, p[:, 0], "binary") + 0.2


def test_class_bias_corrects_a_shifted_prior():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 600)
    logits = 1.5 * np.eye(3)[y] + rng.normal(size=(600, 3))
    logits[:, 0] -= 1.5  # the model learned that class 0 is rare; it is not
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    metric = get_metric("accuracy", "multiclass")
    params = postprocess.fit("class_bias", y, p, metric, "multiclass")
    fixed = postprocess.apply(params, p)
    np.testing.assert_allclose(fixed.sum(axis=1), 1.0)
    assert metric(y, fixed, "multiclass") > metric(y, p, "multiclass") + 0.05


def test_cutpoints_undo_compressed_regression_values():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 5, 500).astype(float)
    v = 1.0 + 0.5 * y + rng.normal(0, 0.15, 500)  # squeezed towards the middle: rounding gets them wrong
    metric = get_metric("qwk", "regression")
    params = postprocess.fit("cutpoints", y, v[:, None], metric, "regression")
    assert params["cutpoints"] == sorted(params["cutpoints"]) and len(params["cutpoints"]) == 4
    fixed = postprocess.apply(params, v[:, None])[:, 0]
    assert metric(y, fixed, "regression") > metric(y, v, "regression") + 0.1


def test_nested_post_processing_never_fits_on_the_scored_fold(monkeypatch):
    """Changing fold k's labels must not change fold k's nested post-processed predictions, and
    every fit sees exactly the other folds' rows."""
    rng = np.random.default_rng(3)
    p, y = _skewed_binary(rng, 240)
    folds = np.arange(240) % 4
    P = np.stack([p, np.clip(p + rng.normal(0, 0.02, p.shape), 0.001, 0.999)])
    cfg = config_from_dict({"name": "pp", "metric": "f1", "data": {"task": "binary"}})
    sizes, real = [], postprocess.fit
    monkeypatch.setattr(postprocess, "fit", lambda kind, yy, *a: sizes.append(len(yy)) or real(kind, yy, *a))
    _, base = ensemble.cross_fit("weighted", _inputs(P, y, folds, "binary", "f1", ("0", "1")), cfg, "threshold")
    assert sizes == [180] * 4
    flipped = y.copy()
    flipped[folds == 2] = 1 - flipped[folds == 2]
    _, other = ensemble.cross_fit("weighted", _inputs(P, flipped, folds, "binary", "f1", ("0", "1")), cfg, "threshold")
    np.testing.assert_array_equal(base[folds == 2], other[folds == 2])
    assert not np.array_equal(base[folds != 2], other[folds != 2])  # the other folds' fits did see it


@pytest.mark.parametrize("method", ["mean", "hill_climb"])  # stacking's fitted model already moves the threshold
def test_applied_post_processing_is_what_is_submitted_and_saved(method):
    rng = np.random.default_rng(4)
    p, y = _skewed_binary(rng, 240)
    P = np.stack([p, np.clip(p + rng.normal(0, 0.03, p.shape), 0.001, 0.999)])
    cfg = config_from_dict({"name": "pp", "metric": "f1", "data": {"task": "binary"}})
    inputs = _inputs(P, y, np.arange(240) % 4, "binary", "f1", ("0", "1"))
    oof, test, cv, params = run_method(method, inputs, cfg)
    post = cv["postprocess"]
    assert post["kind"] == "threshold" and post["applied"]
    assert cv["nested_cv"] == post["nested_cv"] > post["nested_cv_without"]  # the score of what is submitted
    assert cv["oof_in_sample"]
    np.testing.assert_allclose(test, postprocess.apply(params["postprocess"], ensemble.apply_params(params["params"],
                                                                                                    inputs.test)))
    plain = config_from_dict({"name": "pp", "metric": "f1", "data": {"task": "binary"},
                              "ensemble": {"postprocess": "none"}})
    _, _, cv_plain, params_plain = run_method(method, inputs, plain)
    assert cv_plain["postprocess"] is None and params_plain["postprocess"] is None
    assert cv_plain["nested_cv"] == pytest.approx(post["nested_cv_without"])


def test_a_gain_that_could_be_noise_is_not_applied():
    """Class bias on a well-calibrated model: the nested gain, if any, is a row or two; the
    bootstrap's p stays above POSTPROCESS_ALPHA, so the plain blend is what is submitted, while a
    shifted prior (a real gain) is applied."""
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 600)
    folds = np.arange(600) % 5
    cfg = config_from_dict({"name": "pp", "data": {"root": "x", "task": "multiclass", "id_column": "id",
                                                   "target_columns": ["label"]}, "metric": "accuracy",
                            "backbones": [{"name": "test_efficientnet", "weights": "none"}]})
    for shift, applied in ((0.0, False), (1.5, True)):
        logits = 1.5 * np.eye(3)[y] + rng.normal(size=(600, 3))
        logits[:, 0] -= shift
        p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
        *_, cv, params = run_method("mean", _inputs(p[None], y, folds, "multiclass", "accuracy", ("a", "b", "c")), cfg)
        post = cv["postprocess"]
        assert post["applied"] is applied and (params["postprocess"] is not None) is applied
        assert (post["p_value"] < ensemble.POSTPROCESS_ALPHA) is applied
