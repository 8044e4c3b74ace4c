"""Tracked experiments (``tracking.*``): MLflow or TensorBoard runs of what train and ensemble wrote.

One run per model of an experiment (a backbone variant, or an ensemble method), named after its
id, in an MLflow experiment (or TensorBoard folder) named after the config:

* the model's run: the resolved config (as parameters and as ``config.yaml``), the git commit and
  whether the working tree had uncommitted changes, and at the end the CV (``cv_mean``, ``cv_std``,
  ``oof``, ``cv_untuned``, per-fold ``cv_fold``) with ``cv.json``, and the model's submission;
* one child run per fold (``fold<k>``): every row of the fold's ``history.csv`` (learning rates,
  losses, the validation metric, speed) with the epoch as the step;
* one run per ensemble method: its CV and nested CV, ``cv.json``, ``params.json`` and the
  submission file.

Runs are identified by ``runs/<exp>/<id>/tracking.json`` (``ensemble/<method>/`` for blends): a
re-run with the same fold fingerprint continues the run, a changed config starts a new one, a
retrained fold replaces its child run. Only the main process logs; parallel fold processes log
their own fold. Backend ``none`` (the default) costs nothing: no package is imported.

Example
-------
>>> run_id_for(cfg, "efficientnet_lite0")  # doctest: +SKIP
'3f0c2a...'
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import time
from pathlib import Path

import yaml

from pipeline.config.paths import Paths
from pipeline.config.schema import BackboneConfig, Config, flatten
from pipeline.core import artifacts, distributed
from pipeline.core.errors import PipelineError

TRACKING_FILE = "tracking.json"
MAX_PARAM_CHARS = 500  # MLflow's limit on a parameter value in older servers


# ----------------------------------------------------------------------------- what the hooks call


def begin_model(cfg: Config, bcfg: BackboneConfig) -> str | None:
    """Start the model's run, or continue the one whose fold fingerprint matches; log the resolved
    config and the git state. A wrong URI or a missing package stops here, before any fold trains."""
    if cfg.tracking.backend == "none" or not distributed.is_main():
        return None
    from pipeline.training.fingerprint import fold_digest  # train calls this module

    record_path = Paths(cfg).backbone_dir(bcfg.slug) / TRACKING_FILE
    key = fold_digest(cfg, bcfg, 0)
    record = _record(cfg, record_path)
    if record is not None and record.get("key") == key:
        return record["run_id"]
    backend = _backend(cfg)
    resolved = cfg.replace(backbones=[bcfg])
    run_id = backend.start_run(bcfg.slug, {**git_state(), "pipeline.model": bcfg.slug, "pipeline.kind": "backbone"})
    backend.log_params(run_id, as_params(resolved.to_dict()))
    backend.log_text(run_id, "config.yaml", yaml.safe_dump(resolved.to_dict(), sort_keys=False))
    _write_record(cfg, record_path, run_id, key)
    print(f"tracking: {cfg.tracking.backend} run {run_id} for {bcfg.slug} in {default_uri(cfg)}")
    return run_id


def log_fold(cfg: Config, bcfg: BackboneConfig, fold: int, history: list[dict]) -> None:
    """The fold's per-epoch rows as a child run ``fold<k>`` (a retrained fold replaces its child)."""
    record = _model_record(cfg, bcfg)
    if record is None:
        return
    _warn_on_failure(f"fold {fold} of {bcfg.slug}", lambda: _log_fold(cfg, record["run_id"], fold, history))


def end_model(cfg: Config, bcfg: BackboneConfig, cv: dict) -> None:
    """The CV and ``cv.json``; folds trained by an earlier process that logged nothing are added
    from their ``history.csv``."""
    record = _model_record(cfg, bcfg)
    if record is None:
        return
    paths, run_id = Paths(cfg), record["run_id"]

    def log() -> None:
        import pandas as pd

        backend = _backend(cfg)
        logged = backend.child_folds(run_id)
        for k in range(cfg.folds.n_splits):
            history = paths.fold_dir(bcfg.slug, k) / "history.csv"
            if k not in logged and history.exists():
                _log_fold(cfg, run_id, k, pd.read_csv(history).to_dict("records"))
        backend.log_metrics(run_id, cv_metrics(cv))
        backend.log_file(run_id, paths.cv_json(bcfg.slug))
        backend.finish(run_id)
    _warn_on_failure(f"the CV of {bcfg.slug}", log)


def log_ensemble(cfg: Config) -> None:
    """After the ensemble stage: one run per method (CV, nested CV, its files and submission), and
    each backbone's submission into that backbone's run."""
    if cfg.tracking.backend == "none" or not distributed.is_main():
        return
    paths = Paths(cfg)
    _warn_on_failure("the ensemble", lambda: [_log_method(cfg, m) for m in cfg.ensemble.methods
                                             if (paths.ensemble_method_dir(m) / "cv.json").exists()])
    listing = paths.ensemble_dir / "backbones.json"
    for model_id in (artifacts.read_json(listing) if listing.exists() else {}):
        record = _record(cfg, paths.backbone_dir(model_id) / TRACKING_FILE)
        if record is not None and paths.submission(model_id).exists():
            _warn_on_failure(f"the submission of {model_id}",
                             lambda r=record, m=model_id: _backend(cfg).log_file(r["run_id"], paths.submission(m)))


def run_id_for(cfg: Config, model_id: str) -> str | None:
    """The tracked run of a model (a backbone id or an ensemble method), or None (for leaderboards)."""
    paths = Paths(cfg)
    for folder in (paths.backbone_dir(model_id), paths.ensemble_method_dir(model_id)):
        if (folder / TRACKING_FILE).exists():
            return artifacts.read_json(folder / TRACKING_FILE).get("run_id")
    return None


# ----------------------------------------------------------------------------- pieces


def git_state(repo: Path | None = None) -> dict[str, str]:
    """The code's commit and whether tracked files differ from it (``unknown`` outside git)."""
    repo = repo or Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"mlflow.source.git.commit": commit or "unknown",
            "git.dirty": "unknown" if status is None else str(bool(status)).lower()}


def as_params(tree: dict) -> dict[str, str]:
    """A nested mapping as tracker parameters: :func:`~pipeline.config.schema.flatten`'s dotted keys
    with text values, lists as YAML, cut to MLflow's length limit:
    ``{"train": {"frozen": {"lr": 0.001}}}`` -> ``{"train.frozen.lr": "0.001"}``."""
    return {name: _param_text(value) for name, value in flatten(tree).items()}


def _param_text(value) -> str:
    text = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True).strip()
    return text.removesuffix("\n...")[:MAX_PARAM_CHARS]


def history_metrics(rows: list[dict]) -> list[tuple[str, float, int]]:
    """(key, value, epoch) for every finite number of ``history.csv`` rows but the epoch itself."""
    out = []
    for row in rows:
        for key, value in row.items():
            if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                out.append((key, float(value), int(row["epoch"])))
    return out


def cv_metrics(cv: dict) -> list[tuple[str, float, int]]:
    out = [(k, float(cv[k]), 0) for k in ("cv_mean", "cv_std", "oof", "cv_untuned", "nested_cv")
           if isinstance(cv.get(k), (int, float))]
    return out + [("cv_fold", float(v), k) for k, v in enumerate(cv.get("folds", [])) if v is not None]


def _log_fold(cfg: Config, parent: str, fold: int, history: list[dict]) -> None:
    backend = _backend(cfg)
    backend.drop_child(parent, fold)
    child = backend.start_run(f"fold{fold}", {"pipeline.fold": str(fold)}, parent=parent)
    backend.log_metrics(child, history_metrics(history))
    backend.finish(child)


def _log_method(cfg: Config, method: str) -> None:
    paths = Paths(cfg)
    folder = paths.ensemble_method_dir(method)
    backend = _backend(cfg)
    run_id = backend.start_run(f"ensemble-{method}", {**git_state(), "pipeline.model": method,
                                                      "pipeline.kind": "ensemble"})
    backend.log_params(run_id, as_params({"ensemble": cfg.to_dict()["ensemble"], "metric": cfg.metric,
                                          "method": method}))
    backend.log_metrics(run_id, cv_metrics(artifacts.read_json(folder / "cv.json")))
    for path in (folder / "cv.json", folder / "params.json", paths.submission(method)):
        if path.exists():
            backend.log_file(run_id, path)
    backend.finish(run_id)
    _write_record(cfg, folder / TRACKING_FILE, run_id, artifacts.file_digest(folder / "cv.json"))


def _model_record(cfg: Config, bcfg: BackboneConfig) -> dict | None:
    if cfg.tracking.backend == "none" or not distributed.is_main():
        return None
    return _record(cfg, Paths(cfg).backbone_dir(bcfg.slug) / TRACKING_FILE)


def _record(cfg: Config, path: Path) -> dict | None:
    """The run recorded at ``path`` when it was made with this backend and URI."""
    if not path.exists():
        return None
    record = artifacts.read_json(path)
    same = record.get("backend") == cfg.tracking.backend and record.get("uri") == default_uri(cfg)
    return record if same else None


def _write_record(cfg: Config, path: Path, run_id: str, key: str) -> None:
    artifacts.write_json(path, {"backend": cfg.tracking.backend, "uri": default_uri(cfg), "run_id": run_id,
                                "key": key})


def _warn_on_failure(what: str, log) -> None:
    """Logging after training has started never stops it: one line says what was not logged."""
    try:
        log()
    except Exception as exc:  # a server gone away, a full disk: the run's files are all on disk
        print(f"tracking: {what} was not logged ({type(exc).__name__}: {' '.join(str(exc).split())[:200]}); "
              f"re-running the same `train` command logs it")


def default_uri(cfg: Config) -> str:
    """``tracking.uri``, or a local store beside ``runs_dir``: MLflow's SQLite database in
    ``mlruns/mlflow.db`` (artifacts in ``mlruns/artifacts/``), TensorBoard's ``tensorboard/``."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    root = Path(cfg.runs_dir).resolve().parent
    if cfg.tracking.backend == "mlflow":
        return f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    return str(root / "tensorboard")


def _backend(cfg: Config):
    if cfg.tracking.backend == "mlflow":
        return MlflowBackend(cfg)
    if cfg.tracking.backend == "tensorboard":
        return TensorBoardBackend(cfg)
    raise PipelineError(f"tracking.backend '{cfg.tracking.backend}' logs nothing")


# ----------------------------------------------------------------------------- backends


class MlflowBackend:
    """MLflow through its client API (no active-run globals), experiment = the config's name."""

    def __init__(self, cfg: Config):
        uri = default_uri(cfg)
        artifact_root = None
        if not cfg.tracking.uri:  # the default local store: the database and artifacts under mlruns/
            folder = Path(cfg.runs_dir).resolve().parent / "mlruns"
            folder.mkdir(parents=True, exist_ok=True)
            artifact_root = (folder / "artifacts").as_uri()
        elif "://" not in uri or uri.startswith("file:"):  # MLflow's file store, asked for by name
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        try:
            self.client = MlflowClient(tracking_uri=uri)
            found = self.client.get_experiment_by_name(cfg.name)
            self.experiment_id = (found.experiment_id if found is not None else
                                  self.client.create_experiment(cfg.name, artifact_location=artifact_root))
        except Exception as exc:
            reason = " ".join(str(exc).split())[:300]
            raise PipelineError(f"tracking.uri {uri}: MLflow cannot use it ({type(exc).__name__}: {reason}); "
                                f"fix tracking.uri or set tracking.backend=none") from None

    def start_run(self, name: str, tags: dict[str, str], parent: str | None = None) -> str:
        tags = {**tags, **({"mlflow.parentRunId": parent} if parent else {})}
        return self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(run_id, params=items[i:i + 100])

    def log_metrics(self, run_id: str, metrics: list[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v, step in metrics]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i:i + 1000])

    def log_text(self, run_id: str, name: str, text: str) -> None:
        self.client.log_text(run_id, text, name)

    def log_file(self, run_id: str, path: Path) -> None:
        self.client.log_artifact(run_id, str(path))

    def child_folds(self, parent: str) -> set[int]:
        return {int(r.data.tags["pipeline.fold"]) for r in self._children(parent)}

    def drop_child(self, parent: str, fold: int) -> None:
        for run in self._children(parent):
            if run.data.tags.get("pipeline.fold") == str(fold):
                self.client.delete_run(run.info.run_id)

    def _children(self, parent: str):
        return self.client.search_runs([self.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'")

    def finish(self, run_id: str) -> None:
        self.client.set_terminated(run_id)


class TensorBoardBackend:
    """TensorBoard event files: a run is a folder ``<exp>/<id>-<time>`` under the log folder, a
    fold's child run its sub-folder ``fold<k>`` (so the folds' curves overlay on one chart), text
    summaries for the config and git state, and files copied into the run's ``files/``."""

    def __init__(self, cfg: Config):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise PipelineError("tracking.backend tensorboard needs the tensorboard package; "
                                "pip install -e '.[tracking]'") from None
        self.writer_class, self.root, self.experiment = SummaryWriter, Path(default_uri(cfg)), cfg.name

    def _write(self, run_id: str, fn) -> None:
        writer = self.writer_class(str(self.root / run_id))
        try:
            fn(writer)
        finally:
            writer.close()

    def start_run(self, name: str, tags: dict[str, str], parent: str | None = None) -> str:
        run_id = f"{parent}/{name}" if parent else f"{self.experiment}/{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        text = "\n".join(f"    {k}: {v}" for k, v in tags.items())  # indented: a code block in TensorBoard
        self._write(run_id, lambda w: w.add_text("tags", text))
        return run_id

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        text = "\n".join(f"    {k}: {v}" for k, v in params.items())
        self._write(run_id, lambda w: w.add_text("params", text))

    def log_metrics(self, run_id: str, metrics: list[tuple[str, float, int]]) -> None:
        self._write(run_id, lambda w: [w.add_scalar(k, v, step) for k, v, step in metrics])

    def log_text(self, run_id: str, name: str, text: str) -> None:
        artifacts.write_text(self.root / run_id / "files" / name, text)

    def log_file(self, run_id: str, path: Path) -> None:
        (self.root / run_id / "files").mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, self.root / run_id / "files" / Path(path).name)

    def child_folds(self, parent: str) -> set[int]:
        folder = self.root / parent
        return {int(p.name[4:]) for p in folder.glob("fold*") if p.is_dir() and p.name[4:].isdigit()}

    def drop_child(self, parent: str, fold: int) -> None:
        shutil.rmtree(self.root / parent / f"fold{fold}", ignore_errors=True)

    def finish(self, run_id: str) -> None:
        pass  # every call closed its writer
