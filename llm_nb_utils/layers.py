"""Layers shared by the two models: norms, rotary embeddings, feed-forwards, causal attention core."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale, computed in fp32 for stability under autocast."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


def rope_tables(head_dim: int, context_length: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (context_length, head_dim), in the half-split layout of GPT-NeoX/Qwen."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.arange(context_length, dtype=torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Rotate (batch, heads, seq, head_dim) by the angles of positions offset .. offset+seq-1."""
    seq = x.shape[-2]
    cos, sin = cos[offset:offset + seq].to(x.dtype), sin[offset:offset + seq].to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class FeedForward(nn.Module):
    """GPT-2's MLP: emb -> hidden, GELU (tanh approximation, as in GPT-2), hidden -> emb."""

    def __init__(self, emb_dim: int, hidden_dim: int, bias: bool):
        super().__init__()
        self.fc = nn.Linear(emb_dim, hidden_dim, bias=bias)
        self.proj = nn.Linear(hidden_dim, emb_dim, bias=bias)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
           matmul=torch.matmul) -> torch.Tensor:
    """SwiGLU, with weights stored (in, out): down(silu(x @ gate) * (x @ up)). One definition for
    the dense feed-forward and every expert of the MoE, so the two arms differ in routing only."""
    return matmul(F.silu(matmul(x, w_gate)) * matmul(x, w_up), w_down)


class SwiGLUFeedForward(nn.Module):
    """Qwen3's dense feed-forward: a gated SiLU unit of width `hidden_dim` (three matrices, no bias)."""

    def __init__(self, emb_dim: int, hidden_dim: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(emb_dim, hidden_dim))
        self.w_up = nn.Parameter(torch.empty(emb_dim, hidden_dim))
        self.w_down = nn.Parameter(torch.empty(hidden_dim, emb_dim))

    def extra_repr(self) -> str:
        d, h = self.w_gate.shape
        return f"SwiGLU({d} -> {h} -> {d})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.w_gate, self.w_up, self.w_down)


def _sdpa_supports_gqa() -> bool:
    try:
        q = torch.zeros(1, 2, 1, 2)
        F.scaled_dot_product_attention(q, q[:, :1], q[:, :1], enable_gqa=True)
        return True
    except (TypeError, RuntimeError):
        return False


SDPA_GQA = _sdpa_supports_gqa()


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Scaled dot-product attention where query i sees keys up to its own absolute position.

    q: (b, n_heads, s_q, d); k, v: (b, n_kv, s_k, d) with s_k >= s_q (a KV cache holds the prefix).
    With fewer K/V heads than query heads, SDPA's native GQA is used where this torch has it;
    elsewhere K/V are expanded (same result, more memory).
    """
    s_q, s_k = q.shape[-2], k.shape[-2]
    groups = q.shape[1] // k.shape[1]
    kwargs = {}
    if groups > 1:
        if SDPA_GQA:
            kwargs["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if s_q == s_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, **kwargs)
    if s_q == 1:   # one new token attends to the whole cache
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, **kwargs)
    # A chunk of queries after a cached prefix: query i sits at absolute position s_k - s_q + i.
    mask = torch.ones(s_q, s_k, dtype=torch.bool, device=q.device).tril(diagonal=s_k - s_q)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, **kwargs)


class KVCache:
    """Per-layer keys and values of the tokens seen so far, for incremental decoding."""

    def __init__(self, n_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers

    def length(self, layer: int = 0) -> int:
        """Tokens cached so far for `layer` (layers are updated one after another in a step)."""
        return 0 if self.keys[layer] is None else self.keys[layer].shape[-2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=-2)
            v = torch.cat([self.values[layer], v], dim=-2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


def init_weights(module: nn.Module, n_layers: int, std: float = 0.02) -> None:
    """GPT-2 initialisation: N(0, 0.02), residual output projections scaled by 1/sqrt(2 n_layers)."""
    for name, p in module.named_parameters():
        if p.dim() < 2:
            continue   # norms keep ones, biases zeros
        residual = name.endswith(("out_proj.weight", "ff.proj.weight", "w_down"))
        scale = 1 / math.sqrt(2 * n_layers) if residual else 1.0
        nn.init.normal_(p, mean=0.0, std=std * scale)
    for m in module.modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)
