"""Linear probe on cached features: the "LP" of LP-FT (Kumar et al., ICLR 2022).

Fits the head to convergence with scikit-learn (L-BFGS logistic regression, or ridge for
regression) on the frozen backbone's pooled features, choosing the regularisation strength on
the fold's validation rows, and returns weights for the head's ``nn.Linear``. Fine-tuning then
starts from a converged head, which distorts the pretrained features less than unfreezing after
a briefly trained head.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.multiclass import OneVsRestClassifier

from pipeline.tasks import TaskSpec

C_GRID = (0.01, 0.1, 1.0, 10.0)


def _fit(spec: TaskSpec, x: np.ndarray, y: np.ndarray, strength: float):
    if spec.task == "regression":
        return Ridge(alpha=1.0 / strength).fit(x, y)
    model = LogisticRegression(C=strength, max_iter=500)
    if spec.task == "multilabel":
        model = OneVsRestClassifier(model)
    return model.fit(x, y.astype(int))


def _weights(spec: TaskSpec, model) -> tuple[np.ndarray, np.ndarray]:
    if spec.task == "multilabel":
        coef = np.vstack([e.coef_ for e in model.estimators_])
        bias = np.concatenate([e.intercept_ for e in model.estimators_])
        return coef, bias
    coef, bias = np.atleast_2d(model.coef_), np.atleast_1d(model.intercept_)
    return coef, bias


def fit_linear_probe(spec: TaskSpec, metric, train_x: torch.Tensor, train_y: np.ndarray,
                     valid_x: torch.Tensor, valid_y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """Head weight, bias, the chosen strength (C) and its validation score."""
    xt, xv = train_x.double().cpu().numpy(), valid_x.double().cpu().numpy()
    best = None
    for strength in C_GRID:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model = _fit(spec, xt, train_y, strength)
        coef, bias = _weights(spec, model)
        value = metric(valid_y, spec.activate(xv @ coef.T + bias), spec.task)
        if best is None or metric.better(value, best[3]):
            best = (coef, bias, strength, value)
    coef, bias, strength, value = best
    return torch.tensor(coef, dtype=torch.float32), torch.tensor(bias, dtype=torch.float32), strength, value
