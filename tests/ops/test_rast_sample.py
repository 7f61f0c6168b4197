"""Spec tests of rast_sample, run for every available backend against the PyTorch reference."""
import math

import pytest
import torch

from op_testing import DEVICE, sampler_backends  # first: sets TRITON_INTERPRET on CPU
from rast_kernels import _backends, rast_sample
from rast_kernels.ops.philox import mix_seed
from rast_kernels.ops.rast_sample_reference import combined_logits, kept_mask, rast_sample_reference


BACKENDS = sampler_backends()


def _logits(batch, width, seed, dtype=torch.float32, ties=False, masked=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, width, generator=g) * 2
    if ties:  # coarse values so many columns tie exactly
        x = torch.round(x * 2) / 2
    if masked:
        x[torch.rand(batch, width, generator=g) < masked] = -math.inf
    return x.to(dtype).to(DEVICE)


def _trio(batch, widths=(67, 64, 65), seed=0, dtypes=(torch.float32,) * 3, **kw):
    return [_logits(batch, w, seed + i, d, **kw) for i, (w, d) in enumerate(zip(widths, dtypes))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [
    dict(top_k=0, top_p=1.0, min_p=0.0),
    dict(top_k=5, top_p=1.0, min_p=0.0),
    dict(top_k=0, top_p=0.8, min_p=0.0),
    dict(top_k=0, top_p=1.0, min_p=0.2),
    dict(top_k=20, top_p=0.9, min_p=0.05, temperature=0.7),
])
def test_tokens_equal_reference(backend, case):
    """Same generator: every backend draws exactly the reference's token, with ties, -inf and mixed dtypes."""
    dtypes = (torch.bfloat16, torch.float32, torch.float16)
    base, expert, expert_base = _trio(6, seed=3, dtypes=dtypes, ties=True, masked=0.1)
    kw = dict(alpha=0.5, seed=11, offset=torch.arange(6, device=DEVICE), return_logprobs=True, **case)
    tokens, logprobs = rast_sample(base, expert, expert_base, backend=backend, **kw)
    ref_tokens, ref_logprobs = rast_sample_reference(base, expert, expert_base, dtype=torch.float64, **kw)
    assert torch.equal(tokens.cpu(), ref_tokens.cpu())
    torch.testing.assert_close(logprobs.cpu(), ref_logprobs.cpu(), rtol=1e-4, atol=1e-4)


def _many_draws(backend, logits, draws, **kw):
    """Draw ``draws`` tokens from one row by repeating it with offsets 0..draws-1."""
    rows = [t.expand(draws, -1) for t in logits]
    return rast_sample(*rows, offset=torch.arange(draws, device=DEVICE), backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("filters", [dict(), dict(top_k=4), dict(top_p=0.7), dict(min_p=0.3), dict(top_k=6, top_p=0.9)])
def test_distribution_matches_reference(backend, filters):
    """Draws lie in the reference kept set, cover its likely tokens, and frequencies pass a G-test (fixed seeds:
    deterministic)."""
    scipy_stats = pytest.importorskip("scipy.stats")
    # the Triton interpreter costs ~30 ms a row on CPU: fewer draws there (its tokens also equal the reference's)
    draws = 300 if backend == "triton" and DEVICE == "cpu" else 3000
    trio = _trio(1, widths=(13, 12, 12), seed=7, ties=True, masked=0.1)
    tokens = _many_draws(backend, trio, draws, alpha=0.8, temperature=1.3, seed=5, **filters).cpu()

    z = combined_logits(*[t.cpu() for t in trio], 0.8, 12, torch.float64) / 1.3
    row = lambda v, dt: torch.tensor([v], dtype=dt)
    keep = kept_mask(z, row(filters.get("top_k", 0), torch.int64), row(filters.get("top_p", 1.0), torch.float64),
                     row(filters.get("min_p", 0.0), torch.float64))[0]
    probs = torch.softmax(torch.where(keep, z[0], torch.tensor(-math.inf, dtype=torch.float64)), 0)
    counts = torch.bincount(tokens, minlength=12).double()
    drawn, kept = set(tokens.unique().tolist()), set(keep.nonzero().flatten().tolist())
    assert drawn <= kept
    # every kept token expected 10+ times is drawn (rarer ones may be missed by 300 interpreter draws)
    assert {i for i in kept if probs[i] * draws >= 10} <= drawn
    expected = probs[keep] * draws
    observed = counts[keep]
    if keep.sum() > 1:
        _, pvalue = scipy_stats.power_divergence(observed.numpy(), expected.numpy(), lambda_="log-likelihood")
        assert pvalue > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_is_argmax_ties_to_lowest_id(backend):
    base = torch.zeros(3, 10, device=DEVICE)
    base[0, [2, 5, 7]] = 3.0  # three-way tie -> 2
    base[1, 9] = 1.0
    base[2, :] = -1.0
    base[2, 4] = -math.inf
    zeros = torch.zeros_like(base)
    tokens, lp = rast_sample(base, zeros, zeros, temperature=0, backend=backend, return_logprobs=True)
    assert tokens.tolist() == [2, 9, 0]
    assert lp.tolist() == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_combination_uses_alpha_and_masks(backend):
    base = torch.zeros(1, 8, device=DEVICE)
    expert = torch.zeros(1, 8, device=DEVICE)
    expert_base = torch.zeros(1, 8, device=DEVICE)
    expert[0, 3] = 2.0
    base[0, 1] = 1.5
    # alpha 1: column 3 (2.0) beats column 1 (1.5); alpha 0.5: column 1 wins
    assert rast_sample(base, expert, expert_base, alpha=1.0, temperature=0, backend=backend).item() == 3
    assert rast_sample(base, expert, expert_base, alpha=0.5, temperature=0, backend=backend).item() == 1
    # -inf in the expert base masks the column even though base - (-inf) would be +inf
    expert_base[0, 6] = -math.inf
    expert[0, 6] = -math.inf
    assert rast_sample(base, expert, expert_base, alpha=1.0, temperature=0, backend=backend).item() == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_size_excludes_padding_columns(backend):
    base, expert, expert_base = _trio(4, widths=(40, 36, 38), seed=1)
    base[:, 30:] = 50.0  # padding columns with huge logits must never be drawn
    for temperature in (0.0, 1.0, 5.0):
        tokens = rast_sample(base, expert, expert_base, vocab_size=30, temperature=temperature,
                             offset=torch.arange(4, device=DEVICE), backend=backend)
        assert ((tokens >= 0) & (tokens < 30)).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_seed_offset_reproduce_and_batch_independent(backend):
    trio = _trio(5, seed=2)
    seeds = torch.tensor([1, 2, 3, 4, 5], device=DEVICE)
    a = rast_sample(*trio, seed=seeds, offset=7, backend=backend)
    assert torch.equal(a, rast_sample(*trio, seed=seeds, offset=7, backend=backend))
    # a row alone, with the same seed tensor value and offset, draws the same token (seed tensors are used as given)
    for r in range(5):
        alone = rast_sample(*[t[r:r + 1] for t in trio], seed=seeds[r:r + 1], offset=7, backend=backend)
        assert alone.item() == a[r].item()
    # a number seed s is the tensor [mix_seed(s, b)]
    for s in (0, 7, -3, 2**63 - 1):
        mixed = torch.tensor([mix_seed(s, b) for b in range(5)], device=DEVICE)
        assert torch.equal(rast_sample(*trio, seed=s, offset=7, backend=backend),
                           rast_sample(*trio, seed=mixed, offset=7, backend=backend))
    # over many offsets, draws change (flat-ish logits: not always the same token)
    flat = [t[:1].expand(64, -1) * 0.1 for t in trio]
    draws = rast_sample(*flat, offset=torch.arange(64, device=DEVICE), backend=backend)
    assert draws.unique().numel() > 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_row_tensor_parameters_equal_scalar_calls(backend):
    trio = _trio(4, seed=4)
    per_row = dict(alpha=[0.0, 0.5, 1.0, 1.5], temperature=[0.0, 0.5, 1.0, 2.0], top_k=[0, 3, 10, 1],
                   top_p=[1.0, 0.5, 0.9, 1.0], min_p=[0.0, 0.1, 0.0, 0.5], seed=[3, 4, 5, 6], offset=[9, 8, 7, 6])
    tensors = {k: torch.tensor(v, device=DEVICE) for k, v in per_row.items()}
    tokens, lp = rast_sample(*trio, backend=backend, return_logprobs=True, **tensors)
    for r in range(4):
        # (a one-row seed tensor: a number seed would be mixed with the row index)
        scalars = {k: v[r] for k, v in per_row.items() if k != "seed"}
        scalars["seed"] = tensors["seed"][r:r + 1]
        t1, lp1 = rast_sample(*[t[r:r + 1] for t in trio], backend=backend, return_logprobs=True, **scalars)
        assert t1.item() == tokens[r].item()
        torch.testing.assert_close(lp1[0], lp[r])


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_is_filled_in_place(backend):
    trio = _trio(3, seed=5)
    out = torch.full((3,), -7, dtype=torch.int64, device=DEVICE)
    res = rast_sample(*trio, out=out, backend=backend)
    assert res.data_ptr() == out.data_ptr()
    assert torch.equal(out, rast_sample(*trio, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_strides_and_views(backend):
    big = _logits(4, 100, 9)
    trio = [big[:, :50], big[:, 50:], _logits(4, 50, 10)]  # row stride 100, last dim contiguous
    contiguous = [t.contiguous() for t in trio]
    assert torch.equal(rast_sample(*trio, offset=3, backend=backend), rast_sample(*contiguous, offset=3, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_rows_get_minus_one_and_spare_the_others(backend):
    trio = _trio(5, seed=6)
    clean = [t.clone() for t in trio]
    trio[0][1, 3] = math.nan        # NaN in the combination
    trio[1][2, :] = -math.inf       # every column masked
    trio[0][3, 0] = math.inf        # +inf in the combination
    kw = dict(offset=torch.arange(5, device=DEVICE), top_p=0.9, return_logprobs=True, backend=backend)
    tokens, lp = rast_sample(*trio, **kw)
    good, good_lp = rast_sample(*clean, **kw)
    assert tokens[1:4].tolist() == [-1, -1, -1]
    assert torch.isnan(lp[1:4]).all()
    assert tokens[[0, 4]].tolist() == good[[0, 4]].tolist()
    torch.testing.assert_close(lp[[0, 4]], good_lp[[0, 4]])
    # NaN past vocab_size is ignored
    trio[0][0, 60:] = math.nan
    assert rast_sample(*[t[:1] for t in trio], vocab_size=60, backend=backend).item() >= 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_invalid_per_row_parameter_values_give_minus_one(backend):
    trio = _trio(6, seed=8)
    kw = dict(temperature=torch.tensor([1.0, -1.0, math.nan, 1.0, 1.0, 1.0], device=DEVICE),
              top_p=torch.tensor([0.9, 0.9, 0.9, 0.0, 1.5, 0.9], device=DEVICE),
              top_k=torch.tensor([0, 0, 0, 0, 0, -2], device=DEVICE))
    tokens = rast_sample(*trio, backend=backend, **kw)
    assert tokens[1:].tolist() == [-1] * 5
    assert tokens[0].item() == rast_sample(*[t[:1] for t in trio], top_p=0.9, backend=backend).item()


def test_argument_errors_name_the_argument():
    trio = _trio(2, seed=0)
    cases = [
        (dict(temperature=-0.5), ValueError, "temperature"),
        (dict(top_p=0.0), ValueError, "top_p"),
        (dict(top_p=1.2), ValueError, "top_p"),
        (dict(min_p=-0.1), ValueError, "min_p"),
        (dict(min_p=1.5), ValueError, "min_p"),
        (dict(top_k=-1), ValueError, "top_k"),
        (dict(top_k=2.5), TypeError, "top_k"),
        (dict(alpha=math.nan), ValueError, "alpha"),
        (dict(alpha="1"), TypeError, "alpha"),
        (dict(vocab_size=100), ValueError, "vocab_size"),
        (dict(vocab_size=0), ValueError, "vocab_size"),
        (dict(vocab_size=3.0), TypeError, "vocab_size"),
        (dict(seed=torch.zeros(3, dtype=torch.int64, device=DEVICE)), ValueError, "seed"),
        (dict(offset=torch.zeros(2, device=DEVICE)), TypeError, "offset"),
        (dict(temperature=torch.ones(2, 1, device=DEVICE)), ValueError, "temperature"),
        (dict(out=torch.zeros(2, dtype=torch.int32, device=DEVICE)), ValueError, "out"),
        (dict(out=torch.zeros(3, dtype=torch.int64, device=DEVICE)), ValueError, "out"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(return_logprobs=1), TypeError, "return_logprobs"),
    ]
    for kwargs, exc, name in cases:
        with pytest.raises(exc, match=name):
            rast_sample(*trio, **kwargs)


def test_logit_tensor_errors_name_the_argument():
    b, e, eb = _trio(2, seed=0)
    with pytest.raises(ValueError, match="expert_logits"):
        rast_sample(b, e[:1], eb)
    with pytest.raises(ValueError, match="base_logits"):
        rast_sample(b[0], e, eb)
    with pytest.raises(TypeError, match="expert_base_logits"):
        rast_sample(b, e, eb.to(torch.int32))
    with pytest.raises(TypeError, match="expert_logits"):
        rast_sample(b, e.tolist(), eb)
    with pytest.raises(ValueError, match="expert_base_logits"):
        rast_sample(b, e, eb.t().contiguous().t())  # last dim not contiguous


def test_unavailable_backend_is_an_error():
    trio = _trio(1, seed=0)
    if DEVICE == "cuda":
        with pytest.raises(ValueError, match="backend"):
            rast_sample(*trio, backend="cpp")
    if not _backends.has_triton():
        with pytest.raises(ValueError, match="backend"):
            rast_sample(*trio, backend="triton")


def test_empty_batch():
    trio = [torch.empty(0, 10, device=DEVICE) for _ in range(3)]
    tokens, lp = rast_sample(*trio, return_logprobs=True)
    assert tokens.shape == (0,) and lp.shape == (0,)


def test_reference_kept_set_matches_the_literal_definition():
    """The sort-based reference filters equal the spec's sentences evaluated by brute force."""
    g = torch.Generator().manual_seed(12)
    for trial in range(20):
        z = torch.round(torch.randn(3, 30, generator=g, dtype=torch.float64) * 3) / 3  # many ties
        z[0, :5] = -math.inf
        k = torch.randint(0, 12, (3,), generator=g)
        p = torch.rand(3, generator=g, dtype=torch.float64) * 0.9 + 0.1
        m = torch.rand(3, generator=g, dtype=torch.float64) * 0.3
        keep = kept_mask(z, k, p, m)
        for r in range(3):
            zr = z[r]
            alive = zr > -math.inf
            if k[r] > 0:  # fewer than k tokens strictly above
                alive &= torch.tensor([(zr > v).sum() < k[r] for v in zr])
            w = torch.where(alive, torch.exp(zr - zr.max()), torch.zeros_like(zr))
            # strictly-more-probable kept tokens hold less than p of the kept mass
            alive &= torch.tensor([w[zr > v].sum() < p[r] * w.sum() for v in zr])
            w = torch.where(alive, w, torch.zeros_like(w))
            alive &= (w / w.sum()) >= m[r] * (w.max() / w.sum())
            assert torch.equal(keep[r], alive), (trial, r)
            assert keep[r][zr.argmax()]  # the most probable token is always kept


@pytest.mark.parametrize("backend", BACKENDS)
def test_temperature_limits(backend):
    """A temperature so small that z / T overflows is the greedy limit; an infinite one is a bad value."""
    trio = _trio(3, seed=13)
    greedy = rast_sample(*trio, temperature=0.0, backend=backend)
    tiny = rast_sample(*trio, temperature=1e-38, top_p=0.9, offset=5, backend=backend)
    assert torch.equal(tiny, greedy)
    temps = torch.tensor([1.0, math.inf, 0.5], device=DEVICE)
    tokens = rast_sample(*trio, temperature=temps, backend=backend)
    assert tokens[1].item() == -1 and tokens[0].item() >= 0 and tokens[2].item() >= 0
    with pytest.raises(ValueError, match="temperature"):
        rast_sample(*trio, temperature=math.inf)


@pytest.mark.parametrize("backend", BACKENDS)
def test_identical_rows_under_a_number_seed_draw_independently(backend):
    """128 copies of one row under ``seed=7`` (offset 0) are 128 independent draws from the row's distribution
    (each row b draws with mix_seed(7, b)): not one token repeated, frequencies pass a G-test, and every backend
    draws exactly the reference's tokens."""
    scipy_stats = pytest.importorskip("scipy.stats")
    draws = 128
    g = torch.Generator().manual_seed(20261201)
    row = torch.randn(1, 9, generator=g)  # nine tokens, none below ~1.5% probability
    trio = [row.to(DEVICE).expand(draws, -1), torch.zeros(draws, 9, device=DEVICE), torch.zeros(draws, 9, device=DEVICE)]
    tokens = rast_sample(*trio, seed=7, backend=backend).cpu()
    assert torch.equal(tokens, rast_sample_reference(*[t.cpu() for t in trio], seed=7))
    assert tokens.unique().numel() > 3
    probs = torch.softmax(row[0].double(), 0)
    counts = torch.bincount(tokens, minlength=9).double()
    _, pvalue = scipy_stats.power_divergence(counts.numpy(), (probs * draws).numpy(), lambda_="log-likelihood")
    assert pvalue > 1e-3


LN2 = math.log(2.0)
# (filters, kept tokens) on the weights 1, 1/2, 1/4, 1/4 of tokens a, b, c, d (total mass 2, all exact in fp32):
# top-p keeps a token iff the kept mass strictly above it is < p * 2: b has mass 1 above it (kept iff p > 1/2),
# c and d have 1.5 (kept iff p > 3/4); min-p keeps prob >= min_p * max prob; top-k keeps ties at the k-th value
_ABOVE_HALF = float(torch.nextafter(torch.tensor(0.5), torch.tensor(1.0)))
_ABOVE_3_4 = float(torch.nextafter(torch.tensor(0.75), torch.tensor(1.0)))
EXACT_BOUNDARIES = [
    (dict(top_p=0.5), "a"), (dict(top_p=_ABOVE_HALF), "ab"), (dict(top_p=0.75), "ab"), (dict(top_p=_ABOVE_3_4), "abcd"),
    (dict(min_p=0.5), "ab"), (dict(min_p=_ABOVE_HALF), "a"), (dict(min_p=0.25), "abcd"),
    (dict(top_k=3), "abcd"), (dict(top_k=2), "ab"), (dict(top_k=3, top_p=0.75), "ab"),
]


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_filter_boundaries(backend):
    """Masses exactly at a filter boundary: top-p compares the strictly-more-probable kept mass with ``<`` (a token
    whose mass above equals p * S is dropped), min-p with ``>=`` (prob == min_p * max prob is kept), top-k keeps
    the whole tie group at the k-th value. Each case runs on 16-32 rows (independent draws under one number seed) in
    one call with per-row parameter tensors: only the spec's kept tokens are drawn, and each of them is."""
    cols = dict(a=5, b=2, c=9, d=0)  # scattered among masked columns of an odd width
    z = torch.full((11,), -math.inf)
    for name, logw in zip("abcd", (0.0, -LN2, -2 * LN2, -2 * LN2)):
        z[cols[name]] = logw
    w = torch.exp(z)  # precondition of the test: the weights are exact in fp32
    assert w[[cols[n] for n in "abcd"]].tolist() == [1.0, 0.5, 0.25, 0.25]
    per = 16 if backend == "triton" and DEVICE == "cpu" else 32  # the interpreter's searches cost ~40 ms a row
    rows = len(EXACT_BOUNDARIES) * per
    params = {name: torch.tensor([case.get(name, default) for case, _ in EXACT_BOUNDARIES for _ in range(per)],
                                 device=DEVICE) for name, default in (("top_k", 0), ("top_p", 1.0), ("min_p", 0.0))}
    base = z.to(DEVICE).expand(rows, -1)
    zeros = torch.zeros(rows, 11, device=DEVICE)
    tokens = rast_sample(base, zeros, zeros, seed=3, backend=backend, **params).cpu()
    for i, (case, kept) in enumerate(EXACT_BOUNDARIES):
        drawn = set(tokens[i * per:(i + 1) * per].tolist())
        assert drawn == {cols[n] for n in kept}, (case, kept, drawn)


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_top_p_boundary_with_large_tie_groups(backend):
    """Top-p's exact boundary with 4096 candidates (the C++ kernel's histogram path, not its sort): 1024 tokens of
    weight 1, 1024 of 1/2, 2048 of 1/4 (kept mass S = 2048, exact): p = 1/2 drops the halves (mass above them
    1024 = p * S), p = 3/4 keeps the halves and drops the quarters (mass above 1536 = p * S)."""
    g = torch.Generator().manual_seed(4096)
    logw = torch.cat([torch.zeros(1024), torch.full((1024,), -LN2), torch.full((2048,), -2 * LN2)])
    perm = torch.randperm(4096, generator=g)
    z = logw[perm]  # column perm[i] holds candidate i
    weight = torch.exp(z)
    assert weight.sum().item() == 2048.0 and set(weight.tolist()) == {1.0, 0.5, 0.25}  # exact masses
    per = 8 if backend == "triton" and DEVICE == "cpu" else 16
    rows = 2 * per
    top_p = torch.tensor([0.5] * per + [0.75] * per, device=DEVICE)
    base = z.to(DEVICE).expand(rows, -1)
    zeros = torch.zeros(rows, 4096, device=DEVICE)
    w = weight[rast_sample(base, zeros, zeros, top_p=top_p, seed=11, backend=backend).cpu()]
    assert (w[:per] == 1.0).all()
    assert (w[per:] >= 0.5).all() and (w[per:] == 0.5).any()
