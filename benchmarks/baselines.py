"""Baselines the benchmarks compare ``rast_kernels.rast_sample`` with: what public code does.

* :func:`hf_chain_sample` (and :func:`hf_sample` for one model's logits): the chain of separate
  PyTorch ops that RAST / proxy-tuning code runs per
  step, the way Hugging Face ``generate`` warpers do it: fp32 combine (one expert pair or K, the official
  RAST code's several-pair form), ``/ T``, top-k by ``topk``
  threshold, sort-based top-p (ascending sort, softmax, cumsum, drop the low tail whose mass is
  ``<= 1 - p``, scatter back; like transformers' ``TopPLogitsWarper``), min-p, softmax,
  ``torch.multinomial``.
* :func:`flashinfer_sample`: FlashInfer's ``top_k_top_p_sampling_from_logits`` after an unfused fp32
  combine, when ``flashinfer`` is importable.

These are timing baselines: they draw from the same filtered distribution as ``rast_sample`` up to
tie handling at the top-p boundary (the HF warper breaks ties by sort order), not the same tokens.
"""
from __future__ import annotations

import math

import torch


def _pairs(expert_logits, expert_base_logits) -> tuple[list, list]:
    """``(experts, expert_bases)`` as lists of K >= 1 tensors (a plain tensor pair is K = 1)."""
    if not isinstance(expert_logits, (list, tuple)):
        expert_logits, expert_base_logits = [expert_logits], [expert_base_logits]
    if not isinstance(expert_base_logits, (list, tuple)) or len(expert_base_logits) != len(expert_logits) \
            or not expert_logits:
        raise ValueError("expert_base_logits: expected as many tensors as expert_logits (K >= 1)")
    return list(expert_logits), list(expert_base_logits)


def combine_unfused(base_logits: torch.Tensor, expert_logits, expert_base_logits, alpha,
                    vocab_size: int) -> torch.Tensor:
    """``base + alpha * (expert - expert_base)`` in fp32 over ``[0, vocab_size)`` as separate ops
    (cast, sub, mul, add), like public RAST code after truncating to the narrowest vocabulary.
    ``expert_logits`` / ``expert_base_logits`` may be sequences of K tensors: ``base + sum_i alpha_i *
    (expert_i - expert_base_i)``, one term added at a time (each a separate sub, mul, add); ``alpha`` is
    then one number for every pair or K numbers. Inputs ``[B, V_*]`` any float dtype; returns fp32
    ``[B, vocab_size]``."""
    experts, expert_bases = _pairs(expert_logits, expert_base_logits)
    alphas = list(alpha) if isinstance(alpha, (list, tuple)) else [alpha] * len(experts)
    if len(alphas) != len(experts):
        raise ValueError(f"alpha: expected {len(experts)} weights (one per pair), got {len(alphas)}")
    z = base_logits[:, :vocab_size].float()
    for a, e, eb in zip(alphas, experts, expert_bases):
        z = z + a * (e[:, :vocab_size].float() - eb[:, :vocab_size].float())
    return z


def narrowest(base_logits: torch.Tensor, expert_logits, expert_base_logits) -> int:
    """The narrowest logits width over all the inputs (the default ``vocab_size``)."""
    experts, expert_bases = _pairs(expert_logits, expert_base_logits)
    return min(t.shape[1] for t in (base_logits, *experts, *expert_bases))


def top_p_filter(scores: torch.Tensor, top_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Sort-based nucleus filter on fp32 ``scores [B, V]``: a new tensor with the dropped tail at -inf."""
    sorted_logits, sorted_idx = torch.sort(scores, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1.0 - top_p)
    drop_sorted[:, -min_tokens_to_keep:] = False  # the most probable tokens always stay
    drop = drop_sorted.scatter(1, sorted_idx, drop_sorted)
    return scores.masked_fill(drop, -math.inf)


def top_k_filter(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` highest scores of each row (ties with the k-th kept), the rest -inf."""
    kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
    return scores.masked_fill(scores < kth, -math.inf)


def min_p_filter(scores: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times the row's highest probability."""
    probs = scores.softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    return scores.masked_fill(probs < threshold, -math.inf)


def hf_sample(scores: torch.Tensor, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
              min_p: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Hugging Face ``generate``-style sampling of fp32 ``scores [B, V]``: ``/ T``, top-k, top-p, min-p
    warpers (each skipped when off: ``top_k <= 0``, ``top_p >= 1``, ``min_p == 0``), softmax,
    ``torch.multinomial``. ``temperature == 0`` is greedy (argmax). Returns int64 ``[B]``."""
    if temperature == 0:
        return scores.argmax(dim=-1)
    if temperature != 1.0:
        scores = scores / temperature
    if 0 < top_k < scores.shape[-1]:
        scores = top_k_filter(scores, top_k)
    if top_p < 1.0:
        scores = top_p_filter(scores, top_p)
    if min_p > 0:
        scores = min_p_filter(scores, min_p)
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


def hf_chain_sample(base_logits: torch.Tensor, expert_logits, expert_base_logits, *, alpha=1.0,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                    vocab_size: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One RAST sampling step as a chain of PyTorch ops: :func:`combine_unfused` then :func:`hf_sample`.

    Inputs ``[B, V_*]`` (fp32/bf16/fp16, one device), or sequences of K expert / expert-base tensors;
    scalar parameters (``alpha``: also K numbers); returns int64 ``[B]``.
    """
    if vocab_size is None:
        vocab_size = narrowest(base_logits, expert_logits, expert_base_logits)
    scores = combine_unfused(base_logits, expert_logits, expert_base_logits, alpha, vocab_size)
    return hf_sample(scores, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, generator=generator)


def flashinfer_available() -> bool:
    """True when ``flashinfer.sampling`` imports (it JIT-compiles its kernels on first use)."""
    try:
        import flashinfer.sampling  # noqa: F401
    except Exception:  # an installed but broken flashinfer (no nvcc, wrong torch) counts as absent
        return False
    return True


def flashinfer_sample(base_logits: torch.Tensor, expert_logits, expert_base_logits, *, alpha=1.0,
                      temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      vocab_size: int | None = None) -> torch.Tensor:
    """Unfused fp32 combine (one pair or K, as :func:`combine_unfused`) and ``/ T``, then FlashInfer's
    ``top_k_top_p_sampling_from_logits`` (CUDA only). ``top_k <= 0`` is passed as ``vocab_size`` (off).
    Returns FlashInfer's int32 ``[B]`` ids."""
    import flashinfer.sampling

    if vocab_size is None:
        vocab_size = narrowest(base_logits, expert_logits, expert_base_logits)
    scores = combine_unfused(base_logits, expert_logits, expert_base_logits, alpha, vocab_size)
    if temperature != 1.0:
        scores = scores / temperature
    k = top_k if 0 < top_k < vocab_size else vocab_size
    return flashinfer.sampling.top_k_top_p_sampling_from_logits(scores, k, top_p)
