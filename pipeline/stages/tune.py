"""Tune stage: an Optuna search for each backbone's learning rates, handed to the train stage.

A trial trains ``tune.folds`` (default fold 0) with the train stage's own fold trainer
(:class:`pipeline.training.trainer.FoldJob` with ``out_dir=None``) on a short budget
(``tune.frozen_epochs`` / ``tune.unfrozen_epochs`` instead of ``train.*.epochs``) and scores the
competition metric. It reports after every epoch, so the pruner stops bad trials early. When the
budget has unfrozen epochs, only those are reported (step = fold position x unfrozen epochs +
unfrozen epoch): the frozen phase's score reflects the head LR alone and costs milliseconds on
cached features, and Optuna's median pruner compares a trial's *best* reported value, which a
good frozen-phase score would inflate so that no unfrozen LR is ever pruned. A trial's last
epoch is never pruned: that saves nothing. The
search space is log-uniform within the ``tune:`` bounds: the head LR of the frozen phase
(``frozen_lr``; none with ``train.linear_probe``), the LR of the unfrozen phase (``unfrozen_lr``),
the backbone's share of it (``backbone_lr_mult``) and, when ``tune.weight_decay`` is given, the
weight decay. A phase with
no epochs in the budget has nothing to tune and is left out. The first trial of a new study runs
the config's own LRs (when inside the bounds): the study then shows what tuning gained.

Outputs (``runs/<exp>/<backbone>/tune/``): ``best.json`` (read by ``train.use_tuned``; it records
the study's objective, and the train stage takes its LRs only while the config still matches it),
``trials.csv``, ``config.yaml`` (the resolved config, also what worker processes load), and
plots: ``optimization_history.png``, ``intermediate_values.png`` (learning curves: pruned trials
stop early), ``param_importances.png``, ``lr_vs_score.png``.

Storage and resuming
--------------------
``tune.storage`` is an Optuna storage URL. The default is a SQLite file,
``runs/<exp>/<backbone>/tune/study.db``, opened through :class:`optuna.storages.RDBStorage`
with a 60 s busy timeout. SQLite serialises writers with a file lock; Optuna's writes are a
few short transactions per epoch, so several worker processes on one machine wait milliseconds
for each other and the timeout only turns a rare collision into a wait instead of a "database is
locked" error. (A SQLite file is not safe on a network file system: use a database server to
share a study between machines.) Every trial's state is committed as it happens, so a killed
run loses only the trial it was running. The study is named ``<exp>-<backbone>`` and loaded if it
exists: running ``make tune`` again continues it until ``tune.trials`` trials have *finished*
(complete or pruned) in total. Failed trials do not count; three failures in a row stop the run
with the last error. A :class:`~pipeline.core.errors.PipelineError` (bad input) stops it at once.
The study also records what its scores depend on (data, folds, metric, training config but the
tuned keys, ``tune.folds`` and epochs); a changed objective is an error, and ``--force`` deletes
the study and starts over.

A killed worker
---------------
A trial left RUNNING by a killed process is marked FAIL and queued again with the same
parameters (Optuna's heartbeat-stale retry, at most ``RETRIES`` times): a process of this machine
that finds a dead pid does it at once; any other trial is failed once its heartbeat is older
than the grace period. Every running trial writes a heartbeat: on a database server every
``SERVER_HEARTBEAT_S`` (2 s) with a grace period of ``SERVER_GRACE_S`` (10 s), so a machine that
dies mid-trial costs the others about ten seconds; on SQLite every 60 s with 300 s of grace (the
pid check covers the one machine a SQLite file serves). A worker that runs out of trials to start
while others are still running waits for them (it polls the study, failing stale trials), so
every worker ends with a study of ``tune.trials`` finished trials and writes the same report.

Parallel workers
----------------
``make tune WORKERS=4`` starts 3 extra processes (``python -m pipeline tune -c
runs/<exp>/<backbone>/tune/config.yaml --backbone B --workers 1``) beside itself; all four ask
the same study for trials. Each gets a share of the CPU threads (``OMP_NUM_THREADS``) or one GPU
(``CUDA_VISIBLE_DEVICES``, round robin). Several machines share one study through a database
server; on each of them, with the same config and data (and folds: ``make folds`` is seeded)::

    export PGPASSWORD=...   # read by libpq: the password stays out of the URL, the command line and files
    make tune WORKERS=2 ARGS="--backbone efficientnet_lite0 tune.storage=postgresql://tuner@db-host:5432/optuna"

(``pip install -e '.[scale]'`` installs the driver, psycopg; ``mysql+pymysql://...`` with ``pip
install pymysql`` works too). A password given in the URL instead is never printed or written:
messages, ``best.json`` and the tune folder's ``config.yaml`` show it as ``***`` (worker
processes get the real URL in their environment, ``PIPELINE_TUNE_STORAGE``). Only the process
that creates the study queues the config's own LRs, and every process but that one seeds its
sampler with its host and pid too, so machines started at the same moment draw different
parameters. Every machine stops when the study holds ``tune.trials`` finished trials and writes
the report from the shared study into its own ``runs/``; any later ``make tune`` with the same URL
rewrites it without training.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import math
import os
import socket
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import psutil
import torch
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState
from tqdm.auto import tqdm

from pipeline.config.paths import Paths
from pipeline.config.run_only import setting_changes
from pipeline.config.schema import BackboneConfig, Config, dump_config
from pipeline.core import artifacts
from pipeline.core.errors import PipelineError
from pipeline.core.memory import resident_mib  # for the trials table
from pipeline.data.tables import read_folds, task_spec
from pipeline.domain.metrics import Metric, get_metric
from pipeline.domain.tasks import TaskSpec
from pipeline.engine.backbones import check_model_name
from pipeline.engine.features import FeatureStore
from pipeline.engine.fit import NonFiniteLoss
from pipeline.training.trainer import FoldJob, FoldResult, train_fold
from pipeline.training.tuned import Budget, objective_parts, tune_budget

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


WORKER_ENV = "PIPELINE_TUNE_WORKER"  # set in worker processes: their index (1..N-1)
STORAGE_ENV = "PIPELINE_TUNE_STORAGE"  # set in worker processes: the storage URL, password included


# Heartbeats (seconds): a trial whose last heartbeat is older than the grace period is failed and retried
SERVER_HEARTBEAT_S, SERVER_GRACE_S = 2, 10  # a database server: a dead machine costs the others ~10 s
SQLITE_HEARTBEAT_S, SQLITE_GRACE_S = 60, 300  # one machine: its dead processes are found by pid at once
RETRIES = 2  # a killed trial runs again with the same parameters at most this often
WAIT_POLL_S = 1.0  # how often a worker without a trial to start looks at the study


MAX_FAILURES_IN_A_ROW = 3


REPORT_FILES = ("best.json", "trials.csv", "optimization_history.png", "intermediate_values.png",
                "param_importances.png", "lr_vs_score.png")


class TrialFailed(Exception):
    """A trial raised something other than bad input: recorded as FAIL, the search goes on."""


class SurplusTrial(Exception):
    """Another worker started the study's last trial first: this one is recorded as FAIL, unrun."""


def _without_traceback(record) -> bool:
    """A logging filter for Optuna's failed-trial warnings: a trial this stage failed on purpose
    (``TrialFailed``, ``SurplusTrial``) is one line, its reason in the message, not a traceback."""
    if record.exc_info and isinstance(record.exc_info[1], (TrialFailed, SurplusTrial)):
        record.exc_info, record.exc_text = None, None
    return True


OPTUNA_TRIAL_LOGGER = "optuna.study._optimize"  # where Optuna logs a failed trial, with its exc_info


def search_space(cfg: Config, budget: Budget) -> dict[str, tuple[float, float]]:
    """The tuned parameters and their log-uniform bounds; a phase without epochs has none."""
    t, space = cfg.tune, {}
    if budget.frozen_epochs > 0 and not cfg.train.linear_probe:  # the probe has no LR
        space["frozen_lr"] = tuple(t.frozen_lr)
    if budget.unfrozen_epochs > 0:
        space["unfrozen_lr"] = tuple(t.unfrozen_lr)
        if cfg.train.unfrozen.layer_decay is None:  # layer-wise decay replaces the multiplier
            space["backbone_lr_mult"] = tuple(t.backbone_lr_mult)
    if t.weight_decay is not None:
        space["weight_decay"] = tuple(t.weight_decay)
    return space


def config_params(cfg: Config) -> dict[str, float]:
    """The config's own values of every tunable parameter."""
    t = cfg.train
    return {"frozen_lr": t.frozen.lr, "unfrozen_lr": t.unfrozen.lr,
            "backbone_lr_mult": t.unfrozen.backbone_lr_mult, "weight_decay": t.weight_decay}


def trial_config(cfg: Config, budget: Budget, params: dict[str, float]) -> Config:
    """The config one trial trains with: the budget's epochs and the trial's parameters."""
    t = cfg.train
    frozen = dataclasses.replace(t.frozen, epochs=budget.frozen_epochs, lr=params.get("frozen_lr", t.frozen.lr))
    unfrozen = dataclasses.replace(t.unfrozen, epochs=budget.unfrozen_epochs,
                                   lr=params.get("unfrozen_lr", t.unfrozen.lr),
                                   backbone_lr_mult=params.get("backbone_lr_mult", t.unfrozen.backbone_lr_mult))
    train = dataclasses.replace(t, frozen=frozen, unfrozen=unfrozen,
                                weight_decay=params.get("weight_decay", t.weight_decay))
    return cfg.replace(train=train)


def study_name(cfg: Config, bcfg: BackboneConfig) -> str:
    return f"{cfg.name}-{bcfg.slug}"


def storage_url(cfg: Config, bcfg: BackboneConfig) -> str:
    if cfg.tune.storage:
        return cfg.tune.storage
    return f"sqlite:///{(Paths(cfg).tune_dir(bcfg.slug) / 'study.db').resolve()}"


def shown_url(url: str) -> str:
    """The URL with any password hidden (for messages, best.json and the tune folder's config.yaml)."""
    try:
        from sqlalchemy.engine import make_url
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def url_password(url: str) -> str | None:
    try:
        from sqlalchemy.engine import make_url
        return make_url(url).password
    except Exception:
        return None


def heartbeat(url: str) -> tuple[int, int]:
    """(heartbeat interval, grace period) in seconds for a storage URL."""
    if url.startswith("sqlite"):
        return SQLITE_HEARTBEAT_S, SQLITE_GRACE_S
    return SERVER_HEARTBEAT_S, SERVER_GRACE_S


def retry_callback():
    """Optuna's retry of a heartbeat-stale trial (renamed in Optuna 4.9; the old name for older releases)."""
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        if retry is not None:
            return retry(max_retry=RETRIES)
        return optuna.storages.RetryFailedTrialCallback(max_retry=RETRIES)


STORAGE_HINT = ("Check the URL (e.g. postgresql://user@host:5432/db, with the password in PGPASSWORD), that the "
                "database server is running and reachable from this machine, and that its driver is installed "
                "(pip install -e '.[scale]' for PostgreSQL: psycopg, which postgresql+psycopg:// names where "
                "SQLAlchemy < 2.1 wants psycopg2; pip install pymysql for mysql+pymysql://); or remove tune.storage "
                "to use the default SQLite file under runs/<exp>/<backbone>/tune/")


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna RDB storage (SQLite, PostgreSQL, MySQL) with a clear error when it cannot be used."""
    engine_kwargs: dict = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 60}
    elif url.startswith(("postgresql", "mysql")):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    interval, grace = heartbeat(url)
    callback = retry_callback()
    key = ("heartbeat_stale_trial_callback" if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback")
           else "failed_trial_callback")
    attempts = 0
    while True:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, heartbeat_interval=interval,
                                                  grace_period=grace, **{key: callback})
        except Exception as exc:
            attempts += 1
            if attempts < 3 and creation_race(exc):
                time.sleep(0.5)  # another worker is creating Optuna's tables in the same empty database
                continue
            raise PipelineError(f"config key 'tune.storage': cannot open the Optuna storage {shown_url(url)} "
                                f"({failure_reason(exc, url)}). {STORAGE_HINT}") from None


def creation_race(exc: Exception) -> bool:
    """Two workers creating Optuna's tables at once: one of them sees a duplicate table or type."""
    text = str(exc).lower()
    return "already exists" in text or "duplicate key" in text or "unique constraint" in text


def failure_reason(exc: Exception, url: str) -> str:
    """The first line of a connection error, with the URL's password (should a driver quote it) hidden."""
    text = str(exc).strip()
    reason = text.splitlines()[0] if text else ""
    password = url_password(url)
    if password:
        reason = reason.replace(password, "***")
    reason = reason.replace(url, shown_url(url))
    return f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__


def make_sampler(cfg: Config, seed: int) -> optuna.samplers.BaseSampler:
    if cfg.tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    startup = max(2, min(10, cfg.tune.trials // 3))  # Optuna's default of 10 random trials is most of a small study
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True,
                                          constant_liar=True)


def make_pruner(cfg: Config, budget: Budget) -> optuna.pruners.BasePruner:
    kind = cfg.tune.pruner
    if kind == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=max(2, min(5, cfg.tune.trials // 4)), n_warmup_steps=0)
    if kind == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(1, budget.total_judged),
                                              reduction_factor=3)
    if kind == "wilcoxon":
        if len(budget.folds) < 3:
            print(f"warning: tune.pruner wilcoxon compares trials fold by fold; with tune.folds {list(budget.folds)} "
                  f"it cannot prune (give 3 or more folds, or use tune.pruner=median)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.pruners.WilcoxonPruner(p_threshold=0.1, n_startup_steps=2)
    return optuna.pruners.NopPruner()


def process_seed(cfg: Config, n_existing: int, worker: int, created: bool = True) -> int:
    """A sampler seed per (seed, study size, worker): a resumed study or a second worker does not
    repeat the first one's random draws. A process that did not create the study mixes in its host
    and pid: machines that join a study at the same moment (same size, each worker 0) draw apart."""
    entropy = [cfg.tune.seed, n_existing, worker]
    if not created:
        entropy += [zlib.crc32(socket.gethostname().encode()), os.getpid()]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def count(study: optuna.Study, states) -> int:
    return len(study.get_trials(deepcopy=False, states=tuple(states)))


def release_memory(collect: bool = True) -> None:
    """Free a finished trial's model, optimizer and loaders before the next one (a full
    collection costs a few tenths of a second with torch, timm and optuna loaded: once a trial)."""
    if collect:
        gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Objective:
    """One trial: suggest parameters, train the tuning folds, report every epoch, return the mean
    of the folds' best scores (the score the train stage's checkpoint would have)."""

    def __init__(self, cfg: Config, bcfg: BackboneConfig, spec: TaskSpec, table: pd.DataFrame, budget: Budget,
                 target: int):
        self.cfg, self.bcfg, self.spec, self.table, self.budget, self.target = cfg, bcfg, spec, table, budget, target
        self.space = search_space(cfg, budget)
        self.metric = get_metric(cfg.metric, spec.task)
        self.per_fold = cfg.tune.pruner == "wilcoxon"  # one value per fold, step = fold
        self.feature_cache_dir = Paths(cfg).feature_cache_dir(bcfg.slug)
        self.store = FeatureStore()  # every trial of this process reuses the frozen features
        self.epochs_run = 0

    def __call__(self, trial: optuna.Trial) -> float:
        self._check_surplus(trial)
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        params = {name: trial.suggest_float(name, lo, hi, log=True) for name, (lo, hi) in self.space.items()}
        cfg = trial_config(self.cfg, self.budget, params)
        self.epochs_run = 0
        try:
            value = self._folds(trial, cfg)
        except (optuna.TrialPruned, PipelineError):
            raise
        except Exception as exc:  # a crash in one trial (e.g. out of memory) is not the study's end
            trial.set_user_attr("error", f"{type(exc).__name__}: {exc}"[:500])
            raise TrialFailed(f"{type(exc).__name__}: {exc}") from exc
        finally:
            trial.set_user_attr("epochs", self.epochs_run)
            trial.set_user_attr("budget_epochs", self.budget.total_epochs)
            release_memory()
            rss = resident_mib()
            if rss is not None:  # stays flat from trial to trial when nothing leaks
                trial.set_user_attr("rss_mib", rss)
        if not math.isfinite(value):
            trial.set_user_attr("error", f"{self.metric.name} is not finite ({value})")
        return value

    def _check_surplus(self, trial: optuna.Trial) -> None:
        study = trial.study
        ahead = [t for t in study.get_trials(deepcopy=False, states=FINISHED + (TrialState.RUNNING,))
                 if t.number < trial.number]
        if len(ahead) >= self.target:
            trial.set_user_attr("surplus", True)
            study.stop()
            raise SurplusTrial(f"not run: the study already has {len(ahead)} finished or running trials "
                               f"(tune.trials is {self.target}); another worker took the last one")

    def _folds(self, trial: optuna.Trial, cfg: Config) -> float:
        scores = []
        for position, fold in enumerate(self.budget.folds):
            result, reason = self._fold(trial, cfg, position, fold)
            release_memory(collect=False)  # the fold's trainer is gone with its last reference
            if result is None:
                raise optuna.TrialPruned(reason)
            scores.append(result.best_score)
            if self.per_fold:
                trial.report(result.best_score, fold)
                if position < len(self.budget.folds) - 1 and trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after fold {fold}: {self.metric.name} {result.best_score:.4f}")
        return float(np.mean(scores))

    def _fold(self, trial: optuna.Trial, cfg: Config, position: int, fold: int) -> tuple[FoldResult | None, str]:
        """Train one fold; (None, why) when pruned or diverged. Returning (not raising) from here
        drops the trainer's frames, so its model and optimizer can be freed before the next fold."""
        b = self.budget

        def report(epoch: int, value: float) -> None:
            self.epochs_run += 1
            if self.per_fold or epoch < b.judged_offset:
                return
            step = position * b.judged_per_fold + epoch - b.judged_offset  # folds never share a step
            trial.report(value, step)
            if step < b.total_judged - 1 and trial.should_prune():  # pruning the last step saves nothing
                raise optuna.TrialPruned(f"pruned at fold {fold} epoch {epoch}: {self.metric.name} {value:.4f}")

        job = FoldJob(cfg=cfg, bcfg=self.bcfg, spec=self.spec, table=self.table, fold=fold, report=report,
                      progress=False, feature_cache_dir=self.feature_cache_dir, store=self.store)
        try:
            return train_fold(job), ""
        except optuna.TrialPruned as exc:
            return None, str(exc)
        except NonFiniteLoss:  # too high an LR: a bad trial, not bad input
            trial.set_user_attr("diverged", True)
            return None, f"diverged at fold {fold}: the loss became NaN/inf"


class FailureGuard:
    """Optuna callback: stop after ``limit`` failed trials in a row (a bug, not bad luck)."""

    def __init__(self, limit: int = MAX_FAILURES_IN_A_ROW):
        self.limit, self.in_a_row, self.last_error, self.tripped = limit, 0, "", False

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trial.state in FINISHED:
            self.in_a_row = 0
        elif trial.state == TrialState.FAIL and not trial.user_attrs.get("surplus"):
            self.in_a_row += 1
            self.last_error = trial.user_attrs.get("error", "see the log above")
            if self.in_a_row >= self.limit:
                self.tripped = True
                study.stop()


class ProgressBar:
    """Optuna callback: a tqdm bar over the study's finished trials with the best value so far."""

    def __init__(self, study: optuna.Study, target: int, name: str):
        self.target = target
        self.bar = tqdm(total=target, initial=min(count(study, FINISHED), target), desc=f"tune {name}",
                        unit="trial", dynamic_ncols=True)
        self(study, None)

    def __call__(self, study: optuna.Study, trial) -> None:
        trials = study.get_trials(deepcopy=False, states=FINISHED)
        self.bar.n = min(len(trials), self.target)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        postfix = {"pruned": sum(t.state == TrialState.PRUNED for t in trials)}
        if complete:
            postfix["best"] = f"{study.best_value:.4f}"
        self.bar.set_postfix(postfix)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def run_tune(cfg: Config, backbone: str | None = None, workers: int = 1, force: bool = False) -> Path:
    """Tune every backbone's LRs (or one): ``runs/<exp>/<backbone>/tune/best.json`` and the report.

    ``workers`` > 1 starts ``workers - 1`` extra processes on the same study (see the module
    docstring, also for several machines). Returns the tune folder (of the last backbone).
    """
    if workers < 1:
        raise PipelineError(f"--workers must be at least 1, got {workers}")
    paths = Paths(cfg)
    table = read_folds(cfg)
    spec = task_spec(cfg, table)
    metric = get_metric(cfg.metric, spec.task)
    tune_budget(cfg)  # a bad budget (no epochs to judge) stops here, before anything is written
    backbones = [cfg.backbone(backbone)] if backbone else list(cfg.backbones)
    for bcfg in backbones:  # fail before any trial on a typo in a later backbone
        check_model_name(bcfg.name)
    worker = int(os.environ.get(WORKER_ENV, "0"))
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger(OPTUNA_TRIAL_LOGGER).addFilter(_without_traceback)
    try:
        for entry in backbones:
            vcfg, bcfg = cfg.variant(entry)
            TuneRun(vcfg, bcfg, spec, table, metric, tune_budget(vcfg), worker).run(workers, force)
    finally:
        logging.getLogger(OPTUNA_TRIAL_LOGGER).removeFilter(_without_traceback)
        optuna.logging.set_verbosity(verbosity)
    return paths.tune_dir(backbones[-1].slug)


class TuneRun:
    """One backbone's study: open it, top it up to ``tune.trials`` finished trials, report."""

    def __init__(self, cfg: Config, bcfg: BackboneConfig, spec: TaskSpec, table: pd.DataFrame, metric: Metric,
                 budget: Budget, worker: int = 0):
        self.cfg, self.bcfg, self.spec, self.table, self.metric, self.budget = cfg, bcfg, spec, table, metric, budget
        self.worker = worker
        self.paths = Paths(cfg)
        self.dir = self.paths.tune_dir(bcfg.slug)
        # a worker process's config.yaml shows the password as ***: the real URL comes in its environment
        self.url = os.environ.get(STORAGE_ENV) if worker and os.environ.get(STORAGE_ENV) else storage_url(cfg, bcfg)
        self.name = study_name(cfg, bcfg)
        self.created = False  # whether this process created the study (it then queues the config's LRs)
        self.storage: optuna.storages.RDBStorage | None = None
        self.target = cfg.tune.trials
        self.space = search_space(cfg, budget)
        self.report = StudyReport(self)

    def open_study(self, force: bool) -> optuna.Study:
        if self.cfg.tune.storage is None:
            self.dir.mkdir(parents=True, exist_ok=True)
        storage = self.storage = open_storage(self.url)  # before anything is written for a server URL
        if force and not self.worker:
            try:
                optuna.delete_study(study_name=self.name, storage=storage)
                print(f"tune {self.bcfg.slug}: --force: deleted study {self.name}")
            except KeyError:
                pass
            for name in REPORT_FILES:
                (self.dir / name).unlink(missing_ok=True)
        try:
            n_existing = len(storage.get_all_trials(storage.get_study_id_from_name(self.name), deepcopy=False))
        except KeyError:
            n_existing = 0
        direction = "maximize" if self.metric.greater_is_better else "minimize"
        try:  # the study's name is unique in the storage: of several workers starting at once, one creates it
            storage.create_new_study([optuna.study.StudyDirection[direction.upper()]], self.name)
            self.created = True
        except optuna.exceptions.DuplicatedStudyError:
            self.created = False
        seed = process_seed(self.cfg, n_existing, self.worker, created=self.created and not self.worker)
        study = optuna.load_study(storage=storage, study_name=self.name, sampler=make_sampler(self.cfg, seed),
                                  pruner=make_pruner(self.cfg, self.budget))
        self._check_objective(study, direction)
        return study

    def _check_objective(self, study: optuna.Study, direction: str) -> None:
        parts = objective_parts(self.cfg, self.bcfg, self.budget, self.space)
        parts["direction"] = direction
        recorded = study.user_attrs.get("objective")
        if recorded is None:
            study.set_user_attr("objective", parts)
            return
        changed = setting_changes(recorded, parts)  # run-only keys never count (pipeline.config.run_only)
        if changed:
            raise PipelineError(
                f"study {self.name} in {shown_url(self.url)} scored its trials under another objective; changed: "
                f"{', '.join(changed[:8])}{' ...' if len(changed) > 8 else ''}. Its scores would not compare with new "
                f"ones: run `make tune ARGS=--force` to start the study over, or restore those settings")

    def run(self, workers: int, force: bool) -> None:
        study = self.open_study(force)
        finished = count(study, FINISHED)
        if self.worker:
            self._optimize(study, progress=False)
            return
        if finished >= self.target:
            if self.report.is_current(study):
                print(f"tune {self.bcfg.slug}: study {self.name} has {finished} finished trials (tune.trials is "
                      f"{self.target}) and best.json is up to date; skipped (--force to start over)")
                return
        else:
            self._fail_dead_trials(study)
            if self.created:
                self._enqueue_config_params(study)
            self.report.print_plan(finished, workers)
            self.report.lr_find_hint()
            shown = self.cfg.tune.storage and shown_url(self.cfg.tune.storage)  # the password as ***
            tune = dataclasses.replace(self.cfg.tune, storage=shown)
            artifacts.write_text(self.dir / "config.yaml", dump_config(self.cfg.replace(tune=tune)))
            self._optimize_with_workers(study, workers)
        self.report.write(study)

    # ------------------------------------------------------------------ running trials
    def _optimize(self, study: optuna.Study, progress: bool) -> None:
        """Run trials until the study holds ``tune.trials`` finished ones. While its last trials run
        in other processes, wait for them: one whose process died is failed and queued again (by
        pid or heartbeat), and this process runs it."""
        timeout = self.cfg.tune.timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        objective = Objective(self.cfg, self.bcfg, self.spec, self.table, self.budget, self.target)
        guard = FailureGuard()
        callbacks = [MaxTrialsCallback(self.target, states=FINISHED + (TrialState.RUNNING,)), guard]
        bar = ProgressBar(study, self.target, self.bcfg.slug) if progress else None
        if bar is not None:
            callbacks.append(bar)
        try:
            while True:
                if self._has_room(study):
                    left = None if deadline is None else max(0.0, deadline - time.monotonic())
                    study.optimize(objective, timeout=left, catch=(TrialFailed, SurplusTrial), callbacks=callbacks)
                if guard.tripped or not self._wait_for_room(study, deadline):
                    break
                if bar is not None:
                    bar(study, None)
        finally:
            if bar is not None:
                bar.close()
        if guard.tripped:
            raise PipelineError(f"tune {self.bcfg.slug}: {guard.in_a_row} trials in a row failed; the last error: "
                                f"{guard.last_error}. Finished trials are kept in {shown_url(self.url)}; fix the "
                                f"cause and re-run `make tune`")
        left = self.target - count(study, FINISHED)
        if left > 0 and self.cfg.tune.timeout is not None:
            print(f"tune {self.bcfg.slug}: tune.timeout ({self.cfg.tune.timeout:g} s) reached with {left} trials "
                  f"to go; re-run `make tune` to continue the study")

    def _has_room(self, study: optuna.Study) -> bool:
        return count(study, FINISHED) + count(study, [TrialState.RUNNING]) < self.target

    def _wait_for_room(self, study: optuna.Study, deadline: float | None) -> bool:
        """Wait while the study's last trials run elsewhere. True when one of them failed (a trial
        to run here), False when the study is complete or tune.timeout is up."""
        announced = False
        while count(study, FINISHED) < self.target:
            if self._has_room(study):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            if not announced:
                running = count(study, [TrialState.RUNNING])
                print(f"tune {self.bcfg.slug}: waiting for {running} trial(s) running in other processes (one whose "
                      f"process died runs again here once its heartbeat is {heartbeat(self.url)[1]} s old)")
                announced = True
            time.sleep(WAIT_POLL_S)
            self._fail_dead_trials(study)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # and queues them again (the storage's retry callback)
        return False

    def _optimize_with_workers(self, study: optuna.Study, workers: int) -> None:
        if workers == 1:
            self._optimize(study, progress=True)
            return
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cpus // workers)
        procs = [self._spawn(i, workers, threads) for i in range(1, workers)]
        old_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            self._optimize(study, progress=True)
            failed = [(i, log) for i, proc, log in procs if proc.wait() != 0]
        finally:
            torch.set_num_threads(old_threads)
            for _, proc, _ in procs:
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait(timeout=30)
        if failed:
            i, log = failed[0]
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise PipelineError(f"tune {self.bcfg.slug}: {len(failed)} of {workers - 1} worker processes failed; "
                                f"worker {i} ({log}) ended with:\n{tail}")

    def _spawn(self, index: int, workers: int, threads: int):
        env = dict(os.environ, **{WORKER_ENV: str(index)})
        env[STORAGE_ENV] = self.url  # config.yaml shows a password as ***
        gpus = torch.cuda.device_count()
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = str(index % gpus)
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
        cmd = [sys.executable, "-m", "pipeline", "tune", "-c", str(self.dir / "config.yaml"),
               "--backbone", self.bcfg.slug, "--workers", "1"]
        log = self.dir / f"worker{index}.log"
        with open(log, "w") as out:  # the child keeps its own handle
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        return index, proc, log

    def _fail_dead_trials(self, study: optuna.Study) -> None:
        """Trials left RUNNING by a killed process of this machine: FAIL, so they stop counting, and
        queued again with the same parameters (as the heartbeat does for other machines' trials)."""
        host = socket.gethostname()
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            pid = trial.user_attrs.get("pid")
            if trial.user_attrs.get("host") != host or pid is None or _alive(pid):
                continue
            trial_id = self.storage.get_trial_id_from_study_id_trial_number(
                self.storage.get_study_id_from_name(self.name), trial.number)
            try:  # a row-locked update: of two processes that find the same dead trial, one fails it
                self.storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            retry_callback()(study, self.storage.get_trial(trial_id))
            print(f"tune {self.bcfg.slug}: trial {trial.number} was left running by a killed process; marked failed "
                  f"and queued again")

    def _enqueue_config_params(self, study: optuna.Study) -> None:
        own = config_params(self.cfg)
        params = {k: own[k] for k, (lo, hi) in self.space.items() if lo <= own[k] <= hi}
        if params:
            study.enqueue_trial(params, user_attrs={"config_params": True})


class StudyReport:
    """What a study says: the plan printed before it runs, and after it the report in
    ``runs/<exp>/<backbone>/tune/``: trials.csv, best.json (what the train stage reads, with the
    objective the scores depended on), the printed summary and the plots."""

    def __init__(self, run: "TuneRun"):
        self.cfg, self.bcfg, self.metric, self.budget = run.cfg, run.bcfg, run.metric, run.budget
        self.paths, self.dir, self.name, self.url, self.space = run.paths, run.dir, run.name, run.url, run.space

    def print_plan(self, finished: int, workers: int) -> None:
        b = self.budget
        bounds = ", ".join(f"{k} [{lo:.1e}, {hi:.1e}]" for k, (lo, hi) in self.space.items())
        print(f"tune {self.bcfg.slug}: study {self.name} in {shown_url(self.url)}: {finished} of "
              f"{self.cfg.tune.trials} trials finished; {workers} worker(s), sampler {self.cfg.tune.sampler}, "
              f"pruner {self.cfg.tune.pruner}")
        print(f"  each trial: folds {list(b.folds)} x ({b.frozen_epochs} frozen + {b.unfrozen_epochs} unfrozen "
              f"epochs), {self.metric.name} ({'higher' if self.metric.greater_is_better else 'lower'} is better); "
              f"log-uniform {bounds}")

    def lr_find_hint(self) -> None:
        path = self.paths.lr_find_dir(self.bcfg.slug) / "suggestion.json"
        if not path.exists():
            return
        suggestion = artifacts.read_json(path)
        words = []
        for key in ("frozen_lr", "unfrozen_lr"):
            value = suggestion.get(key)
            if key in self.space and isinstance(value, (int, float)) and math.isfinite(value) and value > 0:
                words.append(f"tune.{key}=[{value / 10:.1e},{value * 3:.1e}]")
        if words:
            print(f"  lr-find ({path}) suggests "
                  f"{', '.join(f'{k} {suggestion[k]:.1e}' for k in ('frozen_lr', 'unfrozen_lr') if k in suggestion)}; "
                  f"to search around it: make tune ARGS=\"{' '.join(words)}\"")

    def is_current(self, study: optuna.Study) -> bool:
        path = self.paths.tuned_params(self.bcfg.slug)
        if not path.exists():
            return False
        best = artifacts.read_json(path)
        n_finished = count(study, FINISHED)
        return best.get("study") == self.name and best.get("trials") == n_finished and "objective" in best

    def write(self, study: optuna.Study) -> dict:
        """trials.csv, a printed table, best.json and the plots, from the study as it is now."""
        trials = study.get_trials(deepcopy=False)
        frame = study.trials_dataframe(attrs=("number", "state", "value", "params", "user_attrs", "duration",
                                              "datetime_start", "datetime_complete"))
        artifacts.write_csv(self.dir / "trials.csv", frame)
        print_trials(trials, self.metric)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        pruned = [t for t in trials if t.state == TrialState.PRUNED]
        if not complete:
            raise PipelineError(f"tune {self.bcfg.slug}: no trial of study {self.name} completed "
                                f"({len(pruned)} pruned, {sum(t.state == TrialState.FAIL for t in trials)} failed); "
                                f"see {self.dir / 'trials.csv'}. Widen the tune.* bounds, raise tune.trials or set "
                                f"tune.pruner=none")
        best = study.best_trial
        saving = pruning_saving(trials)
        result = {"params": best.params, "value": best.value, "metric": self.metric.name,
                  "greater_is_better": self.metric.greater_is_better, "trials": len(complete) + len(pruned),
                  "pruned": len(pruned), "failed": sum(t.state == TrialState.FAIL for t in trials),
                  "best_trial": best.number, "study": self.name, "storage": shown_url(self.url),
                  "budget": dataclasses.asdict(self.budget), "pruning": saving,
                  # what the score depended on: the train stage uses these LRs only while it still holds
                  "objective": objective_parts(self.cfg, self.bcfg, self.budget, self.space)}
        baseline = [t for t in complete if t.user_attrs.get("config_params")]
        if baseline:
            result["config_params"] = {"trial": baseline[0].number, "params": baseline[0].params,
                                       "value": baseline[0].value}
        artifacts.write_json(self.paths.tuned_params(self.bcfg.slug), result)
        self._print_summary(result)
        write_plots(study, self.dir, list(self.space), self.metric.name)
        return result

    def _print_summary(self, result: dict) -> None:
        params = ", ".join(f"{k} {v:.3g}" for k, v in result["params"].items())
        print(f"tune {self.bcfg.slug}: best {result['metric']} {result['value']:.4f} (trial {result['best_trial']}: "
              f"{params}) -> {self.paths.tuned_params(self.bcfg.slug)}")
        if "config_params" in result:
            print(f"  the config's own LRs (trial {result['config_params']['trial']}) scored "
                  f"{result['config_params']['value']:.4f} on the same budget")
        s = result["pruning"]
        if s["pruned"]:
            print(f"  pruning stopped {s['pruned']} of {result['trials']} trials early: {s['epochs_saved']} of "
                  f"{s['epochs_budget']} epochs not run, ~{s['seconds_saved']:.0f} s saved "
                  f"(~{100 * s['fraction_saved']:.0f}% of the full-budget time)")
        print(f"  make train-folds uses these LRs (train.use_tuned: {self.cfg.train.use_tuned})")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # a previous process whose pid this one now has
    try:
        return psutil.Process(int(pid)).status() != psutil.STATUS_ZOMBIE  # a killed child not yet reaped is dead
    except psutil.NoSuchProcess:
        return False
    except (psutil.AccessDenied, OverflowError, ValueError):
        return True


def pruning_saving(trials: list) -> dict:
    """What pruning saved: epochs not run by pruned trials, and the time they would have taken
    (mean duration of complete trials minus each pruned trial's duration)."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.duration is not None]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.duration is not None]
    budget = next((t.user_attrs.get("budget_epochs") for t in complete + pruned if "budget_epochs" in t.user_attrs), 0)
    epochs_budget = budget * (len(complete) + len(pruned))
    epochs_saved = sum(max(0, budget - t.user_attrs.get("epochs", budget)) for t in pruned)
    full = float(np.mean([t.duration.total_seconds() for t in complete])) if complete else 0.0
    saved = sum(max(0.0, full - t.duration.total_seconds()) for t in pruned)
    total_full = full * (len(complete) + len(pruned))
    return {"pruned": len(pruned), "epochs_budget": int(epochs_budget), "epochs_saved": int(epochs_saved),
            "seconds_full_trial": full, "seconds_saved": saved,
            "fraction_saved": saved / total_full if total_full > 0 else 0.0}


def print_trials(trials: list, metric: Metric) -> None:
    rows = []
    for t in trials:
        row = {"trial": t.number, "state": t.state.name.lower(),
               metric.name: "" if t.value is None else f"{t.value:.4f}"}
        row.update({k: f"{v:.2e}" for k, v in t.params.items()})
        row["epochs"] = t.user_attrs.get("epochs", "")
        row["seconds"] = f"{t.duration.total_seconds():.1f}" if t.duration is not None else ""
        note = "config LRs" if t.user_attrs.get("config_params") else ""
        note = "diverged" if t.user_attrs.get("diverged") else note
        note = str(t.user_attrs.get("error", ""))[:60] if t.state == TrialState.FAIL else note
        row["note"] = "surplus (not run)" if t.user_attrs.get("surplus") else note
        rows.append(row)
    if rows:
        print(pd.DataFrame(rows).fillna("").to_string(index=False))


def write_plots(study: optuna.Study, out_dir: Path, params: list[str], metric: str) -> list[Path]:
    """PNG plots from optuna.visualization.matplotlib; a plot that fails only warns."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    n_complete = count(study, [TrialState.COMPLETE])
    plots = {"optimization_history.png": lambda: ovm.plot_optimization_history(study, target_name=metric),
             "intermediate_values.png": lambda: ovm.plot_intermediate_values(study),
             "lr_vs_score.png": lambda: ovm.plot_slice(study, params=params, target_name=metric)}
    if n_complete >= 2 and len(params) >= 1:
        plots["param_importances.png"] = lambda: ovm.plot_param_importances(study)
    written = []
    for name, draw in plots.items():
        width = 1.5 + 4.2 * len(params) if name == "lr_vs_score.png" else 8.0  # one panel per parameter
        try:
            # sized before drawing: resizing afterwards lets the slice plot's colourbar cover a panel
            with warnings.catch_warnings(), plt.rc_context({"figure.figsize": (width, 4.5),
                                                            "figure.constrained_layout.use": True}):
                warnings.simplefilter("ignore")
                axes = draw()
                fig = np.ravel(axes)[0].figure
                for ax in np.ravel(axes):  # log axes: at most a few decade labels, no crowded minor ones
                    if ax.get_xscale() == "log":
                        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            with artifacts.atomic_path(out_dir / name) as tmp:
                fig.savefig(tmp, format="png", dpi=110)
            plt.close(fig)
            written.append(out_dir / name)
        except Exception as exc:  # a plot is a convenience: never fail the stage for it
            print(f"warning: could not draw {name}: {type(exc).__name__}: {exc}")
            plt.close("all")
    return written
