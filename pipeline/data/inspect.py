"""Reading a competition folder before any config exists: which files are which, the id and target
columns, the task, the submission format, a metric, fold settings: what ``init`` writes.

Everything is read leniently (a row without an image, an image without a row are findings for the
data report, not errors); what cannot be decided (two columns that both name the test images, a
target that is neither classes nor numbers, no sample submission) is a :class:`PipelineError` that
names the columns or files and the key to set (``python -m pipeline init DIR data.<key>=<value>``).

Example
-------
>>> comp = inspect_competition("data/digits")  # doctest: +SKIP
>>> comp.task, comp.id_column, comp.target_columns  # doctest: +SKIP
('multiclass', 'image_id', ['label'])
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from pipeline.core.errors import PipelineError, first_few, quoted
from pipeline.data.images import PATH
from pipeline.data.tables import IMAGE_SUFFIXES, read_csv

# keys of data.* that `init` takes as given (``data.id_column=image``) instead of inferring them
GIVEN_KEYS = ("train_csv", "train_dir", "test_dir", "sample_submission", "id_column", "target_columns", "task")
MAX_INTEGER_CLASSES = 30  # an integer target with more distinct values is read as regression
GROUP_HINTS = ("patient", "group", "source", "subject", "user", "study", "case", "session", "writer", "site",
               "series", "individual", "camera", "video", "author", "scan", "family")
POSITIVE_WORDS = ("1", "true", "yes", "y", "positive", "pos", "fake", "abnormal", "malignant", "defect", "disease")
MATCH_SHARE = 0.5  # a column names the images when at least this share of its values is an image file


def hint(key: str, value: str = "<value>") -> str:
    """How to give a data key to ``init`` instead of having it inferred."""
    return f"pass {key}={value} to init (python -m pipeline init DIR {key}={value}; make init ARGS=...)"


@dataclass(frozen=True)
class Layout:
    """The competition's files, relative to ``root``; ``train_csv`` None: class sub-folders."""

    root: Path
    train_csv: Optional[str]
    train_dir: str
    test_dir: str
    sample_submission: str


@dataclass
class Competition:
    """A competition folder as read by ``init``: its layout, tables and decisions with their reasons.

    ``train`` has the id, the target column(s), any other train columns and ``_path`` (None where a
    row has no image); ``test`` has the sample's ids and ``_path``; ``train_files``/``test_files``
    are every image file under the two folders."""

    layout: Layout
    id_column: str
    target_columns: list[str]
    task: str
    train: pd.DataFrame
    test: pd.DataFrame
    train_files: list[str]
    test_files: list[str]
    positive_class: Optional[str] = None
    submission_format: str = "auto"
    metric: str = "accuracy"
    group_columns: list[str] = field(default_factory=list)
    n_splits: int = 5
    label_separator: str = " "
    why: dict[str, str] = field(default_factory=dict)

    def label_keys(self) -> pd.Series:
        """One text per train row naming its target(s) (``0|1|1`` for several columns, sorted labels
        of a list): equal labels, equal texts."""
        cols = self.train[self.target_columns].fillna("").astype(str)
        if len(self.target_columns) > 1:
            return cols.agg("|".join, axis=1)
        if self.task == "multilabel":  # 'b a' and 'a b' are the same labels
            return cols.iloc[:, 0].map(lambda text: " ".join(sorted(set(text.split(self.label_separator)) - {""})))
        return cols.iloc[:, 0].str.strip()


# ---------------------------------------------------------------------------- files


def _images_under(folder: Path, recursive: bool) -> list[str]:
    if not folder.is_dir():
        return []
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(str(p) for p in found if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _has_images(folder: Path) -> bool:
    with os.scandir(folder) as entries:
        return any(os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES for e in entries)


def _class_folders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and _has_images(p))


def _pick(root: Path, exact: str, pattern: str, what: str, key: str, want_dir: bool) -> Optional[str]:
    """``exact`` when it exists, else the one entry of ``root`` matching ``pattern``; None if none."""
    if (root / exact).is_dir() if want_dir else (root / exact).is_file():
        return exact
    regex = re.compile(pattern, re.IGNORECASE)
    found = sorted(p.name for p in root.iterdir() if regex.fullmatch(p.name) and (p.is_dir() == want_dir))
    if want_dir:
        found = [f for f in found if _has_images(root / f) or _class_folders(root / f)]
    if len(found) > 1:
        raise PipelineError(f"{root} has several {what}s: {', '.join(found)}; {hint(key, found[0])}")
    return found[0] if found else None


def find_layout(root: Path | str, given: dict | None = None) -> Layout:
    """Which file is the train table, the sample submission, and which folders hold the images."""
    root, given = Path(root), given or {}
    if not root.is_dir():
        raise PipelineError(f"competition folder {root} does not exist or is not a folder; "
                            f"put the data under data/<competition>/ and pass that folder")
    sample = given.get("sample_submission") or _pick(root, "sample_submission.csv", r".*sample.*sub.*\.csv",
                                                     "sample submission", "data.sample_submission", False)
    if sample is None:
        csvs = sorted(p.name for p in root.glob("*.csv"))
        raise PipelineError(f"{root} has no sample submission (sample_submission.csv or *sample*sub*.csv; CSVs "
                            f"there: {first_few(csvs) or 'none'}): it defines the test ids and the submission "
                            f"format; put the competition's file there or {hint('data.sample_submission')}")
    train_dir = given.get("train_dir") or _pick(root, "train", r"train.*", "train image folder", "data.train_dir",
                                                True)
    test_dir = given.get("test_dir") or _pick(root, "test", r"test.*", "test image folder", "data.test_dir", True)
    for what, name, key in (("train", train_dir, "data.train_dir"), ("test", test_dir, "data.test_dir")):
        if name is None or not (root / name).is_dir():
            raise PipelineError(f"{root} has no {what} image folder ({name or f'{what}/ or {what}*/'}); "
                                f"put the {what} images there or {hint(key)}")
    if "train_csv" in given:
        train_csv = given["train_csv"]
    else:
        train_csv = _pick(root, "train.csv", r"train.*\.csv", "train table", "data.train_csv", False)
    if train_csv is None and not _class_folders(root / train_dir):
        raise PipelineError(f"{root} has neither a train table (train.csv or train*.csv) nor class sub-folders "
                            f"with images in {root / train_dir}; add one or {hint('data.train_csv')}")
    return Layout(root, train_csv, train_dir, test_dir, sample)


class _Index:
    """Image files of a folder by relative path, with and without the extension."""

    def __init__(self, folder: Path, files: list[str]) -> None:
        self.by_name: dict[str, str] = {}
        for f in files:
            rel = Path(f).relative_to(folder).as_posix()
            self.by_name.setdefault(rel, f)
            self.by_name.setdefault(os.path.splitext(rel)[0], f)

    def paths(self, ids: pd.Series) -> pd.Series:
        return ids.astype(str).map(self.by_name)

    def share(self, values: pd.Series) -> float:
        values = values.dropna()
        return float(self.paths(values).notna().mean()) if len(values) else 0.0


# ---------------------------------------------------------------------------- columns


def _id_column(sample: pd.DataFrame, train: Optional[pd.DataFrame], test: _Index, train_index: _Index,
               source: Path) -> tuple[str, str]:
    shares = {c: test.share(sample[c]) for c in sample.columns}
    found = [c for c, s in shares.items() if s >= MATCH_SHARE]
    if train is not None:  # the CSV layout: the same column names the train images
        found = [c for c in found if c in train.columns and train_index.share(train[c]) >= MATCH_SHARE] or found
    if not found:
        best = max(shares, key=shares.get)
        raise PipelineError(f"no column of {source} ({', '.join(sample.columns)}) names the test images "
                            f"(best: '{best}', {shares[best]:.0%} of its values); check the test folder or "
                            f"{hint('data.id_column', best)}")
    if len(found) > 1:
        raise PipelineError(f"columns {', '.join(map(repr, found))} of {source} both name the test images; "
                            f"{hint('data.id_column', found[0])}")
    col = found[0]
    ext = "with" if sample[col].astype(str).str.contains(r"\.[A-Za-z]{3,4}$").mean() > 0.5 else "without"
    return col, f"its values name the test images ({shares[col]:.0%}; ids {ext} the file extension)"


def _group_columns(train: pd.DataFrame, exclude: list[str], n_splits: int) -> list[str]:
    """Columns whose values repeat like a patient's or a source's id: fewer values than rows, at
    least one per fold, not the target again under another name; named ones (patient, source) first."""
    found = []
    for col in train.columns:
        if col in exclude or col == PATH:
            continue
        values = train[col].dropna().astype(str)
        n = values.nunique()
        if not (n_splits <= n <= 0.8 * len(values)) or values.value_counts().iloc[0] < 2:
            continue
        numeric = pd.to_numeric(values, errors="coerce")
        if numeric.notna().all() and (numeric != numeric.round()).any():
            continue  # a measurement, not an id
        target = train.loc[values.index, exclude[-1]].astype(str)
        if n == target.nunique() and pd.crosstab(values, target).astype(bool).sum(axis=1).eq(1).all():
            continue  # one value per class: the label again
        found.append(col)
    return sorted(found, key=lambda c: not any(h in c.lower() for h in GROUP_HINTS))


# ---------------------------------------------------------------------------- the task


def _distinct(values: pd.Series) -> list[str]:
    return sorted({str(v).strip() for v in values.dropna()} - {""})


def _is_number(values: list[str]) -> bool:
    return bool(values) and pd.to_numeric(pd.Series(values), errors="coerce").notna().all()


def _is_01(values: pd.Series) -> bool:
    distinct = _distinct(values)
    return _is_number(distinct) and set(pd.to_numeric(pd.Series(distinct)).tolist()) <= {0, 1}


def single_column_task(values: pd.Series, column: str, sample_values: pd.Series,
                       separator: str = " ") -> tuple[str, str]:
    """The task one target column holds, with the reason; an error when it is neither."""
    distinct = _distinct(values)
    rows = int(values.notna().sum())
    if len(distinct) < 2 and not (values.isna().any() and distinct):
        raise PipelineError(f"target column '{column}' holds {len(distinct)} distinct value(s) "
                            f"({first_few(distinct) or 'none'}): nothing to learn; {hint('data.target_columns')}")
    if _is_number(distinct):
        numbers = pd.to_numeric(pd.Series(distinct))
        if len(distinct) == 2:
            return "binary", f"two values in '{column}': {distinct[0]}, {distinct[1]}"
        if (numbers == numbers.round()).all() and len(distinct) <= MAX_INTEGER_CLASSES:
            return "multiclass", (f"{len(distinct)} integer classes in '{column}' (if they are ordered grades, "
                                  f"consider metric qwk)")
        return "regression", f"numeric '{column}', {len(distinct)} distinct values"
    tokens = _distinct(pd.Series([t for v in values.dropna() for t in str(v).split(separator)]))
    lists = values.dropna().astype(str).str.strip().str.contains(re.escape(separator)).any()
    sample_lists = sample_values.dropna().astype(str).str.strip().str.contains(re.escape(separator)).any()
    if ((lists or sample_lists) and len(tokens) < len(distinct)) or (values.isna().any() and lists):
        return "multilabel", (f"{len(tokens)} labels in '{column}' as {separator!r}-separated lists "
                              f"({len(distinct)} combinations)")
    if values.isna().any():
        raise PipelineError(f"target column '{column}' is empty in {int(values.isna().sum())} rows and its values "
                            f"are not label lists; fill or drop those rows, or {hint('data.task')}")
    if len(distinct) == 2:
        return "binary", f"two classes in '{column}': {distinct[0]}, {distinct[1]}"
    if len(distinct) > max(0.5 * rows, 2):
        raise PipelineError(f"target column '{column}' has {len(distinct)} distinct text values in {rows} rows "
                            f"(e.g. {quoted(distinct[:3])}): neither classes nor numbers; {hint('data.task')} and "
                            f"data.target_columns")
    return "multiclass", f"{len(distinct)} classes in '{column}'"


def _positive_class(values: pd.Series, column: str) -> tuple[str, str]:
    distinct = _distinct(values)
    for word in POSITIVE_WORDS:
        for c in distinct:
            if c.lower() == word:
                return c, f"pred = P({c}); check it is the class the metric scores"
    counts = values.astype(str).str.strip().value_counts()
    counts = counts.reindex(distinct)
    positive = counts.idxmin() if counts.min() < counts.max() else distinct[-1]
    share = counts[positive] / counts.sum()
    return positive, (f"pred = P({positive}): the {'rarer' if counts.min() < counts.max() else 'second'} class "
                      f"({share:.0%} of rows); check it is the class the metric scores")


def _format_and_metric(task: str, sample: pd.DataFrame, value_cols: list[str], classes: list[str],
                       per_class: bool) -> tuple[str, str, str]:
    """``submission.format``, the metric and the reason, from what the sample's values hold."""
    values = _distinct(pd.concat([sample[c] for c in value_cols]))
    numeric = _is_number(values)
    fractions = numeric and any("." in v and float(v) != round(float(v)) for v in values)
    if task == "regression":
        return "auto", "rmse", "regression: the predicted values"
    labels = set(values) <= set(classes) or (numeric and not fractions and (per_class or task == "multilabel"))
    if task in ("binary", "multilabel") or per_class:
        if fractions or not labels:
            metric = "log_loss" if task == "multiclass" else "roc_auc"
            return "probabilities", metric, f"the sample holds probabilities ({first_few(values, 3)})"
    shown = first_few(values, 3)
    metric = {"binary": "accuracy", "multiclass": "accuracy", "multilabel": "f1"}[task]
    return "labels", metric, f"the sample holds labels ({shown})"


def _n_splits(comp_task: str, train: pd.DataFrame, targets: list[str]) -> tuple[int, str]:
    if comp_task not in ("binary", "multiclass"):
        return 5, "k-fold: every train row is validated once"
    counts = train[targets[0]].dropna().astype(str).str.strip().value_counts()
    smallest = int(counts.min())
    if smallest >= 5:
        return 5, "k-fold: every train row is validated once"
    return max(2, smallest), (f"the rarest class '{counts.idxmin()}' has {smallest} rows; stratified folds need "
                              f"one per fold" + ("" if smallest >= 2 else ": drop or merge it"))


# ---------------------------------------------------------------------------- the whole folder


def _read_train(layout: Layout) -> tuple[Optional[pd.DataFrame], list[str]]:
    folder = layout.root / layout.train_dir
    files = _images_under(folder, recursive=True)
    if layout.train_csv is None:
        return None, files
    return read_csv(layout.root / layout.train_csv, "train table", key="data.train_csv"), files


def _class_folder_table(layout: Layout, files: list[str], id_column: str, target: str) -> pd.DataFrame:
    folder = layout.root / layout.train_dir
    rows = [(Path(f).relative_to(folder).with_suffix("").as_posix(), Path(f).parent.name, f) for f in files
            if Path(f).parent != folder]
    return pd.DataFrame(rows, columns=[id_column, target, PATH])


def _targets(layout: Layout, sample: pd.DataFrame, train: Optional[pd.DataFrame], id_column: str,
             given: dict) -> tuple[list[str], bool, str]:
    """The target column(s), whether the sample has one column per class, and the reason."""
    value_cols = [c for c in sample.columns if c != id_column]
    source = layout.root / layout.sample_submission
    if given.get("target_columns"):
        cols = [given["target_columns"]] if isinstance(given["target_columns"], str) else list(given["target_columns"])
        return cols, len(value_cols) > 1 and not set(value_cols) <= set(cols), "given to init"
    if not value_cols:
        raise PipelineError(f"{source} has only the id column '{id_column}': no target to read off; "
                            f"{hint('data.target_columns', '[label]')}")
    if train is None:  # class folders: one label column, or one column per class folder
        if len(value_cols) == 1:
            return value_cols, False, "the sample submission's other column; the classes are train/'s sub-folders"
        name = "label" if id_column != "label" else "class"
        return [name], True, f"the sample has one column per class ({first_few(value_cols, 3)})"
    missing = [c for c in value_cols if c not in train.columns]
    if not missing:
        return value_cols, False, "the sample submission's other column(s)"
    others = [c for c in train.columns if c != id_column]
    named = [c for c in others if set(_distinct(train[c])) == set(value_cols)]
    if len(value_cols) >= 2 and len(named) == 1:
        return named, True, f"its classes are the sample's columns ({first_few(value_cols, 3)})"
    raise PipelineError(f"the sample's column(s) {first_few(map(repr, missing))} are not in "
                        f"{layout.root / layout.train_csv} (its columns: {first_few(others, 10)}); "
                        f"{hint('data.target_columns', '[<column>]')}")


def _task(train: pd.DataFrame, sample: pd.DataFrame, targets: list[str], per_class: bool,
          given: dict) -> tuple[str, str]:
    if given.get("task"):
        return given["task"], "given to init"
    if per_class:  # classes are the sample's columns
        n = len(_distinct(train[targets[0]]))
        return ("binary" if n == 2 else "multiclass"), f"{n} classes in '{targets[0]}', one sample column each"
    if len(targets) > 1:
        not01 = [c for c in targets if not _is_01(train[c])]
        if not not01:
            onehot = train[targets].apply(pd.to_numeric).sum(axis=1).eq(1).all()
            note = ("; every row has exactly one 1: one-hot classes, trained as labels (sigmoid each)" if onehot
                    else "")
            return "multilabel", f"{len(targets)} 0/1 label columns{note}"
        raise PipelineError(f"target columns {first_few(map(repr, not01))} are not 0/1 (several targets that "
                            f"are not label indicators: not a task here); {hint('data.task')} and "
                            f"data.target_columns")
    return single_column_task(train[targets[0]], targets[0], sample[targets[0]] if targets[0] in sample else
                              pd.Series(dtype=str))


def inspect_competition(root: Path | str, given: dict | None = None) -> Competition:
    """Read a competition folder and decide the data keys, the task, the format and the metric.

    ``given`` holds ``data.*`` keys (of ``GIVEN_KEYS``) to take as they are instead of inferring them."""
    given = given or {}
    layout = find_layout(root, given)
    sample_path = layout.root / layout.sample_submission
    sample = read_csv(sample_path, "sample submission", key="data.sample_submission")
    if sample.empty:
        raise PipelineError(f"sample submission {sample_path} has a header and no rows; it defines the test ids: "
                            f"use the competition's sample_submission.csv")
    train, train_files = _read_train(layout)
    test_files = _images_under(layout.root / layout.test_dir, recursive=False)
    test_index = _Index(layout.root / layout.test_dir, test_files)
    train_index = _Index(layout.root / layout.train_dir, train_files)
    why: dict[str, str] = {}
    if given.get("id_column"):
        id_column, why["data.id_column"] = given["id_column"], "given to init"
        if id_column not in sample.columns:
            raise PipelineError(f"{sample_path} has no column '{id_column}' (data.id_column); its columns: "
                                f"{', '.join(sample.columns)}")
    else:
        id_column, why["data.id_column"] = _id_column(sample, train, test_index, train_index, sample_path)
    targets, per_class, why["data.target_columns"] = _targets(layout, sample, train, id_column, given)
    if train is None:
        train = _class_folder_table(layout, train_files, id_column, targets[0])
        why["data.train_csv"] = f"no train table: the classes are the sub-folders of {layout.train_dir}/"
    else:
        _require(train, [id_column, *targets], layout.root / layout.train_csv)
        train[PATH] = train_index.paths(train[id_column])
    task, why["data.task"] = _task(train, sample, targets, per_class, given)
    test = sample[[id_column]].copy()
    test[PATH] = test_index.paths(test[id_column])
    comp = Competition(layout, id_column, targets, task, train, test, train_files, test_files, why=why)
    _decide(comp, sample, per_class)
    return comp


def _require(train: pd.DataFrame, columns: list[str], source: Path) -> None:
    missing = [c for c in columns if c not in train.columns]
    if missing:
        raise PipelineError(f"{source} has no column {first_few(map(repr, missing))} (named by the sample "
                            f"submission); its columns: {first_few(list(train.columns), 10)}; "
                            f"{hint('data.id_column' if missing[0] == columns[0] else 'data.target_columns')}")


def _decide(comp: Competition, sample: pd.DataFrame, per_class: bool) -> None:
    """The keys that follow from the task: positive class, format, metric, folds and group columns."""
    train, targets, why = comp.train, comp.target_columns, comp.why
    if comp.task == "binary":
        comp.positive_class, why["data.positive_class"] = _positive_class(train[targets[0]], targets[0])
    value_cols = [c for c in sample.columns if c != comp.id_column]
    if comp.task == "multilabel" and len(targets) == 1:
        classes = _distinct(pd.Series([t for v in train[targets[0]].dropna() for t in str(v).split()]))
    elif comp.task in ("binary", "multiclass"):
        classes = _distinct(train[targets[0]])
    else:
        classes = []
    comp.submission_format, comp.metric, why["submission.format"] = _format_and_metric(
        comp.task, sample, value_cols, classes, per_class)
    why["metric"] = (f"fits a {comp.task} task whose sample holds {comp.submission_format}: check the "
                     f"competition's evaluation page")
    comp.n_splits, why["folds.n_splits"] = _n_splits(comp.task, train, targets)
    if comp.layout.train_csv is not None:
        comp.group_columns = _group_columns(train, [comp.id_column, *targets], comp.n_splits)
    if comp.group_columns:
        col = comp.group_columns[0]
        values = train[col].astype(str)
        why["data.group_column"] = (f"repeated values ({values.nunique()} groups, {len(values) / values.nunique():.1f}"
                                    f" rows each): if a group's images are alike, folds must keep it together")


def image_size(shorter_sides: np.ndarray | list, low: int = 96, high: int = 320, step: int = 32) -> tuple[int, str]:
    """The input size for a backbone from the images' shorter sides: the median, rounded to a
    multiple of ``step``, clipped to ``[low, high]``.

    >>> image_size([150, 150, 140])[0], image_size([8, 8])[0], image_size([1024, 2000])[0]
    (160, 96, 320)
    """
    sides = np.asarray(shorter_sides, dtype=float)
    if not len(sides):
        return 224, "no readable train image to measure: timm's usual 224"
    median = float(np.median(sides))
    size = int(min(high, max(low, step * round(median / step))))
    return size, f"median shorter side of the train images: {median:.0f} px (a multiple of {step}, {low}..{high})"


def parse_given(words: list[str] | tuple = ()) -> dict:
    """``data.<key>=<value>`` words given to ``init`` (values read as YAML, as overrides are)."""
    import yaml

    given = {}
    for word in words:
        key, sep, text = word.partition("=")
        name = key.removeprefix("data.")
        if not sep or not key.startswith("data.") or name not in GIVEN_KEYS:
            raise PipelineError(f"init takes data keys as key=value words, got '{word}'; valid keys: "
                                f"{', '.join('data.' + k for k in GIVEN_KEYS)}")
        try:
            given[name] = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            raise PipelineError(f"init: the value of '{word}' is not valid YAML") from None
        if given[name] is not None and name != "target_columns":
            given[name] = str(given[name])
    return given
