"""Training, evaluation and checkpointing: one engine for both models.

`train_model(arm, cfg, run_dir)` (an arm of `arms.ARMS`) trains on `<run_dir>/data`, evaluates every
`eval_freq` steps (and at the last step), checkpoints every `checkpoint_every` steps and at each
epoch end, and writes `<run_dir>/metrics/<model>.json` plus sample generations. With
`resume=True` (the default) it continues from the latest readable checkpoint, or just reloads a
finished run. One process at a time trains a model in a run directory (a lock says who).

`Trainer` holds one run's pieces (data, model, optimizer, schedule, state) and its parts: `restore`,
`train` (the loop), `evaluate_now`, `save`, `finish`.
"""
from __future__ import annotations

import math
import os
import random
import shutil
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .accounting import bits_per_byte, model_summary
from .checkpoint import (CheckpointError, checkpoint_bytes, checkpoint_path, latest_checkpoint, list_checkpoints,
                         load_checkpoint, save_checkpoint)
from .config import Config
from .data import load_splits
from .distributed import Dist, init_from_env, launched_by_torchrun, resolve_gpus
from .errors import SuiteError, TrainingInterrupted
from .evaluation import estimate, periodic_sample, test_sample, window_losses
from .files import DamagedFileError, StorageError, check_writable, free_bytes, read_json, shown, write_json
from .lock import folder_lock
from .device import (Precision, maybe_compile, peak_memory, reset_peak_memory, resolve_device,
                     resolve_precision, synchronize)
from .generate import sample_generations
from .arms import ARMS, build_model
from .moe import MoEFeedForward
from .prepare import load_meta
from .progress import TrainingProgress
from .tracking import Tracker, init_tracking

THROUGHPUT_DEFINITION = ("training tokens processed / wall-clock seconds spent in training steps "
                         "(forward, backward, optimizer), periodic evaluation and checkpointing excluded")
TRAIN_TIME_DEFINITION = "wall-clock seconds of the training loop, periodic evaluation and checkpoints included"


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


def _shares(expert_counts: list) -> list[list[float]]:
    """(layers x experts) share of each layer's assignments, from per-batch count tensors."""
    counts = torch.stack(expert_counts).sum(0).double()
    return (counts / counts.sum(-1, keepdim=True)).tolist()


def _find_first_nonfinite(pending: list) -> int | None:
    if not pending:
        return None
    losses = torch.stack([l for _, l in pending])
    bad = (~torch.isfinite(losses)).nonzero()
    return pending[int(bad[0])][0] if len(bad) else None


def planned_steps(cfg: Config, steps_per_epoch: int) -> int:
    """Optimizer steps the run will take: max_epochs epochs, capped by max_steps."""
    total = cfg.max_epochs * steps_per_epoch
    return min(total, cfg.max_steps) if cfg.max_steps else total


def data_warnings(cfg: Config, steps_per_epoch: int) -> list[str]:
    """What makes a run's numbers mean less than they seem: too few steps for what was asked."""
    total = planned_steps(cfg, steps_per_epoch)
    notes = []
    if cfg.max_steps and total < cfg.max_steps:
        notes.append(f"the training data gives only {total:,} steps ({steps_per_epoch:,} batches per epoch x "
                     f"{cfg.max_epochs} epoch(s)), fewer than the max_steps={cfg.max_steps:,} asked")
    if total < cfg.eval_freq:
        notes.append(f"no periodic evaluation: {total:,} steps, fewer than eval_freq={cfg.eval_freq}, so the "
                     "loss curves hold only the final step")
    if total < 100:
        notes.append(f"only {total:,} training steps: the losses say that the pipeline runs, nothing about "
                     "the models")
    return notes


class Trainer:
    """One model's training run in one run directory."""

    def __init__(self, name: str, cfg: Config, run_dir: Path, log=print, dist: Dist = Dist()):
        self.name, self.cfg, self.run_dir, self.dist = name, cfg, Path(run_dir), dist
        self.log = log = log if dist.is_main else (lambda *a, **k: None)    # one voice: rank 0's
        dist.check_batch(cfg.batch_size)
        self.ckpt_dir = self.run_dir / "checkpoints" / name
        device = resolve_device(cfg.device)
        if dist.enabled and device.type == "cuda":
            device = torch.device("cuda", dist.local_rank)
        self.prec = resolve_precision(cfg.dtype, device, cfg.force_dtype)
        log(f"{name}: device {self.prec.device_name}, precision {self.prec.dtype}"
            + (f" ({self.prec.note})" if self.prec.note else "")
            + (f", {dist.world_size} processes ({dist.backend}), {cfg.batch_size // dist.world_size} windows "
               "each per step" if dist.enabled else ""))
        self.loaders = load_splits(self.run_dir / "data", cfg, pin_memory=self.prec.device.type == "cuda")
        self.train_loader = self.loaders["train"]
        self.model = build_model(name, cfg).to(self.prec.device)
        if dist.enabled:
            # The balancing loss uses each expert's share of the *global* batch, so that its gradient,
            # averaged by DDP, is the one-process gradient (a per-rank share would not be).
            for m in self.model.modules():
                if isinstance(m, MoEFeedForward):
                    m.reduce_fraction = dist.mean_
        self.summary = model_summary(self.model)
        self.optimizer = make_optimizer(self.model, cfg)
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = planned_steps(cfg, self.steps_per_epoch)
        self.warnings = data_warnings(cfg, self.steps_per_epoch)
        # The windows every evaluation reads: fixed before training, the same for every model and seed.
        self.eval_samples = {split: periodic_sample(split, len(self.loaders[split].dataset), cfg, self.warnings)
                             for split in ("train", "val")}
        self.eval_samples["test"] = test_sample(len(self.loaders["test"].dataset), cfg, self.warnings)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, cfg, self.total_steps))
        self.scaler = torch.amp.GradScaler(self.prec.device.type, enabled=self.prec.use_grad_scaler)
        self.state = TrainState()
        self.pending: list = []        # (step, loss tensor) not yet checked on the host: no sync per step
        self.segment_start = 0.0       # start of the current stretch of training steps (for throughput)
        self.forward_model = self.model
        self.needed_bytes: int | None = None   # disk the checkpoints need, once check_space has run
        self.loop_start = 0.0                   # perf_counter at which the loop would have started (resume included)
        self.tracker = Tracker()                # W&B off until train_model starts it (after the reuse check)

    # --- restore -------------------------------------------------------------------------------
    def restore(self, resume: bool) -> None:
        """Continue from the newest readable checkpoint; a damaged one is moved aside, saying so."""
        # Holding the lock, any temporary file here is a dead writer's: a save killed half-way.
        for tmp in self.ckpt_dir.glob(".step_*.tmp") if self.ckpt_dir.is_dir() else []:
            tmp.unlink(missing_ok=True)
        found = list_checkpoints(self.ckpt_dir)
        if found and not resume:
            self.dist.barrier()      # every rank has listed the folder before rank 0 moves it
            if self.dist.is_main:
                aside = self.ckpt_dir.with_name(f"{self.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
                shutil.move(str(self.ckpt_dir), aside)
                self.log(f"resume=False: previous checkpoints moved to {shown(aside, self.run_dir)}")
            self.dist.barrier()
            return
        for path in reversed(found):
            try:
                ck = load_checkpoint(path, map_location=self.prec.device)
            except CheckpointError as e:
                aside = path.with_name(path.name + ".damaged")
                self.dist.barrier()
                if self.dist.is_main:
                    path.rename(aside)
                self.log(f"warning: {e.reason}; it is moved to {aside.name} and the run resumes from the "
                         "checkpoint before it")
                continue
            self._load(ck, path)
            return

    def _load(self, ck: dict, path: Path) -> None:
        _check_compatible(ck["config"], self.cfg, path)
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self.scaler.load_state_dict(ck["scaler"])
        _set_rng_state(ck["rng"])
        s = self.state = TrainState(**ck["state"])
        # A finished run is extended when max_epochs / max_steps now allow more steps.
        s.finished = s.epoch >= self.cfg.max_epochs or bool(self.cfg.max_steps and s.step >= self.cfg.max_steps)
        self.log(f"resumed from {shown(path, self.run_dir)} (step {s.step}, epoch {s.epoch}, batch {s.batch_in_epoch})")

    def reusable_metrics(self) -> dict | None:
        """The metrics of a finished run, unless missing or damaged (then they are recomputed)."""
        if not self.state.finished or not (self.run_dir / "metrics" / f"{self.name}.json").exists():
            return None
        try:
            return load_metrics(self.run_dir, self.name)
        except DamagedFileError as e:
            self.log(f"warning: {str(e).split(' Fix:')[0]}; it is rebuilt from the final checkpoint")
            return None

    # --- disk ------------------------------------------------------------------------------------
    def check_space(self) -> None:
        """Fail now, not at the first checkpoint hours later, where checkpoints cannot be written."""
        if not self.dist.is_main:
            return
        check_writable(self.ckpt_dir)
        needed = self.needed_bytes = (self.cfg.keep_checkpoints + 1) * checkpoint_bytes(self.model)   # +1: being written
        free = free_bytes(self.ckpt_dir)
        if free < needed:
            raise StorageError(28, f"{self.ckpt_dir} has {free / 1e9:.2f} GB free, and {self.name}'s checkpoints "
                                   f"need about {needed / 1e9:.2f} GB ({self.cfg.keep_checkpoints} kept + 1 being "
                                   "written). Fix: free some space there, lower keep_checkpoints, or choose "
                                   "another run_dir")

    def save(self, reason: str) -> Path:
        if not self.dist.is_main:
            return checkpoint_path(self.ckpt_dir, self.state.step)
        path = save_checkpoint({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                                "rng": _rng_state(), "state": vars(self.state), "config": self.cfg.to_dict(),
                                "model_name": self.name, "reason": reason},
                               self.ckpt_dir, self.state.step, self.cfg.keep_checkpoints, self.needed_bytes)
        if self.cfg.wandb_log_checkpoints:
            self.tracker.log_checkpoint(path, f"{self.name}-checkpoint")
        return path

    # --- the loop --------------------------------------------------------------------------------
    def tokens_per_s(self) -> float:
        s = self.state
        return s.tokens_seen / s.step_time_s if s.step_time_s else 0.0

    def close_segment(self) -> None:
        """Add the stretch of training steps since `segment_start` to the step time."""
        synchronize(self.prec.device)
        self.state.step_time_s += time.perf_counter() - self.segment_start

    def check_finite(self) -> None:
        bad = _find_first_nonfinite(self.pending)
        self.pending.clear()
        if bad is not None:
            last = list_checkpoints(self.ckpt_dir)
            raise NonFiniteLossError(
                f"{self.name}: the training loss became non-finite at step {bad}. The last good checkpoint "
                f"is {last[-1] if last else 'none (no checkpoint yet)'}. Fix: lower lr (now {self.cfg.lr}), keep "
                "grad_clip on, or use float32 / bfloat16 instead of float16; then resume.")

    def evaluate_on(self, split: str, expert_counts: list | None = None):
        """Each window's loss on this split's evaluation sample (numpy, float64)."""
        return window_losses(self.model, self.loaders[split].dataset, self.eval_samples[split], self.cfg.batch_size,
                             self.prec, self.dist, expert_counts)

    def evaluate_now(self, last_aux: torch.Tensor | None, verbose: bool) -> None:
        """Train and validation loss on their evaluation samples, into the history and the tracker.

        Each point also keeps the loop's wall clock so far (curves against time, not only tokens)
        and, for the MoE, each layer's share of assignments per expert on the validation batches
        (utilisation over training, not only at the end)."""
        s = self.state
        self.close_segment()
        train_loss = float(self.evaluate_on("train").mean())
        counts: list = []
        val_loss = float(self.evaluate_on("val", counts).mean())
        point = {"step": s.step, "tokens_seen": s.tokens_seen, "train_loss": train_loss, "val_loss": val_loss,
                 "time_s": round(time.perf_counter() - self.loop_start, 3)}
        if counts:
            point["expert_share"] = _shares(counts)
        s.history.append(point)
        self.tracker.log({"train/loss": train_loss, "val/loss": val_loss,
                          "train/aux_loss": last_aux.item() if last_aux is not None else 0.0,
                          "lr": self.scheduler.get_last_lr()[0], "tokens_seen": s.tokens_seen,
                          "tokens_per_s": self.tokens_per_s(),
                          "peak_memory_mb": peak_memory(self.prec.device)[0]}, step=s.step)
        if verbose:
            self.log(f"{self.name} step {s.step:>6}/{self.total_steps} | train {train_loss:.3f} | val "
                     f"{val_loss:.3f} | {self.tokens_per_s():,.0f} tokens/s")
        self.segment_start = time.perf_counter()

    def checkpoint_now(self, reason: str, loop_start: float) -> Path:
        """Between two steps: close the timing, check the losses, record time and memory, save."""
        s = self.state
        self.close_segment()
        self.check_finite()
        s.train_time_s = time.perf_counter() - loop_start
        s.peak_memory_mb = max(s.peak_memory_mb, peak_memory(self.prec.device)[0])
        path = self.save(reason)
        self.dist.barrier()       # no rank ends (or is stopped by torchrun) while rank 0 still writes
        self.segment_start = time.perf_counter()
        return path

    def interrupted(self, hit: bool) -> bool:
        """Whether to stop after this step. Ranks must stop at the same step, so under DDP they agree
        (one all-reduce) every log_every steps; one process stops at once."""
        if not self.dist.enabled:
            return hit
        if self.state.step % self.cfg.log_every:
            return False
        return self.dist.any(hit, self.prec.device)

    def train(self, ui: TrainingProgress, verbose: bool) -> None:
        s, cfg = self.state, self.cfg
        self.model.train()
        loop_start = self.loop_start = time.perf_counter() - s.train_time_s
        self.segment_start = time.perf_counter()
        last_aux = None
        stop = False
        with _deferred_interrupt() as interrupt:
            while not s.finished:
                self.train_loader.batch_sampler.set_epoch(s.epoch, s.batch_in_epoch)
                for x, y in self.train_loader:
                    out = training_step(self.forward_model, self.dist.shard(x), self.dist.shard(y), self.optimizer,
                                        self.scaler, self.prec, cfg)
                    self.scheduler.step()
                    s.step += 1
                    s.batch_in_epoch += 1
                    s.tokens_seen += y.numel()
                    self.pending.append((s.step, out.loss.detach()))
                    last_aux = out.aux_loss.detach()

                    at_eval = s.step % cfg.eval_freq == 0
                    at_ckpt = s.step % cfg.checkpoint_every == 0
                    hit = self.interrupted(interrupt["hit"])
                    if s.step % cfg.log_every == 0 or at_eval or at_ckpt or hit:
                        loss = self.pending[-1][1].item()
                        self.check_finite()
                        ui.update(s.step, loss, self.scheduler.get_last_lr()[0])
                    if at_eval:
                        self.evaluate_now(last_aux, verbose)
                    if cfg.max_steps and s.step >= cfg.max_steps:
                        stop = True
                        break
                    if at_ckpt or hit:
                        path = self.checkpoint_now("interrupt" if hit else "periodic", loop_start)
                        if hit:
                            raise TrainingInterrupted(f"{self.name}: interrupted at step {s.step}; state saved to "
                                                      f"{shown(path, self.run_dir)} in the run directory. Run "
                                                      "again with resume=True to continue.")
                else:
                    s.epoch += 1
                    s.batch_in_epoch = 0
                s.finished = stop or s.epoch >= cfg.max_epochs
                if s.finished and (not s.history or s.history[-1]["step"] != s.step):
                    self.evaluate_now(last_aux, verbose)     # the curves end where training ended
                self.checkpoint_now("end" if s.finished else "epoch", loop_start)

    # --- the result ------------------------------------------------------------------------------
    def finish(self) -> dict:
        s, prec = self.state, self.prec
        expert_counts: list = []
        losses = self.evaluate_on("test", expert_counts)
        test = estimate(losses)
        test_loss = test.mean
        peak, peak_kind = peak_memory(prec.device)
        per_rank = self.dist.gather_floats(max(peak, s.peak_memory_mb), prec.device)
        if not self.dist.is_main:
            return {"model": self.name, "test_loss": test_loss}     # rank 0 writes and reports
        metrics = {
            "model": self.name, "test_loss": test_loss, "test_perplexity": math.exp(test_loss),
            "test_loss_se": test.se, "test_loss_ci": [test.low, test.high],
            "test_windows": test.n, "test_tokens_evaluated": self.eval_samples["test"].tokens,
            "evaluation": {"protocol": self.cfg.eval_protocol, "eval_seed": self.cfg.eval_seed,
                           **{split: sample.to_dict() for split, sample in self.eval_samples.items()}},
            "train_time_s": s.train_time_s, "tokens_per_s": self.tokens_per_s(),
            "peak_memory_mb": max(per_rank), "peak_memory_kind": peak_kind,
            "world_size": self.dist.world_size, "peak_memory_mb_per_rank": per_rank,
            **self.summary, "tokens_seen": s.tokens_seen, "steps": s.step, "epochs_completed": s.epoch,
            "device": prec.device.type, "device_name": prec.device_name, "dtype": prec.dtype,
            "dtype_requested": self.cfg.dtype, "precision_note": prec.note, "torch_version": torch.__version__,
            "achieved_tflops": self.summary["flops_per_token"] * self.tokens_per_s() / 1e12,
            "throughput_definition": THROUGHPUT_DEFINITION, "train_time_definition": TRAIN_TIME_DEFINITION,
            "preset": self.cfg.preset, "config": self.cfg.to_dict(), "history": s.history,
            "warnings": self.warnings,
            # Each test window's loss, in the sample's order: the paired comparisons of notebook 05.
            "test_window_losses": [round(float(v), 6) for v in losses],
        }
        test_split = load_meta(self.run_dir / "data")["splits"]["test"]
        if test_split.get("bytes"):
            metrics["test_bits_per_byte"] = bits_per_byte(test_loss, test_split["tokens"], test_split["bytes"])
        if expert_counts:
            metrics["expert_utilisation"] = _shares(expert_counts)
        metrics["samples"] = sample_generations(self.model, "lisboa", self.cfg.sample_max_new_tokens, self.cfg.seed)
        write_metrics(metrics, self.run_dir)
        self.tracker.log({"test/loss": test_loss, "test/perplexity": metrics["test_perplexity"]}, step=s.step)
        self.tracker.finish({k: metrics[k] for k in ("test_loss", "test_perplexity", "train_time_s",
                                                     "tokens_per_s", "peak_memory_mb")})
        self.log(f"{self.name}: test loss {test_loss:.4f}, perplexity {metrics['test_perplexity']:.2f}, "
                 f"{metrics['tokens_per_s']:,.0f} tokens/s, {metrics['train_time_s']:.1f} s, "
                 f"peak {metrics['peak_memory_mb']:,.0f} MB")
        return metrics


def train_model(name: str, cfg: Config, run_dir: str | Path, resume: bool = True, progress: bool = True,
                wandb_mode: str | None = None, log=print, progress_interval_s: float = 60.0, gpus=1) -> dict:
    """Train `name` and return its metrics dict (also written to `<run_dir>/metrics/<name>.json`),
    with the trained model under "model". progress=False (batch runs): a progress line every
    `progress_interval_s` seconds and one per evaluation instead of a bar.

    gpus: 1, a number, or "auto" (every visible CUDA GPU). Above 1, the training runs under torchrun
    in processes of its own (`launch.launch_training`) and this returns what they wrote."""
    run_dir = Path(run_dir)
    n = resolve_gpus(gpus, cfg.device)
    if n > 1 and not launched_by_torchrun():
        from .launch import launch_training
        return launch_training(name, cfg, run_dir, n, resume=resume, wandb_mode=wandb_mode, log=log)
    dist = init_from_env(resolve_device(cfg.device).type, log)
    # Under torchrun rank 0 holds the lock, unless the process that launched torchrun already does.
    locked = dist.is_main and not os.environ.get("LLM_NB_LOCK_HELD")
    with folder_lock(run_dir / "checkpoints", f"training {name}", name) if locked else nullcontext():
        t = Trainer(name, cfg, run_dir, log, dist)
        for note in t.warnings:
            t.log(f"warning: {note}")
        t.restore(resume)
        reused = t.reusable_metrics()
        if reused is not None:
            t.log(f"{name} already trained ({t.state.step} steps): reusing metrics/{name}.json")
            return {**reused, "model": t.model}
        t.check_space()
        t.forward_model = maybe_compile(dist.wrap(t.model, t.prec.device), cfg.compile, t.prec.device, t.log)
        if dist.is_main:
            t.tracker = init_tracking(cfg, run_dir, name, wandb_mode)
            t.log(t.tracker.message)
        reset_peak_memory(t.prec.device)
        # A bar in interactive runs; in batch runs (progress=False) a line every progress_interval_s.
        ui = TrainingProgress(name, t.total_steps, t.state.step, cfg.batch_size * cfg.context_length,
                              bar=progress and dist.is_main, log=t.log, interval_s=progress_interval_s)
        try:
            t.train(ui, verbose=not progress)
        except BaseException:
            t.tracker.finish()
            raise
        finally:
            ui.close()
        return {**t.finish(), "model": t.model}


def write_metrics(metrics: dict, run_dir: str | Path) -> Path:
    """metrics/<model>.json and <model>_samples.json, each written whole or not at all."""
    out = Path(run_dir) / "metrics"
    name = metrics["model"]
    write_json(out / f"{name}_samples.json", metrics["samples"])
    return write_json(out / f"{name}.json", {k: v for k, v in metrics.items() if k != "samples"})


def load_metrics(run_dir: str | Path, name: str) -> dict:
    path = Path(run_dir) / "metrics" / f"{name}.json"
    notebook = ARMS[name].notebook if name in ARMS else "the training notebook"
    if not path.exists():
        raise FileNotFoundError(f"no metrics for {name} at {path}. Fix: run notebook {notebook} with this run "
                                "directory.")
    fix = f"run notebook {notebook} again with this run directory: it rebuilds the file from the final checkpoint"
    metrics = read_json(path, fix)
    samples = path.with_name(f"{name}_samples.json")
    metrics["samples"] = read_json(samples, fix) if samples.exists() else []
    return metrics


def load_trained_model(run_dir: str | Path, name: str, cfg: Config) -> torch.nn.Module:
    """The model of the run's latest checkpoint, on the config's device (after a torchrun training)."""
    path = latest_checkpoint(Path(run_dir) / "checkpoints" / name)
    if path is None:
        raise FileNotFoundError(f"no checkpoint of {name} in {Path(run_dir) / 'checkpoints' / name}")
    model = build_model(name, cfg)
    model.load_state_dict(load_checkpoint(path, map_location="cpu")["model"])
    return model.to(resolve_device(cfg.device))
