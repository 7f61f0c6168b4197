"""A lane: one model of the engine with its paged KV cache, and its forward over ``Q`` new tokens per row.

Owns
----
* :class:`Lane` and :func:`make_lane` (the model, its :class:`~.cache.PagedKVCache`, the attention implementation
  transformers' forward uses, and the engine's :class:`~.fused_decode.FusedDecoder` when it runs);
* :class:`KVView`: where a forward's new tokens go and what each row reads, computed once per step for all lanes;
* :meth:`Lane.forward`: logits ``[b, Q, V]`` of ``Q`` new tokens per row written at positions ``pos .. pos + Q - 1``
  and attending causally to the row's cache. ``Q = 1`` is a decode step, ``Q = k + 1`` a speculative verify pass,
  and prefill chunks are the same call with the rows' block tables given on the host.

Two forwards, the same semantics: the fused decoder reads the pools through the block table (the paged attention
kernels); transformers' forward reads a dense ``[b, H_kv, L, D]`` gather of each row's first ``L`` positions with an
additive ``[b, 1, Q, L]`` mask (``L``: a length bucket, so memory is ``O(Q * L)`` per row, never ``O(L^2)``).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional

import torch

from .cache import PagedKVCache
from .fused_decode import FusedDecoder
from .loading import cache_kwarg, set_attn_implementation


@dataclass
class KVView:
    """One forward's cache addressing for rows ``[0, b)`` and ``Q`` new tokens each (device tensors).

    ``slots`` ``[b * Q]``: where each new token's K/V go (the scratch slot for tokens nobody keeps); ``lens``
    ``[b]``: each row's cache length after the write (0: an inert row); ``block_table`` ``[b, nb]`` (the fused
    forward, which runs when ``gather`` is None); ``gather`` ``[b, L]`` slots of positions ``0 .. L - 1`` and
    ``mask`` ``[b, 1, Q, L]`` bool, True where query ``q`` may read position ``l`` (transformers' forward: prefill
    chunks always, decode steps without the fused decoder)."""

    slots: torch.Tensor
    lens: Optional[torch.Tensor]
    block_table: Optional[torch.Tensor]
    gather: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None

    def to(self, device) -> "KVView":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return KVView(move(self.slots), move(self.lens), move(self.block_table), move(self.gather), move(self.mask))


@dataclass
class Lane:
    """One model of the engine with its paged cache and forward (module docstring)."""

    role: str
    model: torch.nn.Module
    device: torch.device
    cache: PagedKVCache
    attn: str                # the model's attention implementation (transformers' forward)
    cache_arg: str           # the keyword its forward takes the cache under
    logits_to_keep: bool     # its forward accepts logits_to_keep
    decoder: Optional[FusedDecoder] = None  # the engine's fused decode forward, else transformers'

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def use_attention(self) -> None:
        """Point the model at this lane's attention implementation (before a window or a prefill: another engine
        sharing the model object may have switched it)."""
        set_attn_implementation(self.model, self.attn, self.role)

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, view: KVView, keep: Optional[int] = None) -> torch.Tensor:
        """Logits ``[b, Q', V]`` (model dtype, this lane's device) of the new tokens ``ids`` ``[b, Q]`` at
        positions ``pos`` ``[b, Q]``: all ``Q`` (``keep`` None) or the last ``keep``. ``view`` on this device."""
        b, q = ids.shape
        if view.gather is None:  # the fused decoder reads the pools through the block table
            logits = self.decoder(ids, pos, self.cache, view.slots, view.lens, view.block_table).view(b, q, -1)
            return logits if keep is None else logits[:, q - keep:]
        cache = self.cache
        cache.write_slots, cache.gather_index = view.slots, view.gather
        length = view.gather.shape[1]
        cache.seq_length, cache.mask_len = length - q, length
        mask = torch.where(view.mask, 0.0, torch.finfo(self.dtype).min).to(self.dtype)
        extra = {}
        if self.logits_to_keep:
            extra["logits_to_keep"] = q if keep is None else keep
        # the decode-attention kernel reads these bounds, not the mask
        if self.attn == "rast_decode" and q == 1 and view.lens is not None:
            extra.update(rast_start=torch.zeros_like(view.lens), rast_end=view.lens)
        try:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                             **{self.cache_arg: cache}, **extra)
        finally:
            cache.write_slots = cache.gather_index = None
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits if keep is None else logits[:, logits.shape[1] - keep:]


def kv_geometry(model):
    """``(num_layers, kv_heads, head_dim)`` of a causal LM from its (text) config."""
    cfg = model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    layers = getattr(cfg, "num_hidden_layers", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if layers is None or heads is None:
        raise ValueError("config has no num_hidden_layers / num_attention_heads")
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return int(layers), int(kv), int(head_dim)


def make_lane(role: str, model, device, attn: str, num_blocks: int, block_size: int, max_seq_len: int,
              fused: bool) -> Lane:
    """A lane with its pools allocated (zeros) in the model's dtype on ``device``."""
    layers, kv, head_dim = kv_geometry(model)
    cache = PagedKVCache(layers, num_blocks, block_size, max_seq_len)
    cache.allocate(kv, head_dim, next(model.parameters()).dtype, device)
    return Lane(role=role, model=model, device=device, cache=cache, attn=attn, cache_arg=cache_kwarg(model),
                logits_to_keep="logits_to_keep" in inspect.signature(model.forward).parameters,
                decoder=FusedDecoder(model) if fused else None)
