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

import math
import numbers
from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence, Tuple, Union

from ..ops.philox import mix_seed

MAX_EOS_IDS = 16  # EOS ids a request may list (a fixed-width device row per slot)


def sample_seed(seed: int, sample_index: int) -> int:
    """The Philox seed of sample ``sample_index`` of a request with seed ``seed`` (module docstring)."""
    return int(seed) if sample_index == 0 else mix_seed(seed, sample_index)


def _number(name, value, *, integral=False):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected {'an int' if integral else 'a number'}, got {type(value).__name__}")
    if integral and not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {value!r}")
    return int(value) if integral else float(value)


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
                raise ValueError("alpha: a list of weights must not be empty (one per expert pair)")
            alpha = tuple(_number(f"alpha[{i}]", a) for i, a in enumerate(self.alpha))
        else:
            alpha = _number("alpha", self.alpha)
        if not all(math.isfinite(a) for a in (alpha if isinstance(alpha, tuple) else (alpha,))):
            raise ValueError(f"alpha: must be finite, got {self.alpha!r}")
        plaus = _number("base_plausibility", self.base_plausibility)
        if not 0 <= plaus <= 1:
            raise ValueError(f"base_plausibility: must be in [0, 1], got {self.base_plausibility!r}")
        temperature = _number("temperature", self.temperature)
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature: must be a finite number >= 0, got {self.temperature!r}")
        top_k = _number("top_k", self.top_k, integral=True)
        if not 0 <= top_k < 2**63:  # an int64 on the device; any k >= the vocabulary is "off"
            raise ValueError(f"top_k: must be in [0, 2**63), got {self.top_k!r}")
        top_p = _number("top_p", self.top_p)
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p!r}")
        min_p = _number("min_p", self.min_p)
        if not 0 <= min_p <= 1:
            raise ValueError(f"min_p: must be in [0, 1], got {self.min_p!r}")
        max_new = _number("max_new_tokens", self.max_new_tokens, integral=True)
        if max_new < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {self.max_new_tokens!r}")
        n = _number("n", self.n, integral=True)
        if n < 1:
            raise ValueError(f"n: must be >= 1, got {self.n!r}")
        stop = self.stop
        if stop is None:
            stop = ()
        elif isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise TypeError("stop: expected None, a str or a list of str")
        if any(s == "" for s in stop):
            raise ValueError("stop: stop strings must be non-empty")
        eos = self.eos_token_id
        if eos is not None:
            if isinstance(eos, numbers.Integral) and not isinstance(eos, bool):
                eos = (eos,)
            if not isinstance(eos, (list, tuple)) or not all(
                    isinstance(e, numbers.Integral) and not isinstance(e, bool) for e in eos):
                raise TypeError("eos_token_id: expected None, an int or a list of ints ([] disables EOS)")
            if len(eos) > MAX_EOS_IDS:
                raise ValueError(f"eos_token_id: at most {MAX_EOS_IDS} ids, got {len(eos)}")
            if any(e < 0 for e in eos):
                raise ValueError(f"eos_token_id: ids must be >= 0, got {list(eos)}")
            eos = tuple(int(e) for e in eos)
        seed = self.seed
        if seed is not None:
            seed = _number("seed", seed, integral=True)
            if not -(2**63) <= seed < 2**63:
                raise ValueError(f"seed: must be an int64, got {self.seed!r}")
        if not isinstance(self.return_logprobs, bool):
            raise TypeError(f"return_logprobs: expected a bool, got {type(self.return_logprobs).__name__}")
        for name, value in dict(alpha=alpha, base_plausibility=plaus, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                max_new_tokens=max_new, n=n, stop=tuple(stop), eos_token_id=eos, seed=seed).items():
            put(name, value)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def pair_alphas(self, num_pairs: int) -> Tuple[float, ...]:
        """``alpha`` as one weight per pair for an engine with ``num_pairs`` pairs (``ValueError`` naming ``alpha``
        when a list has another length)."""
        if not isinstance(self.alpha, tuple):
            return (self.alpha,) * num_pairs
        if len(self.alpha) != num_pairs:
            raise ValueError(f"alpha: {len(self.alpha)} weights given, the engine has {num_pairs} expert pair(s)")
        return self.alpha

    def with_seed(self, seed: int) -> "SamplingParams":
        """A copy with ``seed`` set."""
        return replace(self, seed=seed)


FIELDS: Tuple[str, ...] = tuple(f.name for f in fields(SamplingParams))
