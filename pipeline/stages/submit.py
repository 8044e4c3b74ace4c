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
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config.paths import Paths
from pipeline.config.schema import Config
from pipeline.core import artifacts
from pipeline.core.errors import PipelineError, first_few
from pipeline.data.tables import read_csv, require_columns
from pipeline.domain.metrics import get_metric
from pipeline.domain.tasks import TaskSpec
from pipeline.ensembles.scores import LOG_COLUMNS, honest_score, ranked, read_submissions_log
from pipeline.ensembles.submission import (
    SubmissionFormat,
    load_spec,
    read_sample,
    submission_format,
    validate_submission,
)

KAGGLE_HELP = ("install it with `pip install kaggle` (into .venv or anywhere on PATH) and put your API token in "
               "~/.kaggle/kaggle.json (kaggle.com > Settings > API > Create New Token), or set "
               "KAGGLE_USERNAME and KAGGLE_KEY")


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
    (the command line then rebuilds the leaderboard). Returns the log's path."""
    competition, exe = _competition(cfg), _kaggle_cli()
    log = read_submissions_log(cfg)
    if not len(log):
        print(f"lb-sync: {Paths(cfg).submissions_log} lists no submissions yet; send one with `make submit`")
        return Paths(cfg).submissions_log
    remote = parse_kaggle_submissions(_run_kaggle(exe, ["competitions", "submissions", competition, "-v"]).stdout)
    log, matched = match_scores(log, remote, competition)
    artifacts.write_csv(Paths(cfg).submissions_log, log.reindex(columns=LOG_COLUMNS))
    scored = int(log["public_lb"].notna().sum())
    print(f"lb-sync: matched {matched} logged submissions to {len(remote)} on Kaggle; {scored} have a public score")
    return Paths(cfg).submissions_log


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
    best = ranked(board, get_metric(metric_name).greater_is_better).iloc[0]
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
