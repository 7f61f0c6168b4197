"""Attention over a paged KV cache, with grouped-query heads: ``paged_decode_attention`` (one new token per row, the
decode step) and ``paged_multi_token_attention`` (``Q`` new tokens per row, causal among them: a speculative
verify pass, or a short prefill chunk).

Semantics (the spec every backend is tested against; :func:`paged_decode_attention_reference` is its executable
form): the cache of one layer is a key pool and a value pool ``[NB, BS, H_kv, D]`` (vLLM's flash layout: ``NB``
physical blocks of ``BS`` token slots). Row ``b`` holds ``L = clamp(seq_lens[b], 0, MAXBLK * BS)`` positions;
position ``j`` lives in block ``block_table[b, j // BS]`` at offset ``j % BS``. For each query head ``h`` (kv
head ``kvh = h // (H_q // H_kv)``)::

    out[b, h] = sum_{j < L} softmax_j(scale * q[b, h] . k_pool[blk(b, j), j % BS, kvh])
                            * v_pool[blk(b, j), j % BS, kvh]          blk(b, j) = block_table[b, j // BS]

computed in fp32 and returned in ``q``'s dtype. A row with ``L == 0`` gets zeros (not NaN), so inert rows of a
batch are harmless. Slots at positions ``>= L`` are never read, whatever they hold, and neither are the table
entries of logical blocks ``>= cdiv(L, BS)`` (they may hold anything, e.g. ``-1``). The entries that are read
must be in ``[0, NB)``: they are not checked (that would need a host sync). Rows may share physical blocks
(a shared prompt prefix): the op only reads the pools.

The Triton kernel is flash-decoding like :mod:`.decode_attention`: grid ``(B, H_kv, num_splits)``; each program
loads the whole group of ``H_q / H_kv`` query heads of one kv head (K/V are never expanded), walks its share of
the row's ``cdiv(L, BLOCK_N)`` tiles of ``BLOCK_N`` positions with an online softmax, and writes a partial
``(max, sum, acc)`` that :mod:`.attention_common`'s combine kernel merges (its workspace layout). The tile width
``BLOCK_N`` is independent of the block size: each position's slot is looked up in the table on its own
(``j // BS``, ``j % BS``), so any ``BS`` works (16, but also 7 or 13) and one tile may span several physical
blocks. Slot offsets are 32-bit unless a pool spans ``2**31`` elements (fewer registers; a compile-time choice
from the pools' shapes and strides). The grid depends only on the shapes; ``seq_lens`` and the table are read on
the device only, so the launch can be captured in a CUDA graph and replayed with new lengths and tables.

``paged_multi_token_attention`` (:func:`paged_multi_token_attention_reference` is its executable form): ``q`` is
``[B, Q, H_q, D]``, the ``Q`` new tokens of each row already written to the pools, and ``L`` (as above, clamped)
counts them. Query ``j`` sits at position ``p_j = L - Q + j`` and attends positions ``[0, p_j]``::

    out[b, j, h] = sum_{i <= p_j} softmax_i(scale * q[b, j, h] . k(b, i, kvh)) * v(b, i, kvh)

A query with ``p_j < 0`` (``L < Q``; every query of an inert row with ``L == 0``) gets zeros. With ``Q == 1`` it
is exactly ``paged_decode_attention`` (the same kernel, or the same reference: the same bits). For ``Q > 1`` the
kernel follows FlashInfer's batch prefill over a paged KV cache: the ``Q`` queries times the ``H_q / H_kv`` heads of
a group that share one kv head are packed into the rows of one program's tile (FlashInfer's ``packed_qo_len =
qo_len * gqa_group_size``), so K/V are read once per kv head and never expanded. Grid ``(B * n_qt, H_kv,
num_splits)``: a row's queries are cut into ``n_qt`` tiles of ``QT`` consecutive queries, ``QT * group`` packed
rows each (16 to 64 rows, :func:`multi_token_rows`); a program walks the cache tiles up to its last query's
position with a causal mask per packed row and an online softmax that tolerates rows with nothing to attend yet,
and leaves the same partials for the same combine kernel (one workspace row per (row, query)). Grid, tile sizes
and split count depend only on the shapes.
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
def _row_slots(block_table, seq_lens, block_size, device):
    """``(pos [P], length [B], valid [B, P], slot [B, P])`` for the ``P = MAXBLK * BS`` positions of every row:
    ``length`` the clamped lengths, ``slot`` each position's flat pool slot, with block 0 standing in for the table
    entries past a row's length (so those are never dereferenced). Integer ops only."""
    cap = block_table.shape[1] * block_size
    pos = torch.arange(cap, device=device)
    length = seq_lens.to(device).long().clamp(0, cap)
    valid = pos[None, :] < length[:, None]  # [B, P]
    blk = block_table.to(device).long()[:, pos // block_size]  # [B, P]
    return pos, length, valid, torch.where(valid, blk, 0) * block_size + pos % block_size


def paged_decode_attention_reference(q, k_pool, v_pool, block_table, seq_lens, scale=None):
    """PyTorch reference of :func:`paged_decode_attention` (same arguments, assumed valid).

    Gathers each row's ``MAXBLK * BS`` positions through the table (entries past the row's length are
    replaced by block 0 before the gather, so they are never dereferenced), expands the kv heads and runs an
    explicit masked softmax in fp32. Returns ``[B, H_q, D]`` in ``q``'s dtype.
    """
    batch, h_q, dim = q.shape
    n_blocks, block_size, h_kv, _ = k_pool.shape
    scale = dim ** -0.5 if scale is None else float(scale)
    _, _, valid, slot = _row_slots(block_table, seq_lens, block_size, q.device)
    k = k_pool.reshape(n_blocks * block_size, h_kv, dim)[slot].float()  # [B, P, H_kv, D]
    v = v_pool.reshape(n_blocks * block_size, h_kv, dim)[slot].float()
    k = k.transpose(1, 2).repeat_interleave(h_q // h_kv, dim=1)  # [B, H_q, P, D]
    v = v.transpose(1, 2).repeat_interleave(h_q // h_kv, dim=1)
    scores = torch.einsum("bhd,bhpd->bhp", q.float(), k) * scale
    scores = scores.masked_fill(~valid[:, None, :], -math.inf)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an empty row is all -inf: NaN -> 0
    # masked positions are zeroed explicitly so that a NaN or inf in an unused slot cannot leak in
    out = torch.einsum("bhp,bhpd->bhd", probs, v.masked_fill(~valid[:, None, :, None], 0.0))
    return out.to(q.dtype)


def paged_multi_token_attention_reference(q, k_pool, v_pool, block_table, seq_lens, scale=None):
    """PyTorch reference of :func:`paged_multi_token_attention` (same arguments, assumed valid).

    Gathers each row's ``MAXBLK * BS`` positions once (as :func:`paged_decode_attention_reference` does) for all
    of its queries, groups the query heads by kv head (no expanded K/V) and runs an explicit causally masked
    softmax in fp32. No host reads (the engine's CPU step runs it under a graph-safety check). Returns
    ``[B, Q, H_q, D]`` in ``q``'s dtype.
    """
    batch, n_q, h_q, dim = q.shape
    n_blocks, block_size, h_kv, _ = k_pool.shape
    scale = dim ** -0.5 if scale is None else float(scale)
    pos, length, valid, slot = _row_slots(block_table, seq_lens, block_size, q.device)
    k = k_pool.reshape(n_blocks * block_size, h_kv, dim)[slot].float()  # [B, P, H_kv, D]
    # positions past the length are zeroed so that a NaN or inf in an unused slot cannot leak in
    v = v_pool.reshape(n_blocks * block_size, h_kv, dim)[slot].float().masked_fill(~valid[:, :, None, None], 0.0)
    q_pos = length[:, None] - n_q + torch.arange(n_q, device=q.device)  # [B, Q]: p_j (negative: nothing)
    seen = pos[None, None, :] <= q_pos[:, :, None]  # [B, Q, P]; implies pos < length
    qg = q.float().reshape(batch, n_q, h_kv, h_q // h_kv, dim)
    scores = torch.einsum("bqkgd,bpkd->bkgqp", qg, k) * scale  # [B, H_kv, G, Q, P]
    scores = scores.masked_fill(~seen[:, None, None], -math.inf)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a query with nothing to attend: NaN -> 0
    out = torch.einsum("bkgqp,bpkd->bqkgd", probs, v)
    return out.reshape(batch, n_q, h_q, dim).to(q.dtype)


# ----------------------------------------------------------------------------------------------------------
# Triton kernel (defined lazily so that importing this module never needs Triton)
# ----------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def _paged_split_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, len_ptr,
        out_ptr, m_ptr, l_ptr, acc_ptr,
        block_size, max_len, group, qk_scale,  # max_len = MAXBLK * BS; qk_scale = scale * log2(e): base-2 softmax
        s_len, sbt_b, sbt_j,
        sq_b, sq_h, sq_d,
        sk_n, sk_s, sk_h, sk_d,  # pool strides: block, slot in block, head, dim
        sv_n, sv_s, sv_h, sv_d,
        so_b, so_h, so_d,
        HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
        NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, OFFS64: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)

        # clamp to [0, max_len] before narrowing to int32 (an int64 length may be anything)
        row_len = tl.minimum(tl.maximum(tl.load(len_ptr + b * s_len), 0), max_len).to(tl.int32)
        # every tile in [0, n_tiles) holds at least one valid position, so the running max is finite after the
        # first tile and no NaN can arise from (-inf) - (-inf)
        n_tiles = tl.cdiv(row_len, BLOCK_N)
        per_split = tl.cdiv(n_tiles, NUM_SPLITS)
        t_lo = split * per_split
        t_hi = tl.minimum(t_lo + per_split, n_tiles)

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
        bt_row = bt_ptr + b * sbt_b
        k_base = k_ptr + kvh * sk_h
        v_base = v_ptr + kvh * sv_h

        m_i = tl.full([G_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D_PAD], tl.float32)
        for tile in range(t_lo, t_hi):
            pos = tile * BLOCK_N + offs_n
            n_mask = pos < row_len
            # the table is read only for valid positions: entries past the row's length may be garbage
            blk = tl.load(bt_row + (pos // block_size) * sbt_j, mask=n_mask, other=0)
            off = pos % block_size
            if OFFS64:
                # int32 slot offsets where the pools allow (the launcher decides): 64-bit ones widen the
                # [BLOCK_N, D] address tiles (sm_90, contiguous pools, head dim 128: 112 -> 124 registers in bf16,
                # 128 -> 204 in fp32; tests/ops/sm90.py)
                blk = blk.to(tl.int64)
                off = off.to(tl.int64)
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_base + (blk * sk_n + off * sk_s)[:, None] + offs_d[None, :] * sk_d, mask=kv_mask,
                        other=0.0)
            if DOT_FP32:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [G_PAD, BLOCK_N]
            s = tl.where(n_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + (blk * sv_n + off * sv_s)[:, None] + offs_d[None, :] * sv_d, mask=kv_mask,
                        other=0.0)
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
            # attention_common's workspace: m, l [B, H_q, NUM_SPLITS]; acc [B, H_q, NUM_SPLITS, HEAD_DIM], fp32
            h_q = tl.num_programs(1) * group
            ml_off = (b * h_q + heads) * NUM_SPLITS + split
            tl.store(m_ptr + ml_off, m_i, mask=g_mask)
            tl.store(l_ptr + ml_off, l_i, mask=g_mask)
            # a split without tiles writes only (m, l) = (-inf, 0); the combine never reads its acc
            live_g = offs_g < tl.where(t_hi > t_lo, group, 0)
            tl.store(acc_ptr + ml_off[:, None] * HEAD_DIM + offs_d[None, :], acc,
                     mask=live_g[:, None] & d_mask[None, :])

    return _paged_split_kernel, combine_kernel()


@functools.lru_cache(maxsize=None)
def _multi_token_kernel():
    """The split kernel of :func:`paged_multi_token_attention` for ``Q > 1`` (the combine: attention_common's)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _paged_multi_split_kernel(
        q_ptr, k_ptr, v_ptr, bt_ptr, len_ptr,
        out_ptr, m_ptr, l_ptr, acc_ptr,
        n_q, n_qt, q_tile, block_size, max_len, group, qk_scale,  # n_qt query tiles of q_tile queries per row
        s_len, sbt_b, sbt_j,
        sq_b, sq_t, sq_h, sq_d,  # q / out strides: row, query token, head, dim
        sk_n, sk_s, sk_h, sk_d,
        sv_n, sv_s, sv_h, sv_d,
        so_b, so_t, so_h, so_d,
        HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
        NUM_SPLITS: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, OFFS64: tl.constexpr,
    ):
        b = (tl.program_id(0) // n_qt).to(tl.int64)
        qt = tl.program_id(0) % n_qt
        kvh = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)

        row_len = tl.minimum(tl.maximum(tl.load(len_ptr + b * s_len), 0), max_len).to(tl.int32)
        # query rows: M_PAD >= q_tile * group rows, query-major (row r: query qt * q_tile + r // group)
        offs_m = tl.arange(0, M_PAD)
        offs_d = tl.arange(0, D_PAD)
        offs_n = tl.arange(0, BLOCK_N)
        tok = qt * q_tile + offs_m // group
        m_mask = (offs_m < q_tile * group) & (tok < n_q)
        d_mask = offs_d < HEAD_DIM
        heads = kvh * group + offs_m % group
        seen = row_len - n_q + 1 + tok  # query tok attends positions [0, seen); <= 0: nothing
        # the program's last query bounds the positions it reads: no tile past it, nothing at or past row_len
        hi = tl.maximum(row_len - n_q + tl.minimum(n_q, qt * q_tile + q_tile), 0)
        n_tiles = tl.cdiv(hi, BLOCK_N)
        per_split = tl.cdiv(n_tiles, NUM_SPLITS)
        t_lo = split * per_split
        t_hi = tl.minimum(t_lo + per_split, n_tiles)

        q = tl.load(q_ptr + b * sq_b + tok[:, None] * sq_t + heads[:, None] * sq_h + offs_d[None, :] * sq_d,
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # [M_PAD, D_PAD]
        if DOT_FP32:
            q = q.to(tl.float32)
        bt_row = bt_ptr + b * sbt_b
        k_base = k_ptr + kvh * sk_h
        v_base = v_ptr + kvh * sv_h

        m_i = tl.full([M_PAD], float("-inf"), tl.float32)
        l_i = tl.zeros([M_PAD], tl.float32)
        acc = tl.zeros([M_PAD, D_PAD], tl.float32)
        for tile in range(t_lo, t_hi):
            pos = tile * BLOCK_N + offs_n
            n_mask = pos < hi
            blk = tl.load(bt_row + (pos // block_size) * sbt_j, mask=n_mask, other=0)
            off = pos % block_size
            if OFFS64:
                blk = blk.to(tl.int64)
                off = off.to(tl.int64)
            kv_mask = n_mask[:, None] & d_mask[None, :]
            k = tl.load(k_base + (blk * sk_n + off * sk_s)[:, None] + offs_d[None, :] * sk_d, mask=kv_mask,
                        other=0.0)
            if DOT_FP32:
                k = k.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [M_PAD, BLOCK_N]
            s = tl.where((pos[None, :] < seen[:, None]) & n_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a query row may have nothing to attend in this tile or split yet (m_new = -inf): shift by 0
            # instead, so that exp2(-inf - -inf) = NaN never arises (its p and alpha are then 0)
            m_use = tl.where(m_new > float("-inf"), m_new, 0.0)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + (blk * sv_n + off * sv_s)[:, None] + offs_d[None, :] * sv_d, mask=kv_mask,
                        other=0.0)
            p = p.to(v.dtype)  # the P @ V product runs on the cache dtype, like flash attention
            if DOT_FP32:
                p = p.to(tl.float32)
                v = v.to(tl.float32)
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
            m_i = m_new

        if NUM_SPLITS == 1:
            denom = tl.where(l_i > 0, l_i, 1.0)  # a query with nothing to attend: acc = 0, output 0
            o = acc / denom[:, None]
            tl.store(out_ptr + b * so_b + tok[:, None] * so_t + heads[:, None] * so_h + offs_d[None, :] * so_d,
                     o.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
        else:
            # attention_common's workspace with one row per (row, query): [B * Q, H_q, NUM_SPLITS(, HEAD_DIM)]
            h_q = tl.num_programs(1) * group
            ml_off = ((b * n_q + tok) * h_q + heads) * NUM_SPLITS + split
            tl.store(m_ptr + ml_off, m_i, mask=m_mask)
            tl.store(l_ptr + ml_off, l_i, mask=m_mask)
            # a split without tiles leaves its acc unwritten: the combine reads acc only where m > -inf
            live = m_mask & (offs_m < tl.where(t_hi > t_lo, M_PAD, 0))
            tl.store(acc_ptr + ml_off[:, None] * HEAD_DIM + offs_d[None, :], acc,
                     mask=live[:, None] & d_mask[None, :])

    return _paged_multi_split_kernel


def default_paged_num_splits(batch: int, h_kv: int, max_blocks: int, block_size: int, head_dim: int,
                             device: torch.device) -> int:
    """Splits per (row, kv head): :func:`.attention_common.default_num_splits` for a row capacity of
    ``max_blocks * block_size`` positions (shapes only, so a captured graph keeps its grid)."""
    return default_num_splits(batch, h_kv, max_blocks * block_size, head_dim, device)


_OFFS64_FROM = 2**31  # element offsets in a pool from here on need 64-bit arithmetic (tests lower it)


def _max_offset(t: torch.Tensor) -> int:
    """The largest element offset of ``t`` from its first element (any strides)."""
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


def _offs64(k_pool: torch.Tensor, v_pool: torch.Tensor) -> bool:
    """Whether the kernels need 64-bit slot offsets for these pools (the ``OFFS64`` constexpr)."""
    return max(_max_offset(k_pool), _max_offset(v_pool)) >= _OFFS64_FROM


def _paged_triton(q, k_pool, v_pool, block_table, seq_lens, scale, num_splits, out):
    split_kernel, _ = _kernels()
    batch, h_q, dim = q.shape
    block_size, h_kv = k_pool.shape[1], k_pool.shape[2]
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
            q, k_pool, v_pool, block_table, seq_lens, out, m_ws, l_ws, acc_ws,
            block_size, block_table.shape[1] * block_size, group, scale * LOG2E,
            seq_lens.stride(0), *block_table.stride(),
            *q.stride(), *k_pool.stride(), *v_pool.stride(), *out.stride(),
            HEAD_DIM=dim, D_PAD=d_pad, G_PAD=g_pad, BLOCK_N=block_n(d_pad), NUM_SPLITS=num_splits,
            PRECISION=precision, DOT_FP32=dot_fp32, OFFS64=_offs64(k_pool, v_pool), num_warps=4,
        )
        if num_splits > 1:
            launch_combine(out, m_ws, l_ws, acc_ws, num_splits)
    return out


def multi_token_rows(dtype: torch.dtype, head_dim: int) -> int:
    """Query rows (queries x the group's heads) one program of the multi-token kernel takes at most, where the
    group allows: the most that compile for sm_90 at 4 warps without spilling (tests/ops/sm90.py: 16-bit,
    head dim 128: 64 rows, 222 registers; fp32 runs its dots without tensor cores and spills past 16 rows)."""
    if dtype == torch.float32:
        return 16
    return 64 if next_pow2(head_dim) <= 128 else 32


def multi_token_tiling(n_q: int, group: int, max_rows: int) -> tuple[int, int]:
    """``(n_qt, q_tile)``: the multi-token kernel splits a row's ``n_q`` queries into ``n_qt`` tiles of at most
    ``q_tile`` queries, ``q_tile * group <= max_rows`` (one query per tile when the group alone is that wide),
    balanced so that no tile is nearly empty. Shapes only."""
    widest = max(1, max_rows // group)
    n_qt = -(-n_q // widest)
    return n_qt, -(-n_q // n_qt)


def _multi_token_triton(q, k_pool, v_pool, block_table, seq_lens, scale, num_splits, out):
    batch, n_q, h_q, dim = q.shape
    block_size, h_kv = k_pool.shape[1], k_pool.shape[2]
    group = h_q // h_kv
    n_qt, q_tile = multi_token_tiling(n_q, group, multi_token_rows(q.dtype, dim))
    d_pad = next_pow2(max(dim, 16))
    m_pad = next_pow2(max(q_tile * group, 16))  # tl.dot needs every dimension >= 16
    dot_fp32, precision = dot_options(q.dtype)
    if num_splits > 1:
        m_ws, l_ws, acc_ws = split_workspace(batch * n_q, h_q, num_splits, dim, q.device)
    else:
        m_ws = l_ws = acc_ws = out  # unused by the kernel in this case
    with launch.on_device(q):
        _multi_token_kernel()[(batch * n_qt, h_kv, num_splits)](
            q, k_pool, v_pool, block_table, seq_lens, out, m_ws, l_ws, acc_ws,
            n_q, n_qt, q_tile, block_size, block_table.shape[1] * block_size, group, scale * LOG2E,
            seq_lens.stride(0), *block_table.stride(),
            *q.stride(), *k_pool.stride(), *v_pool.stride(), *out.stride(),
            HEAD_DIM=dim, D_PAD=d_pad, M_PAD=m_pad, BLOCK_N=block_n(d_pad), NUM_SPLITS=num_splits,
            PRECISION=precision, DOT_FP32=dot_fp32, OFFS64=_offs64(k_pool, v_pool), num_warps=4,
        )
        if num_splits > 1:
            # the combine writes [B * Q, H_q, D] rows: into out itself where its strides allow, else staged
            rows = _rows_view(out)
            staged = rows is None
            if staged:
                rows = out.new_empty((batch * n_q, h_q, dim))
            launch_combine(rows, m_ws, l_ws, acc_ws, num_splits)
            if staged:
                out.copy_(rows.view(out.shape))
    return out


def _rows_view(out: torch.Tensor):
    """``out`` ``[B, Q, H_q, D]`` viewed as ``[B * Q, H_q, D]``, or None where its strides do not allow it."""
    try:
        return out.view(-1, *out.shape[2:])
    except RuntimeError:
        return None


# ----------------------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------------------
def _check_inputs(q, k_pool, v_pool, block_table, seq_lens, q_layout="[B, H_q, D]"):
    require_tensors(q=q, k_pool=k_pool, v_pool=v_pool, block_table=block_table, seq_lens=seq_lens)
    q_dims = q_layout.count(",") + 1
    if q.dim() != q_dims:
        raise ValueError(f"q: expected a {q_dims}-D tensor {q_layout}, got shape {tuple(q.shape)}")
    if q_dims == 4 and q.shape[1] == 0:
        raise ValueError(f"q: expected at least one query token per row (Q >= 1), got shape {tuple(q.shape)}")
    for name, t in (("k_pool", k_pool), ("v_pool", v_pool)):
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor [NB, BS, H_kv, D], got shape {tuple(t.shape)}")
    for name, t in (("q", q), ("k_pool", k_pool), ("v_pool", v_pool)):
        require_float(name, t)
    for name, t in (("k_pool", k_pool), ("v_pool", v_pool)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from q's {q.dtype}")
    batch, h_q, dim = q.shape[0], q.shape[-2], q.shape[-1]
    if k_pool.shape != v_pool.shape:
        raise ValueError(f"v_pool: shape {tuple(v_pool.shape)} differs from k_pool's {tuple(k_pool.shape)}")
    n_blocks, block_size, h_kv, kd = k_pool.shape
    if kd != dim:
        raise ValueError(f"k_pool: head dim {kd} differs from q's {dim}")
    if not 0 < dim <= MAX_HEAD_DIM:
        raise ValueError(f"q: head dim must be in [1, {MAX_HEAD_DIM}], got {dim}")
    if h_kv == 0 or h_q % h_kv != 0:
        raise ValueError(f"k_pool: the number of query heads ({h_q}) must be a positive multiple of the "
                         f"number of kv heads ({h_kv})")
    if n_blocks == 0 or block_size == 0:
        raise ValueError(f"k_pool: the pool has no slots (shape {tuple(k_pool.shape)})")
    if block_table.dim() != 2 or block_table.shape[0] != batch or block_table.shape[1] == 0:
        raise ValueError(f"block_table: expected a tensor of shape [{batch}, MAXBLK >= 1], got shape "
                         f"{tuple(block_table.shape)}")
    if block_table.dtype not in INDEX_DTYPES:
        raise TypeError(f"block_table: expected an int32 or int64 tensor, got {block_table.dtype}")
    if seq_lens.shape != (batch,):
        raise ValueError(f"seq_lens: expected a tensor of shape [{batch}], got shape {tuple(seq_lens.shape)}")
    if seq_lens.dtype not in INDEX_DTYPES:
        raise TypeError(f"seq_lens: expected an int32 or int64 tensor, got {seq_lens.dtype}")
    for name, t in (("k_pool", k_pool), ("v_pool", v_pool), ("block_table", block_table), ("seq_lens", seq_lens)):
        if t.device != q.device:
            raise ValueError(f"{name}: on {t.device}, q is on {q.device}")


def paged_decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    backend: str = "auto",
    *,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one new query token per row over a paged KV cache (module docstring: exact semantics).

    Parameters
    ----------
    q : torch.Tensor
        ``[B, H_q, D]`` query of the new token; float32, bfloat16 or float16; any strides.
    k_pool, v_pool : torch.Tensor
        ``[NB, BS, H_kv, D]`` the layer's key and value pools (any block size ``BS``), q's dtype and device, any
        strides. ``H_q`` must be a multiple of ``H_kv`` (K/V are not expanded); ``D`` up to 256.
    block_table : torch.Tensor
        ``[B, MAXBLK]`` int32 (or int64) on q's device, any strides: row ``b``'s logical block ``i`` (positions
        ``i * BS .. i * BS + BS - 1``) is physical block ``block_table[b, i]``. Only the entries below
        ``cdiv(seq_lens[b], BS)`` are read, and those must be in ``[0, NB)`` (not checked).
    seq_lens : torch.Tensor
        ``[B]`` int32/int64 on q's device, any stride: row ``b`` attends positions ``[0, seq_lens[b])``
        (including the new token), clamped to ``[0, MAXBLK * BS]``; 0 gives a zero row. Never read on the host.
    scale : float, optional
        Softmax scale; default ``D ** -0.5``.
    backend : {"auto", "triton", "torch"}
        As for :func:`rast_kernels.decode_attention`.
    num_splits : int, optional
        Flash-decoding splits per (row, kv head) in [1, 64]; default :func:`default_paged_num_splits` (shapes
        only). Keep it fixed across the replays of a captured graph.
    out : torch.Tensor, optional
        Preallocated ``[B, H_q, D]`` output in q's dtype on q's device, written in place and returned.

    Returns
    -------
    torch.Tensor
        ``[B, H_q, D]`` in q's dtype (fp32 accumulation).
    """
    _check_inputs(q, k_pool, v_pool, block_table, seq_lens)
    batch, h_q, dim = q.shape
    scale, num_splits = attention_options(q, scale, num_splits, out, MAX_SPLITS)
    backend = _backends.resolve_triton_or_torch(backend, q.device)

    if backend == "torch":
        res = paged_decode_attention_reference(q, k_pool, v_pool, block_table, seq_lens, scale)
        return out.copy_(res) if out is not None else res
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if batch == 0 or h_q == 0:
        return out
    if num_splits is None:
        num_splits = default_paged_num_splits(batch, k_pool.shape[2], block_table.shape[1], k_pool.shape[1], dim,
                                              q.device)
    return _paged_triton(q, k_pool, v_pool, block_table, seq_lens, scale, num_splits, out)


def paged_multi_token_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float | None = None,
    backend: str = "auto",
    *,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``Q`` new query tokens per row over a paged KV cache, causal among them (module docstring:
    exact semantics). The arguments are :func:`paged_decode_attention`'s but for ``q``, ``seq_lens`` and ``out``:

    Parameters
    ----------
    q : torch.Tensor
        ``[B, Q, H_q, D]`` queries of the row's ``Q >= 1`` new tokens, in position order; any strides.
    seq_lens : torch.Tensor
        ``[B]`` int32/int64 on q's device: each row's cache length ``L`` *including* its ``Q`` new tokens (whose
        keys and values are already in the pools), clamped to ``[0, MAXBLK * BS]``. Query ``j`` attends positions
        ``[0, L - Q + j]``; one with ``L - Q + j < 0`` gets zeros. Never read on the host.
    num_splits : int, optional
        Splits per (row, query tile, kv head) in [1, 64]; default :func:`default_paged_num_splits` for the
        ``B * n_qt`` programs per kv head (shapes only). Keep it fixed across the replays of a captured graph.
    out : torch.Tensor, optional
        Preallocated ``[B, Q, H_q, D]`` output in q's dtype on q's device, written in place and returned.

    Returns
    -------
    torch.Tensor
        ``[B, Q, H_q, D]`` in q's dtype (fp32 accumulation). ``Q == 1`` runs :func:`paged_decode_attention`
        (the same kernel or reference: the same bits).
    """
    _check_inputs(q, k_pool, v_pool, block_table, seq_lens, q_layout="[B, Q, H_q, D]")
    batch, n_q, h_q, dim = q.shape
    scale, num_splits = attention_options(q, scale, num_splits, out, MAX_SPLITS)
    if n_q == 1:  # exactly the decode op (its kernel or its reference): the same bits
        one = paged_decode_attention(q[:, 0], k_pool, v_pool, block_table, seq_lens, scale, backend,
                                     num_splits=num_splits, out=None if out is None else out[:, 0])
        return one.unsqueeze(1) if out is None else out
    backend = _backends.resolve_triton_or_torch(backend, q.device)
    if backend == "torch":
        res = paged_multi_token_attention_reference(q, k_pool, v_pool, block_table, seq_lens, scale)
        return out.copy_(res) if out is not None else res
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if batch == 0 or h_q == 0:
        return out
    if num_splits is None:
        n_qt = multi_token_tiling(n_q, h_q // k_pool.shape[2], multi_token_rows(q.dtype, dim))[0]
        num_splits = default_paged_num_splits(batch * n_qt, k_pool.shape[2], block_table.shape[1], k_pool.shape[1],
                                              dim, q.device)
    return _multi_token_triton(q, k_pool, v_pool, block_table, seq_lens, scale, num_splits, out)
