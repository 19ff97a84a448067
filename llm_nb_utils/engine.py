"""One rank's training run: the plain loop and the phases around it.

`run_training` is what every process runs, alone or as one rank under torchrun, in this order:

1. build the pieces (`build_pieces`: device and precision, loaders, model, optimizer, schedule,
   the fixed evaluation samples);
2. restore the newest checkpoint, or reuse the metrics of a finished run and stop there;
3. check the disk for the checkpoints, wrap the model for DDP (and compile it if asked), start W&B;
4. `Loop.run`: step, schedule, evaluate every `eval_freq` steps, checkpoint every
   `checkpoint_every` steps and at each epoch's end;
5. the test evaluation and the metrics (`results.final_metrics`), the same dict on every rank;
   rank 0 writes them.

It never starts processes and holds no lock: `train.train_model` (the front door) does both.
"""
from __future__ import annotations

import random
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from .arms import build_model
from .checkpoint import Checkpoints
from .config import Config
from .data import load_splits
from .device import Precision, maybe_compile, peak_memory, reset_peak_memory, resolve_precision, synchronize
from .distributed import Dist
from .errors import SuiteError, TrainingInterrupted
from .evaluation import periodic_sample, test_sample, window_losses
from .files import DamagedFileError, shown
from .memory import rss_mb
from .progress import TrainingProgress
from .results import expert_shares, final_metrics
from .runfolder import RunFolder
from .step import data_warnings, make_optimizer, make_schedule, planned_steps, training_step
from .tracking import Tracker, init_tracking


class NonFiniteLossError(SuiteError, FloatingPointError):
    pass


class ResumeError(SuiteError, RuntimeError):
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


@dataclass
class Pieces:
    """What a run trains with, built once before anything else happens."""
    name: str
    cfg: Config
    dist: Dist
    prec: Precision
    loaders: dict
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    eval_samples: dict          # split -> EvalSample: the windows every evaluation reads
    total_steps: int
    warnings: list
    # On a CPU, the process's resident memory before the model was built: the interpreter, torch and
    # the data, which the peak RSS also counts; None on a GPU, whose peak counts the model alone.
    rss_before_model_mb: float | None = None

    def losses_on(self, split: str, expert_counts: list | None = None) -> np.ndarray:
        """Each window's loss on this split's evaluation sample (float64)."""
        return window_losses(self.model, self.loaders[split].dataset, self.eval_samples[split],
                             self.cfg.batch_size, self.prec, self.dist, expert_counts)


def build_pieces(name: str, cfg: Config, folder: RunFolder, dist: Dist) -> Pieces:
    dist.check_batch(cfg.batch_size)
    prec = resolve_precision(cfg.dtype, dist.device, cfg.force_dtype)
    loaders = load_splits(folder.data, cfg, pin_memory=prec.device.type == "cuda")
    rss_before = rss_mb() if prec.device.type == "cpu" else None
    model = build_model(name, cfg).to(prec.device)
    optimizer = make_optimizer(model, cfg)
    steps_per_epoch = len(loaders["train"])
    total_steps = planned_steps(cfg, steps_per_epoch)
    warnings = data_warnings(cfg, steps_per_epoch)
    # The windows every evaluation reads: fixed before training, the same for every model and seed.
    samples = {split: periodic_sample(split, len(loaders[split].dataset), cfg, warnings) for split in ("train", "val")}
    samples["test"] = test_sample(len(loaders["test"].dataset), cfg, warnings)
    return Pieces(name, cfg, dist, prec, loaders, model, optimizer, make_schedule(optimizer, cfg, total_steps),
                  torch.amp.GradScaler(prec.device.type, enabled=prec.use_grad_scaler), samples, total_steps,
                  warnings, rss_before)


def run_training(name: str, cfg: Config, folder: RunFolder, dist: Dist, resume: bool = True, progress: bool = True,
                 log=print, progress_interval_s: float = 60.0) -> dict:
    """This rank's whole run; returns the metrics (the same on every rank) with the model under "model"."""
    log = log if dist.is_main else (lambda *a, **k: None)    # one voice: rank 0's
    p = build_pieces(name, cfg, folder, dist)
    log(f"{name}: device {p.prec.device_name}, precision {p.prec.dtype}"
        + (f" ({p.prec.note})" if p.prec.note else "")
        + (f", {dist.world_size} processes ({dist.backend}), {cfg.batch_size // dist.world_size} windows "
           "each per step" if dist.enabled else ""))
    for note in p.warnings:
        log(f"warning: {note}")
    ckpts = Checkpoints(folder.checkpoints(name), dist, cfg.keep_checkpoints, log, folder.path)
    state = restore(p, ckpts, resume, log, folder)
    if state.finished and (reused := reusable_metrics(folder, name, log)) is not None:
        log(f"{name} already trained ({state.step} steps): reusing metrics/{name}.json")
        return {**reused, "model": p.model}
    ckpts.check_space(p.model, name)
    forward_model = maybe_compile(dist.wrap(p.model, p.prec.device), cfg.compile, p.prec.device, log)
    tracker = init_tracking(cfg, folder.path, name) if dist.is_main else Tracker()
    log(tracker.message)
    reset_peak_memory(p.prec.device)
    # A bar in interactive runs; in batch runs (progress=False) a line every progress_interval_s.
    ui = TrainingProgress(name, p.total_steps, state.step, cfg.batch_size * cfg.context_length,
                          bar=progress and dist.is_main, log=log, interval_s=progress_interval_s)
    try:
        Loop(p, forward_model, state, ckpts, tracker, ui, log, folder, verbose=not progress).run()
    except BaseException:
        tracker.finish()
        raise
    finally:
        ui.close()
    metrics = final_metrics(p, state, folder)
    if dist.is_main:
        folder.write_metrics(metrics)
    tracker.log({"test/loss": metrics["test_loss"], "test/perplexity": metrics["test_perplexity"]}, step=state.step)
    tracker.finish({k: metrics[k] for k in ("test_loss", "test_perplexity", "train_time_s", "tokens_per_s",
                                            "peak_memory_mb")})
    log(f"{name}: test loss {metrics['test_loss']:.4f}, perplexity {metrics['test_perplexity']:.2f}, "
        f"{metrics['tokens_per_s']:,.0f} tokens/s, {metrics['train_time_s']:.1f} s, "
        f"peak {metrics['peak_memory_mb']:,.0f} MB")
    return {**metrics, "model": p.model}


# --- resuming ------------------------------------------------------------------------------------------

def restore(p: Pieces, ckpts: Checkpoints, resume: bool, log, folder: RunFolder) -> TrainState:
    """The state of the newest readable checkpoint loaded into the pieces, or a fresh state."""
    found = ckpts.restore(resume, map_location=p.prec.device)
    if found is None:
        return TrainState()
    ck, path = found
    _check_compatible(ck["config"], p.cfg, path)
    p.model.load_state_dict(ck["model"])
    p.optimizer.load_state_dict(ck["optimizer"])
    p.scheduler.load_state_dict(ck["scheduler"])
    p.scaler.load_state_dict(ck["scaler"])
    _set_rng_state(ck["rng"])
    s = TrainState(**ck["state"])
    # A finished run is extended when max_epochs / max_steps now allow more steps.
    s.finished = s.epoch >= p.cfg.max_epochs or bool(p.cfg.max_steps and s.step >= p.cfg.max_steps)
    log(f"resumed from {shown(path, folder.path)} (step {s.step}, epoch {s.epoch}, batch {s.batch_in_epoch})")
    return s


def reusable_metrics(folder: RunFolder, name: str, log) -> dict | None:
    """The metrics of a finished run, unless missing or damaged (then they are recomputed)."""
    if not folder.has_metrics(name):
        return None
    try:
        return folder.load_metrics(name)
    except DamagedFileError as e:
        log(f"warning: {str(e).split(' Fix:')[0]}; it is rebuilt from the final checkpoint")
        return None


def _check_compatible(saved: dict, cfg: Config, path) -> None:
    keys = Config.MODEL_KEYS + ("batch_size", "stride", "seed")   # shapes, and the data order
    diff = {k: (saved.get(k), getattr(cfg, k)) for k in keys if saved.get(k) != getattr(cfg, k)}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ResumeError(f"cannot resume from {path}: settings differ ({detail}). Fix: resume with the "
                          "same settings, use another run directory, or set resume=False to start over "
                          "(the old checkpoints are kept aside).")


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


# --- the loop ----------------------------------------------------------------------------------------------

class Loop:
    """The training loop (`run`) and the three things it does between steps: evaluate, check the
    losses, checkpoint. Time is kept in two clocks: the loop's wall clock (evaluation included) and
    the time spent in training steps alone, from which throughput is computed."""

    def __init__(self, p: Pieces, forward_model, state: TrainState, ckpts: Checkpoints, tracker: Tracker,
                 ui: TrainingProgress, log, folder: RunFolder, verbose: bool):
        self.p, self.forward_model, self.s, self.ckpts = p, forward_model, state, ckpts
        self.tracker, self.ui, self.log, self.folder, self.verbose = tracker, ui, log, folder, verbose
        self.pending: list = []     # (step, loss tensor) not yet checked on the host: no sync per step
        self.last_aux = None        # the last step's balancing loss (MoE), for W&B
        self.loop_start = time.perf_counter() - state.train_time_s     # as if it had never stopped
        self.segment_start = time.perf_counter()                       # this stretch of training steps

    def run(self) -> None:
        p, s, cfg = self.p, self.s, self.p.cfg
        p.model.train()
        reduce = p.dist.mean_ if p.dist.enabled else None   # the balancing loss's shares: the global batch's
        stop = False
        with _deferred_interrupt() as interrupt:
            while not s.finished:
                p.loaders["train"].batch_sampler.set_epoch(s.epoch, s.batch_in_epoch)
                for x, y in p.loaders["train"]:
                    out, aux = training_step(self.forward_model, p.dist.shard(x), p.dist.shard(y), p.optimizer,
                                             p.scaler, p.prec, cfg, reduce)
                    p.scheduler.step()
                    s.step += 1
                    s.batch_in_epoch += 1
                    s.tokens_seen += y.numel()
                    self.pending.append((s.step, out.loss.detach()))
                    self.last_aux = aux.detach() if aux is not None else None

                    at_eval = s.step % cfg.eval_freq == 0
                    at_ckpt = s.step % cfg.checkpoint_every == 0
                    hit = self.stop_asked(interrupt["hit"])
                    if s.step % cfg.log_every == 0 or at_eval or at_ckpt or hit:
                        loss = self.pending[-1][1].item()
                        self.check_finite()
                        self.ui.update(s.step, loss, p.scheduler.get_last_lr()[0])
                    if at_eval:
                        self.evaluate()
                    if cfg.max_steps and s.step >= cfg.max_steps:
                        stop = True
                        break
                    if at_ckpt or hit:
                        path = self.checkpoint("interrupt" if hit else "periodic")
                        if hit:
                            raise TrainingInterrupted(f"{p.name}: interrupted at step {s.step}; state saved to "
                                                      f"{shown(path, self.folder.path)} in the run directory. "
                                                      "Run again with resume=True to continue.")
                else:
                    s.epoch += 1
                    s.batch_in_epoch = 0
                s.finished = stop or s.epoch >= cfg.max_epochs
                if s.finished and (not s.history or s.history[-1]["step"] != s.step):
                    self.evaluate()     # the curves end where training ended
                self.checkpoint("end" if s.finished else "epoch")

    def stop_asked(self, hit: bool) -> bool:
        """Whether to stop after this step. Ranks must stop at the same step, so under DDP they agree
        (one all-reduce) every log_every steps; one process stops at once."""
        dist = self.p.dist
        if not dist.enabled:
            return hit
        if self.s.step % self.p.cfg.log_every:
            return False
        return dist.any(hit, self.p.prec.device)

    def pause_step_clock(self) -> None:
        """Add the stretch of training steps since `segment_start` to the step time."""
        synchronize(self.p.prec.device)
        self.s.step_time_s += time.perf_counter() - self.segment_start

    def tokens_per_s(self) -> float:
        return self.s.tokens_seen / self.s.step_time_s if self.s.step_time_s else 0.0

    def check_finite(self) -> None:
        bad = _first_nonfinite(self.pending)
        self.pending.clear()
        if bad is not None:
            last = self.ckpts.newest()
            raise NonFiniteLossError(
                f"{self.p.name}: the training loss became non-finite at step {bad}. The last good checkpoint "
                f"is {last or 'none (no checkpoint yet)'}. Fix: lower lr (now {self.p.cfg.lr}), keep "
                "grad_clip on, or use float32 / bfloat16 instead of float16; then resume.")

    def evaluate(self) -> None:
        """Train and validation loss on their evaluation samples, into the history and the tracker.

        Each point also keeps the loop's wall clock so far (curves against time, not only tokens)
        and, for the MoE, each layer's share of assignments per expert on the validation sample
        (utilisation over training, not only at the end)."""
        p, s = self.p, self.s
        self.pause_step_clock()
        train_loss = float(p.losses_on("train").mean())
        counts: list = []
        val_loss = float(p.losses_on("val", counts).mean())
        point = {"step": s.step, "tokens_seen": s.tokens_seen, "train_loss": train_loss, "val_loss": val_loss,
                 "time_s": round(time.perf_counter() - self.loop_start, 3)}
        if counts:
            point["expert_share"] = expert_shares(counts)
        s.history.append(point)
        self.tracker.log({"train/loss": train_loss, "val/loss": val_loss,
                          "train/aux_loss": self.last_aux.item() if self.last_aux is not None else 0.0,
                          "lr": p.scheduler.get_last_lr()[0], "tokens_seen": s.tokens_seen,
                          "tokens_per_s": self.tokens_per_s(),
                          "peak_memory_mb": peak_memory(p.prec.device)[0]}, step=s.step)
        if self.verbose:
            self.log(f"{p.name} step {s.step:>6}/{p.total_steps} | train {train_loss:.3f} | val "
                     f"{val_loss:.3f} | {self.tokens_per_s():,.0f} tokens/s")
        self.segment_start = time.perf_counter()

    def checkpoint(self, reason: str):
        """Between two steps: close the timing, check the losses, record time and memory, save."""
        p, s = self.p, self.s
        self.pause_step_clock()
        self.check_finite()
        s.train_time_s = time.perf_counter() - self.loop_start
        s.peak_memory_mb = max(s.peak_memory_mb, peak_memory(p.prec.device)[0])
        path = self.ckpts.save({"model": p.model.state_dict(), "optimizer": p.optimizer.state_dict(),
                                "scheduler": p.scheduler.state_dict(), "scaler": p.scaler.state_dict(),
                                "rng": _rng_state(), "state": vars(s), "config": p.cfg.to_dict(),
                                "model_name": p.name, "reason": reason}, s.step)
        if p.cfg.wandb_log_checkpoints and p.dist.is_main:
            self.tracker.log_checkpoint(path, f"{p.name}-checkpoint")
        self.segment_start = time.perf_counter()
        return path


def _first_nonfinite(pending: list) -> int | None:
    if not pending:
        return None
    losses = torch.stack([l for _, l in pending])
    bad = (~torch.isfinite(losses)).nonzero()
    return pending[int(bad[0])][0] if len(bad) else None
