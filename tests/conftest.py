"""Shared test fixtures: tiny real datasets from scikit-learn's digits, and the real config, shrunk.

Everything here is offline, CPU-only and small (8x8 grayscale PNGs, a few hundred rows), so a
test that builds data, a config and folds costs well under a second.

Fixtures
--------
``digits_root`` (session)
    Path to a read-only Kaggle-layout multiclass dataset: 200 train + 40 test PNGs,
    ``train.csv`` (``image_id,label,writer``), ``sample_submission.csv`` (``image_id,label`` = 0).
    Shared by every test of the session: never modify it; write your own with
    :func:`write_dataset` into ``tmp_path`` when a test needs to break or change data.
``make_config``
    A function ``make(*overrides, **sections) -> Config`` building the real config from
    ``configs/demo.yaml``, shrunk for tests (see :func:`make_config`).

Helpers (``from conftest import write_dataset``)
------------------------------------------------
:func:`write_dataset` writes a dataset for any task type or layout and returns the matching
``data`` config section, e.g. ``make_config(data=write_dataset(tmp_path / "data", "binary"))``.
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from pipeline.config.schema import Config, config_from_dict

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"

TASK_KINDS = ("binary", "multiclass", "multilabel", "multilabel_columns", "regression")
MULTILABEL_LABELS = ("odd", "round", "small")  # properties of a digit; sorted order
ID_COLUMN = "image_id"
GROUP_COLUMN = "writer"
ROWS_PER_WRITER = 5


# ---------------------------------------------------------------------------- datasets


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits as uint8 8x8 images (0..255) and int labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(int)


def digit_properties(digit: int) -> list[str]:
    """The multilabel labels of a digit, from ``MULTILABEL_LABELS``: small (< 5), round, odd."""
    labels = []
    if digit % 2 == 1:
        labels.append("odd")
    if digit in (0, 6, 8, 9):
        labels.append("round")
    if digit < 5:
        labels.append("small")
    return labels


def write_png(path: Path, pixels: np.ndarray) -> Path:
    """Write a uint8 grayscale (HxW) or RGB (HxWx3) array as a PNG, creating folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")
    return path


def _targets(task: str, digits: np.ndarray, rng: np.random.Generator) -> dict[str, list]:
    """Target column(s) for ``task``, as they would appear in a competition's CSV."""
    if task == "multiclass":
        return {"label": [str(d) for d in digits]}
    if task == "binary":
        return {"label": ["odd" if d % 2 else "even" for d in digits]}
    if task == "multilabel":
        return {"labels": [" ".join(digit_properties(d)) for d in digits]}
    if task == "multilabel_columns":
        return {lab: [int(lab in digit_properties(d)) for d in digits] for lab in MULTILABEL_LABELS}
    if task == "regression":
        noisy = digits + rng.normal(0.0, 0.2, len(digits))
        return {"target": [f"{v:.4f}" for v in noisy]}
    raise ValueError(f"unknown task kind {task!r}; valid: {', '.join(TASK_KINDS)}")


def _sample_value(task: str) -> Any:
    """The placeholder a sample submission holds for ``task``."""
    return {"multiclass": "0", "binary": 0.5, "multilabel": "small", "multilabel_columns": 0.5,
            "regression": 0.0}[task]


def write_dataset(root: Path | str, task: str = "multiclass", n_train: int = 60, n_test: int = 12, *,
                  layout: str = "csv", id_extension: bool = False, group: bool = False,
                  seed: int = 0) -> dict:
    """Write a small Kaggle-layout dataset from scikit-learn's digits; return its ``data`` section.

    Parameters
    ----------
    root : folder to write (``train/``, ``test/``, ``train.csv``, ``sample_submission.csv``).
    task : one of ``TASK_KINDS``:

        * ``multiclass``: ``label`` = the digit ("0".."9");
        * ``binary``: ``label`` = "even" / "odd";
        * ``multilabel``: ``labels`` = space-separated subset of {odd, round, small};
        * ``multilabel_columns``: one 0/1 column per label ``odd``, ``round``, ``small``;
        * ``regression``: ``target`` = the digit plus N(0, 0.2) noise, as text with 4 decimals.
    n_train, n_test : rows; train uses digits ``0..n_train-1``, test the next ``n_test``.
    layout : ``csv`` (``train.csv`` + ``train/<id>.png``) or ``folders`` (class sub-folders
        ``train/<class>/<id>.png``, ``train_csv: null``; binary and multiclass only).
    id_extension : write ids as ``<id>.png`` in the CSVs instead of bare ``<id>``.
    group : set ``group_column: writer`` in the returned section. The ``writer`` column
        (row index // 5, as text) is always in ``train.csv``.
    seed : seed of the regression noise.

    Returns
    -------
    dict : a complete ``data`` config section (``root`` is ``str(root)``), ready for
        ``make_config(data=...)``. Ids are ``img_0000``... (train) and ``test_0000``... (test).
    """
    root = Path(root)
    if layout not in ("csv", "folders"):
        raise ValueError(f"layout must be 'csv' or 'folders', got {layout!r}")
    if layout == "folders" and task not in ("binary", "multiclass"):
        raise ValueError("class sub-folders hold one class per image: binary or multiclass only")
    images, digits = _digits()
    if n_train + n_test > len(images):
        raise ValueError(f"at most {len(images)} images in all")
    rng = np.random.default_rng(seed)
    suffix = ".png" if id_extension else ""

    train_ids = [f"img_{i:04d}" for i in range(n_train)]
    targets = _targets(task, digits[:n_train], rng)
    target_columns = list(targets)
    if layout == "folders":
        for image_id, cls, pixels in zip(train_ids, targets[target_columns[0]], images[:n_train]):
            write_png(root / "train" / cls / f"{image_id}.png", pixels)
    else:
        for image_id, pixels in zip(train_ids, images[:n_train]):
            write_png(root / "train" / f"{image_id}.png", pixels)
        train = pd.DataFrame({ID_COLUMN: [i + suffix for i in train_ids], **targets,
                              GROUP_COLUMN: [f"w{i // ROWS_PER_WRITER:03d}" for i in range(n_train)]})
        train.to_csv(root / "train.csv", index=False)

    test_ids = [f"test_{i:04d}" for i in range(n_test)]
    for image_id, pixels in zip(test_ids, images[n_train:n_train + n_test]):
        write_png(root / "test" / f"{image_id}.png", pixels)
    sample = pd.DataFrame({ID_COLUMN: [i + suffix for i in test_ids]})
    for col in target_columns:
        sample[col] = _sample_value(task)
    sample.to_csv(root / "sample_submission.csv", index=False)

    return {
        "root": str(root),
        "task": "multilabel" if task == "multilabel_columns" else task,
        "train_csv": "train.csv" if layout == "csv" else None,
        "train_dir": "train",
        "test_dir": "test",
        "sample_submission": "sample_submission.csv",
        "id_column": ID_COLUMN,
        "target_columns": target_columns,
        "group_column": GROUP_COLUMN if group else None,
    }


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """A read-only multiclass digits dataset (200 train, 40 test) shared by the whole session.

    Layout: ``train/img_0000.png``..., ``test/test_0000.png``..., ``train.csv``
    (``image_id,label,writer``), ``sample_submission.csv`` (``image_id,label`` = 0).
    Do not modify it; use :func:`write_dataset` into ``tmp_path`` for a dataset to break.
    """
    root = tmp_path_factory.mktemp("digits")
    write_dataset(root, "multiclass", n_train=200, n_test=40)
    return root


# ---------------------------------------------------------------------------- config


def _plain(value: Any) -> Any:
    """Paths to text, recursively, so a raw config survives ``yaml.safe_dump``."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _merge(base: dict, key: str, value: Any) -> None:
    """Deep-merge a mapping into ``base[key]``; anything else replaces it."""
    if isinstance(value, dict) and isinstance(base.get(key), dict):
        for k, v in value.items():
            _merge(base[key], k, v)
    else:
        base[key] = value


def shrunk_raw_config(digits_root: Path, tmp_path: Path) -> dict:
    """configs/demo.yaml as a raw mapping, shrunk for tests (see :func:`make_config`)."""
    raw = yaml.safe_load(DEMO_CONFIG.read_text())
    raw["data"]["root"] = str(digits_root)
    raw["runs_dir"] = str(tmp_path / "runs")
    raw["folds_dir"] = str(tmp_path / "folds")
    raw["submissions_dir"] = str(tmp_path / "submissions")
    raw["backbones"] = [{"name": "test_efficientnet", "weights": "none", "image_size": 32}]
    raw["train"]["batch_size"] = 32
    raw["train"]["frozen"]["epochs"] = 1
    raw["train"]["unfrozen"]["epochs"] = 1
    raw["train"]["unfreeze"] = "always"  # the tests say when they want auto's fold-0 decision
    raw["augment"]["tta"] = ["identity"]
    raw["folds"]["n_splits"] = 3
    return raw


@pytest.fixture
def make_config(tmp_path, digits_root):
    """A factory ``make(*overrides, **sections) -> Config`` for the real, validated config.

    Starts from ``configs/demo.yaml`` with: ``data.root`` = the ``digits_root`` dataset;
    ``runs_dir``, ``folds_dir``, ``submissions_dir`` under ``tmp_path``; one backbone
    ``{name: test_efficientnet, weights: none, image_size: 32}``; ``train.batch_size: 32``;
    1 frozen + 1 unfrozen epoch, ``train.unfreeze: always``; ``augment.tta: [identity]``; ``folds.n_splits: 3``.

    ``overrides`` are ``key.sub=value`` words exactly as on the command line (a list or tuple
    of them is accepted too); ``sections`` are mappings deep-merged into the raw config
    before the overrides (``data=write_dataset(...)``, ``train={"batch_size": 8}``);
    a non-mapping value replaces the key. Paths may be given as ``Path``.

    Example: ``make_config("folds.strategy=kfold", data=write_dataset(tmp_path / "d", "binary"))``
    """

    def make(*overrides, **sections) -> Config:
        raw = copy.deepcopy(shrunk_raw_config(digits_root, tmp_path))
        for key, value in sections.items():
            _merge(raw, key, _plain(value))
        words: list[str] = []
        for word in overrides:
            words.extend(word if isinstance(word, (list, tuple)) else [word])
        return config_from_dict(raw, [str(w) for w in words])

    return make


@pytest.fixture
def one_torch_thread():
    """One intra-op thread: on a busy 2-core machine two OpenMP threads spin against each other and
    a tiny model's step takes seconds instead of milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
