"""Triton kernels of :func:`rast_kernels.rast_sample` (the spec is the module docstring of :mod:`.rast_sample`).

Two launches per call, nothing read back to the host, grid a function of ``(B, vocab_size)`` only, so a
call can be captured in a CUDA graph (after one eager warm-up call, which compiles the kernels and sizes
the cached workspace).

Kernel 1, grid ``(B, NCHUNK)``: each program reads its ``CHUNK`` columns of the three inputs once and
computes ``z = base + alpha * (expert - expert_base)`` (fp32; ``-inf`` in any input masks the column),
``z' = z / T`` and, per chunk: a bad flag (NaN or ``+inf`` in ``z``), ``max z'`` and ``sum exp(z' - max)``,
the greedy argmax of ``z`` and, for rows without an active filter, the exponential-race winner
``argmax (z' - log E)`` with its ``z'``. When a filter may be active (decided on the host from the
argument types/values) it also stores ``z'`` into a workspace ``[B, NCHUNK * CHUNK]`` (``-inf`` padded).

Kernel 2, grid ``(B,)``: merges the chunk statistics. Greedy rows (``T == 0``, or ``T`` so small that
``max z / T`` overflows) and rows without an active filter finish there, without a second pass over
the row. Rows with an active filter find the exact kept set on
the workspace row: fp32 ``z'`` maps to an order-preserving int32 key (``bits ^ ((bits >> 31) & 0x7fffffff)``,
signed compare), and with ``C(t) = #{key >= t}`` and ``H(t) = sum exp(z' - max) over key >= t``:

* top-k threshold ``tau_k = (smallest t with C(t) < k) - 1``;
* top-p on the top-k-kept set, ``S_k = H(tau_k)``: ``tau_p = (smallest t > tau_k with H(t) < p * S_k) - 1``
  (``S_k`` is summed here from the same terms ``exp(z' - max)`` as ``H``, with one exp, also without top-k:
  not taken from kernel 1's chunk sums, which round differently);
* keep ``key >= max(tau_k, tau_p)`` and (min-p) ``exp(z' - max) >= min_p``.

Both searches are a multi-pivot bisection on the keys: a pass over the row evaluates the predicate at
``NP = 16`` lanes (the bracket ends and 14 pivots: a ``[BLOCK, NP]`` compare + reduce) and snaps the new
bracket to the nearest element keys (the predicates only change just above an element key). The first
pass puts its pivots at ``max - d`` for ``d`` from 0 to ~90 (where thresholds of real rows lie), later
passes evenly in key space, so the key interval shrinks at least 15-fold per pass: at most 10 passes for
any fp32 data, a few for typical rows, 1-2 for small vocabularies or coarse ties. ``C`` and ``H`` are monotone in ``t``
even in floating point (non-negative terms summed in a fixed order), so the result is the exact
boundary, ties kept. A last pass over the kept columns recomputes the Philox noise, runs the race and
sums the kept mass for the logprob; blocks with no kept column are skipped.

Why this and not the alternatives:

* FlashInfer's rejection sampling (sample, then accept/reject against a pivot, repeat) draws a token
  with the right *distribution* but not *the* token of the spec: our draw is a deterministic function of
  ``(seed, offset, column)`` and the kept set, identical on every backend, and the loop count is data
  dependent.
* AIR top-p (radix select over histograms) needs several launches or grid-wide synchronisation for a
  single row spread over many programs, and its per-bucket mass sums are order-dependent.
* vLLM's pivot-based truncation (Qrita) guesses thresholds from a statistical model of the logits and
  refines them on float pivots; the key bisection here needs no model, is bounded (<= 10 passes) for any
  data, and ends on the exact boundary with ties kept, as the spec requires.

Seeds: a ``[B]`` seed tensor is read as given; a number seed arrives as two int32 halves and each program
derives its row's Philox key ``mix_seed(seed, row)`` (:func:`.philox.mix_seed`) in uint64 arithmetic, so a
call with a number seed needs no device tensor built on the host.

Exactness notes: the combination, ``z / T`` (IEEE division ``div_rn``), the noise (Philox4x32-10 on
uint32 with ``umulhi``, and ``E`` from the words operation for operation as
:func:`.philox.exponential_from_words`) are computed without FMA contraction (``enable_fp_fusion=False``)
so they round exactly as the PyTorch reference; ``log``/``exp`` use libdevice's ``logf``/``expf`` on GPU
(the functions PyTorch's CUDA kernels call). Under ``TRITON_INTERPRET=1`` they are NumPy's, which may
differ from PyTorch's CPU ``log`` in the last bit: a race between two columns whose keys agree to
~1e-7 relative could then go the other way.
"""
from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import torch
import triton
import triton.language as tl

try:  # triton >= 3.2: backend-dispatching stubs
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover
    from triton.language.extra.cuda import libdevice

from .. import _backends
from . import launch

# Reductions go through tl.reduce with the standard combine functions (what tl.max / tl.min / tl.sum do
# for fp32 / int32): the interpreter runs these natively, whereas every tl.max call, itself a
# @triton.jit function, costs it milliseconds.
try:
    from triton.language.standard import _elementwise_max as _cmax
    from triton.language.standard import _elementwise_min as _cmin
    from triton.language.standard import _sum_combine as _csum
except ImportError:  # pragma: no cover - private names; same combine functions, slower interpreter
    @triton.jit
    def _cmax(a, b):
        return tl.maximum(a, b)

    @triton.jit
    def _cmin(a, b):
        return tl.minimum(a, b)

    @triton.jit
    def _csum(a, b):
        return a + b

__all__ = ["rast_sample_triton", "philox_noise_triton", "launch_config", "reserve_workspace", "workspace_device"]

# kernel constants (globals used in @triton.jit code must be tl.constexpr)
_NEG_INF = tl.constexpr(float("-inf"))
_POS_INF = tl.constexpr(float("inf"))
_NAN = tl.constexpr(float("nan"))
_INT32_MAX = tl.constexpr(2**31 - 1)
_INT32_MIN = tl.constexpr(-(2**31))
# key(-inf) = 0xff800000 ^ 0x7fffffff as int32: the smallest key of any non-NaN value
_KEY_NEG_INF = tl.constexpr(-2139095041)
NUM_PIVOTS = 16  # lanes per bisection pass: lo, 14 pivots, hi

# launch tuning (V = 152064 on an H100: B=1 -> CHUNK 512, 297 chunks; B=8 -> 4096, 38 chunks; B>=32 -> 16384)
MIN_CHUNK = 512
MAX_CHUNK = 16384
BLOCK1 = 1024  # columns per iteration in kernel 1
BLOCK2 = 512  # columns per iteration in kernel 2 (times NUM_PIVOTS lanes for the pivot compare)


# ----------------------------------------------------------------------------------------------------
# device code. Under TRITON_INTERPRET=1 every nested @triton.jit call costs milliseconds (the interpreter
# re-patches triton.language per call), so code inside the column loops is inlined by hand and helpers
# are called once per program (row setup, the threshold searches), which keeps the test suite fast. Key of an fp32 value (order-preserving, signed int32 compare):
#     b = bits(x == 0 ? +0.0 : x);  key = b ^ ((b >> 31) & 0x7fffffff)
# (-0.0 is mapped to +0.0 first so that values the spec ties get equal keys).
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _philox_noise(cols, k0, k1, c1, c2, PRECISE: tl.constexpr):
    """(words, E) per column. words: uint32 Philox4x32-10 output lane ``col & 3`` under key (k0, k1) and
    counter (col >> 2, c1, c2, 0), as :func:`.philox.random_words`; E: Exp(1) fp32 computed operation for
    operation as :func:`.philox.exponential_from_words`."""
    x0 = (cols >> 2).to(tl.uint32)
    zero = tl.zeros(x0.shape, tl.uint32)
    x1 = zero + c1
    x2 = zero + c2
    x3 = zero
    for r in tl.static_range(10):
        if r > 0:
            k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
            k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
        hi0 = tl.umulhi(x0, 0xD2511F53)
        lo0 = tl.mul(x0, 0xD2511F53, sanitize_overflow=False)
        hi1 = tl.umulhi(x2, 0xCD9E8D57)
        lo1 = tl.mul(x2, 0xCD9E8D57, sanitize_overflow=False)
        x0, x1, x2, x3 = hi1 ^ x1 ^ k0, lo1, hi0 ^ x3 ^ k1, lo0
    lane = cols & 3
    words = tl.where(lane == 0, x0, tl.where(lane == 1, x1, tl.where(lane == 2, x2, x3)))
    w = words.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10  # x * 2^-32 + 2^-33
    w = tl.minimum(w, 0.99999994039535522)  # 1 - 2^-24
    series = w * (1.0 + w * (0.5 + w * (0.3333333432674408 + w * 0.25)))  # 0.333.. = fp32(1/3)
    if PRECISE:
        lg = libdevice.log(1.0 - w)
    else:
        lg = tl.log(1.0 - w)
    return words, tl.where(w < 0.0078125, series, -lg)


# ---------------------------------------------------------------------------- kernel 1: one chunk of a row
@triton.jit
def _row_float(row, ptr, val, FROM_TENSOR: tl.constexpr):
    """A float parameter of row ``row``: element ``row`` of a ``[B]`` fp32 tensor when ``FROM_TENSOR``, else the
    number given for all rows (cast: the interpreter types a tiny float as fp64)."""
    if FROM_TENSOR:
        x = tl.load(ptr + row)
    else:
        x = tl.cast(val, tl.float32)
    return x


@triton.jit
def _row_params(row, temp_ptr, temp_val, topk_ptr, topk_val, topp_ptr, topp_val, minp_ptr, minp_val,
                TEMP_T: tl.constexpr, TOPK_T: tl.constexpr, TOPP_T: tl.constexpr, MINP_T: tl.constexpr):
    """The row's (temperature, top_k, top_p, min_p): element ``row`` of a ``[B]`` tensor where the flag is
    set, else the number given for all rows."""
    if TOPK_T:
        k = tl.load(topk_ptr + row)
    else:
        k = topk_val
    return (_row_float(row, temp_ptr, temp_val, TEMP_T), k, _row_float(row, topp_ptr, topp_val, TOPP_T),
            _row_float(row, minp_ptr, minp_val, MINP_T))


@triton.jit
def _row_words(row, ptr, lo, hi, FROM_TENSOR: tl.constexpr):
    """(low, high) uint32 words of row ``row``'s int64: element ``row`` of a ``[B]`` tensor when ``FROM_TENSOR``,
    else the host number given as two int32 halves."""
    if FROM_TENSOR:
        x = tl.load(ptr + row)
        w0 = x.to(tl.uint32)
        w1 = (x >> 32).to(tl.uint32)
    else:
        w0 = lo.to(tl.uint32, bitcast=True)
        w1 = hi.to(tl.uint32, bitcast=True)
    return w0, w1


@triton.jit
def _mixed_seed_words(row, lo, hi):
    """(low, high) uint32 words of ``mix_seed(seed, row)`` (:func:`.philox.mix_seed`, SplitMix64's finaliser,
    uint64 wrap-around arithmetic) for the host number ``seed`` given as two int32 halves. Computed here, not
    on the host, so that a call with a number seed needs no ``[B]`` seed tensor (no host-to-device copy: the
    call stays capturable in a CUDA graph)."""
    s = (hi.to(tl.uint32, bitcast=True).to(tl.uint64) << 32) | lo.to(tl.uint32, bitcast=True).to(tl.uint64)
    z = tl.add(s, tl.mul(row.to(tl.uint64) + 1, 0x9E3779B97F4A7C15, sanitize_overflow=False),
               sanitize_overflow=False)
    z = tl.mul(z ^ (z >> 30), 0xBF58476D1CE4E5B9, sanitize_overflow=False)
    z = tl.mul(z ^ (z >> 27), 0x94D049BB133111EB, sanitize_overflow=False)
    z = z ^ (z >> 31)
    return z.to(tl.uint32), (z >> 32).to(tl.uint32)


@triton.jit
def _philox_key(row, seed_ptr, seed_lo, seed_hi, off_ptr, off_lo, off_hi, SEED_T: tl.constexpr,
                OFF_T: tl.constexpr):
    """The row's Philox key (k0, k1) = seed words and counter words (c1, c2) = offset words (uint32), from
    ``[B]`` int64 tensors or from host numbers split into 32-bit halves. A ``[B]`` seed is used as given; a
    number seed is mixed with the row index (the spec: row ``b`` draws with ``mix_seed(seed, b)``)."""
    if SEED_T:
        k0, k1 = _row_words(row, seed_ptr, seed_lo, seed_hi, SEED_T)
    else:
        k0, k1 = _mixed_seed_words(row, seed_lo, seed_hi)
    c1, c2 = _row_words(row, off_ptr, off_lo, off_hi, OFF_T)
    return k0, k1, c1, c2


@triton.jit(do_not_specialize=["alpha_val", "temp_val", "topk_val", "topp_val", "minp_val",
                               "seed_lo", "seed_hi", "off_lo", "off_hi"])
def _rast_chunk_kernel(
    base_ptr, expert_ptr, ebase_ptr, stride_b, stride_e, stride_eb,
    alpha_ptr, alpha_val, temp_ptr, temp_val, topk_ptr, topk_val, topp_ptr, topp_val, minp_ptr, minp_val,
    seed_ptr, seed_lo, seed_hi, off_ptr, off_lo, off_hi,
    ws_ptr, fstat_ptr, istat_ptr, V, NCHUNK, NSTAT,
    e2_ptr, eb2_ptr, stride_e2, stride_eb2, e3_ptr, eb3_ptr, stride_e3, stride_eb3,
    e4_ptr, eb4_ptr, stride_e4, stride_eb4, pmax_ptr, plog_ptr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    ALPHA_T: tl.constexpr, TEMP_T: tl.constexpr, TOPK_T: tl.constexpr, TOPP_T: tl.constexpr,
    MINP_T: tl.constexpr, SEED_T: tl.constexpr, OFF_T: tl.constexpr,
    FILTER: tl.constexpr, PRECISE: tl.constexpr, NPAIRS: tl.constexpr = 1, PLAUS: tl.constexpr = False,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    row64 = row.to(tl.int64)
    # per-row parameters: a [B] tensor (flag set) or one number for all rows
    if NPAIRS == 1:
        alpha = _row_float(row, alpha_ptr, alpha_val, ALPHA_T)
    else:  # alpha_ptr: [B, NPAIRS] fp32, contiguous
        alpha = tl.load(alpha_ptr + row64 * NPAIRS)
        alpha2 = tl.load(alpha_ptr + row64 * NPAIRS + 1)
        if NPAIRS >= 3:
            alpha3 = tl.load(alpha_ptr + row64 * NPAIRS + 2)
        if NPAIRS >= 4:
            alpha4 = tl.load(alpha_ptr + row64 * NPAIRS + 3)
    if PLAUS:  # the row's base max (NaN: a bad row) and fp32 log(base_plausibility), from the host wrapper
        pmax = tl.load(pmax_ptr + row)
        plog = tl.load(plog_ptr + row)
    temp, k, p, m = _row_params(row, temp_ptr, temp_val, topk_ptr, topk_val, topp_ptr, topp_val, minp_ptr, minp_val,
                                TEMP_T, TOPK_T, TOPP_T, MINP_T)
    t_pos = temp > 0.0
    tdiv = tl.where(t_pos, temp, 1.0)
    if FILTER:
        filt = ((k > 0) & (k < V)) | (p < 1.0) | (m > 0.0)
        # the race here only serves rows that finish in kernel 2 without a search
        do_race = t_pos & (filt == 0)
    else:
        filt = False
        do_race = t_pos
    k0, k1, c1, c2 = _philox_key(row, seed_ptr, seed_lo, seed_hi, off_ptr, off_lo, off_hi, SEED_T, OFF_T)

    m_run = tl.full((), _NEG_INF, tl.float32)
    s_run = tl.full((), 0.0, tl.float32)
    g_max = tl.full((), _NEG_INF, tl.float32)
    g_idx = tl.full((), _INT32_MAX, tl.int32)
    r_max = tl.full((), _NEG_INF, tl.float32)
    r_idx = tl.full((), _INT32_MAX, tl.int32)
    r_z = tl.full((), _NEG_INF, tl.float32)
    bad = tl.full((), 0, tl.int32)
    for start in range(0, CHUNK, BLOCK):
        cols = chunk * CHUNK + start + tl.arange(0, BLOCK)
        inb = cols < V
        b = tl.load(base_ptr + row64 * stride_b + cols, mask=inb, other=0.0).to(tl.float32)
        e = tl.load(expert_ptr + row64 * stride_e + cols, mask=inb, other=0.0).to(tl.float32)
        eb = tl.load(ebase_ptr + row64 * stride_eb + cols, mask=inb, other=0.0).to(tl.float32)
        masked = (b == _NEG_INF) | (e == _NEG_INF) | (eb == _NEG_INF) | (inb == 0)
        if NPAIRS == 1:
            z = b + alpha * (e - eb)  # no FMA (enable_fp_fusion=False): rounds as the reference
        else:
            # the pairs loop inside the column pass: S summed left to right, then z = base + S
            acc = alpha * (e - eb)
            e = tl.load(e2_ptr + row64 * stride_e2 + cols, mask=inb, other=0.0).to(tl.float32)
            eb = tl.load(eb2_ptr + row64 * stride_eb2 + cols, mask=inb, other=0.0).to(tl.float32)
            masked = masked | (e == _NEG_INF) | (eb == _NEG_INF)
            acc = acc + alpha2 * (e - eb)
            if NPAIRS >= 3:
                e = tl.load(e3_ptr + row64 * stride_e3 + cols, mask=inb, other=0.0).to(tl.float32)
                eb = tl.load(eb3_ptr + row64 * stride_eb3 + cols, mask=inb, other=0.0).to(tl.float32)
                masked = masked | (e == _NEG_INF) | (eb == _NEG_INF)
                acc = acc + alpha3 * (e - eb)
            if NPAIRS >= 4:
                e = tl.load(e4_ptr + row64 * stride_e4 + cols, mask=inb, other=0.0).to(tl.float32)
                eb = tl.load(eb4_ptr + row64 * stride_eb4 + cols, mask=inb, other=0.0).to(tl.float32)
                masked = masked | (e == _NEG_INF) | (eb == _NEG_INF)
                acc = acc + alpha4 * (e - eb)
            z = b + acc
        z = tl.where(masked, _NEG_INF, z)
        bad = tl.maximum(bad, tl.reduce(((z != z) | (z == _POS_INF)).to(tl.int32), 0, _cmax))
        if PLAUS:  # base plausibility masks after the NaN / +inf check, before everything else
            masked = masked | (((b - pmax) >= plog) == 0)
            z = tl.where(masked, _NEG_INF, z)
        # greedy: highest z, lowest id among equals
        bm = tl.reduce(z, 0, _cmax)
        bi = tl.reduce(tl.where(z == bm, cols, _INT32_MAX), 0, _cmin)
        g_upd = bm > g_max
        g_idx = tl.where(g_upd, bi, g_idx)
        g_max = tl.where(g_upd, bm, g_max)
        # z' = z / T with IEEE division; online max / sum of exp for the logsumexp
        zp = tl.where(masked, _NEG_INF, tl.math.div_rn(z, tdiv))
        new_m = tl.maximum(m_run, tl.reduce(zp, 0, _cmax))
        m_safe = tl.where(new_m == _NEG_INF, 0.0, new_m)
        s_run = s_run * tl.exp(m_run - m_safe) + tl.reduce(tl.exp(zp - m_safe), 0, _csum)
        m_run = new_m
        if FILTER:
            # (an i1 scalar splatted into an i1 vector breaks the interpreter's masked store: go via int32)
            smask = (tl.zeros((BLOCK,), tl.int32) + (filt & t_pos).to(tl.int32)) != 0  # greedy rows: not needed
            tl.store(ws_ptr + row64 * (NCHUNK * CHUNK) + cols, zp, mask=smask)
        if do_race:
            _, noise = _philox_noise(cols, k0, k1, c1, c2, PRECISE)
            if PRECISE:
                lg = libdevice.log(noise)
            else:
                lg = tl.log(noise)
            r = tl.where(zp > _NEG_INF, zp - lg, _NEG_INF)
            rb = tl.reduce(r, 0, _cmax)
            ri = tl.reduce(tl.where(r == rb, cols, _INT32_MAX), 0, _cmin)
            rz = tl.reduce(tl.where(cols == ri, zp, _NEG_INF), 0, _cmax)
            r_upd = rb > r_max
            r_idx = tl.where(r_upd, ri, r_idx)
            r_z = tl.where(r_upd, rz, r_z)
            r_max = tl.where(r_upd, rb, r_max)

    sidx = row * NCHUNK + chunk
    tl.store(fstat_ptr + sidx, m_run)
    tl.store(fstat_ptr + NSTAT + sidx, s_run)
    tl.store(fstat_ptr + 2 * NSTAT + sidx, g_max)
    tl.store(fstat_ptr + 3 * NSTAT + sidx, r_max)
    tl.store(fstat_ptr + 4 * NSTAT + sidx, r_z)
    tl.store(istat_ptr + sidx, g_idx)
    tl.store(istat_ptr + NSTAT + sidx, r_idx)
    tl.store(istat_ptr + 2 * NSTAT + sidx, bad)


# --------------------------------------- kernel 2: merge a row's chunks; exact thresholds; race over the kept set
@triton.jit
def _threshold_search(ws_row, NW, lo, hi, key_guess, zmax, thresh, MASS: tl.constexpr, BLOCK: tl.constexpr,
                      NP: tl.constexpr, PRECISE: tl.constexpr):
    """Multi-pivot bisection over the keys of the workspace row ``ws_row[0:NW]``: returns
    ``(smallest t with M(t) < thresh) - 1`` where ``M(t)`` sums, over columns with ``key >= t``, 1 (top-k:
    ``thresh = k``; counts are exact in fp32 below 2^24) or ``exp(z' - zmax)`` (``MASS``, top-p). Keeps
    ``M(lo) >= thresh`` and ``M(hi) < thresh``; a pass evaluates the predicate at NP lanes ``q = lo``,
    NP - 2 pivots (the first pass: ``key_guess`` clamped to the bracket; then evenly spaced), ``hi``, and
    per lane the largest element key below ``q`` and the smallest at or above it; with ``j`` the first
    lane where the predicate holds, the bracket is snapped to element keys (the predicate only changes
    just above an element key). It ends when one distinct key is left: at most 10 passes."""
    offs = tl.arange(0, BLOCK)
    lane = tl.arange(0, NP)
    lane64 = lane.to(tl.int64)
    npass = tl.zeros((), tl.int32)
    while hi - lo > 1:
        q = tl.where(npass == 0, tl.minimum(tl.maximum(key_guess, lo), hi), lo + ((hi - lo) * lane64) // (NP - 1))
        q = tl.where(lane == 0, lo, tl.where(lane == NP - 1, hi, q)).to(tl.int32)
        npass += 1
        acc = tl.zeros((NP,), tl.float32)
        below = tl.full((NP,), _INT32_MIN, tl.int32)
        above = tl.full((NP,), _INT32_MAX, tl.int32)
        for start in range(0, NW, BLOCK):
            zp = tl.load(ws_row + start + offs)
            kb = tl.where(zp == 0.0, 0.0, zp).to(tl.int32, bitcast=True)
            key = (kb ^ ((kb >> 31) & 0x7FFFFFFF))[:, None]
            if MASS:
                if PRECISE:
                    w = libdevice.exp(zp - zmax)
                else:
                    w = tl.exp(zp - zmax)
            else:
                w = tl.full((BLOCK,), 1.0, tl.float32)
            ge = key >= q[None, :]
            acc += tl.reduce(tl.where(ge, w[:, None], 0.0), 0, _csum)
            below = tl.maximum(below, tl.reduce(tl.where(ge, _INT32_MIN, key), 0, _cmax))
            above = tl.minimum(above, tl.reduce(tl.where(ge, key, _INT32_MAX), 0, _cmin))
        pred = ((acc < thresh) | (lane == NP - 1)) & (lane > 0)
        j = tl.reduce(tl.where(pred, lane, NP), 0, _cmin)
        lo = tl.reduce(tl.where(lane == j - 1, above, _INT32_MIN), 0, _cmax).to(tl.int64)
        hi = tl.reduce(tl.where(lane == j, below, _INT32_MIN), 0, _cmax).to(tl.int64) + 1
        hi = tl.maximum(hi, lo + 1)
    return lo


@triton.jit(do_not_specialize=["temp_val", "topk_val", "topp_val", "minp_val",
                               "seed_lo", "seed_hi", "off_lo", "off_hi"])
def _rast_finish_kernel(
    ws_ptr, fstat_ptr, istat_ptr, tok_ptr, lp_ptr,
    temp_ptr, temp_val, topk_ptr, topk_val, topp_ptr, topp_val, minp_ptr, minp_val,
    seed_ptr, seed_lo, seed_hi, off_ptr, off_lo, off_hi,
    V, NCHUNK, NSTAT, NW,
    NCP2: tl.constexpr, BLOCK: tl.constexpr, NP: tl.constexpr,
    TEMP_T: tl.constexpr, TOPK_T: tl.constexpr, TOPP_T: tl.constexpr, MINP_T: tl.constexpr,
    SEED_T: tl.constexpr, OFF_T: tl.constexpr,
    FILTER: tl.constexpr, WRITE_LP: tl.constexpr, PRECISE: tl.constexpr,
):
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    temp, k, p, m = _row_params(row, temp_ptr, temp_val, topk_ptr, topk_val, topp_ptr, topp_val, minp_ptr, minp_val,
                                TEMP_T, TOPK_T, TOPP_T, MINP_T)
    # NaN compares false: "not (x >= 0)" catches it
    bad_param = (((temp >= 0.0) & (temp < _POS_INF)) == 0) | (k < 0) | (((p > 0.0) & (p <= 1.0)) == 0) | \
        (((m >= 0.0) & (m <= 1.0)) == 0)

    c = tl.arange(0, NCP2)
    cm = c < NCHUNK
    sidx = row * NCHUNK + c
    m_c = tl.load(fstat_ptr + sidx, mask=cm, other=_NEG_INF)
    s_c = tl.load(fstat_ptr + NSTAT + sidx, mask=cm, other=0.0)
    g_c = tl.load(fstat_ptr + 2 * NSTAT + sidx, mask=cm, other=_NEG_INF)
    r_c = tl.load(fstat_ptr + 3 * NSTAT + sidx, mask=cm, other=_NEG_INF)
    rz_c = tl.load(fstat_ptr + 4 * NSTAT + sidx, mask=cm, other=_NEG_INF)
    gi_c = tl.load(istat_ptr + sidx, mask=cm, other=_INT32_MAX)
    ri_c = tl.load(istat_ptr + NSTAT + sidx, mask=cm, other=_INT32_MAX)
    bad_c = tl.load(istat_ptr + 2 * NSTAT + sidx, mask=cm, other=0)

    zmax = tl.reduce(m_c, 0, _cmax)
    zmax_safe = tl.where(zmax == _NEG_INF, 0.0, zmax)
    # (the logprob's normaliser of rows without a filter; the top-p mass is summed from exp(z' - max) below)
    if PRECISE:
        total = tl.reduce(s_c * libdevice.exp(m_c - zmax_safe), 0, _csum)
    else:
        total = tl.reduce(s_c * tl.exp(m_c - zmax_safe), 0, _csum)
    g_max = tl.reduce(g_c, 0, _cmax)
    g_idx = tl.reduce(tl.where(g_c == g_max, gi_c, _INT32_MAX), 0, _cmin)  # chunks hold increasing ids
    r_max = tl.reduce(r_c, 0, _cmax)
    r_idx = tl.reduce(tl.where(r_c == r_max, ri_c, _INT32_MAX), 0, _cmin)
    r_z = tl.reduce(tl.where((r_c == r_max) & (ri_c == r_idx), rz_c, _NEG_INF), 0, _cmax)

    bad = (tl.reduce(bad_c, 0, _cmax) > 0) | (g_max == _NEG_INF) | bad_param
    # greedy: T == 0, or T so small that max z / T overflows (the T -> 0 limit)
    greedy = (temp == 0.0) | (tl.abs(tl.math.div_rn(g_max, tl.where(temp > 0.0, temp, 1.0))) == _POS_INF)
    tok = tl.where(greedy, g_idx, r_idx)
    lp = tl.where(greedy, 0.0, r_z - (zmax + tl.log(total)))
    # no kept column (cannot happen for a valid non-greedy row; kept as a guard): nothing to draw
    none_kept = (greedy == 0) & (r_max == _NEG_INF)

    if FILTER:
        k_on = (k > 0) & (k < V)
        if (k_on | (p < 1.0) | (m > 0.0)) & (greedy == 0) & (bad == 0):
            ws_row = ws_ptr + row64 * NW
            offs = tl.arange(0, BLOCK)
            lane = tl.arange(0, NP)
            zb = tl.where(zmax == 0.0, 0.0, zmax).to(tl.int32, bitcast=True)
            key_max = (zb ^ ((zb >> 31) & 0x7FFFFFFF)).to(tl.int64)
            # first-pass pivots in value space, max - (2^(i/2) - 1) for i = 0..13 (0 to ~90 below the max,
            # where thresholds of real rows lie), later passes evenly spaced in key space
            vq = zmax - (tl.exp2((NP - 2 - lane).to(tl.float32) * 0.5) - 1.0)
            vb = tl.where(vq == 0.0, 0.0, vq).to(tl.int32, bitcast=True)
            key_guess = (vb ^ ((vb >> 31) & 0x7FFFFFFF)).to(tl.int64)
            tau = tl.full((), _KEY_NEG_INF, tl.int64)
            # top-k: tau_k = (smallest t with C(t) < k) - 1, C(t) = #{key >= t}; C(key(-inf)) = NW >= V > k
            if k_on:
                tau = _threshold_search(ws_row, NW, tl.full((), _KEY_NEG_INF, tl.int64), key_max + 1, key_guess,
                                        zmax, k.to(tl.float32), False, BLOCK, NP, PRECISE)
            # top-p on the top-k-kept set (key >= tau_k): P(t) = H(t) < p * S_k for t > tau_k, with
            # H(t) = sum of exp(z' - max) over key >= t (monotone in t: non-negative terms, fixed order)
            if p < 1.0:
                # S_k = H(tau_k) from the same terms exp(z' - max) as the search's H(t), one exp
                # implementation (libdevice's when PRECISE), also without top-k (tau_k = key(-inf)): kernel 1's
                # chunk sums (exp(z' - chunk max) rescaled, approximate exp) differ from H in the last bits,
                # enough to move a boundary the reference resolves exactly
                t32 = tau.to(tl.int32)
                acc = tl.zeros((BLOCK,), tl.float32)
                for start in range(0, NW, BLOCK):
                    zp = tl.load(ws_row + start + offs)
                    kb = tl.where(zp == 0.0, 0.0, zp).to(tl.int32, bitcast=True)
                    key = kb ^ ((kb >> 31) & 0x7FFFFFFF)
                    if PRECISE:
                        w = libdevice.exp(zp - zmax)
                    else:
                        w = tl.exp(zp - zmax)
                    acc += tl.where(key >= t32, w, 0.0)
                mass_k = tl.reduce(acc, 0, _csum)
                tau = _threshold_search(ws_row, NW, tau, key_max + 1, key_guess, zmax, p * mass_k, True,
                                        BLOCK, NP, PRECISE)
            # final pass over key >= tau and (min-p) exp(z' - max) >= min_p: race and kept mass;
            # blocks without a kept column are skipped (no Philox for them)
            k0, k1, c1, c2 = _philox_key(row, seed_ptr, seed_lo, seed_hi, off_ptr, off_lo, off_hi, SEED_T, OFF_T)
            tau32 = tau.to(tl.int32)
            best = tl.full((), _NEG_INF, tl.float32)
            best_idx = tl.full((), _INT32_MAX, tl.int32)
            best_z = tl.full((), _NEG_INF, tl.float32)
            kept_mass = tl.full((), 0.0, tl.float32)
            for start in range(0, NW, BLOCK):
                cols = start + offs
                zp = tl.load(ws_row + cols)
                kb = tl.where(zp == 0.0, 0.0, zp).to(tl.int32, bitcast=True)
                key = kb ^ ((kb >> 31) & 0x7FFFFFFF)
                if PRECISE:
                    w = libdevice.exp(zp - zmax)
                else:
                    w = tl.exp(zp - zmax)
                keep = (zp > _NEG_INF) & (key >= tau32) & (w >= m)  # min_p = 0: always true
                if tl.reduce(keep.to(tl.int32), 0, _cmax) > 0:
                    kept_mass += tl.reduce(tl.where(keep, w, 0.0), 0, _csum)
                    _, noise = _philox_noise(cols, k0, k1, c1, c2, PRECISE)
                    if PRECISE:
                        lg = libdevice.log(noise)
                    else:
                        lg = tl.log(noise)
                    r = tl.where(keep, zp - lg, _NEG_INF)
                    rb = tl.reduce(r, 0, _cmax)
                    ri = tl.reduce(tl.where(r == rb, cols, _INT32_MAX), 0, _cmin)
                    rz = tl.reduce(tl.where(cols == ri, zp, _NEG_INF), 0, _cmax)
                    upd = rb > best
                    best_idx = tl.where(upd, ri, best_idx)
                    best_z = tl.where(upd, rz, best_z)
                    best = tl.where(upd, rb, best)
            tok = best_idx
            lp = best_z - (zmax + tl.log(kept_mass))
            none_kept = best == _NEG_INF

    bad = bad | none_kept
    tl.store(tok_ptr + row, tl.where(bad, -1, tok).to(tl.int64))
    if WRITE_LP:
        tl.store(lp_ptr + row, tl.where(bad, _NAN, lp))


@triton.jit
def _noise_debug_kernel(seed_ptr, off_ptr, col_ptr, words_ptr, exp_ptr, NCOL, BLOCK: tl.constexpr,
                        PRECISE: tl.constexpr):
    row = tl.program_id(0)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    msk = i < NCOL
    s = tl.load(seed_ptr + row)
    o = tl.load(off_ptr + row)
    cols = tl.load(col_ptr + i, mask=msk, other=0)
    words, noise = _philox_noise(cols, s.to(tl.uint32), (s >> 32).to(tl.uint32), o.to(tl.uint32),
                                 (o >> 32).to(tl.uint32), PRECISE)
    out = row.to(tl.int64) * NCOL + i
    tl.store(words_ptr + out, words.to(tl.int64), mask=msk)
    tl.store(exp_ptr + out, noise, mask=msk)


# ----------------------------------------------------------------------------------------------------
# host side
# ----------------------------------------------------------------------------------------------------
_WORKSPACE: dict = {}
_PARAM_NAMES = ("alpha", "temperature", "top_k", "top_p", "min_p", "seed", "offset")


def _precise(device: torch.device) -> bool:
    return device.type == "cuda" and not _backends.triton_interpreting()


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def launch_config(batch: int, vocab_size: int, device: torch.device | None = None, chunk: int | None = None):
    """``(CHUNK, NCHUNK, BLOCK1, BLOCK2)`` for a call: power-of-two chunks, enough of them that
    ``B * NCHUNK >= ~2 x #SMs`` at small ``B``, between ``MIN_CHUNK`` and ``MAX_CHUNK`` columns (and no
    wider than the vocabulary). ``chunk`` overrides the chunk width (a power of two; tests use small ones)."""
    if chunk is None:
        target = 2 * _num_sms(device if device is not None else torch.device("cpu"))
        per = max(1, (batch * vocab_size) // target)
        chunk = 1 << (per.bit_length() - 1)  # largest power of two <= per
        chunk = min(max(chunk, MIN_CHUNK), MAX_CHUNK)
    elif chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"chunk: must be a power of two, got {chunk}")
    chunk = min(chunk, triton.next_power_of_2(vocab_size))
    nchunk = triton.cdiv(vocab_size, chunk)
    return chunk, nchunk, min(chunk, BLOCK1), min(chunk, BLOCK2)


def workspace_device(device) -> torch.device:
    """The device under which the sampler's workspace is cached (the one key used by :func:`reserve_workspace`
    and by every launch): ``"cuda"`` without an index is the current CUDA device (``cuda:<i>``, what a CUDA
    tensor's ``.device`` reports), any CPU device is ``cpu``. Without this, a reservation made for ``"cuda"``
    would miss the launch's ``cuda:0`` and the launch would allocate (fatal during graph capture)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if device.type == "cpu":
        return torch.device("cpu")
    return device


def reserve_workspace(batch: int, vocab_size: int, device, filters: bool = True, chunk: int | None = None):
    """Grow the cached workspace of ``device`` for calls of this size and return it: fp32, ``8 * B * NCHUNK``
    chunk statistics plus, when filters may be active, ``B * NCHUNK * CHUNK`` (about ``B * V``) for ``z'``.
    One buffer per device (keyed by :func:`workspace_device`: ``"cuda"`` and ``"cuda:0"`` are one device
    when device 0 is current), grown but never shrunk, used in stream order: calls running concurrently
    on two streams of one device would share it. Call it (or make one eager call of the largest size)
    before capturing a CUDA graph, so that no allocation happens during capture. The buffer stays cached,
    but a caller that captures graphs should also keep the returned tensor alive for as long as it
    replays them: a later, bigger reservation replaces the cached buffer, and the graphs keep using the
    memory of the one they were captured with."""
    device = workspace_device(device)
    chunk, nchunk, _, _ = launch_config(batch, vocab_size, device, chunk)
    need = 8 * batch * nchunk + (batch * nchunk * chunk if filters else 0)
    buf = _WORKSPACE.get(device)
    if buf is None or buf.numel() < need:
        # stream-ordered on the current stream; a buffer grown during capture comes from the graph's pool
        # and stays cached (and alive) for the replays
        buf = torch.empty(need, dtype=torch.float32, device=device)
        _WORKSPACE[device] = buf
    return buf


def _i32_halves(v: int):
    """(lo, hi) 32-bit halves of an int64, each as a signed int32 value (stable kernel arg types)."""
    v &= (1 << 64) - 1
    lo, hi = v & 0xFFFFFFFF, v >> 32
    return (lo - (1 << 32) if lo >= 1 << 31 else lo), (hi - (1 << 32) if hi >= 1 << 31 else hi)


MAX_PAIRS = 4  # expert pairs the chunk kernel reads in its one pass; more are first folded into one (PyTorch)


def _plausibility_stats(base, bp, V):
    """``(base max, log bp)`` fp32 ``[B]`` for the chunk kernel's base-plausibility mask (``bp`` a ``[B]`` fp32
    tensor): the max is ``-inf`` where ``bp == 0`` (nothing masked) and NaN for a bad row (``bp`` outside
    ``[0, 1]``, or ``bp > 0`` with NaN / ``+inf`` in ``base[:, :V]``: every column then masked, token -1)."""
    b = base[:, :V].float()
    bmax = b.amax(1)
    bad = ~((bp >= 0) & (bp <= 1)) | ((bp > 0) & (torch.isnan(b) | (b == math.inf)).any(1))
    bmax = torch.where(bp > 0, bmax, torch.full_like(bmax, -math.inf))
    bmax = torch.where(bad, torch.full_like(bmax, math.nan), bmax)
    return bmax.contiguous(), torch.log(bp).contiguous()


def rast_sample_triton(base, expert, expert_base, params, vocab_size: int, tokens: torch.Tensor,
                       logprobs: torch.Tensor | None, *, chunk: int | None = None, pairs=None,
                       base_plausibility=None) -> None:
    """Triton backend of :func:`rast_kernels.rast_sample` (arguments already validated there).

    ``base``, ``expert``, ``expert_base``: ``[B, *]`` fp32/bf16/fp16, last dim contiguous, any row
    stride; columns ``< vocab_size`` are used. ``params``: a mapping with the keys ``alpha``,
    ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``seed``, ``offset``, each a valid number or a
    ``[B]`` contiguous float32 (int64 for ``top_k``, ``seed``, ``offset``) tensor on the logits' device,
    whose values are checked per row in the kernel; a number ``seed`` is mixed per row in the kernel
    (``mix_seed(seed, b)``). Fills ``tokens`` (int64 ``[B]``) and, unless None, ``logprobs`` (fp32
    ``[B]``) in place.
    ``chunk``: override of the chunk width (power of two), for tests and tuning.
    ``pairs``: ``(experts, expert_bases, alpha)`` for K = 2..MAX_PAIRS expert pairs (``expert`` and
    ``expert_base`` are then ignored; ``alpha`` a contiguous fp32 ``[B, K]`` tensor; ``params["alpha"]`` unused).
    ``base_plausibility``: None (off) or a ``[B]`` fp32 tensor (the spec's per-row values).
    """
    batch = base.shape[0]
    if batch == 0:
        return
    device = base.device
    V = int(vocab_size)
    params = SimpleNamespace(**{name: params[name] for name in _PARAM_NAMES})
    is_t = {name: isinstance(getattr(params, name), torch.Tensor) for name in _PARAM_NAMES}
    filters = (is_t["top_k"] or is_t["top_p"] or is_t["min_p"]
               or 0 < params.top_k < V or params.top_p < 1.0 or params.min_p > 0.0)
    CHUNK, NCHUNK, B1, B2 = launch_config(batch, V, device, chunk)
    NSTAT = batch * NCHUNK
    NW = NCHUNK * CHUNK
    buf = reserve_workspace(batch, V, device, filters, chunk)
    fstat = buf[: 5 * NSTAT]
    istat = buf[5 * NSTAT: 8 * NSTAT].view(torch.int32)
    ws = buf[8 * NSTAT: 8 * NSTAT + batch * NW] if filters else buf  # unused without filters

    dummy = tokens  # pointer argument of a parameter passed as a number (never dereferenced)
    alpha = (params.alpha, 0.0) if is_t["alpha"] else (dummy, float(params.alpha))
    temp = (params.temperature, 0.0) if is_t["temperature"] else (dummy, float(params.temperature))
    topk = (params.top_k, 0) if is_t["top_k"] else (dummy, min(int(params.top_k), V))
    topp = (params.top_p, 0.0) if is_t["top_p"] else (dummy, float(params.top_p))
    minp = (params.min_p, 0.0) if is_t["min_p"] else (dummy, float(params.min_p))
    seed = (params.seed, 0, 0) if is_t["seed"] else (dummy, *_i32_halves(int(params.seed)))
    off = (params.offset, 0, 0) if is_t["offset"] else (dummy, *_i32_halves(int(params.offset)))
    npairs, extra = 1, [dummy, dummy, 0, 0] * 3
    if pairs is not None:
        experts, expert_bases, alpha_bk = pairs
        npairs = len(experts)
        assert 2 <= npairs <= MAX_PAIRS and alpha_bk.shape == (batch, npairs)
        expert, expert_base = experts[0], expert_bases[0]
        alpha = (alpha_bk, 0.0)
        for i in range(1, npairs):
            extra[4 * (i - 1): 4 * i] = [experts[i], expert_bases[i], experts[i].stride(0), expert_bases[i].stride(0)]
    plaus = base_plausibility is not None
    pstats = _plausibility_stats(base, base_plausibility, V) if plaus else (dummy, dummy)
    precise = _precise(device)
    write_lp = logprobs is not None
    flags = dict(TEMP_T=is_t["temperature"], TOPK_T=is_t["top_k"], TOPP_T=is_t["top_p"],
                 MINP_T=is_t["min_p"], SEED_T=is_t["seed"], OFF_T=is_t["offset"],
                 FILTER=filters, PRECISE=precise)

    with launch.on_device(base):
        _rast_chunk_kernel[(batch, NCHUNK)](
            base, expert, expert_base, base.stride(0), expert.stride(0), expert_base.stride(0),
            *alpha, *temp, *topk, *topp, *minp, *seed, *off,
            ws, fstat, istat, V, NCHUNK, NSTAT, *extra, *pstats,
            CHUNK=CHUNK, BLOCK=B1, ALPHA_T=is_t["alpha"] or npairs > 1, NPAIRS=npairs, PLAUS=plaus, **flags,
            num_warps=4 if B1 <= 512 else 8, enable_fp_fusion=False,
        )
        _rast_finish_kernel[(batch,)](
            ws, fstat, istat, tokens, logprobs if write_lp else dummy,
            *temp, *topk, *topp, *minp, *seed, *off,
            V, NCHUNK, NSTAT, NW,
            NCP2=triton.next_power_of_2(NCHUNK), BLOCK=B2, NP=NUM_PIVOTS, WRITE_LP=write_lp, **flags,
            num_warps=8, enable_fp_fusion=False,
        )


def philox_noise_triton(seed: torch.Tensor, offset: torch.Tensor, columns: torch.Tensor):
    """Debug entry point: the kernels' Philox words (int64 in [0, 2^32)) and Exp(1) noise (fp32), each
    ``[B, len(columns)]``, for rows keyed by ``seed[B]``, ``offset[B]`` (int64) at ``columns`` (int64);
    compare with :func:`.philox.random_words` and :func:`.philox.exponential_from_words`."""
    seed = seed.to(torch.int64).contiguous()
    offset = offset.to(device=seed.device, dtype=torch.int64).contiguous()
    columns = columns.to(device=seed.device, dtype=torch.int64).contiguous()
    n = columns.numel()
    words = torch.empty(seed.numel(), n, dtype=torch.int64, device=seed.device)
    noise = torch.empty(seed.numel(), n, dtype=torch.float32, device=seed.device)
    block = 256
    with launch.on_device(seed):
        _noise_debug_kernel[(seed.numel(), triton.cdiv(n, block))](
            seed, offset, columns, words, noise, n, BLOCK=block, PRECISE=_precise(seed.device),
            enable_fp_fusion=False)
    return words, noise
