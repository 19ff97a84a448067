"""The LM head and its loss alone: how the fused loss should cut the vocabulary on this device.

    python benchmarks/lm_head_loss.py --device cpu
    python benchmarks/lm_head_loss.py --device cuda --blocks 50257 50240 16384

Times forward + backward of `linear_cross_entropy` (h @ W.T, then cross-entropy, W of
vocab x emb_dim) at a preset's shape (paper: 8 x 256 rows, 512, 50257) for several vocabulary
blocks, and the unfused `F.cross_entropy(h @ W.T)` beside them. A block of 50240 (the largest
multiple of 64) gives one 64-aligned product and a 17-wide tail: what padding the vocabulary to a
multiple of 64 would buy the large product, without padding it. Rounds alternate the order of
the variants. Peak memory is exact on a GPU (allocator statistics); on a CPU it is the process's
peak RSS, which a variant can inherit from an earlier one. Prints a table and writes JSON; it
asserts nothing about the figures.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llm_nb_utils.config import make_config  # noqa: E402
from llm_nb_utils.device import (peak_memory, reset_peak_memory, resolve_device,  # noqa: E402
                                 resolve_precision, synchronize)
from llm_nb_utils.loss import default_vocab_block, linear_cross_entropy  # noqa: E402


def unfused(h, w, t):
    return F.cross_entropy(h @ w.t(), t)


def time_variant(fn, h, w, t, prec, steps: int, warmup: int) -> tuple[list, float, float]:
    """(step times, peak MB, loss) of forward + backward of fn(h, w, t) under the run's autocast."""
    synchronize(prec.device)
    reset_peak_memory(prec.device)
    times, loss = [], None
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with prec.autocast():
            loss = fn(h, w, t)
        loss.backward()
        synchronize(prec.device)
        times.append(time.perf_counter() - t0)
        h.grad = w.grad = None
    return times[warmup:], peak_memory(prec.device)[0], loss.item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="paper", help="shape and dtype: batch x context rows, emb_dim, vocab")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default=None, help="as a run asks (default: the preset's); the device decides")
    p.add_argument("--rows", type=int, default=None, help="positions per batch (default: the preset's)")
    p.add_argument("--emb-dim", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--blocks", type=int, nargs="+", default=None,
                   help="vocabulary blocks to try (default: the whole, 64-aligned + tail, 16384, 8192, 4096)")
    p.add_argument("--no-unfused", action="store_true", help="skip F.cross_entropy(h @ W.T)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", default="outputs/benchmarks/lm_head_loss.json")
    args = p.parse_args(argv)

    cfg = make_config(args.preset)
    prec = resolve_precision(args.dtype or cfg.dtype, resolve_device(args.device))
    v, d = args.vocab or cfg.vocab_size, args.emb_dim or cfg.emb_dim
    rows = args.rows or cfg.batch_size * cfg.context_length
    blocks = args.blocks or [v, v // 64 * 64, 16384, 8192, 4096]
    blocks = list(dict.fromkeys(b for b in blocks if 0 < b <= v))
    default = default_vocab_block(prec.device, v)
    g = torch.Generator().manual_seed(0)
    # Hidden states as the final norm leaves them (unit variance), the head at its initial scale.
    h = torch.randn(rows, d, generator=g).to(prec.device).requires_grad_()
    w = (0.02 * torch.randn(v, d, generator=g)).to(prec.device).requires_grad_()
    t = torch.randint(0, v, (rows,), generator=g).to(prec.device)
    variants = {f"fused, block {b}": (b, lambda h, w, t, b=b: linear_cross_entropy(h, w, t, b)) for b in blocks}
    if not args.no_unfused:
        variants["unfused F.cross_entropy"] = (None, unfused)
    print(f"device: {prec.device_name} | dtype: {prec.dtype} | torch {torch.__version__} | "
          f"{rows} x {d} @ {d} x {v} | default block here: {default}")

    timed = {k: [] for k in variants}
    peaks = {k: float("inf") for k in variants}
    losses = {}
    names = list(variants)
    for r in range(args.rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            times, peak, losses[k] = time_variant(variants[k][1], h, w, t, prec, args.steps, args.warmup)
            timed[k] += times
            peaks[k] = min(peaks[k], peak)
    flops = 6 * rows * d * v          # forward product, and the two of the backward
    ref = losses.get("unfused F.cross_entropy", losses[names[0]])   # or the first variant's
    results = []
    for k in names:
        step = statistics.median(timed[k])
        row = {"variant": k, "block": variants[k][0],
               "step_time_s": step, "timed_steps": len(timed[k]), "tflops": flops / step / 1e12,
               "peak_memory_mb": peaks[k], "loss": losses[k], "loss_minus_reference": losses[k] - ref}
        results.append(row)
        print(f"{k:>26}: {1000 * step:9.2f} ms | {row['tflops']:7.3f} TFLOP/s | peak {peaks[k]:8,.0f} MB | "
              f"loss {losses[k]:.5f}" + ("  <- default" if row["block"] == default else ""))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": prec.device_name, "dtype": prec.dtype, "torch": torch.__version__,
                               "preset": args.preset, "rows": rows, "emb_dim": d, "vocab": v, "default_block": default,
                               "peak_memory_kind": peak_memory(prec.device)[1], "results": results}, indent=1))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
