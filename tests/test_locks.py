"""Two runs of one stage at once (issue 12, case 12): a fold or output in progress is skipped or waited
for, with one line that names the process; a lock left by a killed process is taken over."""
from __future__ import annotations

import errno
import json
import os
import re
import socket
import subprocess
import sys
import time

import filelock
import pytest
from conftest import REPO_ROOT

from pipeline import cli
from pipeline.config.paths import Paths
from pipeline.config.schema import dump_config
from pipeline.core import locks
from pipeline.stages.folds import run_folds

FAST = ["train.num_workers=0", "augment.train=[]", "folds.n_splits=2"]

_HOLDER = """
import sys, time
import filelock
from pipeline.core import locks
if sys.argv[3:] == ["soft"]:
    locks.LOCK_CLASS = filelock.SoftFileLock
with locks.hold(sys.argv[1], "test holder", "is held") as held:
    print("held" if held else "busy", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _hold_in_child(target, seconds: float, soft: bool = False) -> subprocess.Popen:
    """A separate process that holds the lock on ``target`` for ``seconds`` (returns once it holds it)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(target), str(seconds), *(["soft"] if soft else [])],
                            cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
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


def test_a_fold_in_training_by_another_process_is_skipped_with_one_line(make_config, tmp_path, capsys, children):
    cfg = make_config(*FAST)
    run_folds(cfg)
    fold_dir = Paths(cfg).fold_dir(cfg.backbones[0].name, 0)
    children.append(holder := _hold_in_child(fold_dir, 120))
    config = tmp_path / "cfg.yaml"
    config.write_text(dump_config(cfg))
    capsys.readouterr()
    assert cli.main(["train", "-c", str(config), "--fold", "0"]) == 0  # a clean exit: nothing went wrong
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "is being trained" in line]
    assert len(lines) == 1, out
    assert re.fullmatch(rf"fold 0 of {cfg.backbones[0].name} is being trained by process {holder.pid} "
                        rf"\(started \d\d:\d\d\); skipping it - re-run when it ends", lines[0]), lines[0]
    assert not fold_dir.exists()  # not even its config.yaml: the other process owns the folder
    assert locks.lock_path(fold_dir).exists()  # still the holder's


def test_a_second_folds_run_waits_for_the_first(make_config, capsys, children):
    cfg = make_config()
    out = Paths(cfg).folds_csv
    children.append(holder := _hold_in_child(out, 1.5))
    start = time.monotonic()
    run_folds(cfg)
    printed = capsys.readouterr().out
    assert f"is being written by process {holder.pid} (started " in printed and "waiting for it to end" in printed
    assert time.monotonic() - start >= 1.0 and out.exists()
    assert not locks.lock_path(out).exists() and not locks.holder_path(out).exists()  # removed on release


def test_a_lock_left_by_a_killed_process_is_taken_over(make_config, capsys, children):
    cfg = make_config()
    out = Paths(cfg).folds_csv
    children.append(holder := _hold_in_child(out, 120))
    holder.kill()  # kill -9: no clean-up, the lock file stays with the dead process's pid
    holder.wait()
    assert locks.lock_path(out).exists()
    run_folds(cfg)
    printed = capsys.readouterr().out
    notes = [line for line in printed.splitlines() if "taking over the lock" in line]
    assert len(notes) == 1 and f"left by process {holder.pid} (started " in notes[0], printed
    assert "waiting" not in printed and out.exists() and not locks.lock_path(out).exists()
    assert not locks.holder_path(out).exists()


def test_a_second_holder_in_the_same_process_is_refused_and_the_file_removed(tmp_path, capsys):
    target = tmp_path / "fold0"
    with locks.hold(target, "fold 0 of m", "is being trained") as first:
        with locks.hold(target, "fold 0 of m", "is being trained") as second:
            assert first and not second
    assert f"by process {os.getpid()} (started " in capsys.readouterr().out
    assert not locks.lock_path(target).exists() and not locks.holder_path(target).exists()
    with locks.hold(target, "fold 0 of m", "is being trained") as again:
        assert again


def test_without_flock_a_soft_lock_file_is_used(tmp_path, capsys, monkeypatch, children):
    """Where there is no ``flock`` (Windows without msvcrt, some network file systems): filelock's O_EXCL
    lock file; a dead holder on this host is taken over, and so is one older than STALE_SECONDS."""
    monkeypatch.setattr(locks, "LOCK_CLASS", filelock.SoftFileLock)
    target = tmp_path / "out.csv"
    with locks.hold(target, "out", "is being written") as first:
        with pytest.raises(filelock.Timeout):  # filelock's soft lock file, and it is taken
            filelock.SoftFileLock(str(locks.lock_path(target))).acquire(blocking=False)
        with locks.hold(target, "out", "is being written") as second:
            assert first and not second
    assert f"by process {os.getpid()} (started " in capsys.readouterr().out
    assert not locks.lock_path(target).exists() and not locks.holder_path(target).exists()

    dead = _hold_in_child(target, 120, soft=True)
    dead.kill()  # kill -9: its lock file stays, and nothing releases it but the takeover
    dead.wait()
    dead.stdout.close()
    assert locks.lock_path(target).exists()
    with locks.hold(target, "out", "is being written") as held:
        assert held
    assert f"taking over the lock .out.csv.lock left by process {dead.pid} (started " in capsys.readouterr().out
    assert not locks.lock_path(target).exists()

    children.append(_hold_in_child(target, 120, soft=True))  # alive, but its lock is days old
    old = time.time() - locks.STALE_SECONDS - 60
    os.utime(locks.lock_path(target), (old, old))
    locks.holder_path(target).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": old}))
    with locks.hold(target, "out", "is being written") as held:
        assert held
    assert "left by process 1 on elsewhere" in capsys.readouterr().out


def test_where_flock_is_unsupported_the_soft_lock_is_used(tmp_path, capsys, monkeypatch):
    """flock failing with ENOLCK/EOPNOTSUPP/EINVAL (NFS without lockd, some FUSE mounts): a soft lock."""
    class NoFlock(filelock.FileLock):
        def acquire(self, *args, **kwargs):
            raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(locks, "LOCK_CLASS", NoFlock)
    target = tmp_path / "fold0"
    with locks.hold(target, "fold 0 of m", "is being trained") as first:
        with pytest.raises(filelock.Timeout):  # filelock's soft lock, at a path of its own, and it is taken
            filelock.SoftFileLock(str(locks.soft_lock_path(target))).acquire(blocking=False)
        with locks.hold(target, "fold 0 of m", "is being trained") as second:
            assert first and not second
    assert f"by process {os.getpid()} (started " in capsys.readouterr().out
    assert not locks.lock_path(target).exists() and not locks.holder_path(target).exists()
    assert not locks.soft_lock_path(target).exists()


_RANK = """
import sys
import torch.distributed as dist
from pipeline.core import locks
dist.init_process_group("gloo")
with locks.hold(sys.argv[1], "fold 0 of m", "is being trained") as held:
    print(f"rank {dist.get_rank()}: {held}", flush=True)
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.parametrize("busy", [False, True])
def test_under_torchrun_rank_0_takes_the_lock_and_every_rank_follows(tmp_path, children, busy):
    target = tmp_path / "fold0"
    if busy:
        children.append(_hold_in_child(target, 120))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ranks = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        ranks.append(subprocess.Popen([sys.executable, "-c", _RANK, str(target)], cwd=REPO_ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outs = [proc.communicate(timeout=120)[0] for proc in ranks]
    assert all(proc.returncode == 0 for proc in ranks), outs
    assert f"rank 0: {not busy}" in outs[0] and f"rank 1: {not busy}" in outs[1], outs
    assert ("skipping it" in outs[0]) == busy and "skipping it" not in outs[1], outs  # one rank says it
