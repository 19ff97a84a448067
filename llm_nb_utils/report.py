"""Tables and the generated discussion of the comparison (notebooks 01-04); the figures are in `figures`."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from .files import write_atomic

LABELS = {"gpt2": "GPT-2 baseline", "moe_gqa": "MoE-GQA"}
STUDY_ROWS = ["test_loss", "test_perplexity", "train_time_s", "peak_memory_mb", "tokens_per_s"]
EXTRA_ROWS = ["test_bits_per_byte", "total_params", "active_params", "flops_per_token", "tokens_seen"]
ROW_LABELS = {"test_loss": "Test loss", "test_perplexity": "Test perplexity",
              "train_time_s": "Total training time (s)", "peak_memory_mb": "Peak memory (MB)",
              "tokens_per_s": "Throughput (tokens/s)", "total_params": "Total parameters",
              "active_params": "Parameters active per token", "test_bits_per_byte": "Test bits per byte", "flops_per_token": "Training FLOPs per token",
              "tokens_seen": "Training tokens seen"}

# The study's Table 2 (two epochs of the paper preset on an NVIDIA Tesla P100, bf16 requested).
STUDY_TABLE2 = {"hardware": "NVIDIA Tesla P100 (16 GB)",
                "gpt2": {"test_loss": 3.2699, "test_perplexity": 26.31, "train_time_s": 3882,
                         "peak_memory_mb": 3243, "tokens_per_s": 13347},
                "moe_gqa": {"test_loss": 3.2127, "test_perplexity": 24.85, "train_time_s": 3623,
                            "peak_memory_mb": 2823, "tokens_per_s": 8648}}


# The study's Table 1 (its Gutenberg corpus; the paper preset's windows of 256 every 128, batches of 8).
STUDY_TABLE1 = {"train": {"words": 5_596_830, "samples": 101_482, "batches": 12_685},
                "validation": {"words": 692_017, "samples": 12_843, "batches": 1_605},
                "test": {"words": 692_017, "samples": 13_471, "batches": 1_683}}
TABLE1_LABELS = {"words": "Words (whitespace-separated)", "samples": "Samples (windows)",
                 "tokens_per_sample": "Tokens per sample", "batch_size": "Batch size", "batches": "Batches"}


def table1_pretty(t1: pd.DataFrame, preset: str) -> pd.DataFrame:
    """Table 1 with human labels and thousands separators; for the paper preset, the study's own
    counts beside ours (its corpus was another selection of the same kind of text)."""
    out = t1.rename(index=TABLE1_LABELS).apply(lambda col: col.map(lambda v: f"{int(v):,}"))
    out.columns = [c.capitalize() for c in out.columns]
    if preset == "paper":
        for split, row in STUDY_TABLE1.items():
            out[f"{split.capitalize()} (study)"] = [f"{row[k]:,}" if k in row else "" for k in t1.index]
    out.index.name = None
    return out


def variation_pct(gpt2: float, moe: float) -> float:
    return (moe - gpt2) / gpt2 * 100 if gpt2 else float("nan")


def table2(metrics: dict[str, dict]) -> pd.DataFrame:
    """Rows of the study's Table 2 plus the rows that make the comparison fair to read."""
    g, m = metrics["gpt2"], metrics["moe_gqa"]
    rows = [{"metric": k, "gpt2": float(g[k]), "moe_gqa": float(m[k]),
             "variation_pct": variation_pct(float(g[k]), float(m[k]))}
            for k in STUDY_ROWS + EXTRA_ROWS if k in g and k in m]
    return pd.DataFrame(rows).set_index("metric")


def study_table2() -> pd.DataFrame:
    g, m = STUDY_TABLE2["gpt2"], STUDY_TABLE2["moe_gqa"]
    return pd.DataFrame([{"metric": k, "gpt2": g[k], "moe_gqa": m[k], "variation_pct": variation_pct(g[k], m[k])}
                         for k in STUDY_ROWS]).set_index("metric")


def save_table2(df: pd.DataFrame, run_dir: str | Path) -> Path:
    return write_atomic(Path(run_dir) / "table2.csv", df.to_csv())


def pretty(df: pd.DataFrame, memory_kind: str | None = None) -> pd.DataFrame:
    """Human labels and number formats for display (the CSV keeps raw keys and values)."""
    out = df.copy()
    labels = dict(ROW_LABELS)
    if memory_kind:
        labels["peak_memory_mb"] = "Peak VRAM (MB)" if memory_kind.startswith("cuda") else "Peak RAM, process RSS (MB)"
    out.index = [labels.get(i, i) for i in out.index]
    out = out.rename(columns={"gpt2": LABELS["gpt2"], "moe_gqa": LABELS["moe_gqa"], "variation_pct": "Variation (%)"})

    def fmt(v, row):
        if isinstance(v, str):
            return v
        if row in ("Test loss",):
            return f"{v:.4f}"
        if row in ("Test perplexity",):
            return f"{v:.2f}"
        if row in ("Test bits per byte",):
            return f"{v:.3f}"
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.1f}"
    for col in out.columns:
        out[col] = [f"{v:+.1f}%" if col == "Variation (%)" else fmt(v, r) for r, v in zip(out.index, out[col])]
    return out


def corpus_table(meta: dict) -> pd.DataFrame:
    """`corpus_by_source` with human labels and thousands separators."""
    df = corpus_by_source(meta)
    out = pd.DataFrame({"Files": df["files"].map("{:,}".format), "Kept": df["kept"].map("{:,}".format),
                        "Size (MB)": df["MB"].map("{:,.1f}".format), "Words": df["words"].map("{:,}".format)})
    out.index.name = "Source folder"
    return out


def dropped_summary(meta: dict) -> str:
    """What was dropped and why, one line per reason (or that nothing was)."""
    lines = []
    for reason, found in meta["dropped"].items():
        if found:     # a list of paths, or (not_prose) path -> why
            items = [f"{path} ({why})" for path, why in found.items()] if isinstance(found, dict) else found
            lines.append(f"{reason.replace('_', ' ')}: {', '.join(items)}")
    head = f"split: {meta['split_method']} {meta['split_ratios']} | tokenizer: {meta['tokenizer']}"
    return head + "\n" + ("dropped documents: none" if not lines else "dropped documents:\n  " + "\n  ".join(lines))


def tokens_per_word(meta: dict) -> pd.DataFrame:
    """GPT-2 tokens per whitespace-separated word and per byte of text, per split."""
    rows = {}
    for split, label in (("train", "Train"), ("val", "Validation"), ("test", "Test")):
        c = meta["splits"][split]
        rows[label] = {"Tokens": f"{c['tokens']:,}", "Words": f"{c['words']:,}",
                       "Tokens per word": f"{c['tokens'] / max(c['words'], 1):.2f}",
                       "Bytes per token": f"{c['bytes'] / max(c['tokens'], 1):.2f}" if c.get("bytes") else ""}
    return pd.DataFrame(rows).T


def parameter_table(parts: pd.Series) -> pd.DataFrame:
    """Parameters per component (those that have any) with their share of the total."""
    parts = parts[parts > 0]
    share = parts / parts.sum()
    return pd.DataFrame({"Parameters": parts.map("{:,}".format),
                         "Share": share.map(lambda x: f"{x:.1%}" if x >= 0.001 else "<0.1%")}).rename_axis("Component")


def cost_table(summaries: dict[str, dict]) -> pd.DataFrame:
    """Total and active parameters and training FLOPs per token of each model, side by side."""
    rows = {LABELS[n]: {"Total parameters": f"{s['total_params']:,}",
                        "Parameters active per token": f"{s['active_params']:,}",
                        "Training FLOPs per token": f"{s['flops_per_token']:,}"} for n, s in summaries.items()}
    return pd.DataFrame(rows)


def corpus_by_source(meta: dict) -> pd.DataFrame:
    """Corpus statistics per top-level folder of the corpus (one 'source' per folder)."""
    rows: dict[str, dict] = {}
    for f in meta["files"]:
        src = f["path"].split("/")[0] if "/" in f["path"] else "(top level)"
        r = rows.setdefault(src, {"files": 0, "kept": 0, "MB": 0.0, "words": 0})
        r["files"] += 1
        r["MB"] += f["bytes"] / 1e6
        if f["status"] == "kept":
            r["kept"] += 1
            r["words"] += f["words"]
    df = pd.DataFrame(rows).T
    df.loc["total"] = df.sum()
    return df.astype({"files": int, "kept": int, "words": int}).round({"MB": 1})


def generations_html(metrics: dict[str, dict]) -> str:
    """The generations as a reader wants them: per decoding setting, each model's text with the
    prompt in bold and set apart from the continuation, line breaks kept."""
    import html
    by_setting: dict[str, list] = {}
    for name, m in metrics.items():
        for smp in m.get("samples", []):
            label = ("greedy decoding" if not smp["temperature"]
                     else f"sampling, temperature {smp['temperature']}, top-k {smp['top_k']}")
            by_setting.setdefault(label, []).append((name, smp))
    parts = []
    for label, items in by_setting.items():
        seed, n = items[0][1]["seed"], items[0][1]["max_new_tokens"]
        parts.append(f"<h4>{html.escape(label)} <small>(seed {seed}, up to {n} new tokens)</small></h4>")
        for name, smp in items:
            prompt, text = smp["prompt"], smp["text"]
            rest = text[len(prompt):] if text.startswith(prompt) else text
            rest = re.sub(r"\n\s*\n(\s*\n)+", "\n\n", rest)        # at most one blank line in a row
            body = html.escape(rest).replace("\n", "<br>")
            parts.append(f"<p><b>{LABELS.get(name, name)}</b></p><blockquote><b style='background:#e8eef8'>{html.escape(prompt)}</b>"
                         f"<span style='color:#444'>{body}</span></blockquote>")
    return "\n".join(parts)


def run_settings(metrics: dict) -> str:
    """One Markdown line saying what a training run was: preset, hardware, precision, the settings
    changed from the preset (no local paths)."""
    from .config import changed_settings
    changed = changed_settings(metrics["config"])
    changes = ", ".join(f"`{k}={v}`" for k, v in changed.items()) if changed else "none"
    world = metrics.get("world_size", 1)
    where = metrics.get("device_name", metrics["device"]) + (f" x {world} processes (DDP)" if world > 1 else "")
    return (f"**Run settings:** preset `{metrics['config']['preset']}` on {where}, "
            f"{metrics['dtype']}; changed from the preset: {changes}.")


def summary(metrics: dict, name: str) -> pd.Series:
    """Model `name`'s headline numbers with human labels and formats (notebooks 02 and 03)."""
    rows = {"Test loss (nats per token)": f"{metrics['test_loss']:.4f}",
            "Test perplexity": f"{metrics['test_perplexity']:.2f}"}
    if "test_bits_per_byte" in metrics:
        rows["Test bits per byte"] = f"{metrics['test_bits_per_byte']:.3f}"
    memory = "Peak VRAM (MB)" if metrics["peak_memory_kind"].startswith("cuda") else "Peak RAM, process RSS (MB)"
    rows.update({"Training steps": f"{metrics['steps']:,}", "Training tokens seen": f"{metrics['tokens_seen']:,}",
                 "Total training time (s)": f"{metrics['train_time_s']:,.1f}",
                 "Throughput (tokens/s)": f"{metrics['tokens_per_s']:,.0f}", memory: f"{metrics['peak_memory_mb']:,.0f}",
                 "Precision used": metrics["dtype"]})
    return pd.Series(rows, name=LABELS.get(name, name))


def table2_with_study(metrics: dict[str, dict]) -> pd.DataFrame:
    """This run's Table 2 and the study's side by side, formatted (rows the study has)."""
    ours = pretty(table2(metrics).loc[STUDY_ROWS], metrics["gpt2"]["peak_memory_kind"])
    study = pretty(study_table2(), "cuda")
    if not metrics["gpt2"]["peak_memory_kind"].startswith("cuda"):     # one row, two kinds of memory
        ours = ours.rename(index={"Peak RAM, process RSS (MB)": "Peak memory (MB): RAM here, VRAM in the study"})
    ours.columns = pd.MultiIndex.from_product([["This run"], ours.columns])
    study.columns = pd.MultiIndex.from_product([[f"The study ({STUDY_TABLE2['hardware']})"], study.columns])
    study.index = ours.index
    return pd.concat([ours, study], axis=1)


def study_token_check() -> str:
    """The study's throughput x time, per model: tokens each figure pair implies."""
    s = STUDY_TABLE2
    g = s["gpt2"]["tokens_per_s"] * s["gpt2"]["train_time_s"]
    m = s["moe_gqa"]["tokens_per_s"] * s["moe_gqa"]["train_time_s"]
    two_epochs = 2 * STUDY_TABLE1["train"]["samples"] * 256
    return (f"- **The study's own speed figures disagree.** Throughput x training time gives "
            f"{s['gpt2']['tokens_per_s']:,} x {s['gpt2']['train_time_s']:,} s = {g / 1e6:.1f} M tokens for GPT-2 but "
            f"{s['moe_gqa']['tokens_per_s']:,} x {s['moe_gqa']['train_time_s']:,} s = {m / 1e6:.1f} M for MoE-GQA, for "
            f"the same two epochs of the same data (its Table 1: 2 x {STUDY_TABLE1['train']['samples']:,} windows "
            f"x 256 tokens = {two_epochs / 1e6:.1f} M). GPT-2's pair fits the data; MoE-GQA's does not: at "
            f"{s['moe_gqa']['tokens_per_s']:,} tokens/s two epochs take {two_epochs / s['moe_gqa']['tokens_per_s']:,.0f} s, "
            f"not {s['moe_gqa']['train_time_s']:,}. One of its two MoE-GQA figures does not describe that run, so "
            "its speed comparison cannot be taken at face value. This suite defines both figures and measures "
            "them the same way for both models.")


MEMORY_KINDS = {"cuda_max_memory_allocated_mb": "GPU memory allocated by torch (torch.cuda.max_memory_allocated)",
                "process_peak_rss_mb": "the process's peak resident memory (Linux VmHWM)"}


def environment_table(metrics: dict[str, dict], data_meta: dict | None = None) -> pd.DataFrame:
    """Where and how each model ran, in words."""
    from .config import changed_settings
    rows = {}
    for name, m in metrics.items():
        overrides = changed_settings(m["config"])
        rows[LABELS[name]] = {
            "Device": m.get("device_name") or m["device"],
            "Precision": m["dtype"] + (f" ({m['precision_note']})" if m.get("precision_note") else ""),
            "torch": m["torch_version"], "Preset": m["preset"],
            "Changed settings": ", ".join(f"{k}={v}" for k, v in overrides.items()) or "none",
            "Training steps": f"{m['steps']:,}",
            "Training processes": "1" if m.get("world_size", 1) == 1 else f"{m['world_size']} (DDP)",
            # Table 2's peak memory is the largest rank's
            "Peak memory per rank (MB)": " / ".join(f"{v:,.0f}" for v in m.get("peak_memory_mb_per_rank",
                                                                            [m["peak_memory_mb"]])),
            "Peak memory measured as": MEMORY_KINDS.get(m["peak_memory_kind"], m["peak_memory_kind"])}
        if data_meta:
            c = data_meta["corpus"]
            rows[LABELS[name]]["Corpus"] = (f"{data_meta['source']}: {c['kept']:,} documents, {c['bytes'] / 1e6:.1f} MB, "
                                            f"{sum(s['tokens'] for s in data_meta['splits'].values()):,} tokens")
    return pd.DataFrame(rows)


def discussion(metrics: dict[str, dict]) -> str:
    """A short Markdown discussion written from the numbers of this run, compared with the study."""
    g, m = metrics["gpt2"], metrics["moe_gqa"]
    better = "MoE-GQA" if m["test_loss"] < g["test_loss"] else "GPT-2"
    dl = variation_pct(g["test_loss"], m["test_loss"])
    dp = variation_pct(g["test_perplexity"], m["test_perplexity"])
    ratio = m["tokens_per_s"] / g["tokens_per_s"] if g["tokens_per_s"] else float("nan")
    dmem = variation_pct(g["peak_memory_mb"], m["peak_memory_mb"])
    dtime = variation_pct(g["train_time_s"], m["train_time_s"])
    s = STUDY_TABLE2
    study_better = "MoE-GQA" if s["moe_gqa"]["test_loss"] < s["gpt2"]["test_loss"] else "GPT-2"
    study_ratio = s["moe_gqa"]["tokens_per_s"] / s["gpt2"]["tokens_per_s"]
    study_dmem = variation_pct(s["gpt2"]["peak_memory_mb"], s["moe_gqa"]["peak_memory_mb"])
    lines = [
        f"- **Quality.** {better} reaches the lower test loss: {g['test_loss']:.4f} (GPT-2) vs "
        f"{m['test_loss']:.4f} (MoE-GQA), {dl:+.1f}% in loss and {dp:+.1f}% in perplexity "
        f"({g['test_perplexity']:.2f} vs {m['test_perplexity']:.2f}). "
        + ("This agrees with the study" if better == study_better else "The study found the opposite")
        + f", where {study_better} was better by {abs(variation_pct(s['gpt2']['test_loss'], s['moe_gqa']['test_loss'])):.1f}% in loss.",
        f"- **Cost per token.** MoE-GQA holds {m['total_params'] / g['total_params']:.2f}x GPT-2's parameters "
        f"({m['total_params'] / 1e6:.1f} M vs {g['total_params'] / 1e6:.1f} M) but uses "
        f"{m['active_params'] / 1e6:.1f} M per token, and {m['flops_per_token'] / g['flops_per_token']:.2f}x "
        "GPT-2's training FLOPs per token.",
        f"- **Speed.** MoE-GQA trained at {ratio:.2f}x GPT-2's throughput ({m['tokens_per_s']:,.0f} vs "
        f"{g['tokens_per_s']:,.0f} tokens/s; study: {study_ratio:.2f}x on a P100); total training time "
        f"{dtime:+.1f}%.",
        f"- **Memory.** Peak memory {dmem:+.1f}% for MoE-GQA ({m['peak_memory_mb']:,.0f} vs "
        f"{g['peak_memory_mb']:,.0f} MB, "
        f"{'GPU memory' if g['peak_memory_kind'].startswith('cuda') else 'process peak RSS'}); "
        f"study: {study_dmem:+.1f}% in VRAM.",
    ]
    if g["steps"] != m["steps"] or g["tokens_seen"] != m["tokens_seen"]:
        lines.append(f"- **Caution.** The two runs saw different amounts of data ({g['tokens_seen']:,} vs "
                     f"{m['tokens_seen']:,} tokens), so the comparison is not like for like.")
    lines.append(study_token_check())
    if cautions(metrics):
        lines.append(cautions(metrics))
    if g["preset"] != "paper" or g["device"] != "cuda":
        lines.append(f"- **Scope.** This run used the `{g['preset']}` preset on {g.get('device_name', g['device'])} "
                     f"for {g['steps']:,} steps: its numbers are not comparable to the study's absolute "
                     "figures, only its protocol is.")
    return "\n".join(lines)


def cautions(metrics: dict[str, dict]) -> str:
    """Markdown naming what makes these numbers weaker than they look (too few steps, no
    evaluation point), from the warnings each training run recorded; "" when there are none."""
    notes = {}
    for name, m in metrics.items():
        for w in m.get("warnings", []):
            notes.setdefault(w, []).append(LABELS.get(name, name))
    return "\n".join(f"- **Caution ({', '.join(who)}):** {w}." for w, who in notes.items())


def load_all_metrics(run_dir: str | Path) -> dict[str, dict]:
    from .train import load_metrics
    return {name: load_metrics(run_dir, name) for name in ("gpt2", "moe_gqa")}
