"""Next-token cross-entropy fused with the LM head, computed a chunk of positions at a time.

With a 50257-token vocabulary the logits of a batch of 8 x 256 are 2048 x 50257: 206 MB in bf16,
411 MB in fp32, and as much again for their gradient, while half of all the model's FLOPs sit in
this one product. Here each chunk's logits are formed, turned into the loss and into the gradients
of the hidden states and of the head (softmax - one-hot), then dropped; backward only scales the
stored gradients. Same maths as `F.cross_entropy(h @ W.T, targets)`, a fraction of the memory, and
no separate log-softmax backward pass.
"""
from __future__ import annotations

import torch

_CHUNK_ELEMENTS = 2 ** 26   # logits per chunk (256 MB in fp32)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        n = h.shape[0]
        rows = max(1, _CHUNK_ELEMENTS // weight.shape[0])
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, n, rows):
            hc, tc = h[s:s + rows], targets[s:s + rows]
            logits = (hc @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
            grad = logits.sub_(lse[:, None]).exp_()               # softmax, in place
            grad[torch.arange(len(tc), device=h.device), tc] -= 1.0
            # The 1/n of the mean is applied after the products, in fp32: under fp16 autocast,
            # (softmax - one-hot) / n would underflow for most of the vocabulary, and these
            # gradients are computed here, outside the GradScaler's scaling.
            grad_h[s:s + rows] = ((grad @ weight).float() / n).to(h.dtype)
            grad_w += (grad.t() @ hc).float() / n
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean over rows of cross_entropy(h @ weight.T, targets); h (N, D), weight (V, D), targets (N,)."""
    return _LinearCrossEntropy.apply(h, weight, targets)
