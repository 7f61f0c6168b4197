"""``python -m rast_kernels selftest``: what to run first on a new machine, and what to paste into a bug report.

In about a minute it checks each kernel this installation runs against its PyTorch reference at real shapes, the
toy trio's captured decode against the eager one, and the sampler's distribution, then prints one table (check,
shape, path, max error, tolerance, result, time) after the versions of :func:`rast_kernels.__main__.info`. Exit
status 0 when every row passes, 1 when any fails (a check that raises is a FAIL row carrying the error's first
line, never a crash of the command), 2 on a bad option.

What each check compares (bf16 inputs everywhere but the toy trio, which is float32 on CPU):

* ``rast_sample`` at V = 152064 (top-p, top-k + min-p, greedy, two expert pairs, base plausibility): the kernel's
  tokens equal :func:`~rast_kernels.rast_sample_reference`'s (the spec: the same token on every backend) and its
  log-probabilities are within 1e-4 of the reference's;
* ``distribution``: 65536 draws (one per row, scalar seed: independent Philox streams) from one small row,
  counted against the filtered softmax computed here in float64; Pearson's chi-square must stay under the
  critical value at p = 1e-6. The draws are a deterministic function of the seed, and every backend draws the
  same tokens, so the statistic is a fixed number: the check cannot flake, and a broken filter or race fails it;
* the decoder ops (``paged_decode_attention``, ``paged_multi_token_attention`` with 5 queries per row,
  ``decode_attention``, ``add_rms_norm``, ``rope_cache_write``, ``silu_mul``) at Qwen2.5-7B (28 query / 4 kv heads,
  head dim 128, hidden 3584, MLP 18944) and Qwen2.5-1.5B (12 / 2, 128, 1536, 8960) geometry: the result in bf16
  against the op's reference on the same inputs upcast to float64 (the references compute in fp32 at least and
  are not rounded back to bf16). Errors are in units of ``u = 2**-8``, bf16's unit roundoff, times the scale of
  each op's error bound: relative to the exact value for ``silu_mul`` (2 roundings: 3 u allowed) and
  ``add_rms_norm`` (3 roundings: 4 u), to the largest input for ``rope_cache_write`` (its sum can cancel: 4 u) and
  to the largest value for the attention ops (the softmax weights are rounded to bf16 before ``P @ V``, as in
  flash attention: 3 u). Under the Triton interpreter, which does not round to nearest, the 16-bit ops exceed
  these bounds: the selftest does not use it;
* ``engine``: the shipped toy trio (:mod:`rast_kernels.toy`) decoded greedy and sampled by two engines built
  through the public API, ``RastEngine(..., use_cuda_graph=True)`` and ``use_cuda_graph=False`` (the eager one
  padded to the graph's batch buckets, so the same kernels run): the same tokens.

Paths: on CUDA the Triton kernels (``backend="triton"``: a missing Triton is a FAIL, not a silent fallback); on
CPU what the CPU runs: the compiled C++ sampler (a SKIP row with the import error when ``_C`` did not import) and
the PyTorch references of the other ops in bf16. The CPU run uses fewer rows and shorter sequences (the shape
column says so) and one torch thread (:func:`cpu_threads`); the CPU engine check compares the engine padded to the
graph buckets (what a replay runs) with the exact batch, since a CPU engine does not capture graphs.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
import zlib
from functools import partial
from typing import Callable, List, Optional

import torch

from . import _backends, _cli

SAMPLER_VOCAB = 152064  # Qwen2.5's LM-head width
# name -> (query heads, kv heads, head dim, hidden, MLP width, rope theta)
GEOMETRY = {"7B": (28, 4, 128, 3584, 18944, 1e6), "1.5B": (12, 2, 128, 1536, 8960, 1e6)}
DRAWS = 65536
CHI2_P = 1e-6  # the distribution check fails below this p-value (a fixed statistic: see the module docstring)
LOGPROB_TOL = 1e-4
# the sampler checks: name -> rast_sample keywords ("2 pairs": two expert pairs with these weights)
SAMPLER_SETTINGS = {"top-p": dict(temperature=1.0, top_p=0.95),
                    "top-k + min-p": dict(temperature=0.7, top_k=50, min_p=0.05),
                    "greedy": dict(temperature=0.0),
                    "2 pairs": dict(temperature=1.0, top_p=0.9, alpha=[1.0, 0.5]),
                    "base plausibility": dict(temperature=1.0, base_plausibility=0.1)}
UNIT = 2.0 ** -8  # bf16's unit roundoff: rounding to nearest moves x by at most UNIT * |x|
MULTI_QUERIES = 5  # queries per row of the multi-token attention check: a speculative verify of 4 drafts
CHECKS = ("sampler", "distribution", "paged_attention", "multi_token_attention", "decode_attention", "rms_norm",
          "rope_cache", "silu_mul", "engine")


class Mismatch(Exception):
    """A discrete disagreement (different tokens, a value outside the kept set): the row fails with this text."""


class Skip(Exception):
    """The check cannot run here (e.g. the C++ extension did not import): a SKIP row, not a failure."""


@dataclasses.dataclass
class Measure:
    """A check's outcome: ``error <= tol`` passes. ``unit`` is how ``error`` and ``tol`` are printed."""

    error: float
    tol: float
    unit: str = ""
    note: str = ""


@dataclasses.dataclass
class Row:
    check: str
    shape: str
    path: str
    status: str  # PASS, FAIL or SKIP
    error: str
    tol: str
    seconds: float
    note: str = ""


@dataclasses.dataclass
class Case:
    check: str  # one of CHECKS
    label: str
    shape: str
    path: str
    run: Callable[[], Measure]
    note: str = ""  # added to the row's note (e.g. that a CPU run's shapes are smaller)


# ------------------------------------------------------------------------------------------------ helpers
def _gen(*key) -> torch.Generator:
    """A CPU generator seeded from ``key`` (each input its own stream, the same on every run)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _randn(shape, key, device, dtype=torch.bfloat16, scale=1.0) -> torch.Tensor:
    """Deterministic normal values (drawn on the CPU: the same inputs on every device)."""
    return (torch.randn(shape, generator=_gen(*key)) * scale).to(device=device, dtype=dtype)


def _err(got: torch.Tensor, want: torch.Tensor, scale: Optional[float] = None) -> float:
    """Largest ``|got - want|`` in units of :data:`UNIT` times ``scale`` (a number: the inputs' magnitude, for ops
    whose error bound is absolute) or, with ``scale=None``, times ``|want|`` itself (a relative bound; values below
    1e-6 of the largest are measured at that floor). ``want`` is the exact value (float64)."""
    want = want.double()
    diff = (got.double() - want).abs()
    if not torch.isfinite(diff).all():
        raise Mismatch("non-finite values in the result")
    if scale is None:
        return (diff / want.abs().clamp_min(1e-6 * want.abs().max().item())).max().item() / UNIT
    return diff.max().item() / (UNIT * scale)


def _max_abs(*tensors) -> float:
    return max(t.abs().max().item() for t in tensors)


def _f64(*tensors):
    return [t.double() for t in tensors]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------------ sampler
def _sampler_backend(device: torch.device) -> str:
    """The backend under test: Triton on CUDA, the C++ kernel on CPU (:class:`Skip` with the reason if absent)."""
    if device.type == "cuda":
        return "triton"
    if not _backends.has_cpp_cpu():
        raise Skip(_backends.cpp_unavailable_reason())
    return "cpp"


def _sampler_case(device, batch: int, setting: str) -> Measure:
    from . import ops

    pairs = 2 if setting == "2 pairs" else 1
    key = ("sampler", setting)
    base = _randn((batch, SAMPLER_VOCAB), key + ("base",), device, scale=2.0)
    experts = [_randn((batch, SAMPLER_VOCAB), key + ("e", i), device, scale=2.0) for i in range(pairs)]
    bases = [_randn((batch, SAMPLER_VOCAB), key + ("eb", i), device, scale=2.0) for i in range(pairs)]
    kw = dict(SAMPLER_SETTINGS[setting], seed=torch.arange(batch, dtype=torch.int64, device=device) * 7919 + 1,
              offset=3)
    e, eb = (experts, bases) if pairs > 1 else (experts[0], bases[0])
    got, got_lp = ops.rast_sample(base, e, eb, return_logprobs=True, backend=_sampler_backend(device), **kw)
    want, want_lp = ops.rast_sample_reference(base, e, eb, return_logprobs=True, **kw)
    differ = (got != want).nonzero().flatten().tolist()
    if differ:
        raise Mismatch(f"tokens differ from the reference in rows {differ}: {got[differ].tolist()} vs "
                       f"{want[differ].tolist()}")
    return Measure((got_lp - want_lp).abs().max().item(), LOGPROB_TOL, note="tokens equal")


def _expected_probs(z: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The spec's filtered distribution of one row, in float64, written out for distinct logits: the top-k
    tokens, then those whose strictly more probable kept tokens hold less than ``top_p`` of the kept mass."""
    order = torch.argsort(z / temperature, descending=True)
    p = torch.softmax(z[order[:top_k]] / temperature, 0)
    before = torch.cumsum(p, 0) - p
    keep = before < top_p
    margin = (before - top_p).abs().min().item()
    if margin < 1e-3:  # fp32 rounding could then move the boundary: the oracle would not be well defined
        raise AssertionError(f"distribution check: top-p boundary within {margin:.1e} of a cumulative mass")
    probs = torch.zeros_like(z)
    probs[order[:top_k][keep]] = p[keep] / p[keep].sum()
    return probs


def _distribution_case(device) -> Measure:
    from . import ops

    width, temperature, top_k, top_p, alpha = 16, 0.9, 10, 0.9, 0.8
    rows = [torch.linspace(-1.5, 1.5, width)[torch.randperm(width, generator=_gen("dist", i))].bfloat16()
            for i in range(3)]
    z = rows[0].double() + alpha * (rows[1].double() - rows[2].double())
    probs = _expected_probs(z, temperature, top_k, top_p)
    logits = [r.reshape(1, width).expand(DRAWS, width).to(device) for r in rows]
    tokens, logprobs = ops.rast_sample(*logits, alpha=alpha, temperature=temperature, top_k=top_k, top_p=top_p,
                                       seed=2024, return_logprobs=True, backend=_sampler_backend(device))
    tokens, logprobs = tokens.cpu(), logprobs.cpu()
    if (probs[tokens.clamp_min(0)] == 0).any() or (tokens < 0).any():
        raise Mismatch(f"drew tokens outside the kept set {probs.nonzero().flatten().tolist()}")
    lp_err = (logprobs.double() - probs[tokens].log()).abs().max().item()
    if lp_err > 1e-5:
        raise Mismatch(f"log-probabilities differ from the float64 ones by {lp_err:.2e}")
    kept = probs > 0
    counts = torch.bincount(tokens, minlength=width).double()[kept]
    expected = probs[kept] * DRAWS
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    df = int(kept.sum()) - 1
    return Measure(chi2, chi2_critical(df, CHI2_P), note=f"chi2 df={df}, p={chi2_sf(chi2, df):.2g}")


def chi2_sf(x: float, df: int) -> float:
    """P(X > x) for X ~ chi-square(df): the regularised upper incomplete gamma Q(df/2, x/2)."""
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                   torch.tensor(x / 2, dtype=torch.float64)).item()


def chi2_critical(df: int, p: float) -> float:
    """The x with P(X > x) = p, by bisection (the survival function falls monotonically)."""
    lo, hi = 0.0, 10.0 * df + 200.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if chi2_sf(mid, df) > p else (lo, mid)
    return hi


# ------------------------------------------------------------------------------------------------ decoder ops
def _lengths(device) -> list:
    """Sequence lengths of the attention checks: block edges, odd lengths, long rows on a GPU."""
    return [1, 16, 17, 255, 1000, 2048, 4095, 4096] if device.type == "cuda" else [1, 17, 300, 1000]


def _op_backend(device) -> str:
    return "triton" if device.type == "cuda" else "torch"


def _attention_measure(got, want, v) -> Measure:
    """The kernels round the softmax weights to the cache dtype before ``P @ V`` (as flash attention does): at most
    ``u * sum_i p_i |v_i| <= u * max|v|``, plus the output's own rounding, ``u * |out| <= u * max|v|``."""
    return Measure(_err(got, want, _max_abs(v)), 3.0, " u", note="u times the largest value")


def _paged_inputs(device, model: str, lens: list, queries: int):
    """``(q, k_pool, v_pool, block_table, seq_lens)`` at ``model``'s head geometry, each row's blocks scattered over
    the pool (block size 16); ``q`` is ``[B, H_q, D]``, or ``[B, Q, H_q, D]`` for ``queries`` > 0."""
    h_q, h_kv, dim = GEOMETRY[model][:3]
    bs = 16
    nblk = [-(-n // bs) for n in lens]
    total = sum(nblk) + 3
    perm = torch.randperm(total, generator=_gen("paged", model)).tolist()
    table = torch.zeros(len(lens), max(nblk), dtype=torch.int32)
    for b, n in enumerate(nblk):
        table[b, :n] = torch.tensor(perm[sum(nblk[:b]):sum(nblk[:b]) + n])
    q_shape = (len(lens), queries, h_q, dim) if queries else (len(lens), h_q, dim)
    q = _randn(q_shape, ("paged", model, "q", queries), device)
    k = _randn((total, bs, h_kv, dim), ("paged", model, "k"), device)
    v = _randn((total, bs, h_kv, dim), ("paged", model, "v"), device)
    return q, k, v, table.to(device), torch.tensor(lens, dtype=torch.int32, device=device)


def _paged_case(device, model: str) -> Measure:
    from . import ops

    q, k, v, table, seq = _paged_inputs(device, model, _lengths(device), 0)
    got = ops.paged_decode_attention(q, k, v, table, seq, backend=_op_backend(device))
    want = ops.paged_decode_attention_reference(*_f64(q, k, v), table, seq)
    return _attention_measure(got, want, v)


def _multi_token_case(device, model: str, queries: int) -> Measure:
    """``Q`` new tokens per row (a speculative verify pass): one row shorter than ``Q`` (its first queries see
    nothing: zeros)."""
    from . import ops

    lens = [queries - 2] + _lengths(device)[1:]
    q, k, v, table, seq = _paged_inputs(device, model, lens, queries)
    got = ops.paged_multi_token_attention(q, k, v, table, seq, backend=_op_backend(device))
    want = ops.paged_multi_token_attention_reference(*_f64(q, k, v), table, seq)
    return _attention_measure(got, want, v)


def _dense_case(device, model: str) -> Measure:
    from . import ops

    h_q, h_kv, dim = GEOMETRY[model][:3]
    lens = _lengths(device)
    start = torch.tensor([(7 * b) % 13 for b in range(len(lens))])  # left padding
    end = start + torch.tensor(lens)
    s_max = int(end.max())
    q = _randn((len(lens), h_q, dim), ("dense", model, "q"), device)
    k = _randn((len(lens), h_kv, s_max, dim), ("dense", model, "k"), device)
    v = _randn((len(lens), h_kv, s_max, dim), ("dense", model, "v"), device)
    start, end = start.to(device), end.to(device)
    got = ops.decode_attention(q, k, v, start, end, backend=_op_backend(device))
    want = ops.decode_attention_reference(*_f64(q, k, v), start, end)
    return _attention_measure(got, want, v)


def _rms_case(device, model: str, batch: int) -> Measure:
    from . import ops

    hidden = GEOMETRY[model][3]
    x = _randn((batch, hidden), ("rms", model, "x"), device)
    res = _randn((batch, hidden), ("rms", model, "r"), device, scale=4.0)
    w = (1 + _randn((hidden,), ("rms", model, "w"), device, dtype=torch.float32, scale=0.1)).bfloat16()
    y, s = ops.add_rms_norm(x, w, 1e-6, res, backend=_op_backend(device))
    want_y, want_s = ops.add_rms_norm_reference(*_f64(x, w), 1e-6, res.double())
    # s = bf16(x + r): 1 u; y = bf16(w * bf16(t * rstd)) from the rounded s: 3 u, relative (no cancellation)
    return Measure(max(_err(y, want_y), _err(s, want_s)), 4.0, " u")


def _rotary(positions: torch.Tensor, dim: int, theta: float):
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    freqs = positions.double()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos().bfloat16(), emb.sin().bfloat16()


def _rope_case(device, model: str, batch: int) -> Measure:
    from . import ops

    h_q, h_kv, dim, _, _, theta = GEOMETRY[model]
    nslot = 64 * batch
    q = _randn((batch, h_q, dim), ("rope", model, "q"), device)
    k = _randn((batch, h_kv, dim), ("rope", model, "k"), device)
    v = _randn((batch, h_kv, dim), ("rope", model, "v"), device)
    cos, sin = (t.to(device) for t in _rotary(torch.randint(0, 32768, (batch,), generator=_gen("rope")), dim, theta))
    slots = torch.randperm(nslot, generator=_gen("rope", model))[:batch].to(device)
    kc, vc = torch.zeros(nslot, h_kv, dim, dtype=torch.bfloat16, device=device), torch.zeros(
        nslot, h_kv, dim, dtype=torch.bfloat16, device=device)
    got = ops.rope_cache_write(q, k, v, cos, sin, kc, vc, slots, backend=_op_backend(device))
    want_kc, want_vc = kc.double().zero_(), vc.double().zero_()
    want = ops.rope_cache_write_reference(*_f64(q, k, v, cos, sin), want_kc, want_vc, slots)
    if not torch.equal(vc.double(), want_vc):
        raise Mismatch("the value cache differs (a copy: must be exact)")
    # each product and the sum rounded: u * (|x c| + |x' s| + |out|) <= 4 u * max|x|; absolute (it can cancel)
    return Measure(max(_err(got, want, _max_abs(q)), _err(kc[slots], want_kc[slots], _max_abs(k))), 4.0, " u")


def _silu_case(device, model: str, batch: int) -> Measure:
    from . import ops

    width = GEOMETRY[model][4]
    gate = _randn((batch, width), ("silu", model, "g"), device, scale=3.0)
    up = _randn((batch, width), ("silu", model, "u"), device)
    got = ops.silu_mul(gate, up, backend=_op_backend(device))
    # silu(gate) rounded, then the product: 2 u, relative
    return Measure(_err(got, ops.silu_mul_reference(*_f64(gate, up))), 3.0, " u")


# ------------------------------------------------------------------------------------------------ engine
def _engine_case(device) -> Measure:
    from . import RastEngine
    from .toy import task
    from .toy.common import DEFAULT_OUT, MAX_NEW_TOKENS, ROLES

    paths = [os.path.join(DEFAULT_OUT, role) for role in ROLES]
    kw = dict(devices=device, max_batch_size=8, max_seq_len=64)
    graph = RastEngine(*paths, use_cuda_graph=True, **kw)
    eager = RastEngine(*paths, use_cuda_graph=False, **kw)
    if graph.use_cuda_graph:
        eager.pad_to_buckets = True  # the graph's batch shapes, so the same kernels run
    else:
        graph.pad_to_buckets = True  # no capture on CPU: the padded rows a replay runs, against the exact batch
    prompts = [p.prompt for p in task.heldout_problems(3)]
    differ, total, lp_err = 0, 0, 0.0
    for setting in (dict(temperature=0.0), dict(temperature=1.0, top_p=0.9, alpha=1.5, seed=7)):
        for batch in (prompts, prompts[:1]):  # buckets 4 (one padding row) and 1
            args = dict(max_new_tokens=MAX_NEW_TOKENS, eos_token_id=[], return_logprobs=True, **setting)
            for a, b in zip(graph.generate(batch, **args), eager.generate(batch, **args)):
                total += 1
                if a.token_ids != b.token_ids:
                    differ += 1
                else:
                    lp_err = max([lp_err] + [abs(x - y) for x, y in zip(a.logprobs, b.logprobs)])
    if lp_err > LOGPROB_TOL:
        raise Mismatch(f"same tokens, but log-probabilities differ by {lp_err:.2e}")
    return Measure(differ, 0, f"/{total} differ", note=f"logprobs within {lp_err:.1e}")


# ------------------------------------------------------------------------------------------------ the plan
def cases(device: torch.device, checks=CHECKS) -> List[Case]:
    """The checks to run on ``device``, in order (a subset by :data:`CHECKS` name)."""
    cuda = device.type == "cuda"
    batch = 8 if cuda else 2
    smaller = "" if cuda else "CPU: fewer/shorter rows than on a GPU"
    lens = _lengths(device)
    sampler_path = "triton" if cuda else ("cpp" if _backends.has_cpp_cpu() else "cpp (not built)")
    op_path = "triton" if cuda else "torch reference, bf16"
    out = [Case("sampler", f"rast_sample {s}", f"B={batch} V={SAMPLER_VOCAB} x{4 if s == '2 pairs' else 3}",
                sampler_path, partial(_sampler_case, device, batch, s)) for s in SAMPLER_SETTINGS]
    out.append(Case("distribution", "rast_sample distribution", f"{DRAWS} draws V=16", sampler_path,
                    partial(_distribution_case, device)))
    for model, (h_q, h_kv, dim, hidden, mlp, _) in GEOMETRY.items():
        heads = f"Hq={h_q} Hkv={h_kv} D={dim}"
        out += [
            Case("paged_attention", f"paged_decode_attention {model}", f"B={len(lens)} {heads} L<={max(lens)} BS=16",
                 op_path, partial(_paged_case, device, model)),
            Case("multi_token_attention", f"paged_multi_token_attention {model}",
                 f"B={len(lens)} Q={MULTI_QUERIES} {heads} L<={max(lens)} BS=16", op_path,
                 partial(_multi_token_case, device, model, MULTI_QUERIES)),
            Case("decode_attention", f"decode_attention {model}", f"B={len(lens)} {heads} L<={max(lens)}", op_path,
                 partial(_dense_case, device, model)),
            Case("rms_norm", f"add_rms_norm {model}", f"B={2 * batch} H={hidden}", op_path,
                 partial(_rms_case, device, model, 2 * batch)),
            Case("rope_cache", f"rope_cache_write {model}", f"B={batch} {heads} paged", op_path,
                 partial(_rope_case, device, model, batch)),
            Case("silu_mul", f"silu_mul {model}", f"B={batch} N={mlp}", op_path,
                 partial(_silu_case, device, model, batch)),
        ]
    out.append(Case("engine", "toy trio graph == eager", "3 + 1 prompts x 24 tokens, x2",
                    "CUDA graph vs eager" if cuda else "padded vs exact batch (no graphs on CPU)",
                    partial(_engine_case, device)))
    for case in out:
        if case.check not in ("distribution", "engine"):
            case.note = smaller
    return [c for c in out if c.check in checks]


def run_case(case: Case, device: torch.device) -> Row:
    """Run one case: a PASS/FAIL/SKIP row (an exception is a FAIL carrying its first line, never raised)."""
    _sync(device)
    t = time.perf_counter()
    error = tol = note = ""
    try:
        m = case.run()
        _sync(device)
        status = "PASS" if m.error <= m.tol else "FAIL"  # (a NaN error fails)
        error, tol = f"{m.error:.3g}{m.unit}", f"{m.tol:.3g}{m.unit}"
        note = "; ".join(filter(None, [m.note, case.note]))
    except Skip as exc:
        status, note = "SKIP", str(exc)
    except Mismatch as exc:
        status, note = "FAIL", str(exc)
    except Exception as exc:  # noqa: BLE001 - any error is this check's failure; the others still run
        status = "FAIL"
        note = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
        if os.environ.get("RAST_SELFTEST_TRACEBACK"):
            traceback.print_exc()
    return Row(case.label, case.shape, case.path, status, error, tol, time.perf_counter() - t, note)


def format_table(rows: List[Row]) -> str:
    """A Markdown table (pastes into an issue as is; a ``|`` inside a cell, e.g. in an error message, becomes
    ``/``)."""
    head = ("check", "shape", "path", "max error", "tol", "result", "time", "note")
    cells = [head] + [tuple(c.replace("|", "/") for c in (r.check, r.shape, r.path, r.error, r.tol, r.status,
                                                           f"{r.seconds:.2f}s", r.note)) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _write_json(path: Optional[str], device, rows: List[Row], versions: str, done: bool) -> None:
    if path is None:
        return
    rec = dict(device=str(device), versions=versions, finished=done,
               passed=all(r.status != "FAIL" for r in rows), rows=[dataclasses.asdict(r) for r in rows])
    with open(os.path.join(path, "selftest.json"), "w") as f:
        json.dump(rec, f, indent=1)


def build_parser():
    ap = _cli.ArgumentParser(prog="python -m rast_kernels selftest",
                             description="Check every kernel against its PyTorch reference at real shapes, the toy "
                                         "trio's CUDA graph against eager and the sampler's distribution; print one "
                                         "table (with the versions) to paste into a bug report. Exit status 1 on any "
                                         "failure.")
    ap.add_argument("--device", type=_cli.device, default=None,
                    help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    ap.add_argument("--checks", nargs="+", choices=CHECKS, default=list(CHECKS), metavar="CHECK",
                    help=f"run only these checks, of: {' '.join(CHECKS)} (default all)")
    ap.add_argument("--out", type=_cli.output_dir, default=None,
                    help="directory for selftest.json (rewritten after every check)")
    return ap


@contextlib.contextmanager
def cpu_threads(device: torch.device):
    """One torch CPU thread during a CPU run (restored after). The checks' tensors are small, and on a shared
    2-core VM a thread team waiting for a busy core made them 10x slower (the sampler rows 35 s against 3.7 s, the
    engine check 126 s against 12 s)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def main(argv=None) -> int:
    from .__main__ import info

    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    versions = info()
    print(versions, flush=True)
    rows, t0 = [], time.perf_counter()
    with cpu_threads(device):
        for case in cases(device, args.checks):
            rows.append(run_case(case, device))
            r = rows[-1]
            print(f"[selftest] {r.check}: {r.status} ({r.seconds:.1f}s)", file=sys.stderr, flush=True)
            _write_json(args.out, device, rows, versions, done=False)
    _write_json(args.out, device, rows, versions, done=True)
    counts = {s: sum(r.status == s for r in rows) for s in ("PASS", "FAIL", "SKIP")}
    print(f"\nselftest on {device}: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped "
          f"in {time.perf_counter() - t0:.1f}s\n")
    print(format_table(rows))
    return 1 if counts["FAIL"] else 0
