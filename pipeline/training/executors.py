"""Folds as Ray tasks (``train.executor: ray``): each unfinished (model, fold) trains on a node of a
Ray cluster, and its files travel back through Ray's object store, so no file system is shared.

On the worker a fold trains exactly as it does here (:func:`~pipeline.training.trainer.train_fold`,
from the resolved per-model config the driver sends, so no worker re-plans or re-decides), into a
folder under the node's Ray temporary directory; the task returns the fold's files as bytes
(:func:`~pipeline.training.fingerprint.fold_outputs`: the kept weights, ``oof.csv``, ``test.csv``,
``history.csv``, ``kept.json``). The driver writes them atomically into ``runs/<exp>/<id>/fold<k>/``
beside the ``config.yaml`` it wrote when it submitted the fold, then marks them done with the fold's
digest: the folder a local run writes, byte for byte.

A task whose worker dies (killed, out of memory, its node gone) is retried, :data:`MAX_RETRIES`
times. A retry on the same machine finds the dead attempt's folder and resumes after its last
finished epoch; elsewhere it starts the fold again. Either way the files are the same, since a
fold's randomness is a function of (seed, fold, epoch) only. An error in the fold itself (bad data,
a diverged loss) is not retried: it is reported, after the other folds have finished.

Every node needs this project installed (the same version: the task is this module's function)
and the competition's data at the same absolute path; ``runs/`` lives on the driver alone.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from pipeline.config.paths import Paths
from pipeline.config.schema import BackboneConfig, Config, dump_config
from pipeline.core import artifacts, locks
from pipeline.core.errors import PipelineError
from pipeline.data.images import PATH
from pipeline.domain.tasks import TaskSpec
from pipeline.engine.backbones import PRETRAINED, pretrained_file
from pipeline.engine.fit import PROCESSES_ENV
from pipeline.training.fingerprint import fold_digest, fold_is_done, fold_outputs
from pipeline.training.trainer import FoldJob, FoldResult, train_fold

MAX_RETRIES = 3  # attempts after the first when a task's worker process or node dies
WORK_DIR = "pipeline-folds"  # under each node's Ray temporary directory: one folder per fold in training
OWNER_FILE = "worker.json"  # in a fold's work folder: the node and process training it


@dataclass(frozen=True)
class FoldTask:
    """One fold for a worker: the resolved config the driver wrote to ``config.yaml``, the fold,
    its digest (computed here, where the folds file is) and, for weights from a file (a path, or
    ``pretrained:<id>``, which lives in the driver's ``runs/``), a Ray reference to the file's bytes."""

    cfg: Config
    bcfg: BackboneConfig
    fold: int
    digest: str
    weights: Any = None  # ray.ObjectRef of the weights file's bytes, one copy per model


@dataclass
class FoldFiles:
    """What a fold task returns: the fold's files by name, how it trained (without the prediction
    frames, which are in the files), where and when it ran."""

    files: dict[str, bytes]
    result: FoldResult
    node_id: str
    node_ip: str
    started: float  # time.time() on the worker, when the task began
    finished: float  # ... and when its files were read
    seconds: float  # the fold's training and prediction
    resumed_epochs: int = 0  # epochs a dead attempt had finished in this node's work folder


@dataclass
class FinishedFold:
    """A fold whose files the driver has written: its task's answer and the driver's timings."""

    cfg: Config
    bcfg: BackboneConfig
    fold: int
    out: FoldFiles
    submitted: float  # time.time() on the driver
    written: float

    @property
    def node(self) -> str:
        return f"{self.out.node_ip} ({self.out.node_id[:8]})"


def ray_module():
    """``ray``, or a one-line error that says how to install it."""
    try:
        import ray
    except ImportError:
        raise PipelineError("train.executor ray: ray is not installed; pip install -e '.[scale]'") from None
    return ray


# ---------------------------------------------------------------------------- on the worker


def work_folder(temp_dir: str | Path, task: FoldTask) -> Path:
    """The fold's folder on a node: the same for every attempt of the same fold and digest."""
    return Path(temp_dir) / WORK_DIR / f"{task.cfg.name}-{task.bcfg.slug}-fold{task.fold}-{task.digest[:16]}"


def run_fold_task(task: FoldTask, inputs: tuple[TaskSpec, pd.DataFrame, pd.DataFrame]) -> FoldFiles:
    """The Ray task: train one fold into this node's work folder and return its files."""
    import ray

    started, start = time.time(), time.perf_counter()
    spec, table, test = inputs
    context = ray.get_runtime_context()
    node_id, node_ip = context.get_node_id(), ray.util.get_node_ip_address()
    missing = next((p for p in (table[PATH].iloc[0], test[PATH].iloc[0]) if not os.path.isfile(p)), None)
    if missing is not None:
        raise PipelineError(f"node {node_ip}: image {missing} does not exist there; every node of the Ray cluster "
                            f"needs the competition's data at the same path as the driver (data.root)")
    work = work_folder(context.get_temp_dir(), task)
    cfg = task.cfg.replace(runs_dir=str(work / "runs"))  # runs_dir is run-only: the same fold, written here
    paths = Paths(cfg)
    fold_dir = paths.fold_dir(task.bcfg.slug, task.fold)
    resumed = _finished_epochs(fold_dir) if (fold_dir / "resume.safetensors").exists() else 0
    artifacts.write_json(work / OWNER_FILE, {"pid": os.getpid(), "node_id": node_id, "node_ip": node_ip,
                                             "started": started})
    bcfg = _with_weights(task, ray.get(task.weights) if task.weights is not None else None, work, paths)
    artifacts.remove_stale_temps(fold_dir)  # left by a dead attempt's writes
    with _node_share(context):
        result = train_fold(FoldJob(cfg, bcfg, spec, table, task.fold, test, fold_dir, task.digest,
                                    progress=False, feature_cache_dir=paths.feature_cache_dir(bcfg.slug)))
    outputs = fold_outputs(fold_dir, True)
    if not artifacts.is_up_to_date(outputs, task.digest):
        raise PipelineError(f"node {node_ip}: fold {task.fold} of {task.bcfg.slug} finished without all of its files "
                            f"in {fold_dir}")
    files = {p.name: p.read_bytes() for p in outputs}
    seconds = time.perf_counter() - start
    shutil.rmtree(work, ignore_errors=True)
    return FoldFiles(files, dataclasses.replace(result, oof=None, test=None), node_id, node_ip, started, time.time(),
                     seconds, resumed)


def _with_weights(task: FoldTask, data: bytes | None, work: Path, paths: Paths) -> BackboneConfig:
    """The entry with its weights file written into the work folder: ``pretrained:<id>`` where the
    worker's runs/ has it, a path under the work folder's ``weights/`` (and the entry pointing there)."""
    bcfg = task.bcfg
    if data is None:
        return bcfg
    local = (pretrained_file(bcfg.weights, paths.exp_dir) if bcfg.weights.startswith(PRETRAINED)
             else work / "weights" / Path(bcfg.weights).name)
    with artifacts.atomic_path(local) as tmp:
        tmp.write_bytes(data)
    return bcfg if bcfg.weights.startswith(PRETRAINED) else dataclasses.replace(bcfg, weights=str(local))


def _finished_epochs(fold_dir: Path) -> int:
    history = fold_dir / "history.csv"
    return len(pd.read_csv(history)) if history.exists() else 0


@contextmanager
def _node_share(context) -> Iterator[None]:
    """Size the fold's loader workers to its share of the node (the tasks its resources let share
    the node: one per GPU, or per CPU it was given), as ``--jobs N`` does, for the task's length."""
    import ray

    assigned = context.get_assigned_resources()
    kind = "GPU" if assigned.get("GPU") else "CPU"
    node = next((n for n in ray.nodes() if n["NodeID"] == context.get_node_id()), {"Resources": {}})
    share = max(1, int(node["Resources"].get(kind, 1) // max(assigned.get(kind, 1.0), 1e-3)))
    previous = os.environ.get(PROCESSES_ENV)
    os.environ[PROCESSES_ENV] = str(share)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(PROCESSES_ENV, None)
        else:
            os.environ[PROCESSES_ENV] = previous


# ---------------------------------------------------------------------------- on the driver


def connect(address: str | None) -> bool:
    """Join the cluster at ``address`` (train.ray_address), or start a Ray instance here (None);
    True when this call connected (and :meth:`RayFolds.close` disconnects)."""
    ray = ray_module()
    if ray.is_initialized():  # the caller's own connection (a notebook, a test): use it, leave it
        return False
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address not in (None, "auto"):
        _check_reachable(address)
    try:
        if address is None:
            ray.init(address="local", include_dashboard=False, **quiet)
        else:
            ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise PipelineError(f"train.ray_address {address}: cannot join a Ray cluster there ({first.strip()[:200]}); "
                            f"start one (`ray start --head` on the head node) or set train.ray_address=null") from None
    return True


def _check_reachable(address: str, seconds: float = 10.0) -> None:
    """Fail in seconds, in one line, where nothing listens (Ray itself retries a missing head for minutes)."""
    host, port = address.removeprefix("ray://").rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=seconds).close()
    except OSError as exc:
        raise PipelineError(f"train.ray_address {address}: nothing answers at {host}:{port} ({exc.strerror or exc}); "
                            f"start the head node there (`ray start --head`), or set train.ray_address=null to "
                            f"start Ray on this machine") from None


def _absolute(frame: pd.DataFrame) -> pd.DataFrame:
    """Image paths that mean the same on every node (relative ones would resolve in the worker's folder)."""
    frame = frame.copy()
    frame[PATH] = [os.path.abspath(p) if isinstance(p, str) else p for p in frame[PATH]]
    return frame


@dataclass
class _Submitted:
    cfg: Config
    bcfg: BackboneConfig
    fold: int
    digest: str
    submitted: float
    lock: ExitStack  # the fold's lock in runs/, held until its files are written


class RayFolds:
    """The driver's side: :meth:`submit` a model's folds, then :meth:`finished` yields each one as
    its files are written. One instance per train run; :meth:`close` when done."""

    def __init__(self, address: str | None, spec: TaskSpec, table: pd.DataFrame, test: pd.DataFrame):
        ray = ray_module()
        self.address = address
        self.connected_here = connect(address)
        self.inputs = ray.put((spec, _absolute(table), _absolute(test)))  # one copy in the object store
        gpus = ray.cluster_resources().get("GPU", 0)
        self.resources: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1}
        # SPREAD: N nodes train N folds at once rather than the driver's node filling up first
        self.task = ray.remote(max_retries=MAX_RETRIES, retry_exceptions=False,
                               scheduling_strategy="SPREAD")(run_fold_task)
        self.pending: dict[Any, _Submitted] = {}

    def describe(self) -> str:
        ray = ray_module()
        nodes = [n for n in ray.nodes() if n["Alive"]]
        per = "one GPU" if "num_gpus" in self.resources else "one CPU"
        return (f"Ray cluster of {len(nodes)} node{'s' * (len(nodes) != 1)} "
                f"({', '.join(sorted({n['NodeManagerAddress'] for n in nodes}))}), {per} per fold")

    def submit(self, cfg: Config, bcfg: BackboneConfig, folds: list[int], force: bool) -> list[int]:
        """Send the folds not finished (and not being trained by another run here) as tasks; return them."""
        ray, sent, weights = ray_module(), [], None
        for k in folds:
            fold_dir = Paths(cfg).fold_dir(bcfg.slug, k)
            lock = ExitStack()
            held = lock.enter_context(locks.hold(fold_dir, f"fold {k} of {bcfg.slug}", "is being trained"))
            if not held or not (force or not fold_is_done(cfg, bcfg, k)):  # done meanwhile by another run: skip
                lock.close()
                continue
            artifacts.write_text(fold_dir / "config.yaml", dump_config(cfg.replace(backbones=[bcfg])))
            source = weights_file(cfg, bcfg)
            if source is not None and weights is None:
                weights = ray.put(source.read_bytes())
            task = FoldTask(cfg, bcfg, k, fold_digest(cfg, bcfg, k), weights)
            ref = self.task.options(**self.resources).remote(task, self.inputs)
            self.pending[ref] = _Submitted(cfg, bcfg, k, task.digest, time.time(), lock)
            sent.append(k)
        return sent

    def finished(self) -> Iterator[FinishedFold]:
        """Each submitted fold as it finishes, its files written; a PipelineError after the last
        when any failed."""
        ray = ray_module()
        failures = []
        while self.pending:
            (ref,), _ = ray.wait(list(self.pending), num_returns=1)
            sub = self.pending.pop(ref)
            with sub.lock:
                try:
                    out: FoldFiles = ray.get(ref)
                except ray.exceptions.RayError as exc:
                    failures.append(f"fold {sub.fold} of {sub.bcfg.slug}: {_reason(exc)}")
                    continue
                write_fold(sub.cfg, sub.bcfg, sub.fold, out.files, sub.digest)
            yield FinishedFold(sub.cfg, sub.bcfg, sub.fold, out, sub.submitted, time.time())
        if failures:
            raise PipelineError(f"{len(failures)} fold task{'s' * (len(failures) > 1)} failed on the Ray cluster; "
                                + "; ".join(failures))

    def close(self) -> None:
        for sub in self.pending.values():
            sub.lock.close()
        self.pending.clear()
        if self.connected_here:
            ray_module().shutdown()


def write_fold(cfg: Config, bcfg: BackboneConfig, fold: int, files: dict[str, bytes], digest: str) -> None:
    """A task's files into ``runs/<exp>/<id>/fold<k>/``, each atomically, then marked done."""
    fold_dir = Paths(cfg).fold_dir(bcfg.slug, fold)
    outputs = fold_outputs(fold_dir, True)
    missing = [p.name for p in outputs if p.name not in files]
    if missing:
        raise PipelineError(f"fold {fold} of {bcfg.slug}: the task returned no {', '.join(missing)}")
    for path in outputs:
        with artifacts.atomic_path(path) as tmp:
            tmp.write_bytes(files[path.name])
    (fold_dir / "resume.safetensors").unlink(missing_ok=True)  # a local run's, interrupted: this fold is done
    artifacts.mark_done(outputs, digest)


def weights_file(cfg: Config, bcfg: BackboneConfig) -> Path | None:
    """The file the entry's weights come from, which the workers get from here (None: ``hub``,
    ``bundled`` and ``none``, which each node has by itself)."""
    if bcfg.weights in ("hub", "bundled", "none"):
        return None
    if bcfg.weights.startswith(PRETRAINED):
        return pretrained_file(bcfg.weights, Paths(cfg).exp_dir)
    return Path(bcfg.weights)


def _reason(exc: Exception) -> str:
    """One line of a task's failure: the fold's own error, or why its worker died."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, PipelineError):
        return str(cause)
    if cause is not None:
        return f"{type(cause).__name__}: {' '.join(str(cause).split())[:300]}"
    first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return f"{type(exc).__name__} after {MAX_RETRIES} retries: {first.strip()[:300]}"

