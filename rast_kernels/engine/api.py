"""``rast_generate``: one call from three models (ids, paths or loaded models) to generated text."""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Optional

import torch

from .engine import RastEngine

_ENGINE_CACHE_SIZE = 2  # engines hold preallocated KV caches: keep few
_engines: "OrderedDict[tuple, RastEngine]" = OrderedDict()
_lock = threading.Lock()


def _model_key(spec):
    if isinstance(spec, (list, tuple)):  # K expert pairs
        return ("pairs",) + tuple(_model_key(m) for m in spec)
    if isinstance(spec, (str, os.PathLike)):
        return ("path", os.fspath(spec))
    return ("object", id(spec))  # the cached engine holds the object, so the id stays valid


def _settings_key(value):
    if isinstance(value, dict):
        return tuple(sorted((k, str(v)) for k, v in value.items()))
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, (torch.device, torch.dtype)) or value is None or isinstance(value, (bool, int)):
        return str(value)
    return ("object", id(value))


def rast_generate(prompts, *, base, expert, expert_base, tokenizer=None, dtype=None, devices=None,
                  max_batch_size: int = 8, max_seq_len: int = 4096, kv_cache_tokens: Optional[int] = None,
                  block_size: int = 16, use_cuda_graph: bool = True, attn_implementation: Optional[str] = None,
                  fused_decode: Optional[bool] = None, overlap_models: bool = False, **generate_kwargs):
    """Generate with RAST: ``z = z_base + alpha * (z_expert - z_expert_base)`` at every step.

    Builds a :class:`RastEngine` from ``base``, ``expert``, ``expert_base`` (model ids, local paths or
    loaded ``PreTrainedModel`` objects; ``expert`` / ``expert_base`` may be lists of K for K pairs, and
    ``alpha`` then a number or a list of K weights) and the engine settings (``tokenizer``, ``dtype``, ``devices``,
    ``max_batch_size``, ``max_seq_len``, ``kv_cache_tokens``, ``block_size``, ``use_cuda_graph``,
    ``attn_implementation``, ``fused_decode``, ``overlap_models``), caches it (the last two distinct
    configurations; keyed by the model paths / object identities and the settings) and calls
    :meth:`RastEngine.generate` with ``prompts`` and ``generate_kwargs`` (``sampling_params``, or ``alpha``,
    ``base_plausibility``, ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``max_new_tokens``, ``stop``, ``eos_token_id``, ``n``,
    ``return_logprobs``; and ``seed``, ``progress``).

    Returns ``list[GenerationOutput]``, one per (prompt, sample), prompt-major (``[]`` for an empty list).
    """
    engine = get_engine(base, expert, expert_base, tokenizer=tokenizer, dtype=dtype, devices=devices,
                        max_batch_size=max_batch_size, max_seq_len=max_seq_len, kv_cache_tokens=kv_cache_tokens,
                        block_size=block_size, use_cuda_graph=use_cuda_graph,
                        attn_implementation=attn_implementation, fused_decode=fused_decode,
                        overlap_models=overlap_models)
    return engine.generate(prompts, **generate_kwargs)


def get_engine(base, expert, expert_base, **settings) -> RastEngine:
    """The cached :class:`RastEngine` for these models and settings (built on first use)."""
    key = (_model_key(base), _model_key(expert), _model_key(expert_base),
           tuple(sorted((k, _settings_key(v)) for k, v in settings.items())))
    with _lock:
        engine = _engines.get(key)
        if engine is not None:
            _engines.move_to_end(key)
            return engine
    engine = RastEngine(base, expert, expert_base, **settings)
    with _lock:
        _engines[key] = engine
        while len(_engines) > _ENGINE_CACHE_SIZE:
            _engines.popitem(last=False)
    return engine


def clear_engine_cache() -> None:
    """Drop the engines :func:`rast_generate` cached (frees their KV caches)."""
    with _lock:
        _engines.clear()
