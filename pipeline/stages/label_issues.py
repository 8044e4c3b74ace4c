"""``python -m pipeline label-issues -c CFG [--model M]``: train rows whose given label a trained model's
out-of-fold probabilities contradict, ranked with cleanlab (:mod:`pipeline.ensembles.label_issues`).

Reads ``runs/<exp>/<model>/oof.csv`` (default: the model with the best fold-mean CV in its
``cv.json``; ``--model`` takes a model id or an ensemble method) and the folds file. Writes
``runs/<exp>/label_issues.csv`` (``<id>, given_label, predicted_label, label_quality, issue, rank``, most
suspect first) and ``runs/<exp>/label_issues.png`` (the top suspects with their labels). A copy of the
CSV is what ``data.exclude_ids`` reads: the rows whose ``issue`` is true are dropped from the train table.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pipeline.config.paths import Paths
from pipeline.config.schema import Config
from pipeline.core import artifacts
from pipeline.core.errors import PipelineError, first_few
from pipeline.data.images import PATH
from pipeline.data.tables import read_csv, read_folds, task_spec
from pipeline.ensembles.label_issues import check_contract, check_task, plot_suspects, rank_label_issues
from pipeline.ensembles.scores import read_cv

CSV, PNG = "label_issues.csv", "label_issues.png"
TOP = 5  # suspects printed


def best_model(cfg: Config) -> tuple[str, float]:
    """The model id whose ``cv.json`` has the best fold mean (``cv_mean``) in the metric's direction."""
    paths, scored = Paths(cfg), []
    for name in cfg.models():
        if paths.cv_json(name).exists() and paths.oof_csv(name).exists():
            cv = read_cv(paths.cv_json(name))
            mean = cv.get("cv_mean", float(np.nanmean(cv["folds"])))
            if mean is not None and math.isfinite(mean):
                scored.append((-mean if cv.get("greater_is_better", True) else mean, name, mean))
    if not scored:
        raise PipelineError(f"no model of {cfg.name} has OOF predictions yet (looked for "
                            f"{paths.oof_csv(next(iter(cfg.models())))} and the like); run `make train-folds` first")
    _, name, mean = min(scored)
    return name, mean


def oof_path(cfg: Config, model: str) -> Path:
    """A model id's ``oof.csv``, or an ensemble method's."""
    paths = Paths(cfg)
    for path in (paths.oof_csv(model), paths.ensemble_method_dir(model) / "oof.csv"):
        if path.exists():
            return path
    known = [m for m in cfg.models() if paths.oof_csv(m).exists()]
    known += [m for m in cfg.ensemble.methods if (paths.ensemble_method_dir(m) / "oof.csv").exists()]
    raise PipelineError(f"--model {model}: no {paths.oof_csv(model)} (nor an ensemble method's oof.csv); models "
                        f"with OOF predictions: {first_few(known) or 'none (run make train-folds)'}")


def run_label_issues(cfg: Config, model: str | None = None, force: bool = False) -> Path:
    """Write ``runs/<exp>/label_issues.{csv,png}``; skipped when the OOF file and folds are unchanged."""
    paths, id_col = Paths(cfg), cfg.data.id_column
    check_task(cfg.data.task)
    folds = read_folds(cfg)
    spec = task_spec(cfg, folds)
    cv_note = ""
    if model is None:
        model, mean = best_model(cfg)
        cv_note = f", the best CV ({mean:.4f})"
    source = oof_path(cfg, model)
    out_csv, out_png = paths.exp_dir / CSV, paths.exp_dir / PNG
    digest = artifacts.fingerprint({"model": model, "classes": list(spec.classes), "version": 1},
                                   [source, paths.folds_csv])
    if not force and artifacts.is_up_to_date([out_csv, out_png], digest):
        print(f"label-issues: {out_csv} is up to date (use --force to redo)")
        return out_csv
    oof = read_csv(source, "OOF predictions", dtype={id_col: str})
    if id_col not in oof.columns or set(oof[id_col]) != set(folds[id_col]) or len(oof) != len(folds):
        raise PipelineError(f"{source} does not cover the folds file's {len(folds)} train rows (the folds changed "
                            f"since {model} trained); retrain it: make train-folds CONFIG=...")
    oof = oof.set_index(id_col).loc[folds[id_col]].reset_index()
    preds = spec.predictions_from_frame(oof, str(source))
    frame = rank_label_issues(spec, folds[id_col].tolist(), spec.encode(folds), preds, id_col)
    check_contract(frame, id_col, str(out_csv))
    artifacts.check_writable(paths.exp_dir)
    artifacts.write_csv(out_csv, frame)
    n_issues = int(frame["issue"].sum())
    plot_suspects(frame, folds.set_index(id_col)[PATH], out_png,
                  f"{cfg.name}: the most suspect train labels by {model}'s OOF probabilities "
                  f"({n_issues} issues of {len(frame)} rows)")
    artifacts.mark_done([out_csv, out_png], digest)
    _summary(cfg, frame, model, cv_note, out_csv, out_png)
    return out_csv


def _summary(cfg: Config, frame, model: str, cv_note: str, out_csv: Path, out_png: Path) -> None:
    id_col, n_issues = cfg.data.id_column, int(frame["issue"].sum())
    print(f"label-issues: {n_issues} of {len(frame)} train rows ({n_issues / len(frame):.1%}) have a label that "
          f"{model}'s out-of-fold probabilities contradict{cv_note} (cleanlab); wrote {out_csv} (+ {out_png.name})")
    for row in frame.head(TOP).to_dict("records"):
        print(f"  #{row['rank']} {row[id_col]}: given {row['given_label']}, predicted {row['predicted_label']} "
              f"(label quality {row['label_quality']:.3f}){'' if row['issue'] else ' (not an issue)'}")
    print(f"label-issues: to train without them, copy {out_csv} beside the train table (e.g. "
          f"{Paths(cfg).data_root / 'exclude_ids.csv'}), set issue to False on any row to keep, then set "
          f"data.exclude_ids: exclude_ids.csv (relative to data.root, or an absolute path) and run "
          f"make folds train-folds ensemble leaderboard CONFIG=...")
