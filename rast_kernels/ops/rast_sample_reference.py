"""Pure PyTorch reference of :func:`rast_kernels.rast_sample`: the executable spec.

Written for obviousness, not speed. ``dtype=torch.float64`` computes the combination, the softmax
and the filter masses in float64; the random noise is always the shared fp32 generator of
:mod:`rast_kernels.ops.philox`, so the reference draws the same token as the kernels.
"""
from __future__ import annotations

import math

import torch

from .philox import exponential_noise, row_seeds


def _per_row(value, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A Python number or a ``[B]`` tensor as a ``[B]`` tensor of ``dtype`` on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype).reshape(batch)
    return torch.full((batch,), value, dtype=dtype, device=device)


def as_pairs(expert, expert_base):
    """``(experts, expert_bases)`` as lists: a plain tensor pair is the one-element lists."""
    if isinstance(expert, (list, tuple)):
        return list(expert), list(expert_base)
    return [expert], [expert_base]


def pair_alphas(alpha, num_pairs: int, batch: int, dtype, device, pairs_form: bool) -> torch.Tensor:
    """``alpha`` as a ``[B, K]`` tensor of ``dtype``. A number is every pair's weight; in the list form a length-K
    sequence of numbers or a ``[K]`` tensor is one weight per pair, a ``[B, K]`` tensor one per row and pair; in the
    plain tensor form a ``[B]`` tensor is one per row."""
    if isinstance(alpha, torch.Tensor):
        a = alpha.to(device=device, dtype=dtype)
        if not pairs_form:
            return a.reshape(batch, 1)
        if a.dim() == 1:
            return a.reshape(1, num_pairs).expand(batch, num_pairs)
        return a.reshape(batch, num_pairs)
    if isinstance(alpha, (list, tuple)):
        return torch.tensor([float(v) for v in alpha], dtype=dtype, device=device).reshape(1, -1).expand(batch, num_pairs)
    return torch.full((batch, num_pairs), alpha, dtype=dtype, device=device)


def combined_logits(base, expert, expert_base, alpha, vocab_size, dtype=torch.float32):
    """``z = base + alpha * (expert - expert_base)`` over ``[0, vocab_size)`` in ``dtype``; a column
    that is ``-inf`` in any of the inputs is ``-inf`` in ``z``. Returns ``[B, vocab_size]``.

    ``expert``/``expert_base`` may be sequences of K tensors: ``z = base + S`` with
    ``S = alpha_1 * (expert_1 - expert_base_1) + ... + alpha_K * (expert_K - expert_base_K)`` summed left to right
    (for K = 1, ``S`` is the single product: the plain form's arithmetic)."""
    pairs_form = isinstance(expert, (list, tuple))
    experts, expert_bases = as_pairs(expert, expert_base)
    b = base[:, :vocab_size].to(dtype)
    a = pair_alphas(alpha, len(experts), b.shape[0], dtype, b.device, pairs_form)
    masked = b == -math.inf
    s = None
    for i, (e, eb) in enumerate(zip(experts, expert_bases)):
        e = e[:, :vocab_size].to(dtype)
        eb = eb[:, :vocab_size].to(dtype)
        masked = masked | (e == -math.inf) | (eb == -math.inf)
        term = a[:, i:i + 1] * (e - eb)
        s = term if s is None else s + term
    z = b + s
    return torch.where(masked, torch.full_like(z, -math.inf), z)


def plausibility(base, base_plausibility, vocab_size):
    """``(keep [B, V], bad [B])`` of the base-plausibility filter, in fp32 whatever the reference's dtype: column
    ``i`` is kept when ``base_i - max_j base_j >= log(base_plausibility)`` (fp32 ``torch.log`` of the per-row
    value); everything is kept where the value is 0. ``bad``: the value is outside ``[0, 1]`` (or NaN), or it is
    > 0 and the row of base holds NaN or ``+inf``."""
    b = base[:, :vocab_size].float()
    bp = _per_row(base_plausibility, b.shape[0], torch.float32, b.device)
    on = (bp > 0).unsqueeze(1)
    log_bp = torch.log(bp).unsqueeze(1)
    m = b.max(1, keepdim=True).values
    keep = ~on | ((b - m) >= log_bp)
    bad = ~((bp >= 0) & (bp <= 1)) | ((bp > 0) & (torch.isnan(b) | (b == math.inf)).any(1))
    return keep, bad


def kept_mask(z: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """The kept set of each row of temperature-scaled logits ``z[B, V]`` after top-k, top-p, min-p.

    ``top_k`` (int), ``top_p``, ``min_p``: ``[B]``. Each filter acts on what the previous one kept.
    Ties at a boundary are kept. Masked (``-inf``) columns are never kept.
    """
    s, order = torch.sort(z, dim=1, descending=True)
    pos = torch.arange(z.shape[1], device=z.device).expand_as(s)
    # rank of a column = its position among sorted values, ties sharing the first position of their group,
    # i.e. the number of columns strictly above it
    new_group = torch.ones_like(s, dtype=torch.bool)
    new_group[:, 1:] = s[:, 1:] != s[:, :-1]
    rank = torch.cummax(torch.where(new_group, pos, torch.zeros_like(pos)), dim=1).values
    keep = s > -math.inf

    k = top_k.unsqueeze(1)
    keep &= (k <= 0) | (rank < k)

    w = torch.where(keep, torch.exp(s - s[:, :1]), torch.zeros_like(s))  # unnormalised kept probabilities
    mass_above = (torch.cumsum(w, 1) - w).gather(1, rank)  # kept mass strictly above each column
    p = top_p.unsqueeze(1)
    keep &= (p >= 1) | (mass_above < p * w.sum(1, keepdim=True))

    # min-p: prob >= min_p * max prob; renormalisation cancels in the ratio, and the top column has w = 1
    m = min_p.unsqueeze(1)
    keep &= (m <= 0) | (w >= m)
    return torch.zeros_like(keep).scatter(1, order, keep)


def rast_sample_reference(
    base_logits, expert_logits, expert_base_logits, *, alpha=1.0, temperature=1.0, top_k=0, top_p=1.0,
    min_p=0.0, vocab_size=None, seed=0, offset=0, return_logprobs=False, dtype=torch.float32,
    base_plausibility=0.0,
):
    """Reference RAST sampling step; same arguments and results as :func:`rast_kernels.rast_sample`
    (arguments are assumed valid), including K expert pairs as sequences and ``base_plausibility`` (always
    evaluated in fp32). ``dtype``: float32 or float64 math for the combination and filters.
    Per-row parameter values that are out of range give that row token ``-1``. A number ``seed`` gives row
    ``b`` the Philox seed ``mix_seed(seed, b)``; a ``[B]`` tensor is used as given (:func:`.philox.row_seeds`)."""
    experts, expert_bases = as_pairs(expert_logits, expert_base_logits)
    vocab_size = vocab_size or min(t.shape[1] for t in [base_logits, *experts, *expert_bases])
    batch, device = base_logits.shape[0], base_logits.device
    z = combined_logits(base_logits, expert_logits, expert_base_logits, alpha, vocab_size, dtype)
    plausible, bad_plausibility = plausibility(base_logits, base_plausibility, vocab_size)
    temp = _per_row(temperature, batch, dtype, device)
    k = _per_row(top_k, batch, torch.int64, device)
    p = _per_row(top_p, batch, dtype, device)
    m = _per_row(min_p, batch, dtype, device)
    tokens = torch.full((batch,), -1, dtype=torch.int64, device=device)
    logprobs = torch.full((batch,), math.nan, dtype=torch.float32, device=device)

    bad_param = ~((temp >= 0) & (temp < math.inf)) | (k < 0) | ~((p > 0) & (p <= 1)) | ~((m >= 0) & (m <= 1))
    bad_row = torch.isnan(z).any(1) | (z == math.inf).any(1) | bad_param | bad_plausibility
    # base plausibility masks columns before temperature and the filters (NaN / +inf were checked above)
    z = torch.where(plausible, z, torch.full_like(z, -math.inf))
    bad_row |= ~(z > -math.inf).any(1)
    # temperature 0 is greedy; so is a temperature so small that z / T overflows (the T -> 0 limit)
    zmax = z.max(1).values
    greedy = ((temp == 0) | ((zmax / temp).abs() == math.inf)) & ~bad_row
    # greedy: highest z, ties to the lowest id (torch.argmax returns the first maximum)
    tokens[greedy] = z[greedy].argmax(1)
    logprobs[greedy] = 0.0

    sample = ~greedy & ~bad_row
    if sample.any():
        rows = sample.nonzero().flatten()
        zs = z[rows] / temp[rows].unsqueeze(1)
        keep = kept_mask(zs, k[rows], p[rows], m[rows])
        seeds = row_seeds(seed, batch, device)[rows]
        offsets = _per_row(offset, batch, torch.int64, device)[rows]
        noise = exponential_noise(seeds, offsets, vocab_size)
        race = torch.where(keep, zs.float() - torch.log(noise), torch.full_like(noise, -math.inf))
        chosen = race.argmax(1)
        kept_z = torch.where(keep, zs, torch.full_like(zs, -math.inf))
        lp = kept_z.gather(1, chosen.unsqueeze(1)).squeeze(1) - torch.logsumexp(kept_z, 1)
        tokens[rows] = chosen
        logprobs[rows] = lp.float()
    return (tokens, logprobs) if return_logprobs else tokens
