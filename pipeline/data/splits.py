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


def fold_groups(table: pd.DataFrame, cfg: Config) -> np.ndarray | None:
    """The group of each row that no fold may split: ``data.group_column``'s value, and with
    ``folds.group_near_duplicates`` those groups joined (transitively) with the train images' near-
    duplicate groups (perceptual hashes within ``NEAR_DISTANCE`` bits: the data report's); None
    without either."""
    column = table[cfg.data.group_column].astype(str).to_numpy() if cfg.data.group_column else None
    if not cfg.folds.group_near_duplicates:
        return column
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from pipeline.data.images import PATH
    from pipeline.data.scan import near_groups, scan_images

    n = len(table)
    near = near_groups(scan_images(list(map(str, table[PATH])))["phash"]).to_numpy()
    near = np.where(near >= 0, near, -1 - np.arange(n))  # an image without a hash is its own group
    own = np.unique(column if column is not None else np.arange(n), return_inverse=True)[1]
    _, near_ids = np.unique(near, return_inverse=True)
    # rows are linked to their own group and to their near-duplicate group: the joined groups are the components
    rows, labels = np.tile(np.arange(n), 2), np.concatenate([n + own, n + own.max() + 1 + near_ids])
    size = n + own.max() + 1 + near_ids.max() + 1
    graph = coo_matrix((np.ones(2 * n), (rows, labels)), shape=(size, size))
    return connected_components(graph, directed=False)[1][:n]


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
    if f.group_near_duplicates and strategy not in ("group", "stratified_group"):
        # the near-duplicate groups are groups: class-stratified folds become stratified_group, the others
        # (kfold, quantile bins of a regression target, multilabel stratification) group
        strategy = "stratified_group" if strategy == "stratified" else "group"
    if strategy in ("group", "stratified_group") and not (cfg.data.group_column or f.group_near_duplicates):
        raise PipelineError(f"folds.strategy '{strategy}' needs data.group_column (a column of the train table)")
    if strategy == "multilabel_stratified" and spec.task != "multilabel":
        raise PipelineError(f"folds.strategy multilabel_stratified needs data.task: multilabel, got {spec.task}")

    X = np.zeros((n, 1))
    groups = fold_groups(table, cfg)
    if strategy in ("group", "stratified_group") and len(np.unique(groups)) < f.n_splits:
        what = " joined with ".join(([f"group column '{cfg.data.group_column}'"] if cfg.data.group_column else [])
                                    + (["the near-duplicate groups"] if f.group_near_duplicates else []))
        raise PipelineError(f"{what} has {len(np.unique(groups))} distinct groups, fewer than "
                            f"folds.n_splits={f.n_splits}; lower folds.n_splits or use another strategy")
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
