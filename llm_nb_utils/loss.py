"""Next-token cross-entropy fused with the LM head, computed a chunk of positions at a time.

With a 50257-token vocabulary the logits of a batch of 8 x 256 are 2048 x 50257: 206 MB in bf16,
411 MB in fp32, and as much again for their gradient (or for the log-softmax of an evaluation),
while half of all the model's FLOPs sit in this one product. Here each chunk's logits are formed,
turned into the loss and, when training, into the gradients of the hidden states and of the head
(softmax - one-hot), then dropped; backward only scales the stored gradients. Same maths as
`F.cross_entropy(h @ W.T, targets)`, a fraction of the memory, and no separate log-softmax
backward pass.

On a CPU the vocabulary is cut in two: the first 50240 rows of the head (a multiple of 64) in one
product, the last 17 in another. That is what padding the vocabulary to a multiple of 64 would buy
the large product, without padding anything users see; on our 2-core machine it measured faster
than 8192-wide slices and than one 50257-wide product (`benchmarks/lm_head_loss.py`; figures in
the README's Results). A GPU takes the whole vocabulary in one product, not yet measured against
the aligned cut (`benchmarks/gpu_check.sh` runs that comparison). `vocab_block` overrides either.
"""
from __future__ import annotations

import torch

_CHUNK_ELEMENTS = 2 ** 26     # logits per chunk of rows (256 MB in fp32)
_CPU_VOCAB_ALIGN = 64         # a CPU multiplies the largest multiple of 64 of the vocabulary at once


def default_vocab_block(device: torch.device, vocab: int) -> int:
    """Rows of the head per product: 64-aligned on a CPU (50257 -> 50240 + 17), all on a GPU."""
    if device.type == "cpu" and vocab > _CPU_VOCAB_ALIGN:
        return vocab // _CPU_VOCAB_ALIGN * _CPU_VOCAB_ALIGN
    return vocab


def _loss_and_grads(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, with_grads: bool,
                    vocab_block: int | None = None, per_row: torch.Tensor | None = None):
    """(mean loss, d loss/d h, d loss/d weight); the gradients are None unless `with_grads`.
    `per_row`, an fp32 tensor of N values, receives each row's own loss when given."""
    n, vocab = h.shape[0], weight.shape[0]
    rows = max(1, _CHUNK_ELEMENTS // vocab)
    block = vocab_block or default_vocab_block(h.device, vocab)
    slices = [(a, min(a + block, vocab)) for a in range(0, vocab, block)]
    grad_h = torch.empty_like(h) if with_grads else None
    grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if with_grads else None
    # In plain fp32 the products accumulate straight into the gradients (no vocabulary-sized
    # temporary); under autocast they run in the low precision and are added in fp32.
    accumulate = (not torch.is_autocast_enabled(h.device.type)
                  and h.dtype == weight.dtype == torch.float32)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for s in range(0, n, rows):
        hc, tc = h[s:s + rows], targets[s:s + rows]
        logits = [(hc @ weight[a:b].t()).float() for a, b in slices]
        # The target's logit, picked out of its slice without a host sync (no boolean masks).
        target_logit = torch.zeros(len(tc), dtype=torch.float32, device=h.device)
        local = []
        for (a, b), lg in zip(slices, logits):
            inside = (tc >= a) & (tc < b)
            idx = (tc - a).clamp(0, b - a - 1)[:, None]
            target_logit = torch.where(inside, lg.gather(1, idx).squeeze(1), target_logit)
            local.append((inside, idx))
        # Softmax in place, one slice at a time: exp(logit - max) / sum.
        m = torch.stack([lg.amax(dim=-1) for lg in logits]).amax(dim=0)[:, None]
        z = sum(lg.sub_(m).exp_().sum(dim=-1, keepdim=True) for lg in logits)
        total += (m + z.log()).sum() - target_logit.sum()
        if per_row is not None:
            per_row[s:s + rows] = (m + z.log()).squeeze(1) - target_logit
        if not with_grads:
            continue
        gh = torch.zeros(hc.shape, dtype=torch.float32, device=h.device)
        for (a, b), lg, (inside, idx) in zip(slices, logits, local):
            grad = lg.div_(z).scatter_add_(1, idx, -inside[:, None].float())   # softmax - one-hot
            # The 1/n of the mean is applied after the products, in fp32: under fp16 autocast,
            # (softmax - one-hot) / n would underflow for most of the vocabulary, and these
            # gradients are computed here, outside the GradScaler's scaling.
            if accumulate:
                gh.addmm_(grad, weight[a:b])
                grad_w[a:b].addmm_(grad.t(), hc, alpha=1 / n)
            else:
                gh += (grad @ weight[a:b]).float()
                grad_w[a:b].add_((grad.t() @ hc).float(), alpha=1 / n)
        grad_h[s:s + rows] = (gh / n).to(h.dtype)
    return total / n, grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                vocab_block: int | None) -> torch.Tensor:
        loss, grad_h, grad_w = _loss_and_grads(h, weight, targets, True, vocab_block)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_out, grad_w * grad_out, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         vocab_block: int | None = None, reduction: str = "mean") -> torch.Tensor:
    """mean over rows of cross_entropy(h @ weight.T, targets); h (N, D), weight (V, D), targets (N,).

    The vocabulary is multiplied `vocab_block` rows of `weight` at a time (default: see
    `default_vocab_block`). Without gradients (evaluation) only the loss is computed, chunk by chunk
    as in training; reduction="none" (evaluation only) gives each row's loss, in fp32."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', not {reduction!r}")
    if reduction == "none":
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            raise ValueError("reduction='none' is for evaluation: call it under torch.no_grad()")
        rows = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        _loss_and_grads(h, weight, targets, False, vocab_block, per_row=rows)
        return rows
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, targets, vocab_block)
    return _loss_and_grads(h, weight, targets, False, vocab_block)[0]
