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
from pathlib import Path

import pytest
from conftest import REPO_ROOT

from pipeline import cli
from pipeline.config.paths import Paths
from pipeline.config.schema import dump_config
from pipeline.core import locks

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
        for path in sys.argv[4:]:
            lines = open(path).read().splitlines()
            open(path, "w").write("\\n".join([lines[0]] + lines[1:][::-1]) + "\\n")  # new predictions
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
