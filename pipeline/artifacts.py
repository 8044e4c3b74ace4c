"""Atomic writes and the skip-if-unchanged stamps that every stage uses.

Every file is written to a temporary sibling and renamed into place, so a crash never
leaves half a file. A stage records a fingerprint of its inputs and config next to its
outputs; a re-run with the same fingerprint and all outputs present is skipped.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

import pandas as pd


@contextmanager
def atomic_path(path: Path | str):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


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
        h.update(file_digest(p).encode() if os.path.exists(p) else b"missing")
    return h.hexdigest()


def _stamp_path(output: Path) -> Path:
    return output.parent / f".{output.name}.stamp"


def is_up_to_date(outputs: Iterable[Path | str], digest: str) -> bool:
    """True when every output exists and was written under the same fingerprint."""
    for out in map(Path, outputs):
        stamp = _stamp_path(out)
        if not out.exists() or not stamp.exists() or stamp.read_text().strip() != digest:
            return False
    return True


def mark_done(outputs: Iterable[Path | str], digest: str) -> None:
    for out in map(Path, outputs):
        write_text(_stamp_path(out), digest + "\n")
