"""Likely label errors: train rows whose given label the out-of-fold probabilities contradict.

Ranked with cleanlab (confident learning, Northcutt et al. 2021): ``cleanlab.filter.find_label_issues``
flags the rows whose label the confident joint of given and predicted labels says is wrong
(``prune_by_noise_rate``), and ``cleanlab.rank.get_label_quality_scores`` scores every row by the
probability its model gives the given label (``self_confidence``; low = suspect). Out-of-fold
probabilities matter: each row is predicted by a model that never trained on it, so a wrong label
cannot have been learnt.

Classification only (binary, multiclass): a binary ``pred`` column is P(positive), read as the two
columns ``[1 - pred, pred]`` in the :class:`~pipeline.domain.tasks.TaskSpec`'s class order.

Example
-------
>>> import numpy as np, pandas as pd
>>> from pipeline.domain.tasks import TaskSpec
>>> spec = TaskSpec("multiclass", ("label",), ("a", "b"))
>>> probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.1, 0.9], [0.2, 0.8], [0.95, 0.05]])
>>> frame = rank_label_issues(spec, ["r0", "r1", "r2", "r3", "r4"], np.array([0, 0, 1, 1, 1]), probs, "id")
>>> frame["id"].iloc[0], frame["given_label"].iloc[0], frame["predicted_label"].iloc[0]
('r4', 'b', 'a')
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.core import artifacts
from pipeline.core.errors import PipelineError
from pipeline.data.report import thumbnail
from pipeline.domain.tasks import TaskSpec

# label_issues.csv after the id column, most suspect first (rank 1)
COLUMNS = ("given_label", "predicted_label", "label_quality", "issue", "rank")
TASKS = ("binary", "multiclass")
SHOWN = 24  # suspects in the PNG
PER_ROW = 6


def check_task(task: str) -> None:
    """Label issues are defined for classes: a clear error for multilabel and regression."""
    if task not in TASKS:
        raise PipelineError(f"label-issues supports classification only (data.task binary or multiclass); "
                            f"this experiment's data.task is {task}")


def class_probabilities(spec: TaskSpec, preds: np.ndarray) -> np.ndarray:
    """Prediction columns as an (n, classes) matrix of probabilities whose rows sum to 1."""
    check_task(spec.task)
    preds = np.asarray(preds, dtype=np.float64)
    probs = np.column_stack([1.0 - preds, preds]) if spec.task == "binary" else preds.reshape(len(preds), -1)
    if not np.isfinite(probs).all() or (probs < -1e-6).any():
        raise PipelineError("the OOF predictions hold NaN or negative probabilities; retrain the model "
                            "(make train-folds ARGS=--force)")
    probs = np.clip(probs, 0.0, None)
    return probs / np.maximum(probs.sum(axis=1, keepdims=True), 1e-12)  # CSV rounding: rows sum to 1 again


def rank_label_issues(spec: TaskSpec, ids, labels: np.ndarray, preds: np.ndarray, id_column: str) -> pd.DataFrame:
    """One row per train row: ``<id>`` and :data:`COLUMNS`, cleanlab's issues first, each part by label
    quality (lowest first); ``labels`` are :meth:`TaskSpec.encode`'s, ``preds`` its prediction columns."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    probs = class_probabilities(spec, preds)
    labels = np.asarray(labels).astype(np.int64)
    quality = get_label_quality_scores(labels, probs, method="self_confidence")
    issue = find_label_issues(labels, probs, filter_by="prune_by_noise_rate", n_jobs=1)
    classes = np.asarray(spec.classes, dtype=object)
    frame = pd.DataFrame({id_column: list(ids), "given_label": classes[labels],
                          "predicted_label": classes[probs.argmax(axis=1)], "label_quality": quality,
                          "issue": np.asarray(issue, dtype=bool)})
    frame = frame.sort_values(["issue", "label_quality", id_column], ascending=[False, True, True], kind="stable")
    frame["rank"] = np.arange(1, len(frame) + 1)
    return frame.reset_index(drop=True)


def check_contract(frame: pd.DataFrame, id_column: str, source: str = "label issues") -> None:
    """The columns of ``label_issues.csv``, in order, and ranks 1..n."""
    expected = [id_column, *COLUMNS]
    if list(frame.columns) != expected:
        raise PipelineError(f"{source}: columns {list(frame.columns)}, expected {expected}")
    if not np.array_equal(frame["rank"].to_numpy(), np.arange(1, len(frame) + 1)):
        raise PipelineError(f"{source}: ranks must run 1..{len(frame)} in file order")


def plot_suspects(frame: pd.DataFrame, image_paths: pd.Series, path: Path, title: str, shown: int = SHOWN) -> Path:
    """A grid of the ``shown`` most suspect rows (``frame`` ranked, ``image_paths`` by id), each titled
    with its id, given and predicted label and label quality."""
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas

    top = frame.head(shown)
    rows = max(1, -(-len(top) // PER_ROW))
    fig = Figure(figsize=(2.1 * PER_ROW, 2.4 * rows), layout="constrained")
    axes = np.atleast_2d(fig.subplots(rows, PER_ROW, squeeze=False))
    id_column = frame.columns[0]
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
        if i >= len(top):
            continue
        r = top.iloc[i]
        image = thumbnail(image_paths.get(r[id_column])) if image_paths.get(r[id_column]) else None
        if image is not None:
            ax.imshow(image)
        flag = " (issue)" if r["issue"] else ""
        ax.set_title(f"#{r['rank']} {str(r[id_column])[:18]}\ngiven {r['given_label']}\n"
                     f"predicted {r['predicted_label']}  q={r['label_quality']:.3f}{flag}", fontsize=7)
    fig.suptitle(title, fontsize=10)
    with artifacts.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    return path
