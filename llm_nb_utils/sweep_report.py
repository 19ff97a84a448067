"""The sweep's tables and its conclusion, computed from the runs' metrics (one row per run)."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import pandas as pd

from . import langeval
from .arms import ARMS, REFERENCE, STEPS
from .evaluation import PairedEstimate, paired
from .stats import PairedDifference, mean_ci, paired_difference

# The study's single-seed result: MoE-GQA's test loss relative to GPT-2's (3.2127 vs 3.2699).
STUDY_DIFFERENCE_PCT = (3.2127 - 3.2699) / 3.2699 * 100


def _p(p: float, equals: str = "") -> str:
    """A p-value to three decimals; below 0.001, "< 0.001" rather than a p of 0.000."""
    return "< 0.001" if p < 0.001 else f"{equals}{p:.3f}"


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
        if "language_score" in g and g["language_score"].notna().all():     # langeval, where every seed has it
            row["Language score"] = _pm(*mean_ci(g["language_score"].tolist()), 1)
        row["Tokens/s"] = f"{g['tokens_per_s'].mean():,.0f}"
        row["Peak memory (MB)"] = f"{g['peak_memory_mb'].mean():,.0f}"
        first = g.iloc[0]
        row["Total parameters"] = f"{first['total_params']:,}"
        row["Active parameters"] = f"{first['active_params']:,}"
        row["GFLOPs per token"] = f"{first['flops_per_token'] / 1e9:.3f}"
        rows.append(row)
    return pd.DataFrame(rows).set_index("Model")


def throughput_caution(runs: pd.DataFrame, tolerance: float = 0.10) -> str:
    """A warning, or "", when one design's runs trained at speeds further apart than `tolerance` of their
    mean: the same model at the same settings, so the machine's load changed between runs, and the
    design table's tokens/s compares loads as much as models."""
    spread = runs.groupby("design", sort=False)["tokens_per_s"].agg(lambda v: (v.max() - v.min()) / v.mean())
    spread = spread[runs.groupby("design", sort=False).size() > 1]
    if spread.empty or spread.max() <= tolerance:
        return ""
    worst = spread.idxmax()
    return (f"**Tokens/s is not a speed comparison here.** The runs of one design trained up to "
            f"{spread.max():.0%} apart in speed ({worst}): the machine's load changed between runs, and it "
            "moves the means above as much as the models do. Losses do not depend on it. For speed, time the "
            "models side by side (notebook 05, or benchmarks/train_throughput.py --rounds).")


def design_means(runs: pd.DataFrame) -> pd.DataFrame:
    """Per design: mean test loss, its CI half-width, active parameters, training FLOPs (for figures)."""
    rows = []
    for design, g in runs.groupby("design", sort=False):
        mean, half = mean_ci(g["test_loss"].tolist())
        rows.append({"design": design, "model": g["model"].iloc[0], "test_loss": mean, "ci": half,
                     "active_params": g["active_params"].iloc[0], "training_flops": g["training_flops"].mean(),
                     "seeds": len(g)})
    return pd.DataFrame(rows)


REFERENCE_DESIGN = ARMS[REFERENCE].label.replace(" baseline", "")     # "GPT-2"
# The evaluation pack's scores that Sweep.results gives each run (lang_<task> per task), in %, labelled
# as the pack labels them, with their chance level.
LANGUAGE_COLUMNS = {**{f"lang_{task}": f"{label} ({chance:.0%})" for task, (label, chance) in langeval.TASKS.items()},
                    "language_score": "language score (0 = chance)"}


def _by_seed(runs: pd.DataFrame, a: str, b: str, col: str = "test_loss") -> tuple[list[float], list[float]]:
    """Design a's and design b's `col`, over the seeds both have, in the same order."""
    la = runs[runs["design"] == a].set_index("seed")[col]
    lb = runs[runs["design"] == b].set_index("seed")[col]
    seeds = sorted(set(la.index) & set(lb.index))
    return la[seeds].tolist(), lb[seeds].tolist()


def _paired(runs: pd.DataFrame, a: str, b: str, col: str = "test_loss") -> PairedDifference | None:
    """Design b's `col` (test loss unless told) minus design a's, paired by seed (the seeds both have)."""
    la, lb = _by_seed(runs, a, b, col)
    return paired_difference(la, lb) if la else None


def differences(runs: pd.DataFrame) -> dict[str, PairedDifference]:
    """Each design's test loss minus the reference's (GPT-2), paired by seed."""
    out = {}
    for design in dict.fromkeys(runs.loc[runs["model"] != REFERENCE, "design"]):
        d = _paired(runs, REFERENCE_DESIGN, design)
        if d is not None:
            out[design] = d
    return out


def decomposition(runs: pd.DataFrame, col: str = "test_loss") -> list[tuple[str, str, str, PairedDifference]]:
    """The reference -> MoE difference in its two steps, each paired by seed: (from design, to design,
    what the step changes, difference). Only arms with one design in the sweep (the seeds grid) take part."""
    designs = runs.groupby("model", sort=False)["design"].unique()
    default = {model: d[0] for model, d in designs.items() if len(d) == 1}
    out = []
    for a, b, what in (*STEPS, (STEPS[0][0], STEPS[-1][1], "both")):
        if a in default and b in default and (d := _paired(runs, default[a], default[b], col)) is not None:
            out.append((default[a], default[b], what, d))
    return out


def _row(a: str, b: str, d: PairedDifference, base: float, what: str | None = None) -> dict:
    two = d.n >= 2
    row = {"Comparison": f"{b} − {a}"}
    if what:
        row["What changes"] = what
    row.update({"Seed pairs": d.n, "Difference": f"{d.mean:+.4f}", "Relative": f"{d.mean / base * 100:+.2f}%",
                "95% CI": f"[{d.ci_low:+.4f}, {d.ci_high:+.4f}]" if two else "one pair: none",
                "Paired t": f"{d.t:.2f}" if two and math.isfinite(d.t) else "–",
                "p-value": _p(d.p) if two else "–"})
    return row


def differences_table(diffs: dict[str, PairedDifference], runs: pd.DataFrame) -> pd.DataFrame:
    """Each design against the reference: mean difference over seed pairs, relative to the reference's
    mean, its 95% interval and the paired t-test."""
    base = runs[runs["model"] == REFERENCE]["test_loss"].mean()
    rows = [_row(REFERENCE_DESIGN, design, d, base) for design, d in diffs.items()]
    return pd.DataFrame(rows).set_index("Comparison")


def decomposition_table(steps: list, runs: pd.DataFrame) -> pd.DataFrame:
    """The decomposition's steps, each relative to the mean test loss of the design it starts from."""
    rows = [_row(a, b, d, runs[runs["design"] == a]["test_loss"].mean(), what) for a, b, what, d in steps]
    return pd.DataFrame(rows).set_index("Comparison")


def _points(d: PairedDifference) -> str:
    return f"{d.mean:+.1f}" + (f" [{d.ci_low:+.1f}, {d.ci_high:+.1f}]" if d.n >= 2 else " (one pair)")


def language_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The evaluation pack over seeds: each task's accuracy (%) per design, mean ± 95% interval over its
    seeds, and each step of the decomposition paired by seed (points of accuracy, with its interval).
    A task some run has no score for (trained before the pack; a test split too small for its items)
    is left out."""
    cols = [c for c in LANGUAGE_COLUMNS if c in runs and runs[c].notna().all()]
    if not cols:
        return pd.DataFrame()
    rows = []
    for col in cols:
        row = {"Task (accuracy %, chance)": LANGUAGE_COLUMNS[col]}
        for design, g in runs.groupby("design", sort=False):
            row[design] = _pm(*mean_ci(g[col].tolist()), 1)
        for a, b, what, d in decomposition(runs, col):
            if what != "both":
                row[f"{b} − {a}"] = _points(d)
        rows.append(row)
    return pd.DataFrame(rows).set_index("Task (accuracy %, chance)")


def dense_reference(runs: pd.DataFrame) -> str:
    """The design every MoE design is weighed against at equal cost: Dense-GQA (the same attention and
    the same parameters per token, no routing) where the sweep has it, else GPT-2."""
    dense = runs.loc[runs["model"] == STEPS[-1][0], "design"]          # the experts' step starts from it
    return dense.iloc[0] if len(dense) else REFERENCE_DESIGN


def _window_paired(runs: pd.DataFrame, losses: dict[str, list], seed: int, a: str, b: str) -> PairedEstimate | None:
    """Design b's test loss minus design a's for one seed, window by window over the same test windows."""
    ra = runs[(runs["design"] == a) & (runs["seed"] == seed)]
    rb = runs[(runs["design"] == b) & (runs["seed"] == seed)]
    if ra.empty or rb.empty:
        return None
    ra, rb = ra.iloc[0], rb.iloc[0]
    if ra["run"] not in losses or rb["run"] not in losses or ra["test_fingerprint"] != rb["test_fingerprint"]:
        return None
    return paired(losses[ra["run"]], losses[rb["run"]])


@dataclass
class SeedSpread:
    """One comparison (b − a) seed by seed in a sweep with several seeds, and how far it wanders."""
    a: str
    b: str
    what: str                    # what the step changes (arms.STEPS)
    differences: list[float]

    @property
    def sd(self) -> float:
        return statistics.stdev(self.differences)

    def beyond(self, gap: float) -> bool:
        """Whether a one-seed gap of the same kind is larger than the seeds' standard deviation."""
        return abs(gap) > self.sd

    def __str__(self) -> str:
        return (f"{self.b} − {self.a}: {', '.join(f'{d:+.4f}' for d in self.differences)} over "
                f"{len(self.differences)} seeds, standard deviation {self.sd:.4f}")


def seed_spreads(runs: pd.DataFrame) -> dict[tuple[str, str], SeedSpread]:
    """Each step of the decomposition (GPT-2 → Dense-GQA, Dense-GQA → MoE-GQA) seed by seed, where
    at least two seeds pair: the scale of seed luck that a one-seed comparison of the same kind is read
    against. By (from design, to design)."""
    out = {}
    for a, b, what, d in decomposition(runs):
        if what == "both" or d.n < 2:
            continue
        la, lb = _by_seed(runs, a, b)
        out[(a, b)] = SeedSpread(a, b, what, [y - x for x, y in zip(la, lb)])
    return out


def spread_for(spreads: dict[tuple[str, str], SeedSpread], a: str, b: str, experts: bool) -> SeedSpread | None:
    """The spread of the same comparison (b − a) where the other sweep has it, else, for a design with
    experts (b) against the one it was measured from there, that of the experts' step."""
    if (a, b) in spreads:
        return spreads[(a, b)]
    step = [s for s in spreads.values() if s.what == STEPS[-1][2] and s.a == a]
    return step[0] if experts and step else None


def spread_note(spreads: dict[tuple[str, str], SeedSpread], sweep_name: str, steps: int) -> str:
    """Where the seed spreads come from and what they are, under the window table."""
    if not spreads:
        return (f"The sweep `{sweep_name}` has no step of the decomposition with two seeds or more: there is "
                "no seed spread to read these gaps against.")
    return (f"Seed spread, from the sweep `{sweep_name}` ({steps:,} steps per run): "
            + "; ".join(map(str, spreads.values())) + ".")


def window_differences(runs: pd.DataFrame, losses: dict[str, list],
                       spreads: dict[tuple[str, str], SeedSpread] | None = None) -> pd.DataFrame:
    """Each design against the dense reference within each seed, paired over the same test windows. Its
    interval is the test sample's uncertainty for these trained models, not training's: it cannot say
    what another seed would give (the seed-paired tables do). GPT-2 comes before Dense-GQA in the
    decomposition, so its row reads as that step does (Dense-GQA − GPT-2), with the same sign. Given
    another sweep's `seed_spreads`, each gap is also set against the seed luck of its kind of comparison."""
    ref = dense_reference(runs)
    rows = []
    for design in dict.fromkeys(runs.loc[runs["design"] != ref, "design"]):
        before = ref != REFERENCE_DESIGN and design == REFERENCE_DESIGN         # the architecture's step
        a, b = (design, ref) if before else (ref, design)
        for seed in sorted(runs.loc[runs["design"] == design, "seed"]):
            p = _window_paired(runs, losses, seed, a, b)
            if p is None:
                continue
            rows.append({"Comparison": f"{b} − {a}", "Seed": seed, "Windows": p.diff.n,
                         "Difference": f"{p.diff.mean:+.4f}", "Relative": f"{p.variation_pct:+.2f}%",
                         "95% CI over windows": f"[{p.diff.low:+.4f}, {p.diff.high:+.4f}]",
                         "Beyond the test sample's noise": "yes" if p.beyond_noise else "no"})
            if spreads is not None:
                sp = spread_for(spreads, a, b, ARMS[runs.loc[runs["design"] == b, "model"].iloc[0]].has_experts)
                rows[-1]["Beyond the seed spread"] = (f"{'yes' if sp.beyond(p.diff.mean) else 'no'} (SD {sp.sd:.4f})"
                                                      if sp else "not measured")
    return pd.DataFrame(rows).set_index(["Comparison", "Seed"]) if rows else pd.DataFrame()


def within_seed_reading(runs: pd.DataFrame, losses: dict[str, list],
                        spreads: dict[tuple[str, str], SeedSpread] | None = None) -> str:
    """What a grid trained with one seed can say of its designs with experts: each against the dense
    reference over the same test windows, lowest first, and what each gap clears (the test sample's
    noise; the seed spread, where another sweep gave one). Empty when a design has several seeds (the
    seed-paired tables answer then) or nothing pairs."""
    if runs.empty or runs.groupby("design")["seed"].nunique().max() != 1:
        return ""
    ref, seed = dense_reference(runs), runs["seed"].iloc[0]
    found = []
    for design in dict.fromkeys(runs.loc[runs["model"].map(lambda m: ARMS[m].has_experts), "design"]):
        p = _window_paired(runs, losses, seed, ref, design)
        if p is not None:
            found.append((design, p, spread_for(spreads or {}, ref, design, True)))
    if not found:
        return ""
    found.sort(key=lambda f: f[1].diff.mean)
    parts = []
    for design, p, sp in found:
        clears = ("within the test sample's noise" if not p.beyond_noise else
                  "beyond the test sample's noise" + ("" if sp is None else
                  f" and {'beyond' if sp.beyond(p.diff.mean) else 'within'} the seed spread (SD {sp.sd:.4f})"))
        parts.append(f"{design} {p.diff.mean:+.4f} ({p.variation_pct:+.2f}%) [{p.diff.low:+.4f}, {p.diff.high:+.4f}], {clears}")
    n = found[0][1].diff.n
    return (f"**Seed {seed} alone, each design with experts against {ref}** over the same {n:,} test windows "
            f"(difference, 95% interval), lowest first: " + "; ".join(parts) + ". With one seed this orders "
            "trained models, not designs: no design is called better than another here, and a gap within the "
            "seed spread may reverse with another seed.")


def _verdict(design: str, d: PairedDifference, other: str = REFERENCE_DESIGN) -> str:
    if d.n < 2:
        return (f"{design} differs from {other} by {d.mean:+.4f} on the one seed pair trained, and one pair "
                "cannot say whether that is more than luck: run at least two seeds.")
    if d.covers_zero:
        return (f"{design} is **not distinguishable** from {other} at this budget: the mean difference "
                f"{d.mean:+.4f} has a 95% interval [{d.ci_low:+.4f}, {d.ci_high:+.4f}] that covers zero "
                f"(paired t-test over {d.n} seeds, p {_p(d.p, '= ')}).")
    side = "lower" if d.mean < 0 else "higher"
    return (f"{design} reaches a **{side}** test loss than {other}: {d.mean:+.4f} on average, 95% interval "
            f"[{d.ci_low:+.4f}, {d.ci_high:+.4f}], which excludes zero (paired t-test over {d.n} seeds, "
            f"p {_p(d.p, '= ')}).")


def conclusion(runs: pd.DataFrame, steps: int, tokens: int) -> str:
    """A paragraph of Markdown from the numbers: the budget, each design against GPT-2, the study."""
    diffs = differences(runs)
    seeds = runs.groupby("design")["seed"].nunique()
    n_seeds = f"{seeds.min()}{'' if seeds.min() == seeds.max() else f' to {seeds.max()}'}"
    head = (f"Every run trained for {steps:,} steps ({tokens:,} tokens) on the same data, with {n_seeds} "
            f"seed{'' if seeds.max() == 1 else 's'} per design. ")
    if not diffs:
        return head + f"No run has a {REFERENCE_DESIGN} run with the same seed to compare with yet."
    steps_ = [s for s in decomposition(runs) if s[2] != "both"]
    from_reference = {b: f"The step from {a} to {b} changes {what} only: " for a, b, what, _ in steps_
                      if a == REFERENCE_DESIGN}                      # said once, with its design's line
    lines = [from_reference.get(design, "") + _verdict(design, d) for design, d in diffs.items() if d.n >= 2]
    if single := {design: d for design, d in diffs.items() if d.n < 2}:     # said once, not once per design
        lines.append(f"Against {REFERENCE_DESIGN}, on the one seed pair trained: "
                     + ", ".join(f"{design} {d.mean:+.4f}" for design, d in single.items())
                     + ". One pair cannot say whether a difference is more than luck: run at least two seeds.")
    for a, b, what, d in steps_:
        if a != REFERENCE_DESIGN:
            lines.append(f"The step from {a} to {b} changes {what} only: " + _verdict(b, d, a))
    best_design, best = min(diffs.items(), key=lambda kv: kv[1].mean)
    base = runs[runs["model"] == REFERENCE]["test_loss"].mean()
    tail = (f" The study measured MoE-GQA {STUDY_DIFFERENCE_PCT:+.2f}% against GPT-2 with one run each, after two "
            f"full epochs of the paper preset; here {'the design with the lowest mean loss, ' if len(diffs) > 1 else ''}{best_design}"
            f"{',' if len(diffs) > 1 else ''} is at "
            f"{best.mean / base * 100:+.2f}%. A difference at this budget says how fast each learns early on, "
            "not where each would end.")
    return head + " ".join(lines) + tail


def lowest_design(runs: pd.DataFrame, losses: dict[str, list] | None = None) -> str:
    """The design with the lowest mean test loss and whether the seeds tell it from the next lowest
    (paired by seed): a figure's caption that names no winner the test does not support. With one
    shared seed, what the test windows say of the two trained models, marked as only that."""
    means = runs.groupby("design", sort=False)["test_loss"].mean().sort_values()
    best = means.index[0]
    if len(means) == 1:
        return f"One design: {best}, mean test loss {means[best]:.4f}."
    second = means.index[1]
    head = f"Lowest mean test loss: {best} ({means[best]:.4f}), then {second} ({means[second]:.4f})"
    d = _paired(runs, best, second)
    if d is None or d.n < 2:
        text = head + "; with fewer than two shared seeds, nothing says whether that order is more than luck"
        shared = sorted(set(runs.loc[runs["design"] == best, "seed"]) & set(runs.loc[runs["design"] == second, "seed"]))
        w = _window_paired(runs, losses, shared[0], best, second) if losses and shared else None
        if w is None:
            return text + "."
        return (text + f" of training (over the test windows of seed {shared[0]}, {second} − {best} = "
                f"{w.diff.mean:+.4f} [{w.diff.low:+.4f}, {w.diff.high:+.4f}]: the test sample's noise only).")
    gap = (f"{second} − {best} = {d.mean:+.4f}, 95% interval [{d.ci_low:+.4f}, {d.ci_high:+.4f}] over {d.n} "
           f"seed pairs, p {_p(d.p, '= ')}")
    if d.covers_zero:
        return head + f"; the seeds cannot tell the two apart ({gap})."
    return head + f"; the gap exceeds the seeds' noise ({gap})."


def final_validation(runs: pd.DataFrame, histories: dict[str, list]) -> str:
    """'GPT-2 5.068, MoE-GQA 4x2 (512) 5.049': each design's mean validation loss at its last point."""
    last = runs.assign(val=runs["run"].map(lambda r: histories[r][-1]["val_loss"])).groupby("design", sort=False)["val"]
    return ", ".join(f"{design} {v:.3f}" for design, v in last.mean().items())
