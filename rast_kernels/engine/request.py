"""Requests and their sample sequences: the host's record of what was asked and of what is known so far.

Owns
----
* :class:`RowSettings`: a sample's sampling settings in the form the device holds them (one weight per expert
  pair, the engine's EOS ids resolved), built once per request from its
  :class:`~.sampling_params.SamplingParams`;
* :class:`Request` (a prompt, its settings, ``n`` sequences) and :class:`Sequence` (one sample: the tokens the host
  knows, its KV blocks, its decode slot, and what its output needs: logprobs, diagnostics, detokenizer state).

Host-only: no tensors. The scheduler moves sequences between the states ``WAITING -> RUNNING -> FINISHED``
(``RUNNING -> WAITING`` on preemption); the output processor appends tokens and sets the finish fields.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from .sampling_params import SamplingParams

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclass(frozen=True)
class RowSettings:
    """One sample's per-row sampler settings (what :class:`~.slot_state.SlotState` holds per slot).

    ``alpha``: one weight per expert pair (the base alone is one ``(base, base)`` pair); ``eos``: the ids that end
    the row (the request's, else the engine's defaults); ``max_new``: ``max_new_tokens``."""

    alpha: Tuple[float, ...]
    base_plausibility: float
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    max_new: int
    eos: Tuple[int, ...]

    @classmethod
    def from_params(cls, params: SamplingParams, eos, num_pairs: int) -> "RowSettings":
        return cls(alpha=params.pair_alphas(max(1, num_pairs)), base_plausibility=params.base_plausibility,
                   temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p,
                   max_new=params.max_new_tokens, eos=tuple(eos))


@dataclass(eq=False)
class Request:
    """One prompt with its settings; ``params.seed`` and ``eos`` are resolved (never None). ``settings`` is set by
    the engine when it accepts the request."""

    request_id: str
    prompt: List[int]
    params: SamplingParams
    eos: tuple
    prompt_index: int = 0
    arrival: int = 0
    sequences: List["Sequence"] = field(default_factory=list)
    settings: Optional[RowSettings] = None

    @property
    def finished(self) -> bool:
        return all(s.status == FINISHED for s in self.sequences)


@dataclass(eq=False, repr=False)
class Sequence:
    """One sample of a request: ``tokens`` are the generated ids the host knows (an ending EOS excluded)."""

    request: Request
    sample_index: int
    seed: int
    tokens: List[int] = field(default_factory=list)
    logprobs: List[float] = field(default_factory=list)
    diagnostics: List[list] = field(default_factory=list)  # per token, RastEngine(diagnostics=True) only
    blocks: List[int] = field(default_factory=list)
    slot: Optional[int] = None
    status: str = WAITING
    epoch: int = 0          # +1 at every admission: device results of an earlier stay are ignored
    kv_upper: int = 0       # KV positions the device may have written (the scheduler's invariant)
    admitted_at: int = -1   # admission counter (preemption takes the largest)
    preemptions: int = 0
    finish_reason: Optional[str] = None
    stop_reason: object = None
    error: Optional[str] = None
    detok: object = None    # the engine's incremental detokenizer state
    final_text: str = ""    # set when the sequence finishes

    def __repr__(self) -> str:
        return f"Sequence({self.request.request_id}#{self.sample_index}, {self.status}, slot={self.slot})"

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt)

    @property
    def max_kv(self) -> int:
        """KV positions this sequence can ever need: the last token is sampled, never fed back."""
        return self.prompt_len + self.request.params.max_new_tokens - 1

    def context(self) -> List[int]:
        """What a (re)admission prefills: the prompt plus the tokens generated so far."""
        return self.request.prompt + self.tokens
