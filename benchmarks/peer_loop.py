"""The peer baseline: RAST decoding the way public RAST / proxy-tuning (DExperts) code runs it.

Per token: three eager Hugging Face forwards (base, expert, expert base), each with its own growing
``DynamicCache``; then the Hugging Face-style sampling chain (``baselines.hf_chain_sample``: fp32
combine, temperature, sort-based top-p, softmax, multinomial); then a host sync on the token
(``.tolist()``) to check for EOS, as those loops do. Batches are left padded with attention masks and
position ids from the mask.

This is a timing baseline, not part of the package: :func:`peer_generate` returns the tokens and the
wall-clock time of the prefill and of every decode step.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from rast_kernels.engine.loading import cache_kwarg

from baselines import hf_chain_sample, hf_sample


@dataclass
class PeerResult:
    tokens: list[list[int]]  # generated ids per row, up to and including its EOS
    prefill_s: float  # three prefills and the first token
    step_s: list[float] = field(default_factory=list)  # wall-clock time of each later token (all rows)


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [B, L], attention_mask [B, L])`` with each prompt right-aligned (left padding)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: expected a non-empty list of non-empty token id lists")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _new_cache(model) -> DynamicCache:
    try:
        return DynamicCache(config=model.config)
    except TypeError:  # transformers versions whose DynamicCache takes no config
        return DynamicCache()


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def peer_generate(base, expert, expert_base, prompts: list[list[int]], *, max_new_tokens: int,
                  alpha: float = 1.0, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                  vocab_size: int | None = None, eos_token_id: int | None = None, pad_token_id: int = 0,
                  seed: int = 0) -> PeerResult:
    """Generate up to ``max_new_tokens`` per prompt with the three models in lockstep, eagerly.

    ``prompts``: lists of token ids. All three models must be on one device. ``vocab_size``: real token
    count (default: the narrowest logits width). ``eos_token_id=None`` never stops early. Rows that have
    finished are fed ``pad_token_id`` (as Hugging Face ``generate`` does) until every row has finished.
    """
    def sample(logits, generator):
        return hf_chain_sample(*logits, alpha=alpha, temperature=temperature, top_k=top_k, top_p=top_p,
                               vocab_size=vocab_size, generator=generator)
    return _eager_generate((base, expert, expert_base), sample, prompts, max_new_tokens=max_new_tokens,
                           eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed)


def peer_generate_single(model, prompts: list[list[int]], *, max_new_tokens: int, temperature: float = 1.0,
                         top_k: int = 0, top_p: float = 1.0, eos_token_id: int | None = None,
                         pad_token_id: int = 0, seed: int = 0) -> PeerResult:
    """The same eager loop with one model (its own logits through the HF-style sampler): the cost of
    decoding the base model alone the public way."""
    def sample(logits, generator):
        return hf_sample(logits[0].float(), temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    return _eager_generate((model,), sample, prompts, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                           pad_token_id=pad_token_id, seed=seed)


@torch.inference_mode()
def _eager_generate(models, sample, prompts, *, max_new_tokens: int, eos_token_id, pad_token_id: int,
                    seed: int) -> PeerResult:
    """Lockstep eager decoding of ``models``; ``sample(list of [B, V] last-position logits, generator)``
    returns the ``[B]`` next tokens."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
    device = next(models[0].parameters()).device
    ids, mask = left_pad(prompts, pad_token_id, device)
    caches = [_new_cache(m) for m in models]
    cache_kw = [cache_kwarg(m) for m in models]
    gen = torch.Generator(device=device).manual_seed(seed)
    B = ids.shape[0]

    _sync(device)
    t0 = time.perf_counter()
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    # full-sequence logits at prefill, as the public loops compute them; only the last position is used
    logits = [m(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                **{kw: c}).logits[:, -1, :] for m, c, kw in zip(models, caches, cache_kw)]
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    step_s: list[float] = []
    t_prev, prefill_s = t0, None
    next_pos = position_ids[:, -1:] + 1
    for step in range(max_new_tokens):
        token = sample(logits, gen)
        token = torch.where(unfinished, token, torch.full_like(token, pad_token_id))
        host = token.tolist()  # the per-token host sync of the public loops
        for i in range(B):
            if not done[i]:
                out[i].append(host[i])
                done[i] = host[i] == eos_token_id
        if eos_token_id is not None:
            unfinished &= token != eos_token_id
        now = time.perf_counter()
        if prefill_s is None:
            prefill_s = now - t0
        else:
            step_s.append(now - t_prev)
        t_prev = now
        if step == max_new_tokens - 1 or all(done):
            break
        mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], dim=1)
        logits = [m(input_ids=token[:, None], attention_mask=mask, position_ids=next_pos, use_cache=True,
                    **{kw: c}).logits[:, -1, :] for m, c, kw in zip(models, caches, cache_kw)]
        next_pos = next_pos + 1
    return PeerResult(tokens=out, prefill_s=prefill_s or 0.0, step_s=step_s)
