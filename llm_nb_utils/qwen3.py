"""The Qwen3-style models, top to bottom: Dense-GQA (Qwen3's dense model) and MoE-GQA (Qwen3-MoE).

Both: token embeddings and no learned positions (RoPE turns the queries and keys instead), blocks of
RMSNorm, grouped-query attention with QK-norm, RMSNorm and a SwiGLU feed-forward, a final RMSNorm,
and the LM head tied to the embedding. They differ in the feed-forward alone: Dense-GQA has one
SwiGLU as wide as the experts a token passes through (`Config.dense_width`); MoE-GQA routes each
token to `num_experts_per_token` of `num_experts` SwiGLU experts (`moe.py`). So Dense-GQA -> MoE-GQA
measures the experts, and GPT-2 -> Dense-GQA the rest of the architecture.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import Config
from .layers import (KVCache, LanguageModel, RMSNorm, apply_rope, causal_attention, residual_std,
                     rope_tables, swiglu)
from .moe import MoEFeedForward


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

    def init_weights(self, std: float, residual: float) -> None:
        for layer, s in ((self.q_proj, std), (self.k_proj, std), (self.v_proj, std), (self.out_proj, residual)):
            nn.init.normal_(layer.weight, std=s)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

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


class SwiGLUFeedForward(nn.Module):
    """Qwen3's dense feed-forward: a gated SiLU unit of width `hidden_dim` (three matrices, no
    bias), the same function as each MoE expert (`layers.swiglu`). Its weights are drawn by
    `init_weights` (the model calls it)."""

    def __init__(self, emb_dim: int, hidden_dim: int):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(emb_dim, hidden_dim))
        self.w_up = nn.Parameter(torch.empty(emb_dim, hidden_dim))
        self.w_down = nn.Parameter(torch.empty(hidden_dim, emb_dim))

    def init_weights(self, std: float, residual: float) -> None:
        nn.init.normal_(self.w_gate, std=std)
        nn.init.normal_(self.w_up, std=std)
        nn.init.normal_(self.w_down, std=residual)

    def extra_repr(self) -> str:
        d, h = self.w_gate.shape
        return f"SwiGLU({d} -> {h} -> {d})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.w_gate, self.w_up, self.w_down)


class Qwen3Block(nn.Module):
    """RMSNorm, grouped-query attention (QK-norm, RoPE), RMSNorm, then the feed-forward each subclass
    adds. `forward` returns the new hidden states and the layer's routing statistics (None: no router)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.norm1 = RMSNorm(cfg.emb_dim, cfg.norm_eps)
        self.attn = GroupedQueryAttention(cfg.emb_dim, cfg.n_heads, cfg.n_kv_groups, cfg.head_dim,
                                          cfg.bias, cfg.qk_norm, cfg.norm_eps, cfg.drop_rate)
        self.norm2 = RMSNorm(cfg.emb_dim, cfg.norm_eps)
        self.drop = nn.Dropout(cfg.drop_rate)

    def attend(self, x, cos, sin, cache, layer):
        return x + self.drop(self.attn(self.norm1(x), cos, sin, cache, layer))


class DenseGQABlock(Qwen3Block):
    """Qwen3's dense block: one SwiGLU feed-forward."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.ff = SwiGLUFeedForward(cfg.emb_dim, cfg.dense_width)

    def init_weights(self, std: float, residual: float) -> None:
        self.attn.init_weights(std, residual)
        self.ff.init_weights(std, residual)

    def forward(self, x, cos, sin, cache=None, layer=0):
        x = self.attend(x, cos, sin, cache, layer)
        return x + self.drop(self.ff(self.norm2(x))), None


class MoEGQABlock(Qwen3Block):
    """Qwen3-MoE's block: the feed-forward routed over experts."""

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.moe = MoEFeedForward(cfg.emb_dim, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_token)

    def init_weights(self, std: float, residual: float) -> None:
        self.attn.init_weights(std, residual)
        self.moe.init_weights(std, residual)

    def forward(self, x, cos, sin, cache=None, layer=0):
        x = self.attend(x, cos, sin, cache, layer)
        ff, routing = self.moe(self.norm2(x))
        return x + self.drop(ff), routing


class _Qwen3Model(LanguageModel):
    block: type

    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.drop_rate)
        self.blocks = nn.ModuleList(self.block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = RMSNorm(cfg.emb_dim, cfg.norm_eps)
        cos, sin = rope_tables(cfg.head_dim, cfg.context_length, cfg.rope_base)
        # Not persistent: derived from the config, so checkpoints hold only learned weights.
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self._build_head(cfg)
        self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        """GPT-2's initialisation, as for the baseline, so that the arms differ in architecture only."""
        nn.init.normal_(self.tok_emb.weight, std=std)
        for block in self.blocks:
            block.init_weights(std, residual_std(std, self.cfg.n_layers))
        self._init_head(self.cfg, std)

    def body(self, idx: torch.Tensor, cache: KVCache | None = None) -> tuple[torch.Tensor, list]:
        """The last block's hidden states, and each MoE layer's routing statistics."""
        self._check_length(idx, cache)
        x = self.drop(self.tok_emb(idx))
        routing = []
        for i, block in enumerate(self.blocks):
            x, r = block(x, self.cos, self.sin, cache, i)
            if r is not None:
                routing.append(r)
        return x, routing


class DenseGQAModel(_Qwen3Model):
    block = DenseGQABlock


class MoEGQAModel(_Qwen3Model):
    block = MoEGQABlock
