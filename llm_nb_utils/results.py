"""A finished training's results: the test evaluation and every number of the metrics file, assembled
in one place. Every rank computes the same dict (the test losses and the peak memory are gathered
over ranks); rank 0 writes it (`RunFolder.write_metrics`)."""
from __future__ import annotations

import math

import torch

from .accounting import bits_per_byte, model_summary
from .device import peak_memory
from .evaluation import estimate
from . import langeval
from .generate import sample_generations
from .prepare import load_meta

THROUGHPUT_DEFINITION = ("training tokens processed / wall-clock seconds spent in training steps "
                         "(forward, backward, optimizer), periodic evaluation and checkpointing excluded")
TRAIN_TIME_DEFINITION = "wall-clock seconds of the training loop, periodic evaluation and checkpoints included"


def expert_shares(expert_counts: list) -> list[list[float]]:
    """(layers x experts) share of each layer's assignments, from per-batch count tensors."""
    counts = torch.stack(expert_counts).sum(0).double()
    return (counts / counts.sum(-1, keepdim=True)).tolist()


def final_metrics(p, s, folder) -> dict:
    """The metrics of pieces `p` (engine.Pieces) after training to state `s`, with sample generations."""
    cfg, prec, dist = p.cfg, p.prec, p.dist
    expert_counts: list = []
    losses = p.losses_on("test", expert_counts)
    test = estimate(losses)
    peak, peak_kind = peak_memory(prec.device)
    per_rank = dist.gather_floats(max(peak, s.peak_memory_mb), prec.device)
    summary = model_summary(p.model)
    tokens_per_s = s.tokens_seen / s.step_time_s if s.step_time_s else 0.0
    metrics = {
        "model": p.name, "test_loss": test.mean, "test_perplexity": math.exp(test.mean),
        "test_loss_se": test.se, "test_loss_ci": [test.low, test.high],
        "test_windows": test.n, "test_tokens_evaluated": p.eval_samples["test"].tokens,
        "evaluation": {"protocol": cfg.eval_protocol, "eval_seed": cfg.eval_seed,
                       **{split: sample.to_dict() for split, sample in p.eval_samples.items()}},
        "train_time_s": s.train_time_s, "tokens_per_s": tokens_per_s,
        "peak_memory_mb": max(per_rank), "peak_memory_kind": peak_kind,
        "world_size": dist.world_size, "peak_memory_mb_per_rank": per_rank,
        **summary, "tokens_seen": s.tokens_seen, "steps": s.step, "epochs_completed": s.epoch,
        "device": prec.device.type, "device_name": prec.device_name, "dtype": prec.dtype,
        "dtype_requested": cfg.dtype, "precision_note": prec.note, "torch_version": torch.__version__,
        "achieved_tflops": summary["flops_per_token"] * tokens_per_s / 1e12,
        "throughput_definition": THROUGHPUT_DEFINITION, "train_time_definition": TRAIN_TIME_DEFINITION,
        "preset": cfg.preset, "config": cfg.to_dict(), "history": s.history,
        "warnings": p.warnings,
        # Each test window's loss, in the sample's order: the paired comparisons of notebook 05.
        "test_window_losses": [round(float(v), 6) for v in losses],
    }
    if p.rss_before_model_mb is not None:     # what the model and training add to the process's resident memory
        before = dist.gather_floats(p.rss_before_model_mb, prec.device)[per_rank.index(max(per_rank))]
        metrics.update(rss_before_model_mb=before, memory_added_mb=max(per_rank) - before)
    test_split = load_meta(folder.data)["splits"]["test"]
    if test_split.get("bytes"):
        metrics["test_bits_per_byte"] = bits_per_byte(test.mean, test_split["tokens"], test_split["bytes"])
    if expert_counts:
        metrics["expert_utilisation"] = expert_shares(expert_counts)
    metrics["samples"] = sample_generations(p.model, "lisboa", cfg.sample_max_new_tokens, cfg.seed)
    # Beyond perplexity: last words, agreement, generation (the same items for every arm and seed).
    metrics["language"] = langeval.evaluate(p.model, folder.data, cfg, prec.device, log=lambda *_: None)
    metrics["warnings"] = [*p.warnings, *metrics["language"]["warnings"]]
    return metrics
