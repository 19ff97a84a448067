"""Mixture-of-Experts feed-forward (Qwen3-MoE style): a router picks top-k SwiGLU experts per token.

Three pieces, as in torchtitan's MoE:
- `Router`: each token's probabilities over the experts, the k it goes to, their renormalised weights.
- `GroupedExperts`: the experts' weights, stacked one tensor per role, and the product that runs
  every expert on exactly its own tokens (one grouped product where this torch has one, else a loop).
- `MoEFeedForward`: route, dispatch, mix; returns the output and the layer's `Routing` statistics.

The load-balancing loss is not computed inside the layer: `balancing_loss` takes every layer's
`Routing` where the training step knows the process group, so under DDP the shares are the global
batch's without anyone patching the model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import swiglu

# torch >= 2.8 has a grouped matrix product: one call runs every expert on its own slice of rows,
# the slices given by offsets that stay on the device.
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_MM_WORKS: dict = {}


def _constant_under_compile(fn):
    # torch.compile runs it while tracing and keeps the answer, instead of tracing the probe.
    assume = getattr(getattr(torch, "compiler", None), "assume_constant_result", None)
    return assume(fn) if assume else fn


@_constant_under_compile
def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the grouped product runs, forward and backward, for `dtype` on `device`.

    Support depends on the torch build, the GPU (CUDA needs bf16 on compute capability >= 8.0 in
    the builds we know) and the dtype, so instead of a table it is tried once, on a tiny problem
    with an empty group, against per-group products.
    """
    key = (str(device), dtype)
    if key not in _GROUPED_MM_WORKS:
        _GROUPED_MM_WORKS[key] = _GROUPED_MM is not None and _grouped_mm_matches_loop(device, dtype)
    return _GROUPED_MM_WORKS[key]


# The first MoE forward may come under no_grad (evaluation, generation): the probe needs autograd.
@torch.inference_mode(False)
@torch.enable_grad()
def _grouped_mm_matches_loop(device: torch.device, dtype: torch.dtype) -> bool:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 16, generator=g).to(device, dtype).requires_grad_()
    w = torch.randn(3, 16, 8, generator=g).to(device, dtype).requires_grad_()
    offs = torch.tensor([8, 8, 24], dtype=torch.int32, device=device)
    try:
        y = _GROUPED_MM(x, w, offs=offs)
        grad_x, grad_w = torch.autograd.grad(y, (x, w), torch.ones_like(y))
    except (RuntimeError, TypeError, NotImplementedError, ValueError):
        return False
    ref = torch.cat([x[:8] @ w[0], x[8:] @ w[2]])
    ref_x, ref_w = torch.autograd.grad(ref, (x, w), torch.ones_like(ref))
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    return all(torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)
               for a, b in ((y, ref), (grad_x, ref_x), (grad_w, ref_w)))


@dataclass
class Routing:
    """What one MoE layer's router did in a forward pass."""
    counts: torch.Tensor        # (E,) assignments per expert (k per token)
    mean_probs: torch.Tensor    # (E,) router probability per expert, averaged over the tokens


class Router(nn.Module):
    """Scores every expert for every token, keeps the top k and renormalises their weights.

    Runs in fp32 even under autocast: in bf16, near-tied top-2 scores flip and change the output."""

    def __init__(self, emb_dim: int, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.weight = nn.Parameter(torch.empty(num_experts, emb_dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))     # nn.Linear's default, until the model's init

    def forward(self, flat: torch.Tensor):
        """Probabilities (N, E) in fp32, chosen experts (N, k) and their weights (N, k), summing to 1."""
        with torch.autocast(device_type=flat.device.type, enabled=False):
            probs = F.linear(flat.float(), self.weight.float()).softmax(dim=-1)
        weights, experts = probs.topk(self.top_k, dim=-1)
        return probs, experts, weights / weights.sum(dim=-1, keepdim=True)


class GroupedExperts(nn.Module):
    """`num_experts` SwiGLU feed-forwards stacked in three tensors (expert, in, out): one parameter
    per role, not per expert. `forward(rows, counts)` takes rows sorted by expert, `counts[e]` of
    them for expert e, and runs each expert on its own rows only."""

    def __init__(self, emb_dim: int, hidden_dim: int, num_experts: int):
        super().__init__()
        self.num_experts = num_experts
        self.w_gate = nn.Parameter(torch.empty(num_experts, emb_dim, hidden_dim))
        self.w_up = nn.Parameter(torch.empty(num_experts, emb_dim, hidden_dim))
        self.w_down = nn.Parameter(torch.empty(num_experts, hidden_dim, emb_dim))
        self.init_weights(0.02, 0.02)     # usable alone; a model re-initialises it with its own scheme

    def init_weights(self, std: float, residual_std: float) -> None:
        nn.init.normal_(self.w_gate, std=std)
        nn.init.normal_(self.w_up, std=std)
        nn.init.normal_(self.w_down, std=residual_std)    # writes into the residual stream

    def extra_repr(self) -> str:
        e, d, h = self.w_gate.shape
        return f"{e} x SwiGLU({d} -> {h} -> {d})"

    def params_per_expert(self) -> int:
        return (self.w_gate.numel() + self.w_up.numel() + self.w_down.numel()) // self.num_experts

    def forward(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype(rows)
        if self.uses_grouped_mm(rows.device, dtype):
            return self._grouped(rows, counts, dtype)
        return self._loop(rows, counts)

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """What autocast would multiply in; the grouped product is cast by hand, not by autocast."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

    def uses_grouped_mm(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether a forward on `device`, multiplying in `dtype`, runs the experts as one grouped product."""
        aligned = all(n * dtype.itemsize % 16 == 0 for n in self.w_down.shape[1:])   # kernels' stride rule
        return aligned and grouped_mm_supported(device, dtype)

    def _grouped(self, rows: torch.Tensor, counts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # All experts in one call per weight, offsets on the device: the host never waits.
        matmul = partial(_GROUPED_MM, offs=counts.cumsum(0).to(torch.int32))
        return swiglu(rows.to(dtype), *(w.to(dtype) for w in (self.w_gate, self.w_up, self.w_down)), matmul=matmul)

    def _loop(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # unbind, not w[e]: the backward of E slices would zero-fill and add E full-size gradients.
        experts_w = zip(self.w_gate.unbind(0), self.w_up.unbind(0), self.w_down.unbind(0))
        outs, start = [], 0
        for n, (w_gate, w_up, w_down) in zip(counts.tolist(), experts_w):   # the one host sync
            if n:
                outs.append(swiglu(rows[start:start + n], w_gate, w_up, w_down))
                start += n
        return torch.cat(outs)


class MoEFeedForward(nn.Module):
    """Route each token to `top_k` of `num_experts` SwiGLU experts; mix their outputs by weight.

    Dispatch sorts the (token, expert) assignments by expert so that each expert runs one matrix
    product over exactly its own tokens; no expert ever sees a token it was not chosen for.
    `forward` returns the output and the layer's `Routing` (assignments and mean probabilities)."""

    def __init__(self, emb_dim: int, hidden_dim: int, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        router = Router(emb_dim, num_experts, top_k)
        # Experts registered first: their weights come first in the parameter order (the order the
        # model's initialisation draws them in, and that of the optimizer's state in checkpoints).
        self.experts = GroupedExperts(emb_dim, hidden_dim, num_experts)
        self.router = router

    def init_weights(self, std: float, residual_std: float) -> None:
        self.experts.init_weights(std, residual_std)
        nn.init.normal_(self.router.weight, std=std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        probs, experts, weights = self.router(flat)

        assignments = experts.flatten()                       # (N*k,) expert of each assignment
        # scatter_add_, not bincount: on a GPU bincount reads its maximum back to the host.
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=flat.device)
        counts.scatter_add_(0, assignments, torch.ones_like(assignments))
        order = assignments.argsort(stable=True)              # assignments grouped by expert
        token_of = order // self.top_k
        expert_out = self.experts(flat[token_of], counts)
        mixed = expert_out * weights.flatten()[order].unsqueeze(-1).to(expert_out.dtype)
        out = torch.zeros_like(flat).index_add_(0, token_of, mixed.to(flat.dtype))
        return out.view(shape), Routing(counts, probs.mean(dim=0))


def balancing_loss(routing: list[Routing], reduce=None) -> torch.Tensor:
    """The Switch/GShard load-balancing loss, averaged over layers: for each layer
    num_experts x sum_e (share of assignments to e) x (mean router probability of e); 1.0 when
    balanced, up to E/k when collapsed. `reduce` (e.g. `Dist.mean_`) turns this rank's shares into
    the global batch's, so that the gradient DDP averages is the one-process gradient."""
    aux = torch.zeros((), device=routing[0].counts.device)
    for r in routing:
        fraction = r.counts.float() / r.counts.sum()
        if reduce is not None:
            fraction = reduce(fraction)
        aux = aux + len(r.counts) * (fraction * r.mean_probs).sum()
    return aux / len(routing)
