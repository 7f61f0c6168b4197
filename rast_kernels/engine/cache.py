"""The engine's static KV cache: one per model, preallocated, written where the engine says.

Hugging Face's ``StaticCache`` changed how it tracks its write position between transformers 5.17
(the GPU machine) and 5.24 (CI), so the engine uses this small ``Cache`` subclass instead. Its only
contract with the model code is ``update(key_states, value_states, layer_idx, ...)`` (same in 5.17..5.24)
and returning the full ``[B, H, max_seq_len, D]`` buffers; masking is done by the 4-D attention mask
the engine passes (transformers returns a 4-D mask as-is), so no mask-size bookkeeping is needed.

Layout: rows are left padded to the batch's longest prompt ``P``; the prompt fills columns ``[0, P)``
and the ``t``-th decode step writes column ``P + t`` for every row, at the index held in the device
tensor :attr:`EngineKVCache.write_pos` (advanced in place, so a captured CUDA graph replays correctly).
A decode step attends to the first :attr:`EngineKVCache.kv_len` columns only: the engine picks that
length per call (a power-of-two bucket covering prompt + new tokens), so short generations do not pay
for attention over the whole preallocated cache.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class _EngineLayer(CacheLayerMixin):
    """One layer's keys/values ``[max_batch, H_kv, max_seq_len, D]``; allocated on the first update
    (the prefill, which always runs before any graph capture)."""

    is_compileable = True
    is_sliding = False

    def __init__(self, owner: "EngineKVCache"):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states, value_states):
        o = self.owner
        self.device = key_states.device
        self.keys = torch.zeros((o.max_batch_size_, key_states.shape[1], o.max_seq_len, key_states.shape[-1]),
                                dtype=key_states.dtype, device=key_states.device)
        self.values = torch.zeros((o.max_batch_size_, value_states.shape[1], o.max_seq_len, value_states.shape[-1]),
                                  dtype=value_states.dtype, device=value_states.device)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, q = key_states.shape[0], key_states.shape[-2]
        keys, values = self.keys[:b], self.values[:b]
        if self.owner.prefill:
            # prefill (eager, host-known length): the prompt block goes to columns [0, q)
            keys[:, :, :q].copy_(key_states)
            values[:, :, :q].copy_(value_states)
            return keys[:, :, :q], values[:, :, :q]  # nothing else is valid yet: attend to the block only
        else:
            # decode: one column at the device-held index (no host read, graph-safe)
            keys.index_copy_(2, self.owner.write_pos, key_states)
            values.index_copy_(2, self.owner.write_pos, value_states)
        kv = self.owner.kv_len  # columns attended this call (host-fixed per generate call, graph-safe)
        return keys[:, :, :kv], values[:, :, :kv]

    def get_mask_sizes(self, query_length: int, *args, **kwargs):
        return self.owner.max_seq_len, 0

    def get_seq_length(self, *args, **kwargs) -> int:
        return self.owner.seq_length

    def get_max_length(self) -> int:
        return self.owner.max_seq_len

    def get_max_cache_shape(self) -> int:
        return self.owner.max_seq_len

    def reset(self) -> None:
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()


class EngineKVCache(Cache):
    """Static KV cache for one model of the engine.

    Parameters
    ----------
    num_layers : int
        Decoder layers of the model (``config.num_hidden_layers``).
    max_batch_size, max_seq_len : int
        Rows and columns preallocated per layer.
    device : torch.device
        The model's device; holds :attr:`write_pos`, an int64 ``[1]`` tensor with the column the next
        decode step writes.
    """

    def __init__(self, num_layers: int, max_batch_size: int, max_seq_len: int, device):
        self.max_batch_size_ = int(max_batch_size)
        self.max_seq_len_ = int(max_seq_len)
        self.prefill = False
        self.seq_length = 0  # host-side bookkeeping only, for model code that asks
        self.kv_len = int(max_seq_len)  # decode attends to columns [0, kv_len) (set by the engine per call)
        self.write_pos = torch.zeros(1, dtype=torch.int64, device=device)
        super().__init__(layers=[_EngineLayer(self) for _ in range(num_layers)])

    # transformers exposes max_cache_len / max_batch_size as read-only properties on Cache
    @property
    def max_seq_len(self) -> int:
        return self.max_seq_len_

    @property
    def max_cache_len(self) -> int:
        return self.max_seq_len_

    @property
    def max_batch_size(self) -> int:
        return self.max_batch_size_

    @property
    def is_compileable(self) -> bool:
        return True

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Write the new keys/values ``[b, H, q, D]`` of ``layer_idx``; return the layer's
        ``[b, H, q, D]`` prompt block in prefill mode, else the first :attr:`kv_len` columns
        ``[b, H, kv_len, D]`` (padding and unwritten columns are masked by the engine's attention mask)."""
        return self.layers[layer_idx].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_length

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0):
        return self.max_seq_len_, 0

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.max_seq_len_

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.max_seq_len_

    def zero_(self) -> None:
        """Zero every allocated buffer (so stale columns from an earlier call are finite)."""
        for layer in self.layers:
            layer.reset()
