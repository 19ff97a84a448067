"""Training throughput of every arm side by side, in one process, with the engine's own step.

    python benchmarks/train_throughput.py --preset paper --device cpu
    python benchmarks/train_throughput.py --preset paper --device cuda --batch-size 8 64

For each model and batch size: tokens/s over timed steps after warm-up (synchronised on a GPU),
evaluation tokens/s (forward only, the fused per-token loss, as the test evaluation runs),
step time, peak memory, achieved FLOP/s and MFU (against the device's peak, known for common GPUs,
or --peak-tflops), and each arm's throughput over GPT-2's. Prints a table and writes JSON.
Random token ids stand in for data: the step's cost does not depend on which tokens they are.
A benchmark reports figures; it asserts nothing about them.

Throughput comes from the median step time. With --rounds R each model is built and timed R
times, in alternating order (A B, B A, ...), and the steps of all rounds are pooled: on a shared
machine whose speed drifts by tens of percent over minutes, timing one model after the other
puts the drift into the ratio, and alternation spreads it over both.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from llm_nb_utils.accounting import model_summary  # noqa: E402
from llm_nb_utils.config import make_config, parse_overrides  # noqa: E402
from llm_nb_utils.device import peak_memory, reset_peak_memory, resolve_device, resolve_precision  # noqa: E402
from llm_nb_utils.arms import ARM_NAMES, ARMS, REFERENCE, build_model  # noqa: E402
from llm_nb_utils.steptime import time_evaluation_batches, time_training_steps  # noqa: E402

# Dense peak TFLOP/s for the dtype a run uses (vendor datasheets; dense,
# no sparsity), by model name as it appears, as a word, in torch.cuda.get_device_name().
PEAK_TFLOPS = [
    ("H200", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),
    ("H100", {"bfloat16": 989.0, "float16": 989.0, "float32": 67.0}),
    ("A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 19.5}),
    ("L4", {"bfloat16": 121.0, "float16": 121.0, "float32": 30.3}),
    ("A10", {"bfloat16": 125.0, "float16": 125.0, "float32": 31.2}),
    ("V100", {"float16": 125.0, "float32": 15.7}),
    ("T4", {"float16": 65.0, "float32": 8.1}),
    ("P100", {"float16": 18.7, "float32": 9.3}),
]


def peak_tflops(device_name: str, dtype: str) -> float | None:
    """The datasheet peak of a device named like `device_name`, matched on whole words of its name
    ("NVIDIA L40S" is not an L4, "A10G" not an A10): an unknown device gets None, not a neighbour's."""
    words = set(re.split(r"[^A-Z0-9]+", device_name.upper()))
    for model, table in PEAK_TFLOPS:
        if model in words:
            return table.get(dtype)
    return None


def time_steps(name: str, cfg, prec, batch_size: int, steps: int, warmup: int) -> tuple[list, float, str, dict]:
    """Build `name` afresh and time `steps` training steps after `warmup`: (step times, peak MB, kind, summary)."""
    torch.manual_seed(0)
    model = build_model(name, cfg).to(prec.device)
    summary = model_summary(model)
    reset_peak_memory(prec.device)   # each model's own peak, not the process's since start
    times = time_training_steps(model, cfg, prec, batch_size, steps, warmup)
    peak_mb, kind = peak_memory(prec.device)
    # Evaluation (inference, fused per-token loss) on the same batch size: what a test pass costs.
    eval_s = statistics.median(time_evaluation_batches(model, cfg, prec, batch_size, max(3, steps // 2), warmup))
    summary = {**summary, "eval_tokens_per_s": batch_size * cfg.context_length / eval_s}
    if ARMS[name].has_experts:   # which expert dispatch ran: one grouped product, or a loop over experts
        moe = model.blocks[0].moe    # asked as the forward asks: its weights' device, the multiply dtype
        with prec.autocast():
            grouped = moe.experts.uses_grouped_mm(moe.experts.w_up.device, moe.experts.compute_dtype(moe.experts.w_up))
        summary = {**summary, "moe_dispatch": "grouped" if grouped else "loop"}
    del model
    if prec.device.type == "cuda":
        torch.cuda.empty_cache()
    return times, peak_mb, kind, summary


def summarise(name: str, cfg, prec, batch_size: int, timed: list, peak_mb: float, kind: str, summary: dict) -> dict:
    step_s = statistics.median(timed)
    tps = batch_size * cfg.context_length / step_s
    achieved = summary["flops_per_token"] * tps
    peak = peak_tflops(prec.device_name, prec.dtype)
    return {"model": name, "batch_size": batch_size, "context_length": cfg.context_length,
            "step_time_s": step_s, "step_time_mean_s": statistics.fmean(timed), "step_time_min_s": min(timed),
            "timed_steps": len(timed), "tokens_per_s": tps,
            "peak_memory_mb": peak_mb, "peak_memory_kind": kind,
            "achieved_tflops": achieved / 1e12, "mfu": achieved / (peak * 1e12) if peak else None,
            "peak_tflops": peak, **summary}


def bench_batch(models: list, cfg, prec, batch_size: int, steps: int, warmup: int, rounds: int) -> list[dict]:
    """Every model at one batch size, `rounds` times in alternating order; one result per model."""
    timed = {name: [] for name in models}
    # The lowest of the rounds' peaks: on a CPU the process's RSS in a later round also holds heap
    # that an earlier model left mapped (GLIBC_TUNABLES keeps it); on a GPU the rounds agree.
    peaks = {name: float("inf") for name in models}
    kinds, summaries = {}, {}
    for r in range(rounds):
        for name in (models if r % 2 == 0 else models[::-1]):
            t, peak_mb, kinds[name], summaries[name] = time_steps(name, cfg, prec, batch_size, steps, warmup)
            timed[name] += t
            if rounds > 1:
                print(f"  round {r + 1}/{rounds} {name:>8}: median step {1000 * statistics.median(t):.1f} ms",
                      flush=True)
            peaks[name] = min(peaks[name], peak_mb)
    return [summarise(n, cfg, prec, batch_size, timed[n], peaks[n], kinds[n], summaries[n]) for n in models]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="paper")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default=None, help="default: the preset's (bf16 for paper; fp32 on CPU)")
    p.add_argument("--batch-size", type=int, nargs="+", default=None, help="one or more (default: preset's)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1,
                   help="time each model this many times, in alternating order (use 3+ on a noisy CPU)")
    p.add_argument("--models", nargs="+", default=list(ARM_NAMES), choices=ARM_NAMES)
    p.add_argument("--compile", action="store_true", help="torch.compile (CUDA only)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU, overriding the table")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other setting")
    p.add_argument("--json", default="outputs/benchmarks/train_throughput.json")
    args = p.parse_args(argv)

    extra = {"device": args.device, "compile": args.compile, **parse_overrides(args.set)}
    if args.dtype:
        extra["dtype"] = args.dtype
    cfg = make_config(args.preset, extra)
    prec = resolve_precision(cfg.dtype, resolve_device(cfg.device), cfg.force_dtype)
    print(f"device: {prec.device_name} | dtype: {prec.dtype}{' (' + prec.note + ')' if prec.note else ''} | "
          f"torch {torch.__version__} | preset {args.preset} | threads {torch.get_num_threads()} | "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")
    results = []
    for bs in args.batch_size or [cfg.batch_size]:
        for r in bench_batch(args.models, cfg, prec, bs, args.steps, args.warmup, args.rounds):
            name = r["model"]
            if args.peak_tflops:
                r["peak_tflops"], r["mfu"] = args.peak_tflops, r["achieved_tflops"] / args.peak_tflops
            results.append(r)
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            print(f"{name:>8} batch {bs:>4}x{cfg.context_length}: {r['tokens_per_s']:>11,.0f} tokens/s | step "
                  f"{1000 * r['step_time_s']:8.1f} ms (median of {r['timed_steps']}) | peak {r['peak_memory_mb']:8,.0f} MB | "
                  f"{r['achieved_tflops']:7.2f} TFLOP/s | MFU {mfu} | evaluation {r['eval_tokens_per_s']:,.0f} tokens/s"
                  + (f" | experts: {r['moe_dispatch']}" if "moe_dispatch" in r else ""), flush=True)
    ratios = {}
    for bs in args.batch_size or [cfg.batch_size]:
        by = {r["model"]: r for r in results if r["batch_size"] == bs}
        for name in by:
            if name != REFERENCE and REFERENCE in by:
                ratios.setdefault(name, {})[str(bs)] = by[name]["tokens_per_s"] / by[REFERENCE]["tokens_per_s"]
                print(f"{ARMS[name].label} / {ARMS[REFERENCE].label} throughput at batch {bs}: "
                      f"{ratios[name][str(bs)]:.3f}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": prec.device_name, "dtype": prec.dtype, "torch": torch.__version__,
                               "preset": args.preset, "threads": torch.get_num_threads(), "rounds": args.rounds,
                               "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
                               "results": results, "over_reference": ratios}, indent=1))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
