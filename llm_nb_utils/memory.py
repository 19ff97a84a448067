"""Peak resident memory of this process, resettable on Linux (as CUDA's peak statistics are)."""
from __future__ import annotations

import resource
from pathlib import Path

_STATUS = Path("/proc/self/status")


def _status_mb(field: str) -> float | None:
    """A memory line of /proc/self/status (Linux), in MB; None where there is none."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak RSS since the process started or since the last `reset_peak_rss()` (Linux VmHWM)."""
    peak = _status_mb("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux


def rss_mb() -> float | None:
    """Resident memory of this process now (Linux VmRSS), None where /proc does not say."""
    return _status_mb("VmRSS")


def reset_peak_rss() -> bool:
    """Start a new peak from the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
