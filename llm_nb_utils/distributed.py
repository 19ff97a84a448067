"""Data-parallel training: torch.distributed and DistributedDataParallel, one process per GPU.

Every process (a *rank*) holds the whole model and optimizer. All ranks read the same seeded global
batch of `batch_size` windows and each keeps its own slice of rows, so that the windows a step sees,
and their order, are those of a one-process run; DDP averages the gradients during the backward pass,
and since every slice has the same number of tokens, the average of the ranks' mean losses is the
global mean loss. The result is the one-process run up to the order of floating-point sums.

Everything distributed goes through a `Dist`: the trainer asks it to slice a batch, to sum a number
over ranks, or whether it is the main rank (the one that writes checkpoints, metrics and W&B). A
one-process run gets a `Dist` whose operations do nothing. `init_process` sets the process up and
returns its `Dist`, which also names the device this rank computes on.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import ConfigError
from .device import DeviceError, resolve_device


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str = ""
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise ConfigError(f"batch_size ({batch_size}) is not divisible by the number of processes "
                              f"({self.world_size}): each rank takes an equal slice of every batch. Fix: a "
                              f"batch_size that is a multiple of {self.world_size}, or another number of GPUs.")

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (contiguous slices, rank 0 first)."""
        if not self.enabled:
            return batch
        return batch.tensor_split(self.world_size)[self.rank]     # always world_size pieces, maybe empty

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over ranks, in place (on every rank)."""
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def mean_(self, t: torch.Tensor) -> torch.Tensor:
        return self.sum_(t).div_(self.world_size) if self.enabled else t

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if it is true on one (a Ctrl-C seen by one rank stops all at the same step)."""
        if not self.enabled:
            return flag
        t = torch.tensor([float(flag)], device=device)
        return bool(self.sum_(t).item())

    def gather_floats(self, value: float, device: torch.device) -> list[float]:
        """`value` of every rank, in rank order, on every rank."""
        if not self.enabled:
            return [value]
        t = torch.zeros(self.world_size, device=device, dtype=torch.float64)
        t[self.rank] = value
        return self.sum_(t).tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """DDP around `model`. No find_unused_parameters: the experts are stacked in three tensors,
        so an expert that gets no token on this rank still has a (zero) gradient slice, and every
        parameter takes part in every backward (tests/test_distributed.py checks it)."""
        if not self.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_process(device_setting: str, log=print) -> Dist:
    """This process's place in the run and its device: the process group torchrun describes in the
    environment (WORLD_SIZE, RANK, LOCAL_RANK, ...), joined; a one-process Dist without one. NCCL on
    GPUs where this torch has it, gloo otherwise; under DDP each rank takes the GPU of its local rank."""
    device = resolve_device(device_setting)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "gloo"
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        if dist.is_nccl_available():
            backend = "nccl"
        elif rank == 0:
            log("NCCL is not available in this torch build: the ranks talk over gloo, which is slower on GPUs")
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # A rank that dies leaves the others waiting in a collective: torchrun stops them, and the
        # timeout is the backstop for launches without it.
        dist.init_process_group(backend, timeout=timedelta(minutes=10))
    return Dist(rank, world, local_rank, backend, device)


def check_gpus(n: int) -> None:
    """n visible CUDA GPUs of one kind: DDP runs at the pace of the slowest, and a P100 (no bf16, an
    older architecture) beside a newer GPU would train both in its precision at its speed."""
    visible = torch.cuda.device_count()
    if n > visible:
        raise DeviceError(f"{n} GPUs were asked for but {visible} {'is' if visible == 1 else 'are'} visible. Fix: "
                          f"gpus={visible or 1} (or 'auto').")
    kinds = {(torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i)) for i in range(n)}
    if len(kinds) > 1:
        names = ", ".join(sorted(k[0] for k in kinds))
        raise DeviceError(f"the {n} GPUs are of different kinds ({names}): data-parallel training would run every "
                          "GPU at the pace and in the precision of the oldest. Fix: gpus=1, or make only GPUs of one "
                          "kind visible with CUDA_VISIBLE_DEVICES.")


def resolve_gpus(gpus, device: str) -> int:
    """The number of training processes: `auto` is every visible CUDA GPU (1 without one); a number
    is taken as given (on the CPU too, where it means processes talking over gloo: for tests)."""
    if isinstance(gpus, str):
        if gpus.strip().lower() == "auto":
            cuda = device != "cpu" and torch.cuda.is_available()
            return max(1, torch.cuda.device_count()) if cuda else 1
        if not gpus.strip().isdigit():
            raise ConfigError(f"gpus must be 'auto' or a number of GPUs (got {gpus!r})")
        gpus = int(gpus)
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ConfigError(f"gpus must be 'auto' or a number of GPUs >= 1 (got {gpus!r})")
    if gpus > 1 and device != "cpu" and torch.cuda.is_available():
        check_gpus(gpus)
    return gpus
