"""Per-model files after the folds: ``oof.csv`` (every train row once), the fold-averaged
``test.csv`` and ``cv.json``, for a backbone and for a ``seeds:`` entry's mean."""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.config.paths import Paths
from pipeline.config.schema import BackboneConfig, Config
from pipeline.core import artifacts
from pipeline.core.errors import PipelineError
from pipeline.domain.metrics import get_metric
from pipeline.domain.tasks import TaskSpec
from pipeline.engine.fit import score
from pipeline.training import all_rows
from pipeline.training.fingerprint import total_epochs


def aggregate_backbone(cfg: Config, bcfg: BackboneConfig, spec: TaskSpec, table: pd.DataFrame,
                       test: pd.DataFrame, tuned_folds: list[int] | None = None, decision: dict | None = None) -> dict:
    """Per-backbone ``oof.csv`` (every train row once), ``test.csv`` (the fold models' mean, or a
    frozen-only model's all-rows probe: :mod:`pipeline.training.all_rows`), ``cv.json``.

    Two selections on validation rows make a CV optimistic, and cv.json says which happened:
    ``train.keep: best`` picks each fold's epoch by its own validation score (``selection``), and
    a tune study picked the LRs on ``tuned_folds``, and ``train.unfreeze: auto`` (``decision``) chose
    on ``decided_folds`` whether to unfreeze; ``cv_untuned`` is the mean over the other folds."""
    paths, id_col, metric = Paths(cfg), cfg.data.id_column, get_metric(cfg.metric, spec.task)
    n = cfg.folds.n_splits
    oofs = [pd.read_csv(paths.fold_dir(bcfg.slug, k) / "oof.csv", dtype={id_col: str}, keep_default_na=False)
            for k in range(n)]  # keep_default_na=False: an id 'NA' is an id
    oof = pd.concat(oofs, ignore_index=True).set_index(id_col)
    ids = table[id_col].astype(str)
    if oof.index.duplicated().any() or set(oof.index) != set(ids):
        raise PipelineError(f"fold OOF files of {bcfg.slug} do not cover every train row exactly once; "
                            f"re-run `make train-folds ARGS=--force`")
    oof = oof.loc[ids].reset_index()
    if all_rows.applies(cfg) and all_rows.is_done(cfg, bcfg):  # a frozen-only model: one probe on every train row
        sources = [all_rows.outputs(cfg, bcfg)[-1]]
        test_from = f"one linear probe on all {len(table)} train rows (train.all_rows_probe)"
    else:
        sources = [paths.fold_dir(bcfg.slug, k) / "test.csv" for k in range(n)]
        test_from = f"the mean of the {n} fold models"
    tests = [spec.predictions_from_frame(pd.read_csv(p, dtype={id_col: str}, keep_default_na=False)) for p in sources]
    test_frame = spec.predictions_frame(test[id_col], np.mean(tests, axis=0), id_col)
    y = spec.encode(table)
    preds = spec.predictions_from_frame(oof)
    fold_scores = [score(metric, spec, y[table["fold"].to_numpy() == k], preds[table["fold"].to_numpy() == k])
                   for k in range(n)]
    finite = lambda v: float(v) if np.isfinite(v) else None  # noqa: E731  (JSON has no NaN)
    cv = {"metric": metric.name, "greater_is_better": metric.greater_is_better,
          "folds": [finite(v) for v in fold_scores], "oof": finite(score(metric, spec, y, preds)),
          "cv_mean": finite(np.nanmean(fold_scores)), "cv_std": finite(np.nanstd(fold_scores))}
    decided = [] if decision is None else [decision["fold"]]
    untouched = [s for k, s in enumerate(fold_scores) if k not in (tuned_folds or []) and k not in decided]
    kept = [artifacts.read_json(paths.fold_dir(bcfg.slug, k) / "kept.json")["kept"] for k in range(n)]
    cv.update(test_from=test_from, tuned_folds=sorted(tuned_folds or []), decided_folds=decided, unfreeze=decision,
              cv_untuned=finite(np.nanmean(untouched)) if untouched else None,
              keep=cfg.train.keep, kept=kept,
              selection=("optimistic: each fold's epoch was picked on its own validation rows"
                         if cfg.train.keep == "best" and total_epochs(cfg.train) > 1 else
                         "none: the kept weights were fixed before the validation rows were scored"))
    artifacts.write_csv(paths.oof_csv(bcfg.slug), oof)
    artifacts.write_csv(paths.test_csv(bcfg.slug), test_frame)
    artifacts.write_json(paths.cv_json(bcfg.slug), cv)
    return cv


def aggregate_seed_mean(cfg: Config, group: str, members: list[BackboneConfig], spec: TaskSpec,
                       table: pd.DataFrame) -> dict:
    """A ``seeds:`` entry's model: the mean of its variants' ``oof.csv`` and ``test.csv`` under
    ``runs/<exp>/<group>/``, scored like a backbone (no fitting: as honest as its members)."""
    paths, id_col, metric = Paths(cfg), cfg.data.id_column, get_metric(cfg.metric, spec.task)
    frames = [pd.read_csv(paths.oof_csv(m.slug), dtype={id_col: str}, keep_default_na=False) for m in members]
    tests = [pd.read_csv(paths.test_csv(m.slug), dtype={id_col: str}, keep_default_na=False) for m in members]
    oof = spec.predictions_frame(frames[0][id_col], np.mean([spec.predictions_from_frame(f) for f in frames], axis=0),
                                 id_col)
    oof.insert(1, "fold", frames[0]["fold"])
    test = spec.predictions_frame(tests[0][id_col], np.mean([spec.predictions_from_frame(f) for f in tests], axis=0),
                                  id_col)
    folds, y, preds = oof["fold"].to_numpy(), spec.encode(table), spec.predictions_from_frame(oof)
    finite = lambda v: float(v) if np.isfinite(v) else None  # noqa: E731  (JSON has no NaN)
    fold_scores = [score(metric, spec, y[folds == k], preds[folds == k]) for k in range(cfg.folds.n_splits)]
    member_cvs = [artifacts.read_json(paths.cv_json(m.slug)) for m in members]
    tuned = sorted({k for cv in member_cvs for k in cv.get("tuned_folds", [])})
    decided = sorted({k for cv in member_cvs for k in cv.get("decided_folds", [])})
    untouched = [s for k, s in enumerate(fold_scores) if k not in tuned and k not in decided]
    cv = {"metric": metric.name, "greater_is_better": metric.greater_is_better,
          "folds": [finite(v) for v in fold_scores], "oof": finite(score(metric, spec, y, preds)),
          "cv_mean": finite(np.nanmean(fold_scores)), "cv_std": finite(np.nanstd(fold_scores)),
          "members": [m.slug for m in members], "tuned_folds": tuned, "decided_folds": decided,
          "cv_untuned": finite(np.nanmean(untouched)) if untouched else None,
          "keep": member_cvs[0].get("keep"), "selection": member_cvs[0].get("selection", "")}
    if (table[id_col].astype(str).to_numpy() != oof[id_col].to_numpy(str)).any():
        raise PipelineError(f"the OOF files of {group}'s seeds list other rows; re-run `make train-folds ARGS=--force`")
    artifacts.write_csv(paths.oof_csv(group), oof)
    artifacts.write_csv(paths.test_csv(group), test)
    artifacts.write_json(paths.cv_json(group), cv)
    return cv


def fmt_score(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def honesty_note(cv: dict) -> str:
    """One line on how far a backbone's CV can be trusted: epoch selection and tuning folds."""
    parts = [f"epoch selection {cv['selection']}"]
    if cv.get("tuned_folds"):
        parts.append(f"the LRs were tuned on folds {cv['tuned_folds']}, which are inside this CV")
    if cv.get("decided_folds"):
        parts.append(f"train.unfreeze auto decided on folds {cv['decided_folds']}, which are inside this CV")
    if cv.get("tuned_folds") or cv.get("decided_folds"):
        parts.append(f"the untouched folds score {fmt_score(cv['cv_untuned'])}")
    return "; ".join(parts)
