"""Shared by the op tests: where they run, tolerances in ulps, per-case generators, bad-input calls."""
import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run on CPU tensors under the interpreter, chosen before import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from rast_kernels import _backends  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
needs_triton = pytest.mark.skipif(
    not _backends.has_triton() or (DEVICE == "cpu" and not _backends.triton_interpreting()),
    reason="needs Triton on CUDA, or TRITON_INTERPRET=1 on CPU",
)
# the sm_90 compile checks (tests/ops/sm90.py): on a GPU the kernels are compiled and run by the other tests
without_gpu = pytest.mark.skipif(DEVICE == "cuda" or not _backends.has_triton(),
                                 reason="on a GPU the kernels are compiled and run by the other tests; needs Triton")


def sampler_backend_available(backend: str) -> bool:
    """Whether ``rast_sample(..., backend=backend)`` can run here: C++ on CPU when built, Triton on CUDA or under
    the interpreter, the reference always."""
    if backend == "cpp":
        return DEVICE == "cpu" and _backends.has_cpp_cpu()
    if backend == "triton":
        return _backends.has_triton() and (DEVICE == "cuda" or _backends.triton_interpreting())
    return True


def unavailable_reason(backend: str) -> str:
    """The skip reason of a sampler backend :func:`sampler_backend_available` refuses (for the C++ kernel on CPU:
    why ``rast_kernels._C`` did not import)."""
    if backend == "cpp" and DEVICE == "cpu":
        return _backends.cpp_unavailable_reason()
    return f"{backend} backend unavailable on {DEVICE}"


def sampler_backends(names=("torch", "cpp", "triton")) -> list:
    """pytest params of the sampler backends, the unavailable ones skipped with the reason."""
    return [pytest.param(b, marks=pytest.mark.skipif(not sampler_backend_available(b), reason=unavailable_reason(b)))
            for b in names]


def ulps(dtype, n):
    """assert_close tolerances of n units in the last place: eps is one ulp relative to a value at the bottom of
    its binade (so rtol=n*eps admits n ulps everywhere), eps * smallest_normal one ulp among the subnormals."""
    fi = torch.finfo(dtype)
    return dict(rtol=n * fi.eps, atol=n * fi.eps * fi.smallest_normal)


def gen(*key):
    """A generator with a seed of its own for each case (a fresh one per parameter set, reproducible)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def raises_naming(fn, args: dict, change: dict, exc, name: str) -> None:
    """``fn(**args)`` with ``change`` applied (tensors moved to DEVICE, ``meta`` ones kept: a wrong device) raises
    ``exc`` with a message that starts with ``name:``."""
    args = dict(args)
    for key, value in change.items():
        if isinstance(value, torch.Tensor) and value.device.type != "meta":
            value = value.to(DEVICE)
        args[key] = value
    with pytest.raises(exc, match=rf"^{name}:"):
        fn(**args)
