"""paged_decode_attention: the Triton kernel (under TRITON_INTERPRET=1 on CPU) against the fp32 reference."""
import importlib
import math

import pytest
import torch

import sm90  # tests/ops/sm90.py
from op_testing import DEVICE, DTYPES, gen, needs_triton, raises_naming, without_gpu
from rast_kernels import _backends
from rast_kernels.ops import paged_decode_attention as exported
from rast_kernels.ops.decode_attention import decode_attention_reference
from rast_kernels.ops.paged_attention import paged_decode_attention, paged_decode_attention_reference

mod = importlib.import_module("rast_kernels.ops.paged_attention")

# Same tolerances as decode_attention's tests (tests/ops/test_decode_attention.py: the 16-bit output rounding
# and the softmax weights rounded to the cache dtype before P @ V; fp32: summation order only).
TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}
GARBAGE_BLOCK = -(2**30)  # table entries past a row's length: any read of them would fault or show


def make_paged(lens, h_q, h_kv, dim, block_size, max_blocks, dtype, g, spare=3, shared_prefix=0):
    """q and pools with a random permutation of physical blocks per row (plus ``spare`` never-used blocks); the
    first ``shared_prefix`` logical blocks of every row after the first point to row 0's physical blocks. Slots
    no row addresses hold NaN, table entries past a row's length hold GARBAGE_BLOCK."""
    batch = len(lens)
    need = [min(max(n, 0), max_blocks * block_size) for n in lens]
    used = [-(-n // block_size) for n in need]
    own = [u if b == 0 else max(u - shared_prefix, 0) for b, u in enumerate(used)]
    n_blocks = sum(own) + spare
    perm = torch.randperm(n_blocks, generator=g).tolist()
    table = torch.full((batch, max_blocks), GARBAGE_BLOCK, dtype=torch.int32)
    nxt = 0
    for b in range(batch):
        for i in range(used[b]):
            if b > 0 and i < shared_prefix:
                table[b, i] = table[0, i]
            else:
                table[b, i] = perm[nxt]
                nxt += 1
    k_pool = torch.randn(n_blocks, block_size, h_kv, dim, generator=g).to(dtype)
    v_pool = torch.randn(n_blocks, block_size, h_kv, dim, generator=g).to(dtype)
    live = torch.zeros(n_blocks * block_size, dtype=torch.bool)
    for b in range(batch):
        for j in range(need[b]):
            live[table[b, j // block_size] * block_size + j % block_size] = True
    live = live.view(n_blocks, block_size)
    k_pool[~live] = math.nan
    v_pool[~live] = math.nan
    q = torch.randn(batch, h_q, dim, generator=g).to(dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int64)
    return [t.to(DEVICE) for t in (q, k_pool, v_pool, table, seq_lens)]


def check(q, k_pool, v_pool, table, seq_lens, **kw):
    got = paged_decode_attention(q, k_pool, v_pool, table, seq_lens, backend="triton", **kw)
    want = paged_decode_attention_reference(q, k_pool, v_pool, table, seq_lens, kw.get("scale"))
    assert got.shape == q.shape and got.dtype == q.dtype
    assert torch.isfinite(want).all() and torch.isfinite(got).all()  # NaN slots must not leak into either
    torch.testing.assert_close(got.float(), want.float(), **TOL[q.dtype])
    return got


# (h_q, h_kv, dim, block_size, max_blocks, num_splits, seq_lens): GQA ratios 1, 2, 4, 8; block sizes 16 and the odd
# 7, 13, 1 (one tile spans many blocks); lengths one past, one short of and exactly at block boundaries; an empty
# row; a length past the table's capacity (clamped) and a negative one; more splits than tiles; head dims 64 and
# the odd 80, 48.
CASES = [
    (4, 4, 64, 16, 5, 1, [17, 16, 1]),
    (6, 3, 80, 7, 12, 3, [20, 0, 84]),
    (8, 2, 64, 13, 7, 4, [91, 26, 27, 12]),
    (8, 1, 48, 16, 4, 8, [100, -3, 33]),
    (2, 2, 64, 1, 70, 2, [70, 5]),
]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h_q,h_kv,dim,block_size,max_blocks,num_splits,lens", CASES)
def test_matches_reference(dtype, h_q, h_kv, dim, block_size, max_blocks, num_splits, lens):
    g = gen("paged", dtype, h_q, h_kv, dim, block_size, max_blocks, num_splits, lens)
    args = make_paged(lens, h_q, h_kv, dim, block_size, max_blocks, dtype, g)
    got = check(*args, num_splits=num_splits)
    for b, n in enumerate(lens):
        if n <= 0:
            assert torch.equal(got[b], torch.zeros_like(got[b])), "an empty row must be exactly zero"


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_shared_prefix_blocks(dtype):
    # rows 1 and 2 reuse row 0's first two physical blocks (a shared prompt): their attention over the shared
    # positions reads the same slots; the table must not be assumed injective
    g = gen("prefix", dtype)
    q, k_pool, v_pool, table, seq_lens = make_paged([40, 29, 45], 8, 2, 64, 13, 4, dtype, g, shared_prefix=2)
    assert torch.equal(table[1, :2], table[0, :2]) and torch.equal(table[2, :2], table[0, :2])
    check(q, k_pool, v_pool, table, seq_lens, num_splits=2)
    # the same query on two rows with the same table and length gives the same output
    q[1], table[1], seq_lens[1] = q[0], table[0], seq_lens[0]
    got = paged_decode_attention(q, k_pool, v_pool, table, seq_lens, backend="triton", num_splits=2)
    assert torch.equal(got[1], got[0])


@needs_triton
def test_64_bit_slot_offsets(monkeypatch):
    # pools past 2**31 elements take 64-bit slot offsets; the same values on small pools with the threshold lowered
    monkeypatch.setattr(mod, "_OFFS64_FROM", 0)
    args = make_paged([45, 13, 0], 8, 2, 64, 13, 4, torch.bfloat16, gen("offs64"))
    check(*args, num_splits=2)


@needs_triton
def test_split_count_does_not_change_result():
    q, k_pool, v_pool, table, seq_lens = make_paged([150, 64, 3], 4, 1, 64, 16, 10, torch.float32, gen("splits"))
    one = paged_decode_attention(q, k_pool, v_pool, table, seq_lens, backend="triton", num_splits=1)
    many = paged_decode_attention(q, k_pool, v_pool, table, seq_lens, backend="triton", num_splits=5)
    torch.testing.assert_close(one, many, **TOL[torch.float32])


@needs_triton
def test_strided_arguments_and_out():
    # q with a non-unit last stride, pools that are head slices of wider ones, the table every other column of a
    # wider one (row and column strides both != 1 / MAXBLK), seq_lens one length expanded to the batch (stride 0)
    g = gen("strided")
    batch, h_q, h_kv, dim, bs, maxblk = 3, 4, 2, 64, 7, 6
    q = torch.randn(batch, dim, h_q, generator=g).to(DEVICE).transpose(1, 2)
    nb = batch * maxblk
    big_k = torch.randn(nb, bs, 2 * h_kv, dim, generator=g).to(DEVICE)
    big_v = torch.randn(nb, bs, h_kv + 1, dim, generator=g).to(DEVICE)
    k_pool, v_pool = big_k[:, :, 1::2], big_v[:, :, 1:]
    wide = torch.full((batch, 2 * maxblk), GARBAGE_BLOCK, dtype=torch.int32)
    wide[:, ::2] = torch.randperm(nb, generator=g).view(batch, maxblk).to(torch.int32)
    table = wide.to(DEVICE)[:, ::2]
    seq_lens = torch.tensor([31], dtype=torch.int32, device=DEVICE).expand(batch)
    assert not q.is_contiguous() and not k_pool.is_contiguous() and not table.is_contiguous()
    assert seq_lens.stride(0) == 0
    out = torch.full((batch, h_q, dim), math.nan, device=DEVICE)
    got = paged_decode_attention(q, k_pool, v_pool, table, seq_lens, backend="triton", num_splits=2, out=out)
    assert got is out
    want = paged_decode_attention_reference(q, k_pool, v_pool, table, seq_lens)
    torch.testing.assert_close(got, want, **TOL[torch.float32])


@needs_triton
def test_default_num_splits_and_scale():
    q, k_pool, v_pool, table, seq_lens = make_paged([200, 1], 7, 1, 128, 16, 13, torch.bfloat16, gen("default"))
    check(q, k_pool, v_pool, table, seq_lens, scale=0.05)


def test_reference_matches_dense_reference():
    # the paged reference against decode_attention's (an independent implementation): the same K/V laid out as a
    # dense [B, H_kv, S, D] cache and as permuted blocks of a pool
    g = gen("dense")
    batch, h_q, h_kv, dim, bs, maxblk = 3, 6, 2, 32, 5, 4
    s_max = bs * maxblk
    q = torch.randn(batch, h_q, dim, generator=g)
    k = torch.randn(batch, h_kv, s_max, dim, generator=g)
    v = torch.randn(batch, h_kv, s_max, dim, generator=g)
    table = torch.randperm(batch * maxblk, generator=g).view(batch, maxblk).to(torch.int32)
    k_pool = torch.empty(batch * maxblk, bs, h_kv, dim)
    v_pool = torch.empty_like(k_pool)
    for b in range(batch):
        for i in range(maxblk):
            k_pool[table[b, i]] = k[b, :, i * bs:(i + 1) * bs].transpose(0, 1)
            v_pool[table[b, i]] = v[b, :, i * bs:(i + 1) * bs].transpose(0, 1)
    seq_lens = torch.tensor([20, 6, 0])
    got = paged_decode_attention_reference(q, k_pool, v_pool, table, seq_lens)
    want = decode_attention_reference(q, k, v, torch.zeros(batch, dtype=torch.int64), seq_lens)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_torch_backend_is_reference_and_exported():
    assert exported is paged_decode_attention
    args = make_paged([9, 4], 4, 2, 16, 3, 4, torch.float32, gen("torch"))
    out = torch.empty_like(args[0])
    got = paged_decode_attention(*args, backend="torch", out=out)
    assert got is out
    torch.testing.assert_close(got, paged_decode_attention_reference(*args), rtol=0, atol=0)


def test_auto_on_cpu_is_reference(monkeypatch):
    monkeypatch.setattr(mod, "_kernels", lambda: pytest.fail("auto ran the kernel on CPU"))
    args = [t.cpu() for t in make_paged([9, 4], 4, 2, 16, 3, 4, torch.float32, gen("auto"))]
    torch.testing.assert_close(paged_decode_attention(*args), paged_decode_attention_reference(*args), rtol=0,
                               atol=0)


@needs_triton
def test_empty_batch_launches_nothing(monkeypatch):
    monkeypatch.setattr(mod, "_kernels", lambda: pytest.fail("kernel launched for an empty batch"))
    q = torch.zeros(0, 4, 16, device=DEVICE)
    pool = torch.zeros(2, 4, 2, 16, device=DEVICE)
    got = paged_decode_attention(q, pool, pool, torch.zeros(0, 3, dtype=torch.int32, device=DEVICE),
                                 torch.zeros(0, dtype=torch.int32, device=DEVICE), backend="triton")
    assert got.shape == (0, 4, 16)


# ------------------------------------------------------------------------------------------------ errors
def _good():
    q, k_pool, v_pool, table, seq_lens = make_paged([8, 3], 4, 2, 16, 4, 2, torch.float32, gen("good"))
    return dict(q=q, k_pool=k_pool, v_pool=v_pool, block_table=table, seq_lens=seq_lens)


I32 = torch.int32
BAD = [
    (dict(q=[1.0]), TypeError, "q"),
    (dict(k_pool=None), TypeError, "k_pool"),
    (dict(block_table=[[0, 1]]), TypeError, "block_table"),
    (dict(seq_lens=3), TypeError, "seq_lens"),
    (dict(q=torch.zeros(2, 4, 1, 16)), ValueError, "q"),
    (dict(q=torch.zeros(2, 4, 16, dtype=torch.int32)), TypeError, "q"),
    (dict(q=torch.zeros(2, 4, 16, dtype=torch.float64)), TypeError, "q"),
    (dict(k_pool=torch.zeros(8, 2, 16)), ValueError, "k_pool"),
    (dict(v_pool=torch.zeros(2, 4, 2, 16, 1)), ValueError, "v_pool"),
    (dict(k_pool=torch.zeros(2, 4, 2, 16, dtype=torch.bfloat16)), TypeError, "k_pool"),
    (dict(v_pool=torch.zeros(2, 4, 2, 16, dtype=torch.float16)), TypeError, "v_pool"),
    (dict(v_pool=torch.zeros(2, 5, 2, 16)), ValueError, "v_pool"),
    (dict(k_pool=torch.zeros(2, 4, 2, 8), v_pool=torch.zeros(2, 4, 2, 8)), ValueError, "k_pool"),
    (dict(k_pool=torch.zeros(2, 4, 3, 16), v_pool=torch.zeros(2, 4, 3, 16)), ValueError, "k_pool"),
    (dict(k_pool=torch.zeros(0, 4, 2, 16), v_pool=torch.zeros(0, 4, 2, 16)), ValueError, "k_pool"),
    (dict(k_pool=torch.zeros(2, 0, 2, 16), v_pool=torch.zeros(2, 0, 2, 16)), ValueError, "k_pool"),
    (dict(q=torch.zeros(2, 4, 300), k_pool=torch.zeros(2, 4, 2, 300), v_pool=torch.zeros(2, 4, 2, 300)),
     ValueError, "q"),
    (dict(block_table=torch.zeros(2, dtype=I32)), ValueError, "block_table"),
    (dict(block_table=torch.zeros(3, 2, dtype=I32)), ValueError, "block_table"),
    (dict(block_table=torch.zeros(2, 0, dtype=I32)), ValueError, "block_table"),
    (dict(block_table=torch.zeros(2, 2)), TypeError, "block_table"),
    (dict(block_table=torch.zeros(2, 2, dtype=torch.int16)), TypeError, "block_table"),
    (dict(block_table=torch.zeros(2, 2, dtype=I32, device="meta")), ValueError, "block_table"),
    (dict(seq_lens=torch.zeros(3, dtype=I32)), ValueError, "seq_lens"),
    (dict(seq_lens=torch.zeros(2, 1, dtype=I32)), ValueError, "seq_lens"),
    (dict(seq_lens=torch.zeros(2)), TypeError, "seq_lens"),
    (dict(seq_lens=torch.zeros(2, dtype=I32, device="meta")), ValueError, "seq_lens"),
    (dict(v_pool=torch.zeros(2, 4, 2, 16, device="meta")), ValueError, "v_pool"),
    (dict(scale="1"), TypeError, "scale"),
    (dict(scale=True), TypeError, "scale"),
    (dict(scale=0.0), ValueError, "scale"),
    (dict(scale=math.inf), ValueError, "scale"),
    (dict(num_splits=0), ValueError, "num_splits"),
    (dict(num_splits=65), ValueError, "num_splits"),
    (dict(num_splits=2.0), TypeError, "num_splits"),
    (dict(out=[0.0]), TypeError, "out"),
    (dict(out=torch.zeros(2, 4, 15)), ValueError, "out"),
    (dict(out=torch.zeros(2, 4, 16, dtype=torch.float16)), ValueError, "out"),
    (dict(backend="cuda"), ValueError, "backend"),
]


@pytest.mark.parametrize("change,exc,name", BAD)
def test_bad_input(change, exc, name):
    raises_naming(paged_decode_attention, _good(), change, exc, name)


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setattr(_backends, "triton_interpreting", lambda: False)
    args = {key: value.cpu() for key, value in _good().items()}
    with pytest.raises(ValueError, match=r"^backend:"):
        paged_decode_attention(**args, backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_with_new_lengths_and_table():
    q, k_pool, v_pool, table, seq_lens = make_paged([30, 200, 1], 7, 1, 128, 16, 16, torch.bfloat16, gen("graph"))
    out = torch.empty_like(q)
    paged_decode_attention(q, k_pool, v_pool, table, seq_lens, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        paged_decode_attention(q, k_pool, v_pool, table, seq_lens, out=out)
    for lens, perm in (([30, 200, 1], False), ([0, 17, 250], True)):
        seq_lens.copy_(torch.tensor(lens))
        if perm:
            table.copy_(table.flip(0))  # rows swap tables (rows 0 and 2 have enough blocks for 30 / 1 positions)
            seq_lens.copy_(torch.tensor([1, 17, 30]))
        graph.replay()
        want = paged_decode_attention_reference(q, k_pool, v_pool, table, seq_lens)
        torch.testing.assert_close(out.float(), want.float(), **TOL[torch.bfloat16])


@without_gpu
def test_kernels_compile_for_sm90_without_a_gpu():
    """The split kernel builds for an H100 target outside the interpreter and fits its launch limits
    (tests/ops/sm90.py)."""
    sm90.compiled("paged_attention")
