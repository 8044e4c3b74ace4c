"""Reading competition data: the train table, the test table, images, and the folds file.

Two train layouts are read into the same table:

* CSV + image folder: ``data.train_csv`` holds ``data.id_column`` and the target column(s);
  images live in ``data.train_dir`` named by id, with or without the file extension;
* class sub-folders: ``data.train_csv: null`` and ``data.train_dir/<class>/<image>``; the id is
  ``<class>/<file stem>`` and the target column is ``data.target_columns[0]``.

``data.exclude_ids`` (a CSV of ids, e.g. a copy of ``runs/<exp>/label_issues.csv``) drops rows from the
train table as it is read, so the folds and every later stage follow.

The test set is the sample submission's ids with images in ``data.test_dir``. Every table
carries a ``_path`` column with the resolved image file; it is never written to the folds file.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config.paths import Paths
from pipeline.config.schema import Config
from pipeline.core.errors import PipelineError, first_few, quoted
from pipeline.data.images import PATH, check_images_readable, set_image_limit, verified_dir
from pipeline.domain.tasks import TaskSpec

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")




def read_csv(path: Path, what: str, dtype=str, key: str | None = None) -> pd.DataFrame:
    """A CSV with every cell as text; only truly empty cells are missing (``None``, ``NA``, ``null``
    and ``nan`` are real ids and labels, not pandas' missing values)."""
    where = f" (config key {key})" if key else ""
    if not path.exists():
        parent = next((p for p in path.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise PipelineError(f"{what} {path}{where}: {parent} is a file, not a folder; check data.root")
        raise PipelineError(f"{what} {path}{where} does not exist; check data.root and the file name in the config")
    if path.is_dir():
        raise PipelineError(f"{what} {path}{where} is a folder, not a file; point it at the CSV file")
    try:
        return pd.read_csv(path, dtype=dtype, keep_default_na=False, na_values=[""])
    except Exception as exc:  # pandas raises many types for malformed files
        line = " ".join(str(exc).split())
        raise PipelineError(f"{what} {path}{where} could not be read as CSV: {line}") from None


def require_columns(frame: pd.DataFrame, columns, source: Path | str, key: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise PipelineError(f"{source} has no column {first_few(missing)} (config key {key}); "
                            f"its columns are: {first_few(list(frame.columns), 20)}")


def _check_ids(frame: pd.DataFrame, id_column: str, source) -> None:
    ids = frame[id_column]
    if ids.isna().any():
        rows = list(frame.index[ids.isna()] + 2)  # +2: header line and 1-based rows
        raise PipelineError(f"{source}: empty id in column '{id_column}' at lines {first_few(rows)}")
    dup = ids[ids.duplicated(keep=False)]
    if len(dup):
        raise PipelineError(f"{source}: duplicate ids in column '{id_column}': {quoted(dup.unique())} "
                            f"({dup.nunique()} ids repeated); each image must appear once")
    stripped = ids.astype(str).str.strip()
    near = ids[stripped.duplicated(keep=False)]
    if len(near):  # '1' and '1 ': two ids to pandas, one to whoever wrote the table
        raise PipelineError(f"{source}: ids in column '{id_column}' differ only by surrounding spaces: "
                            f"{quoted(near)}; remove the spaces so that each image appears once")


def _strip_labels(table: pd.DataFrame, columns) -> None:
    """Labels without surrounding spaces (``'1 '`` is class ``'1'``); a cell of spaces only is empty."""
    for col in columns:
        values = table[col].str.strip()
        table[col] = values.mask(values == "")


def _image_index(directory: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Map both file names and stems of the images in ``directory`` to their names; and the stems
    that more than one image shares (``x.png`` and ``x.jpg``) to those names."""
    index: dict[str, str] = {}
    shared: dict[str, list[str]] = {}
    if not directory.is_dir():
        return index, shared
    with os.scandir(directory) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            name = entry.name
            stem, suffix = os.path.splitext(name)
            if suffix.lower() in IMAGE_SUFFIXES:
                index[name] = name
                if stem in index and index[stem] != name and stem not in (name,):
                    shared.setdefault(stem, [index[stem]]).append(name)
                index.setdefault(stem, name)
    return index, shared


def resolve_image_paths(ids: pd.Series, directory: Path, extension: str | None, source) -> pd.Series:
    """Image file for each id (ids with or without extension); error listing missing ones."""
    if directory.exists() and not directory.is_dir():
        raise PipelineError(f"image folder {directory} (for {source}) is a file, not a folder; "
                            f"check data.root, data.train_dir and data.test_dir")
    if not directory.is_dir():
        raise PipelineError(f"image folder {directory} does not exist (for {source}); "
                            f"check data.root, data.train_dir and data.test_dir")
    index, shared = _image_index(directory)
    paths, missing, ambiguous = [], [], []
    suffix = None if not extension else (extension if extension.startswith(".") else "." + extension)
    for image_id in ids.astype(str):
        name = image_id if image_id in index and index[image_id] == image_id else None  # the file name itself
        if name is None and suffix and (directory / (image_id + suffix)).is_file():
            name = image_id + suffix
        if name is None and image_id in shared:
            ambiguous.append(f"{image_id!r} ({' and '.join(shared[image_id])})")
            continue
        if name is None:
            name = index.get(image_id)
        if name is None and (directory / image_id).is_file():  # ids with sub-paths
            name = image_id
        if name is None:
            missing.append(image_id)
        paths.append(str(directory / name) if name else None)
    if ambiguous:
        raise PipelineError(f"{len(ambiguous)} ids in {source} match more than one image in {directory}: "
                            f"{first_few(ambiguous)}; keep one file per id, or set data.image_extension")
    if missing:
        spaced = [i for i in missing if i != i.strip()]
        hint = f" ({len(spaced)} of them have surrounding spaces: remove them in the table)" if spaced else ""
        cased = _case_only(missing, index, suffix)
        if cased:
            hint += (f" ({len(cased)} of them match a file whose name differs in letter case only: {first_few(cased)}; "
                     f"file names are case-sensitive here: rename the files or correct the ids)")
        raise PipelineError(f"{len(missing)} ids in {source} have no image in {directory}: {quoted(missing)}{hint}; "
                            f"add the images or remove those rows (data.image_extension if ids lack one)")
    return pd.Series(paths, index=ids.index)


def _case_only(missing: list[str], index: dict[str, str], suffix: str | None) -> list[str]:
    """``'x.png' is x.PNG`` for each missing id that names an image in another letter case (an id with
    its extension, without it, or with ``data.image_extension``)."""
    folded = {name.casefold(): file for name, file in index.items()}
    found = []
    for image_id in missing:
        file = folded.get(image_id.casefold()) or (folded.get((image_id + suffix).casefold()) if suffix else None)
        if file is not None:
            found.append(f"{image_id!r} is {file}")
    return found


def _read_class_folders(cfg: Config, paths: Paths) -> pd.DataFrame:
    root = paths.train_dir
    if root.exists() and not root.is_dir():
        raise PipelineError(f"train folder {root} (config keys data.root, data.train_dir) is a file, not a folder")
    if not root.is_dir():
        raise PipelineError(f"train folder {root} does not exist; set data.root/data.train_dir, "
                            f"or data.train_csv for the CSV layout")
    rows = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for image in sorted(class_dir.iterdir()):
            if image.suffix.lower() in IMAGE_SUFFIXES:
                rows.append((f"{class_dir.name}/{image.stem}", class_dir.name, str(image)))
    if not rows:
        raise PipelineError(f"train folder {root} has no class sub-folders with images "
                            f"({', '.join(IMAGE_SUFFIXES)}); for a CSV layout set data.train_csv")
    table = pd.DataFrame(rows, columns=[cfg.data.id_column, cfg.data.target_columns[0], PATH])
    twins = table[table[cfg.data.id_column].duplicated(keep=False)]
    if len(twins):  # x.png and x.jpg in one class folder: one id, two images
        shown = [" and ".join(Path(p).name for p in group[PATH]) for _, group in twins.groupby(cfg.data.id_column)]
        raise PipelineError(f"{len(shown)} ids in {root} match more than one image: {first_few(shown)} "
                            f"(ids {quoted(twins[cfg.data.id_column].unique())}); keep one file per id")
    return table


def read_train_table(cfg: Config, check_readable: bool = True) -> pd.DataFrame:
    """The validated train table: id, target column(s), optional group column, ``_path``."""
    paths, d = Paths(cfg), cfg.data
    set_image_limit(cfg)
    if d.train_csv is None:
        table = _read_class_folders(cfg, paths)
        source = paths.train_dir
    else:
        source = paths.train_csv
        table = read_csv(source, "train table", key="data.train_csv")
        require_columns(table, [d.id_column], source, "data.id_column")
        require_columns(table, d.target_columns, source, "data.target_columns")
        if d.group_column:
            require_columns(table, [d.group_column], source, "data.group_column")
        table[PATH] = None
        _strip_labels(table, [*d.target_columns] + ([d.group_column] if d.group_column else []))
    _check_ids(table, d.id_column, source)
    table = _drop_excluded(table, cfg, source)
    _check_targets(table, cfg, source)
    if d.train_csv is not None:
        table[PATH] = resolve_image_paths(table[d.id_column], paths.train_dir, d.image_extension, source)
    if check_readable:
        check_images_readable(table, d.id_column, source, verified_dir(cfg))
    return table.reset_index(drop=True)


def exclude_ids_file(cfg: Config) -> Path | None:
    """The ``data.exclude_ids`` CSV: a path relative to ``data.root``, or absolute; None when unset."""
    if not cfg.data.exclude_ids:
        return None
    path = Path(cfg.data.exclude_ids)
    return path if path.is_absolute() else Paths(cfg).data_root / path


def excluded_ids(cfg: Config) -> set[str] | None:
    """The ids ``data.exclude_ids`` drops from the train table (None when unset). Every id listed is
    dropped; in a file with an ``issue`` column (``runs/<exp>/label_issues.csv``), only the rows whose
    ``issue`` is true, so that a copy of that file with some flags set to false keeps those rows."""
    path, id_column = exclude_ids_file(cfg), cfg.data.id_column
    if path is None:
        return None
    frame = read_csv(path, "exclude-ids file", key="data.exclude_ids")
    if id_column not in frame.columns:
        raise PipelineError(f"exclude-ids file {path} (config key data.exclude_ids) has no column '{id_column}' "
                            f"(data.id_column); its columns are: {first_few(list(frame.columns), 20)}; "
                            f"list the train ids to drop under a column named '{id_column}'")
    if "issue" in frame.columns:
        flags = frame["issue"].fillna("").str.strip().str.lower()
        bad = sorted(set(flags) - {"true", "false", "1", "0"})
        if bad:
            raise PipelineError(f"exclude-ids file {path} (config key data.exclude_ids): column 'issue' holds "
                                f"{quoted(bad)}; write True (drop the row) or False (keep it)")
        frame = frame[flags.isin(["true", "1"])]
    return set(frame[id_column].dropna().astype(str))


def _drop_excluded(table: pd.DataFrame, cfg: Config, source) -> pd.DataFrame:
    """The train table without the rows ``data.exclude_ids`` lists (ids it lists must be train ids)."""
    drop = excluded_ids(cfg)
    if drop is None:
        return table
    path, d = exclude_ids_file(cfg), cfg.data
    unknown = sorted(drop - set(table[d.id_column].astype(str)))
    if unknown:
        raise PipelineError(f"exclude-ids file {path} (config key data.exclude_ids) lists {len(unknown)} ids that "
                            f"are not in the train table {source}: {quoted(unknown)}; remove them from the file "
                            f"(ids are matched exactly, extension included)")
    kept = table[~table[d.id_column].astype(str).isin(drop)]
    if d.task in ("binary", "multiclass") and not d.classes:
        lost = sorted(set(table[d.target_columns[0]].dropna()) - set(kept[d.target_columns[0]].dropna()))
        if lost:
            raise PipelineError(f"exclude-ids file {path} (config key data.exclude_ids) drops every train row of "
                                f"class {quoted(lost)}; keep some of them (set their issue to False) or remove "
                                f"those ids from the file")
    if kept.empty:
        raise PipelineError(f"exclude-ids file {path} (config key data.exclude_ids) drops every train row; "
                            f"list only the rows to drop (label_issues.csv: those with issue True)")
    return kept


def _check_targets(table: pd.DataFrame, cfg: Config, source) -> None:
    d = cfg.data
    multilabel_text = d.task == "multilabel" and len(d.target_columns) == 1
    for col in d.target_columns:
        if multilabel_text and not any(lab for text in table[col].dropna() for lab in text.split(d.label_separator)):
            raise PipelineError(f"{source}: target column '{col}' (a multilabel label list) is empty in every row; "
                                f"an empty list means none of the labels, so a table needs labels in some rows: "
                                f"check data.target_columns and data.label_separator")
        if multilabel_text:  # an empty label list (or spaces only) is a row with none of the labels: all negative
            continue
        nan = table[col].isna()
        if nan.any():
            rows = table.loc[nan, d.id_column].tolist()
            raise PipelineError(f"{source}: target column '{col}' is empty for {nan.sum()} rows, ids "
                                f"{quoted(rows)}; fill or drop those rows")
    if d.group_column:
        nan = table[d.group_column].isna()
        if nan.any():
            raise PipelineError(f"{source}: group column '{d.group_column}' is empty for ids "
                                f"{quoted(table.loc[nan, d.id_column])}; fill or drop those rows")


def read_test_table(cfg: Config, check_readable: bool = True) -> pd.DataFrame:
    """The sample submission's ids, in its order, with their test image paths."""
    paths, d = Paths(cfg), cfg.data
    set_image_limit(cfg)
    source = paths.sample_submission
    sample = read_csv(source, "sample submission", key="data.sample_submission")
    require_columns(sample, [d.id_column], source, "data.id_column")
    if sample.empty:
        raise PipelineError(f"sample submission {source} (config key data.sample_submission) has a header and no "
                            f"rows; it defines the test ids: use the competition's sample_submission.csv")
    _check_ids(sample, d.id_column, source)
    table = sample[[d.id_column]].copy()
    table[PATH] = resolve_image_paths(table[d.id_column], paths.test_dir, d.image_extension, source)
    if check_readable:
        check_images_readable(table, d.id_column, source, verified_dir(cfg))
    return table


def task_spec(cfg: Config, table: pd.DataFrame) -> TaskSpec:
    d = cfg.data
    return TaskSpec.from_table(table, d.task, d.target_columns, d.classes, d.label_separator, d.id_column,
                               d.positive_class)


REMAKE_FOLDS = "remake them with `make folds CONFIG=... ARGS=--force` (python -m pipeline folds -c CFG --force)"


def _check_folds_current(folds: pd.DataFrame, train: pd.DataFrame, cfg: Config, source) -> None:
    """The folds file's targets and groups must still equal the train table's: every stage trains
    and scores on the folds file's copy, so a label corrected in train.csv after `make folds`
    would otherwise be silently ignored (and a changed group could leak across folds)."""
    d = cfg.data
    columns = [*d.target_columns] + ([d.group_column] if d.group_column else [])
    if d.group_column and d.group_column not in folds.columns:
        raise PipelineError(f"{source} has no group column '{d.group_column}' (data.group_column): it was made "
                            f"without groups; {REMAKE_FOLDS}")
    current = train.set_index(d.id_column).loc[folds[d.id_column], columns]
    for col in columns:
        old = folds[col].fillna("").astype(str).to_numpy()
        new = current[col].fillna("").astype(str).to_numpy()
        differ = np.flatnonzero(old != new)
        if len(differ):
            i = differ[0]
            ids = folds[d.id_column].to_numpy()[differ]
            raise PipelineError(f"{source} is stale: column '{col}' differs from the train table for {len(differ)} "
                                f"rows, ids {first_few(map(repr, ids))} (id {ids[0]!r}: {old[i]!r} in the folds file, "
                                f"{new[i]!r} in the train table); {REMAKE_FOLDS}")


def read_folds(cfg: Config) -> pd.DataFrame:
    """The folds file joined with image paths; checks its contract against the train table."""
    paths, d = Paths(cfg), cfg.data
    source = paths.folds_csv
    if not source.exists():
        raise PipelineError(f"folds file {source} does not exist; run `make folds CONFIG=...` first")
    folds = read_csv(source, "folds file")
    require_columns(folds, [d.id_column, *d.target_columns, "fold"], source, "folds file contract")
    train = read_train_table(cfg, check_readable=False)
    if len(folds) != len(train) or set(folds[d.id_column]) != set(train[d.id_column]):
        raise PipelineError(f"{source} does not match the train table ({len(folds)} vs {len(train)} rows); "
                            f"the data changed: {REMAKE_FOLDS}")
    _check_folds_current(folds, train, cfg, source)
    folds["fold"] = folds["fold"].astype(int)
    return folds.merge(train[[d.id_column, PATH]], on=d.id_column, how="left", validate="one_to_one")
