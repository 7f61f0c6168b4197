"""What the attention ops share (:mod:`.decode_attention`, :mod:`.paged_attention`): limits, tile sizes, the
split count, the dot-product settings, the split workspace and the kernel that merges the splits.

The ops are flash-decoding: each program walks its share (its *split*) of a row's cache positions with an online
softmax in base 2 and leaves a partial ``(m, l, acc)`` per query row (running max, sum of weights, weighted sum of
values); :func:`combine_kernel` merges the ``num_splits`` partials of each query row into the output. Workspace
layout (:func:`split_workspace`), for ``R`` query rows of ``H_q`` heads: ``m, l: [R, H_q, num_splits]``,
``acc: [R, H_q, num_splits, D]``, all contiguous fp32. A split that saw no position writes only
``(m, l) = (-inf, 0)``; the combine never reads its ``acc`` and gives an all-empty row zeros (never NaN).
The split count depends only on shapes and the device (:func:`default_num_splits`), never on the lengths, so a
launch can be captured in a CUDA graph and replayed with new lengths.
"""
from __future__ import annotations

import functools

import torch

from .. import _backends

LOG2E = 1.4426950408889634  # the kernels' softmax runs in base 2: scores are scaled by scale * LOG2E
MAX_HEAD_DIM = 256
MAX_SPLITS = 64


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``): Triton tile extents must be powers of two."""
    return 1 << (max(int(n), 1) - 1).bit_length()


def block_n(d_pad: int) -> int:
    """Cache positions per tile for a (padded) head dim: a K (or V) tile of 8-16 KB of bf16, enough bytes in
    flight per program without spilling registers."""
    return 64 if d_pad <= 128 else 32


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_num_splits(batch: int, h_kv: int, s_max: int, head_dim: int, device: torch.device) -> int:
    """Splits per (row, kv head) for a cache of ``s_max`` positions: enough programs to cover the GPU about
    twice, no more splits than blocks of the cache, at most 64. Depends only on shapes and the device, so a
    captured graph keeps its grid."""
    n_blocks = -(-s_max // block_n(next_pow2(max(head_dim, 16))))
    target = 2 * _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 4
    want = -(-target // max(batch * h_kv, 1))
    return max(1, min(want, n_blocks, MAX_SPLITS))


def dot_options(dtype: torch.dtype) -> tuple[bool, str]:
    """``(dot_fp32, precision)`` of the kernels' ``tl.dot`` for inputs of ``dtype``. The Triton interpreter (3.9)
    computes bf16 x bf16 ``tl.dot`` wrongly, so there the operands go to fp32 first (``dot_fp32``; products of
    16-bit floats are exact in fp32, so this gives the GPU's fp32-accumulated 16-bit dot up to summation order).
    fp32 runs in IEEE precision; "tf32" is ignored for 16-bit inputs."""
    dot_fp32 = dtype == torch.bfloat16 and _backends.triton_interpreting()
    return dot_fp32, "ieee" if dtype == torch.float32 or dot_fp32 else "tf32"


def split_workspace(rows: int, h_q: int, num_splits: int, dim: int, device: torch.device):
    """``(m, l, acc)``: the fp32 partials of ``num_splits`` splits for ``rows`` query rows of ``h_q`` heads
    (module docstring: layout)."""
    m = torch.empty((rows, h_q, num_splits), dtype=torch.float32, device=device)
    return m, torch.empty_like(m), torch.empty((rows, h_q, num_splits, dim), dtype=torch.float32, device=device)


@functools.lru_cache(maxsize=None)
def combine_kernel():
    """The Triton kernel that merges the splits (defined lazily: importing this module never needs Triton).
    Grid ``(R, H_q)``; writes ``out[r, h] = sum_s w_s acc_s / sum_s w_s l_s`` with ``w_s = exp2(m_s - max m)``
    through ``out``'s strides ``(so_b, so_h, so_d)``."""
    import triton
    import triton.language as tl

    @triton.jit
    def _combine_kernel(
        out_ptr, m_ptr, l_ptr, acc_ptr, so_b, so_h, so_d,
        HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, NUM_SPLITS: tl.constexpr, S_PAD: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        h_q = tl.num_programs(1)
        offs_s = tl.arange(0, S_PAD)
        offs_d = tl.arange(0, D_PAD)
        s_mask = offs_s < NUM_SPLITS
        d_mask = offs_d < HEAD_DIM
        base = (b * h_q + h) * NUM_SPLITS
        m = tl.load(m_ptr + base + offs_s, mask=s_mask, other=float("-inf"))
        l = tl.load(l_ptr + base + offs_s, mask=s_mask, other=0.0)
        live = m > float("-inf")  # splits that saw at least one position; the others' acc was never written
        acc = tl.load(acc_ptr + (base + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                      mask=(s_mask & live)[:, None] & d_mask[None, :], other=0.0)
        m_max = tl.max(m, 0)
        # empty splits carry m = -inf; guard the all-empty row against exp2(-inf - -inf) = NaN
        w = tl.where(live, tl.exp2(m - tl.where(m_max > float("-inf"), m_max, 0.0)), 0.0)
        denom = tl.sum(w * l, 0)
        o = tl.sum(w[:, None] * acc, 0) / tl.where(denom > 0, denom, 1.0)
        tl.store(out_ptr + b * so_b + h * so_h + offs_d * so_d, o.to(out_ptr.dtype.element_ty), mask=d_mask)

    return _combine_kernel


def launch_combine(out: torch.Tensor, m_ws, l_ws, acc_ws, num_splits: int) -> None:
    """Merge the splits into ``out`` ``[R, H_q, D]`` (any strides) with :func:`combine_kernel`; call it inside
    :func:`.launch.on_device`."""
    rows, h_q, dim = out.shape
    combine_kernel()[(rows, h_q)](
        out, m_ws, l_ws, acc_ws, *out.stride(),
        HEAD_DIM=dim, D_PAD=next_pow2(max(dim, 16)), NUM_SPLITS=num_splits, S_PAD=next_pow2(num_splits),
        num_warps=4,
    )
