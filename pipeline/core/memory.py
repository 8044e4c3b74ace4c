"""This process's memory: resident now (the tune stage's trials table, the input benchmark) and its peak
(the training benchmark).

Resident memory is psutil's, on every OS. The peak on Linux is ``VmHWM`` from ``/proc/self/status``:
psutil has no peak there (``memory_full_info`` adds uss, pss and swap, not a high-water mark), and
``ru_maxrss`` is no substitute in a process started by fork + exec (``python -c``), which inherits the
forking parent's high-water mark across the exec. Elsewhere the peak is psutil's peak working set
(Windows) or ``ru_maxrss``.
"""
from __future__ import annotations

import sys

import psutil

MIB = 2**20


def resident_mib() -> float | None:
    """This process's resident memory in MiB, to 0.1 MiB; None where it cannot be read."""
    try:
        return round(psutil.Process().memory_info().rss / MIB, 1)
    except (psutil.Error, OSError):
        return None


def peak_mib() -> float:
    """This process's own peak resident memory in MiB."""
    try:
        with open("/proc/self/status") as status:  # Linux: the one number psutil does not give
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    info = psutil.Process().memory_info()
    if hasattr(info, "peak_wset"):  # Windows
        return info.peak_wset / MIB
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere
