"""The host scheduler: requests, their sample sequences, decode slots, blocks, admission and preemption.

Owns
----
* :class:`Request` (a prompt, its :class:`~.sampling_params.SamplingParams`, ``n`` :class:`Sequence` objects) and
  :class:`Sequence` (one sample: the tokens the host knows, its blocks, its decode slot);
* the waiting queue (arrival order; a preempted sequence goes back in its arrival position) and the
  ``num_slots`` decode slots (rows of the device state and of the captured graphs);
* the block accounting through :class:`~.cache.BlockAllocator`.

No tensors here: the engine turns the scheduler's decisions into device work.

Policies
--------
``"continuous"`` (default): a waiting sequence is admitted as soon as a slot and the blocks for its tokens are free;
running sequences get blocks ahead of each decode window (:meth:`Scheduler.reserve_decode`); when the pool runs
out, the most recently admitted running sequence is preempted (its blocks return to the pool, it waits again and
is recomputed from its prompt plus the tokens it already has); running sequences are kept in the lowest slots
(:meth:`Scheduler.compact`) so the decode step runs the smallest batch bucket that holds them.
``"static"``: the behaviour of a fixed-batch engine, kept as the baseline ``benchmarks/bench_serving.py`` measures:
a batch is admitted only when no sequence runs, each sequence holds blocks for ``max_seq_len`` tokens from the
start (a static slab), finished rows idle in place until the whole batch ends.

Invariants: a sequence's ``blocks`` cover every KV position the device may write for it
(``kv_upper`` counts those positions: the tokens at admission plus one per decode step launched since); a
block is in the free list iff no sequence holds it; a sequence is in at most one slot.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, List, Optional

from .cache import BlockAllocator
from .sampling_params import SamplingParams

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"
POLICIES = ("continuous", "static")


@dataclass(eq=False)
class Request:
    """One prompt with its settings; ``params.seed`` and ``eos`` are resolved (never None)."""

    request_id: str
    prompt: List[int]
    params: SamplingParams
    eos: tuple
    prompt_index: int = 0
    arrival: int = 0
    sequences: List["Sequence"] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(s.status == FINISHED for s in self.sequences)


@dataclass(eq=False)
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
    kv_upper: int = 0       # KV positions the device may have written (see the module invariants)
    admitted_at: int = -1   # admission counter (preemption takes the largest)
    preemptions: int = 0
    finish_reason: Optional[str] = None
    stop_reason: object = None
    error: Optional[str] = None
    detok: object = None    # the engine's incremental detokenizer state
    final_text: str = ""    # set when the sequence finishes

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


@dataclass
class PrefillGroup:
    """Sequences prefilled from one context: ``owner`` writes the blocks, the others share its full blocks and
    get a copy of its partial last block (``copies``: ``(src block, dst block)``)."""

    context: List[int]
    sequences: List[Sequence]
    copies: List[tuple] = field(default_factory=list)


class Scheduler:
    """Host scheduling state (module docstring).

    Parameters
    ----------
    num_slots : int
        Decode slots (the engine's ``max_batch_size``).
    allocator : BlockAllocator
        The shared block pool.
    max_seq_len : int
        Per-sequence limit (the static policy reserves this many token slots per sequence).
    policy : {"continuous", "static"}
    """

    def __init__(self, num_slots: int, allocator: BlockAllocator, max_seq_len: int, policy: str = "continuous"):
        if policy not in POLICIES:
            raise ValueError(f"scheduling: must be one of {POLICIES}, got {policy!r}")
        self.policy = policy
        self.alloc = allocator
        self.max_seq_len = int(max_seq_len)
        self.slots: List[Optional[Sequence]] = [None] * int(num_slots)
        self.waiting: Deque[Sequence] = deque()
        self._admissions = itertools.count()

    # ------------------------------------------------------------------ queries
    @property
    def running(self) -> List[Sequence]:
        return [s for s in self.slots if s is not None]

    @property
    def num_running(self) -> int:
        return sum(s is not None for s in self.slots)

    def active_rows(self) -> int:
        """One past the highest occupied slot (0 when none)."""
        return max((i + 1 for i, s in enumerate(self.slots) if s is not None), default=0)

    def has_work(self) -> bool:
        return bool(self.waiting) or self.num_running > 0

    def blocks_to_fit(self, num_tokens: int) -> int:
        """Blocks a lone sequence of ``num_tokens`` positions needs under this policy."""
        if self.policy == "static":
            return self.alloc.blocks_for(self.max_seq_len)
        return self.alloc.blocks_for(num_tokens)

    # ------------------------------------------------------------------ queue
    def add(self, request: Request) -> None:
        for seq in request.sequences:
            seq.status = WAITING
            self.waiting.append(seq)

    def _requeue(self, seq: Sequence) -> None:
        """Back into the waiting queue at its arrival position (ahead of later arrivals)."""
        key = (seq.request.arrival, seq.sample_index)
        for i, other in enumerate(self.waiting):
            if (other.request.arrival, other.sample_index) > key:
                self.waiting.insert(i, seq)
                return
        self.waiting.append(seq)

    def remove_waiting(self, seq: Sequence) -> None:
        self.waiting.remove(seq)

    # ------------------------------------------------------------------ blocks
    def _grow(self, seq: Sequence, positions: int) -> bool:
        """Give ``seq`` blocks covering ``positions`` KV positions; False (nothing taken) if the pool is short."""
        need = self.alloc.blocks_for(positions) - len(seq.blocks)
        if need <= 0:
            return True
        got = self.alloc.allocate(need)
        if got is None:
            return False
        seq.blocks.extend(got)
        return True

    def free(self, seq: Sequence) -> None:
        """Release ``seq``'s slot and blocks (it finished, was preempted or aborted)."""
        if seq.slot is not None:
            self.slots[seq.slot] = None
            seq.slot = None
        self.alloc.release(seq.blocks)
        seq.blocks = []

    def reserve_decode(self, steps: int) -> List[Sequence]:
        """Before a window of ``steps`` decode steps: blocks for every position the running sequences may write,
        oldest admission first. Returns the sequences preempted to make room (already freed and queued again)."""
        preempted: List[Sequence] = []
        for seq in sorted(self.running, key=lambda s: s.admitted_at):
            if seq.status != RUNNING:  # preempted by an earlier iteration of this loop
                continue
            want = min(seq.kv_upper + steps, seq.max_kv)
            while not self._grow(seq, want):
                victim = max((s for s in self.running if s is not seq), key=lambda s: s.admitted_at, default=None)
                if victim is None:  # cannot happen: a lone sequence always fits (checked at add_request)
                    raise RuntimeError("KV pool too small for one sequence")
                self.preempt(victim)
                preempted.append(victim)
        return preempted

    def preempt(self, seq: Sequence) -> None:
        self.free(seq)
        seq.status = WAITING
        seq.preemptions += 1
        self._requeue(seq)

    # ------------------------------------------------------------------ admission
    def admit(self, max_prefill_tokens: int, reserve_per_running: int = 1) -> List[PrefillGroup]:
        """Waiting sequences that get a slot and blocks now, grouped for prefill (in queue order).

        Fresh samples of one request that are next to each other in the queue share one prefill. Continuous
        policy: after admission at least ``reserve_per_running`` free blocks per running sequence remain (room to
        grow in the next window), and the prefill batch holds at most ``max_prefill_tokens`` (padded) tokens
        (one group is always admitted if it fits the pool). Static policy: only when nothing runs."""
        if self.policy == "static" and self.num_running:
            return []
        groups: List[PrefillGroup] = []
        width = 0  # longest context admitted so far (the prefill batch is left padded to it)
        while self.waiting:
            free_slots = [i for i, s in enumerate(self.slots) if s is None]
            if not free_slots:
                break
            head = self.waiting[0]
            members = [head]
            if not head.tokens:  # fresh: later fresh samples of the same request share its prefill
                for other in itertools.islice(self.waiting, 1, None):
                    if other.request is not head.request or other.tokens or len(members) == len(free_slots):
                        break
                    members.append(other)
            context = head.context()
            if groups and max(width, len(context)) * (len(groups) + 1) > max_prefill_tokens:
                break
            group = self._allocate_group(context, members, reserve=reserve_per_running * (self.num_running + len(members)))
            if group is None:
                break
            for seq in members:
                self.waiting.popleft()
                seq.slot = free_slots.pop(0)
                self.slots[seq.slot] = seq
                seq.status = RUNNING
                seq.epoch += 1
                seq.admitted_at = next(self._admissions)
                seq.kv_upper = len(context)
            width = max(width, len(context))
            groups.append(group)
        return groups

    def _allocate_group(self, context, members, reserve: int) -> Optional[PrefillGroup]:
        bs, n = self.alloc.block_size, len(context)
        if self.policy == "static":
            per_seq = self.alloc.blocks_for(self.max_seq_len)
            if per_seq * len(members) > self.alloc.num_free:
                members[1:] = []  # admit as many as fit, at least try the head alone
                if per_seq > self.alloc.num_free:
                    return None
            for seq in members:
                seq.blocks = self.alloc.allocate(per_seq)
            # the prefill writes the owner's blocks only: every other sample gets a copy of the context's blocks
            used = self.alloc.blocks_for(n)
            copies = [(members[0].blocks[j], seq.blocks[j]) for seq in members[1:] for j in range(used)]
            return PrefillGroup(context, list(members), copies)
        full, partial = divmod(n, bs)
        need = full + (1 if partial else 0) + (len(members) - 1) * (1 if partial else 0)
        # a lone group only has to fit; beside running sequences, leave them room to grow
        if need > self.alloc.num_free or (self.num_running and need + reserve > self.alloc.num_free):
            return None
        owner_blocks = self.alloc.allocate(full + (1 if partial else 0))
        if owner_blocks is None:
            return None
        owner, copies = members[0], []
        owner.blocks = owner_blocks
        for seq in members[1:]:
            self.alloc.share(owner_blocks[:full])
            seq.blocks = list(owner_blocks[:full])
            if partial:
                own = self.alloc.allocate(1)
                assert own is not None  # counted in `need`
                seq.blocks += own
                copies.append((owner_blocks[full], own[0]))
        return PrefillGroup(context, list(members), copies)

    # ------------------------------------------------------------------ slots
    def compact(self) -> List[tuple]:
        """Continuous policy: move running sequences from high slots into free low slots so that they occupy
        ``[0, num_running)``. Returns the ``(src, dst)`` slot moves (already applied here)."""
        if self.policy == "static":
            return []
        moves = []
        n = self.num_running
        free_low = [i for i in range(n) if self.slots[i] is None]
        for src in range(len(self.slots) - 1, n - 1, -1):
            seq = self.slots[src]
            if seq is None:
                continue
            dst = free_low.pop(0)
            self.slots[dst], self.slots[src] = seq, None
            seq.slot = dst
            moves.append((src, dst))
        return moves

    def finish(self, seq: Sequence) -> List[Sequence]:
        """Mark ``seq`` finished; returns the sequences whose slot and blocks are released now: ``seq`` itself
        (continuous policy), or the whole batch once its last sequence finishes (static policy)."""
        seq.status = FINISHED
        if self.policy == "static":
            batch = self.running
            if not all(s.status == FINISHED for s in batch):
                return []
        else:
            batch = [seq]
        for s in batch:
            self.free(s)
        return batch
