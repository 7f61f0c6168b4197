"""rope_cache_write: the Triton kernel (under TRITON_INTERPRET=1 on CPU) against rope_cache_write_reference, with
static [B, H_kv, S_max, D] caches and [NSLOT, H_kv, D] slot pools."""
import importlib

import pytest
import torch

import sm90  # tests/ops/sm90.py
from op_testing import DEVICE, DTYPES, INTERPRETED, gen, needs_triton, raises_naming, without_gpu
from rast_kernels import _backends
from rast_kernels.ops.rope_cache import rope_cache_write, rope_cache_write_reference

# the op's module (the package attribute of the same name is the function it re-exports)
mod = importlib.import_module("rast_kernels.ops.rope_cache")

_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}

# Each output element is round(round(x1 * c) -/+ round(x2 * s)), every rounding to the dtype, as PyTorch's
# `q * cos + rotate_half(q) * sin` rounds it; a product of two 16-bit floats is exact in fp32. So the kernel is
# bit-identical to the reference (same bits, signed zeros included) where its conversions round as PyTorch's:
# - under the interpreter for float32 and float16. Its float32 -> bfloat16 conversion truncates instead of
#   rounding to nearest even, so for bfloat16 each of the three roundings may differ by one ulp: the products
#   by up to eps * |x| each (|cos|, |sin| <= 1), the sum by one ulp of itself. The products' error is absolute
#   (the difference of two products can cancel), hence atol = 2 * eps * max|x| and rtol = 2 * eps.
# - on CUDA for every dtype: conversions round to nearest, and the kernel is compiled without FMA contraction
#   (rope_cache.LAUNCH_OPTIONS; tests/ops/sm90.py checks that its PTX has no fma).
EXACT = {torch.float32, torch.float16} if INTERPRETED else set(DTYPES)


def bitwise_equal(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(_INT[a.dtype]), b.view(_INT[b.dtype]))


def assert_rotated(got, want, x):
    """got == want (rotations of x) bit for bit, or within the bound above where the conversions differ."""
    if got.dtype in EXACT:
        assert bitwise_equal(got, want), (got.float() - want.float()).abs().max()
    else:
        eps = torch.finfo(got.dtype).eps
        torch.testing.assert_close(got.float(), want.float(), rtol=2 * eps,
                                   atol=2 * eps * x.float().abs().max().item())


def rotary(batch, dim, dtype, g):
    """cos/sin [B, D] as transformers' rotary embedding builds them: cat(freqs, freqs) at a position per row."""
    pos = torch.randint(0, 4096, (batch, 1), generator=g).double()
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    ang = torch.cat((pos * inv_freq, pos * inv_freq), dim=-1)
    return ang.cos().to(dtype).to(DEVICE), ang.sin().to(dtype).to(DEVICE)


def make_inputs(batch, h_q, h_kv, s_max, dim, dtype, g):
    q = torch.randn(batch, h_q, dim, generator=g).to(dtype).to(DEVICE)
    k = torch.randn(batch, h_kv, dim, generator=g).to(dtype).to(DEVICE)
    v = torch.randn(batch, h_kv, dim, generator=g).to(dtype).to(DEVICE)
    cos, sin = rotary(batch, dim, dtype, g)
    # the caches' old contents: random, so that any write to a wrong slot shows
    k_cache = torch.randn(batch, h_kv, s_max, dim, generator=g).to(dtype).to(DEVICE)
    v_cache = torch.randn(batch, h_kv, s_max, dim, generator=g).to(dtype).to(DEVICE)
    return q, k, v, cos, sin, k_cache, v_cache


def written(batch, s_max, col):
    """[B, S_max] bool: the slots (row b, column col[b]) that the op writes."""
    cols = col.to(device="cpu", dtype=torch.int64).expand(batch)
    hit = torch.zeros(batch, s_max, dtype=torch.bool)
    hit[torch.arange(batch), cols] = True
    return hit.to(DEVICE)


def check(q, k, v, cos, sin, k_cache, v_cache, col, cache_bases=None):
    """Run the kernel and the reference on copies of the caches; compare q and the written slots, and check that
    nothing else changed: the inputs, and the caches but the written slots (or, when the caches are views, the
    whole ``cache_bases`` they are views of)."""
    bases = cache_bases or (k_cache, v_cache)
    assert all(base.is_contiguous() for base in bases)
    old = [base.clone() for base in bases]
    want_kc, want_vc = k_cache.clone(), v_cache.clone()
    inputs = [t.clone() for t in (q, k, v, cos, sin, col)]
    got = rope_cache_write(q, k, v, cos, sin, k_cache, v_cache, col, backend="triton")
    want = rope_cache_write_reference(q, k, v, cos, sin, want_kc, want_vc, col)
    assert got.shape == q.shape and got.dtype == q.dtype and got.is_contiguous() and got.data_ptr() != q.data_ptr()
    assert all(bitwise_equal(a, b) for a, b in zip(inputs[:5], (q, k, v, cos, sin))) and torch.equal(inputs[5], col)
    assert_rotated(got, want, q)
    hit = written(q.shape[0], k_cache.shape[2], col)
    # [B, S, H_kv, D][hit] -> the written slots [n, H_kv, D], in row order
    assert_rotated(k_cache.transpose(1, 2)[hit], want_kc.transpose(1, 2)[hit], k)
    assert bitwise_equal(v_cache.transpose(1, 2)[hit], want_vc.transpose(1, 2)[hit])
    assert bitwise_equal(v_cache.transpose(1, 2)[hit], v)  # a copy: exact in every dtype
    for base, before, cache in zip(bases, old, (k_cache, v_cache)):
        mark = torch.zeros(base.shape, dtype=torch.bool, device=DEVICE)  # base's strides: it is contiguous
        mark.as_strided(cache.shape, cache.stride(), cache.storage_offset() - base.storage_offset()) \
            .transpose(1, 2)[hit] = True
        assert mark.sum() == hit.sum() * cache.shape[1] * cache.shape[3]
        assert bitwise_equal(base[~mark], before[~mark]), "a slot that is not addressed changed"
    return got


# (batch, h_q, h_kv, dim, s_max, col): GQA ratios 1, 2, 7 with odd head counts; head dims 64, 128, 80 (half 40: a padded
# block) and 2 (a one-element half); batch 1 and several rows; the first and last column; per-row columns ([B])
# that differ, one column for all rows ([1]).
CASES = [
    (3, 3, 3, 64, 9, [0, 8, 4]),
    (2, 6, 3, 128, 5, [3]),
    (1, 7, 1, 80, 7, [6]),
    (2, 21, 3, 2, 4, [1, 3]),
    (4, 2, 1, 64, 33, [32, 0, 17, 5]),
]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,h_q,h_kv,dim,s_max,cols", CASES)
def test_matches_reference(dtype, batch, h_q, h_kv, dim, s_max, cols):
    args = make_inputs(batch, h_q, h_kv, s_max, dim, dtype, gen(dtype, batch, h_q, h_kv, dim, s_max, cols))
    check(*args, torch.tensor(cols, device=DEVICE))


@needs_triton
@pytest.mark.parametrize("form", ["int64 [B]", "int32 [B]", "int32 [1]", "[1] expanded to [B]", "offset slice"])
def test_col_forms(form):
    col = {
        "int64 [B]": lambda: torch.tensor([2, 0, 4], device=DEVICE),
        "int32 [B]": lambda: torch.tensor([4, 1, 3], dtype=torch.int32, device=DEVICE),
        "int32 [1]": lambda: torch.tensor([2], dtype=torch.int32, device=DEVICE),
        # one column for every row as an engine holds it: stride 0
        "[1] expanded to [B]": lambda: torch.tensor([5], device=DEVICE).expand(3),
        "offset slice": lambda: torch.tensor([9, 3, 0, 1, 7], device=DEVICE)[1:4],
    }[form]()
    args = make_inputs(3, 4, 2, 6, 64, torch.float16, gen("col", form))
    check(*args, col)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
def test_strided_inputs_and_caches(dtype):
    # every input and cache a view with strides of its own: q a slice of a fused qkv projection, k every other
    # head of another, v every third row; cos a half of one [B, 2D] table, sin a window of a wider one; k_cache
    # every other head and a column window of a bigger cache, v_cache a [B, S, H, D] cache transposed (so the
    # caches' column strides differ too). Writes must land in the views only.
    batch, h_q, h_kv, s_max, dim = 3, 6, 2, 7, 80
    g = gen("strided", dtype)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)

    q = rand(batch, h_q + 2 * h_kv, dim)[:, :h_q]
    k = rand(batch, 2 * h_kv, dim)[:, 1::2]
    v = rand(3 * batch, h_kv, dim)[::3]
    cos, sin = rotary(batch, dim, dtype, g)
    cos = torch.cat((cos, sin), dim=-1)[:, :dim]
    sin = torch.cat((rand(batch, 3), sin, rand(batch, 2)), dim=-1)[:, 3:3 + dim]
    big_k = rand(batch, 2 * h_kv, s_max + 5, dim)
    big_v = rand(batch, s_max + 2, h_kv + 1, dim)
    k_cache, v_cache = big_k[:, 1::2, 3:3 + s_max], big_v[:, :s_max, 1:].transpose(1, 2)
    assert not any(t.is_contiguous() for t in (q, k, v, cos, sin, k_cache, v_cache))
    assert len({t.stride(0) for t in (q, k, v)}) == 3 and len({t.stride(1) for t in (q, k, v)}) == 2
    assert cos.stride(0) != sin.stride(0) and k_cache.stride()[1:3] != v_cache.stride()[1:3]
    check(q, k, v, cos, sin, k_cache, v_cache, torch.tensor([0, 6, 2], device=DEVICE), cache_bases=(big_k, big_v))


@needs_triton
def test_repeated_steps_fill_the_cache():
    # a decode loop: step t writes column t of every row; the cache ends up holding every step's k and v
    g = gen("steps")
    batch, h_q, h_kv, s_max, dim = 2, 4, 2, 5, 64
    _, _, _, _, _, k_cache, v_cache = make_inputs(batch, h_q, h_kv, s_max, dim, torch.bfloat16, g)
    want_kc, want_vc = k_cache.clone(), v_cache.clone()
    col = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    for step in range(s_max):
        q, k, v, cos, sin, _, _ = make_inputs(batch, h_q, h_kv, 1, dim, torch.bfloat16, g)
        col.fill_(step)
        got = rope_cache_write(q, k, v, cos, sin, k_cache, v_cache, col, backend="triton")
        want = rope_cache_write_reference(q, k, v, cos, sin, want_kc, want_vc, col)
        assert_rotated(got, want, q)
    assert_rotated(k_cache, want_kc, k_cache)
    assert bitwise_equal(v_cache, want_vc)


@needs_triton
@pytest.mark.parametrize("cols", [[0], []])
def test_empty_batch_launches_nothing(monkeypatch, cols):
    def no_kernel():
        raise AssertionError("kernel launched for an empty batch")

    monkeypatch.setattr(mod, "_kernel", no_kernel)
    q, k, v, cos, sin, k_cache, v_cache = make_inputs(0, 3, 1, 4, 8, torch.float16, gen("empty"))
    got = rope_cache_write(q, k, v, cos, sin, k_cache, v_cache, torch.tensor(cols, dtype=torch.int64,
                                                                              device=DEVICE), backend="triton")
    assert got.shape == (0, 3, 8) and got.dtype == torch.float16


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_backend_is_reference(dtype):
    q, k, v, cos, sin, k_cache, v_cache = make_inputs(2, 4, 2, 6, 16, dtype, gen("torch", dtype))
    col = torch.tensor([5, 1], device=DEVICE)
    want_kc, want_vc = k_cache.clone(), v_cache.clone()
    got = rope_cache_write(q, k, v, cos, sin, k_cache, v_cache, col, backend="torch")
    want = rope_cache_write_reference(q, k, v, cos, sin, want_kc, want_vc, col)
    assert bitwise_equal(got, want) and bitwise_equal(k_cache, want_kc) and bitwise_equal(v_cache, want_vc)


def test_auto_on_cpu_is_reference(monkeypatch):
    monkeypatch.setattr(mod, "_kernel", lambda: pytest.fail("auto ran the kernel on CPU"))
    q, k, v, cos, sin, k_cache, v_cache = (t.cpu() for t in make_inputs(2, 4, 2, 6, 16, torch.bfloat16,
                                                                         gen("auto")))
    col = torch.tensor([3])
    want_kc, want_vc = k_cache.clone(), v_cache.clone()
    got = rope_cache_write(q, k, v, cos, sin, k_cache, v_cache, col)
    want = rope_cache_write_reference(q, k, v, cos, sin, want_kc, want_vc, col)
    assert bitwise_equal(got, want) and bitwise_equal(k_cache, want_kc) and bitwise_equal(v_cache, want_vc)


def test_reference_is_a_rotation():
    # the reference itself against float64 complex rotation of the pairs (x[j], x[j + D/2]) by the row's angles
    batch, h_q, h_kv, s_max, dim = 3, 4, 2, 6, 32
    q, k, v, cos, sin, k_cache, v_cache = make_inputs(batch, h_q, h_kv, s_max, dim, torch.float32, gen("formula"))
    col = torch.tensor([5, 0, 2], device=DEVICE)
    old_k = k_cache.clone()
    q_out = rope_cache_write_reference(q, k, v, cos, sin, k_cache, v_cache, col)

    def rotate(x):
        z = torch.complex(x[..., :dim // 2].double(), x[..., dim // 2:].double())
        z = z * torch.complex(cos[:, None, :dim // 2].double(), sin[:, None, :dim // 2].double())
        return torch.cat((z.real, z.imag), dim=-1)

    torch.testing.assert_close(q_out.double(), rotate(q), rtol=1e-6, atol=1e-6)
    rows = torch.arange(batch, device=DEVICE)
    torch.testing.assert_close(k_cache[rows, :, col].double(), rotate(k), rtol=1e-6, atol=1e-6)
    assert torch.equal(v_cache[rows, :, col], v)
    assert torch.equal(k_cache[0, :, :5], old_k[0, :, :5]) and torch.equal(k_cache[1, :, 1:], old_k[1, :, 1:])


# ------------------------------------------------------------------------------------------------ slot pools
def make_pool_inputs(batch, h_q, h_kv, n_slots, dim, dtype, g):
    """Inputs with [NSLOT, H_kv, D] slot pools (random old contents, so that a write to a wrong slot shows)."""
    q, k, v, cos, sin, _, _ = make_inputs(batch, h_q, h_kv, 1, dim, dtype, g)
    k_pool = torch.randn(n_slots, h_kv, dim, generator=g).to(dtype).to(DEVICE)
    v_pool = torch.randn(n_slots, h_kv, dim, generator=g).to(dtype).to(DEVICE)
    return q, k, v, cos, sin, k_pool, v_pool


def check_pool(q, k, v, cos, sin, k_pool, v_pool, slot, pool_bases=None):
    """As check(), for slot pools: q and the addressed slots against the reference, every other element of the
    pools (or of the ``pool_bases`` they are views of) unchanged. Assumes distinct slots."""
    bases = pool_bases or (k_pool, v_pool)
    old = [base.clone() for base in bases]
    want_kc, want_vc = k_pool.clone(), v_pool.clone()
    got = rope_cache_write(q, k, v, cos, sin, k_pool, v_pool, slot, backend="triton")
    want = rope_cache_write_reference(q, k, v, cos, sin, want_kc, want_vc, slot)
    assert_rotated(got, want, q)
    idx = slot.to(torch.int64).expand(q.shape[0])
    assert_rotated(k_pool[idx], want_kc[idx], k)
    assert bitwise_equal(v_pool[idx], v) and bitwise_equal(want_vc[idx], v)
    for base, before, pool in zip(bases, old, (k_pool, v_pool)):
        mark = torch.zeros(base.shape, dtype=torch.bool, device=DEVICE)
        mark.as_strided(pool.shape, pool.stride(), pool.storage_offset() - base.storage_offset())[idx] = True
        assert mark.sum() == idx.numel() * pool.shape[1] * pool.shape[2]
        assert bitwise_equal(base[~mark], before[~mark]), "a slot that is not addressed changed"
    return got


# (batch, h_q, h_kv, dim, n_slots, slots): GQA 1, 2, 7; head dims 64, 128, 80 and 2; the first and last slot, slots
# out of row order, one row
POOL_CASES = [
    (3, 3, 3, 64, 40, [39, 0, 17]),
    (4, 8, 4, 128, 13, [5, 12, 2, 6]),
    (1, 7, 1, 80, 3, [1]),
    (2, 4, 2, 2, 9, [8, 3]),
]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,h_q,h_kv,dim,n_slots,slots", POOL_CASES)
def test_slot_pool_matches_reference(dtype, batch, h_q, h_kv, dim, n_slots, slots):
    g = gen("pool", dtype, batch, h_q, h_kv, dim, n_slots, slots)
    args = make_pool_inputs(batch, h_q, h_kv, n_slots, dim, dtype, g)
    check_pool(*args, torch.tensor(slots, dtype=torch.int32, device=DEVICE))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_paged_pool_views(dtype):
    # the engine's pools [NB, BS, H_kv, D] seen as flat slots (block * BS + offset), and a pool whose heads are
    # every other head of a wider one (slot and head strides of its own); int64 slots
    g = gen("paged views", dtype)
    batch, h_q, h_kv, dim, n_blocks, bs = 3, 6, 2, 64, 5, 7
    q, k, v, cos, sin, _, _ = make_pool_inputs(batch, h_q, h_kv, 1, dim, dtype, g)
    k_blocks = torch.randn(n_blocks, bs, h_kv, dim, generator=g).to(dtype).to(DEVICE)
    wide_v = torch.randn(n_blocks * bs, 2 * h_kv, dim, generator=g).to(dtype).to(DEVICE)
    k_pool, v_pool = k_blocks.view(n_blocks * bs, h_kv, dim), wide_v[:, 1::2]
    assert not v_pool.is_contiguous()
    slot = torch.tensor([4 * bs + 6, 0 * bs + 3, 2 * bs], device=DEVICE)  # the last, a middle and a first offset
    check_pool(q, k, v, cos, sin, k_pool, v_pool, slot, pool_bases=(k_blocks, wide_v))
    assert bitwise_equal(k_blocks[4, 6], k_pool[slot[0]])  # slot 4 * BS + 6 is block 4, offset 6


@needs_triton
def test_rows_sharing_a_scratch_slot():
    # inert rows all write the engine's scratch slot: the live rows' slots are exact, the scratch slot holds the
    # inert rows' values, nothing else changes
    g = gen("scratch")
    batch, h_q, h_kv, dim, n_slots, scratch = 5, 4, 2, 64, 12, 11
    q, k, v, cos, sin, k_pool, v_pool = make_pool_inputs(batch, h_q, h_kv, n_slots, dim, torch.float16, g)
    slot = torch.tensor([3, scratch, 7, scratch, scratch], device=DEVICE)
    old_k, old_v = k_pool.clone(), v_pool.clone()
    want_kc, want_vc = k_pool.clone(), v_pool.clone()
    got = rope_cache_write(q, k, v, cos, sin, k_pool, v_pool, slot, backend="triton")
    want = rope_cache_write_reference(q, k, v, cos, sin, want_kc, want_vc, slot)
    assert bitwise_equal(got, want)
    live = torch.tensor([0, 2], device=DEVICE)
    assert bitwise_equal(k_pool[slot[live]], want_kc[slot[live]]) and bitwise_equal(v_pool[slot[live]], v[live])
    # every row's rotated k, from the reference writing each row to a slot of its own
    rot_k = torch.empty(batch, h_kv, dim, dtype=k.dtype, device=DEVICE)
    rope_cache_write_reference(q, k, v, cos, sin, rot_k, torch.empty_like(rot_k), torch.arange(batch, device=DEVICE))
    # programs of different rows (and heads) race on the slot, so each element holds one of the inert rows' values
    inert = torch.tensor([1, 3, 4], device=DEVICE)
    for got_slot, rows in ((k_pool[scratch], rot_k[inert]), (v_pool[scratch], v[inert])):
        assert (got_slot.view(torch.int16)[None] == rows.view(torch.int16)).any(0).all()
    untouched = torch.ones(n_slots, dtype=torch.bool, device=DEVICE)
    untouched[slot] = False
    assert bitwise_equal(k_pool[untouched], old_k[untouched]) and bitwise_equal(v_pool[untouched], old_v[untouched])


# ------------------------------------------------------------------------------------------------ errors
def _good():
    q, k, v, cos, sin, k_cache, v_cache = make_inputs(2, 4, 2, 5, 8, torch.float32, gen("good"))
    return dict(q=q, k=k, v=v, cos=cos, sin=sin, k_cache=k_cache, v_cache=v_cache,
                col=torch.tensor([0, 4], device=DEVICE))


F16, I64 = torch.float16, torch.int64
BAD = [
    (dict(q=[1.0]), TypeError, "q"),
    (dict(v=None), TypeError, "v"),
    (dict(col=[0, 4]), TypeError, "col"),
    (dict(k=torch.zeros(2, 2, 8, device="meta")), ValueError, "k"),
    (dict(k_cache=torch.zeros(2, 2, 5, 8, device="meta")), ValueError, "k_cache"),
    (dict(col=torch.zeros(2, dtype=I64, device="meta")), ValueError, "col"),
    (dict(q=torch.zeros(2, 32)), ValueError, "q"),
    (dict(q=torch.zeros(2, 4, 8, 1)), ValueError, "q"),
    (dict(q=torch.zeros(2, 4, 8, dtype=torch.int32)), TypeError, "q"),
    (dict(q=torch.zeros(2, 4, 8, dtype=torch.float64)), TypeError, "q"),
    (dict(q=torch.zeros(2, 4, 7)), ValueError, "q"),  # odd head dim
    (dict(q=torch.zeros(2, 4, 0)), ValueError, "q"),
    (dict(k=torch.zeros(2, 2, 8, dtype=F16)), TypeError, "k"),
    (dict(v=torch.zeros(2, 2, 8, dtype=F16)), TypeError, "v"),
    (dict(cos=torch.zeros(2, 8, dtype=F16)), TypeError, "cos"),
    (dict(sin=torch.zeros(2, 8, dtype=torch.bfloat16)), TypeError, "sin"),
    (dict(k_cache=torch.zeros(2, 2, 5, 8, dtype=F16)), TypeError, "k_cache"),
    (dict(v_cache=torch.zeros(2, 2, 5, 8, dtype=F16)), TypeError, "v_cache"),
    (dict(k=torch.zeros(2, 16)), ValueError, "k"),
    (dict(k=torch.zeros(3, 2, 8)), ValueError, "k"),
    (dict(k=torch.zeros(2, 2, 6)), ValueError, "k"),
    (dict(k=torch.zeros(2, 0, 8), v=torch.zeros(2, 0, 8)), ValueError, "k"),
    (dict(v=torch.zeros(2, 3, 8)), ValueError, "v"),
    (dict(cos=torch.zeros(2, 6)), ValueError, "cos"),
    (dict(sin=torch.zeros(1, 8)), ValueError, "sin"),
    (dict(cos=torch.zeros(2, 1, 8)), ValueError, "cos"),
    (dict(k_cache=torch.zeros(2, 5, 8)), ValueError, "k_cache"),
    (dict(k_cache=torch.zeros(3, 2, 5, 8)), ValueError, "k_cache"),
    (dict(k_cache=torch.zeros(2, 3, 5, 8)), ValueError, "k_cache"),
    (dict(k_cache=torch.zeros(2, 2, 5, 6)), ValueError, "k_cache"),
    (dict(k_cache=torch.zeros(2, 2, 0, 8), v_cache=torch.zeros(2, 2, 0, 8)), ValueError, "k_cache"),
    (dict(v_cache=torch.zeros(2, 2, 5, 4)), ValueError, "v_cache"),
    (dict(v_cache=torch.zeros(2, 2, 6, 8)), ValueError, "v_cache"),  # S_max differs from k_cache's
    (dict(col=torch.zeros(2)), TypeError, "col"),  # float
    (dict(col=torch.zeros(2, dtype=torch.int16)), TypeError, "col"),
    (dict(col=torch.zeros(3, dtype=I64)), ValueError, "col"),
    (dict(col=torch.zeros(0, dtype=I64)), ValueError, "col"),
    (dict(col=torch.zeros(2, 1, dtype=I64)), ValueError, "col"),
    (dict(col=torch.tensor(1)), ValueError, "col"),  # 0-D
    (dict(q=torch.zeros(2, 8, 4).transpose(1, 2)), ValueError, "q"),  # last dim not contiguous
    (dict(k=torch.zeros(2, 8, 2).transpose(1, 2)), ValueError, "k"),
    (dict(v=torch.zeros(2, 8, 2).transpose(1, 2)), ValueError, "v"),
    (dict(cos=torch.zeros(8, 2).t()), ValueError, "cos"),
    (dict(sin=torch.zeros(8, 2).t()), ValueError, "sin"),
    (dict(k_cache=torch.zeros(2, 2, 8, 5).transpose(2, 3)), ValueError, "k_cache"),
    (dict(v_cache=torch.zeros(2, 2, 8, 5).transpose(2, 3)), ValueError, "v_cache"),
    (dict(backend="cpu"), ValueError, "backend"),
    (dict(backend=None), ValueError, "backend"),
    # slot pools [NSLOT, H_kv, D]
    (dict(k_cache=torch.zeros(9, 3, 8), v_cache=torch.zeros(9, 3, 8)), ValueError, "k_cache"),  # H_kv
    (dict(k_cache=torch.zeros(9, 2, 6), v_cache=torch.zeros(9, 2, 6)), ValueError, "k_cache"),  # D
    (dict(k_cache=torch.zeros(0, 2, 8), v_cache=torch.zeros(0, 2, 8)), ValueError, "k_cache"),  # no slot
    (dict(k_cache=torch.zeros(9, 2, 8), v_cache=torch.zeros(8, 2, 8)), ValueError, "v_cache"),
    (dict(k_cache=torch.zeros(9, 2, 8)), ValueError, "v_cache"),  # one pool, one static cache
    (dict(k_cache=torch.zeros(9, 2, 8), v_cache=torch.zeros(9, 2, 8, dtype=F16)), TypeError, "v_cache"),
    (dict(k_cache=torch.zeros(9, 8, 2).transpose(1, 2), v_cache=torch.zeros(9, 2, 8)), ValueError, "k_cache"),
    (dict(k_cache=torch.zeros(9, 2, 8), v_cache=torch.zeros(9, 2, 8), col=torch.zeros(2, 2, dtype=I64)),
     ValueError, "col"),
]


@pytest.mark.parametrize("change,exc,name", BAD)
def test_bad_input(change, exc, name):
    raises_naming(rope_cache_write, _good(), change, exc, name)


@pytest.mark.skipif(DEVICE != "cpu", reason="the range of col is checked on the CPU only (no sync on a GPU)")
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("pool,col", [(False, [0, 5]), (False, [-1, 0]), (True, [9, 0]), (True, [3, -2]),
                                      (True, [9])])
def test_col_out_of_range_on_cpu(backend, pool, col):
    # S_max is 5 in the static cache, NSLOT 9 in the pool; both backends check before writing anything
    if backend == "triton" and not _backends.triton_interpreting():
        pytest.skip("needs TRITON_INTERPRET=1")
    change = dict(col=torch.tensor(col), backend=backend)
    if pool:
        change.update(k_cache=torch.zeros(9, 2, 8), v_cache=torch.zeros(9, 2, 8))
    raises_naming(rope_cache_write, _good(), change, ValueError, "col")


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setattr(_backends, "triton_interpreting", lambda: False)
    args = {key: value.cpu() for key, value in _good().items()}
    with pytest.raises(ValueError, match=r"^backend:"):
        rope_cache_write(**args, backend="triton")


@without_gpu
def test_kernel_compiles_for_sm90_without_a_gpu():
    sm90.compiled("rope_cache")
