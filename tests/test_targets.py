"""Targets done right: the positive class of a binary task, the binary and multilabel ``f1``, and
regression trained on standardised targets with predictions in the original units.

CPU, timm's tiny ``test_efficientnet`` with ``weights: none``, 32 px digits written by the tests.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import ID_COLUMN, write_dataset

from pipeline.config.paths import Paths
from pipeline.core.errors import PipelineError
from pipeline.data.tables import read_train_table, task_spec
from pipeline.domain.metrics import get_metric
from pipeline.domain.tasks import TaskSpec
from pipeline.ensembles.submission import format_submission
from pipeline.stages.folds import run_folds
from pipeline.stages.submit import run_score
from pipeline.stages.train import run_train

FAST = ["train.num_workers=0", "augment.train=[]"]


# ---------------------------------------------------------------------------- binary: the positive class


def test_positive_class_is_what_pred_and_the_encoded_target_mean():
    table = pd.DataFrame({"label": ["real", "fake", "fake", "real"]})
    default = TaskSpec.from_table(table, "binary", ["label"])
    assert default.classes == ("fake", "real") and default.positive_class == "real"  # second in sorted order
    spec = TaskSpec.from_table(table, "binary", ["label"], positive_class="fake")
    assert spec.classes == ("real", "fake") and spec.positive_class == "fake"
    y = spec.encode(table)
    assert y.tolist() == [0.0, 1.0, 1.0, 0.0]
    p_fake = np.array([0.1, 0.8, 0.9, 0.3])  # a detector that is right about every image
    auc = get_metric("roc_auc", "binary")
    assert auc(y, p_fake, "binary") == 1.0
    assert auc(default.encode(table), p_fake, "binary") == 0.0  # the inverted AUC this key prevents
    fixed = TaskSpec.from_table(table, "binary", ["label"], classes=["real", "fake"], positive_class="real")
    assert fixed.classes == ("fake", "real")


def test_unknown_positive_class_is_a_one_line_error_listing_both_classes(make_config, tmp_path):
    table = pd.DataFrame({"label": ["real", "fake"]})
    with pytest.raises(PipelineError) as err:
        TaskSpec.from_table(table, "binary", ["label"], positive_class="Fake")
    message = str(err.value)
    assert "\n" not in message and "data.positive_class" in message
    assert "'Fake'" in message and "'fake' and 'real'" in message
    with pytest.raises(PipelineError, match="data.positive_class.*applies to binary tasks"):
        make_config("data.positive_class=3")  # the digits are multiclass


def _real_fake_data(root):
    """The binary digits with odd digits labelled 'fake' and even ones 'real' (fake sorts first)."""
    data = write_dataset(root, "binary", n_train=30, n_test=6)
    train = pd.read_csv(root / "train.csv", dtype=str)
    train["label"] = train["label"].map({"odd": "fake", "even": "real"})
    train.to_csv(root / "train.csv", index=False)
    return data, train


def test_positive_class_through_folds_and_submissions(make_config, tmp_path, capsys):
    data, train = _real_fake_data(tmp_path / "data")
    cfg = make_config("data.positive_class=fake", "metric=roc_auc", "submission.format=probabilities", data=data)
    run_folds(cfg)
    assert "pred = P(label is 'fake'), the positive class (data.positive_class; 'real' is negative)" in \
        capsys.readouterr().out
    spec = task_spec(cfg, read_train_table(cfg, check_readable=False))
    assert spec.classes == ("real", "fake")

    ids, p_fake = ["test_0000", "test_0001"], np.array([0.9, 0.2])
    assert format_submission(cfg, spec, ids, p_fake)["label"].tolist() == [0.9, 0.2]
    labels = make_config("data.positive_class=fake", "submission.format=labels", data=data)
    assert format_submission(labels, spec, ids, p_fake)["label"].tolist() == ["fake", "real"]
    per_class = pd.DataFrame({ID_COLUMN: ids, "real": 0.5, "fake": 0.5})
    frame = format_submission(cfg, spec, ids, p_fake, sample=per_class)
    np.testing.assert_allclose(frame["fake"], [0.9, 0.2])
    np.testing.assert_allclose(frame["real"], [0.1, 0.8])

    # scored locally against labels: P(fake) that is right about every image has AUC 1, not 0
    test_ids = [f"test_{i:04d}" for i in range(6)]
    truth = ["fake", "real", "fake", "real", "fake", "real"]
    pd.DataFrame({ID_COLUMN: test_ids, "label": truth}).to_csv(tmp_path / "solution.csv", index=False)
    p = np.array([0.9 if t == "fake" else 0.2 for t in truth])
    format_submission(cfg, spec, test_ids, p).to_csv(tmp_path / "sub.csv", index=False)
    assert run_score(cfg, tmp_path / "sub.csv", tmp_path / "solution.csv") == 1.0


# ---------------------------------------------------------------------------- f1


def test_binary_f1_scores_the_positive_class_and_multilabel_f1_averages_rows():
    f1, f1_macro = get_metric("f1", "binary"), get_metric("f1_macro", "binary")
    y = np.array([1, 1, 0, 0, 0, 0], float)
    p = np.array([0.9, 0.1, 0.1, 0.1, 0.1, 0.1])
    assert f1(y, p, "binary") == pytest.approx(2 / 3)  # positive class: precision 1, recall 1/2
    assert f1_macro(y, p, "binary") == pytest.approx((2 / 3 + 8 / 9) / 2)  # both classes' F1, averaged
    assert f1(1 - y, 1 - p, "binary") == pytest.approx(8 / 9)  # the other class as the positive one
    assert get_metric("f1").greater_is_better and not get_metric("f1").needs_probabilities

    y_ml = np.array([[1, 0], [0, 0], [1, 1]], float)
    p_ml = np.array([[0.9, 0.1], [0.1, 0.1], [0.9, 0.1]])
    # per row: 1 (exact), 1 (no label, none predicted), 2/3 (one of two labels found)
    assert get_metric("f1", "multilabel")(y_ml, p_ml, "multilabel") == pytest.approx((1 + 1 + 2 / 3) / 3)
    with pytest.raises(PipelineError, match="does not apply to task 'multiclass'.*f1_macro"):
        get_metric("f1", "multiclass")


# ---------------------------------------------------------------------------- regression units


def test_task_spec_standardises_regression_targets_per_fold():
    spec = TaskSpec("regression", ("target",))
    y_train = np.array([950.0, 1000.0, 1050.0])
    fitted = spec.fit_targets(y_train)
    assert fitted.target_mean == pytest.approx(1000.0) and fitted.target_std == pytest.approx(np.std(y_train))
    assert spec.target_mean == 0.0  # the shared spec is not changed
    np.testing.assert_allclose(fitted.activate(np.zeros((2, 1))), [1000.0, 1000.0])  # a zero head: the mean
    np.testing.assert_allclose(fitted.activate(np.array([[1.0]])), [1000.0 + np.std(y_train)])
    seen = []
    loss = fitted.scaled_loss(lambda logits, y: seen.append(y) or 0.0)
    loss(None, np.array([1000.0, 1000.0 + np.std(y_train)]))
    np.testing.assert_allclose(seen[0], [0.0, 1.0])
    assert fitted.fit_targets(np.array([5.0, 5.0])).target_std == 1.0  # a constant target: no division by 0
    binary = TaskSpec("binary", ("label",), ("a", "b"))
    assert binary.fit_targets(np.array([0.0, 1.0])) is binary and binary.scaled_loss(len) is len


def test_regression_far_from_zero_trains_and_predicts_in_original_units(make_config, tmp_path, one_torch_thread):
    """Targets of 1000 +- 50: a zero-initialised head fitted to raw targets would predict near 0
    after an epoch at fine-tuning LRs; standardised per fold, it starts at the mean."""
    root = tmp_path / "data"
    data = write_dataset(root, "regression", n_train=45, n_test=6)
    train = pd.read_csv(root / "train.csv", dtype={ID_COLUMN: str})
    z = (train["target"] - train["target"].mean()) / train["target"].std()
    train["target"] = (1000 + 50 * z).round(3)
    train.to_csv(root / "train.csv", index=False)
    cfg = make_config(*FAST, "metric=rmse", "train.unfrozen.epochs=1", data=data)
    run_folds(cfg)
    run_train(cfg)

    paths = Paths(cfg)
    oof = pd.read_csv(paths.oof_csv("test_efficientnet"), dtype={ID_COLUMN: str}).merge(train, on=ID_COLUMN)
    assert len(oof) == 45
    assert abs(oof["pred"].mean() - 1000) < 25 and oof["pred"].between(800, 1200).all()
    rmse = float(np.sqrt(np.mean((oof["pred"] - oof["target"]) ** 2)))
    assert rmse < 100  # about the target's std; raw targets would give about 1000
    test = pd.read_csv(paths.test_csv("test_efficientnet"))
    assert len(test) == 6 and test["pred"].between(800, 1200).all()
    history = pd.read_csv(paths.fold_dir("test_efficientnet", 0) / "history.csv")
    assert (history["valid_rmse"] < 100).all()  # the metric is scored in original units every epoch
