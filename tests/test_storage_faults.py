"""Storage that misbehaves the way shared clusters and cloud disks do (issue 33): locks that cannot be
taken, truncated checkpoints, a full disk, an ensemble started during a retrain, a file name that
differs from its id in letter case only, empty multilabel label lists.

Each fault ends in one of two ways: the work is done (locks fall back, a broken fold is retrained,
a reader waits for the writer), or one line (exit code 2, no traceback) names the file and what to do.
"""
from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import REPO_ROOT, shrunk_raw_config, write_dataset
from safetensors import SafetensorError
from safetensors.torch import save_file
from test_ensemble import write_experiment

from pipeline import cli
from pipeline.config.paths import Paths
from pipeline.config.schema import config_from_dict, dump_config
from pipeline.core import artifacts, locks
from pipeline.core.errors import PipelineError
from pipeline.data.tables import read_train_table, task_spec
from pipeline.domain.metrics import get_metric
from pipeline.engine import checkpoints
from pipeline.stages.ensemble import run_ensemble
from pipeline.training.fold_state import FoldState

FAST = ["train.num_workers=0", "augment.train=[]", "folds.n_splits=2"]
NO_FLOCK = {"ENOLCK": errno.ENOLCK, "EOPNOTSUPP": errno.EOPNOTSUPP}  # NFS without lockd; FUSE, SMB

_HOLDER = """
import errno, fcntl, os, sys, time
import filelock
from pipeline.core import locks
target, seconds, mode = sys.argv[1], float(sys.argv[2]), sys.argv[3]
if mode.startswith("E"):  # flock fails with this errno, as on the mount the test plays
    code, real = getattr(errno, mode), fcntl.flock
    def flock(fd, operation):
        if operation & fcntl.LOCK_UN:
            return real(fd, operation)
        raise OSError(code, os.strerror(code))
    fcntl.flock = flock
if mode == "nameless":  # a lock taken by something that never says who it is
    lock = filelock.FileLock(str(locks.lock_path(target)))
    lock.acquire()
    print("held", flush=True)
    time.sleep(seconds)
    sys.exit()
if mode == "rewriting":  # a train run of the experiment in sys.argv[1]: its models change before it ends
    with locks.rewriting(target, "training"):
        print("held", flush=True)
        time.sleep(seconds)
        import pandas as pd
        for path in sys.argv[4:]:  # new predictions: each row's probabilities in the reverse order of classes
            frame = pd.read_csv(path)
            columns = [c for c in frame.columns if c.startswith("pred")]
            frame[columns] = frame[columns].to_numpy()[:, ::-1]
            frame.to_csv(path, index=False)
    sys.exit()
with locks.hold(target, "test holder", "is held") as held:
    print("held" if held else "busy", flush=True)
    time.sleep(seconds)
"""


def hold_in_child(target, seconds: float, mode: str = "", *args) -> subprocess.Popen:
    """A separate process that holds the lock on ``target`` (returns once it holds it)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(target), str(seconds), mode or "-", *map(str, args)],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    said = proc.stdout.readline().strip()
    if said != "held":
        proc.kill()
        proc.wait()
        proc.stdout.close()
        pytest.fail(f"the holder process said {said!r} instead of 'held'")
    return proc


@pytest.fixture
def children():
    started: list[subprocess.Popen] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()


def without_flock(monkeypatch, code: int) -> None:
    """``flock`` fails with ``code`` in this process, as it does on such a mount (unlocking still works)."""
    real = fcntl.flock

    def flock(fd, operation):
        if operation & fcntl.LOCK_UN:
            return real(fd, operation)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", flock)


def lock_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob(".*") if p.name.endswith((".lock", ".softlock", ".holder")))


def write_config(cfg, tmp_path: Path) -> str:
    config = tmp_path / "cfg.yaml"
    config.write_text(dump_config(cfg))
    return str(config)


# ---------------------------------------------------------------------------- 1. flock fails


@pytest.mark.parametrize("code", list(NO_FLOCK.values()), ids=list(NO_FLOCK))
def test_train_folds_trains_where_flock_fails(make_config, tmp_path, capsys, monkeypatch, code, one_torch_thread):
    """``make train-folds`` on NFS without a lock daemon trained nothing, said another process was training
    each fold, exited 0 and left ``.fold<k>.lock`` files that stopped every later run."""
    cfg = make_config(*FAST)
    config = write_config(cfg, tmp_path)
    assert cli.main(["folds", "-c", config]) == 0
    without_flock(monkeypatch, code)
    assert cli.main(["train", "-c", config, "--fold", "0"]) == 0
    out = capsys.readouterr().out
    assert "skipping" not in out and "another process" not in out, out
    fold_dir = Paths(cfg).fold_dir(cfg.backbones[0].slug, 0)
    assert (fold_dir / "best.safetensors").exists() and (fold_dir / "oof.csv").exists()
    assert lock_files(tmp_path) == []  # nothing left to stop the next run
    assert cli.main(["train", "-c", config, "--fold", "0"]) == 0  # and the next run finds the fold done
    assert "skipping" not in capsys.readouterr().out
    assert cli.main(["folds", "-c", config, "--force"]) == 0  # a stage that waits for its lock (it hung for ever)
    assert lock_files(tmp_path) == []


@pytest.mark.parametrize("code", list(NO_FLOCK.values()), ids=list(NO_FLOCK))
def test_where_flock_fails_a_live_holder_is_respected_and_a_dead_ones_lock_taken_over(tmp_path, capsys,
                                                                                    monkeypatch, children, code):
    target = tmp_path / "fold0"
    children.append(holder := hold_in_child(target, 120, errno.errorcode[code]))
    without_flock(monkeypatch, code)
    with locks.hold(target, "fold 0 of m", "is being trained") as held:
        assert not held
    assert f"fold 0 of m is being trained by process {holder.pid} (started " in capsys.readouterr().out
    holder.kill()  # kill -9: its soft lock stays, with the dead process's pid
    holder.wait()
    with locks.hold(target, "fold 0 of m", "is being trained") as held:
        assert held
    assert f"taking over the lock .fold0.softlock left by process {holder.pid}" in capsys.readouterr().out
    assert lock_files(tmp_path) == []


def test_a_lock_that_nobody_names_is_an_error_not_a_skipped_fold(make_config, tmp_path, capsys, monkeypatch,
                                                                  children):
    """Never exit 0 after skipping work for a lock that no process says it holds."""
    monkeypatch.setattr(locks, "HOLDER_GRACE_SECONDS", 0.5, raising=False)
    cfg = make_config(*FAST)
    config = write_config(cfg, tmp_path)
    assert cli.main(["folds", "-c", config]) == 0
    fold_dir = Paths(cfg).fold_dir(cfg.backbones[0].slug, 0)
    children.append(hold_in_child(fold_dir, 120, "nameless"))
    capsys.readouterr()
    assert cli.main(["train", "-c", config, "--fold", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(locks.lock_path(fold_dir)) in err and "delete" in err, err
    assert not fold_dir.exists()


# ---------------------------------------------------------------------------- 2. a checkpoint cut short


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_root):
    """One model trained on two folds through the CLI (its config file, and the run's folder)."""
    tmp = tmp_path_factory.mktemp("trained")
    cfg = config_from_dict(shrunk_raw_config(digits_root, tmp), FAST)
    config = write_config(cfg, tmp)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["folds", "-c", config]) == 0
        assert cli.main(["train", "-c", config]) == 0
    finally:
        torch.set_num_threads(threads)
    return cfg, config, tmp


def damage(path: Path, how: str = "cut") -> bytes:
    """Cut ``path`` to half its size (a copy killed mid-way, a full disk), or change one byte of its
    tensors (same size, same header); return what it held."""
    whole = path.read_bytes()
    if how == "cut":
        path.write_bytes(whole[: len(whole) // 2])
    else:
        path.write_bytes(whole[:-1] + bytes([whole[-1] ^ 0xFF]))
    return whole


@contextmanager
def damaged(path: Path, how: str = "cut"):
    """:func:`damage` for the block; ``path`` put back as it was afterwards."""
    whole = damage(path, how)
    try:
        yield path
    finally:
        path.write_bytes(whole)


def one_line_error(capsys, *texts: str) -> str:
    """The one line a stage ended with on stderr (after any progress bar, which redraws with ``\\r``)."""
    err = capsys.readouterr().err.strip()
    line = err.split("\r")[-1].strip()
    assert err.count("\n") == 0 and line.startswith("error: ") and "Traceback" not in err, err
    for text in texts:
        assert text in line, line
    return line


@pytest.mark.parametrize("how", ["cut", "changed"])
def test_predict_names_a_damaged_checkpoint(trained, tmp_path, capsys, how):
    """It ended in a SafetensorError traceback that did not name the file."""
    cfg, config, _ = trained
    model = cfg.backbones[0].slug
    best = Paths(cfg).fold_dir(model, 1) / "best.safetensors"
    out = tmp_path / "submission.csv"
    with damaged(best, how):
        capsys.readouterr()
        assert cli.main(["predict", "-c", config, "--ensemble", model, "--out", str(out)]) == 2
    one_line_error(capsys, f"checkpoint {best} is damaged (", "make train-folds")
    assert not out.exists()


def test_bundle_names_a_damaged_checkpoint(trained, tmp_path, capsys):
    cfg, config, _ = trained
    model = cfg.backbones[0].slug
    best = Paths(cfg).fold_dir(model, 0) / "best.safetensors"
    out = tmp_path / "bundle"
    with damaged(best):
        capsys.readouterr()
        assert cli.main(["bundle", "-c", config, "--ensemble", model, "--out", str(out)]) == 2
    one_line_error(capsys, f"checkpoint {best} is damaged (", "cut short", "make train-folds")
    assert not out.exists() and not list(tmp_path.glob(".bundle*"))


@pytest.mark.parametrize("how", ["cut", "changed"])
def test_train_trains_a_fold_again_whose_checkpoint_was_damaged(trained, capsys, how):
    """``make train-folds`` called the fold done, because "up to date" only checked that the file and its
    stamp existed."""
    cfg, config, _ = trained
    model = cfg.backbones[0].slug
    fold0, fold1 = (Paths(cfg).fold_dir(model, k) / "best.safetensors" for k in (0, 1))
    damage(fold0, how)  # and never put back: train puts it right
    untouched = fold1.stat().st_mtime_ns
    capsys.readouterr()
    assert cli.main(["train", "-c", config]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "damaged" in line]
    assert len(lines) == 1 and str(fold0) in lines[0] and "training the fold again" in lines[0], out
    assert f"{model} fold 0: kept" in out and f"{model} fold 1: kept" not in out, out
    assert artifacts.file_problem(fold0, digest=True) is None and fold1.stat().st_mtime_ns == untouched
    assert cli.main(["train", "-c", config]) == 0  # done now: nothing is trained again
    assert "kept" not in capsys.readouterr().out


def test_a_resume_file_cut_short_starts_the_fold_anew(make_config, tmp_path, capsys):
    """A killed copy of a run folder: the fold trains from its start instead of a SafetensorError."""
    resume = tmp_path / "fold0" / "resume.safetensors"
    resume.parent.mkdir()
    save_file({"model.w": torch.zeros(1000)}, str(resume), metadata={"info": "{}"})
    resume.write_bytes(resume.read_bytes()[:2000])
    state = FoldState(make_config().train, get_metric("accuracy"), 0, resume.parent, "digest")
    assert state.resume() is False
    out = capsys.readouterr().out
    assert f"fold 0: {resume} is damaged (cut short" in out and "from its start" in out, out
    assert not resume.exists()


# ---------------------------------------------------------------------------- 3. a full disk


FULL = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


def test_a_full_disk_while_a_checkpoint_is_written_names_it(make_config, tmp_path, capsys, monkeypatch,
                                                            one_torch_thread):
    """safetensors reports a full disk without the path: the line said "a file operation"."""
    cfg = make_config(*FAST)
    config = write_config(cfg, tmp_path)
    assert cli.main(["folds", "-c", config]) == 0

    def full(*args, **kwargs):
        raise SafetensorError(FULL)

    monkeypatch.setattr(checkpoints, "save_file", full)
    capsys.readouterr()
    assert cli.main(["train", "-c", config, "--fold", "0"]) == 2
    best = Paths(cfg).fold_dir(cfg.backbones[0].slug, 0) / "best.safetensors"
    one_line_error(capsys, f"error: {best}: no space left on the device", "re-run the same command")
    assert not best.exists() and not list(best.parent.glob(".*.tmp"))


def test_a_full_disk_while_a_table_is_written_names_it(make_config, tmp_path, capsys, monkeypatch):
    """A write through a file object (pandas) fails with an OSError that carries no path."""
    cfg = make_config()
    config = write_config(cfg, tmp_path)

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    assert cli.main(["folds", "-c", config]) == 2
    one_line_error(capsys, f"error: {Paths(cfg).folds_csv}: no space left on the device")
    assert not Paths(cfg).folds_csv.exists()


# ---------------------------------------------------------------------------- 4. an ensemble during a retrain


def test_an_ensemble_during_a_retrain_waits_for_it_and_blends_the_new_models(tmp_path, capsys, children):
    """It said "up to date" and kept the old submission while the experiment was being retrained."""
    cfg = write_experiment(tmp_path, methods=("mean",))
    paths = Paths(cfg)
    run_ensemble(cfg)
    before = paths.submission("mean").read_text()
    retrained = [paths.test_csv(b.slug) for b in cfg.backbones]
    # a train run of the experiment (as `make train-folds ARGS=--force` marks it) whose models change before it ends
    children.append(trainer := hold_in_child(paths.exp_dir, 1.5, "rewriting", *retrained))
    capsys.readouterr()
    run_ensemble(cfg)
    out = capsys.readouterr().out
    assert (f"ensemble of {cfg.name}: the models of {cfg.name} are being trained by process {trainer.pid} "
            f"(started ") in out and "waiting for it to end" in out, out
    assert "up to date" not in out and trainer.poll() is not None
    assert paths.submission("mean").read_text() != before  # the retrained models' predictions


def test_a_killed_train_run_leaves_no_mark_that_stops_the_ensemble(tmp_path, capsys, children):
    cfg = write_experiment(tmp_path, methods=("mean",))
    paths = Paths(cfg)
    trainer = hold_in_child(paths.exp_dir, 120, "rewriting")
    trainer.kill()  # kill -9: its mark stays, and the OS released its lock
    trainer.wait()
    trainer.stdout.close()
    assert lock_files(paths.exp_dir)
    run_ensemble(cfg)
    assert "waiting" not in capsys.readouterr().out
    assert lock_files(paths.exp_dir) == []


# ---------------------------------------------------------------------------- 5. letter case


def test_an_id_whose_file_differs_in_letter_case_is_named(make_config, tmp_path, capsys):
    root = tmp_path / "data"
    data = write_dataset(root, "multiclass", n_train=30, n_test=4, id_extension=True)
    (root / "train" / "img_0003.png").rename(root / "train" / "img_0003.PNG")
    config = write_config(make_config(data=data), tmp_path)
    assert cli.main(["folds", "-c", config]) == 2
    one_line_error(capsys, "1 ids in", "'img_0003.png'", "'img_0003.png' is img_0003.PNG", "letter case only",
                   "rename the files or correct the ids")


# ---------------------------------------------------------------------------- 6. empty label lists


def _with_empty_targets(root: Path, task: str, rows) -> dict:
    data = write_dataset(root, task, n_train=30, n_test=4)
    table = pd.read_csv(root / "train.csv", dtype=str, keep_default_na=False)
    column = [c for c in table.columns if c not in ("image_id", "writer")][0]
    table.loc[rows, column] = ""
    table.to_csv(root / "train.csv", index=False)
    return data


@pytest.mark.parametrize("task", ["multiclass", "binary", "regression", "multilabel_columns"])
def test_an_empty_target_is_refused_for_single_label_tasks_and_label_columns(make_config, tmp_path, task):
    cfg = make_config(data=_with_empty_targets(tmp_path / "data", task, [4]))
    with pytest.raises(PipelineError, match=r"is empty for 1 rows, ids 'img_0004'; fill or drop those rows"):
        read_train_table(cfg, check_readable=False)


def test_an_empty_label_list_is_a_row_with_none_of_the_labels(make_config, tmp_path):
    cfg = make_config(data=_with_empty_targets(tmp_path / "data", "multilabel", [4, 7]))
    table = read_train_table(cfg, check_readable=False)
    y = task_spec(cfg, table).encode(table)
    assert y.shape == (30, 3) and not y[[4, 7]].any() and y.sum(axis=1)[[0, 1, 2, 3, 5, 6]].all()


def test_a_multilabel_table_whose_label_lists_are_all_empty_is_refused(make_config, tmp_path):
    cfg = make_config(data=_with_empty_targets(tmp_path / "data", "multilabel", slice(None)))
    with pytest.raises(PipelineError, match=r"'labels' \(a multilabel label list\) is empty in every row"):
        read_train_table(cfg, check_readable=False)
