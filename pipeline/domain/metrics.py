"""Competition metrics, each with its direction, computed from targets and predictions.

``y_true`` is the encoded target (:mod:`pipeline.domain.tasks`): class indices for multiclass,
0/1 for binary, a 0/1 matrix for multilabel, floats for regression. ``y_pred`` is what the
prediction columns hold: probabilities (after the activation) or regression values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from sklearn import metrics as skm

from pipeline.core.errors import PipelineError


@dataclass(frozen=True)
class Metric:
    name: str
    greater_is_better: bool
    fn: Callable[[np.ndarray, np.ndarray, str], float]
    tasks: tuple[str, ...]
    needs_probabilities: bool = False  # ranks/probabilities rather than hard labels

    def __call__(self, y_true: np.ndarray, y_pred: np.ndarray, task: str) -> float:
        return float(self.fn(np.asarray(y_true), np.asarray(y_pred, dtype=np.float64), task))

    def better(self, a: float, b: float) -> bool:
        """True when score ``a`` is strictly better than ``b``."""
        if b is None or np.isnan(b):
            return not np.isnan(a)
        return a > b if self.greater_is_better else a < b

    @property
    def worst(self) -> float:
        return -np.inf if self.greater_is_better else np.inf


def hard_labels(y_pred: np.ndarray, task: str, threshold: float = 0.5) -> np.ndarray:
    """Class decisions from probabilities."""
    if task == "multiclass":
        return y_pred.argmax(axis=1)
    return (y_pred >= threshold).astype(int)


def _accuracy(y, p, task):
    """Share of rows predicted exactly (for multilabel: every label of the row right)."""
    return skm.accuracy_score(y, hard_labels(p, task))


def _log_loss(y, p, task):
    eps = 1e-15
    if task == "multiclass":
        return skm.log_loss(y, np.clip(p, eps, 1 - eps), labels=np.arange(p.shape[1]))
    p = np.clip(p, eps, 1 - eps)
    return float(np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p))))


def _roc_auc(y, p, task):
    if task == "multiclass":
        return skm.roc_auc_score(y, p, multi_class="ovr", average="macro", labels=np.arange(p.shape[1]))
    return skm.roc_auc_score(y, p, average="macro")


def _f1(y, p, task):
    """Binary: F1 of the positive class (``data.positive_class``) at p >= 0.5. Multilabel: the
    mean over rows of each row's F1 (``average="samples"``, Kaggle's "Mean F1"); a row with no
    true and no predicted label scores 1. For per-class averages use ``f1_macro``."""
    if task == "multilabel":
        return skm.f1_score(y, hard_labels(p, task), average="samples", zero_division=1)
    return skm.f1_score(y, hard_labels(p, task), average="binary", pos_label=1, zero_division=0)


def _f1_macro(y, p, task):
    return skm.f1_score(y, hard_labels(p, task), average="macro", zero_division=0)


def _qwk(y, p, task):
    if task == "regression":
        y_int, p_int = np.rint(y).astype(int), np.rint(p).astype(int)
    else:
        y_int, p_int = y, hard_labels(p, task)
    return skm.cohen_kappa_score(y_int, p_int, weights="quadratic")


def _rmse(y, p, task):
    return float(np.sqrt(skm.mean_squared_error(y, p)))


def _mae(y, p, task):
    return skm.mean_absolute_error(y, p)


def _r2(y, p, task):
    return skm.r2_score(y, p)


CLASSIFICATION = ("binary", "multiclass", "multilabel")
METRICS: dict[str, Metric] = {
    m.name: m
    for m in [
        Metric("accuracy", True, _accuracy, CLASSIFICATION),
        Metric("log_loss", False, _log_loss, CLASSIFICATION, needs_probabilities=True),
        Metric("roc_auc", True, _roc_auc, CLASSIFICATION, needs_probabilities=True),
        Metric("f1", True, _f1, ("binary", "multilabel")),
        Metric("f1_macro", True, _f1_macro, CLASSIFICATION),
        Metric("qwk", True, _qwk, ("multiclass", "regression")),
        Metric("rmse", False, _rmse, ("regression",)),
        Metric("mae", False, _mae, ("regression",)),
        Metric("r2", True, _r2, ("regression",)),
    ]
}


def get_metric(name: str, task: str | None = None) -> Metric:
    if name not in METRICS:
        raise PipelineError(f"unknown metric '{name}'; valid: {', '.join(sorted(METRICS))}")
    metric = METRICS[name]
    if task is not None and task not in metric.tasks:
        valid = [n for n, m in METRICS.items() if task in m.tasks]
        raise PipelineError(f"metric '{name}' does not apply to task '{task}'; valid for {task}: {', '.join(valid)}")
    return metric
