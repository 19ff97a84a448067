"""The suite's figures. Each is drawn, saved (whole or not at all), and shown once with its alt text
and a one-line caption that says what to notice.

`show` displays a PNG with its alt text in the output's metadata; the pipeline's HTML rendering
writes it into the `<img alt=...>` (nbconvert's template has no place for it), and a figure closed
after showing leaves no `<Figure ...>` repr behind.
"""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib.pyplot as plt

from .files import write_atomic
from .arms import ARMS
from .report import LABELS

COLORS = {n: a.colour for n, a in ARMS.items()}


def png_bytes(fig, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def show(fig, alt: str, caption: str, path: str | Path | None = None) -> None:
    """Save `fig` to `path` (if given), display it with `alt` and `caption`, close it."""
    from IPython.display import Image, Markdown, display
    data = png_bytes(fig)
    if path:
        write_atomic(path, data)
    plt.close(fig)
    display(Image(data=data, format="png", metadata={"alt": alt}))
    display(Markdown(f"*{caption}*"))


def loss_curves(metrics: dict[str, dict]):
    """Validation (solid) and training (dashed) loss of each model against training tokens, against
    the loop's wall-clock time and against training FLOPs: the same curves, three fair axes when
    the models differ in speed and in cost per token."""
    unit, scale = _flop_unit(max(h["tokens_seen"] * m["flops_per_token"] for m in metrics.values()
                                 for h in m["history"]))
    axes_spec = [("tokens", "training tokens (millions)", lambda h, m: h["tokens_seen"] / 1e6),
                 ("time", "wall-clock time of the training loop (minutes)", lambda h, m: h["time_s"] / 60),
                 ("flops", f"training compute ({unit})", lambda h, m: h["tokens_seen"] * m["flops_per_token"] / scale)]
    timed = all(h.get("time_s") is not None for m in metrics.values() for h in m["history"])
    spec = [a for a in axes_spec if timed or a[0] != "time"]
    fig, axes = plt.subplots(1, len(spec), figsize=(4.2 * len(spec), 3.6), sharey=True)
    axes = list(axes) if len(spec) > 1 else [axes]
    for ax, (_, xlabel, x) in zip(axes, spec):
        for name, m in metrics.items():
            hist = m["history"]
            xs = [x(h, m) for h in hist]
            ax.plot(xs, [h["val_loss"] for h in hist], color=COLORS[name], marker="." if len(hist) < 4 else None,
                    label=f"{LABELS[name]} validation")
            ax.plot(xs, [h["train_loss"] for h in hist], color=COLORS[name], ls="--", alpha=0.6,
                    label=f"{LABELS[name]} training")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("cross-entropy loss (nats per token)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncol=len(labels), fontsize=8, frameon=False)
    fig.set_layout_engine("constrained")
    return fig


def expert_share_over_training(history: list[dict], num_experts: int):
    """Each expert's share of its layer's assignments at every evaluation point (validation batches)."""
    return expert_share_by_run({"": history}, num_experts)


def expert_share_by_run(histories: dict[str, list[dict]], num_experts: int):
    """`expert_share_over_training` for several runs, a row each (titled by its key), on one scale."""
    rows = {run: [h for h in history if "expert_share" in h] for run, history in histories.items()}
    n_layers = len(next(iter(rows.values()))[0]["expert_share"])
    fig, axes = plt.subplots(len(rows), n_layers, figsize=(3.2 * n_layers, 3.0 * len(rows)), sharey=True,
                             squeeze=False)
    for (run, points), row in zip(rows.items(), axes):
        steps = [h["step"] for h in points]
        for layer, ax in enumerate(row):
            for e in range(num_experts):
                ax.plot(steps, [h["expert_share"][layer][e] for h in points], label=f"expert {e}")
            ax.axhline(1 / num_experts, color="k", ls=":", lw=1)
            ax.set_title(f"{run}{', ' if run else ''}layer {layer}", fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        row[0].set_ylabel("share of assignments")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncol=num_experts, fontsize=8, frameon=False)
    fig.set_layout_engine("constrained")
    return fig


def expert_utilisation(utilisation: list[list[float]]):
    """Share of routed tokens per expert in each layer on the test split (dotted: perfect balance)."""
    n_layers, n_experts = len(utilisation), len(utilisation[0])
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.8 / n_experts
    for e in range(n_experts):
        ax.bar([l + e * width for l in range(n_layers)], [row[e] for row in utilisation], width,
               label=f"expert {e}")
    ax.axhline(1 / n_experts, color="k", ls=":", lw=1)
    ax.set_xticks([l + 0.4 - width / 2 for l in range(n_layers)], [f"layer {l}" for l in range(n_layers)])
    ax.set_ylabel("share of assignments")
    ax.set_ylim(0, max(max(r) for r in utilisation) * 1.3)
    ax.legend(ncol=n_experts, fontsize=8, loc="upper center", frameon=False)
    fig.tight_layout()
    return fig


def attention_heatmap(weights, tokens: list[str], heads=(0, 1)):
    """Attention weights of a few heads as token x token heatmaps: row = the token attending, column =
    the token attended to (the upper triangle is empty: no token sees later ones)."""
    fig, axes = plt.subplots(1, len(heads), figsize=(4.2 * len(heads) + 0.8, 4.4), squeeze=False)
    for ax, h in zip(axes[0], heads):
        im = ax.imshow(weights[h].numpy(), cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=8)
        ax.set_yticks(range(len(tokens)), tokens, fontsize=8)
        ax.set_title(f"head {h}")
        ax.set_xlabel("attended to")
    axes[0][0].set_ylabel("attending token")
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="attention weight")
    return fig


def rope_pairs(rotated, pairs=(0, 1, 2)):
    """One vector rotated by RoPE at positions 0, 1, 2, ... (rows of `rotated`, shape (positions, head_dim)):
    each chosen pair (i, i + head_dim/2) drawn as a point per position. A fast pair goes round the circle,
    a slow one barely moves; every point stays on its circle (a rotation keeps lengths)."""
    half = rotated.shape[1] // 2
    fig, axes = plt.subplots(1, len(pairs), figsize=(3.3 * len(pairs) + 1.0, 3.6), squeeze=False,
                             layout="constrained")
    for ax, i in zip(axes[0], pairs):
        a, b = rotated[:, i].numpy(), rotated[:, i + half].numpy()
        r = float((a[0] ** 2 + b[0] ** 2) ** 0.5)
        ax.add_patch(plt.Circle((0, 0), r, fill=False, color="0.85", lw=1))   # the length every position keeps
        points = ax.scatter(a, b, c=range(len(a)), cmap="viridis", s=22, zorder=2)
        ax.scatter(a[:1], b[:1], marker="x", color="black", s=40, zorder=3, label="position 0")
        ax.set(xlim=(-1.2 * r, 1.2 * r), ylim=(-1.2 * r, 1.2 * r), aspect="equal", title=f"pair ({i}, {i + half})",
               xlabel=f"dimension {i}", ylabel=f"dimension {i + half}")
        ax.legend(loc="upper right", fontsize=7)
    fig.colorbar(points, ax=axes[0].tolist(), shrink=0.8, label="position")
    return fig


def route_heatmap(weights, layer: int):
    """A router's choices as a token x expert heatmap (`anatomy.route`): each row a token, its
    chosen experts coloured by their weight, the others blank."""
    fig, ax = plt.subplots(figsize=(1.1 * weights.shape[1] + 2.6, 0.28 * len(weights) + 1.2))
    shown = weights.to_numpy().copy()
    shown[shown == 0] = float("nan")                         # not chosen: blank, not the colour of 0
    im = ax.imshow(shown, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(weights.shape[1]), weights.columns, fontsize=9)
    ax.set_yticks(range(len(weights)), weights.index, fontsize=8)
    ax.set_title(f"layer {layer}: the experts each token went to", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8, label="router weight")
    return fig


def document_lengths(meta: dict):
    words = [f["words"] for f in meta["files"] if f["status"] == "kept"]
    fig, ax = plt.subplots(figsize=(7, 3.0))
    ax.hist(words, bins=40, color="tab:green")
    ax.set_xlabel("words per document")
    ax.set_ylabel("documents")
    fig.tight_layout()
    return fig


def parameter_bars(parts: dict):
    """Parameters per component (millions), one bar group per model; `parts`: model -> pandas Series."""
    names = list(parts)
    components = [c for c in next(iter(parts.values())).index if any(p[c] for p in parts.values())]
    fig, ax = plt.subplots(figsize=(7, 3.0))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        ax.bar([j + i * width for j in range(len(components))], [parts[name][c] / 1e6 for c in components],
               width, label=LABELS.get(name, name), color=COLORS.get(name))
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(components))], components)
    ax.set_ylabel("parameters (millions)")
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def _flop_unit(most: float) -> tuple[str, float]:
    return next((u, s) for u, s in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("FLOP", 1)) if most >= s or s == 1)


def sweep_loss_vs_cost(means):
    """Mean test loss of each design (bars: 95% interval over seeds) against the parameters active per
    token and against the training compute; each arm keeps its marker and colour. `means`: sweep_report.design_means."""
    unit, scale = _flop_unit(means["training_flops"].max())
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, col, xlabel, div in ((axes[0], "active_params", "parameters active per token (millions)", 1e6),
                                 (axes[1], "training_flops", f"training compute per run ({unit})", scale)):
        seen = set()
        for _, r in means.iterrows():
            ax.errorbar(r[col] / div, r["test_loss"], yerr=None if r["ci"] != r["ci"] else r["ci"],
                        fmt=ARMS[r["model"]].marker, color=COLORS[r["model"]], capsize=3,
                        label=None if r["model"] in seen else ARMS[r["model"]].label)
            seen.add(r["model"])
            ax.annotate(r["design"].replace("MoE-GQA ", ""), (r[col] / div, r["test_loss"]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
        # Costs within a few % of each other drawn across the whole axis would look like a wide range:
        # the axis spans at least a fifth of the largest cost, so distances read in proportion.
        x = means[col] / div
        pad = max(0.1 * x.max(), 0.15 * (x.max() - x.min()))
        ax.set_xlim(x.min() - pad, x.max() + pad)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test loss (nats per token)")
    axes[0].legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def sweep_validation_curves(runs, histories: dict[str, list]):
    """Every run's validation loss against training tokens, faint, with each design's mean bold."""
    designs = list(dict.fromkeys(runs["design"]))
    model_of = dict(zip(runs["design"], runs["model"]))
    # An arm with one design keeps its colour from every other figure; the designs of an arm with several
    # (the MoE grid) take tab10's colours after the first three (blue, orange, green: the arms').
    per_arm = runs.groupby("model")["design"].nunique()
    shared = [d for d in designs if per_arm[model_of[d]] > 1]
    colors = {d: COLORS[model_of[d]] for d in designs if d not in shared}
    colors.update({d: plt.get_cmap("tab10")(3 + i % 7) for i, d in enumerate(shared)})
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for design in designs:
        names = runs.loc[runs["design"] == design, "run"]
        curves = [histories[n] for n in names]
        color = colors[design]
        for h in curves:
            ax.plot([p["tokens_seen"] / 1e6 for p in h], [p["val_loss"] for p in h], color=color, alpha=0.35, lw=0.8)
        length = min(len(h) for h in curves)
        mean = [sum(h[j]["val_loss"] for h in curves) / len(curves) for j in range(length)]
        ax.plot([p["tokens_seen"] / 1e6 for p in curves[0][:length]], mean, color=color, lw=2,
                label=f"{design} (mean of {len(curves)})")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return fig
