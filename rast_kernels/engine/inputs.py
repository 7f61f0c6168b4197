"""What callers hand the engine, checked and normalised: prompts to token ids, settings to one
:class:`~.sampling_params.SamplingParams` per prompt with its seed, requests against the engine's limits.

Every error names the argument (``prompts[3]``, ``sampling_params[1]``, ``seed``, a ``SamplingParams`` field) and is
raised before anything is queued. Seed rules (:mod:`.sampling_params`): an int ``seed`` gives prompt ``i`` without a
seed of its own ``mix_seed(seed, i)``; a list gives one int64 seed per prompt, as is.
"""
from __future__ import annotations

import numbers
from typing import List

import torch

from ..ops.philox import mix_seed
from ..params import ParamError
from .sampling_params import FIELDS as PARAM_FIELDS
from .sampling_params import SamplingParams


def normalize_prompts(prompts, tokenizer, vocab_size: int) -> List[List[int]]:
    """str | list[str] | list[int] | list[list[int]] (or a 1-D / 2-D tensor) -> token-id lists (validated)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    elif isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
    if not isinstance(prompts, (list, tuple)):
        raise TypeError(f"prompts: expected a str, a list of str or a list of token-id lists, "
                        f"got {type(prompts).__name__}")
    if len(prompts) and all(isinstance(p, numbers.Integral) and not isinstance(p, bool) for p in prompts):
        prompts = [list(prompts)]  # one prompt given as token ids
    rows = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            ids = list(tokenizer(p, add_special_tokens=True)["input_ids"])
        elif isinstance(p, (list, tuple)):
            for t in p:
                if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                    raise TypeError(f"prompts[{i}]: token ids must be ints, got {type(t).__name__}")
                if not 0 <= t < vocab_size:
                    raise ValueError(f"prompts[{i}]: token id {t} outside [0, {vocab_size})")
            ids = [int(t) for t in p]
        else:
            raise TypeError(f"prompts[{i}]: expected a str or a list of token ids, got {type(p).__name__}")
        if not ids:
            raise ValueError(f"prompts[{i}]: empty prompt (it has no tokens); give at least one token")
        rows.append(ids)
    return rows


def params_list(count: int, sampling_params, seed, kwargs: dict) -> List[tuple]:
    """``[(params, seed)]`` for ``count`` prompts from ``sampling_params`` (one, a list, or None: built from
    ``kwargs``) and the ``seed`` keyword (module docstring)."""
    if sampling_params is None:
        unknown = set(kwargs) - set(PARAM_FIELDS)
        if unknown:
            raise TypeError(f"unexpected keyword(s) {sorted(unknown)}")
        sampling_params = SamplingParams(**kwargs)
    elif kwargs:
        raise TypeError(f"{sorted(kwargs)}: give either sampling_params or these keywords, not both")
    if isinstance(sampling_params, SamplingParams):
        plist = [sampling_params] * count
    elif isinstance(sampling_params, (list, tuple)):
        if len(sampling_params) != count:
            raise ValueError(f"sampling_params: a list needs one SamplingParams per prompt ({count}), "
                             f"got {len(sampling_params)}")
        plist = list(sampling_params)
        for i, p in enumerate(plist):
            if not isinstance(p, SamplingParams):
                raise TypeError(f"sampling_params[{i}]: expected a SamplingParams, got {type(p).__name__}")
    else:
        raise TypeError(f"sampling_params: expected a SamplingParams or a list of them, got "
                        f"{type(sampling_params).__name__}")
    if isinstance(seed, (list, tuple)):
        if len(seed) != count:
            raise ValueError(f"seed: a list needs one seed per prompt ({count}), got {len(seed)}")
        seeds = [SamplingParams(seed=s).seed for s in seed]  # validated as SamplingParams.seed
    else:
        base = SamplingParams(seed=seed).seed
        seeds = [mix_seed(base, i) for i in range(count)]
    return [(p, p.seed if p.seed is not None else s) for p, s in zip(plist, seeds)]


def one_params(sampling_params, kwargs: dict) -> SamplingParams:
    """The settings of one request: a :class:`SamplingParams` or its fields as keywords (not both)."""
    if sampling_params is None:
        return SamplingParams(**kwargs)
    if kwargs:
        raise TypeError(f"{sorted(kwargs)}: give either sampling_params or these keywords, not both")
    if not isinstance(sampling_params, SamplingParams):
        raise TypeError(f"sampling_params: expected a SamplingParams, got {type(sampling_params).__name__}")
    return sampling_params


def check_request(engine, ids: List[int], params: SamplingParams, name: str) -> list:
    """Raise naming ``name`` (the prompt) or the field unless the request fits ``engine`` (its ``max_seq_len``, its
    KV pool for a lone sequence, its expert pairs, its vocabulary); returns the request's EOS ids."""
    if len(ids) + params.max_new_tokens > engine.max_seq_len:
        raise ValueError(f"{name}: {len(ids)} prompt tokens + max_new_tokens={params.max_new_tokens} exceed "
                         f"max_seq_len={engine.max_seq_len}")
    need = engine.scheduler.blocks_to_fit(len(ids) + params.max_new_tokens - 1)
    if need > engine.allocator.num_blocks:
        raise ValueError(f"{name}: {len(ids)} prompt tokens + max_new_tokens={params.max_new_tokens} need {need} "
                         f"KV blocks of {engine.block_size}, the pool has {engine.allocator.num_blocks} "
                         f"(kv_cache_tokens={engine.kv_cache_tokens})")
    if isinstance(params.alpha, tuple):
        if engine.num_pairs == 0:
            raise ParamError("alpha", "a list of weights needs expert pairs; this engine decodes the base alone")
        params.pair_alphas(engine.num_pairs)  # raises on a length mismatch
    eos = engine.default_eos if params.eos_token_id is None else list(params.eos_token_id)
    for e in eos:
        if e >= engine.vocab_size:
            raise ParamError("eos_token_id", f"{e} outside [0, {engine.vocab_size})")
    return eos
