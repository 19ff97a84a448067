"""Tables and the generated discussion of the comparison (notebooks 01-05); the figures are in `figures`."""
from __future__ import annotations

import math
import re
from pathlib import Path

import pandas as pd

from .arms import ARM_NAMES, ARMS, REFERENCE, STEPS, STUDY_ARMS, label
from .files import write_atomic
from .runfolder import MissingRunFile, RunFolder

LABELS = {n: a.label for n, a in ARMS.items()}
STUDY_ROWS = ["test_loss", "test_perplexity", "train_time_s", "peak_memory_mb", "tokens_per_s"]
EXTRA_ROWS = ["test_bits_per_byte", "total_params", "active_params", "flops_per_token", "tokens_seen",
              "test_windows", "test_tokens_evaluated", "rss_before_model_mb", "memory_added_mb"]
# Rows whose variation has a paired interval over the test windows (all three are functions of the mean loss).
PAIRED_ROWS = ("test_loss", "test_perplexity", "test_bits_per_byte")
ROW_LABELS = {"test_loss": "Test loss", "test_perplexity": "Test perplexity",
              "train_time_s": "Total training time (s)", "peak_memory_mb": "Peak memory (MB)",
              "tokens_per_s": "Throughput (tokens/s)", "total_params": "Total parameters",
              "active_params": "Parameters active per token", "test_bits_per_byte": "Test bits per byte", "flops_per_token": "Training FLOPs per token",
              "tokens_seen": "Training tokens seen", "test_windows": "Test windows evaluated",
              "test_tokens_evaluated": "Test tokens evaluated",
              "rss_before_model_mb": "RAM before the model was built, RSS (MB)",
              "memory_added_mb": "RAM the model and training added (MB)",
              "lang_last_word": "Last word, % exact (chance 0)", "lang_gender": "Gender agreement, % right (chance 50)",
              "lang_number": "Number agreement, % right (chance 50)",
              "lang_combined": "Language score (0 = chance, 100 = all right)"}
# Rows of the language evaluation (langeval): an accuracy per arm, and per comparison the difference in
# points with its paired 95% interval over the same items.
LANG_TASKS = ("last_word", "gender", "number")

# The study's Table 2 (two epochs of the paper preset on an NVIDIA Tesla P100, bf16 requested), kept
# with the two arms it compared.
STUDY_TABLE2 = {"hardware": "NVIDIA Tesla P100 (16 GB)", **{n: ARMS[n].study for n in STUDY_ARMS}}


# The study's Table 1 (its Gutenberg corpus; the paper preset's windows of 256 every 128, batches of 8).
STUDY_TABLE1 = {"train": {"words": 5_596_830, "samples": 101_482, "batches": 12_685},
                "validation": {"words": 692_017, "samples": 12_843, "batches": 1_605},
                "test": {"words": 692_017, "samples": 13_471, "batches": 1_683}}
TABLE1_LABELS = {"words": "Words (whitespace-separated)", "samples": "Samples (windows)",
                 "tokens_per_sample": "Tokens per sample", "batch_size": "Batch size", "batches": "Batches"}


def table1_pretty(t1: pd.DataFrame, preset: str) -> pd.DataFrame:
    """Table 1 with human labels and thousands separators; for the paper preset, the study's own
    counts beside ours (its corpus was another selection of the same kind of text)."""
    out = t1.rename(index=lambda k: TABLE1_LABELS.get(k, k.replace("words: ", "Words from ")))
    out = out.apply(lambda col: col.map(lambda v: f"{int(v):,}"))
    out.columns = [c.capitalize() for c in out.columns]
    if preset == "paper":
        for split, row in STUDY_TABLE1.items():
            out[f"{split.capitalize()} (study)"] = [f"{row[k]:,}" if k in row else "" for k in t1.index]
    out.index.name = None
    return out


def variation_pct(a: float, b: float) -> float:
    """b relative to a, in %."""
    return (b - a) / a * 100 if a else float("nan")


def comparisons(names) -> list[tuple[str, str, str]]:
    """The differences Table 2 shows, (from, to, what changes): with all three arms, the two steps
    of the decomposition and the study's own comparison; otherwise each arm against the reference."""
    names = list(names)
    if all(n in names for step in STEPS for n in step[:2]):
        return [*STEPS, (STEPS[0][0], STEPS[-1][1], "both steps: the study's comparison")]
    return [(REFERENCE, n, "") for n in names if n != REFERENCE]


def variation_column(a: str, b: str) -> str:
    return f"{b}_vs_{a}_pct"


def paired_test(metrics: dict[str, dict], a: str, b: str):
    """`b - a` in test loss over the same test windows (evaluation.PairedEstimate), or None when the
    two runs did not keep the losses of the same windows."""
    from .evaluation import paired
    ma, mb = metrics[a], metrics[b]
    same = (ma.get("evaluation", {}).get("test", {}).get("fingerprint")
            == mb.get("evaluation", {}).get("test", {}).get("fingerprint"))
    if not (same and ma.get("test_window_losses") and mb.get("test_window_losses")):
        return None
    return paired(ma["test_window_losses"], mb["test_window_losses"])


def _paired_variation(row: str, p) -> tuple[float, float]:
    """The 95% interval of a row's variation (%) from the paired interval of the loss difference:
    perplexity is exp(loss), so its ratio is exp(difference); bits per byte scale with the loss."""
    if row == "test_perplexity":
        return 100 * math.expm1(p.diff.low), 100 * math.expm1(p.diff.high)
    return p.variation_ci_pct


def table2(metrics: dict[str, dict]) -> pd.DataFrame:
    """Rows of the study's Table 2 plus the rows that make the comparison fair to read; a column per
    arm and, per comparison a -> b, its variation (%) with, for the loss rows, the paired 95%
    interval over the test windows (`<b>_vs_<a>_pct`, `_ci_low`, `_ci_high`). Row test_loss_ci95 holds
    each test loss's own 95% half-width."""
    names = list(metrics)
    pairs = [(a, b, paired_test(metrics, a, b)) for a, b, _ in comparisons(names)]
    rows = []
    for k in STUDY_ROWS + EXTRA_ROWS:
        if not all(k in metrics[n] for n in names):
            continue
        row = {"metric": k, **{n: float(metrics[n][k]) for n in names}}
        for a, b, p in pairs:
            col = variation_column(a, b)
            row[col] = variation_pct(row[a], row[b])
            row[col.replace("_pct", "_ci_low")], row[col.replace("_pct", "_ci_high")] = (
                _paired_variation(k, p) if p and k in PAIRED_ROWS else (math.nan, math.nan))
        rows.append(row)
        if k == "test_loss" and all("test_loss_ci" in metrics[n] for n in names):
            rows.append({"metric": "test_loss_ci95", **{n: _half(metrics[n]) for n in names}})
    rows += language_rows(metrics, [(a, b) for a, b, _ in pairs])
    return pd.DataFrame(rows).set_index("metric")


def language_rows(metrics: dict[str, dict], pairs: list[tuple[str, str]]) -> list[dict]:
    """Table 2's rows of the language evaluation, where every arm has it on the same items."""
    from .langeval import paired_accuracy
    packs = {n: m.get("language") for n, m in metrics.items()}
    if not all(packs.values()) or len({p["fingerprint"] for p in packs.values()}) != 1:
        return []
    tasks = [t for t in LANG_TASKS if all(t in p["tasks"] for p in packs.values())]
    rows = []
    for t in tasks:
        row = {"metric": f"lang_{t}", **{n: 100 * p["tasks"][t]["accuracy"] for n, p in packs.items()}}
        for a, b in pairs:
            d = paired_accuracy(packs[a], packs[b], t)
            col = variation_column(a, b)
            row[col], row[col.replace("_pct", "_ci_low")], row[col.replace("_pct", "_ci_high")] = (
                100 * d.mean, 100 * d.low, 100 * d.high)
        rows.append(row)
    if tasks:
        row = {"metric": "lang_combined", **{n: 100 * p["combined"] for n, p in packs.items()}}
        for a, b in pairs:
            row[variation_column(a, b)] = row[b] - row[a]
            row[variation_column(a, b).replace("_pct", "_ci_low")] = math.nan
            row[variation_column(a, b).replace("_pct", "_ci_high")] = math.nan
        rows.append(row)
    return rows


def _share(v: float) -> str:
    return "no words generated" if math.isnan(v) else f"{100 * v:.1f}%"


def language_table(metrics: dict[str, dict]) -> pd.DataFrame:
    """Each language task: its chance level, items, and each arm's accuracy with its 95% interval over
    items (Wilson); the last-word task's context-free baseline; the generation statistics."""
    packs = {n: m["language"] for n, m in metrics.items() if m.get("language")}
    if not packs:
        return pd.DataFrame()
    first = next(iter(packs.values()))
    rows = []
    for t in LANG_TASKS:
        if t not in first["tasks"]:
            continue
        info = first["tasks"][t]
        row = {"task": info["label"], "items": info["n"], "chance": f"{100 * info['chance']:.0f}%"}
        for n, p in packs.items():
            r = p["tasks"].get(t)
            row[label(n)] = f"{100 * r['accuracy']:.1f}% [{100 * r['ci'][0]:.1f}, {100 * r['ci'][1]:.1f}]" if r else ""
        rows.append(row)
        if t == "last_word":
            rows.append({"task": "last word, log-likelihood (nats)", "items": info["n"],
                         "chance": f"{info['baseline_log_likelihood']:.2f} (word frequencies)",
                         **{label(n): f"{p['tasks'][t]['log_likelihood']:.2f}" for n, p in packs.items()}})
    rows.append({"task": "language score (centred on chance)", "items": "", "chance": "0",
                 **{label(n): f"{100 * p['combined']:.1f}" for n, p in packs.items()}})
    for key, what in (("in_vocabulary", "generated words found in the training split"),
                      ("distinct_2", "distinct word pairs"), ("distinct_3", "distinct word triples"),
                      ("repetition", "word triples repeated within a sample")):
        rows.append({"task": f"generation: {what}", "items": first["generation"]["samples"], "chance": "",
                     **{label(n): _share(p["generation"][key]) for n, p in packs.items()}})
    return pd.DataFrame(rows).set_index("task")


def _half(m: dict) -> float:
    low, high = m["test_loss_ci"]
    return (high - low) / 2


def study_table2() -> pd.DataFrame:
    """The study's published Table 2 (one run per model, no intervals)."""
    names = list(STUDY_ARMS)
    a, b = names
    rows = [{"metric": k, **{n: STUDY_TABLE2[n][k] for n in names},
             variation_column(a, b): variation_pct(STUDY_TABLE2[a][k], STUDY_TABLE2[b][k])} for k in STUDY_ROWS]
    # Its code evaluated the whole test split: every test window of its Table 1, 256 tokens each.
    test_tokens = STUDY_TABLE1["test"]["samples"] * 256
    rows.append({"metric": "test_tokens_evaluated", a: test_tokens, b: test_tokens, variation_column(a, b): 0.0})
    return pd.DataFrame(rows).set_index("metric")


def save_table2(df: pd.DataFrame, run_dir: str | Path) -> Path:
    return write_atomic(RunFolder(run_dir).table_path("table2"), df.to_csv())


def _format_value(v: float, row: str, half: float | None = None) -> str:
    if row.startswith("lang_"):
        return f"{v:.1f}"
    if row == "test_loss":
        return f"{v:.4f}" + (f" ± {half:.4f}" if half is not None and not math.isnan(half) else "")
    if row == "test_perplexity":
        return f"{v:.2f}"
    if row == "test_bits_per_byte":
        return f"{v:.3f}"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.1f}"


def _variation_cell(v: float, low: float = math.nan, high: float = math.nan, unit: str = "%", digits: int = 1) -> str:
    """'-1.63% [-1.80, -1.46]' where a paired interval exists, else '-1.6%' (`digits` decimals: the
    loss rows keep two, with an interval or without, as the study's -1.75%); accuracies differ in
    points ('+2.3 pts [+0.4, +4.2]')."""
    if math.isnan(low):
        return f"{v:+.{digits}f}{unit}"
    return f"{v:+.2f}{unit} [{low:+.2f}, {high:+.2f}]"


def pretty(df: pd.DataFrame, memory_kind: str | None = None) -> pd.DataFrame:
    """Human labels and number formats for display (the CSV keeps raw keys and values): a test
    loss reads '4.7140 ± 0.0123', a variation '-1.63% [-1.80, -1.46]' (its paired interval)."""
    half = df.loc["test_loss_ci95"] if "test_loss_ci95" in df.index else None
    body = df.drop(index="test_loss_ci95", errors="ignore")
    arms = [c for c in body.columns if c in ARMS]
    labels = dict(ROW_LABELS)
    if memory_kind:
        labels["peak_memory_mb"] = "Peak VRAM (MB)" if memory_kind.startswith("cuda") else "Peak RAM, process RSS (MB)"
    out = pd.DataFrame(index=[labels.get(i, i) for i in body.index])
    for n in arms:
        out[LABELS[n]] = [_format_value(v, r, half[n] if half is not None else None)
                          for r, v in body[n].items()]
    for col in [c for c in body.columns if c.endswith("_pct")]:
        b, a = col[:-len("_pct")].split("_vs_")
        low, high = (body.get(col.replace("_pct", s), pd.Series(math.nan, index=body.index)) for s in ("_ci_low", "_ci_high"))
        out[f"{label(b)} vs {label(a)}"] = [_variation_cell(v, lo, hi, " pts" if r.startswith("lang_") else "%",
                                                            2 if r in PAIRED_ROWS else 1)
                                            for r, v, lo, hi in zip(body.index, body[col], low, high)]
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


SPLIT_LABELS = {"train": "Train", "val": "Validation", "test": "Test"}


def split_composition(meta: dict) -> pd.DataFrame:
    """What each split holds, per collection (top-level folder of the corpus): documents or parts of
    one, words, share of the split's words, distinct authors where the corpus names them."""
    rows = []
    for split, split_label in SPLIT_LABELS.items():
        counts = meta["splits"][split]
        for name, c in sorted(counts.get("collections", {}).items()):
            rows.append({"Split": split_label, "Collection": name, "Documents (or parts)": f"{c['documents']:,}",
                         "Words": f"{c['words']:,}", "Share of the split": f"{c['words'] / max(counts['words'], 1):.1%}",
                         "Authors": f"{c['authors']:,}" if c.get("authors") else "not recorded"})
    return pd.DataFrame(rows).set_index(["Split", "Collection"]) if rows else pd.DataFrame(rows)


def collection_shares(meta: dict) -> dict[str, dict[str, float]]:
    """{split: {collection: share of the split's words}}."""
    return {split: {name: c["words"] / max(meta["splits"][split]["words"], 1)
                    for name, c in meta["splits"][split].get("collections", {}).items()} for split in SPLIT_LABELS}


def composition_warnings(meta: dict) -> list[str]:
    """A collection that weighs far more in validation or test than in training: those splits then
    measure transfer to it, not the training distribution."""
    shares = collection_shares(meta)
    notes = []
    for split in ("val", "test"):
        for name, share in shares[split].items():
            trained = shares["train"].get(name, 0.0)
            if share >= 0.1 and share - trained >= 0.25:
                notes.append(f"{name} is {share:.0%} of the {SPLIT_LABELS[split].lower()} split's words but "
                             f"{trained:.1%} of training's: that split measures transfer to {name} more than the "
                             "training text (split_method='documents' gives splits of alike composition)")
    return notes


def token_cut(sentences: dict[str, str]) -> pd.DataFrame:
    """Words, GPT-2 tokens and tokens per word of a few sentences (e.g. one meaning in two languages)."""
    from .tokenizer import encode
    rows = [{"sentence": name, "words": len(text.split()), "tokens": len(encode(text))} for name, text in sentences.items()]
    out = pd.DataFrame(rows).set_index("sentence")
    out["tokens per word"] = (out["tokens"] / out["words"]).round(2)
    return out


def tokens_per_word(meta: dict) -> pd.DataFrame:
    """GPT-2 tokens per whitespace-separated word and per byte of text, per split."""
    rows = {}
    for split, split_label in SPLIT_LABELS.items():
        c = meta["splits"][split]
        rows[split_label] = {"Tokens": f"{c['tokens']:,}", "Words": f"{c['words']:,}",
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
    """Model `name`'s headline numbers with human labels and formats (notebooks 02, 03 and 04)."""
    rows = {"Test loss (nats per token)": f"{metrics['test_loss']:.4f}",
            "Test perplexity": f"{metrics['test_perplexity']:.2f}"}
    if "test_loss_ci" in metrics:
        low, high = metrics["test_loss_ci"]
        rows["Test loss (nats per token)"] += f" ± {(high - low) / 2:.4f}"
        rows["Test loss: 95% interval over windows"] = f"[{low:.4f}, {high:.4f}]"
        rows["Test windows evaluated"] = metrics["evaluation"]["test"]["description"]
    if "test_bits_per_byte" in metrics:
        rows["Test bits per byte"] = f"{metrics['test_bits_per_byte']:.3f}"
    memory = "Peak VRAM (MB)" if metrics["peak_memory_kind"].startswith("cuda") else "Peak RAM, process RSS (MB)"
    rows.update({"Training steps": f"{metrics['steps']:,}", "Training tokens seen": f"{metrics['tokens_seen']:,}",
                 "Total training time (s)": f"{metrics['train_time_s']:,.1f}",
                 "Throughput (tokens/s)": f"{metrics['tokens_per_s']:,.0f}", memory: f"{metrics['peak_memory_mb']:,.0f}"})
    if "memory_added_mb" in metrics:
        rows[ROW_LABELS["rss_before_model_mb"]] = f"{metrics['rss_before_model_mb']:,.0f}"
        rows[ROW_LABELS["memory_added_mb"]] = f"{metrics['memory_added_mb']:,.0f}"
    rows["Precision used"] = metrics["dtype"]
    return pd.Series(rows, name=LABELS.get(name, name))


def table2_with_study(metrics: dict[str, dict]) -> pd.DataFrame:
    """This run's Table 2 and the study's side by side, formatted (rows the study has)."""
    t2 = table2(metrics)
    kind = metrics[next(iter(metrics))]["peak_memory_kind"]
    rows = [r for r in STUDY_ROWS + ["test_loss_ci95", "test_tokens_evaluated"] if r in t2.index]
    ours = pretty(t2.loc[rows], kind)
    study = pretty(study_table2().reindex([r for r in rows if r != "test_loss_ci95"]), "cuda")
    if not kind.startswith("cuda"):     # one row, two kinds of memory
        ours = ours.rename(index={"Peak RAM, process RSS (MB)": "Peak memory (MB): RAM here, VRAM in the study"})
    ours.columns = pd.MultiIndex.from_product([["This run"], ours.columns])
    study.columns = pd.MultiIndex.from_product([[f"The study ({STUDY_TABLE2['hardware']})"], study.columns])
    study.index = ours.index
    return pd.concat([ours, study], axis=1)


def study_token_check() -> str:
    """The study's throughput x time, per model: tokens each figure pair implies."""
    (ga, a), (gb, b) = ((STUDY_TABLE2[n], label(n)) for n in STUDY_ARMS)
    two_epochs = 2 * STUDY_TABLE1["train"]["samples"] * 256
    ta, tb = (s["tokens_per_s"] * s["train_time_s"] for s in (ga, gb))
    return (f"- **The study's own speed figures disagree.** Throughput x training time gives "
            f"{ga['tokens_per_s']:,} x {ga['train_time_s']:,} s = {ta / 1e6:.1f} M tokens for {a} but "
            f"{gb['tokens_per_s']:,} x {gb['train_time_s']:,} s = {tb / 1e6:.1f} M for {b}, for "
            f"the same two epochs of the same data (its Table 1: 2 x {STUDY_TABLE1['train']['samples']:,} windows "
            f"x 256 tokens = {two_epochs / 1e6:.1f} M). {a}'s pair fits the data; {b}'s does not: at "
            f"{gb['tokens_per_s']:,} tokens/s two epochs take {two_epochs / gb['tokens_per_s']:,.0f} s, "
            f"not {gb['train_time_s']:,}. One of its two {b} figures does not describe that run, so "
            "its speed comparison cannot be taken at face value. This suite defines both figures and measures "
            "them the same way for every model.")


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


def speed_comparison(timings: dict[str, list[list[float]]], tokens_per_step: int) -> dict:
    """From `steptime.interleaved_step_times`: each model's median tokens/s over all rounds, and each
    model's throughput over the reference's (the first model) as the median of the rounds' ratios,
    with their range: {"tokens_per_s": {...}, "ratios": {name: (median, low, high)}, ...}."""
    import statistics
    names = list(timings)
    ref = names[0]
    med = {n: statistics.median([t for r in rounds for t in r]) for n, rounds in timings.items()}
    ratios = {}
    for n in names[1:]:
        per_round = [statistics.median(ra) / statistics.median(rb) for ra, rb in zip(timings[ref], timings[n])]
        ratios[n] = (statistics.median(per_round), min(per_round), max(per_round))
    return {"reference": ref, "tokens_per_s": {n: tokens_per_step / v for n, v in med.items()}, "ratios": ratios,
            "rounds": len(timings[ref]), "steps_per_round": len(timings[ref][0])}


def speed_table(speed: dict) -> pd.DataFrame:
    rows = {}
    for n, v in speed["tokens_per_s"].items():
        r = speed["ratios"].get(n)
        rows[LABELS.get(n, n)] = {"Throughput, interleaved (tokens/s)": f"{v:,.0f}",
                                  f"Relative to {label(speed['reference'])} (range over rounds)":
                                      f"{r[0]:.2f}x ({r[1]:.2f} to {r[2]:.2f})" if r else "1 (reference)"}
    return pd.DataFrame(rows)


def _vs_study(metrics: dict[str, dict]) -> str:
    """Whether the two arms the study compared order as in the study."""
    a, b = STUDY_ARMS
    if a not in metrics or b not in metrics:
        return ""
    ours = metrics[b]["test_loss"] < metrics[a]["test_loss"]
    theirs = STUDY_TABLE2[b]["test_loss"] < STUDY_TABLE2[a]["test_loss"]
    study = variation_pct(STUDY_TABLE2[a]["test_loss"], STUDY_TABLE2[b]["test_loss"])
    return (f"The order of {label(a)} and {label(b)} " + ("agrees with" if ours == theirs else "is the opposite of")
            + f" the study's, where {label(b)} was {study:+.2f}% in test loss against {label(a)} (one run each).")


def comparison_line(metrics: dict[str, dict], a: str, b: str, what: str) -> str:
    """One comparison of Table 2 in words: the variation in loss and perplexity, its paired interval
    over the same test windows, and whether it exceeds the evaluation's noise."""
    ma, mb = metrics[a], metrics[b]
    line = (f"{label(a)} → {label(b)}" + (f" ({what})" if what else "") + ": test loss "
            f"{ma['test_loss']:.4f} → {mb['test_loss']:.4f}, {variation_pct(ma['test_loss'], mb['test_loss']):+.2f}% "
            f"(perplexity {variation_pct(ma['test_perplexity'], mb['test_perplexity']):+.2f}%)")
    p = paired_test(metrics, a, b)
    if p is None:
        return line + "."
    lo, hi = p.variation_ci_pct
    return line + (f", paired 95% interval [{lo:+.2f}%, {hi:+.2f}%]: "
                   + ("larger than the evaluation's own noise." if p.beyond_noise
                      else "within the evaluation's own noise, so these windows cannot tell the two apart."))


def quality_line(metrics: dict[str, dict]) -> str:
    """Every comparison of Table 2, what the intervals do and do not cover, and the study's result."""
    first = metrics[next(iter(metrics))]
    lines = [f"  - {comparison_line(metrics, a, b, what)}" for a, b, what in comparisons(metrics)]
    sample = first.get("evaluation", {}).get("test", {}).get("description")
    head = "- **Quality.** " + (f"All models read the same test windows ({sample}), so each difference is "
                                "measured window by window:" if sample else "Test losses:")
    tail = ("  - The intervals are over text, for these trained models; how much another training seed would "
            "move a difference is notebook 06's measure, not this one. " + _vs_study(metrics))
    return "\n".join([head, *lines, tail])


def speed_line(metrics: dict[str, dict], speed: dict | None) -> str:
    """Throughput as the runs measured it and, where notebook 05 timed the models interleaved, those
    ratios too, saying when the two disagree (load that changed between the runs)."""
    ref = next(iter(metrics))
    g = metrics[ref]
    parts = []
    for n, m in list(metrics.items())[1:]:
        ratio = m["tokens_per_s"] / g["tokens_per_s"] if g["tokens_per_s"] else math.nan
        part = f"{label(n)} {ratio:.2f}x ({m['tokens_per_s']:,.0f} vs {g['tokens_per_s']:,.0f} tokens/s)"
        if speed and n in speed["ratios"]:
            med, low, high = speed["ratios"][n]
            part += f", side by side {med:.2f}x ({low:.2f} to {high:.2f} over rounds)"
            if not low - 0.05 <= ratio <= high + 0.05:
                part += (": the training runs disagree with it (they ran one after the other and the machine's "
                         "load changed between them), so compare speeds by the side-by-side figure")
        parts.append(part)
    a, b = STUDY_ARMS
    study = STUDY_TABLE2[b]["tokens_per_s"] / STUDY_TABLE2[a]["tokens_per_s"]
    where = (f", and side by side ({speed['rounds']} alternating rounds of {speed['steps_per_round']} steps each)"
             if speed else "")
    return (f"- **Speed.** Throughput relative to {label(ref)}, in training{where}: " + "; ".join(parts)
            + f". The study: {label(b)} {study:.2f}x {label(a)} on a P100.")


def discussion(metrics: dict[str, dict], speed: dict | None = None) -> str:
    """A short Markdown discussion written from the numbers of this run, compared with the study;
    `speed` (from `speed_comparison`) adds the interleaved timing."""
    ref = next(iter(metrics))
    g = metrics[ref]
    kind = "GPU memory" if g["peak_memory_kind"].startswith("cuda") else "process peak RSS"
    a, b = STUDY_ARMS
    study_dmem = variation_pct(STUDY_TABLE2[a]["peak_memory_mb"], STUDY_TABLE2[b]["peak_memory_mb"])
    others = list(metrics.items())[1:]
    cost = "; ".join(f"{label(n)} holds {m['total_params'] / 1e6:.1f} M parameters and uses {m['active_params'] / 1e6:.1f} M "
                     f"per token, {m['flops_per_token'] / g['flops_per_token']:.2f}x the training FLOPs per token"
                     for n, m in others)
    memory = "; ".join(f"{label(n)} {variation_pct(g['peak_memory_mb'], m['peak_memory_mb']):+.1f}% "
                       f"({m['peak_memory_mb']:,.0f} MB)" for n, m in others)
    memory += f"; the study: {label(b)} {study_dmem:+.1f}% in VRAM"
    if all("memory_added_mb" in m for m in metrics.values()):
        memory += (f". The peak RSS counts the interpreter, torch and the data ({g['rss_before_model_mb']:,.0f} MB "
                   f"before {label(ref)}'s model was built); what the model and training added: {label(ref)} "
                   f"{g['memory_added_mb']:,.0f} MB, " + ", ".join(
                       f"{label(n)} {m['memory_added_mb']:,.0f} MB ({variation_pct(g['memory_added_mb'], m['memory_added_mb']):+.1f}%)"
                       for n, m in others))
    lines = [
        quality_line(metrics),
        f"- **Cost per token.** {label(ref)}: {g['total_params'] / 1e6:.1f} M parameters, all active; {cost}.",
        speed_line(metrics, speed),
        f"- **Memory.** Peak memory against {label(ref)} ({g['peak_memory_mb']:,.0f} MB, {kind}): {memory}.",
    ]
    seen = {(m["steps"], m["tokens_seen"]) for m in metrics.values()}
    if len(seen) > 1:
        lines.append("- **Caution.** The runs saw different amounts of data ("
                     + ", ".join(f"{label(n)} {m['tokens_seen']:,} tokens" for n, m in metrics.items())
                     + "), so the comparison is not like for like.")
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
    """The metrics of every arm trained in this run directory, in the registry's order."""
    folder = RunFolder(run_dir)
    found = folder.trained_arms()
    if len(found) < 2:
        raise MissingRunFile(f"notebook 05 compares at least two trained arms; {folder.metrics_dir} holds "
                             f"{', '.join(found) or 'none'}. Fix: run the training notebooks "
                             f"({', '.join(ARMS[n].notebook for n in ARM_NAMES)}) with this run directory first.")
    return {name: folder.load_metrics(name) for name in found}
