"""Training, evaluation and checkpointing: one engine for both models.

`train_model("gpt2" | "moe_gqa", cfg, run_dir)` trains on `<run_dir>/data`, evaluates every
`eval_freq` steps, checkpoints every `checkpoint_every` steps and at each epoch end, and writes
`<run_dir>/metrics/<model>.json` plus sample generations. With `resume=True` (the default) it
continues from the latest checkpoint, or just reloads a finished run.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .accounting import model_summary
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import Config
from .data import load_splits, make_dataloader
from .device import (Precision, maybe_compile, peak_memory, reset_peak_memory, resolve_device,
                     resolve_precision, synchronize)
from .generate import sample_generations
from .models import build_model
from .progress import TrainingProgress
from .tracking import init_tracking

THROUGHPUT_DEFINITION = ("training tokens processed / wall-clock seconds spent in training steps "
                         "(forward, backward, optimizer), periodic evaluation and checkpointing excluded")
TRAIN_TIME_DEFINITION = "wall-clock seconds of the training loop, periodic evaluation and checkpoints included"


class NonFiniteLossError(FloatingPointError):
    pass


class ResumeError(RuntimeError):
    pass


@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    tokens_seen: int = 0
    train_time_s: float = 0.0     # loop wall clock, evaluation included
    step_time_s: float = 0.0      # training steps only
    peak_memory_mb: float = 0.0
    history: list = field(default_factory=list)
    finished: bool = False


def make_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    """AdamW; weight decay only on matrices of linear layers and experts, not on norms, biases,
    embeddings (the tied head is the embedding, so it is not decayed either)."""
    emb_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in {id(p): p for p in model.parameters()}.values():
        (decay if p.dim() >= 2 and id(p) not in emb_ids else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    # The fused kernel makes one pass over each tensor instead of about six: at the paper preset
    # on our 2-core CPU a step took 27 ms instead of 97 (GPT-2) and 41 instead of 178 (MoE-GQA).
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


def lr_factor(step: int, cfg: Config, total_steps: int) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio (or constant)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "constant":
        return 1.0
    span = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def training_step(model, x, y, optimizer, scaler, prec: Precision, cfg: Config):
    """One optimizer step on a batch: forward under autocast, LM + weighted aux loss, backward,
    optional clipping, step. Returns the model output. It reads nothing back to the host itself;
    the MoE dispatch (segment sizes) and an active fp16 GradScaler (inf check) each sync once."""
    x = x.to(prec.device, non_blocking=True)
    y = y.to(prec.device, non_blocking=True)
    with prec.autocast():
        out = model(x, y)
        loss = out.loss + cfg.aux_loss_coef * out.aux_loss
    scaler.scale(loss).backward()
    if cfg.grad_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return out


@torch.no_grad()
def evaluate(model, loader, prec: Precision, max_batches: int | None = None,
             expert_counts: list | None = None) -> float:
    """Mean next-token loss over the loader's first `max_batches` batches (all if None), token-weighted."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=prec.device, dtype=torch.float64), 0
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x, y = x.to(prec.device, non_blocking=True), y.to(prec.device, non_blocking=True)
        with prec.autocast():
            out = model(x, y)
        total += out.loss.double() * y.numel()
        count += y.numel()
        if expert_counts is not None and hasattr(model, "expert_counts"):
            expert_counts.append(model.expert_counts())
    model.train(was_training)
    return (total / max(count, 1)).item()


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


@contextmanager
def _deferred_interrupt():
    """Ctrl-C / a notebook interrupt is noted and acted on between steps, never mid-update."""
    flag = {"hit": False}
    try:
        previous = signal.signal(signal.SIGINT, lambda *_: flag.update(hit=True))
    except ValueError:   # not the main thread: leave interrupts alone
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _check_compatible(saved: dict, cfg: Config, path: Path) -> None:
    keys = Config.MODEL_KEYS + ("batch_size", "stride", "seed")   # shapes, and the data order
    diff = {k: (saved.get(k), getattr(cfg, k)) for k in keys if saved.get(k) != getattr(cfg, k)}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ResumeError(f"cannot resume from {path}: settings differ ({detail}). Fix: resume with the "
                          "same settings, use another run directory, or set resume=False to start over "
                          "(the old checkpoints are kept aside).")


def _find_first_nonfinite(pending: list) -> int | None:
    if not pending:
        return None
    losses = torch.stack([l for _, l in pending])
    bad = (~torch.isfinite(losses)).nonzero()
    return pending[int(bad[0])][0] if len(bad) else None


def train_model(name: str, cfg: Config, run_dir: str | Path, resume: bool = True, progress: bool = True,
                wandb_mode: str | None = None, log=print, progress_interval_s: float = 60.0) -> dict:
    """Train `name` and return its metrics dict (also written to `<run_dir>/metrics/<name>.json`)."""
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints" / name
    prec = resolve_precision(cfg.dtype, resolve_device(cfg.device), cfg.force_dtype)
    log(f"{name}: device {prec.device_name}, precision {prec.dtype}" + (f" ({prec.note})" if prec.note else ""))

    loaders = load_splits(run_dir / "data", cfg, pin_memory=prec.device.type == "cuda")
    train_loader = loaders["train"]
    train_eval_loader = make_dataloader(train_loader.dataset, cfg.batch_size, shuffle=False)
    model = build_model(name, cfg).to(prec.device)
    summary = model_summary(model)
    optimizer = make_optimizer(model, cfg)
    steps_per_epoch = len(train_loader)
    total_steps = cfg.max_epochs * steps_per_epoch
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg, total_steps))
    scaler = torch.amp.GradScaler(prec.device.type, enabled=prec.use_grad_scaler)
    state = TrainState()

    latest = latest_checkpoint(ckpt_dir)
    if latest is not None and not resume:
        aside = ckpt_dir.with_name(f"{name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(str(ckpt_dir), aside)
        log(f"resume=False: previous checkpoints moved to {aside}")
        latest = None
    if latest is not None:
        ck = load_checkpoint(latest, map_location=prec.device)
        _check_compatible(ck["config"], cfg, latest)
        model.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        scaler.load_state_dict(ck["scaler"])
        _set_rng_state(ck["rng"])
        state = TrainState(**ck["state"])
        # A finished run is extended when max_epochs / max_steps now allow more steps.
        state.finished = state.epoch >= cfg.max_epochs or bool(cfg.max_steps and state.step >= cfg.max_steps)
        log(f"resumed from {latest} (step {state.step}, epoch {state.epoch}, batch {state.batch_in_epoch})")

    metrics_path = run_dir / "metrics" / f"{name}.json"
    if state.finished and metrics_path.exists():
        log(f"{name} already trained ({state.step} steps): reusing {metrics_path}")
        return {**load_metrics(run_dir, name), "model": model}

    forward_model = maybe_compile(model, cfg.compile, prec.device, log)
    tracker = init_tracking(cfg, run_dir, name, wandb_mode)
    log(tracker.message)

    def checkpoint(reason: str) -> Path:
        path = save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                                "rng": _rng_state(), "state": vars(state), "config": cfg.to_dict(),
                                "model_name": name, "reason": reason}, ckpt_dir, state.step, cfg.keep_checkpoints)
        if cfg.wandb_log_checkpoints:
            tracker.log_checkpoint(path, f"{name}-checkpoint")
        return path

    pending: list = []   # (step, loss tensor) not yet checked on the host: no sync per step

    def check_finite():
        bad = _find_first_nonfinite(pending)
        pending.clear()
        if bad is not None:
            last = latest_checkpoint(ckpt_dir)
            raise NonFiniteLossError(
                f"{name}: the training loss became non-finite at step {bad}. The last good checkpoint "
                f"is {last or 'none (no checkpoint yet)'}. Fix: lower lr (now {cfg.lr}), keep grad_clip "
                "on, or use float32 / bfloat16 instead of float16; then resume.")

    reset_peak_memory(prec.device)
    # A bar in interactive runs; in batch runs (progress=False) a line every progress_interval_s.
    ui = TrainingProgress(name, total_steps, state.step, cfg.batch_size * cfg.context_length, bar=progress,
                          log=log, interval_s=progress_interval_s)
    model.train()
    loop_start = time.perf_counter() - state.train_time_s
    segment_start = time.perf_counter()
    step_time_before = state.step_time_s

    def close_segment():
        nonlocal step_time_before
        synchronize(prec.device)
        state.step_time_s = step_time_before + time.perf_counter() - segment_start
        step_time_before = state.step_time_s

    def tokens_per_s() -> float:
        return state.tokens_seen / state.step_time_s if state.step_time_s else 0.0

    stop = False
    with _deferred_interrupt() as interrupt:
        while not state.finished:
            train_loader.batch_sampler.set_epoch(state.epoch, state.batch_in_epoch)
            for x, y in train_loader:
                out = training_step(forward_model, x, y, optimizer, scaler, prec, cfg)
                scheduler.step()
                state.step += 1
                state.batch_in_epoch += 1
                state.tokens_seen += y.numel()
                pending.append((state.step, out.loss.detach()))
                last_aux = out.aux_loss.detach()

                at_eval = state.step % cfg.eval_freq == 0
                at_ckpt = state.step % cfg.checkpoint_every == 0
                if state.step % cfg.log_every == 0 or at_eval or at_ckpt or interrupt["hit"]:
                    last_loss = pending[-1][1].item()
                    check_finite()
                    ui.update(state.step, last_loss, scheduler.get_last_lr()[0])
                if at_eval:
                    close_segment()
                    train_loss = evaluate(model, train_eval_loader, prec, cfg.eval_iter)
                    val_loss = evaluate(model, loaders["val"], prec, cfg.eval_iter)
                    state.history.append({"step": state.step, "tokens_seen": state.tokens_seen,
                                          "train_loss": train_loss, "val_loss": val_loss})
                    tracker.log({"train/loss": train_loss, "val/loss": val_loss, "train/aux_loss": last_aux.item(),
                                 "lr": scheduler.get_last_lr()[0], "tokens_seen": state.tokens_seen,
                                 "tokens_per_s": tokens_per_s(),
                                 "peak_memory_mb": peak_memory(prec.device)[0]}, step=state.step)
                    if not progress:
                        log(f"{name} step {state.step:>6}/{total_steps} | train {train_loss:.3f} | val "
                            f"{val_loss:.3f} | {tokens_per_s():,.0f} tokens/s")
                    segment_start = time.perf_counter()
                if cfg.max_steps and state.step >= cfg.max_steps:
                    stop = True
                    break
                if at_ckpt or interrupt["hit"]:
                    close_segment()
                    check_finite()
                    state.train_time_s = time.perf_counter() - loop_start
                    state.peak_memory_mb = max(state.peak_memory_mb, peak_memory(prec.device)[0])
                    path = checkpoint("interrupt" if interrupt["hit"] else "periodic")
                    if interrupt["hit"]:
                        ui.close()
                        tracker.finish()
                        raise KeyboardInterrupt(f"{name}: interrupted at step {state.step}; state saved to "
                                                f"{path}. Run again with resume=True to continue.")
                    segment_start = time.perf_counter()
            else:
                state.epoch += 1
                state.batch_in_epoch = 0
            close_segment()
            check_finite()
            state.train_time_s = time.perf_counter() - loop_start
            state.peak_memory_mb = max(state.peak_memory_mb, peak_memory(prec.device)[0])
            state.finished = stop or state.epoch >= cfg.max_epochs
            checkpoint("end" if state.finished else "epoch")
            segment_start = time.perf_counter()
    ui.close()

    expert_counts: list = []
    test_loss = evaluate(model, loaders["test"], prec, cfg.test_batches or None, expert_counts)
    peak, peak_kind = peak_memory(prec.device)
    metrics = {
        "model": name, "test_loss": test_loss, "test_perplexity": math.exp(test_loss),
        "train_time_s": state.train_time_s, "tokens_per_s": tokens_per_s(),
        "peak_memory_mb": max(peak, state.peak_memory_mb), "peak_memory_kind": peak_kind,
        **summary, "tokens_seen": state.tokens_seen, "steps": state.step, "epochs_completed": state.epoch,
        "device": prec.device.type, "device_name": prec.device_name, "dtype": prec.dtype,
        "dtype_requested": cfg.dtype, "precision_note": prec.note, "torch_version": torch.__version__,
        "achieved_tflops": summary["flops_per_token"] * tokens_per_s() / 1e12,
        "throughput_definition": THROUGHPUT_DEFINITION, "train_time_definition": TRAIN_TIME_DEFINITION,
        "preset": cfg.preset, "config": cfg.to_dict(), "history": state.history,
    }
    if expert_counts:
        counts = torch.stack(expert_counts).sum(0).double()
        metrics["expert_utilisation"] = (counts / counts.sum(-1, keepdim=True)).tolist()
    metrics["samples"] = sample_generations(model, "lisboa", cfg.sample_max_new_tokens, cfg.seed)
    write_metrics(metrics, run_dir)
    tracker.log({"test/loss": test_loss, "test/perplexity": metrics["test_perplexity"]}, step=state.step)
    tracker.finish({k: metrics[k] for k in ("test_loss", "test_perplexity", "train_time_s", "tokens_per_s",
                                             "peak_memory_mb")})
    log(f"{name}: test loss {test_loss:.4f}, perplexity {metrics['test_perplexity']:.2f}, "
        f"{metrics['tokens_per_s']:,.0f} tokens/s, {metrics['train_time_s']:.1f} s, "
        f"peak {metrics['peak_memory_mb']:,.0f} MB")
    return {**metrics, "model": model}


def write_metrics(metrics: dict, run_dir: str | Path) -> Path:
    out = Path(run_dir) / "metrics"
    out.mkdir(parents=True, exist_ok=True)
    name = metrics["model"]
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.part")
    tmp.write_text(json.dumps({k: v for k, v in metrics.items() if k != "samples"}, indent=1))
    os.replace(tmp, path)
    (out / f"{name}_samples.json").write_text(json.dumps(metrics["samples"], indent=1, ensure_ascii=False))
    return path


def load_metrics(run_dir: str | Path, name: str) -> dict:
    path = Path(run_dir) / "metrics" / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"no metrics for {name} at {path}. Fix: run notebook "
                                f"{'02_gpt2_baseline' if name == 'gpt2' else '03_moe_gqa'} with this run directory.")
    metrics = json.loads(path.read_text())
    samples = path.with_name(f"{name}_samples.json")
    metrics["samples"] = json.loads(samples.read_text()) if samples.exists() else []
    return metrics
