"""Mixture-of-Experts feed-forward (Qwen3-MoE style): top-k routing over SwiGLU experts."""
from __future__ import annotations

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


class MoEFeedForward(nn.Module):
    """A router picks `top_k` of `num_experts` SwiGLU experts per token; outputs are mixed by weight.

    Routing runs in fp32 even under autocast: in bf16, near-tied top-2 scores flip and change the
    output. Dispatch sorts the (token, expert) assignments by expert so that each expert runs one
    matrix product over exactly its own tokens; no expert ever sees a token it was not chosen for.
    Where this torch and device have a grouped product (see `grouped_mm_supported`), all experts
    run in one call per weight and nothing is read back to the host, so the host never waits for
    the GPU and torch.compile sees one graph; elsewhere a loop over experts reads the segment sizes
    once.

    After each forward, `aux_loss` holds the Switch/GShard load-balancing loss
    (num_experts * sum_e fraction_of_assignments_e * mean_router_prob_e; 1.0 when balanced) and
    `expert_counts` the number of assignments per expert.
    """

    # Set by the trainer under DDP: averages the assignment shares over ranks (see Trainer.__init__).
    reduce_fraction = None

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        probs, experts, weights = self.route(flat)

        assignments = experts.flatten()                       # (N*k,) expert of each assignment
        # scatter_add_, not bincount: on a GPU bincount reads its maximum back to the host.
        counts = torch.zeros(self.num_experts, dtype=torch.long, device=flat.device)
        counts.scatter_add_(0, assignments, torch.ones_like(assignments))
        order = assignments.argsort(stable=True)              # assignments grouped by expert
        token_of = order // self.top_k
        rows = flat[token_of]
        dtype = self.compute_dtype(rows)
        if self.uses_grouped_mm(rows.device, dtype):
            expert_out = self._experts_grouped(rows, counts, dtype)
        else:
            expert_out = self._experts_loop(rows, counts)
        mixed = expert_out * weights.flatten()[order].unsqueeze(-1).to(expert_out.dtype)
        out = torch.zeros_like(flat).index_add_(0, token_of, mixed.to(flat.dtype))

        fraction = counts.float() / assignments.numel()
        if self.training and self.reduce_fraction is not None:
            fraction = self.reduce_fraction(fraction)      # the global batch's shares under DDP
        self.aux_loss = self.num_experts * (fraction * probs.mean(dim=0)).sum()
        self.expert_counts = counts.detach()
        return out.view(shape)

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """What autocast would multiply in; the grouped product is cast by hand, not by autocast."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

    def uses_grouped_mm(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether a forward on `device`, multiplying in `dtype`, runs the experts as one grouped product."""
        aligned = all(n * dtype.itemsize % 16 == 0 for n in self.w_down.shape[1:])   # kernels' stride rule
        return aligned and grouped_mm_supported(device, dtype)

    def _experts_grouped(self, rows: torch.Tensor, counts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        matmul = partial(_GROUPED_MM, offs=counts.cumsum(0).to(torch.int32))
        return swiglu(rows.to(dtype), *(w.to(dtype) for w in (self.w_gate, self.w_up, self.w_down)),
                           matmul=matmul)

    def _experts_loop(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        # unbind, not w[e]: the backward of E slices would zero-fill and add E full-size gradients.
        experts_w = zip(self.w_gate.unbind(0), self.w_up.unbind(0), self.w_down.unbind(0))
        outs, start = [], 0
        for n, (w_gate, w_up, w_down) in zip(counts.tolist(), experts_w):   # the one host sync
            if n:
                outs.append(swiglu(rows[start:start + n], w_gate, w_up, w_down))
                start += n
        return torch.cat(outs)
