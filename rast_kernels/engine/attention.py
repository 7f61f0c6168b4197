"""Transformers adapter: our decode-attention kernel as a registered attention implementation.

Nothing in transformers is patched. :func:`register_rast_attention` adds two names to transformers'
``AttentionInterface`` (attention functions) and ``AttentionMaskInterface`` (mask builders); a model instance
opts in with ``model.set_attn_implementation(RAST_DECODE)`` (or ``attn_implementation=`` at construction)
and every other model keeps its own implementation. Works with transformers 5.17 to 5.24 (functional
attention interface; Llama, Qwen2 and the other models that call ``ALL_ATTENTION_FUNCTIONS``).

The two implementations
-----------------------
``"rast_decode"``
    Masks are built exactly as for ``"sdpa"``. Prefill (``q_len > 1``) runs transformers' SDPA function
    unchanged. Decode (``q_len == 1``) runs :func:`rast_kernels.ops.decode_attention.decode_attention` over
    the layer's cache ``[B, H_kv, S_max, D]`` without expanding K/V. The valid range of each row comes from
    the ``rast_start``/``rast_end`` keyword arguments when given (fast path), otherwise it is derived on the
    device from the boolean 4-D mask (first and one-past-last allowed position per row: this assumes the
    allowed positions are contiguous, which holds for left padding + causal masks as built by transformers
    from a left-padded 2-D ``attention_mask``; a 2-D mask with holes in the middle is not supported).
    Without a mask and without bounds it attends to the whole key length, like SDPA.
``"rast_decode_maskless"``
    The same, but at decode the 4-D mask over the whole cache is not built at all (a measured cost with a
    long static cache); ``rast_start`` and ``rast_end`` are then required. Prefill builds the usual mask.

How an engine calls the model
-----------------------------
::

    register_rast_attention()                    # once per process; idempotent
    model.set_attn_implementation(RAST_DECODE_MASKLESS)
    cache = StaticCache(config=model.config, max_cache_len=S_max)
    # prefill: left-padded prompts [B, P], the usual 2-D attention_mask and position_ids
    model(input_ids=prompt, attention_mask=mask2d, position_ids=pos, past_key_values=cache, use_cache=True)
    start = (mask2d == 0).sum(1).to(torch.int32)          # [B] left-padding length, on the device
    end = torch.full_like(start, P)                       # [B] tokens in the cache
    # each decode step (capturable in a CUDA graph: start/end are static buffers updated in place)
    end += 1                                              # the new token's slot is included
    model(input_ids=tok[:, None], position_ids=pos_step, past_key_values=cache, use_cache=True,
          rast_start=start, rast_end=end)

``rast_start``/``rast_end`` are ``[B]`` int32/int64 tensors on the model's device: row ``b`` attends to cache
positions ``[rast_start[b], rast_end[b])`` (transformers' ``StaticCache`` writes every row's new token at the
same slot, so ``rast_end`` is the number of tokens written so far, new one included). Pass the same tensor
objects at capture and replay. They travel through the model call's ``**kwargs`` to every attention layer.
When they are given they are the whole truth at decode: the mask, if any, is not read (so an engine that
passes its own 4-D additive mask, e.g. for its own cache class, gets the kernel with ``"rast_decode"``
plus the bounds; without the bounds a float mask makes the call fall back to SDPA, which is exact).
With ``"rast_decode"`` they may be omitted (the 2-D ``attention_mask`` then must cover the whole cache as
for ``"sdpa"``). Attention with a sliding window, dropout in training or ``output_attentions`` falls back to
SDPA (``"rast_decode_maskless"`` refuses a sliding window at decode, having no mask to fall back on).
Soft-capped attention logits (``softcap``: Gemma2) and attention sinks (``s_aux``: GPT-OSS) are a ``ValueError``
at every step: neither the kernel nor SDPA computes them (the engine gives such models ``"eager"``).

Which kernel runs: the Triton kernel on CUDA, and on CPU tensors too under ``TRITON_INTERPRET=1`` (tests);
otherwise the PyTorch reference. ``rast_backend="torch"|"triton"`` in the call's kwargs overrides this.
"""
from __future__ import annotations

import functools

import torch

from .. import _backends
from ..ops.decode_attention import decode_attention

RAST_DECODE = "rast_decode"
RAST_DECODE_MASKLESS = "rast_decode_maskless"


def _sdpa_forward():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    return sdpa_attention_forward


def _default_backend(device: torch.device) -> str:
    if device.type == "cuda" and _backends.has_triton():
        return "triton"
    if device.type == "cpu" and _backends.has_triton() and _backends.triton_interpreting():
        return "triton"
    return "torch"


def bounds_from_mask(mask: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B]`` int64 ``(start, end)`` of the allowed positions of a boolean decode mask ``[B or 1, *, 1, S]``:
    the first allowed position and one past the last; ``(0, 0)`` for a row with none. Device ops only."""
    allowed = mask[:, 0, -1, :].expand(batch, -1)  # every head shares the mask: Llama/Qwen2 masks are [B, 1, q, S]
    s_max = allowed.shape[-1]
    as_int = allowed.to(torch.int8)
    first = torch.argmax(as_int, dim=-1)  # argmax returns the first maximal index
    last_plus_one = s_max - torch.argmax(as_int.flip(-1), dim=-1)
    has_any = allowed.any(dim=-1)
    zero = torch.zeros_like(first)
    return torch.where(has_any, first, zero), torch.where(has_any, last_plus_one, zero)


def _rast_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    *,
    maskless: bool,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Transformers attention function. ``query [B, H_q, q_len, D]``, ``key``/``value [B, H_kv, S, D]`` (for a
    static cache, the whole layer cache). Returns ``([B, q_len, H_q, D], None)`` like transformers' SDPA."""
    start = kwargs.pop("rast_start", None)
    end = kwargs.pop("rast_end", None)
    backend = kwargs.pop("rast_backend", None)
    q_len = query.shape[2]
    sliding = kwargs.get("sliding_window") is not None
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        # neither the kernel nor the SDPA fallback computes them (SDPA ignores softcap in some transformers
        # versions): refuse instead of silently attending differently
        raise ValueError(f"attn_implementation: {RAST_DECODE!r} cannot compute soft-capped attention logits or "
                         "attention sinks (Gemma2, GPT-OSS); use 'eager'")
    special = (dropout > 0.0 and module.training) or kwargs.get("output_attentions", False) \
        or kwargs.get("position_bias") is not None
    if (start is None) != (end is None):
        raise ValueError("rast_start, rast_end: pass both or neither")
    if q_len != 1 or sliding or special:
        if q_len == 1 and maskless and attention_mask is None:
            raise ValueError(f"{RAST_DECODE_MASKLESS}: decode without a mask cannot fall back to SDPA "
                             f"(sliding window, dropout or output_attentions); use {RAST_DECODE!r}")
        return _sdpa_forward()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    batch = query.shape[0]
    if start is None:
        if maskless:
            raise ValueError(f"rast_start, rast_end: required at decode with attn_implementation="
                             f"{RAST_DECODE_MASKLESS!r} (see rast_kernels.engine.attention)")
        if attention_mask is None:
            # no mask: every key is valid (e.g. an unpadded dynamic cache), as SDPA would do
            start = torch.zeros(batch, dtype=torch.int64, device=query.device)
            end = torch.full((batch,), key.shape[2], dtype=torch.int64, device=query.device)
        elif attention_mask.dtype == torch.bool and attention_mask.dim() == 4 \
                and attention_mask.shape[-1] == key.shape[2] and attention_mask.shape[1] == 1:
            start, end = bounds_from_mask(attention_mask, batch)
        else:
            # an additive float mask or an unusual shape may carry more than a range: keep SDPA's exact semantics
            return _sdpa_forward()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                   **kwargs)
    out = decode_attention(query[:, :, 0], key, value, start, end, scale=scaling,
                           backend=backend or _default_backend(query.device))  # [B, H_q, D]
    return out.unsqueeze(1), None  # [B, 1, H_q, D]


def rast_decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The ``"rast_decode"`` attention function (module docstring)."""
    return _rast_attention_forward(module, query, key, value, attention_mask, dropout, scaling, maskless=False,
                                   **kwargs)


def rast_decode_maskless_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The ``"rast_decode_maskless"`` attention function (module docstring)."""
    return _rast_attention_forward(module, query, key, value, attention_mask, dropout, scaling, maskless=True,
                                   **kwargs)


def _maskless_mask(*args, **kwargs):
    """Mask builder for ``"rast_decode_maskless"``: no mask for a plain causal decode step (the attention
    function takes ``rast_start``/``rast_end`` instead), SDPA's boolean mask otherwise."""
    from transformers.masking_utils import sdpa_mask
    q_length = kwargs["q_length"] if "q_length" in kwargs else args[1]
    if q_length == 1 and kwargs.get("local_size") is None:
        return None
    return sdpa_mask(*args, **kwargs)


@functools.lru_cache(maxsize=None)
def register_rast_attention() -> tuple[str, str]:
    """Register ``"rast_decode"`` and ``"rast_decode_maskless"`` with transformers' attention and mask
    interfaces (idempotent). Returns the two names."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(RAST_DECODE, rast_decode_attention)
    AttentionInterface.register(RAST_DECODE_MASKLESS, rast_decode_maskless_attention)
    AttentionMaskInterface.register(RAST_DECODE, sdpa_mask)
    AttentionMaskInterface.register(RAST_DECODE_MASKLESS, _maskless_mask)
    return RAST_DECODE, RAST_DECODE_MASKLESS
