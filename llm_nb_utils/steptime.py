"""Timing training steps on random token ids: the sweep's cost estimate and benchmarks/train_throughput.py.

A step's cost does not depend on which tokens it sees, so random ids stand in for data. The first
steps (the allocator growing, AdamW creating its state, a compile) are run untimed.
"""
from __future__ import annotations

import time

import torch

from .config import Config
from .device import Precision, maybe_compile, synchronize
from .train import make_optimizer, training_step


def random_batches(cfg: Config, batch_size: int, device: torch.device, n: int = 4) -> list[torch.Tensor]:
    """`n` batches of `context_length + 1` random ids (inputs and their shifted targets), pinned for a GPU."""
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.vocab_size, (batch_size, cfg.context_length + 1), generator=gen)
               for _ in range(n)]
    return [b.pin_memory() for b in batches] if device.type == "cuda" else batches


def time_training_steps(model: torch.nn.Module, cfg: Config, prec: Precision, batch_size: int, steps: int,
                        warmup: int = 1, log=print) -> list[float]:
    """Seconds of each of `steps` optimizer steps after `warmup` untimed ones, each step synchronised:
    the engine's own training step, with a fresh AdamW, compiled where `cfg.compile` asks and the GPU allows."""
    optimizer = make_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(prec.device.type, enabled=prec.use_grad_scaler)
    forward = maybe_compile(model, cfg.compile, prec.device, log=log)
    batches = random_batches(cfg, batch_size, prec.device)
    synchronize(prec.device)
    times = []
    for i in range(warmup + steps):
        b = batches[i % len(batches)]
        t0 = time.perf_counter()
        training_step(forward, b[:, :-1], b[:, 1:], optimizer, scaler, prec, cfg)
        synchronize(prec.device)
        times.append(time.perf_counter() - t0)
    return times[warmup:]
