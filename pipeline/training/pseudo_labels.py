"""Pseudo-labelled rows in training: ``train.pseudo_labels`` appended to the folds table so that
fold k trains on its own rows and validates on none of them."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from pipeline.config.schema import Config
from pipeline.core.errors import PipelineError, first_few
from pipeline.data.images import PATH
from pipeline.data.tables import read_csv, require_columns
from pipeline.domain.tasks import TaskSpec

IMAGE_PATH, TRAIN_FOLD, CONFIDENCE = "image_path", "train_fold", "confidence"


def refuse_regression(task: str) -> None:
    if task == "regression":
        raise PipelineError("pseudo-labelling is not supported for data.task regression: a predicted value has no "
                            "confidence to threshold (it needs class probabilities: binary, multiclass, multilabel)")


def with_pseudo_labels(cfg: Config, spec: TaskSpec, table: pd.DataFrame) -> pd.DataFrame:
    """The folds ``table`` plus the rows of ``train.pseudo_labels`` (unchanged when it is null).

    A pseudo row of ``train_fold`` k gets fold ``-1 - k``: ``FoldTrainer`` trains fold k on the
    real rows of the other folds and on these, and validates on rows of fold k, which they never
    are. OOF files and ``cv.json`` are built from ``table`` alone."""
    source = cfg.train.pseudo_labels
    if source is None:
        return table
    refuse_regression(spec.task)
    d, n, path = cfg.data, cfg.folds.n_splits, Path(source)
    frame = read_csv(path, "pseudo-label file", key="train.pseudo_labels")
    require_columns(frame, [d.id_column, *d.target_columns, IMAGE_PATH, TRAIN_FOLD], path,
                    "train.pseudo_labels (written by `python -m pipeline pseudo`)")
    folds = pd.to_numeric(frame[TRAIN_FOLD], errors="coerce")
    if not folds.isin(range(n)).all():
        raise PipelineError(f"{path}: column '{TRAIN_FOLD}' must hold folds 0..{n - 1} (folds.n_splits); these rows "
                            f"were made for other folds: re-run `python -m pipeline pseudo`")
    missing = [p for p in frame[IMAGE_PATH] if not os.path.isfile(str(p))]
    if missing:
        raise PipelineError(f"{path}: {len(missing)} images in column '{IMAGE_PATH}' do not exist: "
                            f"{first_few(missing)}; re-run `python -m pipeline pseudo` "
                            f"from the directory the pipeline runs in")
    try:
        spec.encode(frame)  # its labels must be classes of the train table
    except PipelineError as exc:
        raise PipelineError(f"{path}: {exc}") from None
    rows = frame[[d.id_column, *d.target_columns]].copy()
    rows[PATH] = frame[IMAGE_PATH].to_numpy()
    rows["fold"] = -1 - folds.to_numpy(int)
    return pd.concat([table, rows], ignore_index=True)
