"""The architectures measured rather than asserted: where the parameters sit, what the KV
cache costs, where the router sends each token, and what RoPE makes of positions.

The notebooks call these and show their results; the tests check them against hand computations.
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import pandas as pd
import torch
import torch.nn as nn

from .arms import ARMS
from .config import Config
from .layers import apply_rope, rope_tables
from .moe import MoEFeedForward

COMPONENTS = ("embeddings", "attention", "feed-forward", "router", "norms", "LM head")


def _component(name: str, module: nn.Module) -> str:
    if isinstance(module, nn.Embedding):
        return "embeddings"
    if "router" in name:
        return "router"
    if isinstance(module, (nn.LayerNorm,)) or "norm" in name.rsplit(".", 1)[-1]:
        return "norms"
    if name == "out_head":
        return "LM head"
    if ".attn" in name:
        return "attention"
    return "feed-forward"


def params_by_component(model: nn.Module) -> pd.Series:
    """Parameters per component, a tied LM head counted once (under the embeddings)."""
    counts = dict.fromkeys(COMPONENTS, 0)
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            counts[_component(mod_name, module)] += p.numel()
    return pd.Series(counts, name="parameters")


def kv_heads(cfg: Config, model_name: str) -> int:
    """Key/value heads per layer: every head under multi-head attention, n_kv_groups under GQA."""
    return cfg.n_heads if ARMS[model_name].attention == "mha" else cfg.n_kv_groups


def kv_cache_bytes(cfg: Config, model_name: str, tokens: int = 1, bytes_per_value: int = 2) -> int:
    """Bytes of keys and values cached for `tokens` tokens over all layers (fp16/bf16 by default):
    GPT-2 caches every head, grouped-query attention only its n_kv_groups shared heads."""
    return 2 * cfg.n_layers * kv_heads(cfg, model_name) * cfg.head_dim * bytes_per_value * tokens


@contextmanager
def _evaluating(model: nn.Module):
    """`model` in eval mode for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def _input_of(module: nn.Module, model, ids: list[int]) -> torch.Tensor:
    """What `module` receives when `model` reads the token ids `ids` (in eval mode)."""
    seen = {}
    hook = module.register_forward_hook(lambda m, inp, out: seen.update(x=inp[0].detach()))
    try:
        with _evaluating(model):
            model(torch.tensor([ids], device=next(model.parameters()).device))
    finally:
        hook.remove()
    return seen["x"]


@torch.no_grad()
def route(model, ids: list[int], layer: int = 0) -> pd.DataFrame:
    """For each token of `ids` (rows), the weight the router of `layer` gave each expert (columns):
    the renormalised weights of the `num_experts_per_token` chosen, 0 for the others."""
    from .tokenizer import decode
    moe: MoEFeedForward = model.blocks[layer].moe
    x = _input_of(moe, model, ids)
    _, experts, weights = moe.router(x.reshape(-1, x.shape[-1]))
    chosen = torch.zeros(len(ids), moe.num_experts).scatter(1, experts.cpu(), weights.float().cpu())
    tokens = [f"{i}: " + decode([t]).replace(" ", "␣") for i, t in enumerate(ids)]    # a leading space is part of the token
    return pd.DataFrame(chosen.numpy(), index=tokens, columns=[f"expert {e}" for e in range(moe.num_experts)])


@torch.no_grad()
def attention_weights(model, ids: list[int], layer: int = 0) -> torch.Tensor:
    """GPT-2's attention weights (heads, tokens, tokens) in `layer` for the token ids `ids`: the
    softmax of the masked, scaled query-key scores, recomputed from the block's input (the package's
    fused attention never forms them)."""
    block = model.blocks[layer]
    attn, x = block.attn, _input_of(block.attn, model, ids)
    t = x.shape[1]
    q, k, _ = attn.qkv(x).view(1, t, 3, attn.n_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    scores = q @ k.transpose(-2, -1) / attn.head_dim ** 0.5
    return scores.masked_fill(torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1), float("-inf")).softmax(-1)[0].cpu()


def rope_scores(head_dim: int = 8, base: float = 10000.0, pairs=((0, 3), (5, 8), (20, 23), (0, 10))) -> pd.DataFrame:
    """q.k after rotary embedding for the same q and k vectors placed at several (m, n) positions:
    the score depends only on the distance n - m."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 1, head_dim, generator=g)
    k = torch.randn(1, 1, 1, head_dim, generator=g)
    cos, sin = rope_tables(head_dim, max(n for pair in pairs for n in pair) + 1, base)
    rows = []
    for m, n in pairs:
        score = (apply_rope(q, cos, sin, offset=m) * apply_rope(k, cos, sin, offset=n)).sum().item()
        rows.append({"query position m": m, "key position n": n, "distance n - m": n - m, "q . k": round(score, 4)})
    return pd.DataFrame(rows).set_index(["query position m", "key position n"])


def causal_mask(tokens: list[str]) -> pd.DataFrame:
    """Which earlier tokens each token may attend to (rows: the query, columns: the keys)."""
    n = len(tokens)
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    labels = [f"{i}: {t}" for i, t in enumerate(tokens)]
    return pd.DataFrame([["✓" if mask[i, j] else "·" for j in range(n)] for i in range(n)],
                        index=labels, columns=labels)


def architecture(cfg: Config) -> pd.DataFrame:
    """What the models share and where they differ, with this configuration's numbers: a column per
    arm (GPT-2; the Qwen3-style arms, dense and with experts)."""
    g = cfg.n_heads // cfg.n_kv_groups
    qwen = {
        "positions": f"rotary (RoPE, base {cfg.rope_base:g}) on q and k",
        "normalisation": "RMSNorm (scale only)",
        "attention": f"{cfg.n_heads} query heads sharing {cfg.n_kv_groups} key/value heads ({g} per group)",
        "QK-norm": "RMSNorm on q and k per head" if cfg.qk_norm else "no",
    }
    columns = {}
    for name, arm in ARMS.items():
        if arm.attention == "mha":
            col = {"positions": "learned embedding, one vector per position",
                   "normalisation": "LayerNorm (mean and variance, with bias)",
                   "attention": f"{cfg.n_heads} heads, each with its own keys and values", "QK-norm": "no",
                   "feed-forward": f"one dense MLP {cfg.emb_dim} -> {cfg.hidden_dim} -> {cfg.emb_dim}, GELU",
                   "extra loss": "none"}
        elif arm.has_experts:
            col = {**qwen, "feed-forward": f"{cfg.num_experts} SwiGLU experts {cfg.emb_dim} -> "
                                          f"{cfg.moe_intermediate_size} -> {cfg.emb_dim}, each token to "
                                          f"{cfg.num_experts_per_token}",
                   "extra loss": f"load balancing x {cfg.aux_loss_coef:g}"}
        else:
            col = {**qwen, "feed-forward": f"one dense SwiGLU {cfg.emb_dim} -> {cfg.dense_width} -> {cfg.emb_dim}",
                   "extra loss": "none"}
        col["shared"] = (f"width {cfg.emb_dim}, {cfg.n_layers} layers, context {cfg.context_length}, GPT-2 BPE "
                         f"({cfg.vocab_size:,} tokens), head tied to the embedding") if not columns else "the same"
        columns[arm.label] = col
    return pd.DataFrame(columns)


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:,.0f} B"


def kv_cache_table(cfg: Config, bytes_per_value: int = 2) -> pd.DataFrame:
    """KV-cache size of each attention kind: per token, at the full context, for a batch of full windows."""
    rows = {}
    for kind in ("mha", "gqa"):
        names = [n for n, a in ARMS.items() if a.attention == kind]
        per_token = kv_cache_bytes(cfg, names[0], 1, bytes_per_value)
        label = f"{', '.join(ARMS[n].label for n in names)} ({kind.upper()})"
        rows[label] = {"key/value heads per layer": kv_heads(cfg, names[0]),
                       "bytes per token": f"{per_token:,}",
                       f"one sequence of {cfg.context_length} tokens": _size(per_token * cfg.context_length),
                       f"a batch of {cfg.batch_size}": _size(per_token * cfg.context_length * cfg.batch_size)}
    return pd.DataFrame(rows).T


@torch.no_grad()
def kv_cache_measured(models: dict[str, nn.Module], prompt_ids: list[int], new_tokens: int) -> pd.DataFrame:
    """The KV cache as it is, not as the formula says: each arm's model reads the prompt into a real
    KVCache and then decodes `new_tokens` greedily one token at a time; the bytes the cache then holds
    beside `kv_cache_bytes` for the same tokens and value width (the model's own dtype)."""
    rows = {}
    for name, model in models.items():
        cache, step = model.new_cache(), torch.tensor([prompt_ids], device=next(model.parameters()).device)
        with _evaluating(model):
            for _ in range(new_tokens):
                step = model(step, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
        width = next(model.parameters()).element_size()
        formula = kv_cache_bytes(model.cfg, name, cache.length(), width)
        rows[ARMS[name].label] = {"tokens cached": cache.length(), "key/value heads per layer": kv_heads(model.cfg, name),
                                  "bytes held (measured)": f"{cache.nbytes():,}", "formula": f"{formula:,}",
                                  "per token": f"{cache.nbytes() // cache.length():,} B ({width} B a value)",
                                  "equal": cache.nbytes() == formula}
    return pd.DataFrame(rows).T


def generation_speed(models: dict[str, nn.Module], prompt_ids: list[int], new_tokens: int,
                     rounds: int = 3) -> pd.DataFrame:
    """Greedy decoding of `new_tokens` with the KV cache and without it (each step rereads the whole
    window), arms and modes interleaved over `rounds` so that a change in the machine's load falls on
    all of them; the median tokens/s of each, and whether both modes wrote the same tokens."""
    from .generate import generate
    seconds = {(name, cached): [] for name in models for cached in (True, False)}
    tokens = {}
    for _ in range(rounds):
        for name, model in models.items():
            for cached in (True, False):
                t0 = time.perf_counter()
                tokens[name, cached] = generate(model, prompt_ids, new_tokens, use_cache=cached)[0].tolist()
                seconds[name, cached].append(time.perf_counter() - t0)    # .tolist() waited for the device
    rows = {}
    for name in models:
        with_cache, without = (new_tokens / statistics.median(seconds[name, c]) for c in (True, False))
        rows[ARMS[name].label] = {"tokens/s with the cache": round(with_cache, 1),
                                  "tokens/s without": round(without, 1),
                                  "speed-up": f"{with_cache / without:.2f}x",
                                  "same tokens": tokens[name, True] == tokens[name, False]}
    return pd.DataFrame(rows).T
