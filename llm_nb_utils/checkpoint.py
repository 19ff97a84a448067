"""Atomic, rotating training checkpoints, and `Checkpoints`, the one object a training run touches them through.

A checkpoint is written to a temporary name unique to the writing process, flushed to disk, then
renamed over its final name (`files.write_atomic`): a kill during a save leaves the previous
checkpoints intact and no half-written file under a checkpoint name.
"""
from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import torch

from .errors import SuiteError
from .files import StorageError, check_writable, free_bytes, shown, write_atomic

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
        ck = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise CheckpointError(Path(path), e) from None
    if isinstance(ck, dict) and isinstance(ck.get("model"), dict):
        ck["model"] = _renamed_expert_weights(ck["model"])
    return ck


_OLD_EXPERT_KEY = re.compile(r"^(.*\.moe\.)(w_gate|w_up|w_down)$")


def _renamed_expert_weights(state: dict) -> dict:
    """Checkpoints written before the experts became a module of their own (`moe.GroupedExperts`)
    name their weights `blocks.N.moe.w_gate`; today's are `blocks.N.moe.experts.w_gate`. Same tensors,
    same parameter order, so an interrupted run from then resumes as it would have."""
    return {_OLD_EXPERT_KEY.sub(r"\1experts.\2", k): v for k, v in state.items()}


class Checkpoints:
    """One arm's checkpoint folder during a training run: the only code that writes, moves or reads
    its files. Every rank calls every method; only rank 0 touches the disk (the others wait at the
    barriers), and every rank loads the same file."""

    def __init__(self, folder: Path, dist, keep: int, log=print, shown_base: Path | None = None):
        self.folder, self.dist, self.keep, self.log = Path(folder), dist, keep, log
        self.base = shown_base or self.folder
        self.needed_bytes: int | None = None     # disk the checkpoints need, once check_space has run

    def newest(self) -> Path | None:
        return latest_checkpoint(self.folder)

    def restore(self, resume: bool, map_location) -> tuple[dict, Path] | None:
        """The newest readable checkpoint and its path, or None to start afresh. A damaged one is moved
        aside, saying so; with resume=False the old ones are moved aside whole."""
        # Holding the lock, any temporary file here is a dead writer's: a save killed half-way.
        for tmp in self.folder.glob(".step_*.tmp") if self.folder.is_dir() else []:
            tmp.unlink(missing_ok=True)
        found = list_checkpoints(self.folder)
        if found and not resume:
            self.dist.barrier()      # every rank has listed the folder before rank 0 moves it
            if self.dist.is_main:
                aside = self.folder.with_name(f"{self.folder.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
                shutil.move(str(self.folder), aside)
                self.log(f"resume=False: previous checkpoints moved to {shown(aside, self.base)}")
            self.dist.barrier()
            return None
        for path in reversed(found):
            try:
                return load_checkpoint(path, map_location=map_location), path
            except CheckpointError as e:
                aside = path.with_name(path.name + ".damaged")
                self.dist.barrier()
                if self.dist.is_main:
                    path.rename(aside)
                self.log(f"warning: {e.reason}; it is moved to {aside.name} and the run resumes from the "
                         "checkpoint before it")
        return None

    def check_space(self, model: torch.nn.Module, arm: str) -> None:
        """Fail now, not at the first checkpoint hours later, where checkpoints cannot be written."""
        if not self.dist.is_main:
            return
        check_writable(self.folder)
        needed = self.needed_bytes = (self.keep + 1) * checkpoint_bytes(model)   # +1: being written
        free = free_bytes(self.folder)
        if free < needed:
            raise StorageError(28, f"{self.folder} has {free / 1e9:.2f} GB free, and {arm}'s checkpoints "
                                   f"need about {needed / 1e9:.2f} GB ({self.keep} kept + 1 being "
                                   "written). Fix: free some space there, lower keep_checkpoints, or choose "
                                   "another run_dir")

    def save(self, state: dict, step: int) -> Path:
        """Rank 0 writes step_<step>.pt and keeps the newest `keep`; every rank then waits, so that no
        rank ends (or is stopped by torchrun) while rank 0 still writes."""
        path = checkpoint_path(self.folder, step)
        if self.dist.is_main:
            path = save_checkpoint(state, self.folder, step, self.keep, self.needed_bytes)
        self.dist.barrier()
        return path
