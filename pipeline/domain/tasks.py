"""Task types: how targets are encoded, which prediction columns exist, and the activation.

This module owns target encoding. Every later stage gets its targets and class names from a
:class:`TaskSpec`, built once from the train table (or the folds file), so no stage
re-implements reading labels.

Binary tasks keep their two classes as ``(negative, positive)``: the ``pred`` column is
P(positive), encoded targets are 1 for the positive class, and submissions map 1 back to
``classes[1]``. ``data.positive_class`` names it; by default it is the second in sorted order.
Regression targets are standardised per fold (:meth:`TaskSpec.fit_targets`): the loss and the
head work in standard units, :meth:`TaskSpec.activate` returns the original units.

Example
-------
>>> import pandas as pd
>>> spec = TaskSpec.from_table(pd.DataFrame({"id": ["a", "b"], "label": ["cat", "dog"]}),
...                            task="multiclass", target_columns=["label"])
>>> spec.pred_columns
['pred_cat', 'pred_dog']
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import numpy as np
import pandas as pd

from pipeline.core.errors import PipelineError, first_few


def _sort_labels(values) -> list[str]:
    values = sorted({str(v) for v in values})
    try:
        return sorted(values, key=float)
    except ValueError:
        return values


def _binary_order(found: list[str], positive: Optional[str], column: str) -> list[str]:
    """The two classes as (negative, positive): ``data.positive_class``, else the second sorted."""
    if positive is None:
        return found
    if str(positive) not in found:
        raise PipelineError(f"config key 'data.positive_class': '{positive}' is not a class of column '{column}'; "
                            f"its two classes are '{found[0]}' and '{found[1]}'")
    return [c for c in found if c != str(positive)] + [str(positive)]


@dataclass(frozen=True)
class TaskSpec:
    task: str
    target_columns: tuple[str, ...]
    classes: tuple[str, ...] = ()  # multiclass/binary classes, multilabel labels
    label_separator: str = " "
    id_column: str = ""  # named in error messages when the table has it
    target_mean: float = 0.0  # regression: the training rows' mean and std (fit_targets)
    target_std: float = 1.0

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_table(cls, table: pd.DataFrame, task: str, target_columns: list[str],
                   classes: Optional[list[str]] = None, label_separator: str = " ",
                   id_column: str = "", positive_class: Optional[str] = None) -> "TaskSpec":
        cols = tuple(target_columns)
        if task == "regression":
            if len(cols) != 1:
                raise PipelineError(f"regression takes one target column (data.target_columns), got {list(cols)}")
            return cls(task, cols, id_column=id_column)
        if task == "multilabel" and len(cols) > 1:  # one 0/1 column per label
            return cls(task, cols, tuple(classes or cols), label_separator, id_column)
        if len(cols) != 1:
            raise PipelineError(f"{task} takes one target column (data.target_columns), got {list(cols)}")
        column = table[cols[0]].dropna()
        if task == "multilabel":
            found = _sort_labels(lab for text in column for lab in str(text).split(label_separator) if lab)
        else:
            found = _sort_labels(column)
        if classes:
            unknown = sorted(set(found) - {str(c) for c in classes})
            if unknown:
                raise PipelineError(f"column '{cols[0]}' holds values not in data.classes: {first_few(unknown)}; "
                                    f"add them to data.classes or fix the table")
            found = [str(c) for c in classes]
        if task == "binary" and len(found) != 2:
            raise PipelineError(f"binary task needs exactly 2 distinct values in column '{cols[0]}', "
                                f"found {len(found)}: {first_few(found)}; use task: multiclass for more")
        if task == "multiclass" and len(found) < 2:
            raise PipelineError(f"multiclass task needs at least 2 classes in column '{cols[0]}', found {found}")
        if task == "binary":
            found = _binary_order(found, positive_class, cols[0])
        return cls(task, cols, tuple(found), label_separator, id_column)

    # ------------------------------------------------------------------ shapes
    @property
    def num_outputs(self) -> int:
        if self.task in ("binary", "regression"):
            return 1
        return len(self.classes)

    @property
    def pred_columns(self) -> list[str]:
        if self.task in ("binary", "regression"):
            return ["pred"]
        return [f"pred_{c}" for c in self.classes]

    @property
    def positive_class(self) -> str:
        """Binary: the class whose probability ``pred`` holds (encoded as 1)."""
        return self.classes[1]

    # ------------------------------------------------------------------ targets
    def encode(self, table: pd.DataFrame) -> np.ndarray:
        """Encoded targets: int class index (multiclass), float 0/1 (binary), 0/1 matrix
        (multilabel), float (regression)."""
        if self.task == "regression":
            values = pd.to_numeric(table[self.target_columns[0]], errors="coerce")
            bad = table.loc[values.isna()].index
            if len(bad):
                raise PipelineError(f"regression target '{self.target_columns[0]}' is not numeric for "
                                    f"{self._rows(table, bad)}")
            return values.to_numpy(np.float32)
        if self.task == "multilabel" and len(self.target_columns) > 1:
            return self._encode_label_columns(table)
        column = table[self.target_columns[0]]
        if self.task == "multilabel":
            return self._encode_label_lists(column)
        index = {c: i for i, c in enumerate(self.classes)}
        codes = column.astype(str).map(index)
        if codes.isna().any():
            raise PipelineError(f"column '{self.target_columns[0]}' holds unknown classes "
                                f"{first_few(column[codes.isna()].unique())}; known: {first_few(self.classes, 20)}")
        codes = codes.to_numpy(np.int64)
        return codes.astype(np.float32) if self.task == "binary" else codes

    def _rows(self, table: pd.DataFrame, index) -> str:
        if self.id_column and self.id_column in table.columns:
            return f"ids {first_few(table.loc[index, self.id_column])}"
        return f"rows {first_few(index)}"

    def _encode_label_columns(self, table: pd.DataFrame) -> np.ndarray:
        values = table[list(self.target_columns)].apply(pd.to_numeric, errors="coerce")
        bad = ~values.isin([0, 1])
        if bad.any().any():
            col = bad.any()[bad.any()].index[0]
            rows = table.index[bad[col]]
            raise PipelineError(f"multilabel column '{col}' must hold 0 or 1; {self._rows(table, rows)} hold "
                                f"{first_few(table.loc[rows, col].unique())}")
        return values.to_numpy(np.float32)

    def _encode_label_lists(self, column: pd.Series) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes)}
        out = np.zeros((len(column), len(self.classes)), np.float32)
        unknown = set()
        for row, text in enumerate(column.fillna("")):
            for lab in str(text).split(self.label_separator):
                if lab in index:
                    out[row, index[lab]] = 1.0
                elif lab:
                    unknown.add(lab)
        if unknown:
            raise PipelineError(f"column '{self.target_columns[0]}' holds unknown labels {first_few(sorted(unknown))}; "
                                f"known: {first_few(self.classes, 20)}")
        return out

    def strata(self, table: pd.DataFrame) -> np.ndarray:
        """A 1-D label per row for stratified splitting (class index)."""
        y = self.encode(table)
        return y.astype(int) if self.task in ("binary", "multiclass") else y

    # ------------------------------------------------------------------ regression units
    def fit_targets(self, y_train: np.ndarray) -> "TaskSpec":
        """Regression: this spec with the training rows' mean and std, so that the loss sees
        standardised targets and a zero-initialised head starts at the mean (targets of 1000 +- 50
        are otherwise out of reach of a few epochs at fine-tuning LRs). Other tasks: unchanged."""
        if self.task != "regression":
            return self
        y = np.asarray(y_train, dtype=np.float64)
        std = float(y.std()) if len(y) else 0.0
        return replace(self, target_mean=float(y.mean()) if len(y) else 0.0,
                       target_std=std if np.isfinite(std) and std > 0 else 1.0)

    def scaled_loss(self, loss):
        """``loss(logits, y)`` fed standardised regression targets (the logits' units)."""
        if self.task != "regression" or (self.target_mean, self.target_std) == (0.0, 1.0):
            return loss
        mean, std = self.target_mean, self.target_std
        return lambda logits, y: loss(logits, (y - mean) / std)

    # ------------------------------------------------------------------ predictions
    def activate(self, logits: np.ndarray) -> np.ndarray:
        """Logits to what prediction columns hold: softmax, sigmoid, or (regression) the value
        in the target's original units."""
        logits = np.asarray(logits, dtype=np.float64)
        if self.task == "multiclass":
            z = logits - logits.max(axis=1, keepdims=True)
            e = np.exp(z)
            return e / e.sum(axis=1, keepdims=True)
        if self.task in ("binary", "multilabel"):
            out = 1.0 / (1.0 + np.exp(-logits))
            return out[:, 0] if self.task == "binary" and out.ndim == 2 else out
        values = logits[:, 0] if logits.ndim == 2 else logits
        return values * self.target_std + self.target_mean

    def predictions_frame(self, ids, preds: np.ndarray, id_column: str) -> pd.DataFrame:
        preds = np.asarray(preds)
        preds = preds.reshape(len(preds), -1)
        frame = pd.DataFrame(preds, columns=self.pred_columns)
        frame.insert(0, id_column, list(ids))
        return frame

    def predictions_from_frame(self, frame: pd.DataFrame, source: str = "predictions") -> np.ndarray:
        """Read prediction columns back, checking the contract."""
        missing = [c for c in self.pred_columns if c not in frame.columns]
        if missing:
            raise PipelineError(f"{source} lacks prediction columns {first_few(missing)}; "
                                f"expected {first_few(self.pred_columns, 20)}")
        values = frame[self.pred_columns].to_numpy(np.float64)
        return values[:, 0] if self.task in ("binary", "regression") else values
