"""Loading the three models and their tokenizer, device placement, and the tokenizer compatibility check."""
from __future__ import annotations

import inspect
import os
from typing import Mapping, Optional

import torch

ROLES = ("base", "expert", "expert_base")
# Attention implementations the engine's 4-D additive masks work with. "rast_decode" is our Triton
# decode-attention kernel (rast_kernels.engine.attention): the engine then also passes each row's valid
# cache range, and prompts still go through SDPA.
SUPPORTED_ATTN = ("sdpa", "eager", "rast_decode")


def prepare_attn_implementation(name: str) -> str:
    """Validate ``name`` and register it with transformers if it is ours."""
    if name not in SUPPORTED_ATTN:
        raise ValueError(f"attn_implementation: must be one of {SUPPORTED_ATTN}, got {name!r}")
    if name == "rast_decode":
        from .attention import register_rast_attention
        register_rast_attention()
    return name


def default_device() -> torch.device:
    """The first GPU if there is one, else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def _parse_device(key: str, value) -> torch.device:
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"devices[{key!r}]: not a device: {value!r} ({exc})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"devices[{key!r}]: {value!r} requested but CUDA is not available")
        index = 0 if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"devices[{key!r}]: {value!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
        dev = torch.device("cuda", index)
    elif dev.type != "cpu":
        raise ValueError(f"devices[{key!r}]: only 'cpu' and 'cuda[:N]' are supported, got {value!r}")
    return dev


def role_names(num_pairs: int) -> tuple:
    """The engine's roles for ``num_pairs`` expert pairs: ``("base",)`` for none, :data:`ROLES` for one, and
    ``base, expert[0], expert_base[0], expert[1], ...`` for several."""
    if num_pairs <= 1:
        return ROLES[:1 + 2 * num_pairs]
    return ("base",) + tuple(f"{r}[{i}]" for i in range(num_pairs) for r in ROLES[1:])


def role_group(role: str) -> str:
    """``expert[1]`` -> ``expert``: the ``devices`` key that applies to every pair."""
    return role.split("[", 1)[0]


def resolve_devices(devices, roles=ROLES) -> dict:
    """``devices``: None (all on :func:`default_device`), one device for every role, or a dict keyed by roles
    (``base``, ``expert``, ``expert_base``; with several pairs also ``expert[i]`` / ``expert_base[i]``, while
    ``expert`` / ``expert_base`` then apply to every pair); missing keys: the default device.
    Returns ``{role: torch.device}`` for ``roles``."""
    if devices is None:
        return {r: default_device() for r in roles}
    if isinstance(devices, (str, torch.device)):
        dev = _parse_device("*", devices)
        return {r: dev for r in roles}
    if not isinstance(devices, Mapping):
        raise TypeError(f"devices: expected None, a device or a dict {{role: device}}, got {type(devices).__name__}")
    allowed = list(dict.fromkeys([*ROLES, *roles]))
    for key in devices:
        if key not in allowed:
            raise ValueError(f"devices: unknown key {key!r}; expected keys among {tuple(allowed)}")
    out = {}
    for r in roles:
        key = r if r in devices else role_group(r)
        out[r] = _parse_device(key, devices[key]) if key in devices else default_device()
    return out


def model_identity(spec) -> tuple:
    """What makes two model specs the same model for the engine (it then runs it once per step): the same
    object, or the same local directory / hub id."""
    if isinstance(spec, (str, os.PathLike)):
        path = os.fspath(spec)
        return ("path", os.path.realpath(path)) if os.path.exists(path) else ("id", path)
    return ("object", id(spec))


def resolve_dtype(dtype, device: torch.device) -> Optional[torch.dtype]:
    """None -> None on CPU (keep the model's dtype; float32 when loading from a path), bfloat16 on CUDA."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else None
    if isinstance(dtype, str):
        try:
            dtype = getattr(torch, dtype)
        except AttributeError:
            raise ValueError(f"dtype: unknown dtype name {dtype!r}") from None
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype: must be float32, bfloat16 or float16, got {dtype}")
    return dtype


def load_model(spec, role: str, device: torch.device, dtype: Optional[torch.dtype],
               attn_implementation: Optional[str]):
    """A model id / local path (loaded with ``AutoModelForCausalLM``; ``HF_HUB_OFFLINE`` is honoured by
    transformers itself) or an already loaded ``PreTrainedModel``, which is moved/cast **in place**.
    Returns the model on ``device`` in eval mode with the attention of
    :func:`choose_attn_implementation` set (read it back from ``model.config._attn_implementation``)."""
    from transformers import AutoModelForCausalLM, PreTrainedModel

    if attn_implementation is not None:
        prepare_attn_implementation(attn_implementation)  # a bad name fails before anything is loaded
    if isinstance(spec, (str, os.PathLike)):
        try:  # transformers' own default here (sdpa, or eager where the class refuses it); ours is set below
            model = AutoModelForCausalLM.from_pretrained(os.fspath(spec), dtype=dtype or torch.float32)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{role}: cannot load a causal LM from {os.fspath(spec)!r}: {exc}") from exc
    elif isinstance(spec, PreTrainedModel):
        model = spec
    else:
        raise TypeError(f"{role}: expected a model id, a local path or a PreTrainedModel, got {type(spec).__name__}")
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"{role}: encoder-decoder models are not supported (need a causal LM)")
    if model.get_output_embeddings() is None:
        raise ValueError(f"{role}: {type(model).__name__} has no LM head (load it with AutoModelForCausalLM)")
    set_attn_implementation(model, choose_attn_implementation(model, attn_implementation, device, role), role)
    model.to(device=device, dtype=dtype) if dtype is not None else model.to(device=device)
    model.eval()
    model.requires_grad_(False)
    return model


# the order in which choose_attn_implementation tries the implementations when none is requested
ATTN_PREFERENCE = ("rast_decode", "sdpa", "eager")


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def attn_refusal(model, name: str) -> Optional[str]:
    """Why ``model`` cannot run attention ``name`` with the engine's 4-D additive masks (None when it can).

    * ``"eager"``: always possible (every class has it, and it computes everything: soft-capping included);
    * ``"sdpa"``: the class must support SDPA (``_supports_sdpa``) and its config must not soft-cap the
      attention logits (``attn_logit_softcapping``, e.g. Gemma2: SDPA cannot express it; transformers 5.24
      raises, earlier versions may ignore it silently);
    * ``"rast_decode"``: everything ``"sdpa"`` needs (prompts run SDPA) and the class must route attention
      through transformers' ``ALL_ATTENTION_FUNCTIONS`` (``_can_set_attn_implementation()``, where that
      exists) and pass the call's keyword arguments down to its attention layers
      (``_supports_attention_backend``: the engine hands each row's cache range over as ``rast_start`` /
      ``rast_end``); our kernel does no soft-capping either."""
    if name == "eager":
        return None
    cls = type(model)
    softcap = getattr(_text_config(model), "attn_logit_softcapping", None)
    if softcap is not None:
        return (f"its attention logits are soft-capped (attn_logit_softcapping={softcap}), which only 'eager' "
                f"computes ({name!r} would ignore it or fail)")
    if not getattr(cls, "_supports_sdpa", False):
        what = "prompts run SDPA with 'rast_decode', and " if name == "rast_decode" else ""
        return f"{what}{cls.__name__} does not support SDPA (_supports_sdpa is False)"
    if name == "rast_decode":
        can_set = getattr(cls, "_can_set_attn_implementation", None)
        if callable(can_set) and not can_set():
            return f"{cls.__name__} does not call transformers' attention interface (ALL_ATTENTION_FUNCTIONS)"
        if not getattr(cls, "_supports_attention_backend", False):
            return (f"{cls.__name__} does not pass the call's keyword arguments to its attention layers "
                    "(_supports_attention_backend is False), so the kernel cannot get each row's cache range")
    return None


def choose_attn_implementation(model, requested: Optional[str], device, role: str) -> str:
    """The attention ``model`` (the engine's ``role``) runs on ``device``.

    ``requested`` None: the first of ``"rast_decode"`` (only on CUDA with Triton importable), ``"sdpa"``,
    ``"eager"`` that :func:`attn_refusal` accepts (a class that cannot switch after construction, e.g. Falcon,
    keeps the one it was built with). A name: that one, or ``ValueError`` naming ``role`` when
    the model cannot run it (``"rast_decode"`` may be requested on CPU: the kernel then runs its PyTorch
    reference, or Triton under ``TRITON_INTERPRET=1``); an unknown name: ``ValueError`` naming
    ``attn_implementation``."""
    if requested is not None:
        prepare_attn_implementation(requested)
        why = attn_refusal(model, requested)
        if why is not None:
            raise ValueError(f"{role}: attn_implementation={requested!r} is not possible: {why}; "
                             f"use one of {[n for n in ATTN_PREFERENCE if attn_refusal(model, n) is None]}")
        return requested
    from .. import _backends

    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if callable(can_set) and not can_set():  # fixed at construction: keep what it has, if that is usable
        current = getattr(model.config, "_attn_implementation", None) or "eager"
        if current not in SUPPORTED_ATTN or attn_refusal(model, current) is not None:
            raise ValueError(f"{role}: {type(model).__name__} cannot change its attention after construction "
                             f"and has {current!r}; load it with attn_implementation='eager' or 'sdpa'")
        return current
    kernel_ok = torch.device(device).type == "cuda" and _backends.has_triton()
    for name in ATTN_PREFERENCE:
        if name == "rast_decode" and not kernel_ok:
            continue
        if attn_refusal(model, name) is None:
            return name
    raise AssertionError("unreachable: eager is always possible")  # pragma: no cover


def set_attn_implementation(model, attn_implementation: str, role: Optional[str] = None) -> None:
    """Point the model at ``attn_implementation`` (the engine's choice for that model); ``ValueError``
    (naming ``role``) when transformers does not switch it (a class that cannot change its attention after
    construction only logs a warning)."""
    prepare_attn_implementation(attn_implementation)
    if getattr(model.config, "_attn_implementation", None) == attn_implementation:
        return
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn_implementation)
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = attn_implementation
    now = getattr(model.config, "_attn_implementation", None)
    if now != attn_implementation:
        raise ValueError(f"{role or 'model'}: {type(model).__name__} stays on attention {now!r}; it cannot be "
                         f"switched to {attn_implementation!r} after construction")


def check_sliding_window(model, role: str, max_seq_len: int) -> None:
    """The engine's masks are full causal masks: refuse models with sliding-window layers whose window
    is shorter than ``max_seq_len`` (they would silently attend too far)."""
    cfg = model.config
    layer_types = getattr(cfg, "layer_types", None) or []
    window = getattr(cfg, "sliding_window", None)
    sliding = any(t != "full_attention" for t in layer_types)
    if not layer_types and getattr(cfg, "use_sliding_window", False):
        sliding = True
    if sliding and window is not None and window < max_seq_len:
        raise ValueError(f"{role}: has sliding-window attention layers (window {window}) shorter than "
                         f"max_seq_len={max_seq_len}; the engine supports full-attention layers only "
                         f"(lower max_seq_len to <= {window})")
    if any(t not in ("full_attention", "sliding_attention") for t in layer_types):
        raise ValueError(f"{role}: layer types {sorted(set(layer_types))} are not supported "
                         "(the engine needs attention layers with a KV cache)")


def load_tokenizer(spec, role: str):
    """A tokenizer object, or a path/id loaded with ``AutoTokenizer``."""
    from transformers import AutoTokenizer, PreTrainedTokenizerBase

    if isinstance(spec, PreTrainedTokenizerBase):
        return spec
    if isinstance(spec, (str, os.PathLike)):
        try:
            return AutoTokenizer.from_pretrained(os.fspath(spec))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{role}: cannot load a tokenizer from {os.fspath(spec)!r}: {exc}") from exc
    raise TypeError(f"{role}: expected a tokenizer, a model id or a local path, got {type(spec).__name__}")


def find_model_tokenizer(spec, model):
    """The tokenizer saved with a model: from ``spec`` when the model was given as an id/path, from its
    ``name_or_path`` when that is a local directory; None when there is none."""
    from transformers import AutoTokenizer

    if isinstance(spec, (str, os.PathLike)):
        source = os.fspath(spec)  # the model loaded from here, so its tokenizer can be read the same way
    else:
        # a loaded model: only look in a local directory (never reach for the Hub behind the caller's back)
        source = getattr(model, "name_or_path", "") or ""
        if not os.path.isdir(source):
            return None
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError):  # no (usable) tokenizer files there: normal; the caller decides
        return None


def check_tokenizers(named: Mapping[str, object]) -> None:
    """Every tokenizer in ``named`` ({label: tokenizer}) must map the same tokens to the same ids;
    raise ``ValueError`` naming the first token (in id order) on which two differ."""
    items = [(name, tok) for name, tok in named.items() if tok is not None]
    if len(items) < 2:
        return
    ref_name, ref = items[0]
    ref_vocab = ref.get_vocab()
    ref_by_id = {i: t for t, i in ref_vocab.items()}
    for name, tok in items[1:]:
        if tok is ref:
            continue
        vocab = tok.get_vocab()
        if vocab == ref_vocab:
            continue
        by_id = {i: t for t, i in vocab.items()}
        for i in sorted(set(ref_by_id) | set(by_id)):
            a, b = ref_by_id.get(i), by_id.get(i)
            if a != b:
                raise ValueError(
                    f"tokenizers differ: id {i} is {a!r} in {ref_name}'s tokenizer but {b!r} in {name}'s; "
                    "the three models must share one token-id mapping")
        # same id -> token maps but different dicts: a token mapped to two ids in one of them
        for t in sorted(set(ref_vocab) ^ set(vocab)):
            raise ValueError(f"tokenizers differ: token {t!r} is in only one of {ref_name}'s and {name}'s tokenizers")
    lengths = {name: len(tok) for name, tok in items}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"tokenizers differ in length: {lengths}")


def model_vocab_widths(model) -> tuple[int, int]:
    """(input embedding rows, LM-head output width) of a causal LM."""
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    n_in = emb.weight.shape[0] if emb is not None else model.config.vocab_size
    n_out = head.weight.shape[0] if head is not None and hasattr(head, "weight") else model.config.vocab_size
    return int(n_in), int(n_out)


def cache_kwarg(model) -> str:
    """The keyword ``model.forward`` takes its KV cache under: ``cache`` (transformers >= 5.2x) or
    ``past_key_values`` (earlier 5.x, where the new name does not exist); ``ValueError`` if neither."""
    params = inspect.signature(model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    raise ValueError(f"{type(model).__name__}.forward takes neither `cache` nor `past_key_values`")
