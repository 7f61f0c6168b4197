"""The engine's paged KV cache: one device block pool per model (the host's block accounting is
:mod:`.block_manager`).

Owns
----
* :class:`PagedKVCache` (device, one per model): per layer a key pool and a value pool
  ``[num_blocks + 1, block_size, H_kv, D]`` (vLLM's flash layout). Token slot ``s = block * block_size + offset``,
  so ``pool.view(-1, H_kv, D)`` is the flat slot view every write uses. The extra last block is scratch: rows that
  are inert (finished, or empty slots of a captured CUDA graph) and prompt padding write there, and nothing reads
  it, so no op needs a "skip" value.
* The transformers ``Cache`` adapter (the same object): ``update(key, value, layer)`` writes the call's keys and
  values to :attr:`PagedKVCache.write_slots` and returns each row's cache gathered through
  :attr:`PagedKVCache.gather_index` ``[b, L]`` into a dense ``[b, H_kv, L, D]`` view (the new tokens included),
  which every attention implementation reads with the engine's additive ``[b, 1, Q, L]`` mask
  (:class:`~.lanes.KVView`). Prefill chunks, decode steps and speculative verify passes are all this call. The
  engine's fused decode forward reads the pools directly
  (:func:`rast_kernels.ops.paged_attention.paged_decode_attention`) and needs no gather.

Invariants: pools are allocated once (:meth:`PagedKVCache.allocate`, before any graph capture); the index tensors
are engine-owned device buffers written in place, so a captured graph replays with new values.
"""
from __future__ import annotations

from typing import Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class _PagedLayer(CacheLayerMixin):
    """One layer's pools; ``keys``/``values`` are the pools themselves ``[num_blocks + 1, BS, H_kv, D]``."""

    is_compileable = True
    is_sliding = False

    def __init__(self, owner: "PagedKVCache"):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states, value_states):  # pools are allocated by PagedKVCache.allocate
        raise RuntimeError("PagedKVCache: allocate() the pools before the first forward")

    def update(self, key_states, value_states, *args, **kwargs):
        o = self.owner
        b, h, q, d = key_states.shape
        if tuple(self.keys.shape[2:]) != (h, d):  # host-side shapes: sized from the config, checked on use
            raise ValueError(f"PagedKVCache: the model produced keys with {h} heads x {d} dims, the pool was sized "
                             f"for {self.keys.shape[2]} x {self.keys.shape[3]} from its config")
        k_flat, v_flat = self.keys.view(-1, h, d), self.values.view(-1, h, d)
        # [b, H, q, D] -> [b * q, H, D] rows in slot order of write_slots ([b * q], pads -> the scratch slot)
        k_flat.index_copy_(0, o.write_slots, key_states.transpose(1, 2).reshape(b * q, h, d))
        v_flat.index_copy_(0, o.write_slots, value_states.transpose(1, 2).reshape(b * q, h, d))
        idx = o.gather_index  # [b, L] slots of positions 0 .. L-1 (past a row's length: the scratch slot)
        flat = idx.view(-1)  # index_select: about half the time of advanced indexing on CPU
        n = idx.shape[1]
        return (k_flat.index_select(0, flat).view(b, n, h, d).transpose(1, 2),   # [b, H_kv, L, D]
                v_flat.index_select(0, flat).view(b, n, h, d).transpose(1, 2))

    def get_mask_sizes(self, query_length: int, *args, **kwargs):
        return self.owner.mask_len, 0

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.owner.seq_length

    def get_max_length(self) -> int:
        return self.owner.max_seq_len

    def get_max_cache_shape(self) -> int:
        return self.owner.max_seq_len


class PagedKVCache(Cache):
    """One model's block pools, usable as a transformers ``Cache`` (module docstring).

    Parameters
    ----------
    num_layers : int
        Decoder layers with a KV cache.
    num_blocks, block_size : int
        Blocks in the pool (the scratch block comes on top) and token slots per block.
    max_seq_len : int
        The per-sequence limit (what the model code is told the cache can hold).
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, max_seq_len: int):
        self.num_blocks = int(num_blocks)
        self.block_size = int(block_size)
        self.max_seq_len_ = int(max_seq_len)
        self.scratch_slot = self.num_blocks * self.block_size  # first slot of the scratch block
        self.seq_length = 0  # host bookkeeping for model code that asks; positions come from position_ids
        self.mask_len = self.max_seq_len_
        self.write_slots: Optional[torch.Tensor] = None   # [b * q] int64 slots of this call's tokens
        self.gather_index: Optional[torch.Tensor] = None  # [b, L] int64 slots read at decode
        super().__init__(layers=[_PagedLayer(self) for _ in range(num_layers)])

    def allocate(self, num_kv_heads, head_dim: int, dtype: torch.dtype, device) -> None:
        """Allocate the pools (zeros, so stale slots are finite). ``num_kv_heads``: an int or one per layer."""
        heads = num_kv_heads if isinstance(num_kv_heads, (list, tuple)) else [num_kv_heads] * len(self.layers)
        for layer, h in zip(self.layers, heads):
            shape = (self.num_blocks + 1, self.block_size, int(h), int(head_dim))
            layer.keys = torch.zeros(shape, dtype=dtype, device=device)
            layer.values = torch.zeros(shape, dtype=dtype, device=device)
            layer.device, layer.dtype, layer.is_initialized = torch.device(device), dtype, True

    def bytes_per_token(self) -> int:
        """KV bytes one token slot takes in this model (all layers, keys and values)."""
        return sum(2 * l.keys[0, 0].numel() * l.keys.element_size() for l in self.layers)

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy whole blocks ``src[i] -> dst[i]`` (int64 device tensors) in every layer (copy-on-write of a
        shared partial block)."""
        for layer in self.layers:
            layer.keys.index_copy_(0, dst, layer.keys.index_select(0, src))
            layer.values.index_copy_(0, dst, layer.values.index_select(0, src))

    # transformers exposes these as read-only properties on Cache
    @property
    def max_seq_len(self) -> int:
        return self.max_seq_len_

    @property
    def max_cache_len(self) -> int:
        return self.max_seq_len_

    @property
    def is_compileable(self) -> bool:
        return True

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Write ``[b, H, q, D]`` keys/values of ``layer_idx`` to :attr:`write_slots`; return the gathered
        ``[b, H, L, D]`` cache."""
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0):
        return self.mask_len, 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_seq_len_

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_seq_len_
