"""Autoregressive sampling with a KV cache, for both models."""
from __future__ import annotations

import warnings

import torch

from .tokenizer import EOT_ID, decode, encode


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             seed: int | None = None, eos_id: int | None = None, use_cache: bool = True) -> torch.Tensor:
    """Extend `prompt_ids` (a list or a (batch, seq) tensor) by up to `max_new_tokens` tokens.

    temperature 0 is greedy decoding. Generation stops early at `eos_id`, and at the model's
    context length, with a warning: GPT-2's learned positions end there, so we stop rather than
    slide the window, for both models alike.
    """
    device = next(model.parameters()).device
    idx = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    if idx.dim() == 1:
        idx = idx.unsqueeze(0)
    if idx.shape[1] == 0:
        raise ValueError("the prompt is empty: give at least one token")
    limit = model.cfg.context_length
    if idx.shape[1] > limit:
        raise ValueError(f"the prompt has {idx.shape[1]} tokens, more than context_length={limit}")
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    was_training = model.training
    model.eval()
    cache = model.new_cache() if use_cache else None
    step_input = idx
    try:
        for _ in range(max_new_tokens):
            if idx.shape[1] >= limit:
                warnings.warn(f"generation stopped at the context length ({limit} tokens)", stacklevel=2)
                break
            logits = model(step_input if use_cache else idx, cache=cache).logits[:, -1, :].float()
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
