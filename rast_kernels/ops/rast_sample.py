"""``rast_sample``: the fused RAST sampling step (combine three logit rows, temperature, filters, draw).

Semantics (the spec every backend is tested against; see :mod:`.rast_sample_reference`):

1. Combine in fp32: ``z = base + alpha * (expert - expert_base)`` over columns ``[0, vocab_size)``.
   A ``-inf`` in any of the three inputs at a column masks that column (``-inf - -inf`` is never formed).
   With K expert pairs (``expert_logits`` and ``expert_base_logits`` sequences of K >= 1 tensors each):
   ``z = base + S``, ``S = alpha_1 * (expert_1 - expert_base_1) + ... + alpha_K * (expert_K - expert_base_K)``,
   every operation rounded to fp32 and the terms summed left to right in pair order (K = 1: the plain form,
   bit for bit); a ``-inf`` in any of the ``2K + 1`` inputs masks the column. ``alpha`` is then one number for
   every pair, K numbers, a ``[K]`` tensor, or a ``[B, K]`` tensor (per row and pair).
   Base plausibility (``base_plausibility = bp``, ``0`` is off), applied to ``z`` right after the combination,
   before temperature and the filters: a column whose probability under the base logits alone
   (``softmax(base)`` at temperature 1 over ``[0, vocab_size)``) is below ``bp`` times the base's largest is
   masked, i.e. column ``i`` is kept iff ``base_i - max_j base_j >= log(bp)``, evaluated in fp32 (``log`` of the
   fp32 ``bp`` by ``torch.log``) so every backend keeps the same set; the base's argmax column is always
   plausible. With ``bp > 0`` a NaN or ``+inf`` in ``base[:, :vocab_size]`` makes the row bad (rule 5).
2. ``temperature == 0`` is greedy: the highest ``z`` wins, ties to the lowest id; filters and random
   numbers are then irrelevant and the logprob is 0. So is a temperature so small that ``max z / T``
   overflows fp32 (the ``T -> 0`` limit). Otherwise ``z' = z / temperature``.
3. Filters, in Hugging Face ``generate`` order, each on what the previous one kept:
   top-k (``k <= 0`` or ``k >= vocab_size`` is off) keeps every token with fewer than ``k`` tokens
   strictly above it; top-p (``p >= 1`` is off) keeps every token whose strictly more probable kept
   tokens hold less than ``p`` of the kept mass; min-p (``0`` is off) keeps tokens with
   ``prob >= min_p * max prob``. Ties at a boundary are kept, so the kept set never depends on sort
   order, and the most probable token is always kept.
4. The draw is exact: ``argmax over kept i of (z'_i - log E_i)`` (exponential race, equivalent to
   Gumbel-max) with ``E_i ~ Exp(1)`` from Philox4x32-10 keyed by ``(row seed, offset, column)`` of that
   row only (:mod:`.philox`). The row seed of row ``b`` is ``seed[b]`` for a ``[B]`` seed tensor (used as
   given: batch-invariant) and ``mix_seed(seed, b)`` (:func:`.philox.mix_seed`) for a number, so identical
   rows under one scalar seed draw independently. With a seed tensor, the same row with the same seed and
   offset gives the same token whatever else is in the batch; with any seed, whatever the backend.
5. A row whose combined logits hold NaN or ``+inf``, in which every column is masked, or whose
   per-row parameter tensor value is out of range (``temperature`` negative, NaN or ``+inf``, ``top_k``
   negative, ``top_p`` outside ``(0, 1]``, ``min_p`` or ``base_plausibility`` outside ``[0, 1]``) gets token
   ``-1`` and logprob NaN; other rows are unaffected. (NaN/``+inf`` in ``z`` is judged before base
   plausibility masks columns; "every column masked" after it.)

Kernels: both read the ``2K + 1`` inputs in one pass (the pairs loop inside the column loop). The C++ kernel takes
any K; the Triton chunk kernel up to ``MAX_PAIRS = 4`` (constexpr): beyond that the wrapper first folds the K
pairs into one fp32 pair with PyTorch ops (``expert = S`` with the pairs' masks as ``-inf``, ``expert_base = 0``,
``alpha = 1``: the kernel's ``base + 1 * (S - 0)`` is exactly ``base + S``), the same tokens at the cost of one
extra pass. Base plausibility needs each row's base max before the mask: the C++ kernel makes one more pass
over base for it, the Triton wrapper a PyTorch reduction over base (no host read).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Union

import torch

from .. import _backends
from ..params import RANGES, ParamTypeError
from ._checks import require_float, require_like, require_tensors
from .philox import row_seeds
from .rast_sample_reference import rast_sample_reference

Param = Union[float, int, torch.Tensor]
_BACKENDS = ("auto", "triton", "cpp", "torch")


@dataclass
class _SamplerArgs:
    """The call's validated sampling parameters: each a Python number or a ``[B]`` tensor on the logits' device
    (float32 for ``alpha``, ``temperature``, ``top_p``, ``min_p``; int64 for ``top_k``, ``seed``, ``offset``).
    Internal to this module (the public ``SamplingParams`` is the engine's per-request settings)."""

    alpha: Param
    temperature: Param
    top_k: Param
    top_p: Param
    min_p: Param
    seed: Param
    offset: Param

    def as_dict(self) -> dict:
        """``{name: value}`` (the same objects: tensors are not copied, unlike ``dataclasses.asdict``)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def as_tensors(self, batch: int, device) -> "_SamplerArgs":
        """Every field as a contiguous ``[B]`` tensor (numbers broadcast)."""
        def full(name, value):
            if isinstance(value, torch.Tensor):
                return value
            return torch.full((batch,), value, dtype=_PARAM_DTYPES[name], device=device)
        return _SamplerArgs(**{name: full(name, value) for name, value in self.as_dict().items()})


_PARAM_DTYPES = {
    "alpha": torch.float32, "temperature": torch.float32, "top_p": torch.float32, "min_p": torch.float32,
    "top_k": torch.int64, "seed": torch.int64, "offset": torch.int64, "base_plausibility": torch.float32,
}

def _check_param(name: str, value, batch: int, device) -> Param:
    integral = _PARAM_DTYPES[name] == torch.int64
    if isinstance(value, torch.Tensor):
        if value.shape != (batch,):
            raise ValueError(f"{name}: expected a number or a tensor of shape [{batch}], got shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name}: tensor is on {value.device}, the logits are on {device}")
        if integral and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
            raise TypeError(f"{name}: expected an integer tensor, got {value.dtype}")
        if not integral and not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name}: expected a floating-point tensor, got {value.dtype}")
        return value.to(_PARAM_DTYPES[name]).contiguous()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ParamTypeError(name, f"expected a number or a [B] tensor, got {type(value).__name__}")
    if integral and not isinstance(value, numbers.Integral):
        raise ParamTypeError(name, f"expected an integer, got {value!r}")
    return RANGES[name].check(value)  # host-side range check; tensor values are checked per row in the kernels


def _check_logits(base, expert, expert_base):
    named = {"base_logits": base, "expert_logits": expert, "expert_base_logits": expert_base}
    require_tensors(**named)
    _check_logit_tensors(named, base)


def _check_logit_tensors(named: dict, base):
    for name, t in named.items():
        if t.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor [B, V], got shape {tuple(t.shape)}")
        require_float(name, t)
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(f"{name}: the last dimension must be contiguous (stride 1), got stride {t.stride(1)}")
        if t.shape[0] != base.shape[0]:
            raise ValueError(f"{name}: batch size {t.shape[0]} differs from base_logits' {base.shape[0]}")
        if t.device != base.device:
            raise ValueError(f"{name}: on {t.device}, base_logits is on {base.device}")
        if t.shape[1] == 0:
            raise ValueError(f"{name}: has no columns")


def _check_pairs(base, expert, expert_base):
    """The list form: ``(experts, expert_bases)`` as lists of K >= 1 checked tensors."""
    require_tensors(base_logits=base)
    if not isinstance(expert, (list, tuple)):
        raise TypeError(f"expert_base_logits: a sequence of tensors, so expert_logits must be one too, "
                        f"got {type(expert).__name__}")
    if not isinstance(expert_base, (list, tuple)):
        raise TypeError(f"expert_base_logits: expected a sequence of {len(expert)} tensors like expert_logits, "
                        f"got {type(expert_base).__name__}")
    if len(expert) == 0:
        raise ValueError("expert_logits: expected at least one tensor, got an empty sequence")
    if len(expert_base) != len(expert):
        raise ValueError(f"expert_base_logits: {len(expert_base)} tensors, expert_logits has {len(expert)}")
    named = {"base_logits": base}
    for label, seq in (("expert_logits", expert), ("expert_base_logits", expert_base)):
        for i, t in enumerate(seq):
            named[f"{label}: entry {i}"] = t
    require_tensors(**named)
    _check_logit_tensors(named, base)
    return list(expert), list(expert_base)


def _check_pair_alphas(alpha, num_pairs: int, batch: int, device) -> list:
    """The list form's ``alpha``: one checked parameter per pair (a number or a ``[B]`` float32 tensor)."""
    if isinstance(alpha, torch.Tensor):
        if alpha.device != device:
            raise ValueError(f"alpha: tensor is on {alpha.device}, the logits are on {device}")
        if not (alpha.is_floating_point() or alpha.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"alpha: expected a floating-point tensor, got {alpha.dtype}")
        a = alpha.to(torch.float32)
        if a.shape == (num_pairs,):
            return [a[i].expand(batch).contiguous() for i in range(num_pairs)]
        if a.shape == (batch, num_pairs):
            return [a[:, i].contiguous() for i in range(num_pairs)]
        raise ValueError(f"alpha: expected a number, {num_pairs} numbers, or a tensor of shape [{num_pairs}] or "
                         f"[{batch}, {num_pairs}], got shape {tuple(alpha.shape)}")
    if isinstance(alpha, (list, tuple)):
        if len(alpha) != num_pairs:
            raise ValueError(f"alpha: expected {num_pairs} weights (one per pair), got {len(alpha)}")
        return [_check_param("alpha", v, batch, device) if not isinstance(v, torch.Tensor) else
                _bad_alpha_entry(v) for v in alpha]
    return [_check_param("alpha", alpha, batch, device)] * num_pairs


def _bad_alpha_entry(v):
    raise TypeError(f"alpha: a sequence of weights holds numbers, got a {type(v).__name__}")


def _folded_pair(base, experts, expert_bases, alphas, vocab_size):
    """K pairs folded into one for a kernel: an fp32 ``[B, V]`` "expert" ``S`` (the spec's sum, ``-inf`` where a pair
    masks the column) with a zero "expert base" and alpha 1, so the kernel forms ``base + 1 * (S - 0) = base + S``
    exactly (``-inf`` in base is still masked by the kernel, NaN / ``+inf`` in ``S`` still make the row bad)."""
    V = vocab_size
    batch, device = base.shape[0], base.device
    masked = torch.zeros(batch, V, dtype=torch.bool, device=device)
    s = None
    for a, e, eb in zip(alphas, experts, expert_bases):
        e, eb = e[:, :V].float(), eb[:, :V].float()
        masked = masked | (e == -math.inf) | (eb == -math.inf)
        a = a.unsqueeze(1) if isinstance(a, torch.Tensor) else torch.full((), a, dtype=torch.float32, device=device)
        term = a * (e - eb)
        s = term if s is None else s + term
    s = torch.where(masked, torch.full_like(s, -math.inf), s)
    zero = torch.zeros(1, V, dtype=torch.float32, device=device).expand(batch, V)
    return s, zero


def rast_sample(
    base_logits: torch.Tensor,
    expert_logits: torch.Tensor,
    expert_base_logits: torch.Tensor,
    *,
    alpha: Param = 1.0,
    temperature: Param = 1.0,
    top_k: Param = 0,
    top_p: Param = 1.0,
    min_p: Param = 0.0,
    base_plausibility: Param = 0.0,
    vocab_size: int | None = None,
    seed: Param = 0,
    offset: Param = 0,
    out: torch.Tensor | None = None,
    return_logprobs: bool = False,
    backend: str = "auto",
):
    """Draw one token per row from ``base + alpha * (expert - expert_base)`` (or K such pairs) after temperature,
    top-k, top-p and min-p (module docstring: the exact semantics).

    Parameters
    ----------
    base_logits, expert_logits, expert_base_logits : torch.Tensor
        ``[B, V_base]``, ``[B, V_expert]``, ``[B, V_expert_base]``; float32, bfloat16 or float16 (may
        differ); one device; last dim contiguous, any row stride. Widths may differ.
        ``expert_logits`` and ``expert_base_logits`` may instead be sequences (list/tuple) of K >= 1 such
        tensors each (the same K): K expert pairs, ``z = base + sum_i alpha_i * (expert_i - expert_base_i)``.
    alpha : number, sequence of numbers, or torch.Tensor
        One pair: a number or a ``[B]`` tensor. K pairs: a number (every pair), K numbers, a ``[K]`` tensor
        or a ``[B, K]`` tensor (per row and pair).
    base_plausibility : number or torch.Tensor
        In ``[0, 1]`` (``0``: off), or a ``[B]`` tensor: keep only columns whose base-only probability is at
        least this times the base's largest (module docstring, rule 1).
    temperature, top_k, top_p, min_p, offset : number or torch.Tensor
        Python numbers, or ``[B]`` tensors on the logits' device holding per-row values. Nothing is
        read back to the host, so the call can be captured in a CUDA graph; advance an ``offset``
        tensor in place between replays for fresh draws.
    seed : int or torch.Tensor
        A ``[B]`` integer tensor on the logits' device: each row's Philox seed (as int64), used as given
        (batch-invariant: a row draws the same token wherever it sits in the batch; what the engine
        passes). A number ``s`` gives row ``b`` the seed ``mix_seed(s, b)`` (:func:`rast_kernels.ops.philox.mix_seed`, SplitMix64), so rows never
        share a stream: ``B`` copies of one row under ``seed=7`` are ``B`` independent draws. On CUDA the
        mixing happens inside the kernel (no host-to-device copy: still graph-capturable).
    vocab_size : int, optional
        Number of real token ids (default: the narrowest width). Columns at or past it are never drawn.
    out : torch.Tensor, optional
        Preallocated int64 ``[B]`` filled in place and returned.
    return_logprobs : bool
        Also return the fp32 log-probability ``[B]`` of each chosen token under the final filtered,
        renormalised distribution (0 for greedy rows).
    backend : {"auto", "triton", "cpp", "torch"}
        ``"auto"``: Triton on CUDA, the compiled C++ kernel on CPU (the reference if it is not built).
        ``"triton"`` also runs on CPU tensors under ``TRITON_INTERPRET=1``. ``"torch"``: the reference.

    Returns
    -------
    torch.Tensor or (torch.Tensor, torch.Tensor)
        Token ids int64 ``[B]`` in ``[0, vocab_size)`` or ``-1`` for a bad row; with
        ``return_logprobs`` also the fp32 ``[B]`` logprobs (NaN for a bad row).
    """
    pairs_form = isinstance(expert_logits, (list, tuple)) or isinstance(expert_base_logits, (list, tuple))
    if pairs_form:
        experts, expert_bases = _check_pairs(base_logits, expert_logits, expert_base_logits)
    else:
        _check_logits(base_logits, expert_logits, expert_base_logits)
        experts, expert_bases = [expert_logits], [expert_base_logits]
    batch, device = base_logits.shape[0], base_logits.device
    widest_allowed = min(t.shape[1] for t in [base_logits, *experts, *expert_bases])
    if vocab_size is None:
        vocab_size = widest_allowed
    elif isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral):
        raise TypeError(f"vocab_size: expected an int, got {type(vocab_size).__name__}")
    elif not 0 < vocab_size <= widest_allowed:
        raise ValueError(f"vocab_size: must be in [1, {widest_allowed}] (the narrowest logits width), got {vocab_size}")
    vocab_size = int(vocab_size)
    alphas = _check_pair_alphas(alpha, len(experts), batch, device) if pairs_form else None
    params = _SamplerArgs(**{
        name: _check_param(name, value, batch, device)
        for name, value in dict(alpha=alphas[0] if pairs_form else alpha, temperature=temperature, top_k=top_k,
                                top_p=top_p, min_p=min_p, seed=seed, offset=offset).items()
    })
    base_plausibility = _check_param("base_plausibility", base_plausibility, batch, device)
    if out is not None:
        require_tensors(out=out)
        require_like("out", out, (batch,), torch.int64, device)
    if not isinstance(return_logprobs, bool):
        raise TypeError(f"return_logprobs: expected a bool, got {type(return_logprobs).__name__}")
    backend = _resolve_backend(backend, device)

    if batch == 0:
        tokens = out if out is not None else torch.empty(0, dtype=torch.int64, device=device)
        empty_lp = torch.empty(0, dtype=torch.float32, device=device)
        return (tokens, empty_lp) if return_logprobs else tokens

    tokens = out if out is not None else torch.empty(batch, dtype=torch.int64, device=device)
    logprobs = torch.empty(batch, dtype=torch.float32, device=device) if return_logprobs else None
    _launch(backend, base_logits, experts, expert_bases, alphas if pairs_form else [params.alpha], params,
            base_plausibility, vocab_size, tokens, logprobs)
    return (tokens, logprobs) if return_logprobs else tokens


def sample_slots(base, experts: list, expert_bases: list, alpha: torch.Tensor, temperature: torch.Tensor,
                 top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor, seed: torch.Tensor,
                 offset: torch.Tensor, base_plausibility, vocab_size: int, backend: str = "auto"):
    """The engine's entry point: :func:`rast_sample` without the argument checks, for callers whose tensors are
    valid by construction (the engine's slot state; per-row values are still checked in the kernels).

    ``base [n, >= V]``, ``experts`` / ``expert_bases``: K >= 1 logit tensors each; ``alpha`` ``[n, K]`` fp32 (passed
    to the kernels as it is); ``temperature``, ``top_p``, ``min_p`` ``[n]`` fp32; ``top_k``, ``seed`` (each row's
    Philox seed, as given), ``offset`` ``[n]`` int64; ``base_plausibility`` None (off) or ``[n]`` fp32. Returns
    ``(tokens [n] int64, logprobs [n] fp32)``."""
    n, device = base.shape[0], base.device
    tokens = torch.empty(n, dtype=torch.int64, device=device)
    logprobs = torch.empty(n, dtype=torch.float32, device=device)
    if n:
        params = _SamplerArgs(alpha=None, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
                              offset=offset)
        _launch(_resolve_backend(backend, device), base, experts, expert_bases, alpha, params,
                0.0 if base_plausibility is None else base_plausibility, vocab_size, tokens, logprobs)
    return tokens, logprobs


def _alpha_column(alpha, i: int):
    """Pair ``i``'s weight: a number or a ``[B]`` tensor, from a ``[B, K]`` tensor or a list of K such entries."""
    return alpha[:, i] if isinstance(alpha, torch.Tensor) else alpha[i]


def _alpha_matrix(alpha, batch: int, device) -> torch.Tensor:
    """``alpha`` as a ``[B, K]`` fp32 tensor (a ``[B, K]`` tensor is returned as it is)."""
    if isinstance(alpha, torch.Tensor):
        return alpha
    return torch.stack([a if isinstance(a, torch.Tensor) else torch.full((batch,), a, dtype=torch.float32,
                                                                        device=device) for a in alpha], 1)


def _launch(backend: str, base, experts, expert_bases, alpha, params: _SamplerArgs, base_plausibility,
            vocab_size: int, tokens, logprobs) -> None:
    """Run the sampler on validated arguments. ``alpha``: a ``[B, K]`` tensor or a list of K numbers / ``[B]``
    tensors (``params.alpha`` is ignored); ``base_plausibility``: a number (0: off) or a ``[B]`` tensor."""
    batch, device = base.shape[0], base.device
    plausible = isinstance(base_plausibility, torch.Tensor) or base_plausibility > 0
    if len(experts) == 1 and not plausible:  # K = 1: the plain form, bit for bit
        params.alpha = _alpha_column(alpha, 0)
        _launch_single(backend, base, experts[0], expert_bases[0], params, vocab_size, tokens, logprobs)
        return
    bp = base_plausibility if isinstance(base_plausibility, torch.Tensor) else \
        torch.full((batch,), base_plausibility, dtype=torch.float32, device=device)
    if backend == "torch":
        params.alpha = _alpha_matrix(alpha, batch, device)
        t, lp = rast_sample_reference(base, experts, expert_bases, vocab_size=vocab_size, base_plausibility=bp,
                                      return_logprobs=True, **params.as_dict())
        tokens.copy_(t)
        if logprobs is not None:
            logprobs.copy_(lp)
    elif backend == "cpp":
        params.alpha = _alpha_matrix(alpha, batch, device).contiguous()
        params.seed = row_seeds(params.seed, batch, device)
        p = params.as_tensors(batch, device)
        # one pass over the 2K + 1 inputs per row (csrc/rast_sample_cpu.h: sample_row_pairs)
        _backends.cpp_module().rast_sample_pairs_cpu(
            base, experts, expert_bases, p.alpha, p.temperature, p.top_k, p.top_p, p.min_p, bp, torch.log(bp),
            p.seed, p.offset, vocab_size, tokens, logprobs)
    else:
        from .rast_sample_triton import MAX_PAIRS, rast_sample_triton
        pairs, expert, expert_base = None, experts[0], expert_bases[0]
        if len(experts) > MAX_PAIRS:
            alphas = [_alpha_column(alpha, i) for i in range(len(experts))]
            expert, expert_base = _folded_pair(base, experts, expert_bases, alphas, vocab_size)
            params.alpha = 1.0
        elif len(experts) > 1:
            pairs = (experts, expert_bases, _alpha_matrix(alpha, batch, device).contiguous())
        else:
            params.alpha = _alpha_column(alpha, 0)
        rast_sample_triton(base, expert, expert_base, params.as_dict(), vocab_size, tokens, logprobs, pairs=pairs,
                           base_plausibility=bp if plausible else None)


def _launch_single(backend: str, base, expert, expert_base, params: _SamplerArgs, vocab_size: int, tokens,
                   logprobs) -> None:
    """One expert pair, no plausibility: the single-pair kernels."""
    batch, device = base.shape[0], base.device
    if backend == "torch":
        t, lp = rast_sample_reference(base, expert, expert_base, vocab_size=vocab_size, return_logprobs=True,
                                      **params.as_dict())
        tokens.copy_(t)
        if logprobs is not None:
            logprobs.copy_(lp)
    elif backend == "triton":
        from .rast_sample_triton import rast_sample_triton
        rast_sample_triton(base, expert, expert_base, params.as_dict(), vocab_size, tokens, logprobs)
    else:
        # the C++ kernel takes [B] seeds as given: a number is mixed per row here (CPU, no device copy)
        params.seed = row_seeds(params.seed, batch, device)
        p = params.as_tensors(batch, device)
        _backends.cpp_module().rast_sample_cpu(
            base, expert, expert_base, p.alpha, p.temperature, p.top_k, p.top_p, p.min_p, p.seed, p.offset,
            vocab_size, tokens, logprobs)


def _resolve_backend(backend, device: torch.device) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend: must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and _backends.has_triton():
            return "triton"
        if device.type == "cpu" and _backends.has_cpp_cpu():
            return "cpp"
        return "torch"
    if backend == "triton":
        _backends.require_triton(device)
    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend: 'cpp' runs on CPU tensors, the logits are on {device}")
        if not _backends.has_cpp_cpu():
            raise ValueError("backend: 'cpp' requested but rast_kernels._C is not built (reinstall the package)")
    return backend
