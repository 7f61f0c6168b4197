"""silu_mul: the Triton kernel (under TRITON_INTERPRET=1 on CPU) against silu_mul_reference."""
import importlib

import pytest
import torch

import sm90  # tests/ops/sm90.py
from op_testing import DEVICE, DTYPES, INTERPRETED, gen, needs_triton, raises_naming, ulps, without_gpu
from rast_kernels import _backends
from rast_kernels.ops.silu_mul import silu_mul, silu_mul_reference

# the op's module (the package attribute of the same name is the function it re-exports)
mod = importlib.import_module("rast_kernels.ops.silu_mul")



# out = round(round(silu(g)) * u), silu in fp32 in both, but with different exp implementations (NumPy's under
# the interpreter, PyTorch's vectorised one on CPU; on CUDA Triton's exp is ex2.approx of g * log2(e), whose
# relative error grows like |g| * 2**-24 when exp(-g) dominates the denominator).
# - float32: those exp errors and the roundings: 8 ulps under the interpreter (seen: 3), 32 on CUDA
#   (|g| <= ~16 for these inputs).
# - 16-bit: the fp32 silu may differ in its last bits, which moves its rounding to the dtype by one ulp at most;
#   the product then moves by |u| * ulp(silu) <= 2 ulps of out before its own rounding: 2 ulps (seen: 1.35
#   for float16), not one, since the result is rounded twice as PyTorch's two kernels round it.
# - bfloat16 under the interpreter: its float32 -> bfloat16 conversion truncates instead of rounding to
#   nearest, so both roundings may err by a whole ulp: 3 ulps (seen: 2).
TOL = {
    torch.float32: ulps(torch.float32, 8 if INTERPRETED else 32),
    torch.float16: ulps(torch.float16, 2),
    torch.bfloat16: ulps(torch.bfloat16, 3 if INTERPRETED else 2),
}


def make_inputs(rows, n, dtype, g):
    gate = (torch.randn(rows, n, generator=g) * 4).to(dtype).to(DEVICE)
    up = (torch.randn(rows, n, generator=g) * 2).to(dtype).to(DEVICE)
    return gate, up


def check(gate, up):
    got = silu_mul(gate, up, backend="triton")
    want = silu_mul_reference(gate, up)
    assert got.shape == gate.shape and got.dtype == gate.dtype and got.is_contiguous()
    torch.testing.assert_close(got.float(), want.float(), **TOL[gate.dtype])
    return got


# (rows, N): one element; N not a multiple of the 1024-wide block (1000: one partial block, 4097: four full
# blocks and one element); N exactly one block; Qwen2-0.5B's intermediate size 4864
SIZES = [(1, 1), (3, 1000), (2, 4097), (4, 1024), (1, 4864)]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n", SIZES)
def test_matches_reference(dtype, rows, n):
    check(*make_inputs(rows, n, dtype, gen(dtype, rows, n)))


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_rows(dtype):
    # gate and up the two halves of one fused gate_up projection [B, 2N] (row stride 2N, up at offset N); then
    # gate every other row of a [2B, N] tensor, up a column window of a wider one (different row strides)
    g = gen("strided", dtype)
    rows, n = 3, 1500
    gate_up = (torch.randn(rows, 2 * n, generator=g) * 4).to(dtype).to(DEVICE)
    before = gate_up.clone()
    check(gate_up[:, :n], gate_up[:, n:])
    assert torch.equal(gate_up, before)
    big_gate, _ = make_inputs(2 * rows, 700, dtype, g)
    _, big_up = make_inputs(rows, 707, dtype, g)
    gate, up = big_gate[::2], big_up[:, 5:705]
    assert gate.stride(0) == 1400 and up.stride(0) == 707
    check(gate, up)


@needs_triton
def test_rows_are_independent():
    # the same row gives the same bits wherever it sits in the batch (and whatever the other rows hold)
    gate, up = make_inputs(4, 2100, torch.bfloat16, gen("rows"))
    got = check(gate, up)
    assert torch.equal(got[2:3], silu_mul(gate[2:3], up[2:3], backend="triton"))


@needs_triton
@pytest.mark.parametrize("rows,n", [(0, 16), (3, 0), (0, 0)])
def test_empty_launches_nothing(monkeypatch, rows, n):
    def no_kernel():
        raise AssertionError("kernel launched for an empty input")

    monkeypatch.setattr(mod, "_kernel", no_kernel)
    gate = torch.zeros(rows, n, dtype=torch.float16, device=DEVICE)
    got = silu_mul(gate, gate.clone(), backend="triton")
    assert got.shape == (rows, n) and got.dtype == torch.float16


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_backend_is_reference(dtype):
    gate, up = make_inputs(3, 50, dtype, gen("torch", dtype))
    assert torch.equal(silu_mul(gate, up, backend="torch"), silu_mul_reference(gate, up))


def test_auto_on_cpu_is_reference(monkeypatch):
    monkeypatch.setattr(mod, "_kernel", lambda: pytest.fail("auto ran the kernel on CPU"))
    gate, up = (t.cpu() for t in make_inputs(2, 30, torch.bfloat16, gen("auto")))
    assert torch.equal(silu_mul(gate, up), silu_mul_reference(gate, up))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_is_silu_times_up(dtype):
    # the reference itself against float64 g * sigmoid(g) * u, rounded once to the dtype (so 2 ulps: the
    # reference rounds twice)
    gate, up = make_inputs(2, 500, dtype, gen("formula", dtype))
    g64 = gate.double()
    want = (g64 * torch.sigmoid(g64) * up.double()).to(dtype)
    torch.testing.assert_close(silu_mul_reference(gate, up).float(), want.float(), **ulps(dtype, 2))


# ------------------------------------------------------------------------------------------------ errors
def _good():
    gate, up = make_inputs(2, 8, torch.float32, gen("good"))
    return dict(gate=gate, up=up)


F16 = torch.float16
BAD = [
    (dict(gate=[1.0]), TypeError, "gate"),
    (dict(up=None), TypeError, "up"),
    (dict(gate=torch.zeros(8)), ValueError, "gate"),
    (dict(gate=torch.zeros(2, 8, 1), up=torch.zeros(2, 8, 1)), ValueError, "gate"),
    (dict(gate=torch.zeros(2, 8, dtype=torch.int32), up=torch.zeros(2, 8, dtype=torch.int32)), TypeError, "gate"),
    (dict(gate=torch.zeros(2, 8, dtype=torch.float64)), TypeError, "gate"),
    (dict(up=torch.zeros(2, 9)), ValueError, "up"),
    (dict(up=torch.zeros(16)), ValueError, "up"),
    (dict(up=torch.zeros(2, 8, dtype=F16)), ValueError, "up"),
    (dict(up=torch.zeros(2, 8, device="meta")), ValueError, "up"),
    (dict(gate=torch.zeros(8, 2).t()), ValueError, "gate"),  # last dim not contiguous
    (dict(up=torch.zeros(8, 2).t()), ValueError, "up"),
    (dict(backend="triton_interpret"), ValueError, "backend"),
    (dict(backend=""), ValueError, "backend"),
]


@pytest.mark.parametrize("change,exc,name", BAD)
def test_bad_input(change, exc, name):
    raises_naming(silu_mul, _good(), change, exc, name)


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setattr(_backends, "triton_interpreting", lambda: False)
    args = {key: value.cpu() for key, value in _good().items()}
    with pytest.raises(ValueError, match=r"^backend:"):
        silu_mul(**args, backend="triton")


@without_gpu
def test_kernel_compiles_for_sm90_without_a_gpu():
    sm90.compiled("silu_mul")
