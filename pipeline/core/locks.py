"""Locks on work in progress, so that two runs of one stage at once do not do the same work twice.

The lock on an output (a fold folder, the folds file, the ensemble folder) is a ``filelock`` lock on
the file ``.<name>.lock`` beside it: the OS's own lock (``flock``; ``msvcrt.locking`` on Windows),
which the OS releases when the process ends, however it ends; its file is removed on release.
Where the file system cannot ``flock`` (NFS without a lock daemon: ``ENOLCK``; some FUSE and SMB
mounts: ``EOPNOTSUPP``), it is filelock's soft lock: the file ``.<name>.softlock`` created with
``O_EXCL``, broken when its process no longer runs on this host, or when it is older than
:data:`STALE_SECONDS` (another host's, or a pid that may have been reused). It has a path of its own:
the failed ``flock`` try leaves an empty ``.<name>.lock``, which a soft lock at that path would take
for another process's (filelock reads an empty marker as an older holder's), and skip the work.

Beside it, ``.<name>.holder`` names the holder (pid, host, start time) for the one-line message a
second run prints; the lock file cannot carry it (filelock 3.x truncates it on every try). A holder
file still there when the lock is taken was left by a killed process: taken over with a one-line note.
A lock that stays taken while no process names itself its holder is an error, never a skipped job.

A stage that rewrites what others read (train, the models of an experiment) says so for as long as it
runs with :func:`rewriting` (``.writer-<host>-<pid>.lock`` in the folder); several such processes may
run at once. A stage that reads those files (ensemble, predict, bundle) first waits for them with
:func:`wait_for_writers`.

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
HOLDER_GRACE_SECONDS = 3.0  # a new holder names itself within this; a taken lock that names nobody is an error
UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # flock on some network file systems

#: The lock's class: the OS's lock where there is one (filelock.FileLock), else filelock's soft lock.
#: A run falls back to :func:`soft_lock` by itself where ``flock`` fails with one of :data:`UNSUPPORTED`.
LOCK_CLASS: type[filelock.BaseFileLock] = filelock.FileLock


def lock_path(target: Path | str) -> Path:
    """The lock file of an output (a file or a folder): ``.<name>.lock`` beside it."""
    target = Path(target)
    return target.parent / f".{target.name}.lock"


def soft_lock_path(target: Path | str) -> Path:
    """The soft lock file of an output, used where ``flock`` fails: ``.<name>.softlock`` beside it."""
    target = Path(target)
    return target.parent / f".{target.name}.softlock"


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
    holder = holder_path(target)
    holder.parent.mkdir(parents=True, exist_ok=True)
    lock, held = _first_try(target)
    if not held:
        held = _try_while_unnamed(lock, holder)
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
            print(f"{what}: taking over the lock {Path(lock.lock_file).name} left by {_describe(left)}, "
                  f"which no longer runs")
        mine = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        write_json(holder, mine)
    except BaseException:
        lock.release()
        raise
    try:
        yield True
    finally:
        _release(lock, target, mine)


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


# ---------------------------------------------------------------------------- files being rewritten

WRITER = "writer-"  # a mark of :func:`rewriting`: a lock of its own, ``.writer-<host>-<pid>.lock``, per process


@contextmanager
def rewriting(folder: Path | str, what: str) -> Iterator[None]:
    """Mark the files under ``folder`` as being rewritten by this process for the block. Several
    processes may at once: each holds a lock of its own in ``folder`` (``.writer-<host>-<pid>.lock``,
    which the OS releases if the process is killed, and its ``.holder``); :func:`wait_for_writers`
    waits for every such mark."""
    with hold(Path(folder) / _own_mark(), what, "is running"):
        yield


def wait_for_writers(folder: Path | str, reader: str, being: str) -> None:
    """Wait while another process marks ``folder`` with :func:`rewriting`, saying so in one line per
    writer (``<reader>: <being> by process 1234 (started 12:01); waiting for it to end``). A mark left
    by a killed process is removed."""
    folder, told = Path(folder), set()
    while True:
        busy = [mark for mark in _marks(folder) if not _mark_is_free(mark)]
        if not busy:
            return
        for mark in busy:
            if mark.name not in told:
                told.add(mark.name)
                print(f"{reader}: {being} by {_describe(_read(holder_path(mark)))}; waiting for it to end "
                      f"(Ctrl-C stops waiting)", flush=True)
        time.sleep(POLL_SECONDS)


def _own_mark() -> str:
    return f"{WRITER}{socket.gethostname()}-{os.getpid()}"


def _marks(folder: Path) -> list[Path]:
    """The marks in ``folder`` (from their ``.lock``, ``.softlock`` or ``.holder`` files), not this process's."""
    if not folder.is_dir():
        return []
    names = {name[1:].rsplit(".", 1)[0] for name in os.listdir(folder)
             if name.startswith("." + WRITER) and name.endswith((".lock", ".softlock", ".holder"))}
    return [folder / name for name in sorted(names - {_own_mark()})]


def _mark_is_free(mark: Path) -> bool:
    """Whether no process holds ``mark``; a free one (its process was killed) is removed."""
    lock, held = _first_try(mark)
    if not held and not _try_while_unnamed(lock, holder_path(mark)):
        return False
    holder_path(mark).unlink(missing_ok=True)
    _release(lock, mark, None)
    return True


# ---------------------------------------------------------------------------- the lock and its holder


def _first_try(target: Path) -> tuple[filelock.BaseFileLock, bool]:
    """The lock and whether one try took it; a soft lock where this file system cannot flock.

    The soft lock after a failed ``flock`` is ``.<name>.softlock``: the failed try leaves ``.<name>.lock``
    behind, empty, and an empty marker is a live holder to filelock (its older versions wrote none)."""
    path = lock_path(target)
    lock = soft_lock(path) if LOCK_CLASS is filelock.SoftFileLock else LOCK_CLASS(str(path))
    try:
        return lock, _try(lock)
    except OSError as exc:
        if exc.errno not in UNSUPPORTED or isinstance(lock, filelock.SoftFileLock):
            raise
    lock = soft_lock(soft_lock_path(target))
    return lock, _try(lock)


def _try_while_unnamed(lock: filelock.BaseFileLock, holder: Path) -> bool:
    """A taken lock whose holder names itself (or that is released) within :data:`HOLDER_GRACE_SECONDS`:
    whether it was taken meanwhile. A lock that stays taken by nobody is an error: skipping the work
    for it would leave the work undone and say nothing went wrong."""
    deadline = time.monotonic() + HOLDER_GRACE_SECONDS
    while _read(holder) is None:
        if _try(lock):
            return True
        if time.monotonic() > deadline:
            from pipeline.core.errors import PipelineError

            path = Path(lock.lock_file)
            raise PipelineError(f"the lock {path} is taken, but no process names itself its holder "
                                f"({holder.name} is missing): if no other run uses {path.parent}, delete {path} "
                                f"and re-run the same command")
        time.sleep(POLL_SECONDS / 5)
    return False


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


def _release(lock: filelock.BaseFileLock, target: Path, mine: dict | None) -> None:
    """Remove the holder file (if it is still ours) and the lock file while still holding the lock, then release.

    filelock's current releases keep a flock file in place on release; removing it while held leaves no
    ``.<name>.lock`` behind, and is safe: a waiter that then takes the removed file sees it has no name
    left (``st_nlink`` 0) and opens the path anew, in every filelock from 3.24 on. A soft lock's file
    (or filelock's own soft fallback's, which is not empty) is removed by its release itself; beside a
    ``.<name>.softlock``, the empty ``.<name>.lock`` that the failed ``flock`` try left is removed too
    (nobody can ``flock`` it on this file system).
    """
    holder, path = holder_path(target), lock_path(target)
    try:
        if _read(holder) == mine:
            holder.unlink(missing_ok=True)
        soft_fallback = Path(lock.lock_file) == soft_lock_path(target)
        if (soft_fallback or not isinstance(lock, filelock.SoftFileLock)) and path.stat().st_size == 0:
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
