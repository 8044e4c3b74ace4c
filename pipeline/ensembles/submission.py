"""Submission files: the sample submission's format read off its values, predictions written in it,
and every submission checked against the sample (ids, row count, values)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config.paths import Paths
from pipeline.config.schema import Config
from pipeline.core import artifacts
from pipeline.core.errors import PipelineError, first_few
from pipeline.data.tables import read_csv, read_train_table, require_columns, task_spec
from pipeline.domain.metrics import get_metric, hard_labels
from pipeline.domain.tasks import TaskSpec

KINDS = ("labels", "label_lists", "probabilities", "indicators", "values")


@dataclass(frozen=True)
class SubmissionFormat:
    """The sample submission's layout and what its value columns hold (one of ``KINDS``)."""

    id_column: str
    columns: tuple[str, ...]  # all columns, the sample's order
    value_columns: tuple[str, ...]
    per_class: bool  # one column per class / label
    kind: str


def read_sample(cfg: Config) -> pd.DataFrame:
    """The sample submission (all columns as text), with its id column checked."""
    path = Paths(cfg).sample_submission
    sample = read_csv(path, "sample submission")
    require_columns(sample, [cfg.data.id_column], path, "data.id_column")
    return sample


def submission_format(cfg: Config, spec: TaskSpec, sample: pd.DataFrame) -> SubmissionFormat:
    """Decide the layout and value kind from the sample's columns, the task and ``submission.format``."""
    id_col, fmt = cfg.data.id_column, cfg.submission.format
    value_cols = tuple(c for c in sample.columns if c != id_col)
    per_class = len(value_cols) > 1 and set(value_cols) == set(spec.classes)
    if not per_class and len(value_cols) != 1:
        raise PipelineError(f"sample submission {Paths(cfg).sample_submission} has columns {list(value_cols)} "
                            f"besides '{id_col}'; a {spec.task} task expects one target column or one column per "
                            f"class ({first_few(spec.classes, 20)}); check data.task and data.classes")
    probs = fmt == "probabilities" or (fmt == "auto" and get_metric(cfg.metric).needs_probabilities)
    if spec.task == "regression":
        kind = "values"
    elif per_class:  # multiclass/binary class columns hold probabilities unless format is labels
        auto_probs = fmt == "auto" and spec.task != "multilabel"
        kind = "probabilities" if probs or auto_probs else "indicators"
    elif spec.task == "binary":
        kind = "probabilities" if probs else "labels"
    elif fmt == "probabilities":
        raise PipelineError(f"submission.format is 'probabilities' but the sample submission has one target column "
                            f"'{value_cols[0]}' for a {spec.task} task; set submission.format: labels (or auto)")
    else:
        kind = "labels" if spec.task == "multiclass" else "label_lists"
    return SubmissionFormat(id_col, tuple(sample.columns), value_cols, per_class, kind)


def _class_values(fmt: SubmissionFormat, spec: TaskSpec, P: np.ndarray, thresholds) -> np.ndarray:
    """``(rows, classes)`` values in ``spec.classes`` order for a per-class layout."""
    if spec.task == "binary":
        P = np.column_stack([1 - P[:, 0], P[:, 0]])
    if fmt.kind == "probabilities":
        return P
    if spec.task == "multiclass":
        return np.eye(P.shape[1], dtype=int)[P.argmax(axis=1)]
    if spec.task == "binary":
        return np.eye(2, dtype=int)[hard_labels(P[:, 1], "binary")]
    return (P >= np.asarray(thresholds)).astype(int)


def _single_values(fmt: SubmissionFormat, spec: TaskSpec, P: np.ndarray, thresholds) -> list | np.ndarray:
    if fmt.kind in ("values", "probabilities"):
        return P[:, 0]
    if fmt.kind == "labels":
        index = P.argmax(axis=1) if spec.task == "multiclass" else hard_labels(P[:, 0], "binary")
        return [spec.classes[i] for i in index]
    on = P >= np.asarray(thresholds)
    return [spec.label_separator.join(c for c, keep in zip(spec.classes, row) if keep) for row in on]


def format_submission(cfg: Config, spec: TaskSpec, ids, preds: np.ndarray, thresholds=None,
                      sample: pd.DataFrame | None = None) -> pd.DataFrame:
    """Predictions (what the prediction columns hold) as the sample submission's columns and values.

    Parameters
    ----------
    ids : the rows' ids, in the order to write (the sample's order).
    preds : ``(rows,)`` or ``(rows, columns)`` probabilities or values, ``spec.pred_columns`` order.
    thresholds : multilabel per-label thresholds (``spec.classes`` order); default 0.5 each.
    sample : the sample submission, when already read.
    """
    sample = read_sample(cfg) if sample is None else sample
    fmt = submission_format(cfg, spec, sample)
    ids = [str(i) for i in ids]
    P = np.asarray(preds, dtype=np.float64).reshape(len(ids), -1)
    thresholds = [0.5] * len(spec.classes) if thresholds is None else list(thresholds)
    frame = pd.DataFrame({fmt.id_column: ids})
    if fmt.per_class:
        values = _class_values(fmt, spec, P, thresholds)
        for col in fmt.value_columns:
            frame[col] = values[:, list(spec.classes).index(col)]
    else:
        frame[fmt.value_columns[0]] = _single_values(fmt, spec, P, thresholds)
    return frame[list(fmt.columns)]


def _lines(mask) -> str:
    """CSV line numbers (header is line 1) of the rows where ``mask`` holds."""
    return first_few(np.flatnonzero(np.asarray(mask)) + 2)


def _check_ids(frame: pd.DataFrame, sample: pd.DataFrame, id_col: str, source, sample_path) -> None:
    if len(frame) != len(sample):
        raise PipelineError(f"submission {source} has {len(frame)} rows but the sample submission {sample_path} has "
                            f"{len(sample)}; write exactly one row per sample id")
    ids, expected = frame[id_col].astype(str).to_numpy(), sample[id_col].astype(str).to_numpy()
    unknown = ~np.isin(ids, expected)
    if unknown.any():
        raise PipelineError(f"submission {source}: ids not in the sample submission at lines {_lines(unknown)}: "
                            f"{first_few(ids[unknown])}; use the sample's ids ({sample_path})")
    dup = pd.Series(ids).duplicated().to_numpy()
    if dup.any():
        raise PipelineError(f"submission {source}: duplicate ids at lines {_lines(dup)}: {first_few(ids[dup])}; "
                            f"write each sample id once")
    wrong = ids != expected
    if wrong.any():
        i = int(np.flatnonzero(wrong)[0])
        raise PipelineError(f"submission {source}: ids are out of order from line {i + 2}: '{ids[i]}' where the "
                            f"sample submission has '{expected[i]}'; keep the sample's id order")


def _where(frame: pd.DataFrame, bad: np.ndarray, id_col: str) -> str:
    return f"lines {_lines(bad)} (ids {first_few(frame[id_col].to_numpy()[bad])})"


def _check_numbers(frame: pd.DataFrame, col: str, kind: str, id_col: str, source) -> None:
    values = pd.to_numeric(frame[col], errors="coerce").to_numpy(np.float64)
    finite = np.isfinite(values)
    checks = [(~finite, "NaN, infinite or non-numeric values")]
    if kind == "probabilities":
        checks.append((finite & ((values < 0) | (values > 1)), "probabilities outside [0, 1]"))
    if kind == "indicators":
        checks.append((finite & ~np.isin(values, (0.0, 1.0)), "values other than 0 or 1"))
    for bad, what in checks:
        if bad.any():
            raise PipelineError(f"submission {source}: column '{col}' holds {what} at {_where(frame, bad, id_col)}: "
                                f"{first_few(frame[col].to_numpy()[bad])}; fix the predictions and write it again")


def _check_labels(frame: pd.DataFrame, col: str, spec: TaskSpec, lists: bool, id_col: str, source) -> None:
    known = set(spec.classes)
    cells = frame[col]
    if lists:  # an empty cell means "no labels"
        split = spec.label_separator
        bad = cells.fillna("").astype(str).map(lambda s: any(t not in known for t in s.split(split) if t))
    else:
        bad = cells.isna() | ~cells.astype(str).isin(known)
    bad = bad.to_numpy(bool)
    if bad.any():
        raise PipelineError(f"submission {source}: column '{col}' holds unknown labels at "
                            f"{_where(frame, bad, id_col)}: {first_few(cells.to_numpy()[bad])}; "
                            f"known: {first_few(spec.classes, 20)}")


def validate_submission(cfg: Config, spec: TaskSpec, frame: pd.DataFrame, source,
                        sample: pd.DataFrame | None = None) -> None:
    """Raise a :class:`PipelineError` naming ``source`` and the first bad rows unless ``frame`` has
    exactly the sample submission's columns, ids (same order) and valid values."""
    sample = read_sample(cfg) if sample is None else sample
    sample_path = Paths(cfg).sample_submission
    fmt = submission_format(cfg, spec, sample)
    if list(frame.columns) != list(fmt.columns):
        raise PipelineError(f"submission {source} has columns {list(frame.columns)} but the sample submission "
                            f"{sample_path} has {list(fmt.columns)}; use the sample's columns in its order")
    _check_ids(frame, sample, fmt.id_column, source, sample_path)
    for col in fmt.value_columns:
        if fmt.kind in ("labels", "label_lists"):
            _check_labels(frame, col, spec, fmt.kind == "label_lists", fmt.id_column, source)
        else:
            _check_numbers(frame, col, fmt.kind, fmt.id_column, source)


def write_submission(cfg: Config, spec: TaskSpec, preds_frame: pd.DataFrame, path, thresholds=None) -> Path:
    """Format a predictions frame (``<id>`` + prediction columns), validate it, write it atomically.

    Nothing is written when validation fails.
    """
    sample = read_sample(cfg)
    preds = spec.predictions_from_frame(preds_frame, source=f"predictions for {path}")
    frame = format_submission(cfg, spec, preds_frame[cfg.data.id_column], preds, thresholds, sample)
    validate_submission(cfg, spec, frame, path, sample)
    return artifacts.write_csv(path, frame, float_format=cfg.submission.float_format)


def load_spec(cfg: Config) -> TaskSpec:
    """The task spec from the folds file, or from the train table when folds are not made yet."""
    paths = Paths(cfg)
    if paths.folds_csv.exists():
        return task_spec(cfg, read_csv(paths.folds_csv, "folds file"))
    return task_spec(cfg, read_train_table(cfg, check_readable=False))
