"""Atomic, rotating training checkpoints.

A checkpoint is written to a temporary name unique to the writing process, flushed to disk, then
renamed over its final name (`files.write_atomic`): a kill during a save leaves the previous
checkpoints intact and no half-written file under a checkpoint name.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .errors import SuiteError
from .files import write_atomic

_NAME = re.compile(r"^step_(\d{8})\.pt$")


class CheckpointError(SuiteError):
    """A checkpoint that cannot be read; `reason` names it without the fix."""

    def __init__(self, path: Path, cause: Exception):
        self.reason = f"checkpoint {path} could not be read ({type(cause).__name__}: {cause})"
        super().__init__(f"{self.reason}. Fix: delete it to resume from the one before, or set resume=False "
                         "to start over.")


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:08d}.pt"


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if _NAME.match(p.name)), key=lambda p: p.name)


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """About what one training checkpoint of `model` takes on disk: the weights and AdamW's two
    moments in fp32, plus a little for the rest (RNG, schedule, history)."""
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return 3 * 4 * params + 2**20


def save_checkpoint(state: dict, ckpt_dir: str | Path, step: int, keep: int = 3, needed_bytes: int | None = None) -> Path:
    """Write `state` as step_<step>.pt, keep the newest `keep`; `needed_bytes` goes into a full-disk message."""
    ckpt_dir = Path(ckpt_dir)
    final = write_atomic(checkpoint_path(ckpt_dir, step), lambda f: torch.save(state, f), needed_bytes)
    for old in list_checkpoints(ckpt_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return final


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise CheckpointError(Path(path), e) from None
