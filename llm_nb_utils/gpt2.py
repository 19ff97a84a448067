"""GPT-2, the study's baseline, top to bottom: learned positions, pre-LayerNorm blocks of multi-head
attention and a GELU MLP, a final LayerNorm, and the LM head tied to the token embedding."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import Config
from .layers import KVCache, LanguageModel, causal_attention, residual_std


class MultiHeadAttention(nn.Module):
    """One fused q/k/v projection, n_heads heads of head_dim each (every head has its own keys and
    values), the causal attention core, an output projection."""

    def __init__(self, emb_dim: int, n_heads: int, head_dim: int, bias: bool, drop_rate: float = 0.0):
        super().__init__()
        self.n_heads, self.head_dim, self.drop_rate = n_heads, head_dim, drop_rate
        self.qkv = nn.Linear(emb_dim, 3 * n_heads * head_dim, bias=bias)
        self.out_proj = nn.Linear(n_heads * head_dim, emb_dim, bias=bias)

    def init_weights(self, std: float, residual: float) -> None:
        _normal_linear(self.qkv, std)
        _normal_linear(self.out_proj, residual)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        out = causal_attention(q, k, v, self.drop_rate if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, s, -1))


class FeedForward(nn.Module):
    """GPT-2's MLP: emb -> hidden, GELU (tanh approximation, as in GPT-2), hidden -> emb."""

    def __init__(self, emb_dim: int, hidden_dim: int, bias: bool):
        super().__init__()
        self.fc = nn.Linear(emb_dim, hidden_dim, bias=bias)
        self.proj = nn.Linear(hidden_dim, emb_dim, bias=bias)

    def init_weights(self, std: float, residual: float) -> None:
        _normal_linear(self.fc, std)
        _normal_linear(self.proj, residual)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class GPT2Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.emb_dim, eps=cfg.norm_eps)
        self.attn = MultiHeadAttention(cfg.emb_dim, cfg.n_heads, cfg.head_dim, cfg.bias, cfg.drop_rate)
        self.norm2 = nn.LayerNorm(cfg.emb_dim, eps=cfg.norm_eps)
        self.ff = FeedForward(cfg.emb_dim, cfg.hidden_dim, cfg.bias)
        self.drop = nn.Dropout(cfg.drop_rate)

    def init_weights(self, std: float, residual: float) -> None:
        self.attn.init_weights(std, residual)      # norms keep their ones and zeros
        self.ff.init_weights(std, residual)

    def forward(self, x, cache=None, layer=0):
        x = x + self.drop(self.attn(self.norm1(x), cache, layer))
        return x + self.drop(self.ff(self.norm2(x)))


class GPT2Model(LanguageModel):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.drop_rate)
        self.blocks = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.emb_dim, eps=cfg.norm_eps)
        self._build_head(cfg)
        self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        """GPT-2's initialisation: N(0, 0.02), the projections into the residual stream scaled down."""
        nn.init.normal_(self.tok_emb.weight, std=std)
        nn.init.normal_(self.pos_emb.weight, std=std)
        for block in self.blocks:
            block.init_weights(std, residual_std(std, self.cfg.n_layers))
        self._init_head(self.cfg, std)

    def body(self, idx: torch.Tensor, cache: KVCache | None = None) -> tuple[torch.Tensor, list]:
        """The last block's hidden states, and the routing statistics (none: no router)."""
        self._check_length(idx, cache)
        offset = cache.length() if cache is not None else 0
        pos = torch.arange(offset, offset + idx.shape[1], device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        return x, []


def _normal_linear(layer: nn.Linear, std: float) -> None:
    nn.init.normal_(layer.weight, std=std)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
