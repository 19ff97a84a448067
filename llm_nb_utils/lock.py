"""One writer per folder: a second run on the same run directory refuses at once, naming the first.

The lock is an advisory `flock` on a small file in the folder it protects, held for the life of
the work (a training run, a data preparation, a pipeline). The operating system releases it when
its process ends, however it ends, so the lock of a process that was killed is simply taken by the
next run; the file itself only says who holds it.
"""
from __future__ import annotations

import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import SuiteError

try:
    import fcntl
except ImportError:          # Windows: no flock; runs there are not protected
    fcntl = None


class RunLocked(SuiteError):
    pass


def _holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']}, since {h['started']}"
    except (ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def folder_lock(folder: str | Path, what: str, name: str):
    """Hold `<folder>/.<name>.lock` for the `with` block; RunLocked if another process holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    path = folder / f".{name}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
            raise RunLocked(f"{what} is already running in {folder} ({holder}). Fix: wait for it to finish or "
                            "stop it, or use another run directory (run_dir / --out); the lock frees itself "
                            "when that process ends") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        yield
    finally:
        os.close(fd)         # closing the descriptor releases the lock
