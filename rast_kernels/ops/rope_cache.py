"""``rope_cache_write``: rotary embedding of a decode step's query and key, and the key/value cache write, in one
launch; the cache is a static per-row cache or a paged cache's flat slot pool.

Semantics (transformers' ``apply_rotary_pos_emb`` with ``rotate_half``, then a static-cache write;
:func:`rope_cache_write_reference` is the executable form), for the one new token of each row ``b``::

    rot(x) = x * cos[b] + rotate_half(x) * sin[b]       rotate_half(x) = cat(-x[D/2:], x[:D/2])
    q_out[b, h]              = rot(q[b, h])               for every query head h
    k_cache[b, g, col[b]]    = rot(k[b, g])               for every kv head g
    v_cache[b, g, col[b]]    = v[b, g]

or, for a paged cache given as its flat slot pools ``k_cache, v_cache: [NSLOT, H_kv, D]`` (a
``[NB, BS, H_kv, D]`` pool viewed as ``[NB * BS, H_kv, D]``: slot ``block * BS + offset``), ``col[b]`` is the row's
slot::

    k_cache[col[b], g]       = rot(k[b, g])
    v_cache[col[b], g]       = v[b, g]

Nothing else in the caches changes. Rows given the same slot (inert rows all writing the engine's scratch slot)
leave one of their values there, which one is unspecified.

``cos``/``sin`` are the model's own rotary tables for the row's position (``model.model.rotary_emb``, so every
rope scaling variant transformers implements is covered), in the tensors' dtype. Each product and the sum are
rounded to that dtype as PyTorch rounds them, so the result is bit-identical to transformers' in every dtype
(a product of two 16-bit floats is exact in fp32, and fp32 has enough bits that rounding a 16-bit sum or
difference through it equals rounding it once). The kernel is compiled without FMA contraction
(``enable_fp_fusion=False``, :data:`LAUNCH_OPTIONS`): with it, the compiler turns ``x1*c1 - x2*s1`` into one
``fma.rn.bf16`` and skips the rounding of ``x1*c1`` that PyTorch does (seen in the sm_90 PTX).
``col`` is a device tensor (``[B]`` or an expanded ``[1]``), never read on the host when it is on a GPU, so the
launch can be captured in a CUDA graph (a column out of range there is not detected); on the CPU it is checked.
One program per (row, head): the query heads, then the kv heads. The two cache forms share the kernel: a slot
pool is addressed as a static cache whose row stride is 0 and whose column stride is the pool's slot stride.
"""
from __future__ import annotations

import functools

import torch

from .. import _backends
from . import launch
from ._checks import INDEX_DTYPES, require_float, require_tensors

LAUNCH_OPTIONS = dict(num_warps=1, enable_fp_fusion=False)  # the kernel's launch options (module docstring)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_cache_write_reference(q, k, v, cos, sin, k_cache, v_cache, col):
    """PyTorch reference of :func:`rope_cache_write` (same arguments, assumed valid): transformers' ops."""
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, D]: broadcast over heads
    q_out = q * c + _rotate_half(q) * s
    k_rot = k * c + _rotate_half(k) * s
    col = col.to(device=q.device, dtype=torch.int64).expand(q.shape[0])
    if k_cache.dim() == 3:  # slot pool [NSLOT, H_kv, D]
        k_cache[col] = k_rot
        v_cache[col] = v
        return q_out
    rows = torch.arange(q.shape[0], device=q.device)
    k_cache[rows, :, col] = k_rot  # advanced indexing on dims 0 and 2: [B, H_kv, D] slots
    v_cache[rows, :, col] = v
    return q_out


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr, col_ptr, qo_ptr,
                           h_q, s_col,
                           sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, sc_b, ss_b,
                           skc_b, skc_h, skc_s, svc_b, svc_h, svc_s, sqo_b, sqo_h,
                           HALF: tl.constexpr, H_PAD: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        j = tl.arange(0, H_PAD)
        m = j < HALF
        c1 = tl.load(cos_ptr + b * sc_b + j, mask=m, other=0.0).to(tl.float32)
        c2 = tl.load(cos_ptr + b * sc_b + HALF + j, mask=m, other=0.0).to(tl.float32)
        s1 = tl.load(sin_ptr + b * ss_b + j, mask=m, other=0.0).to(tl.float32)
        s2 = tl.load(sin_ptr + b * ss_b + HALF + j, mask=m, other=0.0).to(tl.float32)
        if h < h_q:
            src = q_ptr + b * sq_b + h * sq_h
        else:
            src = k_ptr + b * sk_b + (h - h_q) * sk_h
        x1 = tl.load(src + j, mask=m, other=0.0)
        x2 = tl.load(src + HALF + j, mask=m, other=0.0)
        dt = x1.dtype
        a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
        # first half: x1*cos1 + (-x2)*sin1; second half: x2*cos2 + x1*sin2; every product and sum rounded to dt
        o1 = ((a1 * c1).to(dt).to(tl.float32) - (a2 * s1).to(dt).to(tl.float32)).to(dt)
        o2 = ((a2 * c2).to(dt).to(tl.float32) + (a1 * s2).to(dt).to(tl.float32)).to(dt)
        if h < h_q:
            dst = qo_ptr + b * sqo_b + h * sqo_h
            tl.store(dst + j, o1, mask=m)
            tl.store(dst + HALF + j, o2, mask=m)
        else:
            g = (h - h_q).to(tl.int64)
            col = tl.load(col_ptr + b * s_col).to(tl.int64)
            kdst = kc_ptr + b * skc_b + g * skc_h + col * skc_s
            tl.store(kdst + j, o1, mask=m)
            tl.store(kdst + HALF + j, o2, mask=m)
            vsrc = v_ptr + b * sv_b + g * sv_h
            vdst = vc_ptr + b * svc_b + g * svc_h + col * svc_s
            tl.store(vdst + j, tl.load(vsrc + j, mask=m, other=0.0), mask=m)
            tl.store(vdst + HALF + j, tl.load(vsrc + HALF + j, mask=m, other=0.0), mask=m)

    return _rope_cache_kernel


def _check(q, k, v, cos, sin, k_cache, v_cache, col):
    named = dict(q=q, k=k, v=v, cos=cos, sin=sin, k_cache=k_cache, v_cache=v_cache, col=col)
    require_tensors(**named)
    for name, t in named.items():
        if t.device != q.device:
            raise ValueError(f"{name}: on {t.device}, q is on {q.device}")
    if q.dim() != 3:
        raise ValueError(f"q: expected a 3-D tensor [B, H_q, D], got shape {tuple(q.shape)}")
    require_float("q", q)
    batch, _, dim = q.shape
    if dim % 2 or dim == 0:
        raise ValueError(f"q: the head dim must be even and > 0, got {dim}")
    for name in ("k", "v", "cos", "sin", "k_cache", "v_cache"):
        if named[name].dtype != q.dtype:
            raise TypeError(f"{name}: dtype {named[name].dtype} differs from q's {q.dtype}")
    if k.dim() != 3 or k.shape[0] != batch or k.shape[2] != dim or k.shape[1] == 0:
        raise ValueError(f"k: expected [B={batch}, H_kv, D={dim}], got shape {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v: shape {tuple(v.shape)} differs from k's {tuple(k.shape)}")
    for name in ("cos", "sin"):
        if named[name].shape != (batch, dim):
            raise ValueError(f"{name}: expected shape [{batch}, {dim}], got {tuple(named[name].shape)}")
    h_kv = k.shape[1]
    for name in ("k_cache", "v_cache"):
        t = named[name]
        static = t.dim() == 4 and t.shape[0] == batch and t.shape[1] == h_kv and t.shape[3] == dim and t.shape[2] > 0
        pool = t.dim() == 3 and t.shape[1] == h_kv and t.shape[2] == dim and t.shape[0] > 0
        if not (static or pool):
            raise ValueError(f"{name}: expected [B={batch}, H_kv={h_kv}, S_max, D={dim}] or a slot pool "
                             f"[NSLOT, H_kv={h_kv}, D={dim}], got shape {tuple(t.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache: shape {tuple(v_cache.shape)} differs from k_cache's {tuple(k_cache.shape)}")
    if col.dtype not in INDEX_DTYPES:
        raise TypeError(f"col: expected an int32 or int64 tensor, got {col.dtype}")
    if col.dim() != 1 or col.shape[0] not in (1, batch):
        raise ValueError(f"col: expected shape [{batch}] or [1], got {tuple(col.shape)}")
    # the range is checked where it costs no device sync; on a GPU a bad column would write out of bounds
    n_cols = k_cache.shape[0] if k_cache.dim() == 3 else k_cache.shape[2]
    if col.device.type == "cpu" and col.numel() and batch and not bool(((col >= 0) & (col < n_cols)).all()):
        what = "slot" if k_cache.dim() == 3 else "column"
        raise ValueError(f"col: every {what} must be in [0, {n_cols}), got {col.tolist()}")
    for name, t in named.items():
        if name != "col" and t.stride(-1) != 1:
            raise ValueError(f"{name}: the last dimension must be contiguous (stride 1)")


def rope_cache_write(q, k, v, cos, sin, k_cache, v_cache, col, *, backend: str = "auto") -> torch.Tensor:
    """Rotate the new token's query and key, write key and value into the cache (module docstring: semantics).

    Parameters
    ----------
    q : torch.Tensor
        ``[B, H_q, D]`` query heads of the new token (float32/bfloat16/float16; last dim contiguous).
    k, v : torch.Tensor
        ``[B, H_kv, D]`` key/value heads of the new token, q's dtype.
    cos, sin : torch.Tensor
        ``[B, D]`` rotary tables at each row's position, q's dtype.
    k_cache, v_cache : torch.Tensor
        ``[B, H_kv, S_max, D]`` the layer's cache, written in place at column ``col[b]``; or the layer's paged
        pools as flat slot views ``[NSLOT, H_kv, D]``, written in place at slot ``col[b]``. Any strides but the
        last (1).
    col : torch.Tensor
        ``[B]`` or ``[1]`` int32/int64 cache column (or pool slot) per row, in ``[0, S_max)`` (``[0, NSLOT)``);
        checked on the CPU only (on a GPU reading it would need a host sync).
    backend : {"auto", "triton", "torch"}
        As for :func:`rast_kernels.decode_attention`.

    Returns
    -------
    torch.Tensor
        ``[B, H_q, D]`` the rotated query (a new contiguous tensor).
    """
    _check(q, k, v, cos, sin, k_cache, v_cache, col)
    backend = _backends.resolve_triton_or_torch(backend, q.device)
    if backend == "torch":
        return rope_cache_write_reference(q, k, v, cos, sin, k_cache, v_cache, col)
    batch, h_q, dim = q.shape
    q_out = torch.empty((batch, h_q, dim), dtype=q.dtype, device=q.device)
    if batch:
        half = dim // 2
        if k_cache.dim() == 3:
            # a slot pool as a static cache: row stride 0, head stride as is, the slot stride as column stride
            kc_strides, vc_strides = (0, k_cache.stride(1), k_cache.stride(0)), (0, v_cache.stride(1), v_cache.stride(0))
        else:
            kc_strides, vc_strides = k_cache.stride()[:3], v_cache.stride()[:3]
        with launch.on_device(q):
            _kernel()[(batch, h_q + k.shape[1])](
                q, k, v, cos, sin, k_cache, v_cache, col, q_out, h_q, col.stride(0) if col.shape[0] == batch else 0,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
                sin.stride(0), *kc_strides, *vc_strides, q_out.stride(0), q_out.stride(1),
                HALF=half, H_PAD=1 << (half - 1).bit_length(), **LAUNCH_OPTIONS)
    return q_out
