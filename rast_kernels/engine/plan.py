"""The step contract: :class:`StepPlan`, everything the device must do in one engine step, as a value.

The scheduler makes a plan (:meth:`~.scheduler.Scheduler.schedule`), the runner carries it out
(:meth:`~.runner.StepRunner.execute`) and returns a snapshot of the decoded rows, and the output processor turns
snapshots into outputs. A plan holds plain numbers and tuples only (and, for the host's own bookkeeping, which
sequence owns each decoded row), so it can be printed, compared in tests and replayed against a fake runner.

The runner applies a plan's parts in this order, which the scheduler relies on:

1. ``deactivate``: slots whose rows must stop (stop string, abort, preemption); their device rows become inert;
2. ``moves``: compaction, ``(src, dst)`` slot copies of every per-slot row;
3. ``block_updates``: ``(slot, logical block, physical block)`` entries of grown block tables (slots after the
   moves);
4. ``inits`` and ``prefill``: newly admitted sequences' slot rows, then their prompt forwards (one token sampled
   per admitted sequence);
5. ``decode``: a window of ``steps`` decode steps (or speculative rounds) over rows ``[0, rows)``.

Invariant (what the scheduler guarantees): every KV position the device may write in this plan lies in blocks the
writing sequence holds, and no slot holds two sequences.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from .request import RowSettings, Sequence


@dataclass(frozen=True)
class SlotInit:
    """The initial device row of an admitted sequence: its settings, its Philox seed, ``n_gen`` (tokens generated
    so far, the sampler's next offset), ``pos`` (the context length: where the token sampled by the prefill goes)
    and its block table."""

    slot: int
    settings: RowSettings
    seed: int
    n_gen: int
    pos: int
    blocks: Tuple[int, ...]


@dataclass(frozen=True)
class PrefillGroup:
    """Sequences prefilled from one context: its K/V go to ``owner_blocks``; ``slots`` (the owner's first) each
    get a token sampled from the context's last logits; ``copies`` are ``(src, dst)`` block copies that give the
    other samples their own copy of a shared partial last block."""

    context: Tuple[int, ...]
    owner_blocks: Tuple[int, ...]
    slots: Tuple[int, ...]
    copies: Tuple[Tuple[int, int], ...] = ()


@dataclass(frozen=True)
class DecodeWindow:
    """``steps`` decode steps over rows ``[0, rows)`` (speculative rounds of ``speculative_tokens`` drafts when
    that is > 0). ``kv_len``: a :func:`kv_bucket` covering every position a row may read in the window;
    ``plausibility``: some row has a base plausibility above 0; ``owners[i]``: ``(sequence, epoch)`` of slot ``i``
    (None for an empty slot), for reading the snapshot back."""

    rows: int
    kv_len: int
    steps: int
    plausibility: bool
    speculative_tokens: int = 0
    owners: Tuple[Optional[Tuple[Sequence, int]], ...] = ()


@dataclass(frozen=True)
class StepPlan:
    """One engine step (module docstring: the order of its parts). ``window`` numbers the plans that decode."""

    window: int = 0
    deactivate: Tuple[int, ...] = ()
    moves: Tuple[Tuple[int, int], ...] = ()
    block_updates: Tuple[Tuple[int, int, int], ...] = ()
    inits: Tuple[SlotInit, ...] = ()
    prefill: Tuple[PrefillGroup, ...] = ()
    decode: Optional[DecodeWindow] = None

    @property
    def empty(self) -> bool:
        return not (self.deactivate or self.moves or self.block_updates or self.inits or self.decode)


def kv_bucket(need: int, max_seq_len: int) -> int:
    """Gathered cache length for a decode window needing ``need`` positions: the next power of two (>= 64),
    capped at ``max_seq_len``. Graph and eager paths use the same value, so they do the same math."""
    return min(max_seq_len, max(64, 1 << (max(need, 1) - 1).bit_length()))
