"""Masked self-attention: GPT-2's multi-head attention and Qwen3's grouped-query attention."""
from __future__ import annotations

import torch
import torch.nn as nn

from .layers import KVCache, RMSNorm, apply_rope, causal_attention


class MultiHeadAttention(nn.Module):
    """GPT-2 attention: one fused q/k/v projection, n_heads heads of head_dim, output projection."""

    def __init__(self, emb_dim: int, n_heads: int, head_dim: int, bias: bool, drop_rate: float = 0.0):
        super().__init__()
        self.n_heads, self.head_dim, self.drop_rate = n_heads, head_dim, drop_rate
        self.qkv = nn.Linear(emb_dim, 3 * n_heads * head_dim, bias=bias)
        self.out_proj = nn.Linear(n_heads * head_dim, emb_dim, bias=bias)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        out = causal_attention(q, k, v, self.drop_rate if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, s, -1))


class GroupedQueryAttention(nn.Module):
    """n_heads query heads share n_kv_groups key/value heads; RoPE on q and k; optional QK-norm.

    QK-norm (RMSNorm over head_dim) is applied before RoPE, as in Qwen3. The KV cache holds only
    the n_kv_groups heads, which is GQA's memory saving at generation time.
    """

    def __init__(self, emb_dim: int, n_heads: int, n_kv_groups: int, head_dim: int, bias: bool,
                 qk_norm: bool, norm_eps: float = 1e-6, drop_rate: float = 0.0):
        super().__init__()
        assert n_heads % n_kv_groups == 0, "validated in config"
        self.n_heads, self.n_kv_groups, self.head_dim, self.drop_rate = n_heads, n_kv_groups, head_dim, drop_rate
        self.q_proj = nn.Linear(emb_dim, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(emb_dim, n_kv_groups * head_dim, bias=bias)
        self.v_proj = nn.Linear(emb_dim, n_kv_groups * head_dim, bias=bias)
        self.out_proj = nn.Linear(n_heads * head_dim, emb_dim, bias=bias)
        self.q_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, norm_eps) if qk_norm else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.n_kv_groups, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.n_kv_groups, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        offset = cache.length(layer) if cache is not None else 0
        q, k = apply_rope(q, cos, sin, offset), apply_rope(k, cos, sin, offset)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        out = causal_attention(q, k, v, self.drop_rate if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, s, -1))
