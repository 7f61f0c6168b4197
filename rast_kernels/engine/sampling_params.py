"""``SamplingParams``: the one typed home of a request's settings, validated once when it is made.

A request is a prompt plus its settings; the engine copies them into its per-slot device state (one row per
sample) and :func:`rast_kernels.rast_sample` reads them there, so nothing is validated again per step.

Seeds (how a sample's random stream is derived; :func:`sample_seed`):

* a request with ``seed=s`` draws sample ``j`` with the Philox seed ``sample_seed(s, j)``: ``s`` itself for
  ``j = 0`` and ``mix_seed(s, j)`` (:func:`rast_kernels.ops.philox.mix_seed`) for ``j >= 1``; the sampler's
  offset is the index of the generated token. So ``SamplingParams(seed=sample_seed(s, j), n=1)`` reproduces
  sample ``j`` of ``SamplingParams(seed=s, n=k)`` alone, token for token.
* ``seed=None`` is resolved by the caller: :meth:`RastEngine.generate` gives prompt ``i`` the seed
  ``mix_seed(seed, i)`` of its ``seed`` keyword (default 0); :meth:`RastEngine.add_request` gives the ``r``-th
  request of the engine's life the seed ``mix_seed(0, r)``.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence, Tuple, Union

from ..ops.philox import mix_seed
from ..params import ParamError, ParamTypeError, check_param

MAX_EOS_IDS = 16  # EOS ids a request may list (a fixed-width device row per slot)


def sample_seed(seed: int, sample_index: int) -> int:
    """The Philox seed of sample ``sample_index`` of a request with seed ``seed`` (module docstring)."""
    return int(seed) if sample_index == 0 else mix_seed(seed, sample_index)


def _stop_strings(stop) -> tuple:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or not all(isinstance(x, str) for x in stop):
        raise ParamTypeError("stop", "expected None, a str or a list of str")
    if any(x == "" for x in stop):
        raise ParamError("stop", "stop strings must be non-empty")
    return tuple(stop)


def _eos_ids(eos) -> Optional[tuple]:
    if eos is None:
        return None
    if isinstance(eos, numbers.Integral) and not isinstance(eos, bool):
        eos = (eos,)
    if not isinstance(eos, (list, tuple)) or not all(
            isinstance(e, numbers.Integral) and not isinstance(e, bool) for e in eos):
        raise ParamTypeError("eos_token_id", "expected None, an int or a list of ints ([] disables EOS)")
    if len(eos) > MAX_EOS_IDS:
        raise ParamError("eos_token_id", f"at most {MAX_EOS_IDS} ids, got {len(eos)}")
    if any(e < 0 for e in eos):
        raise ParamError("eos_token_id", f"ids must be >= 0, got {list(eos)}")
    return tuple(int(e) for e in eos)


@dataclass(frozen=True)
class SamplingParams:
    """A request's settings (all validated at construction; a bad value raises naming the field).

    Attributes
    ----------
    alpha : float or sequence of float
        Weight of the expert's delta: ``z = z_base + alpha * (z_expert - z_expert_base)`` (finite). With K expert
        pairs, ``z = z_base + sum_i alpha_i * (z_expert_i - z_expert_base_i)``: one number for every pair, or K
        numbers (stored as a tuple; the engine checks the length against its pairs).
    temperature : float
        ``>= 0``; ``0`` is greedy (the filters and the seed are then irrelevant).
    top_k : int
        ``>= 0``; ``0`` is off.
    top_p : float
        In ``(0, 1]``; ``1`` is off.
    min_p : float
        In ``[0, 1]``; ``0`` is off.
    max_new_tokens : int
        ``>= 1``: tokens to generate at most per sample.
    stop : str, sequence of str or None
        Stop strings (non-empty): a sample ends once its text contains one; the text is cut before it.
    eos_token_id : int, sequence of int or None
        Ids that end a sample (not included in the output); None: the engine's default (the tokenizer's EOS and
        the base model's ``generation_config.eos_token_id``); ``[]`` disables EOS stopping. At most 16 ids.
    seed : int or None
        The request's int64 seed (module docstring: how each sample's stream derives from it).
    n : int
        ``>= 1`` samples of the prompt; the prompt is prefilled once for samples admitted together.
    return_logprobs : bool
        Fill :attr:`GenerationOutput.logprobs`.
    base_plausibility : float
        In ``[0, 1]``; ``0`` is off. Keep only tokens whose probability under the base model alone (softmax at
        temperature 1) is at least this fraction of the base's most probable token's, before temperature and the
        filters (contrastive decoding's plausibility constraint; :func:`rast_kernels.rast_sample`).
    """

    alpha: Union[float, Sequence[float]] = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    max_new_tokens: int = 256
    stop: Union[None, str, Sequence[str]] = None
    eos_token_id: Union[None, int, Sequence[int]] = None
    seed: Optional[int] = None
    n: int = 1
    return_logprobs: bool = False
    base_plausibility: float = 0.0

    def __post_init__(self):
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 - frozen dataclass
        if isinstance(self.alpha, (list, tuple)):
            if not self.alpha:
                raise ParamError("alpha", "a list of weights must not be empty (one per expert pair)")
            alphas = []
            for i, a in enumerate(self.alpha):
                if isinstance(a, bool) or not isinstance(a, numbers.Real):
                    raise ParamTypeError(f"alpha[{i}]", f"expected a number, got {type(a).__name__}")
                alphas.append(check_param("alpha", a, "alpha"))  # a range error names the whole list's field
            put("alpha", tuple(alphas))
        else:
            put("alpha", check_param("alpha", self.alpha))
        for name in ("base_plausibility", "temperature", "top_k", "top_p", "min_p", "max_new_tokens", "n"):
            put(name, check_param(name, getattr(self, name)))
        if self.seed is not None:
            put("seed", check_param("seed", self.seed))
        put("stop", _stop_strings(self.stop))
        put("eos_token_id", _eos_ids(self.eos_token_id))
        if not isinstance(self.return_logprobs, bool):
            raise ParamTypeError("return_logprobs", f"expected a bool, got {type(self.return_logprobs).__name__}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def pair_alphas(self, num_pairs: int) -> Tuple[float, ...]:
        """``alpha`` as one weight per pair for an engine with ``num_pairs`` pairs (``ValueError`` naming ``alpha``
        when a list has another length)."""
        if not isinstance(self.alpha, tuple):
            return (self.alpha,) * num_pairs
        if len(self.alpha) != num_pairs:
            raise ParamError("alpha", f"{len(self.alpha)} weights given, the engine has {num_pairs} expert pair(s)")
        return self.alpha

    def with_seed(self, seed: int) -> "SamplingParams":
        """A copy with ``seed`` set."""
        return replace(self, seed=seed)


FIELDS: Tuple[str, ...] = tuple(f.name for f in fields(SamplingParams))
