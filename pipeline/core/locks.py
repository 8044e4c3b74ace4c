"""Locks on work in progress, so that two runs of one stage at once do not do the same work twice.

The lock on an output (a fold folder, the folds file, the ensemble folder) is a ``filelock`` lock on
the file ``.<name>.lock`` beside it: the OS's own lock (``flock``; ``msvcrt.locking`` on Windows),
which the OS releases when the process ends, however it ends; its file is removed on release.
Where the file system cannot ``flock`` (some network file systems), it is filelock's soft lock: the
file created with ``O_EXCL``, broken when its process no longer runs on this host, or when it is
older than :data:`STALE_SECONDS` (another host's, or a pid that may have been reused).

Beside it, ``.<name>.holder`` names the holder (pid, host, start time) for the one-line message a
second run prints; the lock file cannot carry it (filelock 3.x truncates it on every try). A holder
file still there when the lock is taken was left by a killed process: taken over with a one-line note.

Example
-------
>>> with hold(fold_dir, "fold 2 of efficientnet_lite0", "is being trained") as held:  # doctest: +SKIP
...     if held:
...         train()
"""
from __future__ import annotations

import errno
import json
import os
import socket
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import filelock

from pipeline.core.artifacts import write_json

STALE_SECONDS = 3 * 24 * 3600  # soft locks only: older than this, the holder's pid may have been reused
POLL_SECONDS = 0.5  # how often a waiting run looks again
UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # flock on some network file systems

#: The lock's class: the OS's lock where there is one (filelock.FileLock), else filelock's soft lock.
#: A run falls back to :func:`soft_lock` by itself where ``flock`` fails with one of :data:`UNSUPPORTED`.
LOCK_CLASS: type[filelock.BaseFileLock] = filelock.FileLock


def lock_path(target: Path | str) -> Path:
    """The lock file of an output (a file or a folder): ``.<name>.lock`` beside it."""
    target = Path(target)
    return target.parent / f".{target.name}.lock"


def holder_path(target: Path | str) -> Path:
    """The file that names the lock's holder: ``.<name>.holder`` beside the output, while it is held."""
    target = Path(target)
    return target.parent / f".{target.name}.holder"


def soft_lock(path: Path | str) -> filelock.BaseFileLock:
    """filelock's ``O_EXCL`` lock file, taken over when older than :data:`STALE_SECONDS`."""
    with warnings.catch_warnings():  # filelock 4 warns that an age limit can overlap a live holder: days, here
        warnings.filterwarnings("ignore", message=r".*lifetime")
        return filelock.SoftFileLock(str(path), lifetime=STALE_SECONDS)


@contextmanager
def hold(target: Path | str, what: str, doing: str, wait: bool = False) -> Iterator[bool]:
    """Hold the lock on ``target`` for the block; yield whether it is held.

    When another process holds it, print one line (``<what> <doing> by process 1234 (started
    12:01); ...``) and either yield False at once (the caller skips the work) or, with ``wait``,
    wait until it is released. Under torchrun only rank 0 takes the lock; every rank gets its answer.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        with _hold_distributed(Path(target), what, doing, wait) as held:
            yield held
        return
    with _hold_here(Path(target), what, doing, wait) as held:
        yield held


@contextmanager
def _hold_here(target: Path, what: str, doing: str, wait: bool) -> Iterator[bool]:
    path, holder = lock_path(target), holder_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock, held = _first_try(path)
    if not held:
        who = _describe(_read(holder))
        if not wait:
            print(f"{what} {doing} by {who}; skipping it - re-run when it ends")
            yield False
            return
        print(f"{what} {doing} by {who}; waiting for it to end (Ctrl-C stops waiting)", flush=True)
        lock.acquire(poll_interval=POLL_SECONDS)
    try:
        left = _read(holder)  # still there although nobody holds the lock: its process was killed
        if left:
            print(f"{what}: taking over the lock {path.name} left by {_describe(left)}, which no longer runs")
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        write_json(holder, mine)
    except BaseException:
        lock.release()
        raise
    try:
        yield True
    finally:
        _release(lock, holder, mine)


@contextmanager
def _hold_distributed(target: Path, what: str, doing: str, wait: bool) -> Iterator[bool]:
    """Rank 0 takes the lock and tells the other ranks whether it did (they do the work with it)."""
    import torch.distributed as dist

    from pipeline.core import distributed

    if not (dist.is_available() and dist.is_initialized()):
        with _hold_here(target, what, doing, wait) as held:
            yield held
        return
    if distributed.is_main():
        with _hold_here(target, what, doing, wait) as held:
            answer = [held]
            dist.broadcast_object_list(answer, src=0)
            yield held
    else:
        answer = [None]
        dist.broadcast_object_list(answer, src=0)
        yield bool(answer[0])


# ---------------------------------------------------------------------------- the lock and its holder


def _first_try(path: Path) -> tuple[filelock.BaseFileLock, bool]:
    """The lock and whether one try took it; a soft lock where this file system cannot flock."""
    lock = soft_lock(path) if LOCK_CLASS is filelock.SoftFileLock else LOCK_CLASS(str(path))
    try:
        return lock, _try(lock)
    except OSError as exc:
        if exc.errno not in UNSUPPORTED or isinstance(lock, filelock.SoftFileLock):
            raise
    lock = soft_lock(path)
    return lock, _try(lock)


def _try(lock: filelock.BaseFileLock) -> bool:
    """One try; and one more where it removed a dead holder's soft lock file (filelock 3 takes it on the next)."""
    for _ in range(2):
        try:
            lock.acquire(blocking=False)
        except filelock.Timeout:
            if os.path.lexists(lock.lock_file):
                return False
            continue
        return True
    return False


def _release(lock: filelock.BaseFileLock, holder: Path, mine: dict) -> None:
    """Remove the holder file (if it is still ours) and the lock file while still holding the lock, then release.

    filelock's current releases keep a flock file in place on release; removing it while held leaves no
    ``.<name>.lock`` behind, and is safe: a waiter that then takes the removed file sees it has no name
    left (``st_nlink`` 0) and opens the path anew, in every filelock from 3.24 on. A soft lock's file
    (or filelock's own soft fallback's, which is not empty) is removed by its release itself.
    """
    try:
        if _read(holder) == mine:
            holder.unlink(missing_ok=True)
        path = Path(lock.lock_file)
        if not isinstance(lock, filelock.SoftFileLock) and path.stat().st_size == 0:
            path.unlink()
    except OSError:  # already gone; or Windows, where an open file cannot be removed (filelock removes it there)
        pass
    finally:
        lock.release()


def _read(holder: Path) -> dict | None:
    try:
        info = json.loads(holder.read_text() or "null")
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _describe(info: dict | None) -> str:
    """``process 1234 (started 12:01)``, with the host when it is another machine's."""
    if not info or "pid" not in info:
        return "another process"
    text = f"process {info['pid']}"
    if info.get("host") and info["host"] != socket.gethostname():
        text += f" on {info['host']}"
    try:
        started = time.localtime(float(info["started"]))
    except (KeyError, TypeError, ValueError, OverflowError, OSError):
        return text
    same_day = time.strftime("%Y-%m-%d", started) == time.strftime("%Y-%m-%d")
    return text + f" (started {time.strftime('%H:%M' if same_day else '%Y-%m-%d %H:%M', started)})"
