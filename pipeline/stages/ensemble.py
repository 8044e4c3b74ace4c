"""Ensemble stage: every method's files under ``runs/<exp>/ensemble/`` and its submission."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from pipeline import tracking
from pipeline.config.paths import Paths
from pipeline.config.run_only import digest_section
from pipeline.config.schema import Config
from pipeline.core import artifacts, locks
from pipeline.domain.tasks import TaskSpec
from pipeline.ensembles.blend import (
    Inputs,
    available_models,
    best_index,
    load_inputs,
    run_method,
    score,
    tune_thresholds,
)
from pipeline.ensembles.inference import wait_for_training
from pipeline.ensembles.submission import write_submission


def _outputs(cfg: Config, names: list[str]) -> list[Path]:
    paths = Paths(cfg)
    outs = [paths.ensemble_method_dir(m) / f for m in cfg.ensemble.methods
            for f in ("oof.csv", "test.csv", "cv.json", "params.json")]
    outs += [paths.submission(m) for m in cfg.ensemble.methods]
    if cfg.submission.per_backbone:
        outs += [paths.submission(n) for n in names] + [paths.ensemble_dir / "backbones.json"]
    return outs


def _digest(cfg: Config, names: list[str]) -> str:
    paths = Paths(cfg)
    files = [paths.folds_csv, paths.sample_submission]
    files += [f for n in names for f in (paths.oof_csv(n), paths.test_csv(n))]
    config_part = {"ensemble": dataclasses.asdict(cfg.ensemble),
                   "submission": digest_section("submission", dataclasses.asdict(cfg.submission)),
                   "metric": cfg.metric, "data": digest_section("data", dataclasses.asdict(cfg.data)), "models": names,
                   "version": 2}
    return artifacts.fingerprint(config_part, files)


def write_method(cfg: Config, inputs: Inputs, method: str) -> dict:
    """Fit one method; write its ``oof.csv``, ``test.csv``, ``cv.json`` and its submission."""
    paths, spec, id_col = Paths(cfg), inputs.spec, cfg.data.id_column
    oof, test, cv, params = run_method(method, inputs, cfg)
    out = paths.ensemble_method_dir(method)
    oof_frame = spec.predictions_frame(inputs.ids, oof, id_col)
    oof_frame.insert(1, "fold", inputs.folds)
    test_frame = spec.predictions_frame(inputs.test_ids, test, id_col)
    artifacts.write_csv(out / "oof.csv", oof_frame)
    artifacts.write_csv(out / "test.csv", test_frame)
    artifacts.write_json(out / "cv.json", cv)
    artifacts.write_json(out / "params.json", params)
    write_submission(cfg, spec, test_frame, paths.submission(method), thresholds=_threshold_list(spec, cv))
    return cv


def _threshold_list(spec: TaskSpec, cv: dict) -> list[float] | None:
    return [cv["thresholds"][c] for c in spec.classes] if "thresholds" in cv else None


def write_backbone_submissions(cfg: Config, inputs: Inputs) -> Path:
    """One submission per model; multilabel thresholds tuned on its OOF go to ``backbones.json``."""
    paths, spec, id_col = Paths(cfg), inputs.spec, cfg.data.id_column
    info = {}
    for i, name in enumerate(inputs.names):
        thresholds = tune_thresholds(inputs.y, inputs.oof[i]) if spec.task == "multilabel" else None
        path = write_submission(cfg, spec, spec.predictions_frame(inputs.test_ids, inputs.test[i], id_col),
                                paths.submission(name), thresholds=thresholds)
        info[name] = {"submission": str(path),
                      "thresholds": dict(zip(spec.classes, thresholds)) if thresholds else None}
    return artifacts.write_json(paths.ensemble_dir / "backbones.json", info)


def _summary(inputs: Inputs, results: dict[str, dict]) -> str:
    singles = [score(inputs.metric, inputs.spec.task, inputs.y, p) for p in inputs.oof]
    best = best_index(singles, inputs.metric)
    lines = [f"ensemble ({inputs.metric.name}, {'higher' if inputs.metric.greater_is_better else 'lower'} is better; "
             f"best single model {inputs.names[best]}: OOF {singles[best]:.4f})"]
    for method, cv in results.items():
        fmt = lambda x: "nan" if x is None else f"{x:.4f}"  # noqa: E731
        note = " (OOF in-sample; nested_cv is the honest score)" if cv["oof_in_sample"] else ""
        post = cv.get("postprocess")
        if post:
            note += (f"; {post['kind']} post-processing: nested_cv {fmt(post['nested_cv'])} vs "
                     f"{fmt(post['nested_cv_without'])} without, {'applied' if post['applied'] else 'not applied'}")
        lines.append(f"  {method:<11} OOF {fmt(cv['oof'])}  CV {fmt(cv['cv_mean'])} +- {fmt(cv['cv_std'])}  "
                     f"nested_cv {fmt(cv['nested_cv'])}{note}")
    return "\n".join(lines)


def run_ensemble(cfg: Config, force: bool = False) -> Path:
    """Blend every trained backbone with each of ``ensemble.methods``; write outputs and submissions.

    Returns ``runs/<exp>/ensemble/``. Skipped when the backbones' OOF/test files, the folds file,
    the sample submission and the ensemble/submission/metric config are unchanged (``force`` redoes it).
    While a train run of the experiment runs (a ``--force`` retrain rewrites the models' files), it waits
    for it first, with one line: "up to date" over models being retrained would keep an old submission.
    """
    paths = Paths(cfg)
    wait_for_training(cfg, f"ensemble of {cfg.name}")
    names = available_models(cfg)  # the models once every train run of the experiment has ended
    outputs, digest = _outputs(cfg, names), _digest(cfg, names)
    if not force and artifacts.is_up_to_date(outputs, digest):
        print(f"ensemble: {paths.ensemble_dir} is up to date (use --force to redo)")
        return paths.ensemble_dir
    inputs = load_inputs(cfg, names)
    artifacts.check_writable(paths.ensemble_dir, paths.submissions_dir)  # before the first of many files
    with locks.hold(paths.ensemble_dir, f"ensemble of {cfg.name}", "is being written", wait=True):
        if not force and artifacts.is_up_to_date(outputs, digest):  # written by the run it waited for
            print(f"ensemble: {paths.ensemble_dir} is up to date (use --force to redo)")
            return paths.ensemble_dir
        artifacts.remove_stale_temps(paths.submissions_dir)
        artifacts.remove_stale_temps(paths.ensemble_dir, recursive=True)
        if "rank" in cfg.ensemble.methods and inputs.metric.name != "roc_auc":
            print(f"ensemble: note: rank averaging suits ranking metrics (roc_auc); {inputs.metric.name} "
                  f"scores its [0, 1] ranks as they are")
        results = {m: write_method(cfg, inputs, m) for m in cfg.ensemble.methods}
        if cfg.submission.per_backbone:
            write_backbone_submissions(cfg, inputs)
        artifacts.mark_done(outputs, digest)
    tracking.log_ensemble(cfg)  # tracking.backend: a run per method, with its submission
    print(_summary(inputs, results))
    print(f"ensemble: wrote {paths.ensemble_dir} and submissions in {paths.submissions_dir}")
    return paths.ensemble_dir
