"""Ensemble stage: blend the backbones' out-of-fold predictions, score them honestly, write submissions.

Methods (config ``ensemble.methods``); ``P`` below is an array ``(models, rows, columns)`` of
what the prediction columns hold (probabilities or regression values):

* ``mean``: the plain average;
* ``weighted``: non-negative weights summing to 1, fitted on OOF with SLSQP. The objective is
  log loss (classification) or squared error (regression): the metric itself for ``log_loss``,
  ``rmse`` and ``r2``, a smooth surrogate for the others (accuracy, roc_auc, f1_macro, qwk, mae),
  which ``cv.json`` says under ``objective``;
* ``rank``: per column, each model's predictions ranked, scaled to [0, 1] and averaged (for ranking
  metrics such as roc_auc; for regression the ranks are mapped back onto the mean blend's values);
* ``hill_climb``: Caruana et al. (2004) ensemble selection with replacement on the metric itself,
  from the best single model; never worse than it on OOF;
* ``stacking``: a meta-model (logistic regression on the models' logits, ridge regression on
  their values) over the OOF predictions.

Honest scores
-------------
``folds`` and ``oof`` in a method's ``cv.json`` score its ``oof.csv``. For ``weighted`` and
``hill_climb`` that file is the blend learned on all OOF rows, so those scores are optimistic
(``"oof_in_sample": true``). ``nested_cv`` is the honest number: for each fold, the
weights/selection/meta-model are learned on the other folds' OOF rows only and scored on the
held-out fold; ``nested_folds`` lists those scores. ``stacking``'s ``oof.csv`` is cross-fitted that
way (a fold's meta-predictions come from a meta-model that never saw the fold), so for it ``oof`` is
honest and ``nested_cv`` equals ``cv_mean``. ``mean`` and ``rank`` learn nothing: their
``nested_cv`` is their ``cv_mean``. Test predictions of every method come from the fit on all OOF
rows. (The base models' OOF predictions for one fold come from models that saw the other folds;
that second-level effect is the usual, accepted one of stacking.)

Example
-------
>>> P = np.array([[[0.2], [0.8]], [[0.4], [0.6]]])  # 2 models, 2 rows, 1 column
>>> mean_blend(P)[:, 0].round(2).tolist()
[0.3, 0.7]
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from scipy.stats import rankdata
from sklearn.dummy import DummyClassifier
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import precision_recall_curve

from pipeline.config.paths import Paths
from pipeline.config.schema import Config
from pipeline.core.errors import PipelineError, first_few
from pipeline.data.tables import read_csv, read_folds, require_columns, task_spec
from pipeline.domain.metrics import Metric, get_metric
from pipeline.domain.tasks import TaskSpec
from pipeline.ensembles import postprocess

EPS = 1e-7


LEARNED = ("weighted", "hill_climb", "stacking")


IN_SAMPLE = ("weighted", "hill_climb")  # oof.csv is the blend fitted on all OOF rows


DIRECT_OBJECTIVES = ("log_loss", "rmse", "r2")  # minimising log loss / squared error optimises these


@dataclass(frozen=True)
class Inputs:
    """Every available backbone's predictions, aligned with the folds file and the sample submission."""

    spec: TaskSpec
    metric: Metric
    names: list[str]  # backbone names, in config order
    ids: np.ndarray  # train ids, folds-file order
    folds: np.ndarray  # fold of each train row
    y: np.ndarray  # encoded targets (pipeline.domain.tasks)
    oof: np.ndarray  # (models, train rows, columns)
    test_ids: np.ndarray  # sample-submission order
    test: np.ndarray  # (models, test rows, columns)


@dataclass
class Blend:
    """A fitted method: its parameters (JSON, reloadable: ``params.json``), ``predict(P) -> (rows,
    columns)`` computed from them, and what it learned in words (for ``cv.json``)."""

    params: dict
    info: dict

    def predict(self, P: np.ndarray) -> np.ndarray:
        return apply_params(self.params, P)


def score(metric: Metric, task: str, y: np.ndarray, pred: np.ndarray) -> float:
    """The metric on ``(rows, columns)`` predictions; NaN where undefined (one class in a fold)."""
    pred = pred[:, 0] if task in ("binary", "regression") else pred
    try:
        return metric(y, pred, task)
    except ValueError:
        return float("nan")


def fold_scores(metric: Metric, task: str, y: np.ndarray, pred: np.ndarray, folds: np.ndarray) -> list[float]:
    return [score(metric, task, y[folds == k], pred[folds == k]) for k in np.unique(folds)]


def best_index(scores, metric: Metric) -> int:
    """Index of the best score in the metric's direction (NaN counts as worst)."""
    values = np.where(np.isnan(scores), metric.worst, scores)
    return int(np.argmax(values) if metric.greater_is_better else np.argmin(values))


def surrogate_loss(y: np.ndarray, pred: np.ndarray, task: str) -> float:
    """Log loss (classification) or mean squared error (regression) of ``(rows, columns)`` predictions."""
    if task == "regression":
        return float(np.mean((pred[:, 0] - y) ** 2))
    p = np.clip(pred, EPS, 1 - EPS)
    if task == "multiclass":
        return float(-np.mean(np.log(p[np.arange(len(y)), y.astype(int)])))
    y = y.reshape(len(y), -1)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def mean_blend(P: np.ndarray) -> np.ndarray:
    """The average over models of ``P`` ``(models, rows, columns)``."""
    return P.mean(axis=0)


def rank_blend(P: np.ndarray, task: str = "binary") -> np.ndarray:
    """Per model and column, ranks scaled to [0, 1] (ties averaged), then averaged over models.

    For regression the averaged ranks are mapped back onto the sorted values of the mean blend,
    so the output keeps the target's scale and the rank blend's order.
    """
    n = P.shape[1]
    out = ((rankdata(P, axis=1) - 1) / max(n - 1, 1)).mean(axis=0)
    if task != "regression":
        return out
    order = np.argsort(out, axis=0, kind="stable")
    remapped = np.empty_like(out)
    np.put_along_axis(remapped, order, np.sort(mean_blend(P), axis=0), axis=0)
    return remapped


def fit_weights(P: np.ndarray, y: np.ndarray, task: str) -> np.ndarray:
    """Non-negative weights summing to 1 that minimise :func:`surrogate_loss` of ``sum_i w_i P_i`` (SLSQP)."""
    m = len(P)
    uniform = np.full(m, 1.0 / m)
    if m == 1:
        return uniform

    def loss(w):
        return surrogate_loss(y, np.tensordot(w, P, axes=1), task)

    result = minimize(loss, uniform, method="SLSQP", bounds=[(0.0, 1.0)] * m,
                      constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1.0}],
                      options={"ftol": 1e-10, "maxiter": 500})
    w = np.clip(result.x, 0.0, None)
    w = w / w.sum() if w.sum() > 0 else uniform
    return w if loss(w) <= loss(uniform) else uniform  # SLSQP failed to improve: keep the plain mean


def hill_climb(P: np.ndarray, y: np.ndarray, metric: Metric, task: str, max_iter: int) -> list[int]:
    """Caruana ensemble selection with replacement; returns the chosen model indices, in order.

    Starts from the best single model and adds, one at a time, the model whose addition gives the
    best metric of the running average; stops when no addition strictly improves it or after
    ``max_iter`` additions. The result is never worse than the best single model on these rows.
    """
    singles = [score(metric, task, y, p) for p in P]
    chosen = [best_index(singles, metric)]
    total, current = P[chosen[0]].copy(), singles[chosen[0]]
    for _ in range(max_iter):
        candidates = [score(metric, task, y, (total + p) / (len(chosen) + 1)) for p in P]
        i = best_index(candidates, metric)
        if not metric.better(candidates[i], current):
            break
        chosen.append(i)
        total += P[i]
        current = candidates[i]
    return chosen


def stacking_features(P: np.ndarray, task: str, column: int | None = None) -> np.ndarray:
    """Meta-features ``(rows, features)``: log-probabilities (multiclass), logits (binary,
    multilabel: one label's ``column`` when given), or values (regression), per model."""
    if task == "regression":
        return P[:, :, 0].T
    p = np.clip(P, EPS, 1 - EPS)
    z = np.log(p) if task == "multiclass" else np.log(p) - np.log1p(-p)
    if column is not None:
        z = z[:, :, [column]]
    return z.transpose(1, 0, 2).reshape(P.shape[1], -1)


def _fit_classifier(X: np.ndarray, y: np.ndarray) -> dict:
    """A logistic regression's parameters (or the prior, for a label absent from these rows)."""
    y = y.astype(int)
    if len(np.unique(y)) < 2:
        prior = DummyClassifier(strategy="prior").fit(X, y)
        return {"classes": prior.classes_.tolist(), "prior": prior.class_prior_.tolist()}
    model = LogisticRegression(C=1.0, max_iter=2000).fit(X, y)
    return {"classes": model.classes_.tolist(), "coef": model.coef_.tolist(), "intercept": model.intercept_.tolist()}


def _classifier_proba(params: dict, X: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities ``(rows, n_classes)`` from :func:`_fit_classifier`'s parameters (classes absent
    from training get 0): the logistic model's own formula, so saved parameters predict alike anywhere."""
    out = np.zeros((len(X), n_classes))
    classes = np.asarray(params["classes"], dtype=int)
    if "prior" in params:
        out[:, classes] = np.asarray(params["prior"])
        return out
    decision = X @ np.asarray(params["coef"]).T + np.asarray(params["intercept"])
    if len(classes) == 2:  # binary logistic regression: one decision column
        p = 1.0 / (1.0 + np.exp(-decision[:, 0]))
        out[:, classes] = np.column_stack([1.0 - p, p])
        return out
    z = np.exp(decision - decision.max(axis=1, keepdims=True))
    out[:, classes] = z / z.sum(axis=1, keepdims=True)
    return out


def _rounded(params: dict) -> dict:
    """Coefficients for ``cv.json`` (6 decimals; ``params.json`` keeps full precision)."""
    return {k: np.round(v, 6).tolist() if k in ("coef", "intercept") else v for k, v in params.items()}


def fit_stacking(P: np.ndarray, y: np.ndarray, task: str) -> Blend:
    """Logistic regression on logits (classification) or ridge regression on values (regression)."""
    if task == "regression":
        model = Ridge(alpha=1.0).fit(stacking_features(P, task), y)
        params = {"kind": "stacking", "task": task, "coef": model.coef_.tolist(),
                  "intercept": float(model.intercept_)}
        return Blend(params, {"meta_model": "Ridge(alpha=1.0) on each model's values", **_rounded(params)})
    about = "LogisticRegression(C=1.0) on each model's " + ("log-probabilities" if task == "multiclass" else "logits")
    if task == "multilabel":
        labels = [_fit_classifier(stacking_features(P, task, j), y[:, j]) for j in range(P.shape[2])]
        params = {"kind": "stacking", "task": task, "labels": labels}
        return Blend(params, {"meta_model": about + ", one model per label", "labels": [_rounded(p) for p in labels]})
    model = _fit_classifier(stacking_features(P, task), y)
    params = {"kind": "stacking", "task": task, "n_classes": 2 if task == "binary" else P.shape[2], "model": model}
    return Blend(params, {"meta_model": about, **_rounded(model)})


def apply_params(params: dict, P: np.ndarray) -> np.ndarray:
    """A fitted method's predictions ``(rows, columns)`` for models' predictions ``P`` ``(models,
    rows, columns)``, from the method's saved parameters alone (``params.json``): what the ensemble
    stage writes and what ``predict`` and a bundle compute are one function."""
    kind = params["kind"]
    if kind == "weights":
        return np.tensordot(np.asarray(params["weights"]), P, axes=1)
    if kind == "rank":
        return rank_blend(P, params["task"])
    if kind != "stacking":
        raise PipelineError(f"ensemble parameters of kind '{kind}' are unknown to this version; re-run `make ensemble`")
    task = params["task"]
    if task == "regression":
        return (stacking_features(P, task) @ np.asarray(params["coef"]) + params["intercept"])[:, None]
    if task == "multilabel":
        return np.column_stack([_classifier_proba(p, stacking_features(P, task, j), 2)[:, 1]
                                for j, p in enumerate(params["labels"])])
    proba = _classifier_proba(params["model"], stacking_features(P, task), params["n_classes"])
    return proba[:, 1:] if task == "binary" else proba


def tune_thresholds(y: np.ndarray, pred: np.ndarray) -> list[float]:
    """Per label, the probability threshold that maximises F1 on these rows (0.5 for a label
    that is always or never present)."""
    thresholds = []
    for j in range(pred.shape[1]):
        if len(np.unique(y[:, j])) < 2:
            thresholds.append(0.5)
            continue
        precision, recall, cut = precision_recall_curve(y[:, j], pred[:, j])
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall + 1e-12))[:-1]
        thresholds.append(float(cut[int(np.argmax(f1))]))
    return thresholds


def _objective_note(metric: Metric, task: str) -> dict:
    objective = "mse" if task == "regression" else "log_loss"
    if metric.name in DIRECT_OBJECTIVES:
        return {"objective": objective, "objective_note": f"minimises {objective}, which optimises {metric.name}"}
    return {"objective": objective, "objective_note": f"{metric.name} is not differentiable in the weights: "
                                                      f"the weights minimise {objective} on OOF as a surrogate"}


def _weights_info(names: list[str], weights: np.ndarray) -> dict:
    return {"weights": {n: round(float(w), 6) for n, w in zip(names, weights)}}


def fit_method(method: str, P: np.ndarray, y: np.ndarray, inputs: Inputs, cfg: Config) -> Blend:
    """Fit one ensemble method on predictions ``P`` and targets ``y`` of some train rows."""
    task, names = inputs.spec.task, inputs.names
    if method == "mean":
        w = np.full(len(names), 1 / len(names))
        return Blend({"kind": "weights", "weights": w.tolist()}, _weights_info(names, w))
    if method == "rank":
        return Blend({"kind": "rank", "task": task}, {"weights": "equal, on ranks scaled to [0, 1]"})
    if method == "weighted":
        w = fit_weights(P, y, task)
        return Blend({"kind": "weights", "weights": w.tolist()},
                        {**_weights_info(names, w), **_objective_note(inputs.metric, task)})
    if method == "hill_climb":
        chosen = hill_climb(P, y, inputs.metric, task, cfg.ensemble.hill_climb_max_iter)
        w = np.bincount(chosen, minlength=len(names)) / len(chosen)
        return Blend({"kind": "weights", "weights": w.tolist(), "selection": [names[i] for i in chosen]},
                        {**_weights_info(names, w), "selection": [names[i] for i in chosen]})
    if method == "stacking":
        return fit_stacking(P, y, task)
    raise PipelineError(f"'{method}' is not an ensemble method (config key ensemble.methods)")


def fit_rows(method: str, inputs: Inputs, rows: np.ndarray, cfg: Config) -> Blend:
    """Fit ``method`` on the OOF predictions and targets of train ``rows`` only."""
    return fit_method(method, inputs.oof[:, rows], inputs.y[rows], inputs, cfg)


def cross_fit(method: str, inputs: Inputs, cfg: Config,
              kind: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Nested predictions: each fold's rows predicted by ``method`` fitted on the other folds only;
    with a post-processing ``kind``, also those predictions post-processed by parameters fitted on
    the other folds' rows (blended by that same fold's blend), never on the fold itself."""
    raw, processed = np.empty_like(inputs.oof[0]), np.empty_like(inputs.oof[0]) if kind else None
    for k in np.unique(inputs.folds):
        held_out = inputs.folds == k
        other = np.flatnonzero(~held_out)
        blend = fit_rows(method, inputs, other, cfg)
        raw[held_out] = blend.predict(inputs.oof[:, held_out])
        if kind:
            fitted = postprocess.fit(kind, inputs.y[other], blend.predict(inputs.oof[:, other]), inputs.metric,
                                     inputs.spec.task)
            processed[held_out] = postprocess.apply(fitted, raw[held_out])
    return raw, processed


def _finite(x) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def _mean(scores) -> float | None:
    return _finite(np.nanmean(scores))


POSTPROCESS_ALPHA = 0.05  # one-sided bootstrap p of no gain that post-processing needs to be applied
POSTPROCESS_RESAMPLES = 1000


def paired_metric_p(metric: Metric, task: str, y: np.ndarray, base: np.ndarray, new: np.ndarray,
                    seed: int = 0) -> float:
    """One-sided bootstrap p-value that ``new`` predictions score no better than ``base`` on the
    metric: rows resampled with their pairs kept together, the metric recomputed on each resample
    (a tie counts half; an undefined resample counts as no gain)."""
    rng = np.random.default_rng(seed)
    sign = 1.0 if metric.greater_is_better else -1.0
    losses = 0.0
    for _ in range(POSTPROCESS_RESAMPLES):
        rows = rng.integers(0, len(y), len(y))
        gain = sign * (score(metric, task, y[rows], new[rows]) - score(metric, task, y[rows], base[rows]))
        losses += 0.5 if gain == 0 else float(not gain > 0)  # NaN: no gain
    return losses / POSTPROCESS_RESAMPLES


def run_method(method: str, inputs: Inputs, cfg: Config) -> tuple[np.ndarray, np.ndarray, dict, dict]:
    """OOF predictions, test predictions, the ``cv.json`` and the ``params.json`` of one method.

    With ``ensemble.postprocess: auto`` and a metric that decisions score, the post-processing is
    fitted on all OOF rows for the submission and scored by nested CV; it is applied (to
    ``oof.csv``, ``test.csv`` and the submission) when that nested score beats the plain one, and
    ``nested_cv`` is then the post-processed score, the one that matches what is submitted.
    "Beats" needs evidence: a higher nested CV, and a one-sided paired bootstrap over the nested
    rows with p < ``POSTPROCESS_ALPHA`` (a gain of a row or two is noise, and lost on tests)."""
    task, metric = inputs.spec.task, inputs.metric
    kind = postprocess.choose_kind(task, metric.name) if cfg.ensemble.postprocess == "auto" else None
    full = fit_rows(method, inputs, np.arange(len(inputs.y)), cfg)
    nested, nested_pp = cross_fit(method, inputs, cfg, kind) if method in LEARNED or kind else (None, None)
    oof = nested if method == "stacking" else full.predict(inputs.oof)
    test = full.predict(inputs.test)
    nested_folds = fold_scores(metric, task, inputs.y, nested if method in LEARNED else oof, inputs.folds)
    post = None
    if kind:
        pp_folds = fold_scores(metric, task, inputs.y, nested_pp, inputs.folds)
        plain = nested if method in LEARNED else oof
        p_value = paired_metric_p(metric, task, inputs.y, plain, nested_pp)
        applied = metric.better(np.nanmean(pp_folds), np.nanmean(nested_folds)) and p_value < POSTPROCESS_ALPHA
        fitted = postprocess.fit(kind, inputs.y, oof, metric, task)
        post = {"kind": kind, "applied": bool(applied), "params": fitted, "nested_cv": _mean(pp_folds),
                "nested_folds": [_finite(x) for x in pp_folds], "nested_cv_without": _mean(nested_folds),
                "p_value": p_value,
                "note": "fitted on all OOF rows for the submission; nested_cv: fitted on the other folds per fold"
                        + ("" if applied else f"; not applied: it did not beat the plain nested CV with bootstrap "
                                              f"p < {POSTPROCESS_ALPHA} (p = {p_value:.3f})")}
        if applied:
            oof, test, nested_folds = postprocess.apply(fitted, oof), postprocess.apply(fitted, test), pp_folds
    folds = fold_scores(metric, task, inputs.y, oof, inputs.folds)
    applied = post is not None and post["applied"]
    cv = {"metric": metric.name, "greater_is_better": metric.greater_is_better,
          "folds": [_finite(s) for s in folds], "oof": _finite(score(metric, task, inputs.y, oof)),
          "cv_mean": _mean(folds), "cv_std": _finite(np.nanstd(folds)),
          "nested_cv": _mean(nested_folds), "nested_folds": [_finite(s) for s in nested_folds],
          "oof_in_sample": method in IN_SAMPLE or applied, "models": inputs.names, **full.info,
          "postprocess": post, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if task == "multilabel":  # label lists: the post-processing's thresholds already sit at 0.5
        thresholds = [0.5] * len(inputs.spec.classes) if applied else tune_thresholds(inputs.y, oof)
        cv["thresholds"] = dict(zip(inputs.spec.classes, thresholds))
    params = {"method": method, "models": inputs.names, "task": task, "params": full.params,
              "postprocess": post["params"] if applied else None, "thresholds": cv.get("thresholds")}
    return oof, test, cv, params


def available_models(cfg: Config) -> list[str]:
    """Ids of the models to blend whose ``oof.csv`` and ``test.csv`` exist (a note for each one
    missing): every variant, with a ``seeds:`` entry's variants as their seed-mean model when
    ``ensemble.seed_mean`` is true."""
    paths, found = Paths(cfg), []
    models = list(cfg.models(seed_mean=cfg.ensemble.seed_mean))
    for name in models:
        missing = [p for p in (paths.oof_csv(name), paths.test_csv(name)) if not p.exists()]
        if missing:
            print(f"ensemble: skipping {name}: {missing[0]} is missing (train it: make train-folds)")
        else:
            found.append(name)
    if not found:
        raise PipelineError(f"no model has OOF predictions yet (looked for {paths.oof_csv(models[0])} "
                            f"and the like for {len(models)} models); run `make train-folds` first")
    return found


def _read_predictions(cfg: Config, spec: TaskSpec, path: Path, what: str) -> tuple[pd.DataFrame, np.ndarray]:
    id_col = cfg.data.id_column
    frame = read_csv(path, what, dtype={id_col: str})
    require_columns(frame, [id_col], path, "data.id_column")
    preds = spec.predictions_from_frame(frame, source=str(path)).reshape(len(frame), -1)
    bad = ~np.isfinite(preds).all(axis=1)
    if bad.any():
        raise PipelineError(f"{path}: NaN or infinite predictions for ids {first_few(frame.loc[bad, id_col])}; "
                            f"re-run `make train-folds ARGS=--force` for this backbone")
    return frame, preds


def read_oof(cfg: Config, spec: TaskSpec, name: str, folds: pd.DataFrame) -> np.ndarray:
    """A backbone's OOF predictions ``(rows, columns)`` in the folds file's row order."""
    path, id_col = Paths(cfg).oof_csv(name), cfg.data.id_column
    frame, preds = _read_predictions(cfg, spec, path, "OOF predictions")
    require_columns(frame, ["fold"], path, "OOF file contract: <id>, fold, prediction columns")
    index = pd.Index(frame[id_col])
    ids = folds[id_col].astype(str)
    if index.has_duplicates or len(index) != len(ids) or not ids.isin(index).all():
        missing = ids[~ids.isin(index)]
        raise PipelineError(f"{path} does not hold every train row of {Paths(cfg).folds_csv} exactly once "
                            f"({len(frame)} vs {len(ids)} rows; missing ids: {first_few(missing) or 'none'}); "
                            f"re-run `make train-folds ARGS=--force`")
    order = index.get_indexer(ids)
    changed = frame["fold"].to_numpy(int)[order] != folds["fold"].to_numpy(int)
    if changed.any():
        raise PipelineError(f"{path} was trained on other folds than {Paths(cfg).folds_csv} (ids "
                            f"{first_few(ids[changed])}); nested CV would leak: re-run `make train-folds ARGS=--force`")
    return preds[order]


def read_test(cfg: Config, spec: TaskSpec, name: str, sample_ids: np.ndarray) -> np.ndarray:
    """A backbone's test predictions ``(rows, columns)``; ids must be the sample submission's, in order."""
    path = Paths(cfg).test_csv(name)
    frame, preds = _read_predictions(cfg, spec, path, "test predictions")
    ids = frame[cfg.data.id_column].to_numpy(str)
    if len(ids) != len(sample_ids) or (ids != sample_ids).any():
        raise PipelineError(f"{path} does not list the sample submission's ids in its order "
                            f"({len(ids)} vs {len(sample_ids)} rows); re-run `make train-folds ARGS=--force`")
    return preds


def load_inputs(cfg: Config, names: list[str]) -> Inputs:
    paths, id_col = Paths(cfg), cfg.data.id_column
    folds = read_folds(cfg)
    spec = task_spec(cfg, folds)
    sample_ids = read_csv(paths.sample_submission, "sample submission")[id_col].to_numpy(str)
    return Inputs(spec=spec, metric=get_metric(cfg.metric, spec.task), names=names,
                  ids=folds[id_col].to_numpy(str), folds=folds["fold"].to_numpy(int), y=spec.encode(folds),
                  oof=np.stack([read_oof(cfg, spec, n, folds) for n in names]),
                  test_ids=sample_ids, test=np.stack([read_test(cfg, spec, n, sample_ids) for n in names]))
