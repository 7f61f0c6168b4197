"""``add_rms_norm``: the residual add and the RMSNorm of a decoder layer in one pass.

Semantics (Llama/Qwen2 ``RMSNorm`` as transformers computes it, after the residual add the decoder layer does
before it; :func:`add_rms_norm_reference` is the executable form)::

    s = x + residual                       # in x's dtype (rounded), or s = x when residual is None
    t = float32(s)
    y = weight * (t * rsqrt(mean(t ** 2) + eps)).to(x.dtype)
    return y, s                            # s is the new residual stream

Rounding follows PyTorch's: every elementwise result is rounded to the tensors' dtype where PyTorch's would be,
so ``s`` is bit-identical to ``residual + x`` and ``y`` differs from transformers' only through the order of the
fp32 sum of squares and the ``rsqrt``: on a few elements by one or two units in the last place of ``y``'s dtype
(``y`` is rounded twice, so a last-bit change of the normalised value can move it by two).
The Triton kernel does one row per program: one read of ``x``/``residual``/``weight``, one write of ``y``/``s``;
transformers runs about eight kernels for the same thing.
"""
from __future__ import annotations

import functools
import numbers

import torch

from .. import _backends
from . import launch
from ._checks import require_float, require_like, require_tensors

_MAX_HIDDEN = 65536


def add_rms_norm_reference(x, weight, eps, residual=None):
    """PyTorch reference of :func:`add_rms_norm` (same arguments, assumed valid): transformers' own ops."""
    s = x if residual is None else residual + x
    t = s.to(torch.float32)
    t = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps)
    return weight * t.to(s.dtype), s


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, n, eps, sx, sr, sy, ss,
                             HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        m = cols < n
        x = tl.load(x_ptr + row * sx + cols, mask=m, other=0.0)
        if HAS_RES:
            # rounded to the storage dtype first, as `residual + x` in PyTorch is
            s = (x.to(tl.float32) + tl.load(r_ptr + row * sr + cols, mask=m, other=0.0).to(tl.float32)).to(x.dtype)
            tl.store(s_ptr + row * ss + cols, s, mask=m)
        else:
            s = x
        t = s.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(t * t, axis=0) / n + eps)
        w = tl.load(w_ptr + cols, mask=m, other=0.0).to(tl.float32)
        y = (w * (t * rstd).to(x.dtype).to(tl.float32)).to(x.dtype)
        tl.store(y_ptr + row * sy + cols, y, mask=m)

    return _add_rms_norm_kernel


def _check(x, weight, eps, residual):
    require_tensors(x=x, weight=weight)
    if x.dim() != 2:
        raise ValueError(f"x: expected a 2-D tensor [B, H], got shape {tuple(x.shape)}")
    require_float("x", x)
    if not 0 < x.shape[1] <= _MAX_HIDDEN:
        raise ValueError(f"x: hidden size must be in [1, {_MAX_HIDDEN}], got {x.shape[1]}")
    if x.stride(1) != 1:
        raise ValueError("x: the hidden dimension must be contiguous (stride 1)")
    require_like("weight", weight, (x.shape[1],), x.dtype, x.device)
    if not weight.is_contiguous():
        raise ValueError("weight: must be contiguous")
    if residual is not None:
        require_tensors(residual=residual)
        require_like("residual", residual, x.shape, x.dtype, x.device)
        if residual.stride(1) != 1:
            raise ValueError("residual: the hidden dimension must be contiguous (stride 1)")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps: expected a float, got {type(eps).__name__}")
    if not eps >= 0:
        raise ValueError(f"eps: expected a number >= 0, got {eps!r}")


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                 *, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add + RMSNorm (module docstring: exact semantics).

    Parameters
    ----------
    x : torch.Tensor
        ``[B, H]`` float32/bfloat16/float16, hidden dimension contiguous (rows may be strided).
    weight : torch.Tensor
        ``[H]`` norm weight, x's dtype and device.
    eps : float
        The norm's epsilon (transformers' ``variance_epsilon``).
    residual : torch.Tensor, optional
        ``[B, H]`` residual stream added to ``x`` first; None for the first norm of a model.
    backend : {"auto", "triton", "torch"}
        ``"auto"``: Triton on CUDA, the reference elsewhere; ``"triton"`` also on CPU under ``TRITON_INTERPRET=1``.

    Returns
    -------
    (y, s) : tuple of torch.Tensor
        ``y [B, H]`` the normalised rows; ``s [B, H]`` the new residual stream (``x`` itself when
        ``residual`` is None). Both in x's dtype.
    """
    _check(x, weight, eps, residual)
    backend = _backends.resolve_triton_or_torch(backend, x.device)
    if backend == "torch":
        return add_rms_norm_reference(x, weight, float(eps), residual)
    batch, n = x.shape
    y = torch.empty((batch, n), dtype=x.dtype, device=x.device)
    s = x if residual is None else torch.empty_like(y)
    if batch:
        block = 1 << (n - 1).bit_length()
        with launch.on_device(x):
            _kernel()[(batch,)](
                x, x if residual is None else residual, weight, y, s, n, float(eps),
                x.stride(0), 0 if residual is None else residual.stride(0), y.stride(0), s.stride(0),
                HAS_RES=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 512)))
    return y, s
