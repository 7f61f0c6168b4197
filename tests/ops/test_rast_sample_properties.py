"""Property-based tests (hypothesis) of rast_sample against the PyTorch reference, on every backend.

Random batch sizes, widths (mismatched, with and without ``vocab_size``), dtypes per input, parameters as
numbers or per-row tensors (out-of-range values in tensors included), ``-inf`` masks, NaN/+inf cells (also in
columns past ``vocab_size``) and exact ties. The property: every backend returns exactly the fp32 reference's
tokens (same generator, same kept set) and its logprobs to rounding, and with a seed tensor a row draws the same
token alone as in the batch. Deterministic (``derandomize=True``, no example database); the Triton interpreter
is slow, so it gets few examples.
"""
import math

import pytest
import torch

from op_testing import DEVICE, INTERPRETED, sampler_backends
from rast_kernels import rast_sample
from rast_kernels.ops.rast_sample_reference import rast_sample_reference

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
INT64 = st.integers(-(2**63), 2**63 - 1)


# examples per backend: the interpreter costs ~50 ms a row
EXAMPLES = {"torch": 60, "cpp": 120, "triton": 40 if INTERPRETED else 200}
BACKENDS = sampler_backends(EXAMPLES)

# valid values, and (only reachable through per-row tensors) out-of-range ones that make a row -1
_VALUES = dict(
    alpha=st.sampled_from([0.0, 1.0, -0.5]) | st.floats(-3, 3, width=32),
    temperature=st.sampled_from([0.0, 1.0, 0.5, 1e-38]) | st.floats(0.0625, 4, width=32),
    top_k=st.integers(0, 45),
    top_p=st.sampled_from([1.0, 0.5, 0.9]) | st.floats(0.0078125, 1.0, width=32),
    min_p=st.sampled_from([0.0, 0.5, 1.0]) | st.floats(0.0, 1.0, width=32),
    offset=INT64,
)
_BAD = dict(temperature=[-1.0, math.nan, math.inf], top_k=[-3], top_p=[0.0, 1.5, math.nan], min_p=[-0.1, 1.5])
_DTYPE_OF = dict(top_k=torch.int64, offset=torch.int64, seed=torch.int64)


@st.composite
def _param(draw, name, batch):
    """A number (valid), or a [B] tensor whose entries may be out of range."""
    if draw(st.booleans()):
        return draw(_VALUES[name])
    bad = st.sampled_from(_BAD[name]) if name in _BAD else st.nothing()
    values = draw(st.lists(_VALUES[name] | bad if name in _BAD and draw(st.booleans()) else _VALUES[name],
                           min_size=batch, max_size=batch))
    return torch.tensor(values, dtype=_DTYPE_OF.get(name, torch.float32), device=DEVICE)


@st.composite
def _cases(draw, max_batch, max_width):
    batch = draw(st.integers(1, max_batch))
    widths = [draw(st.integers(1, max_width)) for _ in range(3)]
    narrowest = min(widths)
    vocab_size = draw(st.none() | st.integers(1, narrowest))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    style = draw(st.sampled_from(["normal", "ties", "flat", "wide"]))
    mask = draw(st.sampled_from([0.0, 0.3, 0.9]))
    trio = []
    for w in widths:
        x = torch.randn(batch, w, generator=g)
        if style == "ties":  # coarse values: many exact ties, also at the filter boundaries
            x = torch.round(x * 2) / 2
        elif style == "flat":  # every column of a row equal
            x = torch.zeros(batch, w) + torch.randn(batch, 1, generator=g)
        elif style == "wide":
            x = x * 30
        x[torch.rand(batch, w, generator=g) < mask] = -math.inf
        trio.append(x)
    # NaN / +inf cells, anywhere (past vocab_size they must be ignored)
    for _ in range(draw(st.integers(0, 2))):
        t = draw(st.integers(0, 2))
        trio[t][draw(st.integers(0, batch - 1)), draw(st.integers(0, widths[t] - 1))] = draw(
            st.sampled_from([math.nan, math.inf]))
    trio = [x.to(draw(st.sampled_from(DTYPES))).to(DEVICE) for x in trio]
    params = {name: draw(_param(name, batch)) for name in _VALUES}
    params["seed"] = draw(INT64 | st.lists(INT64, min_size=batch, max_size=batch).map(
        lambda v: torch.tensor(v, dtype=torch.int64, device=DEVICE)))
    return trio, vocab_size, params


def _check(backend, case):
    trio, vocab_size, params = case
    tokens, lp = rast_sample(*trio, vocab_size=vocab_size, return_logprobs=True, backend=backend, **params)
    ref_tokens, ref_lp = rast_sample_reference(*trio, vocab_size=vocab_size, return_logprobs=True, **params)
    assert torch.equal(tokens.cpu(), ref_tokens.cpu()), (tokens.tolist(), ref_tokens.tolist())
    torch.testing.assert_close(lp.cpu(), ref_lp.cpu(), rtol=1e-4, atol=1e-4, equal_nan=True)
    v = vocab_size or min(t.shape[1] for t in trio)
    assert ((tokens == -1) | ((tokens >= 0) & (tokens < v))).all()
    if isinstance(params["seed"], torch.Tensor):
        # seed tensors are used as given: the last row alone draws what it drew in the batch
        r = trio[0].shape[0] - 1
        alone = {k: v[r:r + 1] if isinstance(v, torch.Tensor) else v for k, v in params.items()}
        t1 = rast_sample(*[t[r:r + 1] for t in trio], vocab_size=vocab_size, backend=backend, **alone)
        assert t1.item() == tokens[r].item()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter evaluates masked-out lanes too
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_equals_reference_on_random_cases(backend):
    small = backend == "triton" and INTERPRETED

    @settings(max_examples=EXAMPLES[backend], derandomize=True, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=_cases(max_batch=3 if small else 6, max_width=24 if small else 48))
    def prop(case):
        _check(backend, case)

    prop()
