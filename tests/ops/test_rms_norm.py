"""add_rms_norm: the Triton kernel (under TRITON_INTERPRET=1 on CPU) against add_rms_norm_reference."""
import importlib
import math

import pytest
import torch

import sm90  # tests/ops/sm90.py
from op_testing import DEVICE, DTYPES, INTERPRETED, gen, needs_triton, raises_naming, ulps, without_gpu
from rast_kernels import _backends
from rast_kernels.ops.rms_norm import add_rms_norm, add_rms_norm_reference

# the op's module (the package attribute of the same name is the function it re-exports)
mod = importlib.import_module("rast_kernels.ops.rms_norm")



# y against the reference applied to the kernel's own s (so that a bf16 difference of s under the interpreter,
# checked on its own, is not counted twice). The kernel and the reference differ in the order of the fp32 sum
# of squares and in 1/sqrt vs rsqrt (on CUDA also the approximate sqrt and division): a few fp32 ulps of rstd.
# - float32: that error plus the two roundings of y = w * (t * rstd): 16 ulps allowed (seen: 3 on CPU).
# - 16-bit: the rstd error is far below 16-bit resolution, but it can move t * rstd across a rounding boundary
#   of the dtype (one ulp of u = (t * rstd).to(dtype)); w * u then moves by |w| * ulp(u) <= 2 ulps of y before
#   its own rounding. So the bound is 2 ulps relative to y (seen: 1.6 for float16), not one: y is rounded
#   twice, as transformers rounds it.
# - bfloat16 under the interpreter: its float32 -> bfloat16 conversion truncates instead of rounding to
#   nearest, so both roundings may err by a whole ulp instead of half: 3 ulps (seen: 2).
Y_TOL = {
    torch.float32: ulps(torch.float32, 16),
    torch.float16: ulps(torch.float16, 2),
    torch.bfloat16: ulps(torch.bfloat16, 3 if INTERPRETED else 2),
}


def make_inputs(batch, hidden, dtype, g, scale=3.0):
    x = (torch.randn(batch, hidden, generator=g) * scale).to(dtype).to(DEVICE)
    residual = (torch.randn(batch, hidden, generator=g) * scale).to(dtype).to(DEVICE)
    weight = (1 + 0.5 * torch.randn(hidden, generator=g)).to(dtype).to(DEVICE)
    return x, residual, weight


def check_s(s, want):
    """s = residual + x is an fp32 add rounded to the dtype, as PyTorch computes it: the same
    bits for float32 and float16 everywhere and for bfloat16 on CUDA; bfloat16 under the interpreter truncates
    instead of rounding to nearest (within one ulp)."""
    assert s.shape == want.shape and s.dtype == want.dtype
    if s.dtype == torch.bfloat16 and INTERPRETED:
        torch.testing.assert_close(s.float(), want.float(), **ulps(torch.bfloat16, 1))
    else:
        bits = torch.int32 if s.dtype == torch.float32 else torch.int16
        assert torch.equal(s.view(bits), want.view(bits)), (s.float() - want.float()).abs().max()


def check(x, weight, eps, residual=None):
    y, s = add_rms_norm(x, weight, eps, residual, backend="triton")
    _, want_s = add_rms_norm_reference(x, weight, eps, residual)
    if residual is None:
        assert s is x
    else:
        check_s(s, want_s)
        assert s.is_contiguous() and s.data_ptr() not in (x.data_ptr(), residual.data_ptr())
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    want_y, _ = add_rms_norm_reference(s, weight, eps)  # y from the kernel's own s (see Y_TOL)
    torch.testing.assert_close(y.float(), want_y.float(), **Y_TOL[x.dtype])
    return y, s


# (batch, hidden): a single element, odd sizes, Qwen2-0.5B's 896 and Qwen2-7B's 3584 (4096-wide block, 8 warps)
SIZES = [(1, 1), (3, 7), (2, 100), (4, 896), (2, 3584)]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,hidden", SIZES)
def test_matches_reference(dtype, batch, hidden):
    x, residual, weight = make_inputs(batch, hidden, dtype, gen("res", dtype, batch, hidden))
    check(x, weight, 1e-6, residual)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,hidden,eps", [(1, 7, 1e-6), (3, 100, 1e-5), (2, 896, 0)])
def test_without_residual(dtype, batch, hidden, eps):
    # the first norm of a model: s is x itself (nothing written); eps given as an int 0 too
    x, _, weight = make_inputs(batch, hidden, dtype, gen("nores", dtype, batch, hidden))
    check(x, weight, eps)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_rows(dtype):
    # x a column slice of a wider tensor (row stride 108, offset 3), the residual every other row of another
    g = gen("strided", dtype)
    batch, hidden = 3, 100
    big = (torch.randn(batch, hidden + 8, generator=g) * 2).to(dtype).to(DEVICE)
    res_big = (torch.randn(2 * batch, hidden, generator=g) * 2).to(dtype).to(DEVICE)
    weight = torch.randn(hidden, generator=g).to(dtype).to(DEVICE)
    x, residual = big[:, 3:3 + hidden], res_big[::2]
    assert not x.is_contiguous() and not residual.is_contiguous()
    big0, res0 = big.clone(), res_big.clone()
    check(x, weight, 1e-6, residual)
    check(x, weight, 1e-6)
    assert torch.equal(big, big0) and torch.equal(res_big, res0)  # inputs untouched


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_magnitudes_beyond_16_bit_squares(dtype):
    # sums of squares are fp32: rows of |x| ~ 1e4 (squares overflow float16) and ~ 1e-4 (squares underflow
    # float16; eps then dominates the mean) stay finite and match
    g = gen("magnitude", dtype)
    x = torch.randn(4, 256, generator=g)
    x[:2] *= 1e4
    x[2:] *= 1e-4
    x = x.clamp(-6e4, 6e4).to(dtype).to(DEVICE)
    weight = torch.randn(256, generator=g).to(dtype).to(DEVICE)
    y, _ = check(x, weight, 1e-6)
    assert torch.isfinite(y).all()
    check(x, weight, 1e-6, torch.zeros_like(x))


@needs_triton
@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's NumPy warns about inf * 0
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_zero_and_non_finite_rows(dtype, with_residual):
    # row 1 all zeros: y is exactly 0 (rstd = 1/sqrt(eps) is finite). Row 2 holds an inf, row 3 a NaN: their y
    # are NaN/0 as the reference's, and the other rows are unaffected (one row per program): bit-identical to
    # the kernel's result on those rows alone, and within tolerance of the reference.
    g = gen("nonfinite", dtype, with_residual)
    x, residual, weight = make_inputs(5, 96, dtype, g)
    x[1] = 0
    x[2, 17] = math.inf
    x[3, 50] = math.nan
    if with_residual:
        residual[1] = 0
    else:
        residual = None
    y, s = add_rms_norm(x, weight, 1e-6, residual, backend="triton")
    want_y, want_s = add_rms_norm_reference(x, weight, 1e-6, residual)
    assert torch.equal(y[1], torch.zeros_like(y[1]))
    for row in (2, 3):
        assert torch.equal(torch.isnan(y[row]), torch.isnan(want_y[row]))
        assert torch.isnan(y[row]).any()
        torch.testing.assert_close(y[row].float(), want_y[row].float(), equal_nan=True, **Y_TOL[dtype])
    ok = [0, 1, 4]
    torch.testing.assert_close(y[ok].float(), want_y[ok].float(), **Y_TOL[dtype])
    alone_y, alone_s = add_rms_norm(x[ok], weight, 1e-6, None if residual is None else residual[ok],
                                    backend="triton")
    assert torch.equal(y[ok], alone_y) and torch.equal(s[ok], alone_s)
    if with_residual:
        check_s(s[ok], want_s[ok])


@needs_triton
@pytest.mark.parametrize("with_residual", [False, True])
def test_empty_batch_launches_nothing(monkeypatch, with_residual):
    def no_kernel():
        raise AssertionError("kernel launched for an empty batch")

    monkeypatch.setattr(mod, "_kernel", no_kernel)
    x = torch.zeros(0, 64, dtype=torch.bfloat16, device=DEVICE)
    weight = torch.ones(64, dtype=torch.bfloat16, device=DEVICE)
    residual = torch.zeros_like(x) if with_residual else None
    y, s = add_rms_norm(x, weight, 1e-6, residual, backend="triton")
    assert y.shape == (0, 64) and s.shape == (0, 64) and y.dtype == s.dtype == torch.bfloat16
    assert (s is x) == (not with_residual)


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_backend_is_reference(dtype):
    x, residual, weight = make_inputs(3, 40, dtype, gen("torch", dtype))
    for r in (residual, None):
        y, s = add_rms_norm(x, weight, 1e-5, r, backend="torch")
        want_y, want_s = add_rms_norm_reference(x, weight, 1e-5, r)
        assert torch.equal(y, want_y) and torch.equal(s, want_s)


def test_auto_on_cpu_is_reference(monkeypatch):
    monkeypatch.setattr(mod, "_kernel", lambda: pytest.fail("auto ran the kernel on CPU"))
    x, residual, weight = (t.cpu() for t in make_inputs(2, 24, torch.float16, gen("auto")))
    y, s = add_rms_norm(x, weight, 1e-6, residual)
    want_y, want_s = add_rms_norm_reference(x, weight, 1e-6, residual)
    assert torch.equal(y, want_y) and torch.equal(s, want_s)
    assert add_rms_norm(x, weight, 1e-6, backend="auto")[1] is x


def test_reference_is_rms_norm():
    # the reference itself against the float64 formula w * s / sqrt(mean(s**2) + eps), s = x + residual
    x, residual, weight = make_inputs(3, 300, torch.float32, gen("formula"))
    y, s = add_rms_norm_reference(x, weight, 1e-5, residual)
    s64 = x.double() + residual.double()
    torch.testing.assert_close(s.double(), s64, rtol=2**-24, atol=0)
    want = weight.double() * s64 / torch.sqrt(s64.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(y.double(), want, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------ errors
def _good():
    g = gen("good")
    x = torch.randn(2, 8, generator=g).to(DEVICE)
    return dict(x=x, weight=torch.ones(8, device=DEVICE), eps=1e-6, residual=torch.randn(2, 8, generator=g).to(DEVICE))


F16 = torch.float16
BAD = [
    (dict(x=[1.0]), TypeError, "x"),
    (dict(weight="w"), TypeError, "weight"),
    (dict(x=torch.zeros(8)), ValueError, "x"),
    (dict(x=torch.zeros(2, 8, 1)), ValueError, "x"),
    (dict(x=torch.zeros(2, 8, dtype=torch.int32)), TypeError, "x"),
    (dict(x=torch.zeros(2, 8, dtype=torch.float64)), TypeError, "x"),
    (dict(x=torch.zeros(2, 0)), ValueError, "x"),
    (dict(x=torch.zeros(1, 65537), residual=None), ValueError, "x"),
    (dict(x=torch.zeros(8, 2).t()), ValueError, "x"),  # hidden dim not contiguous
    (dict(weight=torch.ones(7)), ValueError, "weight"),
    (dict(weight=torch.ones(1, 8)), ValueError, "weight"),
    (dict(weight=torch.ones(8, dtype=F16)), ValueError, "weight"),
    (dict(weight=torch.ones(8, device="meta")), ValueError, "weight"),
    (dict(weight=torch.ones(16)[::2]), ValueError, "weight"),
    (dict(residual=(1.0,)), TypeError, "residual"),
    (dict(residual=torch.zeros(3, 8)), ValueError, "residual"),
    (dict(residual=torch.zeros(2, 8, dtype=F16)), ValueError, "residual"),
    (dict(residual=torch.zeros(2, 8, device="meta")), ValueError, "residual"),
    (dict(residual=torch.zeros(8, 2).t()), ValueError, "residual"),
    (dict(eps=-1e-6), ValueError, "eps"),
    (dict(eps=math.nan), ValueError, "eps"),
    (dict(eps=True), TypeError, "eps"),
    (dict(eps="1e-6"), TypeError, "eps"),
    (dict(eps=None), TypeError, "eps"),
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(backend="Triton"), ValueError, "backend"),
]


@pytest.mark.parametrize("change,exc,name", BAD)
def test_bad_input(change, exc, name):
    raises_naming(add_rms_norm, _good(), change, exc, name)


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setattr(_backends, "triton_interpreting", lambda: False)
    args = {key: value.cpu() if isinstance(value, torch.Tensor) else value for key, value in _good().items()}
    with pytest.raises(ValueError, match=r"^backend:"):
        add_rms_norm(**args, backend="triton")


@without_gpu
def test_kernel_compiles_for_sm90_without_a_gpu():
    sm90.compiled("rms_norm")
