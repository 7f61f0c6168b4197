"""pytest-benchmark microbenchmarks of one RAST sampling step (not part of the test suite).

    pytest benchmarks/ --benchmark-only                 # run them
    pytest benchmarks/ --benchmark-only -k cpp          # one backend
    pytest benchmarks/ --benchmark-skip                 # collect and skip them

The suite's ``testpaths = ["tests"]`` keeps these out of a plain ``pytest`` run; every test here uses
the ``benchmark`` fixture, so ``--benchmark-skip`` skips them all. Backends this machine lacks are
skipped. On CUDA each timed call ends with a synchronize, so the numbers include the kernel time.
``bench_sampler.py`` gives the full table with CUDA-event timing.
"""
from __future__ import annotations

import pytest
import torch

import baselines
import rast_kernels
from bench_sampler import PAIRS, make_inputs, pair_inputs
from rast_kernels import _backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.type == "cuda"
SHAPES = [(1, 152064), (64, 152064), (256, 152064)] if ON_CUDA else [(1, 32000), (16, 32000)]
IMPLS = ["auto", "triton", "cpp", "torch", "hf_chain", "flashinfer"]
SETTINGS = {"top_p": dict(alpha=1.0, temperature=1.0, top_p=0.95), "none": dict(alpha=1.0, temperature=1.0, top_p=1.0)}

pytestmark = pytest.mark.benchmark(min_rounds=20 if ON_CUDA else 3, warmup=ON_CUDA)  # CUDA: compile, allocator


def _sampler(impl: str):
    """fn(base, expert, expert_base, params) for ``impl`` (expert / expert_base: tensors or lists of K), or skip
    when this machine lacks it."""
    if impl in ("auto", "torch"):
        return lambda *x, **p: rast_kernels.rast_sample(*x, **p, backend=impl)
    if impl == "triton":
        if not (ON_CUDA and _backends.has_triton()):
            pytest.skip("Triton backend is benchmarked on CUDA only (the CPU interpreter is not a speed path)")
        return lambda *x, **p: rast_kernels.rast_sample(*x, **p, backend="triton")
    if impl == "cpp":
        if ON_CUDA or not _backends.has_cpp_cpu():
            pytest.skip("the compiled CPU kernel (rast_kernels._C) is not available on this device")
        return lambda *x, **p: rast_kernels.rast_sample(*x, **p, backend="cpp")
    if impl == "hf_chain":
        return lambda *x, **p: baselines.hf_chain_sample(*x, **p)
    if impl == "flashinfer":
        if not (ON_CUDA and baselines.flashinfer_available()):
            pytest.skip("flashinfer is not importable on a CUDA device here")
        return lambda *x, **p: baselines.flashinfer_sample(*x, **p)
    raise ValueError(f"impl: unknown {impl!r}")


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("pairs", PAIRS, ids=[f"K{k}" for k in PAIRS])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("B,V", SHAPES, ids=[f"B{b}-V{v}" for b, v in SHAPES])
@pytest.mark.parametrize("impl", IMPLS)
def test_rast_sample_step(benchmark, impl, B, V, dtype, pairs, setting):
    fn = _sampler(impl)
    inputs = pair_inputs(make_inputs(B, V, dtype, DEVICE, 1, seed=0, n_tensors=1 + 2 * pairs)[0], pairs)
    params = SETTINGS[setting]
    benchmark.group = f"B={B} V={V} {str(dtype).removeprefix('torch.')} K={pairs} {setting}"
    benchmark.extra_info.update(device=str(DEVICE), impl=impl, pairs=pairs)

    def step():
        tokens = fn(*inputs, **params)
        if ON_CUDA:
            torch.cuda.synchronize()
        return tokens

    tokens = benchmark(step)
    assert tokens.shape == (B,) and bool(((tokens >= 0) & (tokens < V)).all())
