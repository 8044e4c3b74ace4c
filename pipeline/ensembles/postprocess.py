"""Post-processing fitted on OOF rows: decision thresholds, per-class bias, QWK cut-points.

Which kind applies follows from the task and the metric (:func:`choose_kind`):

* ``threshold``: binary and multilabel tasks scored on decisions (``f1``, ``f1_macro``,
  ``accuracy``): one probability threshold per column;
* ``class_bias``: multiclass tasks scored on decisions (``accuracy``, ``f1_macro``, ``qwk``): a bias
  per class added to the log-probabilities before the argmax (corrects a prior that the training
  rows' class balance skewed);
* ``cutpoints``: regression scored by ``qwk``: the values where one integer class ends and the next
  begins (instead of rounding at ``k + 0.5``).

Each is a monotone map of the prediction columns, so the metric's own decision rule (``p >= 0.5``,
argmax, rounding) and the submission writer make the fitted decisions, and the columns stay what
the file contracts say (probabilities, values). Parameters are plain JSON (saved in the ensemble's
``params.json`` and applied by ``predict`` and bundles). Fitting is coordinate ascent on the metric
itself over a grid; the ensemble stage scores it by nested CV: for each fold, fitted on the other
folds' OOF rows only.

Example
-------
>>> p = np.array([[0.3], [0.45], [0.7]])
>>> apply({"kind": "threshold", "thresholds": [0.4]}, p)[:, 0].round(3).tolist()
[0.375, 0.542, 0.75]
"""
from __future__ import annotations

import numpy as np

from pipeline.domain.metrics import Metric

EPS = 1e-7
DECISION_METRICS = ("accuracy", "f1", "f1_macro")


def choose_kind(task: str, metric: str) -> str | None:
    """The post-processing that can change ``metric`` on ``task``, or None (threshold-free metrics)."""
    if task in ("binary", "multilabel") and metric in DECISION_METRICS:
        return "threshold"
    if task == "multiclass" and metric in (*DECISION_METRICS, "qwk"):
        return "class_bias"
    if task == "regression" and metric == "qwk":
        return "cutpoints"
    return None


def apply(params: dict, pred: np.ndarray) -> np.ndarray:
    """``pred`` ``(rows, columns)`` post-processed by fitted ``params``."""
    kind = params["kind"]
    if kind == "threshold":
        t = np.clip(np.asarray(params["thresholds"], dtype=np.float64), EPS, 1 - EPS)
        return np.where(pred < t, 0.5 * pred / t, 0.5 + 0.5 * (pred - t) / (1 - t))
    if kind == "class_bias":
        z = np.log(np.clip(pred, EPS, 1.0)) + np.asarray(params["bias"])
        z = np.exp(z - z.max(axis=1, keepdims=True))
        return z / z.sum(axis=1, keepdims=True)
    if kind == "cutpoints":
        return (params["lowest"] + np.searchsorted(np.asarray(params["cutpoints"]), pred[:, 0], side="right"))[:, None]
    raise ValueError(f"unknown post-processing kind '{kind}'")


def _score(metric: Metric, task: str, y: np.ndarray, pred: np.ndarray) -> float:
    pred = pred[:, 0] if task in ("binary", "regression") else pred
    try:
        value = metric(y, pred, task)
    except ValueError:
        return -np.inf
    return value if metric.greater_is_better else -value


def _ascend(values: list[float], grids, evaluate, passes: int = 2) -> list[float]:
    """Coordinate ascent: each value in turn set to the best point of its grid (strict gains only)."""
    best = evaluate(values)
    for _ in range(passes):
        improved = False
        for i in range(len(values)):
            for candidate in grids(i, values):
                trial = values[:i] + [float(candidate)] + values[i + 1:]
                score = evaluate(trial)
                if score > best + 1e-12:
                    best, values, improved = score, trial, True
        if not improved:
            break
    return values


def fit(kind: str, y: np.ndarray, pred: np.ndarray, metric: Metric, task: str) -> dict:
    """Parameters of ``kind`` that maximise ``metric`` on these rows (starting from no change)."""
    if kind == "threshold":
        def grid(j, _):
            return np.unique(np.quantile(pred[:, j], np.linspace(0.02, 0.98, 49)))

        start = [0.5] * pred.shape[1]
        found = _ascend(start, grid, lambda t: _score(metric, task, y, apply({"kind": kind, "thresholds": t}, pred)))
        return {"kind": kind, "thresholds": found}
    if kind == "class_bias":
        steps = np.linspace(-2.0, 2.0, 21)
        start = [0.0] * pred.shape[1]
        found = _ascend(start, lambda j, b: steps,
                        lambda b: _score(metric, task, y, apply({"kind": kind, "bias": b}, pred)),
                        passes=2 if pred.shape[1] <= 50 else 1)
        return {"kind": kind, "bias": found}
    if kind == "cutpoints":
        lowest, highest = int(np.rint(y.min())), int(np.rint(y.max()))
        start = [k + 0.5 for k in range(lowest, highest)]

        def grid(i, c):
            low = c[i - 1] if i > 0 else c[i] - 1.0
            high = c[i + 1] if i + 1 < len(c) else c[i] + 1.0
            return np.linspace(low, high, 22)[1:-1]

        params = lambda c: {"kind": kind, "lowest": lowest, "cutpoints": sorted(c)}  # noqa: E731
        found = _ascend(start, grid, lambda c: _score(metric, task, y, apply(params(c), pred)))
        return params(found)
    raise ValueError(f"unknown post-processing kind '{kind}'")
