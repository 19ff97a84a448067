"""Autoregressive sampling with a KV cache, for both models."""
from __future__ import annotations

import torch

from .tokenizer import EOT_ID, decode, encode


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             seed: int | None = None, eos_id: int | None = None, use_cache: bool = True) -> torch.Tensor:
    """Extend `prompt_ids` (a list or a (batch, seq) tensor) by `max_new_tokens` tokens (fewer only
    at `eos_id`). temperature 0 is greedy decoding.

    The model sees at most its last `context_length` tokens: past that the window slides, as in
    LLMs-from-scratch's `generate`. A sliding window shifts every position, so the KV cache, whose
    keys were computed at the old positions (learned ones for GPT-2, rotated ones for RoPE), is
    rebuilt from the window instead of cropped: the same tokens as recomputing without a cache.
    """
    device = next(model.parameters()).device
    idx = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    if idx.dim() == 1:
        idx = idx.unsqueeze(0)
    if idx.shape[1] == 0:
        raise ValueError("the prompt is empty: give at least one token")
    limit = model.cfg.context_length
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()
    cache, step_input = None, None
    try:
        for _ in range(max_new_tokens):
            if not use_cache:
                logits = model(idx[:, -limit:]).logits
            else:
                if cache is None or cache.length() + step_input.shape[1] > limit:
                    cache, step_input = model.new_cache(), idx[:, -limit:]    # (re)build from the window
                logits = model(step_input, cache=cache).logits
            logits = logits[:, -1, :].float()
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(dim=-1), 1, generator=gen)
            idx = torch.cat([idx, nxt], dim=1)
            step_input = nxt
            if eos_id is not None and bool((nxt == eos_id).all()):
                break
    finally:
        model.train(was_training)
    return idx


DEFAULT_SAMPLE_SETTINGS = (
    {"name": "greedy", "temperature": 0.0, "top_k": None},
    {"name": "t0.7_k40", "temperature": 0.7, "top_k": 40},
    {"name": "t1.0_k200", "temperature": 1.0, "top_k": 200},
)


def generate_text(model, prompt: str, max_new_tokens: int = 50, temperature: float = 0.0,
                  top_k: int | None = None, seed: int | None = 123) -> str:
    ids = generate(model, encode(prompt), max_new_tokens, temperature, top_k, seed, eos_id=EOT_ID)
    return decode(ids[0].tolist())


def sample_generations(model, prompt: str = "lisboa", max_new_tokens: int = 50, seed: int = 123,
                       settings=DEFAULT_SAMPLE_SETTINGS) -> list[dict]:
    """The same prompt under several decoding settings, each seeded, for the reports."""
    return [{**s, "prompt": prompt, "seed": seed, "max_new_tokens": max_new_tokens,
             "text": generate_text(model, prompt, max_new_tokens, s["temperature"], s["top_k"], seed)}
            for s in settings]
