"""linear_rows (the fused CPU forward's linear for up to 8 rows) against its float64 reference: odd sizes, row views
of a larger weight, bias or none; each row's result independent of the other rows; argument errors."""
from __future__ import annotations

import pytest
import torch

from rast_kernels.ops.linear_rows import MAX_ROWS, linear_rows, linear_rows_available, linear_rows_reference

pytestmark = pytest.mark.skipif(not linear_rows_available(), reason="rast_kernels._C without linear_rows_cpu")


def _tol(k: int) -> float:
    """fp32 accumulation of k products of N(0, 1) values: error grows like sqrt(k) units of the result's scale."""
    return 2e-6 * k ** 0.5 * 8


@pytest.mark.parametrize("m", range(1, MAX_ROWS + 1))
@pytest.mark.parametrize("k,n", [(1, 3), (7, 65), (8, 1), (9, 64), (1537, 33)])
def test_matches_the_reference(m, k, n):
    g = torch.Generator().manual_seed(1000 * m + k + n)
    x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    for bias in (b, None):
        got = linear_rows(x, w, bias)
        want = linear_rows_reference(x, w, bias)
        assert got.shape == (m, n) and got.dtype == torch.float32
        assert (got - want).abs().max().item() <= _tol(k) * max(1.0, want.abs().max().item()), (m, k, n)


def test_row_views_of_a_concatenated_weight_and_row_independence():
    """q/k/v are row views of one tensor; a row's bits do not depend on the rows computed with it."""
    g = torch.Generator().manual_seed(7)
    whole = torch.randn(96, 40, generator=g)
    x = torch.randn(MAX_ROWS, 40, generator=g)
    view = whole[32:64]  # rows of a bigger tensor (row stride 40)
    got = linear_rows(x, view)
    assert torch.allclose(got, linear_rows_reference(x, view), atol=1e-5)
    for m in range(MAX_ROWS):
        assert torch.equal(linear_rows(x[m:m + 1], view)[0], got[m])
        assert torch.equal(linear_rows(x[: m + 1], view)[m], got[m])
    strided_x = torch.randn(3, 80, generator=g)[:, ::2]  # non-contiguous x is made contiguous
    assert torch.allclose(linear_rows(strided_x, view), linear_rows_reference(strided_x, view), atol=1e-5)


def test_nonfinite_values_propagate():
    x = torch.ones(2, 9)
    w = torch.ones(3, 9)
    w[1, 8] = float("inf")  # in the tail
    w[2, 0] = float("nan")  # in a vector block
    got = linear_rows(x, w)
    assert torch.equal(got[:, 0], torch.full((2,), 9.0))
    assert torch.isinf(got[:, 1]).all() and torch.isnan(got[:, 2]).all()


def test_argument_errors_name_the_argument():
    x, w = torch.ones(2, 4), torch.ones(3, 4)
    cases = [((torch.ones(0, 4), w), ValueError, "x"), ((torch.ones(MAX_ROWS + 1, 4), w), ValueError, "x"),
             ((x.double(), w), TypeError, "x"), ((x, w.double()), TypeError, "weight"),
             ((x, torch.ones(3, 5)), ValueError, "weight"), ((x, w, torch.ones(4)), ValueError, "bias"),
             ((x, w, torch.ones(3, dtype=torch.float16)), TypeError, "bias"), (("x", w), TypeError, "x")]
    for args, exc, name in cases:
        with pytest.raises(exc, match=f"^{name}:"):
            linear_rows(*args)
