"""Locks on work in progress, so that two runs of one stage at once do not do the same work twice.

A lock is a file ``.<name>.lock`` beside the output it guards (a fold folder, the folds file, the
ensemble folder) that holds the holder's pid, host and start time, for the message a second run
prints. On POSIX systems the lock itself is ``fcntl.flock`` on that file, which the OS releases
when the process ends, however it ends: a lock file left by a killed process is taken over at
once, with a one-line note. Where there is no ``flock`` the file is created with
``O_CREAT | O_EXCL`` and taken over when its process no longer runs on this host, or when it is
older than :data:`STALE_SECONDS` (a pid may have been reused).

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
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

try:
    import fcntl
except ImportError:  # Windows: O_EXCL lock files
    fcntl = None

STALE_SECONDS = 3 * 24 * 3600  # O_EXCL locks only: older than this, the holder's pid may have been reused
POLL_SECONDS = 0.5  # how often a waiting run looks again
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # flock on some network file systems


def lock_path(target: Path | str) -> Path:
    """The lock file of an output (a file or a folder): ``.<name>.lock`` beside it."""
    target = Path(target)
    return target.parent / f".{target.name}.lock"


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
    path = lock_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    told = False
    while True:
        fd, other = _acquire(path, what)
        if fd is not None:
            break
        who = _describe(other)
        if not wait:
            print(f"{what} {doing} by {who}; skipping it - re-run when it ends")
            yield False
            return
        if not told:
            print(f"{what} {doing} by {who}; waiting for it to end (Ctrl-C stops waiting)", flush=True)
            told = True
        time.sleep(POLL_SECONDS)
    try:
        yield True
    finally:
        _release(fd, path)


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


# ---------------------------------------------------------------------------- the lock file


def _acquire(path: Path, what: str) -> tuple[int | None, dict | None]:
    """(open descriptor, None) when this process now holds the lock; (None, holder's info) when not."""
    if fcntl is not None:
        result = _acquire_flock(path, what)
        if result is not None:
            return result
    return _acquire_exclusive(path, what)


def _acquire_flock(path: Path, what: str) -> tuple[int | None, dict | None] | None:
    """flock the lock file; None when this file system cannot flock (then an O_EXCL file is used)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            info = _read(fd)
            os.close(fd)
            if exc.errno in _UNSUPPORTED:
                return None
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return None, info
            raise
        if not _same_file(fd, path):  # its holder released and removed it after we opened it: open anew
            os.close(fd)
            continue
        left = _read(fd)  # still there although nobody holds it: its process was killed
        if left:
            print(f"{what}: taking over the lock {path.name} left by {_describe(left)}, which no longer runs")
        _write(fd)
        return fd, None


def _acquire_exclusive(path: Path, what: str) -> tuple[int | None, dict | None]:
    """Create the lock file with O_EXCL, taking over a stale one (its process gone, or too old)."""
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            info = _read_path(path)
            if not _is_stale(info, path):
                return None, info
            print(f"{what}: taking over the lock {path.name} left by {_describe(info)}, which no longer runs")
            path.unlink(missing_ok=True)
            continue
        _write(fd)
        return fd, None
    return None, _read_path(path)


def _release(fd: int, path: Path) -> None:
    """Remove the lock file (while still holding it, so no one takes a file about to vanish), then close."""
    try:
        if _same_file(fd, path):
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)  # releases the flock


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _write(fd: int) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(info) + "\n").encode())


def _read(fd: int) -> dict | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "null")
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _read_path(path: Path) -> dict | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return _read(fd)
    finally:
        os.close(fd)


def _is_stale(info: dict | None, path: Path) -> bool:
    """An O_EXCL lock whose holder is gone: its pid does not run on this host, or it is too old."""
    try:
        age = time.time() - (info or {}).get("started", path.stat().st_mtime)
    except (OSError, TypeError):
        return False
    if age > STALE_SECONDS:
        return True
    if not info or info.get("host") != socket.gethostname() or os.name != "posix":
        return False  # another machine's process (or no safe liveness probe here): trust it until too old
    try:
        os.kill(int(info["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError, TypeError, OverflowError):
        return False
    return False


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
