"""Every file the suite writes goes through here: written whole or not at all, and a full or
read-only disk reported in one line that names the folder and the fix.

A write goes to a temporary name unique to the writing process (two runs never share one), is
flushed to disk, then renamed over the final name: a kill at any moment leaves either the old file
or the new one, never half of one, and no temporary file behind it after an error.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from .errors import SuiteError


class StorageError(SuiteError, OSError):
    """A read-only folder or a full disk."""

    def __init__(self, code: int, message: str):
        super().__init__(message)    # one argument: str() is the message, without "[Errno N]"
        self.errno = code


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def storage_error(e: OSError, path: Path, needed_bytes: int | None = None) -> OSError:
    """A StorageError for a full disk or a read-only folder; any other OSError unchanged."""
    folder = Path(path).parent
    if e.errno == errno.ENOSPC:
        try:
            free = _gb(shutil.disk_usage(folder).free)
        except OSError:
            free = "?"
        need = f"; the run needs about {_gb(needed_bytes)} in all" if needed_bytes else ""
        return StorageError(errno.ENOSPC, f"the disk holding {folder} is full ({free} free) while writing "
                            f"{Path(path).name}{need}. Fix: free some space there or choose another run_dir, "
                            "then run the same command again: finished work is kept")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        what = "" if Path(path).name.startswith(".write-test") else f"writing {Path(path).name}: "
        return StorageError(e.errno, f"{folder} is read-only ({what}{e.strerror}). Fix: "
                            "choose a writable run_dir (on Kaggle under /kaggle/working; input datasets are "
                            "read-only)")
    return e


def write_atomic(path: str | Path, write: Callable[[Any], None] | bytes | str, needed_bytes: int | None = None) -> Path:
    """Write `path` whole or not at all. `write` is the content (bytes or str) or a function that
    writes to the open binary file."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            if callable(write):
                write(f)
            else:
                f.write(write.encode("utf-8") if isinstance(write, str) else write)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        cause = os_error_in(e)
        if cause is not None and not isinstance(e, StorageError):
            raise storage_error(cause, path, needed_bytes) from None
        raise
    return path


def os_error_in(e: BaseException) -> OSError | None:
    """The OSError behind `e`: itself, or one it was raised from (torch.save turns a full disk into
    a RuntimeError whose context is the OSError)."""
    while e is not None:
        if isinstance(e, OSError) and e.errno is not None:
            return e
        e = e.__cause__ or e.__context__
    return None


def write_json(path: str | Path, data: Any) -> Path:
    return write_atomic(path, json.dumps(data, indent=1, ensure_ascii=False))


def read_json(path: str | Path, fix: str) -> Any:
    """A JSON file the suite wrote; a damaged one is named with `fix` (how to rebuild it)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedFileError(f"{path} is damaged ({type(e).__name__}: {e}). Fix: {fix}") from None


class DamagedFileError(SuiteError):
    pass


def check_writable(folder: str | Path) -> None:
    """Fail at once, in one line, where a folder cannot be created or written."""
    folder = Path(folder)
    probe = folder / f".write-test.{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise storage_error(e, probe) from None


def shown(path: str | Path, base: str | Path) -> str:
    """`path` as printed in notebooks and reports: relative to `base` (the run directory) when it is
    inside it, so that no reader sees the layout of the machine the run happened on."""
    try:
        return Path(path).resolve().relative_to(Path(base).resolve()).as_posix()
    except ValueError:
        return str(path)


def repository_of(path: str | Path) -> Path | None:
    """The git checkout holding `path` (the nearest folder above it with a .git), or None."""
    for folder in Path(path).resolve().parents:
        if (folder / ".git").exists():
            return folder
    return None


def without_machine_paths(files, roots) -> None:
    """Rewrite each text file of `files` with every `root` folder's absolute path left out, so
    that an executed notebook or log kept in a repository names its folders from that repository
    ("docs/run/...") and not by the layout of the machine that ran it. Missing files are skipped."""
    prefixes = sorted({str(Path(r).resolve()) + "/" for r in roots if r}, key=len, reverse=True)
    for f in map(Path, files):
        if not f.is_file():
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        portable = text
        for prefix in prefixes:
            portable = portable.replace(prefix, "")
        if portable != text:
            write_atomic(f, portable)


def free_bytes(folder: str | Path) -> int:
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free
