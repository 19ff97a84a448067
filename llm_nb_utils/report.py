"""Tables, figures and the generated discussion of the comparison (notebooks 01-04)."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

LABELS = {"gpt2": "GPT-2 baseline", "moe_gqa": "MoE-GQA"}
STUDY_ROWS = ["test_loss", "test_perplexity", "train_time_s", "peak_memory_mb", "tokens_per_s"]
EXTRA_ROWS = ["total_params", "active_params", "flops_per_token", "tokens_seen"]
ROW_LABELS = {"test_loss": "Test loss", "test_perplexity": "Test perplexity",
              "train_time_s": "Total training time (s)", "peak_memory_mb": "Peak memory (MB)",
              "tokens_per_s": "Throughput (tokens/s)", "total_params": "Total parameters",
              "active_params": "Parameters active per token", "flops_per_token": "Training FLOPs per token",
              "tokens_seen": "Training tokens seen"}

# The study's Table 2 (two epochs of the paper preset on an NVIDIA Tesla P100, bf16 requested).
STUDY_TABLE2 = {"hardware": "NVIDIA Tesla P100 (16 GB)",
                "gpt2": {"test_loss": 3.2699, "test_perplexity": 26.31, "train_time_s": 3882,
                         "peak_memory_mb": 3243, "tokens_per_s": 13347},
                "moe_gqa": {"test_loss": 3.2127, "test_perplexity": 24.85, "train_time_s": 3623,
                            "peak_memory_mb": 2823, "tokens_per_s": 8648}}


def variation_pct(gpt2: float, moe: float) -> float:
    return (moe - gpt2) / gpt2 * 100 if gpt2 else float("nan")


def table2(metrics: dict[str, dict]) -> pd.DataFrame:
    """Rows of the study's Table 2 plus the rows that make the comparison fair to read."""
    g, m = metrics["gpt2"], metrics["moe_gqa"]
    rows = [{"metric": k, "gpt2": float(g[k]), "moe_gqa": float(m[k]),
             "variation_pct": variation_pct(float(g[k]), float(m[k]))} for k in STUDY_ROWS + EXTRA_ROWS]
    return pd.DataFrame(rows).set_index("metric")


def study_table2() -> pd.DataFrame:
    g, m = STUDY_TABLE2["gpt2"], STUDY_TABLE2["moe_gqa"]
    return pd.DataFrame([{"metric": k, "gpt2": g[k], "moe_gqa": m[k], "variation_pct": variation_pct(g[k], m[k])}
                         for k in STUDY_ROWS]).set_index("metric")


def save_table2(df: pd.DataFrame, run_dir: str | Path) -> Path:
    path = Path(run_dir) / "table2.csv"
    df.to_csv(path)
    return path


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
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.1f}"
    for col in out.columns:
        out[col] = [f"{v:+.1f}%" if col == "Variation (%)" else fmt(v, r) for r, v in zip(out.index, out[col])]
    return out


def plot_loss_curves(histories: dict[str, list], path: str | Path | None = None, title: str | None = None):
    """Training and validation loss against tokens seen; one or both models on one figure."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = {"gpt2": "tab:blue", "moe_gqa": "tab:orange"}
    for name, hist in histories.items():
        tokens = [h["tokens_seen"] / 1e6 for h in hist]
        ax.plot(tokens, [h["train_loss"] for h in hist], color=colors[name], ls="--", alpha=0.8,
                label=f"{LABELS[name]} train")
        ax.plot(tokens, [h["val_loss"] for h in hist], color=colors[name], label=f"{LABELS[name]} validation")
    ax.set_xlabel("training tokens seen (millions)")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title or "Training and validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig


def plot_expert_utilisation(utilisation: list[list[float]], path: str | Path | None = None):
    """Share of routed tokens per expert in each layer (dashed line: perfect balance)."""
    n_layers, n_experts = len(utilisation), len(utilisation[0])
    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / n_experts
    for e in range(n_experts):
        ax.bar([l + e * width for l in range(n_layers)], [row[e] for row in utilisation], width,
               label=f"expert {e}")
    ax.axhline(1 / n_experts, color="k", ls="--", lw=1)
    ax.set_xticks([l + 0.4 - width / 2 for l in range(n_layers)], [f"layer {l}" for l in range(n_layers)])
    ax.set_ylabel("share of token assignments")
    ax.set_title("MoE expert utilisation on the test split")
    ax.legend(ncol=n_experts, fontsize=8)
    fig.tight_layout()
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig


def plot_document_lengths(meta: dict, path: str | Path | None = None):
    words = [f["words"] for f in meta["files"] if f["status"] == "kept"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.hist(words, bins=40, color="tab:green")
    ax.set_xlabel("words per document")
    ax.set_ylabel("documents")
    ax.set_title(f"Document lengths ({len(words)} documents, {sum(words):,} words)")
    fig.tight_layout()
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig


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


def generations_table(metrics: dict[str, dict]) -> pd.DataFrame:
    rows = {}
    for name, m in metrics.items():
        for s in m.get("samples", []):
            label = "greedy" if not s["temperature"] else f"T={s['temperature']}, top-k={s['top_k']}"
            rows.setdefault(label, {})[LABELS[name]] = s["text"]
    return pd.DataFrame(rows).T


def environment_table(metrics: dict[str, dict], data_meta: dict | None = None) -> pd.DataFrame:
    from .config import changed_settings
    rows = {}
    for name, m in metrics.items():
        overrides = changed_settings(m["config"])
        rows[LABELS[name]] = {"device": m["device"], "device name": m.get("device_name", ""),
                              "dtype used": m["dtype"] + (f" ({m['precision_note']})" if m.get("precision_note") else ""),
                              "torch": m["torch_version"], "preset": m["preset"],
                              "overrides": json.dumps(overrides) if overrides else "none",
                              "steps": m["steps"], "peak memory measured as": m["peak_memory_kind"]}
        if data_meta:
            c = data_meta["corpus"]
            rows[LABELS[name]]["corpus"] = (f"{data_meta['source']}: {c['kept']} documents, {c['bytes'] / 1e6:.1f} MB, "
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
    if g["preset"] != "paper" or g["device"] != "cuda":
        lines.append(f"- **Scope.** This run used the `{g['preset']}` preset on {g.get('device_name', g['device'])} "
                     f"for {g['steps']:,} steps: its numbers are not comparable to the study's absolute "
                     "figures, only its protocol is.")
    return "\n".join(lines)


def load_all_metrics(run_dir: str | Path) -> dict[str, dict]:
    from .train import load_metrics
    return {name: load_metrics(run_dir, name) for name in ("gpt2", "moe_gqa")}
