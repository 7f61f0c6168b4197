"""``silu_mul``: the gated MLP's activation, ``silu(gate) * up``, in one pass.

Semantics (transformers' ``act_fn(gate_proj(x)) * up_proj(x)`` with ``hidden_act="silu"``;
:func:`silu_mul_reference` is the executable form): ``silu(g) = g / (1 + exp(-g))`` computed in fp32 and
rounded to the dtype, then multiplied by ``up`` and rounded again, as PyTorch's two kernels do. The Triton
kernel reads ``gate`` and ``up`` once and writes the product once (PyTorch: two launches, an extra round trip).
"""
from __future__ import annotations

import functools

import torch

from .. import _backends
from . import launch
from ._checks import require_float, require_like, require_tensors

_BLOCK = 1024


def silu_mul_reference(gate, up):
    """PyTorch reference of :func:`silu_mul` (same arguments, assumed valid)."""
    return torch.nn.functional.silu(gate) * up


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _silu_mul_kernel(g_ptr, u_ptr, o_ptr, n_cols, sg, su, so, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < n_cols
        g = tl.load(g_ptr + row * sg + cols, mask=m, other=0.0)
        u = tl.load(u_ptr + row * su + cols, mask=m, other=0.0)
        gf = g.to(tl.float32)
        act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
        tl.store(o_ptr + row * so + cols, (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=m)

    return _silu_mul_kernel


def silu_mul(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``silu(gate) * up`` (module docstring: rounding).

    Parameters
    ----------
    gate, up : torch.Tensor
        ``[B, N]`` float32/bfloat16/float16, same dtype, shape and device; last dimension contiguous.
    backend : {"auto", "triton", "torch"}
        As for :func:`rast_kernels.decode_attention`.

    Returns
    -------
    torch.Tensor
        ``[B, N]`` in the inputs' dtype.
    """
    require_tensors(gate=gate, up=up)
    if gate.dim() != 2:
        raise ValueError(f"gate: expected a 2-D tensor [B, N], got shape {tuple(gate.shape)}")
    require_float("gate", gate)
    require_like("up", up, gate.shape, gate.dtype, gate.device)
    for name, t in (("gate", gate), ("up", up)):
        if t.stride(1) != 1:
            raise ValueError(f"{name}: the last dimension must be contiguous (stride 1)")
    backend = _backends.resolve_triton_or_torch(backend, gate.device)
    if backend == "torch":
        return silu_mul_reference(gate, up)
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    rows, n = gate.shape
    if rows and n:
        with launch.on_device(gate):
            _kernel()[(rows, -(-n // _BLOCK))](gate, up, out, n, gate.stride(0), up.stride(0), out.stride(0),
                                                BLOCK=_BLOCK, num_warps=4)
    return out
