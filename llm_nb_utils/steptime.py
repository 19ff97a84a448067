"""Timing training steps on random token ids: the sweep's cost estimate and benchmarks/train_throughput.py.

A step's cost does not depend on which tokens it sees, so random ids stand in for data. The first
steps (the allocator growing, AdamW creating its state, a compile) are run untimed.
"""
from __future__ import annotations

import statistics
import time

import torch

from .arms import build_model
from .config import Config
from .device import Precision, maybe_compile, resolve_device, resolve_precision, synchronize
from .step import make_optimizer, training_step


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


@torch.no_grad()
def time_evaluation_batches(model: torch.nn.Module, cfg: Config, prec: Precision, batch_size: int, batches: int,
                            warmup: int = 1) -> list[float]:
    """Seconds of each of `batches` evaluation forwards (the fused loss per token, as the evaluation
    runs them) after `warmup` untimed ones."""
    was_training = model.training
    model.eval()
    data = random_batches(cfg, batch_size, prec.device)
    times = []
    for i in range(warmup + batches):
        b = data[i % len(data)].to(prec.device)
        t0 = time.perf_counter()
        with prec.autocast():
            model(b[:, :-1], b[:, 1:], per_token=True).loss.sum().item()
        synchronize(prec.device)
        times.append(time.perf_counter() - t0)
    model.train(was_training)
    return times[warmup:]


def interleaved_step_times(names: list[str], cfg: Config, prec: Precision, rounds: int = 3, steps: int = 5,
                           warmup: int = 2, log=print) -> dict[str, list[list[float]]]:
    """The benchmark's method for comparing speed on a machine whose load may change: every model
    built afresh and timed `rounds` times in alternating order (A B, B A, ...): {name: [each round's
    step times]}. Load that comes and goes then falls on all models alike, unlike in training runs
    made one after the other."""
    by_round: dict[str, list[list[float]]] = {n: [] for n in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            torch.manual_seed(0)
            model = build_model(name, cfg).to(prec.device)
            by_round[name].append(time_training_steps(model, cfg, prec, cfg.batch_size, steps, warmup, log=log))
            del model
    return by_round


def seconds_per_step(name: str, cfg: Config, steps: int = 3) -> float:
    """Median wall-clock seconds of a training step of `name` under `cfg`, on random tokens, after one
    warm-up step: enough to size a sweep or a pipeline run, not a benchmark (benchmarks/ has those)."""
    prec = resolve_precision(cfg.dtype, resolve_device(cfg.device), cfg.force_dtype)
    model = build_model(name, cfg).to(prec.device)
    return statistics.median(time_training_steps(model, cfg, prec, cfg.batch_size, steps, log=lambda *_: None))
