"""decode_attention: the Triton kernel (under TRITON_INTERPRET=1 on CPU) against the fp32 reference."""
import math

import pytest
import torch

import sm90  # tests/ops/sm90.py
from op_testing import DEVICE, needs_triton, raises_naming, without_gpu
from rast_kernels import _backends
from rast_kernels.ops.decode_attention import decode_attention, decode_attention_reference, default_num_splits

# Per-dtype tolerances against the fp32 reference rounded to the same dtype. 16-bit: the output is rounded
# to the dtype (half an ulp each side) and the softmax weights are rounded to the cache dtype before P @ V
# (relative error 2**-8 for bf16, 2**-11 for fp16, as in flash attention); fp32: summation order only.
TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
}


def make_inputs(batch, h_q, h_kv, s_max, dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, h_q, dim, generator=g).to(dtype).to(DEVICE)
    k = torch.randn(batch, h_kv, s_max, dim, generator=g).to(dtype).to(DEVICE)
    v = torch.randn(batch, h_kv, s_max, dim, generator=g).to(dtype).to(DEVICE)
    return q, k, v


def bounds(pairs):
    start = torch.tensor([p[0] for p in pairs], dtype=torch.int32, device=DEVICE)
    end = torch.tensor([p[1] for p in pairs], dtype=torch.int64, device=DEVICE)
    return start, end


def check(q, k, v, start, end, **kw):
    got = decode_attention(q, k, v, start, end, backend="triton", **kw)
    want = decode_attention_reference(q, k, v, start, end, kw.get("scale"))
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got.float(), want.float(), **TOL[q.dtype])
    return got


# (h_q, h_kv, dim, s_max, num_splits, per-row [start, end)): GQA ratios 1, 2, 7; odd head counts; head dims
# 64, 128 and the odd 48, 80; start == end - 1; left padding; full rows; several splits, including more
# splits than blocks (splits with no work) and rows of very different lengths in one batch.
CASES = [
    (3, 3, 64, 37, 1, [(0, 37), (5, 6), (36, 37)]),
    (4, 2, 128, 150, 3, [(0, 1), (10, 150), (70, 133)]),
    (7, 1, 48, 96, 4, [(0, 96), (95, 96), (3, 40)]),
    (14, 2, 80, 200, 5, [(17, 18), (0, 200)]),
    (6, 3, 64, 70, 8, [(2, 70), (0, 9), (64, 70)]),
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("h_q,h_kv,dim,s_max,num_splits,rows", CASES)
def test_matches_reference(dtype, h_q, h_kv, dim, s_max, num_splits, rows):
    q, k, v = make_inputs(len(rows), h_q, h_kv, s_max, dim, dtype)
    start, end = bounds(rows)
    check(q, k, v, start, end, num_splits=num_splits)


@needs_triton
def test_fp16_and_custom_scale():
    q, k, v = make_inputs(2, 4, 1, 90, 64, torch.float16, seed=1)
    start, end = bounds([(4, 90), (0, 33)])
    check(q, k, v, start, end, scale=0.3, num_splits=2)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_split_count_does_not_change_result(dtype):
    q, k, v = make_inputs(2, 8, 2, 260, 64, dtype, seed=2)
    start, end = bounds([(3, 260), (100, 211)])
    one = decode_attention(q, k, v, start, end, backend="triton", num_splits=1)
    many = decode_attention(q, k, v, start, end, backend="triton", num_splits=7)
    # different summation order only: fp32 to rounding, 16-bit within one ulp of the output
    torch.testing.assert_close(one.float(), many.float(), **TOL[dtype])


@needs_triton
def test_reads_only_the_valid_range():
    # NaN everywhere outside [start, end): any read of it would poison the output
    q, k, v = make_inputs(3, 4, 2, 64, 64, torch.float32, seed=3)
    start, end = bounds([(10, 11), (0, 64), (33, 50)])
    pos = torch.arange(64, device=DEVICE)
    outside = (pos[None, :] < start[:, None]) | (pos[None, :] >= end[:, None])  # [B, S]
    k = k.masked_fill(outside[:, None, :, None], math.nan)
    v = v.masked_fill(outside[:, None, :, None], math.nan)
    got = check(q, k, v, start, end, num_splits=4)
    assert torch.isfinite(got).all()


@needs_triton
def test_empty_and_out_of_range_rows():
    # empty range -> zeros; end past S_max and negative start are clamped to the cache
    q, k, v = make_inputs(4, 2, 1, 40, 64, torch.float32, seed=4)
    start, end = bounds([(7, 7), (-5, 12), (30, 2**40), (20, 3)])
    got = check(q, k, v, start, end, num_splits=3)
    assert torch.equal(got[0], torch.zeros_like(got[0]))
    assert torch.equal(got[3], torch.zeros_like(got[3]))
    got1 = check(q, k, v, start, end, num_splits=1)
    assert torch.equal(got1[0], torch.zeros_like(got1[0]))


@needs_triton
def test_strided_inputs_and_out():
    # q with a non-unit last stride; caches that are slices of bigger ones
    batch, h_q, h_kv, s_max, dim = 2, 6, 2, 50, 64
    g = torch.Generator().manual_seed(5)
    q = torch.randn(batch, dim, h_q, generator=g).to(DEVICE).transpose(1, 2)  # [B, H, D], stride(-1) == H
    big_k = torch.randn(batch, 2 * h_kv, s_max + 9, dim, generator=g).to(DEVICE)
    big_v = torch.randn(batch, 2 * h_kv, s_max + 9, dim, generator=g).to(DEVICE)
    k, v = big_k[:, ::2, 4:4 + s_max], big_v[:, 1::2, 2:2 + s_max]
    assert not q.is_contiguous() and not k.is_contiguous()
    start, end = bounds([(1, 50), (20, 21)])
    out = torch.full((batch, h_q, dim), math.nan, device=DEVICE)
    got = decode_attention(q, k, v, start, end, backend="triton", num_splits=2, out=out)
    assert got is out
    want = decode_attention_reference(q, k, v, start, end)
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    # bounds as an engine may hold them: one shared end expanded to the batch (stride 0)
    shared_end = torch.tensor([37], device=DEVICE).expand(batch)
    assert shared_end.stride(0) == 0
    got = decode_attention(q, k, v, start, shared_end, backend="triton", num_splits=3)
    torch.testing.assert_close(got, decode_attention_reference(q, k, v, start, shared_end), **TOL[torch.float32])


@needs_triton
def test_default_num_splits():
    q, k, v = make_inputs(1, 7, 1, 300, 128, torch.bfloat16, seed=6)
    start, end = bounds([(12, 299)])
    check(q, k, v, start, end)
    n = default_num_splits(1, 1, 300, 128, torch.device(DEVICE))
    assert 1 <= n <= math.ceil(300 / 64)


def test_torch_backend_is_reference():
    q, k, v = make_inputs(2, 4, 2, 20, 16, torch.float32, seed=7)
    start, end = bounds([(0, 20), (4, 9)])
    out = decode_attention(q, k, v, start, end, backend="torch")
    torch.testing.assert_close(out, decode_attention_reference(q, k, v, start, end), rtol=0, atol=0)


def test_reference_matches_sdpa():
    # the reference itself against torch's SDPA with a boolean mask on expanded heads (non-empty rows)
    q, k, v = make_inputs(3, 6, 2, 33, 32, torch.float32, seed=8)
    start, end = bounds([(0, 33), (5, 6), (10, 20)])
    pos = torch.arange(33, device=DEVICE)
    mask = (pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1),
        attn_mask=mask[:, None, None, :])[:, :, 0]
    torch.testing.assert_close(decode_attention_reference(q, k, v, start, end), sdpa, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ errors
def _good():
    q, k, v = make_inputs(2, 4, 2, 8, 16, torch.float32)
    start, end = bounds([(0, 8), (1, 3)])
    return dict(q=q, k_cache=k, v_cache=v, start=start, end=end)


@pytest.mark.parametrize("change,exc,name", [
    (dict(q=[1.0]), TypeError, "q"),
    (dict(q=torch.zeros(2, 4, 1, 16)), ValueError, "q"),
    (dict(k_cache=torch.zeros(2, 2, 16)), ValueError, "k_cache"),
    (dict(q=torch.zeros(2, 4, 16, dtype=torch.int32)), TypeError, "q"),
    (dict(v_cache=torch.zeros(2, 2, 8, 16, dtype=torch.bfloat16)), TypeError, "v_cache"),
    (dict(v_cache=torch.zeros(2, 2, 9, 16)), ValueError, "v_cache"),
    (dict(k_cache=torch.zeros(3, 2, 8, 16), v_cache=torch.zeros(3, 2, 8, 16)), ValueError, "k_cache"),
    (dict(k_cache=torch.zeros(2, 2, 8, 32), v_cache=torch.zeros(2, 2, 8, 32)), ValueError, "k_cache"),
    (dict(k_cache=torch.zeros(2, 3, 8, 16), v_cache=torch.zeros(2, 3, 8, 16)), ValueError, "k_cache"),
    (dict(start=torch.zeros(3, dtype=torch.int64)), ValueError, "start"),
    (dict(end=torch.zeros(2, dtype=torch.float32)), TypeError, "end"),
    (dict(end=torch.zeros(2, dtype=torch.int64, device="meta")), ValueError, "end"),
    (dict(scale="1"), TypeError, "scale"),
    (dict(scale=-1.0), ValueError, "scale"),
    (dict(num_splits=0), ValueError, "num_splits"),
    (dict(num_splits=2.0), TypeError, "num_splits"),
    (dict(out=torch.zeros(2, 4, 15)), ValueError, "out"),
    (dict(backend="cuda"), ValueError, "backend"),
])
def test_bad_input(change, exc, name):
    raises_naming(decode_attention, _good(), change, exc, name)


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setattr(_backends, "triton_interpreting", lambda: False)
    args = _good()
    args = {key: value.cpu() for key, value in args.items()}
    with pytest.raises(ValueError, match="backend"):
        decode_attention(**args, backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_replay_with_new_lengths():
    q, k, v = make_inputs(3, 7, 1, 1000, 128, torch.bfloat16, seed=9)
    start, end = bounds([(0, 10), (200, 500), (999, 1000)])
    out = torch.empty_like(q)
    decode_attention(q, k, v, start, end, out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(q, k, v, start, end, out=out)
    for rows in ([(0, 10), (200, 500), (999, 1000)], [(5, 1000), (0, 1), (300, 301)]):
        new_start, new_end = bounds(rows)
        start.copy_(new_start)
        end.copy_(new_end)
        graph.replay()
        torch.testing.assert_close(out.float(), decode_attention_reference(q, k, v, start, end).float(),
                                   **TOL[torch.bfloat16])


@without_gpu
def test_kernels_compile_for_sm90_without_a_gpu():
    """Both kernels build for an H100 target outside the interpreter (tests/ops/sm90.py)."""
    sm90.compiled("decode_attention")
