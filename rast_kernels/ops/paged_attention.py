"""``paged_decode_attention``: single-token (decode) attention over a paged KV cache, with grouped-query heads.

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
``(max, sum, acc)`` that :mod:`.decode_attention`'s combine kernel merges (same workspace layout). The tile width
``BLOCK_N`` is independent of the block size: each position's slot is looked up in the table on its own
(``j // BS``, ``j % BS``), so any ``BS`` works (16, but also 7 or 13) and one tile may span several physical
blocks. Slot offsets are 32-bit unless a pool spans ``2**31`` elements (fewer registers; a compile-time choice
from the pools' shapes and strides). The grid depends only on the shapes; ``seq_lens`` and the table are read on
the device only, so the launch can be captured in a CUDA graph and replayed with new lengths and tables.
"""
from __future__ import annotations

import functools
import math

import torch

from .. import _backends
from ._checks import INDEX_DTYPES, attention_options, require_float, require_tensors
from .decode_attention import _LOG2E, _MAX_HEAD_DIM, _MAX_SPLITS, _block_n, _next_pow2, default_num_splits
from .decode_attention import _kernels as _dense_kernels


# ----------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------
def paged_decode_attention_reference(q, k_pool, v_pool, block_table, seq_lens, scale=None):
    """PyTorch reference of :func:`paged_decode_attention` (same arguments, assumed valid).

    Gathers each row's ``MAXBLK * BS`` positions through the table (entries past the row's length are
    replaced by block 0 before the gather, so they are never dereferenced), expands the kv heads and runs an
    explicit masked softmax in fp32. Returns ``[B, H_q, D]`` in ``q``'s dtype.
    """
    batch, h_q, dim = q.shape
    n_blocks, block_size, h_kv, _ = k_pool.shape
    scale = dim ** -0.5 if scale is None else float(scale)
    cap = block_table.shape[1] * block_size
    pos = torch.arange(cap, device=q.device)
    length = seq_lens.to(q.device).long().clamp(0, cap)
    valid = pos[None, :] < length[:, None]  # [B, P]
    blk = block_table.to(q.device).long()[:, pos // block_size]  # [B, P]
    slot = torch.where(valid, blk, 0) * block_size + pos % block_size
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
            # decode_attention's workspace: m, l [B, H_q, NUM_SPLITS]; acc [B, H_q, NUM_SPLITS, HEAD_DIM], fp32
            h_q = tl.num_programs(1) * group
            ml_off = (b * h_q + heads) * NUM_SPLITS + split
            tl.store(m_ptr + ml_off, m_i, mask=g_mask)
            tl.store(l_ptr + ml_off, l_i, mask=g_mask)
            # a split without tiles writes only (m, l) = (-inf, 0); the combine never reads its acc
            live_g = offs_g < tl.where(t_hi > t_lo, group, 0)
            tl.store(acc_ptr + ml_off[:, None] * HEAD_DIM + offs_d[None, :], acc,
                     mask=live_g[:, None] & d_mask[None, :])

    return _paged_split_kernel, _dense_kernels()[1]


def default_paged_num_splits(batch: int, h_kv: int, max_blocks: int, block_size: int, head_dim: int,
                             device: torch.device) -> int:
    """Splits per (row, kv head): :func:`.decode_attention.default_num_splits` for a row capacity of
    ``max_blocks * block_size`` positions (shapes only, so a captured graph keeps its grid)."""
    return default_num_splits(batch, h_kv, max_blocks * block_size, head_dim, device)


_OFFS64_FROM = 2**31  # element offsets in a pool from here on need 64-bit arithmetic (tests lower it)


def _max_offset(t: torch.Tensor) -> int:
    """The largest element offset of ``t`` from its first element (any strides)."""
    return sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


def _paged_triton(q, k_pool, v_pool, block_table, seq_lens, scale, num_splits, out):
    split_kernel, combine_kernel = _kernels()
    batch, h_q, dim = q.shape
    block_size, h_kv = k_pool.shape[1], k_pool.shape[2]
    group = h_q // h_kv
    d_pad = _next_pow2(max(dim, 16))
    g_pad = _next_pow2(max(group, 16))  # tl.dot needs every dimension >= 16
    block_n = _block_n(d_pad)
    # As in decode_attention: the Triton interpreter (3.9) computes bf16 x bf16 tl.dot wrongly, so there the
    # operands go to fp32 first (products of 16-bit floats are exact in fp32).
    dot_fp32 = q.dtype == torch.bfloat16 and _backends.triton_interpreting()
    precision = "ieee" if q.dtype == torch.float32 or dot_fp32 else "tf32"
    if num_splits > 1:
        m_ws = torch.empty((batch, h_q, num_splits), dtype=torch.float32, device=q.device)
        l_ws = torch.empty_like(m_ws)
        acc_ws = torch.empty((batch, h_q, num_splits, dim), dtype=torch.float32, device=q.device)
    else:
        m_ws = l_ws = acc_ws = out  # unused by the kernel in this case
    split_kernel[(batch, h_kv, num_splits)](
        q, k_pool, v_pool, block_table, seq_lens, out, m_ws, l_ws, acc_ws,
        block_size, block_table.shape[1] * block_size, group, scale * _LOG2E,
        seq_lens.stride(0), *block_table.stride(),
        *q.stride(), *k_pool.stride(), *v_pool.stride(), *out.stride(),
        HEAD_DIM=dim, D_PAD=d_pad, G_PAD=g_pad, BLOCK_N=block_n, NUM_SPLITS=num_splits, PRECISION=precision,
        DOT_FP32=dot_fp32, OFFS64=max(_max_offset(k_pool), _max_offset(v_pool)) >= _OFFS64_FROM, num_warps=4,
    )
    if num_splits > 1:
        combine_kernel[(batch, h_q)](
            out, m_ws, l_ws, acc_ws, *out.stride(),
            HEAD_DIM=dim, D_PAD=d_pad, NUM_SPLITS=num_splits, S_PAD=_next_pow2(num_splits), num_warps=4,
        )
    return out


# ----------------------------------------------------------------------------------------------------------
# Public op
# ----------------------------------------------------------------------------------------------------------
def _check_inputs(q, k_pool, v_pool, block_table, seq_lens):
    require_tensors(q=q, k_pool=k_pool, v_pool=v_pool, block_table=block_table, seq_lens=seq_lens)
    if q.dim() != 3:
        raise ValueError(f"q: expected a 3-D tensor [B, H_q, D], got shape {tuple(q.shape)}")
    for name, t in (("k_pool", k_pool), ("v_pool", v_pool)):
        if t.dim() != 4:
            raise ValueError(f"{name}: expected a 4-D tensor [NB, BS, H_kv, D], got shape {tuple(t.shape)}")
    for name, t in (("q", q), ("k_pool", k_pool), ("v_pool", v_pool)):
        require_float(name, t)
    for name, t in (("k_pool", k_pool), ("v_pool", v_pool)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from q's {q.dtype}")
    batch, h_q, dim = q.shape
    if k_pool.shape != v_pool.shape:
        raise ValueError(f"v_pool: shape {tuple(v_pool.shape)} differs from k_pool's {tuple(k_pool.shape)}")
    n_blocks, block_size, h_kv, kd = k_pool.shape
    if kd != dim:
        raise ValueError(f"k_pool: head dim {kd} differs from q's {dim}")
    if not 0 < dim <= _MAX_HEAD_DIM:
        raise ValueError(f"q: head dim must be in [1, {_MAX_HEAD_DIM}], got {dim}")
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
    scale, num_splits = attention_options(q, scale, num_splits, out, _MAX_SPLITS)
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
