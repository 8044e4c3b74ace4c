"""Folds stage: assign every train row to exactly one of k folds.

Strategies (``folds.strategy``): ``kfold``, ``stratified`` (class labels; binned target for
regression; iterative stratification for multilabel), ``group``, ``stratified_group``,
``multilabel_stratified`` and ``stratified_regression``. All are seeded and deterministic;
the splitters are scikit-learn's (and iterative-stratification's for multilabel).
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

from pipeline.config.schema import Config
from pipeline.core.errors import PipelineError, first_few
from pipeline.domain.tasks import TaskSpec


def _regression_bins(y: np.ndarray, n_bins: int) -> np.ndarray:
    edges = np.unique(np.quantile(y, np.linspace(0, 1, n_bins + 1)[1:-1]))
    return np.digitize(y, edges)


def _check_class_counts(labels: np.ndarray, n_splits: int, names) -> None:
    values, counts = np.unique(labels, return_counts=True)
    small = [(names(v), c) for v, c in zip(values, counts) if c < n_splits]
    if small:
        shown = first_few(f"{v} ({c} rows)" for v, c in small)
        raise PipelineError(f"stratified folds need at least folds.n_splits={n_splits} rows per class; "
                            f"too few for: {shown}. Lower folds.n_splits, merge rare classes, "
                            f"or use folds.strategy: kfold")


def _group_kfold(n_splits: int, seed: int) -> GroupKFold:
    """Seeded group folds: ``GroupKFold(shuffle=...)`` is scikit-learn 1.6's. Older versions
    would assign groups by size alone, ignoring folds.seed: refuse rather than do that."""
    try:
        return GroupKFold(n_splits, shuffle=True, random_state=seed)
    except TypeError:
        import sklearn
        raise PipelineError(f"folds.strategy group needs scikit-learn >= 1.6 (GroupKFold(shuffle=...)); installed "
                            f"{sklearn.__version__}: pip install 'scikit-learn>=1.6'") from None


def describe_targets(spec: TaskSpec) -> str:
    """What the prediction columns mean, for a binary task (whose positive class is a choice)."""
    if spec.task != "binary":
        return ""
    return (f"; binary task: pred = P({spec.target_columns[0]} is '{spec.positive_class}'), the positive class "
            f"(data.positive_class; '{spec.classes[0]}' is negative)")


def assign_folds(table: pd.DataFrame, spec: TaskSpec, cfg: Config) -> np.ndarray:
    """Fold index per row of ``table`` (indices only; the table is not modified)."""
    f, n = cfg.folds, len(table)
    if n < f.n_splits:
        raise PipelineError(f"{n} train rows cannot fill folds.n_splits={f.n_splits} folds")
    strategy = f.strategy
    if strategy == "stratified" and spec.task == "multilabel":
        strategy = "multilabel_stratified"
    if strategy == "stratified" and spec.task == "regression":
        strategy = "stratified_regression"
    if strategy in ("group", "stratified_group") and not cfg.data.group_column:
        raise PipelineError(f"folds.strategy '{strategy}' needs data.group_column (a column of the train table)")
    if strategy == "multilabel_stratified" and spec.task != "multilabel":
        raise PipelineError(f"folds.strategy multilabel_stratified needs data.task: multilabel, got {spec.task}")

    X = np.zeros((n, 1))
    groups = table[cfg.data.group_column].to_numpy() if cfg.data.group_column else None
    if strategy in ("group", "stratified_group") and len(np.unique(groups)) < f.n_splits:
        raise PipelineError(f"group column '{cfg.data.group_column}' has {len(np.unique(groups))} distinct groups, "
                            f"fewer than folds.n_splits={f.n_splits}; lower folds.n_splits or use another strategy")
    if strategy == "stratified_regression" and spec.task != "regression":
        raise PipelineError(f"folds.strategy stratified_regression needs data.task: regression, got {spec.task}; "
                            f"use stratified")
    if strategy == "kfold":
        splits = KFold(f.n_splits, shuffle=True, random_state=f.seed).split(X)
    elif strategy == "group":
        splits = _group_kfold(f.n_splits, f.seed).split(X, groups=groups)
    elif strategy == "multilabel_stratified":
        from iterstrat.ml_stratifiers import MultilabelStratifiedKFold
        splits = MultilabelStratifiedKFold(f.n_splits, shuffle=True, random_state=f.seed).split(X, spec.encode(table))
    else:
        if spec.task == "regression":
            y = _regression_bins(spec.encode(table), f.n_bins)
            names = lambda v: f"target bin {v}"  # noqa: E731
        elif spec.task == "multilabel":
            raise PipelineError(f"folds.strategy '{strategy}' does not apply to multilabel; "
                                f"use multilabel_stratified")
        else:
            y = spec.strata(table)
            names = lambda v: f"class '{spec.classes[v]}'"  # noqa: E731
        _check_class_counts(y, f.n_splits, names)
        if strategy == "stratified_group":
            splits = StratifiedGroupKFold(f.n_splits, shuffle=True, random_state=f.seed).split(X, y, groups)
        else:
            splits = StratifiedKFold(f.n_splits, shuffle=True, random_state=f.seed).split(X, y)

    fold = np.full(n, -1, dtype=int)
    for k, (_, valid_idx) in enumerate(splits):
        fold[valid_idx] = k
    if (fold < 0).any():  # e.g. fewer groups than folds
        raise PipelineError(f"folds.strategy '{strategy}' left {int((fold < 0).sum())} rows without a fold; "
                            f"there may be fewer groups than folds.n_splits={f.n_splits}")
    if len(np.unique(fold)) != f.n_splits:
        raise PipelineError(f"folds.strategy '{strategy}' produced empty folds; "
                            f"check the number of groups against folds.n_splits={f.n_splits}")
    return fold
