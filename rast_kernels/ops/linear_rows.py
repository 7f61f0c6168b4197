"""``linear_rows``: ``x @ weight.T + bias`` for a few rows of ``x`` on CPU, reading the weight once.

Semantics (the spec; :func:`linear_rows_reference` is its executable form): for ``x`` ``[M, K]`` with
``1 <= M <= MAX_ROWS`` float32, ``weight`` ``[N, K]`` and ``bias`` ``[N]`` (or None), both float32::

    out[m, n] = sum_k x[m, k] * weight[n, k] + bias[n]          (float32 [M, N])

accumulated in fp32. The C++ kernel (``csrc/linear_rows_cpu.h``, AVX2 + FMA where the CPU has them) reads every
weight row once and uses it for all ``M`` rows, and sums each dot product in the same order whatever ``M`` is, so a
row's result does not depend on the other rows: a decode step (one token per row) and a speculative verify pass
(``k + 1`` tokens per row) compute the same bits for the same token. Summation order: 8 interleaved partial sums,
then the tail; it differs from oneDNN's and MKL's (fp32 rounding differences).

Why: at decode a linear layer of a CPU-resident model is a few matrix-vector products and its time is the weight
read. oneDNN's matrix-vector product reads near the machine's copy rate for one row, but its GEMM for 2 to 8 rows
reads at about half that rate and MKL's at a quarter (``benchmarks/RESULTS.md``); this kernel keeps 2 to 8 rows
close to the one-row rate.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _backends
from ._checks import require_tensors

MAX_ROWS = 8


def linear_rows_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """PyTorch reference of :func:`linear_rows`: the product in float64, returned in float32."""
    out = x.double() @ weight.double().T
    if bias is not None:
        out = out + bias.double()
    return out.float()


def linear_rows_available() -> bool:
    """Whether the compiled kernel is there (``rast_kernels._C`` built with it)."""
    mod = _backends.cpp_module()
    return mod is not None and hasattr(mod, "linear_rows_cpu")


def linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x @ weight.T + bias`` (module docstring: exact semantics).

    Parameters
    ----------
    x : torch.Tensor
        ``[M, K]`` float32 on CPU, ``1 <= M <= MAX_ROWS`` (made contiguous if it is not).
    weight : torch.Tensor
        ``[N, K]`` float32 on CPU with contiguous rows (any row stride: a row view of a concatenated weight works).
    bias : torch.Tensor, optional
        ``[N]`` float32 on CPU.

    Returns
    -------
    torch.Tensor
        ``[M, N]`` float32.
    """
    require_tensors(x=x, weight=weight)
    for name, t in (("x", x), ("weight", weight)) + ((("bias", bias),) if bias is not None else ()):
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise TypeError(f"{name}: expected a float32 CPU tensor, got {t.dtype} on {t.device}")
    if x.dim() != 2 or not 1 <= x.shape[0] <= MAX_ROWS:
        raise ValueError(f"x: expected a [M, K] tensor with 1 <= M <= {MAX_ROWS}, got shape {tuple(x.shape)}")
    if not linear_rows_available():
        why = _backends.cpp_unavailable_reason() if _backends.cpp_module() is None else \
            "rast_kernels._C has no linear_rows_cpu (an older build: pip install --no-build-isolation -e .)"
        raise RuntimeError(f"linear_rows: {why}")
    return _backends.cpp_module().linear_rows_cpu(x.contiguous(), weight, bias)
