"""The sweep's tables and its conclusion, computed from the runs' metrics (one row per run)."""
from __future__ import annotations

import math

import pandas as pd

from .stats import PairedDifference, mean_ci, paired_difference

# The study's single-seed result: MoE-GQA's test loss relative to GPT-2's (3.2127 vs 3.2699).
STUDY_DIFFERENCE_PCT = (3.2127 - 3.2699) / 3.2699 * 100


def _pm(mean: float, half: float, digits: int) -> str:
    return f"{mean:.{digits}f}" if math.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


def design_table(runs: pd.DataFrame) -> pd.DataFrame:
    """A row per design: means over its seeds, ± the half-width of the 95% confidence interval."""
    rows = []
    for design, g in runs.groupby("design", sort=False):
        row = {"Model": design, "Seeds": len(g)}
        for col, label, digits in (("test_loss", "Test loss", 4), ("test_perplexity", "Perplexity", 2),
                                   ("test_bits_per_byte", "Bits per byte", 4)):
            row[label] = _pm(*mean_ci(g[col].tolist()), digits)
        row["Tokens/s"] = f"{g['tokens_per_s'].mean():,.0f}"
        row["Peak memory (MB)"] = f"{g['peak_memory_mb'].mean():,.0f}"
        first = g.iloc[0]
        row["Total parameters"] = f"{first['total_params']:,}"
        row["Active parameters"] = f"{first['active_params']:,}"
        row["GFLOPs per token"] = f"{first['flops_per_token'] / 1e9:.3f}"
        rows.append(row)
    return pd.DataFrame(rows).set_index("Model")


def design_means(runs: pd.DataFrame) -> pd.DataFrame:
    """Per design: mean test loss, its CI half-width, active parameters, training FLOPs (for figures)."""
    rows = []
    for design, g in runs.groupby("design", sort=False):
        mean, half = mean_ci(g["test_loss"].tolist())
        rows.append({"design": design, "model": g["model"].iloc[0], "test_loss": mean, "ci": half,
                     "active_params": g["active_params"].iloc[0], "training_flops": g["training_flops"].mean(),
                     "seeds": len(g)})
    return pd.DataFrame(rows)


def differences(runs: pd.DataFrame) -> dict[str, PairedDifference]:
    """Each MoE design's test loss minus GPT-2's, paired by seed (the seeds both have)."""
    gpt2 = runs[runs["model"] == "gpt2"].set_index("seed")["test_loss"]
    out = {}
    for design, g in runs[runs["model"] != "gpt2"].groupby("design", sort=False):
        moe = g.set_index("seed")["test_loss"]
        seeds = sorted(set(gpt2.index) & set(moe.index))
        if seeds:
            out[design] = paired_difference(gpt2[seeds].tolist(), moe[seeds].tolist())
    return out


def differences_table(diffs: dict[str, PairedDifference], runs: pd.DataFrame) -> pd.DataFrame:
    base = runs[runs["model"] == "gpt2"]["test_loss"].mean()
    rows = []
    for design, d in diffs.items():
        two = d.n >= 2
        rows.append({"MoE-GQA design": design, "Seed pairs": d.n,
                     "Test loss − GPT-2": f"{d.mean:+.4f}",
                     "Relative": f"{d.mean / base * 100:+.2f}%",
                     "95% CI": f"[{d.ci_low:+.4f}, {d.ci_high:+.4f}]" if two else "one pair: none",
                     "Paired t": f"{d.t:.2f}" if two and math.isfinite(d.t) else "–",
                     "p-value": f"{d.p:.3f}" if two else "–"})
    return pd.DataFrame(rows).set_index("MoE-GQA design")


def _verdict(design: str, d: PairedDifference) -> str:
    if d.n < 2:
        return (f"{design} differs from GPT-2 by {d.mean:+.4f} on the one seed pair trained, and one pair "
                "cannot say whether that is more than luck: run at least two seeds.")
    if d.covers_zero:
        return (f"{design} is **not distinguishable** from GPT-2 at this budget: the mean difference "
                f"{d.mean:+.4f} has a 95% interval [{d.ci_low:+.4f}, {d.ci_high:+.4f}] that covers zero "
                f"(paired t-test over {d.n} seeds, p = {d.p:.3f}).")
    side = "lower" if d.mean < 0 else "higher"
    return (f"{design} reaches a **{side}** test loss than GPT-2: {d.mean:+.4f} on average, 95% interval "
            f"[{d.ci_low:+.4f}, {d.ci_high:+.4f}], which excludes zero (paired t-test over {d.n} seeds, "
            f"p = {d.p:.3f}).")


def conclusion(runs: pd.DataFrame, steps: int, tokens: int) -> str:
    """A paragraph of Markdown from the numbers: the budget, each design against GPT-2, the study."""
    diffs = differences(runs)
    seeds = runs.groupby("design")["seed"].nunique()
    head = (f"Every run trained for {steps:,} steps ({tokens:,} tokens) on the same data, with "
            f"{seeds.min()}{'' if seeds.min() == seeds.max() else f' to {seeds.max()}'} seed(s) per design. ")
    if not diffs:
        return head + "No MoE-GQA run has a GPT-2 run with the same seed to compare with yet."
    lines = [_verdict(design, d) for design, d in diffs.items()]
    best_design, best = min(diffs.items(), key=lambda kv: kv[1].mean)
    base = runs[runs["model"] == "gpt2"]["test_loss"].mean()
    tail = (f" The study measured MoE-GQA {STUDY_DIFFERENCE_PCT:+.2f}% against GPT-2 with one run each, after two "
            f"full epochs of the paper preset; here {'the best design, ' if len(diffs) > 1 else ''}{best_design}"
            f"{',' if len(diffs) > 1 else ''} is at "
            f"{best.mean / base * 100:+.2f}%. A difference at this budget says how fast each learns early on, "
            "not where each would end.")
    return head + " ".join(lines) + tail


def final_validation(runs: pd.DataFrame, histories: dict[str, list]) -> str:
    """'GPT-2 5.068, MoE-GQA 4x2 (512) 5.049': each design's mean validation loss at its last point."""
    last = runs.assign(val=runs["run"].map(lambda r: histories[r][-1]["val_loss"])).groupby("design", sort=False)["val"]
    return ", ".join(f"{design} {v:.3f}" for design, v in last.mean().items())
