"""Mixture-of-Experts feed-forward (Qwen3-MoE style): top-k routing over SwiGLU experts."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MoEFeedForward(nn.Module):
    """A router picks `top_k` of `num_experts` SwiGLU experts per token; outputs are mixed by weight.

    Routing runs in fp32 even under autocast: in bf16, near-tied top-2 scores flip and change the
    output. Dispatch sorts the (token, expert) assignments by expert so that each expert runs one
    matrix product over exactly its own tokens; no expert ever sees a token it was not chosen for.

    After each forward, `aux_loss` holds the Switch/GShard load-balancing loss
    (num_experts * sum_e fraction_of_assignments_e * mean_router_prob_e; 1.0 when balanced) and
    `expert_counts` the number of assignments per expert.
    """

    def __init__(self, emb_dim: int, hidden_dim: int, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.router = nn.Linear(emb_dim, num_experts, bias=False)
        # Experts stacked in three tensors (expert, in, out): one parameter per role, not per expert.
        self.w_gate = nn.Parameter(torch.empty(num_experts, emb_dim, hidden_dim))
        self.w_up = nn.Parameter(torch.empty(num_experts, emb_dim, hidden_dim))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden_dim, emb_dim))
        for w in (self.w_gate, self.w_up, self.w_down):
            nn.init.normal_(w, std=0.02)
        self.aux_loss = torch.zeros(())
        self.expert_counts = torch.zeros(num_experts, dtype=torch.long)

    def extra_repr(self) -> str:
        e, d, h = self.w_gate.shape
        return f"experts={e} x SwiGLU({d} -> {h} -> {d}), top_k={self.top_k}"

    def route(self, flat: torch.Tensor):
        """Router probabilities (N, E) in fp32, chosen experts (N, k) and their renormalised weights."""
        with torch.autocast(device_type=flat.device.type, enabled=False):
            probs = F.linear(flat.float(), self.router.weight.float()).softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        return probs, experts, weights / weights.sum(dim=-1, keepdim=True)

    @staticmethod
    def swiglu(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
        return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        probs, experts, weights = self.route(flat)

        assignments = experts.flatten()                       # (N*k,) expert of each assignment
        counts = torch.bincount(assignments, minlength=self.num_experts)
        order = assignments.argsort(stable=True)              # assignments grouped by expert
        token_of = order // self.top_k
        rows = flat[token_of]
        # unbind, not w[e]: the backward of E slices would zero-fill and add E full-size gradients.
        experts_w = zip(self.w_gate.unbind(0), self.w_up.unbind(0), self.w_down.unbind(0))
        outs, start = [], 0
        for n, (w_gate, w_up, w_down) in zip(counts.tolist(), experts_w):   # the one host sync
            if n:
                outs.append(self.swiglu(rows[start:start + n], w_gate, w_up, w_down))
                start += n
        mixed = torch.cat(outs) * weights.flatten()[order].unsqueeze(-1).to(outs[0].dtype)
        out = torch.zeros_like(flat).index_add_(0, token_of, mixed.to(flat.dtype))

        fraction = counts.float() / assignments.numel()
        self.aux_loss = self.num_experts * (fraction * probs.mean(dim=0)).sum()
        self.expert_counts = counts.detach()
        return out.view(shape)
