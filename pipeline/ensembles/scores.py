"""Scores of every model and ensemble: their cv.json files read into leaderboard rows, the honest
score each is ranked by, and the submissions log."""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import tracking
from pipeline.config.paths import Paths
from pipeline.config.schema import Config
from pipeline.core import artifacts
from pipeline.core.errors import PipelineError, first_few
from pipeline.domain.metrics import get_metric

COLUMNS = ["experiment", "model", "kind", "metric", "score", "cv_mean", "cv_std", "oof", "nested_cv", "cv_untuned",
           "honesty", "public_lb", "submission", "created_at", "lrs", "run_id"]


LOG_COLUMNS = ["created_at", "experiment", "competition", "file", "message", "status", "public_lb", "private_lb"]


LOG_SCORES = ("public_lb", "private_lb")


def read_submissions_log(cfg: Config) -> pd.DataFrame:
    """``submissions/submissions_log.csv`` (``LOG_COLUMNS``); empty when nothing was submitted yet."""
    path = Paths(cfg).submissions_log
    if not path.exists():
        return pd.DataFrame({c: pd.Series(dtype=object) for c in LOG_COLUMNS})
    try:
        log = pd.read_csv(path, dtype=object, keep_default_na=False, na_values=[""])  # a message "None" is text
    except Exception as exc:  # pandas raises many types for malformed files
        raise PipelineError(f"submissions log {path} could not be read as CSV: {exc}; fix or delete it") from None
    log = log.reindex(columns=LOG_COLUMNS).astype(object)
    for col in LOG_SCORES:
        log[col] = pd.to_numeric(log[col], errors="coerce")
    return log


def _number(value) -> float:
    try:
        return float(value) if value is not None else float("nan")
    except (TypeError, ValueError):
        return float("nan")


def read_cv(path: Path) -> dict:
    """A ``cv.json``, checked for the keys the leaderboard needs."""
    try:
        cv = artifacts.read_json(path)
    except ValueError as exc:
        raise PipelineError(f"{path} is not valid JSON ({exc}); re-run the stage that wrote it with --force") from None
    missing = [k for k in ("metric", "folds", "oof") if k not in cv]
    if missing:
        raise PipelineError(f"{path} lacks keys {first_few(missing)}; re-run the stage that wrote it with --force")
    cv["folds"] = [_number(s) for s in cv["folds"]]
    return cv


def public_score(log: pd.DataFrame, submission: Path) -> float:
    """The newest public score logged for a submission file (matched by file name); NaN if none."""
    if not len(log):
        return float("nan")
    names = log["file"].map(lambda f: Path(str(f)).name)
    rows = log[(names == submission.name) & log["public_lb"].notna()]
    return float(rows.sort_values("created_at")["public_lb"].iloc[-1]) if len(rows) else float("nan")


def _created_at(cv: dict, path: Path) -> str:
    stamp = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
    return str(cv.get("created_at") or stamp)


def lr_note(backbone_dir: Path) -> str:
    """``tuned: frozen 1e-02, unfrozen 2e-03, backbone x0.5`` from the backbone's ``lr_source.json``."""
    path = backbone_dir / "lr_source.json"
    if not path.exists():
        return ""
    src = artifacts.read_json(path)
    origin = "config" if src.get("lr_source", "config") == "config" else "tuned"
    parts = [f"frozen {src['frozen_lr']:.0e}" if "frozen_lr" in src else "",
             f"unfrozen {src['unfrozen_lr']:.0e}" if "unfrozen_lr" in src else "",
             f"backbone x{src['backbone_lr_mult']:.2g}" if "backbone_lr_mult" in src else ""]
    return f"{origin}: " + ", ".join(p for p in parts if p)


def mean_std(scores: list[float]) -> tuple[float, float]:
    finite = [s for s in scores if np.isfinite(s)]
    return (float(np.mean(finite)), float(np.std(finite))) if finite else (float("nan"), float("nan"))


def honest_score(frame: pd.DataFrame) -> pd.Series:
    """Per row: ``nested_cv`` where there is one (ensembles; for ``mean``/``rank``, which learn
    nothing, it equals ``cv_mean``), else ``cv_mean`` (backbones)."""
    nested = pd.to_numeric(frame["nested_cv"], errors="coerce").astype(float)
    return nested.fillna(pd.to_numeric(frame["cv_mean"], errors="coerce"))


def ranked(frame: pd.DataFrame, greater_is_better: bool) -> pd.DataFrame:
    """Rows best first by ``score``. On a tie an ensemble comes before a single model, then the
    lower ``cv_std``: the blend of several models varies less from test set to test set, and
    equal scores are common with accuracy on a few hundred rows (on the steel development set
    the mean of three probes and its best member tied at 0.9967 CV; the member, listed first,
    scored 0.9667 on the hidden test, the mean 0.9833: docs/ensembles.md)."""
    keys = pd.DataFrame({"score": pd.to_numeric(frame["score"], errors="coerce"),
                         "single": (frame["kind"] != "ensemble").astype(int),
                         "std": pd.to_numeric(frame["cv_std"], errors="coerce")}, index=frame.index)
    order = keys.sort_values(["score", "single", "std"], ascending=[not greater_is_better, True, True],
                             na_position="last", kind="stable").index
    return frame.loc[order]


def honesty(cv: dict, kind: str, members: list[dict] | None = None) -> str:
    """How far a row's score can be trusted, in a few words, naming every selection its score
    includes: for a backbone, whether its epochs were picked on the rows it is scored on, whether
    its LRs were tuned and whether unfreezing was decided on some of its folds (``cv_untuned`` is
    then the CV of the others); an ensemble's nested CV covers the blend, and it inherits what its
    members' scores include (``members``: their cv.json)."""
    if kind == "ensemble":
        blend = "nested CV" if cv.get("nested_cv") is not None else "plain average"
        inherited = [part for part in dict.fromkeys(p for m in members or [] for p in _selections(m))]
        if not inherited:
            return f"{blend}; members on untouched folds" if members else blend
        return f"optimistic: {blend} of members whose " + "; ".join(inherited)
    parts = _selections(cv)
    return "optimistic: " + "; ".join(parts) if parts else "untouched folds"


def _selections(cv: dict) -> list[str]:
    """The selections on validation rows a model's CV includes."""
    parts = []
    if str(cv.get("selection", "")).startswith("optimistic"):
        parts.append("epoch picked on validation")
    if cv.get("tuned_folds"):
        parts.append(f"LRs tuned on folds {cv['tuned_folds']}")
    if cv.get("decided_folds"):
        parts.append(f"unfreezing decided on folds {cv['decided_folds']}")
    return parts


def _entries(cfg: Config) -> list[tuple[str, str, Path, Path, Path]]:
    """(model, kind, cv.json, submission, oof.csv) of every configured backbone and ensemble method."""
    paths = Paths(cfg)
    models = {**cfg.models(seed_mean=False), **cfg.seed_groups()}  # every variant, and each seeds: entry's mean
    rows = [(m, "backbone", paths.cv_json(m), paths.submission(m), paths.oof_csv(m)) for m in models]
    rows += [(m, "ensemble", paths.ensemble_method_dir(m) / "cv.json", paths.submission(m),
              paths.ensemble_method_dir(m) / "oof.csv") for m in cfg.ensemble.methods]
    return rows


def collect(cfg: Config) -> tuple[pd.DataFrame, dict[str, list[float]], dict[str, Path]]:
    """This experiment's rows (sorted), per-fold scores and OOF files, keyed by model."""
    log, rows, folds, oofs = read_submissions_log(cfg), [], {}, {}
    for model, kind, cv_path, submission, oof in _entries(cfg):
        if not cv_path.exists():
            continue
        cv = read_cv(cv_path)
        members = [read_cv(Paths(cfg).cv_json(m)) for m in cv.get("models", []) if Paths(cfg).cv_json(m).exists()]
        mean, std = mean_std(cv["folds"])
        rows.append({"experiment": cfg.name, "model": model, "kind": kind, "metric": cv["metric"],
                     "cv_mean": mean, "cv_std": std, "oof": _number(cv["oof"]),
                     "nested_cv": _number(cv.get("nested_cv")) if kind == "ensemble" else float("nan"),
                     "cv_untuned": _number(cv.get("cv_untuned")),
                     "honesty": honesty(cv, kind, members if kind == "ensemble" else None),
                     "public_lb": public_score(log, submission),
                     "submission": str(submission) if submission.exists() else "",
                     "created_at": _created_at(cv, cv_path),
                     "lrs": lr_note(cv_path.parent) if kind == "backbone" else "",
                     "run_id": tracking.run_id_for(cfg, model) or ""})  # tracking.backend's run
        folds[model], oofs[model] = cv["folds"], oof
    if not rows:
        raise PipelineError(f"no cv.json for experiment '{cfg.name}' under {Paths(cfg).exp_dir}; "
                            f"run `make train-folds` (and `make ensemble`) first")
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["score"] = honest_score(frame)
    greater = get_metric(cfg.metric).greater_is_better
    other = sorted(set(frame["metric"]) - {cfg.metric})
    if other:
        print(f"leaderboard: note: some rows were scored on {', '.join(other)}, not metric '{cfg.metric}'; "
              f"re-run train/ensemble with --force to compare like with like")
    return ranked(frame, greater), folds, oofs
