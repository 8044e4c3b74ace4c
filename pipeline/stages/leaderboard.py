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

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config.paths import Paths
from pipeline.config.schema import Config
from pipeline.core import artifacts
from pipeline.core.errors import PipelineError
from pipeline.domain.metrics import get_metric
from pipeline.ensembles.scores import COLUMNS, collect, honest_score, mean_std


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
        mean, std = mean_std(list(scores))
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
