"""The one exception type a user sees: what is wrong, where, and what to do."""
import errno
import os


class PipelineError(Exception):
    """Bad input or a state the user can fix. The CLI prints it without a traceback."""


def first_few(items, n: int = 5) -> str:
    """Format the first ``n`` items of a sequence for an error message, with the total count."""
    items = list(items)
    shown = ", ".join(str(x) for x in items[:n])
    more = f" (and {len(items) - n} more)" if len(items) > n else ""
    return f"{shown}{more}"


def quoted(items, n: int = 5) -> str:
    """:func:`first_few` with each item in quotes (``repr``), so that spaces around an id or a
    label show: ``'1 '`` is visibly not ``'1'``."""
    return first_few((repr(str(x)) for x in items), n)


# errno -> what a user does about it, for errors of the file system met anywhere in a stage
_OS_ADVICE = {
    errno.EACCES: "permission denied; make it writable (chmod/chown) or point runs_dir, folds_dir or "
                  "submissions_dir (config keys) at a writable folder",
    errno.EPERM: "operation not permitted; make it writable or point runs_dir, folds_dir or submissions_dir "
                 "(config keys) at a writable folder",
    errno.EROFS: "read-only file system; point runs_dir, folds_dir or submissions_dir (config keys) at a "
                 "writable folder",
    errno.ENOSPC: "no space left on the device; free some space (or point runs_dir at a bigger disk) and "
                  "re-run the same command: finished folds and epochs are kept",
    errno.EDQUOT: "disk quota exceeded; free some space (or point runs_dir at a bigger disk) and re-run the "
                  "same command: finished folds and epochs are kept",
    errno.EISDIR: "is a folder where a file is expected; remove or rename that folder",
    errno.ENOTDIR: "a part of this path is a file where a folder is expected; remove or rename that file",
}
_OS_TEXT = {"No space left on device": errno.ENOSPC, "os error 28": errno.ENOSPC,
            "Permission denied": errno.EACCES, "os error 13": errno.EACCES,
            "Read-only file system": errno.EROFS, "os error 30": errno.EROFS}


def os_error_code(exc: BaseException) -> int | None:
    """The errno of a permission, read-only, full-disk or folder-for-file error, else None.

    ``OSError`` carries its errno; libraries that write through their own I/O (safetensors,
    torch.save) raise other types whose text holds the OS message, matched here as a fallback."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None:
        text = str(exc)
        code = next((c for marker, c in _OS_TEXT.items() if marker in text), None)
    return code if code in _OS_ADVICE else None


def os_error_message(exc: BaseException) -> str | None:
    """One line for a permission, read-only, full-disk or folder-for-file error, else None: the path
    (``OSError.filename``; :func:`pipeline.core.artifacts.atomic_path` gives every write's error the file
    it was writing) and what to do."""
    code = os_error_code(exc)
    if code is None:
        return None
    path = getattr(exc, "filename", None)
    if path and os.path.basename(str(path)).startswith(".") and str(path).endswith(".tmp"):
        path = os.path.dirname(str(path))  # an atomic write's temporary file: name its folder
    return f"{path or 'a file operation'}: {_OS_ADVICE[code]}"
