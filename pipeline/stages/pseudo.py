"""Pseudo-labelling: confidently predicted test images become extra training rows of a new experiment.

``python -m pipeline pseudo -c CFG --from SOURCE [--threshold T] [--name N] [--train]``

``SOURCE`` is an ensemble method or a model id of the experiment. The labels are made **fold-wise**,
so that the new experiment's CV stays honest: fold k of the new experiment trains on the test images
that the source's fold-k model(s) label with confidence >= T. Those models were trained on exactly
the rows fold k trains on and never saw its validation rows. (The fold-averaged ``test.csv`` would not
do: the other folds' models trained on fold k's validation rows, and their labels would carry those
rows' targets into fold k's training.) A learned blend (``weighted``, ``hill_climb``, ``stacking``)
is fitted per fold on the other folds' OOF rows, as its nested CV is; ``mean`` fits nothing.
``rank`` is refused (its outputs are ranks, not probabilities), and so is regression (a value has
no confidence).

Confidence: multiclass, the top class's probability; binary, ``max(p, 1 - p)``; multilabel, the
least certain label's ``max(p, 1 - p)``, so a row passes only when every label is at least T or at
most 1 - T. The ensemble's post-processing (thresholds, biases) is not applied to the labels.

Writes, for the new experiment ``<exp>-pseudo`` (``--name``):

* ``runs/<new>/pseudo_labels.csv``: the id, the target column(s) spelled as in the train table,
  ``image_path``, ``train_fold`` (the one fold whose training rows the row joins) and ``confidence``;
* ``folds/<new>.csv``: a copy of the source's folds file (the same validation rows per fold);
* ``runs/<new>/config.yaml``: the source config with the new name, ``train.pseudo_labels`` pointing
  at the CSV, and each model trained as in the source (its tuned LRs, its planned epochs).

The train stage (:func:`with_pseudo_labels`) appends the CSV's rows to the folds table with fold
``-1 - train_fold``; ``FoldTrainer`` trains fold k on the real rows of the other folds plus the
rows of fold ``-1 - k``, validates on the real rows of fold k only, and OOF files and ``cv.json``
are built from the real rows alone. ``--train`` then trains, ensembles and ranks the new
experiment and prints each model's CV change against the source.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from pipeline.config.paths import Paths
from pipeline.config.schema import BackboneConfig, Config, config_from_dict
from pipeline.core import artifacts
from pipeline.core.errors import PipelineError, first_few
from pipeline.data.images import PATH
from pipeline.data.tables import read_folds, read_test_table, task_spec
from pipeline.domain.tasks import TaskSpec
from pipeline.training.pseudo_labels import CONFIDENCE, IMAGE_PATH, TRAIN_FOLD, refuse_regression

PSEUDO_FILE = "pseudo_labels.csv"


PROBABILITY_FREE = ("rank",)  # ensemble methods whose outputs are not probabilities


def confident_labels(spec: TaskSpec, preds: np.ndarray, separator: str = " ") -> tuple[np.ndarray, pd.DataFrame]:
    """Per row of ``preds`` (what the prediction columns hold): its confidence and its label(s)
    as the train table spells them (one column per ``spec.target_columns``).

    >>> spec = TaskSpec("multiclass", ("label",), ("cat", "dog"))
    >>> conf, labels = confident_labels(spec, np.array([[0.9, 0.1], [0.3, 0.7]]))
    >>> conf.tolist(), labels["label"].tolist()
    ([0.9, 0.7], ['cat', 'dog'])
    """
    refuse_regression(spec.task)
    preds = np.asarray(preds, dtype=np.float64)
    columns = list(spec.target_columns)
    if spec.task == "multiclass":
        top = preds.argmax(axis=1)
        return preds.max(axis=1), pd.DataFrame({columns[0]: np.asarray(spec.classes)[top]})
    if spec.task == "binary":
        p = preds.reshape(len(preds))
        positive = p >= 0.5
        labels = np.where(positive, spec.classes[1], spec.classes[0])
        return np.where(positive, p, 1.0 - p), pd.DataFrame({columns[0]: labels})
    on = preds >= 0.5  # multilabel: every label must be far from 0.5
    confidence = np.maximum(preds, 1.0 - preds).min(axis=1)
    if len(columns) > 1:  # one 0/1 column per label
        return confidence, pd.DataFrame({c: on[:, j].astype(int) for j, c in enumerate(columns)})
    text = [separator.join(c for c, x in zip(spec.classes, row) if x) for row in on]
    return confidence, pd.DataFrame({columns[0]: text})


def check_threshold(task: str, threshold: float) -> None:
    if not 0 < threshold <= 1:
        raise PipelineError(f"--threshold {threshold} is not a probability in (0, 1]; e.g. --threshold 0.95")
    if task == "multilabel" and threshold < 0.5:
        raise PipelineError(f"--threshold {threshold}: multilabel rows pass when every label's probability is >= T "
                            f"or <= 1 - T, so T must be at least 0.5 (e.g. 0.95)")


def model_variants(cfg: Config) -> dict[str, list[BackboneConfig]]:
    """Every model id a source may name: each variant, and each ``seeds:`` entry's seed-mean."""
    return {**cfg.models(seed_mean=False), **cfg.seed_groups()}


def check_source(cfg: Config, source: str) -> str:
    """``ensemble`` or ``model``; a one-line error naming the valid choices otherwise."""
    methods, models = list(cfg.ensemble.methods), list(model_variants(cfg))
    if source in methods and source not in PROBABILITY_FREE:
        return "ensemble"
    if source in models:
        return "model"
    valid = [m for m in methods if m not in PROBABILITY_FREE] + models
    why = ("its outputs are ranks, not probabilities" if source in PROBABILITY_FREE
           else "it is neither an ensemble method (ensemble.methods) nor a model id (backbones[].id)")
    raise PipelineError(f"--from '{source}' cannot label experiment '{cfg.name}': {why}; valid: {', '.join(valid)}")


def fold_test_predictions(cfg: Config, spec: TaskSpec, variants: list[BackboneConfig], fold: int,
                          test_ids: np.ndarray) -> np.ndarray:
    """``(test rows, columns)``: the mean of the variants' fold-``fold`` test predictions (TTA applied)."""
    paths, id_col, preds = Paths(cfg), cfg.data.id_column, []
    for bcfg in variants:
        path = paths.fold_dir(bcfg.slug, fold) / "test.csv"
        if not path.exists():
            raise PipelineError(f"{path} does not exist: pseudo-labels are made fold by fold from each fold's test "
                                f"predictions; train the source first (make train-folds CONFIG=...)")
        frame = pd.read_csv(path, dtype={id_col: str}, keep_default_na=False)
        ids = frame[id_col].to_numpy(str) if id_col in frame.columns else np.array([])
        if len(ids) != len(test_ids) or (ids != test_ids).any():
            raise PipelineError(f"{path} does not list the sample submission's ids in its order; re-run "
                                f"`make train-folds ARGS=--force` for {bcfg.slug}")
        preds.append(spec.predictions_from_frame(frame, source=str(path)).reshape(len(frame), -1))
    return np.mean(preds, axis=0)


def source_fold_predictions(cfg: Config, spec: TaskSpec, source: str, test_ids: np.ndarray) -> list[np.ndarray]:
    """Per fold k, the source's test predictions ``(rows, columns)`` from models that never saw fold
    k's validation rows (a learned blend fitted on the other folds' OOF rows)."""
    n, models = cfg.folds.n_splits, model_variants(cfg)
    if check_source(cfg, source) == "model":
        return [fold_test_predictions(cfg, spec, models[source], k, test_ids) for k in range(n)]
    from pipeline.ensembles.blend import fit_rows, load_inputs  # the ensemble stage's own fitting

    params = Paths(cfg).ensemble_method_dir(source) / "params.json"
    if not params.exists():
        raise PipelineError(f"{params} does not exist; run the ensemble first (make ensemble CONFIG=...)")
    names = artifacts.read_json(params)["models"]
    unknown = [m for m in names if m not in models]
    if unknown:
        raise PipelineError(f"{params} blends models {first_few(unknown)} that the config no longer lists; "
                            f"re-run `make ensemble`")
    inputs = load_inputs(cfg, names)
    out = []
    for k in range(n):
        blend = fit_rows(source, inputs, np.flatnonzero(inputs.folds != k), cfg)
        P = np.stack([fold_test_predictions(cfg, spec, models[m], k, test_ids) for m in names])
        out.append(np.asarray(blend.predict(P)).reshape(len(test_ids), -1))
    return out


def pseudo_label_frame(cfg: Config, spec: TaskSpec, test: pd.DataFrame, fold_preds: list[np.ndarray],
                       threshold: float) -> pd.DataFrame:
    """The rows of :data:`PSEUDO_FILE`: per fold, the test images whose confidence passes."""
    id_col, frames = cfg.data.id_column, []
    for k, preds in enumerate(fold_preds):
        confidence, labels = confident_labels(spec, preds, cfg.data.label_separator)
        keep = confidence >= threshold
        frame = labels.loc[keep].reset_index(drop=True)
        frame.insert(0, id_col, test[id_col].to_numpy()[keep])
        frame[IMAGE_PATH] = test[PATH].to_numpy()[keep]
        frame[TRAIN_FOLD] = k
        frame[CONFIDENCE] = np.round(confidence[keep], 6)
        frames.append(frame)
    rows = pd.concat(frames, ignore_index=True)
    if rows.empty:
        best = max(float(confident_labels(spec, p, cfg.data.label_separator)[0].max()) for p in fold_preds)
        raise PipelineError(f"no test image reaches confidence {threshold} in any fold (the highest is {best:.4f}); "
                            f"lower --threshold")
    return rows


def count_table(spec: TaskSpec, rows: pd.DataFrame, n_splits: int) -> pd.DataFrame:
    """Pseudo-labelled rows per class (multilabel: rows carrying each label) and fold, with totals."""
    folds = [f"fold{k}" for k in range(n_splits)]
    if spec.task == "multilabel":
        y = spec.encode(rows)
        counts = pd.DataFrame([[int(y[(rows[TRAIN_FOLD] == k).to_numpy(), j].sum()) for k in range(n_splits)]
                               for j in range(len(spec.classes))], index=list(spec.classes), columns=folds)
        counts.loc["(rows)"] = [int((rows[TRAIN_FOLD] == k).sum()) for k in range(n_splits)]
    else:
        column = rows[spec.target_columns[0]].astype(str)
        counts = pd.crosstab(column, rows[TRAIN_FOLD]).reindex(index=list(spec.classes),
                                                               columns=range(n_splits), fill_value=0)
        counts.columns = folds
        counts.loc["(all)"] = counts.sum()
    counts.index.name = "label" if spec.task == "multilabel" else "class"
    counts["total"] = counts.sum(axis=1)
    return counts


def _merged(base: dict, changes: dict) -> dict:
    out = dict(base)
    for k, v in changes.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def as_trained(cfg: Config, bcfg: BackboneConfig, new: Paths) -> dict:
    """``train`` overrides that make the new experiment train ``bcfg`` as the source did: its tuned
    LRs (the study's ``best.json`` is copied, so ``cv.json`` still says which folds tuned them) or
    the config's, and the unfrozen epochs a time budget planned."""
    src = Paths(cfg)
    record = src.backbone_dir(bcfg.slug) / "lr_source.json"
    if not record.exists():  # not trained in the source: nothing to match
        return {}
    lr_source = artifacts.read_json(record).get("lr_source", "config")
    changes: dict = {"use_tuned": "false"}
    if lr_source != "config" and Path(lr_source).exists():
        target = new.tuned_params(bcfg.slug)
        target.parent.mkdir(parents=True, exist_ok=True)
        with artifacts.atomic_path(target) as tmp:
            shutil.copyfile(lr_source, tmp)
        changes["use_tuned"] = "true"
    if cfg.variant(bcfg)[0].train.time_budget_min is not None:
        resolved = yaml.safe_load((src.backbone_dir(bcfg.slug) / "config.yaml").read_text())
        changes.update(time_budget_min=None, unfrozen={"epochs": resolved["train"]["unfrozen"]["epochs"]})
    return changes


def pseudo_config(cfg: Config, name: str, pseudo_csv: Path) -> tuple[Config, dict]:
    """The new experiment's config (and its raw mapping): the source's, renamed, with the pseudo
    labels, and each model trained as in the source."""
    raw = cfg.to_dict()
    raw["name"] = name
    raw["train"]["pseudo_labels"] = str(pseudo_csv)
    new = Paths(cfg.replace(name=name))
    for entry, bcfg in zip(raw["backbones"], cfg.backbones):
        entry["train"] = _merged(entry.get("train") or {}, as_trained(cfg, bcfg, new))
        weights = entry["weights"]
        if weights.startswith("pretrained:") and "/" not in weights:  # the source's checkpoint
            entry["weights"] = f"pretrained:{cfg.name}/{weights.removeprefix('pretrained:')}"
    return config_from_dict(raw), raw


def copy_folds(cfg: Config, new_cfg: Config) -> Path:
    """``folds/<new>.csv``: the source's folds file, byte for byte."""
    src, dst = Paths(cfg).folds_csv, Paths(new_cfg).folds_csv
    if not src.exists():
        raise PipelineError(f"folds file {src} does not exist; run `make folds` and train the source first")
    with artifacts.atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return dst


def cv_changes(cfg: Config, new_cfg: Config) -> str:
    """Each model's and ensemble's honest score (leaderboard ``score``) in the source and the new experiment."""
    from pipeline.ensembles.scores import collect

    old = collect(cfg)[0].set_index("model")
    new = collect(new_cfg)[0].set_index("model")
    lines = [f"CV change with pseudo-labels ({cfg.name} -> {new_cfg.name}, {cfg.metric}; ensembles: nested CV):"]
    for model in new.index:
        after = float(new.loc[model, "score"])
        if model in old.index and np.isfinite(old.loc[model, "score"]):
            before = float(old.loc[model, "score"])
            lines.append(f"  {model:<16} {new.loc[model, 'kind']:<8} {before:.4f} -> {after:.4f} "
                         f"({after - before:+.4f})")
        else:
            lines.append(f"  {model:<16} {new.loc[model, 'kind']:<8} (not in {cfg.name}) -> {after:.4f}")
    return "\n".join(lines)


def run_pseudo(cfg: Config, source: str, threshold: float = 0.95, name: str | None = None,
               train: bool = False) -> Path:
    """Write the pseudo-label file, the folds copy and the config of experiment ``name``
    (``<exp>-pseudo``) and return the new config's path. ``train``: the caller trains, ensembles and
    ranks it next (the command line's ``--train`` does, then prints :func:`cv_changes`)."""
    refuse_regression(cfg.data.task)
    check_threshold(cfg.data.task, threshold)
    check_source(cfg, source)
    name = name or f"{cfg.name}-pseudo"
    if name == cfg.name:
        raise PipelineError(f"--name {name} is the source experiment's own name; give the new experiment another")
    table = read_folds(cfg)
    spec = task_spec(cfg, table)
    test = read_test_table(cfg)
    fold_preds = source_fold_predictions(cfg, spec, source, test[cfg.data.id_column].to_numpy(str))
    rows = pseudo_label_frame(cfg, spec, test, fold_preds, threshold)
    new_paths = Paths(cfg.replace(name=name))
    artifacts.check_writable(new_paths.exp_dir, new_paths.folds_csv.parent)
    pseudo_csv = artifacts.write_csv(new_paths.exp_dir / PSEUDO_FILE, rows)
    new_cfg, raw = pseudo_config(cfg, name, pseudo_csv)
    copy_folds(cfg, new_cfg)
    config_path = new_paths.exp_dir / "config.yaml"
    header = (f"# experiment {cfg.name} with pseudo-labelled test rows: python -m pipeline pseudo --from {source} "
              f"--threshold {threshold}\n# train it: make train-folds ensemble leaderboard CONFIG={config_path}\n")
    artifacts.write_text(config_path, header + yaml.safe_dump(raw, sort_keys=False))
    per_fold = rows[TRAIN_FOLD].value_counts().reindex(range(cfg.folds.n_splits), fill_value=0).tolist()
    print(f"pseudo: {source} of {cfg.name}, fold by fold, confidence >= {threshold}: {len(rows)} rows "
          f"({rows[cfg.data.id_column].nunique()} of {len(test)} test images; per fold {per_fold}) -> {pseudo_csv}")
    print(f"pseudo-labelled rows per {'label' if spec.task == 'multilabel' else 'class'} and fold "
          f"(fold k trains on its own rows, validates on none):")
    print(count_table(spec, rows, cfg.folds.n_splits).to_string())
    print(f"pseudo: experiment {name}: folds {Paths(new_cfg).folds_csv} (a copy of {Paths(cfg).folds_csv}), "
          f"config {config_path}")
    if not train:
        print(f"pseudo: next: make train-folds ensemble leaderboard CONFIG={config_path}")
    return config_path
