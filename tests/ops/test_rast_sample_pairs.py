"""rast_sample with K expert pairs (``z = base + sum_i alpha_i * (expert_i - expert_base_i)``) and base plausibility,
on every available backend, against a float64 reference and brute-force readings of the spec's sentences."""
import math

import pytest
import torch

# op_testing first: it sets TRITON_INTERPRET on CPU
from op_testing import (DEVICE, INTERPRETED, gen, raises_naming, sampler_backend_available, sampler_backends,
                        unavailable_reason)
from rast_kernels import _backends, rast_sample
from rast_kernels.ops.rast_sample_reference import kept_mask, rast_sample_reference


BACKENDS = sampler_backends()


def _rows(batch, widths, key, dtypes=None, ties=False, masked=0.0):
    g = gen("pairs", *key)
    out = []
    for i, w in enumerate(widths):
        x = torch.randn(batch, w, generator=g) * 2
        if ties:
            x = torch.round(x * 2) / 2
        if masked:
            x[torch.rand(batch, w, generator=g) < masked] = -math.inf
        out.append(x.to(dtypes[i] if dtypes else torch.float32).to(DEVICE))
    return out


def _pairs(batch, k, key, base_width=30, widths=None, **kw):
    """base, [expert_1..k], [expert_base_1..k]; widths default to differing ones >= base_width - 2."""
    widths = widths or [base_width] + [base_width - 2 + (i % 5) for i in range(2 * k)]
    t = _rows(batch, widths, key, **kw)
    return t[0], t[1:1 + k], t[1 + k:]


def _brute_z(base, experts, expert_bases, alpha_bk, V):
    """The spec's sentence literally, column by column in float64: -inf if any input is -inf, else the sum."""
    B = base.shape[0]
    z = torch.empty(B, V, dtype=torch.float64)
    for r in range(B):
        for c in range(V):
            vals = [float(base[r, c])] + [float(t[r, c]) for t in experts + expert_bases]
            if -math.inf in vals:
                z[r, c] = -math.inf
                continue
            s = float(base[r, c])
            for i, (e, eb) in enumerate(zip(experts, expert_bases)):
                s += float(alpha_bk[r, i]) * (float(e[r, c]) - float(eb[r, c]))
            z[r, c] = s
    return z


def _cpu(ts):
    return [t.cpu() for t in ts]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", ["number", "sequence", "tensor_b1", "tensor_1"])
def test_list_form_with_one_pair_equals_the_plain_form_exactly(backend, alpha):
    base, (e,), (eb,) = _pairs(5, 1, ("k1", str(alpha)), dtypes=(torch.bfloat16, torch.float16, torch.float32),
                               ties=True, masked=0.1)
    a_b = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.25], device=DEVICE)
    plain_alpha, list_alpha = {
        "number": (0.7, 0.7), "sequence": (0.5, [0.5]), "tensor_b1": (a_b, a_b.unsqueeze(1)),
        "tensor_1": (torch.full((5,), 0.3, device=DEVICE), torch.tensor([0.3], device=DEVICE)),
    }[alpha]
    for kw in (dict(), dict(top_k=5, top_p=0.9, min_p=0.05, temperature=0.8), dict(temperature=0.0),
               dict(base_plausibility=0.05)):
        kw = dict(seed=torch.arange(5, device=DEVICE) + 3, offset=7, return_logprobs=True, backend=backend, **kw)
        t1, lp1 = rast_sample(base, e, eb, alpha=plain_alpha, **kw)
        t2, lp2 = rast_sample(base, [e], (eb,), alpha=list_alpha, **kw)
        assert torch.equal(t1, t2)
        assert torch.equal(lp1.view(torch.int32), lp2.view(torch.int32))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("case", [dict(), dict(top_k=6, top_p=0.9, min_p=0.05, temperature=0.7),
                                  dict(base_plausibility=0.02, top_p=0.95)])
def test_tokens_equal_the_float64_reference(backend, k, case):
    """Same generator: tokens equal the float64 reference's with mixed dtypes and widths, ties and -inf,
    per-row-and-pair [B, K] alpha; and the reference's z is the literal per-column sum."""
    dtypes = [torch.bfloat16, torch.float32, torch.float16] * 3
    base, experts, expert_bases = _pairs(6, k, ("eq", k), dtypes=dtypes, ties=True, masked=0.05)
    alpha = torch.rand(6, k, generator=gen("alpha", k)).to(DEVICE) * 2 - 0.5
    seeds = torch.arange(6, device=DEVICE) + 11
    kw = dict(alpha=alpha, seed=seeds, offset=torch.arange(6, device=DEVICE), return_logprobs=True, **case)
    tokens, lp = rast_sample(base, experts, expert_bases, backend=backend, **kw)
    ref, ref_lp = rast_sample_reference(base, experts, expert_bases, dtype=torch.float64, **kw)
    assert torch.equal(tokens.cpu(), ref.cpu())
    torch.testing.assert_close(lp.cpu(), ref_lp.cpu(), rtol=1e-4, atol=1e-4)
    # per-row alpha == each row on its own with its weights as numbers
    for r in (0, 5):
        one = rast_sample(base[r:r + 1], [t[r:r + 1] for t in experts], [t[r:r + 1] for t in expert_bases],
                          backend=backend, **dict(kw, alpha=alpha[r].tolist(), offset=r, seed=seeds[r:r + 1]))[0]
        assert one.item() == tokens[r].item()


def test_reference_combination_is_the_literal_sum():
    from rast_kernels.ops.rast_sample_reference import combined_logits
    base, experts, expert_bases = _pairs(3, 3, ("lit",), masked=0.1)
    alpha = torch.rand(3, 3, generator=gen("lit-a")) - 0.3
    V = min(t.shape[1] for t in [base, *experts, *expert_bases])
    z = combined_logits(base.cpu(), _cpu(experts), _cpu(expert_bases), alpha, V, torch.float64)
    brute = _brute_z(base.cpu(), _cpu(experts), _cpu(expert_bases), alpha, V)
    assert torch.equal(torch.isinf(z), torch.isinf(brute))
    torch.testing.assert_close(z, brute, rtol=1e-12, atol=1e-12)


def _many(backend, base, experts, expert_bases, draws, **kw):
    rows = lambda ts: [t.expand(draws, -1) for t in ts]
    return rast_sample(base.expand(draws, -1), rows(experts), rows(expert_bases),
                       offset=torch.arange(draws, device=DEVICE), backend=backend, **kw).cpu()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k,filters", [(2, dict()), (3, dict(top_p=0.8)), (2, dict(base_plausibility=0.05))])
def test_distribution_g_test(backend, k, filters):
    """Draws lie in the brute-force kept set, cover its likely tokens, and pass a G-test."""
    scipy_stats = pytest.importorskip("scipy.stats")
    draws = 300 if backend == "triton" and INTERPRETED else 3000
    base, experts, expert_bases = _pairs(1, k, ("g", k), base_width=12, ties=True, masked=0.05)
    alpha = [0.6, -0.4, 0.3][:k]
    tokens = _many(backend, base, experts, expert_bases, draws, alpha=alpha, temperature=1.3, seed=5, **filters)
    V = min(t.shape[1] for t in [base, *experts, *expert_bases])
    z = _brute_z(base.cpu(), _cpu(experts), _cpu(expert_bases), torch.tensor([alpha]), V)
    bp = filters.get("base_plausibility", 0.0)
    if bp:
        pb = torch.softmax(base.cpu()[:, :V].double(), 1)
        z = torch.where(pb >= bp * pb.max(), z, torch.tensor(-math.inf, dtype=torch.float64))
    z = z / 1.3
    row = lambda v, dt: torch.tensor([v], dtype=dt)
    keep = kept_mask(z, row(0, torch.int64), row(filters.get("top_p", 1.0), torch.float64),
                     row(0.0, torch.float64))[0]
    probs = torch.softmax(torch.where(keep, z[0], torch.tensor(-math.inf, dtype=torch.float64)), 0)
    drawn, kept = set(tokens.unique().tolist()), set(keep.nonzero().flatten().tolist())
    assert drawn <= kept
    assert {i for i in kept if probs[i] * draws >= 10} <= drawn
    if keep.sum() > 1:
        counts = torch.bincount(tokens, minlength=V).double()
        _, pvalue = scipy_stats.power_divergence(counts[keep].numpy(), (probs[keep] * draws).numpy(),
                                                 lambda_="log-likelihood")
        assert pvalue > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_in_one_pair_masks_the_column_and_widths_differ(backend):
    base = torch.zeros(1, 9, device=DEVICE)
    e1, eb1 = torch.zeros(1, 10, device=DEVICE), torch.zeros(1, 8, device=DEVICE)  # narrowest: 8
    e2, eb2 = torch.zeros(1, 12, device=DEVICE), torch.zeros(1, 11, device=DEVICE)
    e1[0, 2] = 5.0
    e2[0, 2] = -math.inf  # masks column 2 though pair 1 makes it the best
    e2[0, 4] = 3.0
    base[0, 8] = 100.0  # past the narrowest width: never drawn
    kw = dict(alpha=[1.0, 1.0], backend=backend)
    assert rast_sample(base, [e1, e2], [eb1, eb2], temperature=0, **kw).item() == 4
    tokens = _many(backend, base, [e1, e2], [eb1, eb2], 64, temperature=3.0, alpha=[1.0, 1.0])
    assert ((tokens >= 0) & (tokens < 8) & (tokens != 2)).all()
    # -inf in both inputs of one pair: masked, not NaN
    eb2[0, 4] = -math.inf
    e2[0, 4] = -math.inf
    assert rast_sample(base, [e1, e2], [eb1, eb2], temperature=0, **kw).item() not in (2, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_ties_to_the_lowest_id(backend):
    base = torch.zeros(2, 10, device=DEVICE)
    e1, eb1, e2, eb2 = (torch.zeros(2, 10, device=DEVICE) for _ in range(4))
    e1[0, [3, 6]] = 1.0
    e2[0, [1]] = 2.0  # alpha 0.5: column 1 ties columns 3 and 6
    e1[1, 7] = 1.0
    eb2[1, 5] = -1.0  # alpha 0.5: 0.5 < 1
    tokens, lp = rast_sample(base, [e1, e2], [eb1, eb2], alpha=[1.0, 0.5], temperature=0, return_logprobs=True,
                             backend=backend)
    assert tokens.tolist() == [1, 7]
    assert lp.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_base_plausibility_is_its_sentence(backend):
    """Kept columns = those whose probability under softmax(base) is >= bp * the base's largest (float64 brute
    force; values chosen away from the boundary), then the other filters; bp = 0 is off."""
    B, V = 4, 24
    g = gen("bp")
    base = (torch.randn(B, V, generator=g) * 3).to(DEVICE)
    experts = [torch.randn(B, V, generator=g).to(DEVICE)]
    expert_bases = [torch.randn(B, V, generator=g).to(DEVICE)]
    bp = torch.tensor([0.0, 0.01, 0.2, 1.0], device=DEVICE)
    pb = torch.softmax(base.cpu().double(), 1)
    ratio = pb / pb.max(1, keepdim=True).values
    # no column near its row's boundary (but the base's argmax, ratio 1, under bp = 1)
    assert ((ratio[1:] == 1) | ((ratio[1:] - bp.cpu()[1:, None].double()).abs() > 1e-4)).all()
    plausible = ratio >= bp.cpu()[:, None].double()
    draws = 40 if backend == "triton" and INTERPRETED else 400
    for r in range(B):
        tokens = _many(backend, base[r:r + 1], [experts[0][r:r + 1]], [expert_bases[0][r:r + 1]], draws,
                       alpha=0.5, temperature=3.0, base_plausibility=float(bp[r]))
        assert plausible[r, tokens].all()
        if r == 0:  # off: columns that bp = 0.2 would drop are drawn
            assert not (ratio[0, tokens] >= 0.2).all()
        # greedy: the best combined logit among the plausible columns
        z = base[r].cpu().double() + 0.5 * (experts[0][r].cpu().double() - expert_bases[0][r].cpu().double())
        best = torch.where(plausible[r], z, torch.tensor(-math.inf, dtype=torch.float64)).argmax().item()
        got = rast_sample(base[r:r + 1], experts[0][r:r + 1], expert_bases[0][r:r + 1], alpha=0.5, temperature=0,
                          base_plausibility=float(bp[r]), backend=backend).item()
        assert got == best
    # bp = 1 keeps only the base's argmax
    assert plausible[3].sum() == 1
    # a [B] tensor equals per-row numbers
    t = rast_sample(base, experts, expert_bases, alpha=2.0, base_plausibility=bp, seed=torch.arange(B, device=DEVICE),
                    backend=backend)
    for r in range(B):
        one = rast_sample(base[r:r + 1], [x[r:r + 1] for x in experts], [x[r:r + 1] for x in expert_bases],
                          alpha=2.0, base_plausibility=float(bp[r]), seed=torch.tensor([r], device=DEVICE),
                          backend=backend)
        assert one.item() == t[r].item()
    ref = rast_sample_reference(base, experts, expert_bases, alpha=2.0, base_plausibility=bp,
                                seed=torch.arange(B, device=DEVICE), dtype=torch.float64)
    assert torch.equal(t.cpu(), ref.cpu())


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_rows_get_minus_one_and_spare_the_others(backend):
    base, experts, expert_bases = _pairs(6, 2, ("bad",))
    clean = (base.clone(), [t.clone() for t in experts], [t.clone() for t in expert_bases])
    bp = torch.tensor([0.1, -0.1, math.nan, 1.5, 0.1, 0.0], device=DEVICE)  # rows 1-3: out of range
    base[4, 3] = math.nan     # NaN in base with plausibility on (row 4)
    experts[1][0, 5] = math.inf  # +inf in the second pair only... row 0 is bad too
    kw = dict(alpha=[0.5, 1.5], base_plausibility=bp, offset=torch.arange(6, device=DEVICE), top_p=0.9,
              return_logprobs=True, backend=backend)
    tokens, lp = rast_sample(base, experts, expert_bases, **kw)
    good, good_lp = rast_sample(*clean, **kw)
    assert tokens[:5].tolist() == [-1] * 5
    assert torch.isnan(lp[:5]).all()
    assert tokens[5].item() == good[5].item() >= 0
    assert torch.equal(lp[5:], good_lp[5:])
    assert good[[0, 4]].ge(0).all()
    # NaN in a pair at a column that base plausibility drops still makes the row bad (the combination holds NaN)
    b = torch.zeros(1, 6, device=DEVICE)
    b[0, 0] = 10.0
    e = [torch.zeros(1, 6, device=DEVICE), torch.zeros(1, 6, device=DEVICE)]
    e[1][0, 4] = math.nan
    assert rast_sample(b, e, [torch.zeros_like(x) for x in e], base_plausibility=0.5, backend=backend).item() == -1


def test_argument_errors_name_the_argument():
    base, experts, expert_bases = _pairs(2, 2, ("args",))
    args = dict(base_logits=base, expert_logits=experts, expert_base_logits=expert_bases)
    cases = [
        (dict(expert_base_logits=expert_bases[:1]), ValueError, "expert_base_logits"),
        (dict(expert_base_logits=expert_bases[0]), TypeError, "expert_base_logits"),
        (dict(expert_logits=experts[0]), TypeError, "expert_base_logits"),
        (dict(expert_logits=[], expert_base_logits=[]), ValueError, "expert_logits"),
        (dict(expert_logits=[experts[0], experts[1].tolist()]), TypeError, "expert_logits"),
        (dict(expert_base_logits=[expert_bases[0], None]), TypeError, "expert_base_logits"),
        (dict(expert_logits=[experts[0], experts[1].to(torch.int32)]), TypeError, "expert_logits"),
        (dict(expert_logits=[experts[0], experts[1][:1]]), ValueError, "expert_logits"),
        (dict(expert_logits=[experts[0], experts[1][0]]), ValueError, "expert_logits"),
        (dict(expert_base_logits=[expert_bases[0], expert_bases[1].to("meta")]), ValueError, "expert_base_logits"),
        (dict(expert_logits=[experts[0], experts[1].t().contiguous().t()]), ValueError, "expert_logits"),
        (dict(alpha=[1.0]), ValueError, "alpha"),
        (dict(alpha=[1.0, 2.0, 3.0]), ValueError, "alpha"),
        (dict(alpha=[1.0, math.inf]), ValueError, "alpha"),
        (dict(alpha=[1.0, "2"]), TypeError, "alpha"),
        (dict(alpha=[1.0, torch.tensor(2.0)]), TypeError, "alpha"),
        (dict(alpha=torch.ones(3)), ValueError, "alpha"),
        (dict(alpha=torch.ones(2, 3)), ValueError, "alpha"),
        (dict(alpha=torch.ones(2)), None, None),  # [K] with K = B = 2: valid
        (dict(alpha=torch.ones(3, 2)), ValueError, "alpha"),
        (dict(alpha=torch.ones(2, 2, dtype=torch.bool)), TypeError, "alpha"),
        (dict(alpha=torch.ones(2, 2, device="meta")), ValueError, "alpha"),
        (dict(base_plausibility=-0.1), ValueError, "base_plausibility"),
        (dict(base_plausibility=1.5), ValueError, "base_plausibility"),
        (dict(base_plausibility=math.nan), ValueError, "base_plausibility"),
        (dict(base_plausibility="0.1"), TypeError, "base_plausibility"),
        (dict(base_plausibility=torch.zeros(3)), ValueError, "base_plausibility"),
        (dict(base_plausibility=torch.zeros(2, device="meta")), ValueError, "base_plausibility"),
        (dict(vocab_size=29), ValueError, "vocab_size"),  # past the narrowest width (28)
    ]
    for change, exc, name in cases:
        if exc is None:
            rast_sample(**{**args, **{k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v)
                                      for k, v in change.items()}})
            continue
        raises_naming(rast_sample, args, change, exc, name)
    # the plain form's errors are unchanged
    raises_naming(rast_sample, dict(base_logits=base, expert_logits=experts[0], expert_base_logits=expert_bases[0]),
                  dict(base_plausibility=2.0), ValueError, "base_plausibility")


@pytest.mark.skipif(not sampler_backend_available("cpp"), reason=unavailable_reason("cpp"))
def test_cpp_pairs_kernel_with_one_pair_is_the_plain_kernel_bit_for_bit():
    """rast_sample_pairs_cpu (the K-pair loop) with K = 1 and plausibility off == rast_sample_cpu, logprobs too."""
    _C = _backends.cpp_module()
    base, (e,), (eb,) = _pairs(7, 1, ("cpp1",), dtypes=(torch.float16, torch.bfloat16, torch.float32), masked=0.05)
    B, V = 7, 28
    f = lambda v: torch.full((B,), v, dtype=torch.float32)
    alpha = torch.rand(B, generator=gen("cpp1-a")) * 2
    common = dict(temperature=f(0.9), top_k=torch.full((B,), 9), top_p=f(0.9), min_p=f(0.01),
                  seed=torch.arange(B) + 5, offset=torch.zeros(B, dtype=torch.int64), vocab_size=V)
    t1, l1 = torch.empty(B, dtype=torch.int64), torch.empty(B)
    t2, l2 = torch.empty(B, dtype=torch.int64), torch.empty(B)
    _C.rast_sample_cpu(base, e, eb, alpha=alpha, out=t1, logprobs=l1, **common)
    _C.rast_sample_pairs_cpu(base, [e], [eb], alpha=alpha.unsqueeze(1).contiguous(), base_plausibility=f(0.0),
                             log_base_plausibility=torch.log(f(0.0)), out=t2, logprobs=l2, **common)
    assert torch.equal(t1, t2) and torch.equal(l1.view(torch.int32), l2.view(torch.int32))
    with pytest.raises(ValueError, match="^alpha:"):
        _C.rast_sample_pairs_cpu(base, [e], [eb], alpha=alpha, base_plausibility=f(0.0),
                                 log_base_plausibility=f(0.0), out=t2, **common)
    with pytest.raises(ValueError, match="^expert_base_logits:"):
        _C.rast_sample_pairs_cpu(base, [e], [], alpha=alpha.unsqueeze(1).contiguous(), base_plausibility=f(0.0),
                                 log_base_plausibility=f(0.0), out=t2, **common)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("k", [4, 5])
def test_up_to_and_past_the_triton_pair_limit(backend, k):
    """K = MAX_PAIRS (Triton's one-pass limit) and K = MAX_PAIRS + 1 (folded into one pair first): still the
    reference's tokens and logprobs, with filters, -inf in single pairs and base plausibility."""
    from rast_kernels.ops.rast_sample_triton import MAX_PAIRS
    assert MAX_PAIRS == 4
    base, experts, expert_bases = _pairs(5, k, ("lim", k), dtypes=[torch.float32, torch.bfloat16] * 6, masked=0.03)
    alpha = torch.rand(5, k, generator=gen("lim-a", k)).to(DEVICE) - 0.2
    seeds = torch.arange(5, device=DEVICE)
    for extra in (dict(), dict(base_plausibility=torch.tensor([0.0, 0.05, 0.5, 0.01, 2.0], device=DEVICE))):
        kw = dict(alpha=alpha, seed=seeds, top_k=8, top_p=0.9, return_logprobs=True, **extra)
        tokens, lp = rast_sample(base, experts, expert_bases, backend=backend, **kw)
        ref, ref_lp = rast_sample_reference(base, experts, expert_bases, dtype=torch.float64, **kw)
        assert torch.equal(tokens.cpu(), ref.cpu())
        torch.testing.assert_close(lp.cpu(), ref_lp.cpu(), rtol=1e-4, atol=1e-4, equal_nan=True)
        if extra:
            assert tokens[4].item() == -1
