"""Tests of the C++ CPU kernel ``rast_kernels._C.rast_sample_cpu`` (``rast_sample(..., backend="cpp")``)
against the PyTorch reference: token for token, logprobs, bad rows, strides, dtypes, the kernel's
pruning paths (top-p histogram, race skipping) and its generator bit for bit."""
import math

import pytest
import torch

from rast_kernels import _backends, rast_sample
from rast_kernels.ops.philox import random_words
from rast_kernels.ops.rast_sample_reference import rast_sample_reference

pytestmark = pytest.mark.skipif(not _backends.has_cpp_cpu(), reason=_backends.cpp_unavailable_reason())

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _logits(batch, width, seed, scale=2.0, dtype=torch.float32, ties=False, masked=0.0):
    g = _gen(seed)
    x = torch.randn(batch, width, generator=g) * scale
    if ties:  # coarse values: many exact ties, also at the top-k / top-p / min-p boundaries
        x = torch.round(x * 2) / 2
    if masked:
        x[torch.rand(batch, width, generator=g) < masked] = -math.inf
    return x.to(dtype)


def _keys(batch, seed):
    g = _gen(seed + 1000)
    seeds = torch.randint(-(2**62), 2**62, (batch,), generator=g)
    offsets = torch.randint(-(2**40), 2**40, (batch,), generator=g)
    return seeds, offsets


def _both(trio, **kw):
    """(tokens, logprobs) of the C++ kernel and of the reference for the same call."""
    got = rast_sample(*trio, backend="cpp", return_logprobs=True, **kw)
    ref = rast_sample_reference(*trio, return_logprobs=True, **kw)
    return got, ref


def _assert_same(got, ref, lp_tol=2e-5):
    (t, lp), (rt, rlp) = got, ref
    assert torch.equal(t, rt), f"tokens differ at rows {(t != rt).nonzero().flatten().tolist()}: {t} vs {rt}"
    assert torch.allclose(lp, rlp, atol=lp_tol, rtol=lp_tol, equal_nan=True), f"{lp} vs {rlp}"


FILTERS = [
    dict(),
    dict(temperature=0.0),
    dict(temperature=0.6),
    dict(top_k=1),
    dict(top_k=7),
    dict(top_p=0.3),
    dict(top_p=0.9, temperature=1.3),
    dict(min_p=0.05),
    dict(min_p=1.0),
    dict(top_k=40, top_p=0.8, min_p=0.02, temperature=0.8),
    dict(alpha=0.0),
    dict(alpha=-1.5, top_p=0.95),
]


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("kw", FILTERS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "plain")
def test_matches_reference(kw, ties):
    batch, widths = 12, (1003, 1001, 1002)  # odd widths: the last Philox group is partial
    trio = [_logits(batch, w, seed=i, ties=ties) for i, w in enumerate(widths)]
    seeds, offsets = _keys(batch, 0)
    _assert_same(*_both(trio, seed=seeds, offset=offsets, **kw))


@pytest.mark.parametrize("scale", [0.3, 3.0, 30.0])  # flat (many top-p candidates) to peaked (race skipping)
@pytest.mark.parametrize("kw", [dict(), dict(top_p=0.5), dict(top_p=0.95), dict(top_p=0.999), dict(min_p=0.3),
                                dict(top_k=100), dict(top_k=5000, top_p=0.9)],  # heap / nth_element top-k
                         ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "plain")
def test_pruning_paths_match_reference(kw, scale):
    # 20000 columns: more than the 2048 candidates the kernel sorts directly, so top-p uses its histogram
    batch, width = 4, 20000
    trio = [_logits(batch, width, seed=10 + i, scale=scale) for i in range(3)]
    seeds, offsets = _keys(batch, 1)
    _assert_same(*_both(trio, seed=seeds, offset=offsets, **kw))


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9])
def test_top_p_with_large_tie_groups(top_p):
    # thousands of columns share each value: the histogram refinement ends on a single tie group
    batch, width = 4, 12000
    coarse = [torch.round(_logits(batch, width, seed=70 + i)) for i in range(3)]
    flat = [torch.zeros(batch, width) for _ in range(3)]
    seeds, offsets = _keys(batch, 8)
    for trio in (coarse, flat):
        _assert_same(*_both(trio, seed=seeds, offset=offsets, top_p=top_p))


def test_flat_logits_follow_the_noise():
    # all-zero logits: the winner is argmin E over all columns, so this checks the generator and the
    # fp32 Exp(1) formula through the tokens alone
    batch, width = 64, 4099
    trio = [torch.zeros(batch, width) for _ in range(3)]
    seeds, offsets = _keys(batch, 2)
    _assert_same(*_both(trio, seed=seeds, offset=offsets))
    tokens = rast_sample(*trio, seed=seeds, offset=offsets, backend="cpp")
    assert len(set(tokens.tolist())) > batch // 2  # different keys, different winners


def test_philox_words_bit_identical():
    from rast_kernels import _C
    seeds = torch.tensor([0, 1, -1, 2**63 - 1, -(2**63), 123456789012345], dtype=torch.int64)
    offsets = torch.tensor([0, 2**32 - 1, 2**32, -1, 7, -(2**40) + 3], dtype=torch.int64)
    for n in (1, 5, 131):
        got = _C.philox_words_cpu(seeds, offsets, n)
        want = random_words(seeds, offsets, torch.arange(n))
        assert got.dtype == torch.int64 and got.shape == (6, n)
        assert torch.equal(got, want)
    # a high column: the counter's first word is column >> 2
    cols = torch.arange(2**20 - 3, 2**20 + 5)
    got = _C.philox_words_cpu(seeds[:2], offsets[:2], 2**20 + 5)[:, cols]
    assert torch.equal(got, random_words(seeds[:2], offsets[:2], cols))


def test_masked_columns_and_mismatched_widths():
    batch = 10
    base = _logits(batch, 300, 20, masked=0.3)
    expert = _logits(batch, 257, 21, masked=0.1)
    expert_base = _logits(batch, 290, 22, masked=0.1)
    base[3, :] = -math.inf  # every column masked: bad row
    expert[4, :250] = -math.inf  # only a few columns left
    seeds, offsets = _keys(batch, 3)
    for kw in (dict(), dict(top_p=0.7), dict(temperature=0.0), dict(top_k=3, min_p=0.2)):
        got, ref = _both([base, expert, expert_base], seed=seeds, offset=offsets, **kw)
        _assert_same(got, ref)
        assert got[0][3] == -1 and math.isnan(got[1][3])
        assert all(base[r, t] > -math.inf and expert[r, t] > -math.inf and expert_base[r, t] > -math.inf
                   for r, t in enumerate(got[0].tolist()) if t >= 0)
    # vocab_size below the narrowest width: columns past it are never drawn
    got, ref = _both([base, expert, expert_base], seed=seeds, offset=offsets, vocab_size=17)
    _assert_same(got, ref)
    assert int(got[0].max()) < 17


@pytest.mark.parametrize("dtypes", [(a, b, c) for a in DTYPES for b in DTYPES for c in DTYPES],
                         ids=lambda d: "-".join(str(t).split(".")[1] for t in d))
def test_mixed_dtypes(dtypes):
    batch = 6
    trio = [_logits(batch, 515, seed=30 + i, dtype=d, masked=0.05) for i, d in enumerate(dtypes)]
    seeds, offsets = _keys(batch, 4)
    _assert_same(*_both(trio, seed=seeds, offset=offsets, top_p=0.9, alpha=1.7))


def test_half_values_decode_exactly():
    # z = -x + x_decoded (row A) and x - x_decoded (row B) against a column of exact 0: greedy picks
    # column 1 only if the kernel's fp16/bf16 decoding is off (subnormals, extremes, signed zero)
    for dtype in (torch.float16, torch.bfloat16):
        info = torch.finfo(dtype)
        vals = torch.tensor([0.0, -0.0, info.tiny / 4, -info.tiny / 2, info.tiny, info.max, -info.max, 1.5,
                             -2.25, 3.0e-3], dtype=torch.float32).to(dtype)
        exact = vals.float()  # torch's conversion is exact
        n = len(vals)
        zero_f = torch.zeros(n, 1)
        zero_h = torch.zeros(n, 1, dtype=dtype)
        row_a = [torch.cat([zero_f, -exact[:, None]], 1), torch.cat([zero_h, vals[:, None]], 1),
                 torch.zeros(n, 2, dtype=dtype)]
        row_b = [torch.cat([zero_f, exact[:, None]], 1), torch.zeros(n, 2, dtype=dtype),
                 torch.cat([zero_h, vals[:, None]], 1)]
        for trio in (row_a, row_b):
            got, ref = _both(trio, temperature=0.0)
            _assert_same(got, ref)
            assert got[0].eq(0).all()
        # +inf and NaN in a half input make the row bad; -inf masks the column
        special = torch.tensor([[0.0, math.inf], [0.0, math.nan], [0.0, -math.inf]]).to(dtype)
        got, ref = _both([torch.ones(3, 2), special, torch.zeros(3, 2, dtype=dtype)], temperature=0.0)
        _assert_same(got, ref)
        assert got[0].tolist() == [-1, -1, 0]


def test_bad_rows_do_not_affect_others():
    batch = 12
    trio = [_logits(batch, 400, seed=40 + i) for i in range(3)]
    trio[0][1, 5] = math.nan
    trio[1][2, 9] = math.inf  # z = +inf
    trio[1][3, 9], trio[2][3, 9] = math.inf, math.inf  # inf - inf = NaN
    temperature = torch.ones(batch)
    top_k = torch.zeros(batch, dtype=torch.int64)
    top_p = torch.full((batch,), 0.9)
    min_p = torch.zeros(batch)
    temperature[4] = -0.5
    temperature[5] = math.nan
    top_k[6] = -1
    top_p[7] = 0.0
    top_p[8] = 1.5
    min_p[9] = -0.1
    min_p[10] = math.nan
    seeds, offsets = _keys(batch, 5)
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seeds, offset=offsets)
    got, ref = _both(trio, **kw)
    _assert_same(got, ref)
    bad = list(range(1, 11))
    assert got[0][bad].eq(-1).all() and got[1][bad].isnan().all()
    good = [0, 11]
    assert got[0][good].ge(0).all() and got[1][good].isfinite().all()
    # the good rows alone give the same tokens
    alone = rast_sample(*[t[good] for t in trio], backend="cpp", **{k: v[good] for k, v in kw.items()})
    assert torch.equal(alone, got[0][good])


def test_non_contiguous_rows_and_out():
    batch, width = 8, 333
    wide = [_logits(2 * batch, width + 40, seed=50 + i) for i in range(3)]
    views = [wide[0][::2, :width], wide[1][1::2, 5:width + 5], wide[2][:batch, 3:width + 3]]
    assert not any(v.is_contiguous() for v in views)
    seeds, offsets = _keys(batch, 6)
    kw = dict(seed=seeds, offset=offsets, top_k=20, top_p=0.9)
    got, ref = _both(views, **kw)
    _assert_same(got, ref)
    assert torch.equal(got[0], rast_sample(*[v.contiguous() for v in views], backend="cpp", **kw))
    out = torch.full((2 * batch,), -7, dtype=torch.int64)[::2]  # strided out tensor
    res = rast_sample(*views, backend="cpp", out=out, **kw)
    assert res is out and torch.equal(out, got[0])


def test_row_independent_of_batch_and_threads():
    batch = 9
    trio = [_logits(batch, 2000, seed=60 + i) for i in range(3)]
    seeds, offsets = _keys(batch, 7)
    kw = dict(top_p=0.8, temperature=0.9)
    full = rast_sample(*trio, seed=seeds, offset=offsets, backend="cpp", **kw)
    for r in (0, 4, 8):
        one = rast_sample(*[t[r:r + 1] for t in trio], seed=seeds[r:r + 1], offset=offsets[r:r + 1],
                          backend="cpp", **kw)
        assert one.item() == full[r].item()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = rast_sample(*trio, seed=seeds, offset=offsets, backend="cpp", **kw)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(serial, full)


def test_offset_gives_fresh_draws():
    trio = [torch.zeros(1, 1000) for _ in range(3)]
    draws = {rast_sample(*trio, seed=5, offset=o, backend="cpp").item() for o in range(20)}
    assert len(draws) > 10
    assert rast_sample(*trio, seed=5, offset=3, backend="cpp").item() == \
        rast_sample(*trio, seed=5, offset=3, backend="cpp").item()


def test_direct_call_argument_errors():
    from rast_kernels import _C
    b = 3
    logits = torch.randn(b, 10)
    f32 = torch.ones(b)
    i64 = torch.zeros(b, dtype=torch.int64)
    out = torch.empty(b, dtype=torch.int64)

    def call(**over):
        args = dict(base=logits, expert=logits, expert_base=logits, alpha=f32, temperature=f32, top_k=i64,
                    top_p=f32, min_p=torch.zeros(b), seed=i64, offset=i64, vocab_size=10, out=out, logprobs=None)
        args.update(over)
        return _C.rast_sample_cpu(**args)

    call()
    assert out.ge(0).all() and out.lt(10).all()
    with pytest.raises(TypeError, match="expert_logits"):
        call(expert=logits.double())
    with pytest.raises(TypeError, match="top_k"):
        call(top_k=f32)
    with pytest.raises(TypeError, match="temperature"):
        call(temperature=i64)
    with pytest.raises(ValueError, match="alpha"):
        call(alpha=torch.ones(b + 1))
    with pytest.raises(ValueError, match="vocab_size"):
        call(vocab_size=11)
    with pytest.raises(ValueError, match="expert_base_logits"):
        call(expert_base=torch.randn(b + 1, 10))
    with pytest.raises(ValueError, match="base_logits"):
        call(base=torch.randn(10, b).t())  # last dim not contiguous
    with pytest.raises(ValueError, match="out"):
        call(out=torch.empty(b + 1, dtype=torch.int64))
    with pytest.raises(TypeError, match="logprobs"):
        call(logprobs=torch.empty(b, dtype=torch.float64))
    with pytest.raises(ValueError, match="seed"):
        _C.philox_words_cpu(torch.zeros(2, 2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64), 3)
