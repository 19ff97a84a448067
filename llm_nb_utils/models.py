"""The decoder-only language models of the comparison, built from a `Config`.

- `GPT2Model`: faithful GPT-2 (learned positions, pre-LayerNorm blocks, multi-head attention,
  GELU MLP).
- `MoEGQAModel`: Qwen3-MoE style (RoPE, RMSNorm, grouped-query attention with QK-norm,
  top-k Mixture-of-Experts of SwiGLU experts).
- `DenseGQAModel`: Qwen3's dense model, the control: MoE-GQA with each MoE layer replaced by one
  SwiGLU feed-forward as wide as the experts a token passes through (`Config.dense_width`), so the
  two differ by the routing alone.

Both return an `LMOutput`: logits, the mean next-token loss when targets are given (each token's
loss, shaped like the targets, with `per_token=True`: evaluation only), and the
auxiliary load-balancing loss (zero for GPT-2) kept apart so training can log it and add it.
When targets are given (training and evaluation), the loss is fused with the LM head and `logits`
is None: the 2048 x 50257 logits of a batch are never materialised.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from .attention import GroupedQueryAttention, MultiHeadAttention
from .config import Config
from .layers import FeedForward, KVCache, RMSNorm, SwiGLUFeedForward, init_weights, rope_tables
from .loss import linear_cross_entropy
from .moe import MoEFeedForward


@dataclass
class LMOutput:
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


class _LanguageModel(nn.Module):
    """What both models share: the LM head (tied or not), the loss, the KV cache factory."""

    def _init_head(self, cfg: Config):
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        init_weights(self, cfg.n_layers)
        if cfg.tie_embeddings:
            self.out_head.weight = self.tok_emb.weight

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layers)

    def _output(self, h: torch.Tensor, targets: torch.Tensor | None, aux: torch.Tensor,
                per_token: bool = False) -> LMOutput:
        h = self.final_norm(h)
        if targets is not None:
            # The head and an fp32 loss fused chunk by chunk; the full logits never exist.
            loss = linear_cross_entropy(h.flatten(0, 1), self.out_head.weight, targets.flatten(),
                                        reduction="none" if per_token else "mean")
            return LMOutput(None, loss.view(targets.shape) if per_token else loss, aux)
        return LMOutput(self.out_head(h), None, aux)

    def _check_length(self, idx: torch.Tensor, cache: KVCache | None):
        total = idx.shape[1] + (cache.length() if cache is not None else 0)
        if total > self.cfg.context_length:
            raise ValueError(f"sequence of {total} tokens exceeds context_length={self.cfg.context_length}")


class GPT2Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.emb_dim, eps=cfg.norm_eps)
        self.attn = MultiHeadAttention(cfg.emb_dim, cfg.n_heads, cfg.head_dim, cfg.bias, cfg.drop_rate)
        self.norm2 = nn.LayerNorm(cfg.emb_dim, eps=cfg.norm_eps)
        self.ff = FeedForward(cfg.emb_dim, cfg.hidden_dim, cfg.bias)
        self.drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x, cache=None, layer=0):
        x = x + self.drop(self.attn(self.norm1(x), cache, layer))
        return x + self.drop(self.ff(self.norm2(x)))


class GPT2Model(_LanguageModel):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.drop_rate)
        self.blocks = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(cfg.emb_dim, eps=cfg.norm_eps)
        self._init_head(cfg)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, per_token: bool = False) -> LMOutput:
        self._check_length(idx, cache)
        offset = cache.length() if cache is not None else 0
        pos = torch.arange(offset, offset + idx.shape[1], device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        return self._output(x, targets, torch.zeros((), device=idx.device), per_token)


class _Qwen3Block(nn.Module):
    """RMSNorm, grouped-query attention with QK-norm and RoPE, RMSNorm, then the feed-forward the
    subclass builds."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.norm1 = RMSNorm(cfg.emb_dim, cfg.norm_eps)
        self.attn = GroupedQueryAttention(cfg.emb_dim, cfg.n_heads, cfg.n_kv_groups, cfg.head_dim,
                                          cfg.bias, cfg.qk_norm, cfg.norm_eps, cfg.drop_rate)
        self.norm2 = RMSNorm(cfg.emb_dim, cfg.norm_eps)
        self.drop = nn.Dropout(cfg.drop_rate)

    def feed_forward(self, x):
        raise NotImplementedError

    def forward(self, x, cos, sin, cache=None, layer=0):
        x = x + self.drop(self.attn(self.norm1(x), cos, sin, cache, layer))
        return x + self.drop(self.feed_forward(self.norm2(x)))


class MoEGQABlock(_Qwen3Block):
    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.moe = MoEFeedForward(cfg.emb_dim, cfg.moe_intermediate_size, cfg.num_experts,
                                  cfg.num_experts_per_token)

    def feed_forward(self, x):
        return self.moe(x)


class DenseGQABlock(_Qwen3Block):
    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.ff = SwiGLUFeedForward(cfg.emb_dim, cfg.dense_width)

    def feed_forward(self, x):
        return self.ff(x)


class _Qwen3Model(_LanguageModel):
    """What MoE-GQA and Dense-GQA share: token embeddings (no positions: RoPE turns the queries and
    keys instead), the blocks, a final RMSNorm and the head."""
    block: type = _Qwen3Block

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
        self._init_head(cfg)

    def _body(self, idx: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        self._check_length(idx, cache)
        x = self.drop(self.tok_emb(idx))
        for i, block in enumerate(self.blocks):
            x = block(x, self.cos, self.sin, cache, i)
        return x


class MoEGQAModel(_Qwen3Model):
    block = MoEGQABlock

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, per_token: bool = False) -> LMOutput:
        x = self._body(idx, cache)
        aux = torch.zeros((), device=idx.device)
        for block in self.blocks:          # each layer's balancing loss, averaged over layers
            aux = aux + block.moe.aux_loss
        return self._output(x, targets, aux / len(self.blocks), per_token)

    def expert_counts(self) -> torch.Tensor:
        """(n_layers, num_experts) assignments per expert in the last forward pass."""
        return torch.stack([b.moe.expert_counts.cpu() for b in self.blocks])


class DenseGQAModel(_Qwen3Model):
    block = DenseGQABlock

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: KVCache | None = None, per_token: bool = False) -> LMOutput:
        return self._output(self._body(idx, cache), targets, torch.zeros((), device=idx.device), per_token)
