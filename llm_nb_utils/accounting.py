"""Parameter and FLOP accounting for both models, and bits per byte; used by reports and benchmarks.

FLOPs per token (training, forward + backward) follow PaLM's appendix B:

    6 * N_matmul + 12 * n_layers * n_heads * head_dim * context_length

N_matmul counts the weights that take part in a matrix product for one token: every linear layer
(the LM head included, tied or not), the dense SwiGLU's three matrices, the router, and only the `num_experts_per_token` experts a
token is routed to. Embedding look-ups and norms are not matrix products and are left out. The
second term is attention's QK^T and AV, counted over the full context (not halved for the mask).
"""
from __future__ import annotations

import math

import torch.nn as nn

from .moe import MoEFeedForward
from .qwen3 import SwiGLUFeedForward


def _unique_params(model: nn.Module):
    return {id(p): p for p in model.parameters()}.values()


def count_params(model: nn.Module) -> dict:
    """Total parameters (a tied head counted once) and parameters active for one token."""
    total = sum(p.numel() for p in _unique_params(model))
    inactive = 0
    for m in model.modules():
        if isinstance(m, MoEFeedForward):
            inactive += (m.num_experts - m.top_k) * m.experts.params_per_expert()
    return {"total_params": total, "active_params": total - inactive}


def matmul_params_per_token(model: nn.Module) -> int:
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            n += m.weight.numel()
        elif isinstance(m, SwiGLUFeedForward):        # weights stored as parameters, not Linear layers
            n += m.w_gate.numel() + m.w_up.numel() + m.w_down.numel()
        elif isinstance(m, MoEFeedForward):     # the router scores every expert; k experts run
            n += m.router.weight.numel() + m.top_k * m.experts.params_per_expert()
    return n


def flops_per_token(model: nn.Module) -> int:
    cfg = model.cfg
    return 6 * matmul_params_per_token(model) + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * cfg.context_length


def model_summary(model: nn.Module) -> dict:
    return {**count_params(model), "flops_per_token": flops_per_token(model)}


def bits_per_byte(loss: float, tokens: int, text_bytes: int) -> float:
    """A next-token loss (nats per token) as bits per UTF-8 byte of the text: loss / ln 2 x tokens /
    bytes. Unlike perplexity it does not depend on the tokenizer, so runs with other vocabularies
    (and other studies) compare on it."""
    return loss / math.log(2) * tokens / text_bytes
