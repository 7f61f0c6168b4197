"""Kernel-specific tests of the Triton backend of rast_sample (chunking, the key bisection, Philox words,
bad rows, workspace). On CPU-only machines they run under TRITON_INTERPRET=1 with small shapes."""
import math

import pytest
import torch

import sm90  # tests/ops/sm90.py
from op_testing import DEVICE, needs_triton, without_gpu
from rast_kernels import _backends, rast_sample
from rast_kernels.ops import philox
from rast_kernels.ops.rast_sample_reference import rast_sample_reference

pytestmark = [
    needs_triton,
    # the interpreter evaluates masked-out lanes too (e.g. -inf - -inf) and NumPy warns about them
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

if _backends.has_triton():
    from rast_kernels.ops.rast_sample_triton import (launch_config, philox_noise_triton, rast_sample_triton,
                                                     reserve_workspace, workspace_device)

NAMES = ("alpha", "temperature", "top_k", "top_p", "min_p", "seed", "offset")
DEFAULTS = dict(alpha=1.0, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, offset=0)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _logits(batch, width, seed, dtype=torch.float32, ties=False, masked=0.0, scale=2.0):
    g = _gen(seed)
    x = torch.randn(batch, width, generator=g) * scale
    if ties:  # coarse values: many exact ties, also at filter boundaries
        x = torch.round(x * 2) / 2
    if masked:
        x[torch.rand(batch, width, generator=g) < masked] = -math.inf
    return x.to(dtype).to(DEVICE)


def _params(**kw):
    p = dict(DEFAULTS, **kw)
    return {n: p[n].to(DEVICE) if isinstance(p[n], torch.Tensor) else p[n] for n in NAMES}


def _run(base, expert, expert_base, vocab_size=None, chunk=None, **kw):
    """The Triton kernel called directly (optionally with a small chunk width to get many chunks per row)."""
    vocab_size = vocab_size or min(t.shape[1] for t in (base, expert, expert_base))
    tokens = torch.empty(base.shape[0], dtype=torch.int64, device=DEVICE)
    logprobs = torch.empty(base.shape[0], dtype=torch.float32, device=DEVICE)
    rast_sample_triton(base, expert, expert_base, _params(**kw), vocab_size, tokens, logprobs, chunk=chunk)
    return tokens.cpu(), logprobs.cpu()


def _ref(base, expert, expert_base, vocab_size=None, **kw):
    t, lp = rast_sample_reference(base, expert, expert_base, vocab_size=vocab_size, return_logprobs=True,
                                  **dict(DEFAULTS, **{k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v
                                                      for k, v in kw.items()}))
    return t.cpu(), lp.cpu()


def _assert_same(got, ref):
    assert torch.equal(got[0], ref[0]), f"tokens {got[0].tolist()} != reference {ref[0].tolist()}"
    torch.testing.assert_close(got[1], ref[1], rtol=2e-5, atol=2e-5, equal_nan=True)


# ---------------------------------------------------------------------------------------------- noise
def test_philox_words_and_noise_match_python_generator():
    """Bit-identical Philox words (counter layout, key halves, lane = column & 3) for edge seeds and
    offsets; E equal to exponential_from_words (exact on the series branch, a few ulp through log)."""
    seed = torch.tensor([0, 1, -1, 2**63 - 1, -2**63, 0x123456789ABCDEF, 42], dtype=torch.int64)
    offset = torch.tensor([0, 3, -5, 2**32, -2**63, 2**40 + 7, 2**31 - 1], dtype=torch.int64)
    cols = torch.cat([torch.arange(2000), torch.tensor([151936, 152063, 2**31 - 1, 2**30 + 2]),
                      torch.randint(0, 2**31 - 1, (1000,), generator=_gen(1))])
    words, noise = philox_noise_triton(seed.to(DEVICE), offset.to(DEVICE), cols.to(DEVICE))
    ref_words = philox.random_words(seed, offset, cols)
    assert torch.equal(words.cpu(), ref_words)
    ref_noise = philox.exponential_from_words(ref_words)
    series = ref_words.to(torch.float32) * 2.0**-32 + 2.0**-33 < 2.0**-7
    assert series.sum() > 50 and (~series).any()  # both branches of the formula are exercised
    assert torch.equal(noise.cpu()[series], ref_noise[series])
    torch.testing.assert_close(noise.cpu(), ref_noise, rtol=4e-7, atol=0)  # two log implementations, <= 1 ulp each
    assert (noise > 0).all()


# ---------------------------------------------------------------------------------------- equality
@pytest.mark.parametrize("case", [
    dict(),                                                          # no filter: finishes in the merge
    dict(top_k=3),
    dict(top_p=0.7, temperature=0.8),
    dict(min_p=0.15),
    dict(top_k=12, top_p=0.85, min_p=0.02, temperature=1.3),
    dict(top_k=500, top_p=0.999, temperature=0.05),                  # thresholds > 90 below the max
])
def test_many_chunks_match_reference(case):
    """Rows spread over 16 chunks (chunk=64): merged statistics and the bisection give exactly the
    reference's tokens; mixed dtypes, mismatched widths, -inf columns and exact ties."""
    dtypes = (torch.bfloat16, torch.float32, torch.float16)
    base, expert, expert_base = (_logits(3, w, 10 + i, d, ties=True, masked=0.05)
                                 for i, (w, d) in enumerate(zip((1003, 1000, 1001), dtypes)))
    kw = dict(alpha=0.7, seed=5, offset=torch.arange(3) * 11, **case)
    _assert_same(_run(base, expert, expert_base, chunk=64, **kw), _ref(base, expert, expert_base, **kw))


def test_per_row_filters_and_greedy_via_tensors():
    """Filters on/off per row through tensors (one launch with FILTER compiled in): rows without an
    active filter, greedy rows and filtered rows side by side, each as the reference."""
    b = 6
    base, expert, expert_base = (_logits(b, 300, 20 + i, ties=True, masked=0.02) for i in range(3))
    kw = dict(alpha=torch.tensor([0.0, 0.5, 1.0, 2.0, -0.5, 1.5]),
              temperature=torch.tensor([1.0, 0.0, 0.7, 1.0, 2.0, 0.5]),
              top_k=torch.tensor([0, 5, 300, 1, 7, 0]),          # 300 = V: off
              top_p=torch.tensor([1.0, 0.5, 0.9, 1.0, 0.6, 1.0]),
              min_p=torch.tensor([0.0, 0.0, 0.1, 0.0, 0.0, 0.3]),
              seed=torch.tensor([1, 2, 3, -4, 2**62, 6]), offset=torch.tensor([0, 1, 2**33, 3, -1, 5]))
    _assert_same(_run(base, expert, expert_base, chunk=32, **kw), _ref(base, expert, expert_base, **kw))


def test_temperature_limits_per_row():
    """Per-row temperatures: tiny enough that max z / T overflows is greedy (merged from many chunks,
    filters on), tiny but finite z / T is still a draw, +inf and NaN are bad rows."""
    base, expert, expert_base = (_logits(5, 200, 80 + i, ties=True) for i in range(3))
    kw = dict(temperature=torch.tensor([1e-38, math.inf, 1e-30, 0.7, math.nan]), top_p=0.9, top_k=50,
              seed=4, offset=torch.arange(5))
    got = _run(base, expert, expert_base, chunk=32, **kw)
    _assert_same(got, _ref(base, expert, expert_base, **kw))
    assert got[0][[1, 4]].tolist() == [-1, -1] and got[1][0] == 0.0


@pytest.mark.parametrize("vocab,chunk", [(1, None), (7, None), (7, 2), (1000, None), (5003, 1024)])
def test_odd_sizes(vocab, chunk):
    """Vocabularies that are not a multiple of the chunk (partial last chunk), down to V=1."""
    base, expert, expert_base = (_logits(2, vocab + 2 * i, 30 + i, masked=0.1 if vocab > 1 else 0.0)
                                 for i in range(3))
    for kw in (dict(seed=9, offset=torch.tensor([3, 4])), dict(top_k=2, top_p=0.9, seed=9)):
        _assert_same(_run(base, expert, expert_base, vocab_size=vocab, chunk=chunk, **kw),
                     _ref(base, expert, expert_base, vocab_size=vocab, **kw))


def test_boundary_ties_kept_over_many_draws():
    """Top-k / top-p / min-p boundaries that fall inside a group of equal values keep the whole group
    (also -0.0 vs +0.0): the same token as the reference on every one of 12 draws."""
    row = torch.tensor([3.0, 1.0, 3.0, 0.0, -0.0, 2.0, 3.0, 2.0, -1.0, 2.0, 0.0, -math.inf] * 5)
    base = row.expand(12, -1).contiguous().to(DEVICE)
    zeros = torch.zeros_like(base)
    offsets = torch.arange(12)
    seen = set()
    # alpha = -1 with zero experts: z = base + (-0.0) keeps the sign of base's zeros
    for case in (dict(top_k=2), dict(top_k=36), dict(top_p=0.5), dict(top_p=0.95),
                 dict(min_p=0.3), dict(top_k=20, top_p=0.99, temperature=0.5), dict(top_k=1, temperature=1e-3)):
        kw = dict(alpha=-1.0, seed=123, offset=offsets, **case)
        got = _run(base, zeros, zeros, chunk=16, **kw)
        _assert_same(got, _ref(base, zeros, zeros, **kw))
        seen.update(got[0].tolist())
    assert len(seen) > 3  # the draws are not all the same column


def test_large_seeds_and_offsets_as_numbers():
    """Scalar seeds/offsets anywhere in int64 (split into int32 halves on the host, the seed mixed per row in
    the kernel) draw as the tensors ``[mix_seed(seed, b)]`` and ``[offset] * B`` do, with and without a filter."""
    base, expert, expert_base = (_logits(2, 200, 40 + i) for i in range(3))
    for (seed, offset), filt in zip(((2**63 - 1, -2**63), (-1, 2**32 + 1), (0x0123456789ABCDEF, 1), (0, 0)),
                                    (dict(top_p=0.9), dict(), dict(top_k=50), dict())):
        as_numbers = _run(base, expert, expert_base, seed=seed, offset=offset, **filt)
        as_tensors = _run(base, expert, expert_base, seed=torch.tensor([philox.mix_seed(seed, b) for b in range(2)]),
                          offset=torch.tensor([offset] * 2), **filt)
        _assert_same(as_numbers, as_tensors)
        _assert_same(as_numbers, _ref(base, expert, expert_base, seed=seed, offset=offset, **filt))


def test_strided_rows_and_vocab_size():
    """Row strides wider than the row (slices of bigger buffers) and vocab_size below every width."""
    big = [_logits(4, 700, 50 + i) for i in range(3)]
    base, expert, expert_base = big[0][::2, 10:610], big[1][1::2, :650], big[2][::2, 50:]
    assert base.stride(0) == 1400
    kw = dict(top_k=40, min_p=0.01, seed=3, offset=torch.tensor([1, 2]))
    _assert_same(_run(base, expert, expert_base, vocab_size=555, chunk=128, **kw),
                 _ref(base, expert, expert_base, vocab_size=555, **kw))


# ----------------------------------------------------------------------------------------- bad rows
def test_bad_rows_do_not_affect_others():
    """NaN / +inf in the combination, all-masked rows and out-of-range per-row parameter values give
    -1 and NaN; every other row is drawn exactly as when it is alone."""
    b, v = 12, 150
    base, expert, expert_base = (_logits(b, v, 60 + i, masked=0.05) for i in range(3))
    base[1, 77] = math.nan
    expert[2, 3] = math.inf                 # +inf in z
    expert_base[3, 9] = -math.inf           # masked column: fine, not bad
    base[4, :] = -math.inf                  # every column masked
    expert[5, 10], expert_base[5, 10] = math.inf, math.inf   # inf - inf = NaN
    kw = dict(temperature=torch.tensor([1.0, 1, 1, 1, 1, 1, -1, math.nan, 1, 1, 1, 0]),
              top_k=torch.tensor([0, 0, 0, 0, 0, 0, 0, 0, -1, 0, 0, 3]),
              top_p=torch.tensor([1.0, 1, 1, 1, 1, 1, 1, 1, 1, 0.0, 1.5, 1]),
              min_p=torch.tensor([0.0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2.0]),
              seed=7, offset=torch.arange(b))
    tokens, lps = _run(base, expert, expert_base, chunk=32, **kw)
    bad = torch.tensor([0, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1, 1], dtype=torch.bool)
    assert torch.equal(tokens == -1, bad) and torch.equal(torch.isnan(lps), bad)
    ref = _ref(base, expert, expert_base, **kw)
    _assert_same((tokens, lps), ref)
    for r in (0, 3):  # good rows alone: same draw
        alone = _run(base[r:r + 1], expert[r:r + 1], expert_base[r:r + 1], chunk=32, seed=7,
                     offset=torch.tensor([r]))
        assert alone[0].item() == tokens[r].item()
        torch.testing.assert_close(alone[1], lps[r:r + 1])
    # NaN columns in a bad row beyond vocab_size are not read
    base[0, v - 1] = math.nan
    t, _ = _run(base, expert, expert_base, vocab_size=v - 1, **kw)
    assert t[0] != -1


# ------------------------------------------------------------------------------------------ plumbing
def test_public_op_out_in_place_and_workspace_regrowth():
    """rast_sample(backend="triton", out=...) fills the caller's buffer (same storage) and returns it;
    calls with growing and shrinking shapes reuse / grow the cached workspace and stay exact."""
    for b, v, kw in ((2, 64, dict(top_k=5)), (5, 900, dict(top_p=0.8)), (1, 33, dict(min_p=0.1)),
                     (3, 500, dict())):
        base, expert, expert_base = (_logits(b, v, 70 + b + i) for i in range(3))
        out = torch.full((b,), 99, dtype=torch.int64, device=DEVICE)
        res, lp = rast_sample(base, expert, expert_base, backend="triton", out=out, return_logprobs=True,
                              seed=1, offset=2, **kw)
        assert res is out and res.data_ptr() == out.data_ptr()
        ref = rast_sample_reference(base, expert, expert_base, return_logprobs=True, seed=1, offset=2, **kw)
        _assert_same((out.cpu(), lp.cpu()), (ref[0].cpu(), ref[1].cpu()))
    # without logprobs the kernel does not need a logprob buffer
    t = rast_sample(base, expert, expert_base, backend="triton", seed=1, offset=2)
    assert torch.equal(t.cpu(), ref[0].cpu())
    # the cached workspace is reused for smaller calls and grown for bigger ones
    buf = reserve_workspace(5, 900, DEVICE)
    assert reserve_workspace(1, 33, DEVICE) is buf
    bigger = reserve_workspace(64, 5000, DEVICE)
    assert bigger.numel() >= 64 * 5000 and reserve_workspace(5, 900, DEVICE) is bigger


def test_workspace_key_is_normalised(monkeypatch):
    """One key per device for reserve_workspace and the launch: "cuda" is the current CUDA device (a
    pre-capture reservation for "cuda" must be the buffer a launch on cuda:<i> tensors uses), "cpu:0" is "cpu"."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert workspace_device("cuda") == torch.device("cuda", 3)
    assert workspace_device(torch.device("cuda")) == torch.device("cuda", 3)
    assert workspace_device("cuda:1") == torch.device("cuda", 1)
    assert workspace_device("cpu:0") == workspace_device("cpu") == torch.device("cpu")
    monkeypatch.undo()
    if DEVICE == "cpu":  # an indexed spelling of the device reserves the buffer the launch then uses
        buf = reserve_workspace(2, 700, "cpu:0")
        assert reserve_workspace(2, 700, "cpu") is buf
        trio = [_logits(2, 700, 90 + i) for i in range(3)]
        rast_sample(*trio, backend="triton", top_p=0.9, seed=1)
        assert reserve_workspace(1, 10, torch.device("cpu")) is buf  # the launch did not replace it


def test_launch_config():
    """Enough programs for an H100 at small batch (>= 2 x 132), chunk widths powers of two in bounds,
    the grid a function of the shape only."""
    for b in (1, 2, 4, 8, 16, 64, 256):
        chunk, nchunk, b1, b2 = launch_config(b, 152064)
        assert chunk & (chunk - 1) == 0 and 512 <= chunk <= 16384
        assert nchunk * chunk >= 152064 > (nchunk - 1) * chunk
        assert b * nchunk >= 264 or chunk == 512
        assert chunk % b1 == 0 and chunk % b2 == 0
    assert launch_config(1, 7)[:2] == (8, 1)
    assert launch_config(3, 1000, chunk=64)[:2] == (64, 16)
    with pytest.raises(ValueError, match="chunk"):
        launch_config(1, 100, chunk=48)


@without_gpu
def test_kernels_compile_for_sm90_without_a_gpu():
    """The compiled (non-interpreter) path: both kernels, with and without filters/tensor parameters,
    build for an H100 target; z / T is IEEE division, log is libdevice's, Philox uses umulhi (tests/ops/sm90.py)."""
    sm90.compiled("rast_sample")
