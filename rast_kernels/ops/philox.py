"""Philox4x32-10 counter-based generator and the sampler's noise, in plain PyTorch.

This is the generator every backend of :func:`rast_kernels.rast_sample` shares
(the Triton kernel and the C++ kernel implement the same arithmetic), so the
same ``(seed, offset, column)`` gives the same noise everywhere.

Layout (Random123's Philox4x32 with 10 rounds):

* key ``(k0, k1) = (seed & 0xffffffff, (seed >> 32) & 0xffffffff)`` (int64 seed, two's complement bits)
* counter ``(c0, c1, c2, c3) = (column >> 2, offset & 0xffffffff, (offset >> 32) & 0xffffffff, 0)``
* the column's 32-bit word is output ``column & 3`` of the four.

The word ``x`` becomes an Exp(1) variate ``E`` through ``w = min(x * 2^-32 + 2^-33, 1 - 2^-24)`` (fp32,
never 0 or 1) and ``E = -log1p(-w)``, evaluated as the series ``w + w^2/2 + w^3/3 + w^4/4`` when
``w < 2^-7`` and as ``-log(1 - w)`` otherwise. Small ``E`` (the ones that win races) are thus resolved
to fp32 relative precision down to 2^-33, so tail tokens are not cut off by the uniform's resolution.
The sampler draws ``argmax_i (z_i / T - log E_i)`` over the kept columns (Gumbel-max / exponential race).
"""
from __future__ import annotations

import functools

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of ``a * b`` for a 32-bit constant ``a`` and int64 tensor ``b`` < 2^32.

    int64 cannot hold the 64-bit product, so multiply 16-bit halves (each partial < 2^32) and carry.
    """
    a_lo, a_hi = a & 0xFFFF, a >> 16
    b_lo, b_hi = b & 0xFFFF, b >> 16
    ll = a_lo * b_lo
    lh = a_lo * b_hi
    hl = a_hi * b_lo
    hh = a_hi * b_hi
    mid = (ll >> 16) + (lh & 0xFFFF) + (hl & 0xFFFF)
    lo = (ll & 0xFFFF) | ((mid & 0xFFFF) << 16)
    hi = hh + (lh >> 16) + (hl >> 16) + (mid >> 16)
    return hi & _MASK32, lo & _MASK32


def philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on int64 tensors holding uint32 values; returns the four output words (int64)."""
    k0 = torch.as_tensor(k0, dtype=torch.int64)
    k1 = torch.as_tensor(k1, dtype=torch.int64)
    for r in range(PHILOX_ROUNDS):
        if r:
            k0 = (k0 + PHILOX_W0) & _MASK32
            k1 = (k1 + PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def random_words(seed: torch.Tensor, offset: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """32-bit random words (int64 in [0, 2^32)) for rows keyed by ``seed[B]``, ``offset[B]`` (int64)
    at ``columns[V]`` (int64); returns ``[B, V]``."""
    seed = seed.to(torch.int64).reshape(-1, 1)
    offset = offset.to(torch.int64).reshape(-1, 1)
    cols = columns.to(torch.int64).reshape(1, -1)
    shape = torch.broadcast_shapes(seed.shape, cols.shape)
    c0 = (cols >> 2).expand(shape)
    c1 = (offset & _MASK32).expand(shape)
    c2 = ((offset >> 32) & _MASK32).expand(shape)
    c3 = torch.zeros(shape, dtype=torch.int64, device=cols.device)
    x = philox4x32(c0, c1, c2, c3, seed & _MASK32, (seed >> 32) & _MASK32)
    lane = (cols & 3).expand(shape)
    return torch.where(lane == 0, x[0], torch.where(lane == 1, x[1], torch.where(lane == 2, x[2], x[3])))


def exponential_from_words(x: torch.Tensor) -> torch.Tensor:
    """Exp(1) variates (fp32) from 32-bit words, exactly as the kernels compute them (see module doc)."""
    w = x.to(torch.float32) * 2.0**-32 + 2.0**-33
    w = torch.clamp(w, max=1.0 - 2.0**-24)
    series = w * (1.0 + w * (0.5 + w * (1.0 / 3.0 + w * 0.25)))
    return torch.where(w < 2.0**-7, series, -torch.log(1.0 - w))


def exponential_noise(seed: torch.Tensor, offset: torch.Tensor, num_columns: int) -> torch.Tensor:
    """``E[B, num_columns]`` fp32 Exp(1) variates for rows keyed by ``seed[B]``, ``offset[B]``."""
    cols = torch.arange(num_columns, dtype=torch.int64, device=seed.device)
    return exponential_from_words(random_words(seed, offset, cols))


_MASK64 = (1 << 64) - 1
SEED_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: SplitMix64's increment
SEED_MUL1 = 0xBF58476D1CE4E5B9
SEED_MUL2 = 0x94D049BB133111EB


def mix_seed(seed: int, index: int) -> int:
    """The package's one seed-mixing function: the int64 Philox seed of stream ``index`` under ``seed``.

    SplitMix64's finaliser of ``seed + (index + 1) * 0x9E3779B97F4A7C15`` (mod 2^64), returned as a signed
    int64 (two's complement). Distinct ``index`` values get unrelated streams, and the same ``(seed, index)``
    always gets the same one. Used for the rows of :func:`rast_kernels.rast_sample` under a scalar ``seed``
    (row ``b`` draws with ``mix_seed(seed, b)``) and for the engine's per-prompt and per-sample seeds."""
    z = (int(seed) + (int(index) + 1) * SEED_GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * SEED_MUL1) & _MASK64
    z = ((z ^ (z >> 27)) * SEED_MUL2) & _MASK64
    z ^= z >> 31
    return z - (1 << 64) if z >= (1 << 63) else z


def row_seeds(seed, batch: int, device=None) -> torch.Tensor:
    """The int64 Philox seeds ``[B]`` of :func:`rast_kernels.rast_sample`'s rows: a ``[B]`` tensor is used as
    given (batch-invariant: a row's stream does not depend on its position); a number gives row ``b`` the seed
    ``mix_seed(seed, b)``, so identical rows under one scalar seed still draw independently."""
    if isinstance(seed, torch.Tensor):
        return seed.to(device=device if device is not None else seed.device, dtype=torch.int64).reshape(batch)
    return torch.tensor(_mixed_seeds(int(seed), int(batch)), dtype=torch.int64, device=device)


@functools.lru_cache(maxsize=64)
def _mixed_seeds(seed: int, batch: int) -> tuple:
    # cached: a decode loop calls with one seed and batch size every step (ints, so callers cannot alter it)
    return tuple(mix_seed(seed, b) for b in range(batch))
