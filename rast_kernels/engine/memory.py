"""KV pool sizing: how many token slots each model's block pool gets, from a measured peak.

Owns :func:`pool_tokens` (the arithmetic), :func:`measure_peaks` (the profiling run) and :func:`probe` (the
device's memory counters; tests replace it with a fake to check the arithmetic on CPU).

As vLLM does, the engine measures instead of guessing: with the weights loaded and tiny KV pools, it runs the
largest prefill chunk the engine allows (:data:`~.runner.PREFILL_CHUNK_TOKENS` tokens attending
``max_seq_len`` positions) and the largest decode step (``max_batch_size`` rows, base plausibility on) once,
and reads the allocator's peak. The pool gets what is left of ``gpu_memory_utilization`` of the device after
what is in use, that peak, the CUDA graphs' private pool (as large as a decode step's activations) and a margin::

    budget = total * utilization - (total - free) - peak - graphs - GPU_MARGIN_BYTES
    tokens = budget // (KV bytes per token of all models), in whole blocks, at most max_batch_size * max_seq_len

Under tensor parallelism every rank of a TP group takes the group's minimum (ranks must agree: different pools
would admit and preempt differently and the collectives would stop matching).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

GPU_MARGIN_BYTES = 256 << 20  # beyond the measured peak: allocator fragmentation, NCCL buffers, the CUDA runtime


@dataclass
class PoolSizing:
    """How the pool was sized (``RastEngine.pool_sizing``; bytes unless noted). ``source``: ``"measured"``,
    ``"given"`` (``kv_cache_tokens``) or ``"cap"`` (CPU: ``max_batch_size * max_seq_len``); ``tokens``: the
    pool (after the TP group's agreement), ``local_tokens``: what this rank alone would have taken."""

    source: str
    tokens: int
    per_token_bytes: int
    local_tokens: int = 0
    total: int = 0
    free: int = 0
    utilization: float = 0.0
    prefill_peak: int = 0
    decode_peak: int = 0
    graph_reserve: int = 0
    budget: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def pool_tokens(total: int, free: int, utilization: float, peak: int, graph_reserve: int, per_token_bytes: int,
                block_size: int, cap: int) -> tuple:
    """``(tokens, budget)``: the pool's token slots (whole blocks, at most ``cap``; may be < ``block_size``: no
    room) from the device's ``total`` and ``free`` bytes and the measured ``peak`` (module docstring)."""
    budget = int(total * utilization) - (total - free) - peak - graph_reserve - GPU_MARGIN_BYTES
    tokens = max(0, budget) // per_token_bytes // block_size * block_size
    return min(tokens, cap), budget


class CudaProbe:
    """The CUDA caching allocator's counters on one device."""

    def __init__(self, device: torch.device):
        self.device = device

    def mem_get_info(self) -> tuple:
        return torch.cuda.mem_get_info(self.device)

    def reset_peak(self) -> None:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._base = torch.cuda.memory_allocated(self.device)

    def peak(self) -> int:
        """Bytes allocated above the level at :meth:`reset_peak`, at the highest point since."""
        torch.cuda.synchronize(self.device)
        return max(0, torch.cuda.max_memory_allocated(self.device) - self._base)


def probe(device: torch.device) -> Optional[CudaProbe]:
    """The memory counters of ``device`` (None on CPU: the pool is then ``max_batch_size * max_seq_len``)."""
    return CudaProbe(device) if device.type == "cuda" else None


def measure_peaks(runner, mem, chunk: int) -> tuple:
    """``(prefill_peak, decode_peak)``: the allocator's peak above the weights during one prefill chunk of
    ``chunk`` tokens attending ``runner.max_seq_len`` positions per lane, and during one decode step of every slot
    (rows inert: no state changes). ``runner`` runs over lanes with tiny pools (every read is the scratch slot)."""
    from .lanes import KVView

    L = runner.max_seq_len
    mem.reset_peak()
    with torch.no_grad():
        for lane in runner.lanes:
            lane.use_attention()
            dev = lane.device
            ids = torch.zeros(1, chunk, dtype=torch.int64, device=dev)
            pos = torch.arange(chunk, device=dev).unsqueeze(0)
            slots = torch.full((chunk,), runner.scratch, dtype=torch.int64, device=dev)
            gather = torch.full((1, L), runner.scratch, dtype=torch.int64, device=dev)
            mask = torch.ones(1, 1, chunk, L, dtype=torch.bool, device=dev)
            lane.forward(ids, pos, KVView(slots, None, None, gather, mask), keep=1)
    prefill_peak = mem.peak()
    mem.reset_peak()
    with torch.no_grad():
        runner.step_rows(runner.buckets[-1], L, True)
    return prefill_peak, mem.peak()
