"""Submissions: format predictions exactly like the sample submission, validate, send, score.

The sample submission (``data.sample_submission``) decides the file: its columns in its order,
its ids in its order. What the value columns hold follows from the task, the sample's columns
and ``submission.format`` (auto | labels | probabilities):

* multiclass: one target column -> the class label (argmax); one column per class ->
  probabilities (``format: labels``: one-hot 0/1);
* binary: one target column -> the label (p >= 0.5), or the probability when
  ``format: probabilities`` or ``auto`` with a probability metric (roc_auc, log_loss); one column
  per class -> probabilities (``format: labels``: one-hot 0/1);
* multilabel: one target column -> the labels whose probability reaches the label's threshold,
  joined by ``data.label_separator`` ("" when none); one column per label -> 0/1 at the
  thresholds, or probabilities when ``format: probabilities`` or ``auto`` with a probability metric;
* regression: the value.

Labels are written in the original spelling (``TaskSpec.classes``). Multilabel thresholds are tuned
per label on OOF to maximise F1 by the ensemble stage (stored in its ``cv.json`` / ``backbones.json``).

``run_submit`` and ``run_lb_sync`` drive the official ``kaggle`` command line tool; every submission
sent is appended to ``submissions/submissions_log.csv``, whose ``public_lb`` column ``lb-sync`` fills.

Example
-------
>>> frame = format_submission(cfg, spec, ids, probabilities)  # doctest: +SKIP
>>> validate_submission(cfg, spec, frame, "submissions/demo-mean.csv")  # doctest: +SKIP
"""
from __future__ import annotations

import io
import shutil
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import artifacts
from pipeline.config import Config
from pipeline.data import read_csv, read_train_table, require_columns, task_spec
from pipeline.errors import PipelineError, first_few
from pipeline.leaderboard import LOG_COLUMNS, honest_score, read_submissions_log, run_leaderboard
from pipeline.metrics import get_metric, hard_labels
from pipeline.paths import Paths
from pipeline.tasks import TaskSpec

KINDS = ("labels", "label_lists", "probabilities", "indicators", "values")
KAGGLE_HELP = ("install it with `pip install kaggle` (into .venv or anywhere on PATH) and put your API token in "
               "~/.kaggle/kaggle.json (kaggle.com > Settings > API > Create New Token), or set "
               "KAGGLE_USERNAME and KAGGLE_KEY")


@dataclass(frozen=True)
class SubmissionFormat:
    """The sample submission's layout and what its value columns hold (one of ``KINDS``)."""

    id_column: str
    columns: tuple[str, ...]  # all columns, the sample's order
    value_columns: tuple[str, ...]
    per_class: bool  # one column per class / label
    kind: str


# ---------------------------------------------------------------------------- the format


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


# ---------------------------------------------------------------------------- validation


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


# ---------------------------------------------------------------------------- kaggle CLI


def load_spec(cfg: Config) -> TaskSpec:
    """The task spec from the folds file, or from the train table when folds are not made yet."""
    paths = Paths(cfg)
    if paths.folds_csv.exists():
        return task_spec(cfg, read_csv(paths.folds_csv, "folds file"))
    return task_spec(cfg, read_train_table(cfg, check_readable=False))


def _competition(cfg: Config) -> str:
    if not cfg.submission.competition:
        raise PipelineError("config key 'submission.competition' is not set; set it to the competition's slug "
                            "(the name in kaggle.com/competitions/<slug>) in the YAML file, or on the command line: "
                            "ARGS=\"submission.competition=<slug>\"")
    return cfg.submission.competition


def _kaggle_cli() -> str:
    exe = shutil.which("kaggle")
    if exe is None:
        raise PipelineError(f"the `kaggle` command line tool is not on PATH; {KAGGLE_HELP}")
    return exe


def _run_kaggle(exe: str, args: list[str]) -> subprocess.CompletedProcess:
    """Run the kaggle CLI (argument list, no shell); a clear error with its output when it fails."""
    try:
        result = subprocess.run([exe, *args], capture_output=True, text=True)
    except OSError as exc:
        raise PipelineError(f"could not run {exe}: {exc}; {KAGGLE_HELP}") from None
    if result.returncode != 0:
        output = (result.stderr.strip() or result.stdout.strip() or "(no output)")[-2000:]
        raise PipelineError(f"`kaggle {' '.join(args)}` failed (exit {result.returncode}):\n{output}\n"
                            f"check the competition slug, that you accepted its rules on kaggle.com, and your API "
                            f"token (~/.kaggle/kaggle.json or KAGGLE_USERNAME/KAGGLE_KEY)")
    return result


def _append_log(cfg: Config, row: dict) -> Path:
    log = read_submissions_log(cfg)
    log = pd.concat([log, pd.DataFrame([row])], ignore_index=True) if len(log) else pd.DataFrame([row])
    return artifacts.write_csv(Paths(cfg).submissions_log, log.reindex(columns=LOG_COLUMNS))


def run_submit(cfg: Config, file, message: str) -> Path:
    """Validate ``file`` against the sample submission and send it with ``kaggle competitions submit``.

    A successful submission is appended to ``submissions/submissions_log.csv``.
    """
    path = Path(file)
    competition, exe = _competition(cfg), _kaggle_cli()
    spec = load_spec(cfg)
    validate_submission(cfg, spec, read_csv(path, "submission"), path)
    result = _run_kaggle(exe, ["competitions", "submit", competition, "-f", str(path), "-m", message])
    print(result.stdout.strip())
    if "success" not in result.stdout.lower():
        print("submit: note: kaggle did not confirm the submission in its output; check it with `make lb-sync`")
    _append_log(cfg, {"created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      "experiment": cfg.name, "competition": competition, "file": str(path), "message": message,
                      "status": "submitted"})
    print(f"submit: sent {path} to {competition}; logged in {Paths(cfg).submissions_log}")
    return path


def parse_kaggle_submissions(text: str) -> pd.DataFrame:
    """The CSV that ``kaggle competitions submissions <c> -v`` prints (lines before its header skipped)."""
    lines = text.lstrip("\ufeff").splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("fileName")), None)
    if start is None:
        raise PipelineError(f"could not read the kaggle CLI's submissions list: no 'fileName' CSV header in its "
                            f"output, which starts: {text[:300]!r}; update the CLI (pip install -U kaggle)")
    frame = pd.read_csv(io.StringIO("\n".join(lines[start:])), dtype=str, keep_default_na=False)
    require_columns(frame, ["fileName", "date", "description", "status", "publicScore"], "kaggle CLI output",
                    "kaggle competitions submissions -v")
    return frame


def _status(text: str) -> str:
    return str(text).split(".")[-1].lower()  # "SubmissionStatus.COMPLETE" or "complete"


def match_scores(log: pd.DataFrame, remote: pd.DataFrame, competition: str) -> tuple[pd.DataFrame, int]:
    """Copy Kaggle's status and scores into the log rows of ``competition``, matched by file name
    and message; repeats of the same pair are matched newest to newest. Returns (log, matches)."""
    log = log.copy()
    remote = remote.assign(_key=list(zip(remote["fileName"], remote["description"])))
    remote = remote.sort_values("date", ascending=False, kind="stable")
    mine = log[log["competition"].astype(str) == competition]
    groups: dict[tuple, list] = {}
    for i, name, message in zip(mine.index, mine["file"].astype(str), mine["message"].fillna("")):
        groups.setdefault((Path(name).name, str(message)), []).append(i)
    matched = 0
    for key, rows in groups.items():
        newest_first = log.loc[rows].sort_values("created_at", ascending=False, kind="stable").index
        for i, (_, r) in zip(newest_first, remote[remote["_key"] == key].iterrows()):
            log.loc[i, "status"] = _status(r["status"])
            log.loc[i, "public_lb"] = pd.to_numeric(r["publicScore"], errors="coerce")
            log.loc[i, "private_lb"] = pd.to_numeric(r.get("privateScore", ""), errors="coerce")
            matched += 1
    return log, matched


def run_lb_sync(cfg: Config) -> Path:
    """Fetch public scores with ``kaggle competitions submissions <c> -v`` into the submissions log,
    then rebuild the leaderboard. Returns the leaderboard path."""
    competition, exe = _competition(cfg), _kaggle_cli()
    log = read_submissions_log(cfg)
    if not len(log):
        print(f"lb-sync: {Paths(cfg).submissions_log} lists no submissions yet; send one with `make submit`")
        return run_leaderboard(cfg)
    remote = parse_kaggle_submissions(_run_kaggle(exe, ["competitions", "submissions", competition, "-v"]).stdout)
    log, matched = match_scores(log, remote, competition)
    artifacts.write_csv(Paths(cfg).submissions_log, log.reindex(columns=LOG_COLUMNS))
    scored = int(log["public_lb"].notna().sum())
    print(f"lb-sync: matched {matched} logged submissions to {len(remote)} on Kaggle; {scored} have a public score")
    return run_leaderboard(cfg)


# ---------------------------------------------------------------------------- local scoring


def _truth(fmt: SubmissionFormat, spec: TaskSpec, solution: pd.DataFrame) -> np.ndarray:
    """Encoded targets from a solution file laid out like the sample submission."""
    if fmt.per_class:
        values = solution[list(spec.classes)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)
        if spec.task == "multiclass":
            return values.argmax(axis=1)
        return values[:, 1] if spec.task == "binary" else values
    frame = solution.rename(columns={fmt.value_columns[0]: spec.target_columns[0]})
    if spec.task == "multilabel":
        frame[spec.target_columns[0]] = frame[spec.target_columns[0]].fillna("")
    return spec.encode(frame)


def _predictions(fmt: SubmissionFormat, spec: TaskSpec, submission: pd.DataFrame) -> np.ndarray:
    """What the metric takes (probabilities, 0/1 or values) from a validated submission."""
    if fmt.per_class:
        values = submission[list(spec.classes)].apply(pd.to_numeric).to_numpy(np.float64)
        return values[:, 1] if spec.task == "binary" else values
    col = submission[fmt.value_columns[0]]
    if fmt.kind in ("values", "probabilities"):
        return pd.to_numeric(col).to_numpy(np.float64)
    frame = pd.DataFrame({spec.target_columns[0]: col.fillna("") if fmt.kind == "label_lists" else col})
    codes = spec.encode(frame)
    return np.eye(len(spec.classes))[codes] if spec.task == "multiclass" else codes.astype(np.float64)


def _best_cv(cfg: Config, metric_name: str) -> str:
    path = Paths(cfg).leaderboard_csv
    if not path.exists():
        return "no leaderboard yet (make leaderboard)"
    board = pd.read_csv(path, keep_default_na=False, na_values=[""])  # an experiment named "NA" is a name
    board = board[(board["experiment"].astype(str) == cfg.name) & (board["metric"] == metric_name)]
    if "score" not in board.columns:  # a leaderboard written before the column existed
        board = board.assign(score=honest_score(board))
    board = board.dropna(subset=["score"])
    if not len(board):
        return f"no {metric_name} CV on the leaderboard for {cfg.name}"
    best = board.sort_values("score", ascending=not get_metric(metric_name).greater_is_better).iloc[0]
    kind = "nested CV" if pd.notna(best.get("nested_cv")) else "CV"
    return f"best CV on the leaderboard: {best['model']} {best['score']:.4f} ({kind})"


def run_score(cfg: Config, file, solution) -> float:
    """Score a submission CSV against a solution CSV (the sample's layout) on ``cfg.metric``.

    Label submissions of a probability metric (roc_auc, log_loss) are scored on accuracy instead,
    with a note. Prints the score beside the best CV on the leaderboard; returns the score.
    """
    spec, sample = load_spec(cfg), read_sample(cfg)
    fmt = submission_format(cfg, spec, sample)
    submission = read_csv(Path(file), "submission")
    validate_submission(cfg, spec, submission, file, sample)
    truth = read_csv(Path(solution), "solution file")
    require_columns(truth, list(fmt.columns), solution, "solution file: the sample submission's columns")
    ids = submission[fmt.id_column].astype(str)
    missing = ids[~ids.isin(truth[fmt.id_column].astype(str))]
    if len(missing):
        raise PipelineError(f"solution file {solution} lacks ids {first_few(missing)} of the submission {file}")
    truth = truth.set_index(truth[fmt.id_column].astype(str)).loc[ids].reset_index(drop=True)
    metric = get_metric(cfg.metric, spec.task)
    if metric.needs_probabilities and fmt.kind in ("labels", "label_lists", "indicators"):
        print(f"score: note: {file} holds labels, not probabilities; {metric.name} is not meaningful on labels, "
              f"scoring accuracy instead")
        metric = get_metric("accuracy", spec.task)
    value = metric(_truth(fmt, spec, truth), _predictions(fmt, spec, submission), spec.task)
    print(f"score: {Path(file).name} {metric.name} {value:.4f} | {_best_cv(cfg, metric.name)}")
    return value
