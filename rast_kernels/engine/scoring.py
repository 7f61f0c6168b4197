"""Scoring a token sequence under RAST's combined distribution: the one home of that computation.

:func:`combined_logprobs` runs one full-sequence forward per distinct model and returns, for every position, the
log-probabilities of the next token under

    ``log_softmax(z_base + sum_i alpha_i * (z_expert_i - z_expert_base_i))``

over the real vocabulary (the first ``vocab_size`` logit columns: ``len(tokenizer)``; padded columns beyond it are
never candidates). It is what the lm-eval adapter's ``loglikelihood`` sums and what the HTTP server's ``echo``
reports as prompt log-probabilities, so the two agree by construction.

Invariants: roles are named as the engine names them (:func:`~rast_kernels.engine.loading.role_names`: ``base``;
``expert`` / ``expert_base`` for one pair; ``expert[i]`` / ``expert_base[i]`` for several); the combination is
done in float32 on the base model's device, each model's logits cast to float32 first; a model object given under
several roles runs once. No sampling filter, temperature or cache is involved: a plain causal forward from
position 0, without a KV cache, under ``torch.no_grad``. Not thread-safe with an engine stepping the same models:
callers serialise (the server scores on its engine-loop thread).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from .loading import role_names


def combined_logprobs(models_by_role: Mapping[str, torch.nn.Module], token_ids: Sequence[int],
                      alphas: Sequence[float], vocab_size: int) -> torch.Tensor:
    """``[len(token_ids), vocab_size]`` float32 log-probabilities of the token after each position (row ``t`` is
    the distribution of token ``t + 1`` given ``token_ids[:t + 1]``), on the base model's device.

    ``models_by_role``: causal LMs (``model(input_ids=[1, L]).logits`` is ``[1, L, >= vocab_size]``) keyed by the
    roles of ``role_names(len(alphas))``; ``alphas``: one weight per expert pair (empty: the base alone)."""
    roles = role_names(len(alphas))
    missing = [r for r in roles if r not in models_by_role]
    if missing:
        raise ValueError(f"models_by_role: no model for role(s) {missing} ({len(alphas)} expert pair(s) need "
                         f"{list(roles)})")
    if len(token_ids) == 0:
        raise ValueError("token_ids: empty (score at least one position)")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size: expected an int >= 1, got {vocab_size!r}")
    base_dev = next(models_by_role["base"].parameters()).device
    logits, by_model = {}, {}
    with torch.no_grad():
        for role in roles:
            model = models_by_role[role]
            if id(model) not in by_model:  # e.g. expert_base is the base model itself: one forward
                dev = next(model.parameters()).device
                out = model(input_ids=torch.tensor([list(token_ids)], device=dev), use_cache=False).logits
                if out.shape[-1] < vocab_size:
                    raise ValueError(f"vocab_size: {vocab_size} exceeds the {role} model's {out.shape[-1]} logits")
                by_model[id(model)] = out[0, :, :vocab_size].float().to(base_dev)
            logits[role] = by_model[id(model)]
        z = logits["base"]
        for i, alpha in enumerate(alphas):
            expert, expert_base = roles[1 + 2 * i], roles[2 + 2 * i]
            z = z + float(alpha) * (logits[expert] - logits[expert_base])
        return torch.log_softmax(z, dim=-1)
