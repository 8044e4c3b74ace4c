"""Atomic writes and the skip-if-unchanged stamps that every stage uses.

Every file is written to a temporary sibling and renamed into place, so a crash never
leaves half a file. A stage records a fingerprint of its inputs and config next to its
outputs; a re-run with the same fingerprint and all outputs present is skipped.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from pipeline.core.errors import os_error_code

TMP_SUFFIX = ".tmp"
STALE_TMP_SECONDS = 3600  # a temporary file without a writer's pid in its name is stale after this


@contextmanager
def atomic_path(path: Path | str):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    A full disk, a denied write or a read-only file system met while writing is an ``OSError`` naming
    ``path``: a write through a file object (pandas, safetensors, torch) raises one without any path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-", suffix=TMP_SUFFIX)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except Exception as exc:
        code = os_error_code(exc)
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(path)) from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def copy_file(source: Path | str, path: Path | str) -> Path:
    """Copy ``source`` onto ``path`` atomically (a crash leaves the old file or none)."""
    with atomic_path(path) as tmp:
        shutil.copyfile(source, tmp)
    return Path(path)


def write_text(path: Path | str, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: Path | str, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_csv(path: Path | str, frame: pd.DataFrame, **kwargs) -> Path:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, **kwargs)
    return Path(path)


def read_json(path: Path | str) -> Any:
    return json.loads(Path(path).read_text())


def file_digest(path: Path | str) -> str:
    """SHA-1 of a file's bytes (fast enough for CSVs and configs)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(config_part: Any, input_files: Iterable[Path | str] = ()) -> str:
    """A stable digest of a config fragment and the contents of input files."""
    h = hashlib.sha1(json.dumps(config_part, sort_keys=True, default=str).encode())
    for p in sorted(str(p) for p in input_files):
        h.update(p.encode())
        h.update(file_digest(p).encode() if os.path.isfile(p) else b"missing")  # a folder: the stage says so
    return h.hexdigest()


def _stamp_path(output: Path) -> Path:
    return output.parent / f".{output.name}.stamp"


def _read_stamp(output: Path) -> tuple[str | None, dict]:
    """The fingerprint an output was written under and what was written (``bytes``, ``sha256``; empty
    in stamps of older versions, which held the fingerprint only)."""
    try:
        lines = _stamp_path(output).read_text().splitlines()
    except OSError:
        return None, {}
    try:
        written = json.loads(lines[1]) if len(lines) > 1 else {}
    except ValueError:
        written = {"stamp": "damaged"}  # a stamp cut short (a killed copy): nothing it says is trusted
    return (lines[0].strip() if lines else None), (written if isinstance(written, dict) else {})


def is_up_to_date(outputs: Iterable[Path | str], digest: str) -> bool:
    """True when every output exists, was written under the same fingerprint, and is whole: the size
    written (and a safetensors file's header) checked, :func:`file_problem` without the digest."""
    for out in map(Path, outputs):
        stamped, _ = _read_stamp(out)
        if not out.exists() or stamped != digest or file_problem(out) is not None:
            return False
    return True


def mark_done(outputs: Iterable[Path | str], digest: str) -> None:
    """Stamp each output with ``digest`` and what was written: its size and SHA-256 (files only)."""
    for out in map(Path, outputs):
        written = {"bytes": out.stat().st_size, "sha256": sha256_digest(out)} if out.is_file() else {}
        write_text(_stamp_path(out), digest + "\n" + (json.dumps(written) + "\n" if written else ""))


def unstamp(outputs: Iterable[Path | str]) -> None:
    """Forget that ``outputs`` were written (their stamps), before they are rewritten."""
    for out in map(Path, outputs):
        _stamp_path(out).unlink(missing_ok=True)


def discard(output: Path | str) -> None:
    """Remove an output and its stamp (the stamp first: a file without one is never trusted)."""
    output = Path(output)
    _stamp_path(output).unlink(missing_ok=True)
    output.unlink(missing_ok=True)


def sha256_digest(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_problem(path: Path | str, digest: bool = False) -> str | None:
    """What is wrong with an output against what :func:`mark_done` recorded of it, else None: another
    size (a copy cut short, a full disk), a safetensors header that describes more or fewer bytes than
    the file has, and with ``digest`` other bytes (SHA-256: it reads the whole file). An output without
    a record (never stamped, or by an older version) is checked for its header only."""
    path = Path(path)
    _, written = _read_stamp(path)
    try:
        size = path.stat().st_size
    except OSError:
        return "it is missing"
    if written.get("stamp") == "damaged":
        return f"its stamp {_stamp_path(path).name} is damaged"
    if "bytes" in written and size != written["bytes"]:
        return f"{size} bytes where {written['bytes']} were written: cut short or overwritten"
    if path.suffix == ".safetensors":
        problem = safetensors_problem(path)
        if problem:
            return problem
    if digest and "sha256" in written and sha256_digest(path) != written["sha256"]:
        return "its bytes differ from those written (SHA-256)"
    return None


def safetensors_problem(path: Path | str) -> str | None:
    """None when a safetensors file is whole: an 8-byte header length, a JSON header, and exactly the
    bytes its tensors' offsets describe; else what is wrong (reads the header only)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < length <= size - 8:
                return f"not a safetensors file: its {size} bytes hold no whole header"
            header = json.loads(f.read(length))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        return "not a safetensors file: its header is not valid"
    if 8 + length + end != size:
        return f"cut short: {size} bytes where its header describes {8 + length + end}"
    return None


# ---------------------------------------------------------------------------- before a stage writes


def check_writable(*folders: Path | str) -> None:
    """Refuse to start a stage whose output ``folders`` cannot be created or written: each must be a
    folder (or not exist yet below a writable folder). Writes nothing."""
    from pipeline.core.errors import PipelineError

    for folder in map(Path, folders):
        probe = folder
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        if not probe.is_dir():
            raise PipelineError(f"output folder {folder}: {probe} is a file, not a folder; remove or rename it, "
                                f"or point runs_dir, folds_dir or submissions_dir (config keys) elsewhere")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise PipelineError(f"output folder {folder}: {probe} is not writable; make it writable (chmod/chown) "
                                f"or point runs_dir, folds_dir or submissions_dir (config keys) at a writable folder")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _is_stale(tmp: Path) -> bool:
    """A temporary file of :func:`atomic_path` whose writer is gone (killed mid-write)."""
    middle = tmp.name[: -len(TMP_SUFFIX)].rsplit(".", 1)[-1]  # "<pid>-<random>" (older files: "<random>")
    pid = middle.split("-", 1)[0]
    if "-" in middle and pid.isdigit():
        return not _pid_alive(int(pid))
    try:
        return time.time() - tmp.stat().st_mtime > STALE_TMP_SECONDS
    except FileNotFoundError:
        return False


def remove_stale_temps(*folders: Path | str, recursive: bool = False) -> list[Path]:
    """Delete ``.<name>.<pid>-<random>.tmp`` files left in ``folders`` by a process killed during an
    atomic write (its pid no longer runs); files of running writers are left alone."""
    removed = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            continue
        pattern = f".*{TMP_SUFFIX}"
        for tmp in (folder.rglob(pattern) if recursive else folder.glob(pattern)):
            if tmp.is_file() and _is_stale(tmp):
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    if removed:
        names = ", ".join(p.name for p in removed[:3]) + (" ..." if len(removed) > 3 else "")
        print(f"removed {len(removed)} temporary files left by an interrupted run: {names}")
    return removed
