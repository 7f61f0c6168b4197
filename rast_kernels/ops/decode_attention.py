"""``decode_attention``: single-token (decode) attention over a static KV cache, with grouped-query heads.

Semantics (the spec every backend is tested against; :func:`decode_attention_reference` is its executable form):
for each row ``b`` and query head ``h`` (kv head ``h // (H_q // H_kv)``), with ``L = [start[b], end[b])``
clamped to ``[0, S_max)``::

    out[b, h] = sum_{j in L} softmax_j(scale * q[b, h] . k[b, kvh, j]) * v[b, kvh, j]

computed in fp32 and returned in ``q``'s dtype. A row with an empty ``L`` gets zeros (not NaN), so padding
rows of a batch are harmless. Positions outside ``L`` are never read, whatever they hold.

The Triton kernel is flash-decoding: grid ``(B, H_kv, num_splits)``; each program loads the whole group of
``H_q / H_kv`` query heads of one kv head (K/V are never expanded), walks its share of ``L`` in blocks of
``BLOCK_N`` positions with an online softmax, and writes a partial ``(max, sum, acc)``; a small combine kernel
(:mod:`.attention_common`, shared with :mod:`.paged_attention`) merges the splits. ``num_splits`` depends only on
the shapes (and the GPU's SM count), never on the runtime lengths, and ``start``/``end`` stay on the device: the
launch can be captured in a CUDA graph and replayed with new lengths. The valid range is shared out evenly among
the splits at run time, so a short row in a long cache still uses all splits; splits left without a block write an
empty partial and do no loads.
"""
from __future__ import annotations

import functools
import math

import torch

from .. import _backends
from . import launch
from ._checks import INDEX_DTYPES, attention_options, require_float, require_tensors
from .attention_common import (LOG2E, MAX_HEAD_DIM, MAX_SPLITS, block_n, combine_kernel, default_num_splits,
                               dot_options, launch_combine, next_pow2, split_workspace)


# ----------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------
def decode_attention_reference(q, k_cache, v_cache, start, end, scale=None):
    """PyTorch reference of :func:`decode_attention` (same arguments, assumed valid).

    Expands the kv heads to the query heads and runs an explicit masked softmax in fp32; rows whose
    ``[start, end)`` is empty get zeros. Returns ``[B, H_q, D]`` in ``q``'s dtype.
    """
    batch, h_q, dim = q.shape
    h_kv, s_max = k_cache.shape[1], k_cache.shape[2]
    scale = dim ** -0.5 if scale is None else float(scale)
    k = k_cache.float().repeat_interleave(h_q // h_kv, dim=1)  # [B, H_q, S, D]
    v = v_cache.float().repeat_interleave(h_q // h_kv, dim=1)
    scores = torch.einsum("bhd,bhsd->bhs", q.float(), k) * scale  # [B, H_q, S]
    pos = torch.arange(s_max, device=q.device)
    valid = (pos[None, :] >= start.to(q.device).long()[:, None]) & (pos[None, :] < end.to(q.device).long()[:, None])
    scores = scores.masked_fill(~valid[:, None, :], -math.inf)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an empty row is all -inf: NaN -> 0
    # masked positions are zeroed explicitly so that a NaN or inf in an unused cache slot cannot leak in
    out = torch.einsum("bhs,bhsd->bhd", probs, v.masked_fill(~valid[:, None, :, None], 0.0))
    return out.to(q.dtype)


# ----------------------------------------------------------------------------------------------------------
# Triton kernels (defined lazily so that importing this module never needs Triton)
# ----------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _kernels():
    """``(split kernel, combine kernel)``: the kernels this op launches."""
    import triton
    import triton.language as tl

    @triton.jit
    def _split_kernel(
        q_ptr, k_ptr, v_ptr, start_ptr, end_ptr,
        out_ptr, m_ptr, l_ptr, acc_ptr,
        s_max, group, qk_scale,  # qk_scale = softmax scale * log2(e): the softmax runs in base 2
        s_start, s_end,  # strides of start/end: an expanded [1] -> [B] tensor (stride 0) works as is
        sq_b, sq_h, sq_d,
        sk_b, sk_h, sk_s, sk_d,
        sv_b, sv_h, sv_s, sv_d,
        so_b, so_h, so_d,
        HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
        NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    ):
        # int64 row/head indices: B * H * S_max * D can pass 2**31 elements for big batches and long caches
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)

        # clamp to [0, s_max] before narrowing to int32 (an int64 bound may be anything)
        row_start = tl.minimum(tl.maximum(tl.load(start_ptr + b * s_start), 0), s_max).to(tl.int32)
        row_end = tl.minimum(tl.maximum(tl.load(end_ptr + b * s_end), 0), s_max).to(tl.int32)
        row_end = tl.maximum(row_end, row_start)  # empty range: no blocks at all
        # Blocks are aligned to absolute multiples of BLOCK_N (aligned loads); every block in
        # [first_block, first_block + n_blocks) holds at least one valid position, so the running max is
        # finite after the first block and no NaN can arise from (-inf) - (-inf).
        first_block = row_start // BLOCK_N
        n_blocks = tl.cdiv(row_end, BLOCK_N) - first_block
        n_blocks = tl.where(row_end > row_start, n_blocks, 0)
        per_split = tl.cdiv(n_blocks, NUM_SPLITS)
        blk_lo = first_block + split * per_split
        blk_hi = tl.minimum(blk_lo + per_split, first_block + n_blocks)

        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, D_PAD)
        offs_n = tl.arange(0, BLOCK_N)
        g_mask = offs_g < group
        d_mask = offs_d < HEAD_DIM
        heads = kvh * group + offs_g  # the query heads served by this kv head

        q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + offs_d[None, :] * sq_d,
                    mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [G_PAD, D_PAD]
        if DOT_FP32:
            q = q.to(tl.float32)
        k_base = k_ptr + b * sk_b + kvh * sk_h
        v_base = v_ptr + b * sv_b + kvh * sv_h

        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
        for blk in range(blk_lo, blk_hi):
            pos = blk * BLOCK_N + offs_n
            n_mask = (pos >= row_start) & (pos < row_end)
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_base + pos[:, None] * sk_s + offs_d[None, :] * sk_d, mask=kv_mask, other=0.0)
            if DOT_FP32:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [G_PAD, BLOCK_N]
            s = tl.where(n_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + pos[:, None] * sv_s + offs_d[None, :] * sv_d, mask=kv_mask, other=0.0)
            p = p.to(v.dtype)  # the P @ V product runs on the cache dtype, like flash attention
            if DOT_FP32:
                p = p.to(tl.float32)
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
            m_i = m_new

        if NUM_SPLITS == 1:
            # one split: normalise and write the output directly, no combine launch
            denom = tl.where(l_i > 0, l_i, 1.0)
            o = acc / denom[:, None]
            tl.store(out_ptr + b * so_b + heads[:, None] * so_h + offs_d[None, :] * so_d,
                     o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])
        else:
            # workspace: m, l [B, H_q, NUM_SPLITS]; acc [B, H_q, NUM_SPLITS, HEAD_DIM], all contiguous fp32
            h_q = tl.num_programs(1) * group
            ml_off = (b * h_q + heads) * NUM_SPLITS + split
            tl.store(m_ptr + ml_off, m_i, mask=g_mask)
            tl.store(l_ptr + ml_off, l_i, mask=g_mask)
            # a split without blocks writes only (m, l) = (-inf, 0); the combine never reads its acc, so with
            # many splits and a short row the workspace traffic stays proportional to the work done
            live_g = offs_g < tl.where(blk_hi > blk_lo, group, 0)
            tl.store(acc_ptr + ml_off[:, None] * HEAD_DIM + offs_d[None, :], acc,
                     mask=live_g[:, None] & d_mask[None, :])

    return _split_kernel, combine_kernel()


def _decode_attention_triton(q, k_cache, v_cache, start, end, scale, num_splits, out):
    split_kernel, _ = _kernels()
    batch, h_q, dim = q.shape
    h_kv, s_max = k_cache.shape[1], k_cache.shape[2]
    group = h_q // h_kv
    d_pad = next_pow2(max(dim, 16))
    g_pad = next_pow2(max(group, 16))  # tl.dot needs every dimension >= 16
    dot_fp32, precision = dot_options(q.dtype)
    if num_splits > 1:
        m_ws, l_ws, acc_ws = split_workspace(batch, h_q, num_splits, dim, q.device)
    else:
        m_ws = l_ws = acc_ws = out  # unused by the kernel in this case
    with launch.on_device(q):
        split_kernel[(batch, h_kv, num_splits)](
            q, k_cache, v_cache, start, end, out, m_ws, l_ws, acc_ws,
            s_max, group, scale * LOG2E, start.stride(0), end.stride(0),
            *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
            HEAD_DIM=dim, D_PAD=d_pad, G_PAD=g_pad, BLOCK_N=block_n(d_pad), NUM_SPLITS=num_splits,
            PRECISION=precision, DOT_FP32=dot_fp32, num_warps=4,
        )
        if num_splits > 1:
            launch_combine(out, m_ws, l_ws, acc_ws, num_splits)
    return out


# ----------------------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------------------
def _check_inputs(q, k_cache, v_cache, start, end):
    require_tensors(q=q, k_cache=k_cache, v_cache=v_cache, start=start, end=end)
    if q.dim() != 3:
        raise ValueError(f"q: expected a 3-D tensor [B, H_q, D], got shape {tuple(q.shape)}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor [B, H_kv, S_max, D], got shape {tuple(t.shape)}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        require_float(name, t)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from q's {q.dtype}")
    batch, h_q, dim = q.shape
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"v_cache: shape {tuple(v_cache.shape)} differs from k_cache's {tuple(k_cache.shape)}")
    kb, h_kv, s_max, kd = k_cache.shape
    if kb != batch:
        raise ValueError(f"k_cache: batch size {kb} differs from q's {batch}")
    if kd != dim:
        raise ValueError(f"k_cache: head dim {kd} differs from q's {dim}")
    if not 0 < dim <= MAX_HEAD_DIM:
        raise ValueError(f"q: head dim must be in [1, {MAX_HEAD_DIM}], got {dim}")
    if h_kv == 0 or h_q % h_kv != 0:
        raise ValueError(f"k_cache: the number of query heads ({h_q}) must be a positive multiple of the "
                         f"number of kv heads ({h_kv})")
    if s_max == 0:
        raise ValueError("k_cache: the cache has no positions (S_max == 0)")
    for name, t in (("start", start), ("end", end)):
        if t.shape != (batch,):
            raise ValueError(f"{name}: expected a tensor of shape [{batch}], got shape {tuple(t.shape)}")
        if t.dtype not in INDEX_DTYPES:
            raise TypeError(f"{name}: expected an int32 or int64 tensor, got {t.dtype}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("start", start), ("end", end)):
        if t.device != q.device:
            raise ValueError(f"{name}: on {t.device}, q is on {q.device}")


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    scale: float | None = None,
    backend: str = "auto",
    *,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one new query token per row over the valid part of a static KV cache (module docstring:
    exact semantics).

    Parameters
    ----------
    q : torch.Tensor
        ``[B, H_q, D]`` query of the new token; float32, bfloat16 or float16; any strides.
    k_cache, v_cache : torch.Tensor
        ``[B, H_kv, S_max, D]`` (the per-layer layout of transformers' ``StaticCache``), q's dtype and device,
        any strides. ``H_q`` must be a multiple of ``H_kv`` (grouped-query attention; K/V are not expanded).
        ``D`` up to 256; any value (48, 80, ...) works, it is padded to a power of two with masks.
    start, end : torch.Tensor
        ``[B]`` int32/int64 on q's device, any stride (an expanded ``[1]`` tensor is fine): row ``b``
        attends to cache positions ``[start[b], end[b])``, i.e. ``start`` is the left-padding length and
        ``end`` the current length including the new token. Values are clamped to ``[0, S_max]``; an empty
        range gives a zero output row. Never read on the host.
    scale : float, optional
        Softmax scale; default ``D ** -0.5``.
    backend : {"auto", "triton", "torch"}
        ``"auto"``: the Triton kernel on CUDA, the reference on CPU. ``"triton"`` also runs on CPU tensors
        under ``TRITON_INTERPRET=1``. ``"torch"``: :func:`decode_attention_reference`.
    num_splits : int, optional
        Flash-decoding splits per (row, kv head) for the Triton kernel; default :func:`default_num_splits`
        (a function of the shapes only). Keep it fixed across the replays of a captured graph.
    out : torch.Tensor, optional
        Preallocated ``[B, H_q, D]`` output in q's dtype on q's device, written in place and returned.

    Returns
    -------
    torch.Tensor
        ``[B, H_q, D]`` in q's dtype (fp32 accumulation).
    """
    _check_inputs(q, k_cache, v_cache, start, end)
    batch, h_q, dim = q.shape
    scale, num_splits = attention_options(q, scale, num_splits, out, MAX_SPLITS)
    backend = _backends.resolve_triton_or_torch(backend, q.device)

    if backend == "torch":
        res = decode_attention_reference(q, k_cache, v_cache, start, end, scale)
        return out.copy_(res) if out is not None else res
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if batch == 0 or h_q == 0:
        return out
    if num_splits is None:
        num_splits = default_num_splits(batch, k_cache.shape[1], k_cache.shape[2], dim, q.device)
    return _decode_attention_triton(q, k_cache, v_cache, start, end, scale, num_splits, out)
