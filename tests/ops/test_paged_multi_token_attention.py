"""paged_multi_token_attention: Q new tokens per row, causal among them (speculative decoding's verify pass). The
Triton kernel (under TRITON_INTERPRET=1 on CPU) against the fp32 reference, the reference against an independent
oracle (paged_decode_attention_reference once per query with the query's own length), and Q = 1 against
paged_decode_attention bit for bit."""
import importlib
import math

import pytest
import torch

import sm90  # tests/ops/sm90.py
from op_testing import DEVICE, DTYPES, gen, needs_triton, raises_naming, without_gpu
from rast_kernels import _backends
from rast_kernels.ops import paged_multi_token_attention as exported
from rast_kernels.ops.paged_attention import (paged_decode_attention, paged_decode_attention_reference,
                                              paged_multi_token_attention, paged_multi_token_attention_reference)
from test_paged_attention import GARBAGE_BLOCK, TOL, make_paged

mod = importlib.import_module("rast_kernels.ops.paged_attention")


def make_case(lens, n_q, h_q, h_kv, dim, block_size, max_blocks, dtype, g, fill=(math.nan,)):
    """test_paged_attention's pools (random physical blocks per row; slots past every row's length hold the values
    of ``fill`` in turn, table entries past it GARBAGE_BLOCK) with a ``[B, n_q, H_q, D]`` query."""
    _, k_pool, v_pool, table, seq_lens = make_paged(lens, h_q, h_kv, dim, block_size, max_blocks, dtype, g)
    for pool in (k_pool, v_pool):
        unused = pool.isnan()
        n = int(unused.sum())
        pool[unused] = torch.tensor(fill, dtype=dtype).repeat(n // len(fill) + 1)[:n].to(pool.device)
    q = torch.randn(len(lens), n_q, h_q, dim, generator=g).to(dtype).to(DEVICE)
    return q, k_pool, v_pool, table, seq_lens


def check(q, k_pool, v_pool, table, seq_lens, **kw):
    got = paged_multi_token_attention(q, k_pool, v_pool, table, seq_lens, backend="triton", **kw)
    want = paged_multi_token_attention_reference(q, k_pool, v_pool, table, seq_lens, kw.get("scale"))
    assert got.shape == q.shape and got.dtype == q.dtype
    assert torch.isfinite(want).all() and torch.isfinite(got).all()  # unused slots must not leak into either
    torch.testing.assert_close(got.float(), want.float(), **TOL[q.dtype])
    return got


def assert_zero_where_nothing_to_attend(got, lens, cap):
    n_q = got.shape[1]
    for b, n in enumerate(lens):
        for j in range(n_q):
            if min(max(n, 0), cap) - n_q + j < 0:
                assert torch.equal(got[b, j], torch.zeros_like(got[b, j])), f"row {b} query {j} must be zero"


# (h_q, h_kv, dim, block_size, max_blocks, Q, num_splits, seq_lens): GQA groups 1, 2, 7; Q = 2, 3, 5, 8; block
# sizes 7 and 16 with the Q new tokens crossing a block boundary (L = 23, Q = 3 at 7: positions 20 | 21, 22;
# 33, Q = 5 at 16: 28..31 | 32; 15, Q = 2 at 7: 13 | 14); an inert row (L = 0), L < Q, L == Q, a full table, a
# length past the table's capacity (clamped) and a negative one; one split and several.
CASES = [
    (2, 2, 32, 7, 6, 3, 1, [23, 0, 2, 3]),
    (2, 1, 16, 16, 3, 5, 3, [33, 60]),
    (7, 1, 32, 7, 4, 2, 2, [15, 1]),
    (14, 2, 16, 16, 2, 8, 1, [32, -2]),
]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h_q,h_kv,dim,block_size,max_blocks,n_q,num_splits,lens", CASES)
def test_matches_reference(dtype, h_q, h_kv, dim, block_size, max_blocks, n_q, num_splits, lens):
    g = gen("multi", dtype, h_q, h_kv, dim, block_size, max_blocks, n_q, num_splits, lens)
    args = make_case(lens, n_q, h_q, h_kv, dim, block_size, max_blocks, dtype, g)
    got = check(*args, num_splits=num_splits)
    assert_zero_where_nothing_to_attend(got, lens, max_blocks * block_size)


@needs_triton
def test_unused_slots_do_not_leak():
    # slots past each row's length hold +inf, -inf and NaN; with several splits the short rows' later splits and
    # the first queries' see nothing
    args = make_case([11, 2], 3, 4, 2, 16, 4, 5, torch.float32, gen("leak"), fill=(math.inf, -math.inf, math.nan))
    assert args[1].isinf().any() and args[1].isnan().any()
    got = check(*args, num_splits=3)
    assert_zero_where_nothing_to_attend(got, [11, 2], 20)


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 2])
def test_query_tiles(monkeypatch, num_splits):
    # queries cut into several tiles per row (GQA 7 at 16 rows: 2 queries per tile, Q = 5 -> 3 tiles; the first
    # tiles stop at their own last query): the same values
    monkeypatch.setattr(mod, "multi_token_rows", lambda dtype, head_dim: 16)
    assert mod.multi_token_tiling(5, 7, 16) == (3, 2)
    args = make_case([23, 2], 5, 7, 1, 16, 7, 4, torch.bfloat16, gen("tiles", num_splits))
    got = check(*args, num_splits=num_splits)
    assert_zero_where_nothing_to_attend(got, [23, 2], 28)


@needs_triton
@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_one_query_is_paged_decode_attention_bit_for_bit(backend, dtype):
    # Q = 1 must keep the engine's decode results (graph == eager, bit-identity tests): the same bits as
    # paged_decode_attention, with the default split count and with an explicit one
    q, k_pool, v_pool, table, seq_lens = make_case([21, 0, 40], 1, 4, 2, 32, 7, 6, dtype, gen("one", dtype))
    want = paged_decode_attention(q[:, 0], k_pool, v_pool, table, seq_lens, backend=backend)
    got = paged_multi_token_attention(q, k_pool, v_pool, table, seq_lens, backend=backend)
    assert got.shape == q.shape and torch.equal(got[:, 0], want)
    want = paged_decode_attention(q[:, 0], k_pool, v_pool, table, seq_lens, backend=backend, num_splits=2)
    out = torch.full_like(q, math.nan)
    got = paged_multi_token_attention(q, k_pool, v_pool, table, seq_lens, backend=backend, num_splits=2, out=out)
    assert got is out and torch.equal(out[:, 0], want)


@pytest.mark.parametrize("n_q", [1, 2, 5])
def test_reference_matches_one_query_at_a_time(n_q):
    # an independent oracle: query j of row b is a one-token decode over the first p_j + 1 positions
    g = gen("oracle", n_q)
    lens = [30, 0, 3, 1, 100, -4]
    q, k_pool, v_pool, table, seq_lens = [t.cpu() for t in make_case(lens, n_q, 6, 3, 16, 5, 6, torch.float32, g)]
    got = paged_multi_token_attention_reference(q, k_pool, v_pool, table, seq_lens, 0.3)
    cap = table.shape[1] * k_pool.shape[1]
    for j in range(n_q):
        own = (seq_lens.clamp(0, cap) - n_q + 1 + j).clamp(min=0)
        want = paged_decode_attention_reference(q[:, j], k_pool, v_pool, table, own, 0.3)
        torch.testing.assert_close(got[:, j], want, atol=1e-6, rtol=1e-6)
    assert torch.isfinite(got).all()
    assert_zero_where_nothing_to_attend(got, lens, cap)


@needs_triton
@pytest.mark.parametrize("num_splits", [1, 2])
def test_strided_arguments_and_out(num_splits):
    # q with permuted strides, pools that are head slices of wider ones, the table every other column of a wider
    # one, seq_lens one length expanded to the batch (stride 0), and an out whose [B, Q] cannot be flattened
    # (the combine then stages its rows)
    g = gen("strided", num_splits)
    batch, n_q, h_q, h_kv, dim, bs, maxblk = 3, 3, 4, 2, 16, 7, 5
    q = torch.randn(n_q, dim, batch, h_q, generator=g).to(DEVICE).permute(2, 0, 3, 1)
    nb = batch * maxblk
    big_k = torch.randn(nb, bs, 2 * h_kv, dim, generator=g).to(DEVICE)
    big_v = torch.randn(nb, bs, h_kv + 1, dim, generator=g).to(DEVICE)
    k_pool, v_pool = big_k[:, :, 1::2], big_v[:, :, 1:]
    wide = torch.full((batch, 2 * maxblk), GARBAGE_BLOCK, dtype=torch.int32)
    wide[:, ::2] = torch.randperm(nb, generator=g).view(batch, maxblk).to(torch.int32)
    table = wide.to(DEVICE)[:, ::2]
    seq_lens = torch.tensor([26], dtype=torch.int32, device=DEVICE).expand(batch)
    out = torch.full((n_q, batch, h_q, dim), math.nan, device=DEVICE).transpose(0, 1)
    assert not q.is_contiguous() and not k_pool.is_contiguous() and not table.is_contiguous()
    assert mod._rows_view(out) is None
    got = paged_multi_token_attention(q, k_pool, v_pool, table, seq_lens, backend="triton", num_splits=num_splits,
                                      out=out)
    assert got is out
    want = paged_multi_token_attention_reference(q, k_pool, v_pool, table, seq_lens)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@needs_triton
def test_default_num_splits_and_scale():
    check(*make_case([70, 2], 4, 8, 2, 32, 16, 5, torch.float16, gen("default")), scale=0.07)


def test_torch_backend_is_reference_and_exported():
    assert exported is paged_multi_token_attention
    args = make_case([9, 4], 3, 4, 2, 16, 3, 4, torch.float32, gen("torch"))
    out = torch.empty_like(args[0])
    got = paged_multi_token_attention(*args, backend="torch", out=out)
    assert got is out
    torch.testing.assert_close(got, paged_multi_token_attention_reference(*args), rtol=0, atol=0)


def test_auto_on_cpu_is_reference(monkeypatch):
    monkeypatch.setattr(mod, "_multi_token_kernel", lambda: pytest.fail("auto ran the kernel on CPU"))
    monkeypatch.setattr(mod, "_kernels", lambda: pytest.fail("auto ran the kernel on CPU"))
    args = [t.cpu() for t in make_case([9, 4], 3, 4, 2, 16, 3, 4, torch.float32, gen("auto"))]
    torch.testing.assert_close(paged_multi_token_attention(*args), paged_multi_token_attention_reference(*args),
                               rtol=0, atol=0)


@needs_triton
def test_empty_batch_launches_nothing(monkeypatch):
    monkeypatch.setattr(mod, "_multi_token_kernel", lambda: pytest.fail("kernel launched for an empty batch"))
    q = torch.zeros(0, 3, 4, 16, device=DEVICE)
    pool = torch.zeros(2, 4, 2, 16, device=DEVICE)
    got = paged_multi_token_attention(q, pool, pool, torch.zeros(0, 3, dtype=torch.int32, device=DEVICE),
                                      torch.zeros(0, dtype=torch.int32, device=DEVICE), backend="triton")
    assert got.shape == (0, 3, 4, 16)


# ------------------------------------------------------------------------------------------------ errors
def _good():
    q, k_pool, v_pool, table, seq_lens = make_case([8, 3], 2, 4, 2, 16, 4, 2, torch.float32, gen("good"))
    return dict(q=q, k_pool=k_pool, v_pool=v_pool, block_table=table, seq_lens=seq_lens)


I32 = torch.int32
BAD = [
    (dict(q=[1.0]), TypeError, "q"),
    (dict(q=torch.zeros(2, 4, 16)), ValueError, "q"),  # paged_decode_attention's layout
    (dict(q=torch.zeros(2, 0, 4, 16)), ValueError, "q"),  # Q = 0
    (dict(q=torch.zeros(2, 2, 4, 16, dtype=torch.float64)), TypeError, "q"),
    (dict(q=torch.zeros(2, 2, 4, 300), k_pool=torch.zeros(2, 4, 2, 300), v_pool=torch.zeros(2, 4, 2, 300)),
     ValueError, "q"),
    (dict(k_pool=torch.zeros(2, 4, 2, 8), v_pool=torch.zeros(2, 4, 2, 8)), ValueError, "k_pool"),
    (dict(k_pool=torch.zeros(2, 4, 3, 16), v_pool=torch.zeros(2, 4, 3, 16)), ValueError, "k_pool"),
    (dict(v_pool=torch.zeros(2, 4, 2, 16, dtype=torch.float16)), TypeError, "v_pool"),
    (dict(block_table=torch.zeros(3, 2, dtype=I32)), ValueError, "block_table"),
    (dict(block_table=torch.zeros(2, 2)), TypeError, "block_table"),
    (dict(seq_lens=torch.zeros(2, 2, dtype=I32)), ValueError, "seq_lens"),
    (dict(seq_lens=torch.zeros(2, dtype=I32, device="meta")), ValueError, "seq_lens"),
    (dict(scale=-1.0), ValueError, "scale"),
    (dict(num_splits=65), ValueError, "num_splits"),
    (dict(out=torch.zeros(2, 4, 16)), ValueError, "out"),  # [B, H_q, D]: the decode op's layout
    (dict(out=torch.zeros(2, 2, 4, 16, dtype=torch.bfloat16)), ValueError, "out"),
    (dict(backend="cuda"), ValueError, "backend"),
]


@pytest.mark.parametrize("change,exc,name", BAD)
def test_bad_input(change, exc, name):
    raises_naming(paged_multi_token_attention, _good(), change, exc, name)


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setattr(_backends, "triton_interpreting", lambda: False)
    args = {key: value.cpu() for key, value in _good().items()}
    with pytest.raises(ValueError, match=r"^backend:"):
        paged_multi_token_attention(**args, backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_with_new_lengths():
    q, k_pool, v_pool, table, seq_lens = make_case([30, 200, 1], 5, 7, 1, 128, 16, 16, torch.bfloat16,
                                                   gen("graph"))
    out = torch.empty_like(q)
    paged_multi_token_attention(q, k_pool, v_pool, table, seq_lens, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_multi_token_attention(q, k_pool, v_pool, table, seq_lens, out=out)
    for lens in ([30, 200, 1], [0, 17, 4]):
        seq_lens.copy_(torch.tensor(lens))
        graph.replay()
        want = paged_multi_token_attention_reference(q, k_pool, v_pool, table, seq_lens)
        torch.testing.assert_close(out.float(), want.float(), **TOL[torch.bfloat16])


@without_gpu
def test_kernel_compiles_for_sm90_without_a_gpu():
    """The multi-token split kernel builds for an H100 target outside the interpreter and fits its launch limits
    (tests/ops/sm90.py)."""
    sm90.compiled("paged_multi_token_attention")
