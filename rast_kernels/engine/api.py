"""``rast_generate``: one call from the models (ids, paths or loaded models) to generated text, with a small cache of
engines keyed by the models and every engine setting."""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from typing import Optional

import torch

from .config import FIELDS as CONFIG_FIELDS
from .config import EngineConfig
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


def rast_generate(prompts, *, base, expert=None, expert_base=None, config: Optional[EngineConfig] = None,
                  **kwargs):
    """Generate with RAST: ``z = z_base + alpha * (z_expert - z_expert_base)`` at every step.

    Builds a :class:`RastEngine` from ``base``, ``expert``, ``expert_base`` (model ids, local paths or
    loaded ``PreTrainedModel`` objects; ``expert`` / ``expert_base`` may be lists of K for K pairs, and
    ``alpha`` then a number or a list of K weights) and the engine settings: ``config`` (an
    :class:`~.config.EngineConfig`) and/or any of its fields as keywords (``max_batch_size``, ``max_seq_len``,
    ``speculative_tokens``, ...: every engine setting, under the engine's names), caches it (the last two
    distinct configurations; keyed by the model paths / object identities and the settings) and calls
    :meth:`RastEngine.generate` with ``prompts`` and the other keywords (``sampling_params``, or ``alpha``,
    ``base_plausibility``, ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``max_new_tokens``, ``stop``,
    ``eos_token_id``, ``n``, ``return_logprobs``; and ``seed``, ``progress``).

    Returns ``list[GenerationOutput]``, one per (prompt, sample), prompt-major (``[]`` for an empty list).
    """
    settings = {k: kwargs.pop(k) for k in list(kwargs) if k in CONFIG_FIELDS}
    engine = get_engine(base, expert, expert_base, config=config, **settings)
    return engine.generate(prompts, **kwargs)


def get_engine(base, expert=None, expert_base=None, config: Optional[EngineConfig] = None, **settings) -> RastEngine:
    """The cached :class:`RastEngine` for these models and settings (built on first use)."""
    cfg = (config or EngineConfig()).replace(**settings)
    key = (_model_key(base), _model_key(expert), _model_key(expert_base),
           tuple((name, _settings_key(getattr(cfg, name))) for name in CONFIG_FIELDS))
    with _lock:
        engine = _engines.get(key)
        if engine is not None:
            _engines.move_to_end(key)
            return engine
    engine = RastEngine(base, expert, expert_base, config=cfg)
    with _lock:
        _engines[key] = engine
        while len(_engines) > _ENGINE_CACHE_SIZE:
            _engines.popitem(last=False)
    return engine


def clear_engine_cache() -> None:
    """Drop the engines :func:`rast_generate` cached (frees their KV caches)."""
    with _lock:
        _engines.clear()
