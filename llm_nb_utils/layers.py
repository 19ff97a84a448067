"""The pieces every architecture shares: RMSNorm, rotary embeddings, SwiGLU, the causal attention
core, the KV cache, and the language-model head with its fused loss (`LanguageModel`).

Each architecture reads top to bottom in a file of its own over these: `gpt2.py` (GPT-2) and
`qwen3.py` (Dense-GQA and MoE-GQA, with the experts of `moe.py`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .loss import linear_cross_entropy


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


def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor,
           matmul=torch.matmul) -> torch.Tensor:
    """SwiGLU, with weights stored (in, out): down(silu(x @ gate) * (x @ up)). One definition for
    the dense feed-forward and every expert of the MoE, so the two arms differ in routing only."""
    return matmul(F.silu(matmul(x, w_gate)) * matmul(x, w_up), w_down)


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

    def nbytes(self) -> int:
        """Bytes the cached keys and values hold now, over all layers."""
        return sum(t.nelement() * t.element_size() for t in (*self.keys, *self.values) if t is not None)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=-2)
            v = torch.cat([self.values[layer], v], dim=-2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


@dataclass
class LMOutput:
    """A forward pass: logits (None when targets were given: the loss is fused with the head), the
    mean next-token loss (each token's loss, shaped like the targets, with `per_token=True`), and
    the routing statistics of each MoE layer (empty for dense models), from which the training step
    computes the load-balancing loss (`moe.balancing_loss`)."""
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None
    routing: list = field(default_factory=list)


class LanguageModel(nn.Module):
    """What every architecture shares after its blocks (`body`, each architecture's own): the final
    norm's output goes through the LM head (tied to the token embedding or not) into logits or, given
    targets, straight into the loss."""

    def body(self, idx: torch.Tensor, cache: KVCache | None = None) -> tuple[torch.Tensor, list]:
        raise NotImplementedError

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                per_token: bool = False) -> LMOutput:
        x, routing = self.body(idx, cache)
        return self._output(x, targets, per_token, routing)

    def logits_at(self, idx: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Next-token logits at chosen positions only: (batch, len(positions[0])) rows of the vocabulary,
        for `positions` of shape (batch, k), instead of the whole sequence's (evaluation only)."""
        x, _ = self.body(idx)
        rows = torch.arange(idx.shape[0], device=idx.device)[:, None]
        return self.out_head(self.final_norm(x[rows, positions]))

    def _build_head(self, cfg) -> None:
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)

    def _init_head(self, cfg, std: float) -> None:
        """Called last by the model's `init_weights`; a tied head is the embedding, already drawn."""
        if cfg.tie_embeddings:
            self.out_head.weight = self.tok_emb.weight
        else:
            nn.init.normal_(self.out_head.weight, std=std)

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layers)

    def _check_length(self, idx: torch.Tensor, cache: KVCache | None) -> None:
        total = idx.shape[1] + (cache.length() if cache is not None else 0)
        if total > self.cfg.context_length:
            raise ValueError(f"sequence of {total} tokens exceeds context_length={self.cfg.context_length}")

    def _output(self, h: torch.Tensor, targets: torch.Tensor | None, per_token: bool = False,
                routing: list | None = None) -> LMOutput:
        h = self.final_norm(h)
        routing = routing or []
        if targets is None:
            return LMOutput(self.out_head(h), None, routing)
        # The head and an fp32 loss fused chunk by chunk; the full logits never exist.
        loss = linear_cross_entropy(h.flatten(0, 1), self.out_head.weight, targets.flatten(),
                                    reduction="none" if per_token else "mean")
        return LMOutput(None, loss.view(targets.shape) if per_token else loss, routing)


def residual_std(std: float, n_layers: int) -> float:
    """GPT-2's initialisation scales the projections that write into the residual stream by
    1/sqrt(2 n_layers) (two per block), so that the stream's variance does not grow with depth."""
    return std * (1 / math.sqrt(2 * n_layers))
