"""Leaderboard stage: every backbone and ensemble of an experiment side by side on the metric.

Reads each backbone's ``cv.json``, each ensemble method's ``runs/<exp>/ensemble/<method>/cv.json``
and the public scores that ``lb-sync`` put into ``submissions/submissions_log.csv``. Writes
``submissions/leaderboard.csv`` (rows of other experiments already there are kept, this
experiment's are replaced), a Markdown copy ``leaderboard.md`` and ``leaderboard.png`` (per-fold
scores with mean and spread; correlation of the models' OOF predictions: low correlation between
good models is what makes an ensemble gain).

Columns: ``experiment, model, kind (backbone|ensemble), metric, score, cv_mean, cv_std, oof,
nested_cv (ensembles: the honest score of what the ensemble learned), public_lb (when known),
submission (its CSV, when it exists), created_at, lrs`` (backbones: the learning rates they trained
with and their source, ``tuned`` or ``config``, from ``lr_source.json``); this experiment's rows
sorted by ``score`` in the metric's direction. ``score`` is the honest number to compare: an
ensemble's ``nested_cv`` (a blend fitted on OOF rows scores itself optimistically on them), a
backbone's ``cv_mean``.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import artifacts, tracking
from pipeline.config import Config
from pipeline.errors import PipelineError, first_few
from pipeline.metrics import get_metric
from pipeline.paths import Paths

COLUMNS = ["experiment", "model", "kind", "metric", "score", "cv_mean", "cv_std", "oof", "nested_cv", "cv_untuned",
           "honesty", "public_lb", "submission", "created_at", "lrs", "run_id"]
LOG_COLUMNS = ["created_at", "experiment", "competition", "file", "message", "status", "public_lb", "private_lb"]
LOG_SCORES = ("public_lb", "private_lb")


# ---------------------------------------------------------------------------- inputs


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


def _stats(scores: list[float]) -> tuple[float, float]:
    finite = [s for s in scores if np.isfinite(s)]
    return (float(np.mean(finite)), float(np.std(finite))) if finite else (float("nan"), float("nan"))


def honest_score(frame: pd.DataFrame) -> pd.Series:
    """Per row: ``nested_cv`` where there is one (ensembles; for ``mean``/``rank``, which learn
    nothing, it equals ``cv_mean``), else ``cv_mean`` (backbones)."""
    nested = pd.to_numeric(frame["nested_cv"], errors="coerce").astype(float)
    return nested.fillna(pd.to_numeric(frame["cv_mean"], errors="coerce"))


def honesty(cv: dict, kind: str) -> str:
    """How far a row's score can be trusted, in a few words: nested CV for fitted blends; for a
    backbone, whether its epochs were picked on the rows it is scored on and whether its LRs were
    tuned on some of its folds (``cv_untuned`` is then the CV of the others)."""
    if kind == "ensemble":
        return "nested CV" if cv.get("nested_cv") is not None else "plain average"
    parts = ["optimistic: epoch picked on validation" if str(cv.get("selection", "")).startswith("optimistic")
             else "untouched folds"]
    if cv.get("tuned_folds"):
        parts.append(f"LRs tuned on folds {cv['tuned_folds']}")
    return "; ".join(parts)


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
        mean, std = _stats(cv["folds"])
        rows.append({"experiment": cfg.name, "model": model, "kind": kind, "metric": cv["metric"],
                     "cv_mean": mean, "cv_std": std, "oof": _number(cv["oof"]),
                     "nested_cv": _number(cv.get("nested_cv")) if kind == "ensemble" else float("nan"),
                     "cv_untuned": _number(cv.get("cv_untuned")), "honesty": honesty(cv, kind),
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
    return frame.sort_values("score", ascending=not greater, na_position="last", kind="stable"), folds, oofs


def merge(cfg: Config, mine: pd.DataFrame) -> pd.DataFrame:
    """This experiment's rows first, then the other experiments' rows already in the leaderboard."""
    path = Paths(cfg).leaderboard_csv
    if not path.exists():
        return mine.reset_index(drop=True)
    try:
        old = pd.read_csv(path, dtype={"experiment": str, "model": str, "submission": str},
                          keep_default_na=False, na_values=[""])  # an experiment or model "NA" is a name
    except Exception as exc:
        raise PipelineError(f"leaderboard {path} could not be read as CSV: {exc}; delete it to rebuild") from None
    if "experiment" not in old.columns:
        raise PipelineError(f"leaderboard {path} has no 'experiment' column; delete it to rebuild")
    others = old[old["experiment"] != cfg.name].reindex(columns=COLUMNS)
    others["score"] = others["score"].fillna(honest_score(others))  # rows written before the column existed
    return pd.concat([mine, others], ignore_index=True) if len(others) else mine.reset_index(drop=True)


# ---------------------------------------------------------------------------- outputs


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if np.isnan(value) else f"{value:.4f}"
    return str(value)


def to_markdown(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (no extra dependency)."""
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines) + "\n"


def oof_correlations(oofs: dict[str, Path], id_column: str) -> tuple[list[str], np.ndarray | None]:
    """Pearson correlation of the models' flattened OOF prediction columns, on their common ids."""
    frames = {}
    for model, path in oofs.items():
        if path.exists():
            frame = pd.read_csv(path, dtype={id_column: str}, keep_default_na=False, na_values=[""])  # id "NA"
            if id_column in frame.columns:
                frames[model] = frame.set_index(id_column)[[c for c in frame.columns if c.startswith("pred")]]
    if len(frames) < 2:
        return list(frames), None
    common = sorted(set.intersection(*(set(f.index) for f in frames.values())))
    vectors = [f.loc[common].to_numpy(np.float64).ravel() for f in frames.values()]
    if len({len(v) for v in vectors}) != 1 or not len(common):
        return list(frames), None
    return list(frames), np.corrcoef(vectors)


def plot_leaderboard(mine: pd.DataFrame, folds: dict, oofs: dict, id_column: str, path: Path) -> Path:
    """Left: per-fold scores, mean and std per model; right: OOF correlation heatmap."""
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas

    labels = [f"{m} [ens]" if k == "ensemble" else m for m, k in zip(mine["model"], mine["kind"])]
    fig = Figure(figsize=(14, 1.5 + 0.45 * max(len(labels), 4)), layout="constrained")
    left, right = fig.subplots(1, 2, width_ratios=[1.2, 1])
    for y, model in enumerate(mine["model"]):
        scores = np.asarray(folds[model], dtype=np.float64)
        left.scatter(scores, np.full(len(scores), y), s=18, alpha=0.6, color="tab:blue")
        mean, std = _stats(list(scores))
        left.errorbar(mean, y, xerr=std, fmt="D", color="tab:red", capsize=4)
    left.set_yticks(range(len(labels)), labels)
    left.invert_yaxis()
    left.set_xlabel(f"{mine['metric'].iloc[0]} per fold (diamond: mean, bar: +- std)")
    left.grid(axis="x", alpha=0.3)
    names, corr = oof_correlations(oofs, id_column)
    if corr is None:
        right.text(0.5, 0.5, "correlation needs two models with oof.csv", ha="center", va="center")
        right.set_axis_off()
    else:
        low = min(float(np.nanmin(corr)), 0.99)
        image = right.imshow(corr, cmap="viridis", vmin=low, vmax=1.0)
        right.set_xticks(range(len(names)), names, rotation=45, ha="right")
        right.set_yticks(range(len(names)), names)
        for i, j in np.ndindex(corr.shape if len(names) <= 12 else (0, 0)):
            color = "k" if corr[i, j] > (low + 1.0) / 2 else "w"  # readable on light and dark cells
            right.text(j, i, f"{corr[i, j]:.3f}", ha="center", va="center", color=color, fontsize=8)
        fig.colorbar(image, ax=right, label="OOF prediction correlation")
    with artifacts.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def run_leaderboard(cfg: Config) -> Path:
    """Build ``submissions/leaderboard.csv`` (+ ``.md``, ``.png``) and print this experiment's rows."""
    path = Paths(cfg).leaderboard_csv
    mine, folds, oofs = collect(cfg)
    board = merge(cfg, mine)
    artifacts.write_csv(path, board)
    artifacts.write_text(path.with_suffix(".md"), to_markdown(board))
    plot_leaderboard(mine, folds, oofs, cfg.data.id_column, path.with_suffix(".png"))
    direction = "higher" if get_metric(cfg.metric).greater_is_better else "lower"
    print(f"leaderboard for {cfg.name} ({cfg.metric}, {direction} is better):")
    print(mine.drop(columns=["experiment"]).to_string(index=False, na_rep="", float_format=lambda x: f"{x:.4f}"))
    print(f"leaderboard: wrote {path} (+ .md, .png)")
    return path
