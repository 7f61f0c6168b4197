"""The host scheduler: the waiting queue, decode slots, KV blocks, admission and preemption, as step plans.

Owns
----
* the waiting queue (arrival order; a preempted sequence goes back in its arrival position) and the
  ``num_slots`` decode slots (rows of the device state and of the captured graphs);
* the block accounting through :class:`~.block_manager.BlockAllocator`;
* :meth:`Scheduler.schedule`: the next :class:`~.plan.StepPlan` (reserve blocks for the running rows' next decode
  window, preempting the newest when the pool runs out; compact the running rows into the lowest slots; admit
  waiting sequences; decode every running row), and what the host learns back: :meth:`Scheduler.finish`,
  :meth:`Scheduler.abort`, :meth:`Scheduler.observe`.

No tensors here. The two policies are strategies (:class:`ContinuousPolicy`, :class:`StaticPolicy`):
``"continuous"`` (default) admits a waiting sequence as soon as a slot and the blocks for its tokens are free,
grows running sequences window by window and keeps them in the lowest slots so the decode step runs the smallest
batch bucket; ``"static"`` is a fixed-batch engine, the baseline ``benchmarks/bench_serving.py`` measures: a batch
is admitted only when no sequence runs, each sequence holds blocks for ``max_seq_len`` tokens from the start,
finished rows idle in place until the whole batch ends.

Invariants: a sequence's ``blocks`` cover every KV position the device may write for it (``kv_upper`` counts
those positions: the tokens at admission plus what every decode window launched since may write, lowered again
by :meth:`Scheduler.observe` once the host knows how far a row really got); a block is in the free list iff no
sequence holds it; a sequence is in at most one slot, and a slot holds at most one sequence.
"""
from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, List, Optional

from .block_manager import BlockAllocator
from .plan import DecodeWindow, PrefillGroup, SlotInit, StepPlan, kv_bucket
from .request import FINISHED, RUNNING, WAITING, Request, Sequence

__all__ = ["Admission", "ContinuousPolicy", "FINISHED", "POLICIES", "RUNNING", "Request", "Scheduler", "Sequence",
           "StaticPolicy", "WAITING"]


class ContinuousPolicy:
    """Continuous batching: rows join and leave at every step (module docstring)."""

    name = "continuous"

    def slab_tokens(self, sched: "Scheduler", num_tokens: int) -> int:
        """Token slots a sequence of ``num_tokens`` KV positions holds while it runs."""
        return num_tokens

    def admits_now(self, sched: "Scheduler") -> bool:
        return True

    def allocate_group(self, sched: "Scheduler", context: List[int], members: List[Sequence],
                       reserve: int) -> Optional["Admission"]:
        """Blocks for ``members`` prefilled from ``context``: the full context blocks are shared, each extra
        sample gets its own copy of the partial last block. None (nothing taken) unless ``reserve`` more blocks
        stay free."""
        alloc, n = sched.alloc, len(context)
        full, partial = divmod(n, alloc.block_size)
        need = full + (1 if partial else 0) + (len(members) - 1) * (1 if partial else 0)
        if need + reserve > alloc.num_free:
            return None
        owner_blocks = alloc.allocate(full + (1 if partial else 0))
        owner, copies = members[0], []
        owner.blocks = owner_blocks
        for seq in members[1:]:
            alloc.share(owner_blocks[:full])
            seq.blocks = list(owner_blocks[:full])
            if partial:
                (own,) = alloc.allocate(1)  # counted in `need`
                seq.blocks.append(own)
                copies.append((owner_blocks[full], own))
        return Admission(list(context), list(members), copies)

    def compacts(self) -> bool:
        return True

    def released_on_finish(self, sched: "Scheduler", seq: Sequence) -> List[Sequence]:
        return [seq]


class StaticPolicy(ContinuousPolicy):
    """Fixed batches: admitted together when nothing runs, full ``max_seq_len`` slabs, released together."""

    name = "static"

    def slab_tokens(self, sched: "Scheduler", num_tokens: int) -> int:
        return sched.max_seq_len

    def admits_now(self, sched: "Scheduler") -> bool:
        return sched.num_running == 0

    def allocate_group(self, sched, context, members, reserve):
        alloc = sched.alloc
        per_seq = alloc.blocks_for(sched.max_seq_len)
        if per_seq * len(members) > alloc.num_free:
            members[1:] = []  # admit as many as fit, at least try the head alone
            if per_seq > alloc.num_free:
                return None
        for seq in members:
            seq.blocks = alloc.allocate(per_seq)
        # the prefill writes the owner's blocks only: every other sample gets a copy of the context's blocks
        used = alloc.blocks_for(len(context))
        copies = [(members[0].blocks[j], seq.blocks[j]) for seq in members[1:] for j in range(used)]
        return Admission(list(context), list(members), copies)

    def compacts(self) -> bool:
        return False

    def released_on_finish(self, sched, seq):
        batch = sched.running
        return batch if all(s.status == FINISHED for s in batch) else []


POLICIES = {p.name: p for p in (ContinuousPolicy, StaticPolicy)}


@dataclass
class Admission:
    """Sequences admitted together (:meth:`Scheduler.admit`): prefilled from ``context``; ``copies`` are the
    ``(src, dst)`` block copies that give every sample but the first its own partial last block."""

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
    max_prefill_tokens : int
        Padded prompt tokens admitted per plan (one group always goes if the pool has room).
    speculative_tokens : int
        Drafted tokens per speculative round (0: plain decoding); a round may write ``k + 1`` positions per row.
    """

    def __init__(self, num_slots: int, allocator: BlockAllocator, max_seq_len: int, policy: str = "continuous",
                 *, max_prefill_tokens: int = 2048, speculative_tokens: int = 0):
        if policy not in POLICIES:
            raise ValueError(f"scheduling: must be one of {tuple(POLICIES)}, got {policy!r}")
        self.policy = policy
        self.rules = POLICIES[policy]()
        self.alloc = allocator
        self.max_seq_len = int(max_seq_len)
        self.max_prefill_tokens = int(max_prefill_tokens)
        self.speculative_tokens = int(speculative_tokens)
        self.slots: List[Optional[Sequence]] = [None] * int(num_slots)
        self.waiting: Deque[Sequence] = deque()
        self.window = 0                  # plans with a decode window so far
        self.width = 0                   # KV positions a row may write per window (set by schedule)
        self._admissions = itertools.count()
        self._deactivate: List[int] = []  # slots whose device rows must stop, for the next plan
        self._grown: dict = {}            # sequence -> its block count before this plan's reservations

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
        return self.alloc.blocks_for(self.rules.slab_tokens(self, num_tokens))

    def window_positions(self, steps: int) -> int:
        """KV positions a row may write in a window of ``steps`` steps (rounds)."""
        return steps * (self.speculative_tokens + 1)

    # ------------------------------------------------------------------ the plan
    def schedule(self, steps: int) -> StepPlan:
        """The next step's plan: the running rows get blocks for a window of ``steps`` steps (the newest are
        preempted when the pool is short), the rows are compacted, waiting sequences are admitted with room for
        their own first window, and every running row decodes (``plan`` module: the order the runner applies
        it in)."""
        self._grown = {}
        self.width = self.window_positions(steps)
        self.reserve_decode(self.width)  # preemptions queue their slots in self._deactivate
        moves = tuple(self.compact())
        groups = self.admit(self.max_prefill_tokens, self.alloc.blocks_for(self.width), window=self.width)
        admitted = [s for g in groups for s in g.sequences]
        if self.reserve_decode(self.width, admitted):  # admission left them room: cannot preempt
            raise RuntimeError("scheduler: a newly admitted sequence was preempted")
        deactivate, self._deactivate = tuple(self._deactivate), []
        updates = tuple((s.slot, j, s.blocks[j]) for s, n in self._grown.items()
                        if s.status == RUNNING and s not in admitted for j in range(n, len(s.blocks)))
        inits = tuple(SlotInit(slot=s.slot, settings=s.request.settings, seed=s.seed, n_gen=len(s.tokens),
                               pos=len(g.context), blocks=tuple(s.blocks)) for g in groups for s in g.sequences)
        prefill = tuple(PrefillGroup(tuple(g.context), tuple(g.sequences[0].blocks),
                                     tuple(s.slot for s in g.sequences), tuple(g.copies)) for g in groups)
        decode = self._decode_window(steps)
        return StepPlan(window=self.window, deactivate=deactivate, moves=moves, block_updates=updates,
                        inits=inits, prefill=prefill, decode=decode)

    def _decode_window(self, steps: int) -> Optional[DecodeWindow]:
        """Every running row decodes ``steps`` steps; ``kv_upper`` advances by what the window may write."""
        running = self.running
        if not running:
            return None
        self.window += 1
        need = max(min(s.kv_upper + self.width, s.max_kv + 1) for s in running)
        for s in running:
            s.kv_upper = min(s.kv_upper + self.width, s.max_kv)
        rows = self.active_rows()
        return DecodeWindow(rows=rows, kv_len=kv_bucket(need, self.max_seq_len), steps=steps,
                            plausibility=any(s.request.settings.base_plausibility > 0 for s in running),
                            speculative_tokens=self.speculative_tokens,
                            owners=tuple((s, s.epoch) if s is not None else None for s in self.slots[:rows]))

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
        self._grown.setdefault(seq, len(seq.blocks))
        seq.blocks.extend(got)
        return True

    def free(self, seq: Sequence) -> None:
        """Release ``seq``'s slot and blocks (it finished, was preempted or aborted)."""
        if seq.slot is not None:
            self.slots[seq.slot] = None
            seq.slot = None
        self.alloc.release(seq.blocks)
        seq.blocks = []

    def reserve_decode(self, steps: int, seqs: Optional[List[Sequence]] = None) -> List[Sequence]:
        """Before a window that may write ``steps`` more positions per row: blocks for every position the running
        sequences (or ``seqs``) may write, oldest admission first. Returns the sequences preempted to make room
        (already freed and queued again)."""
        preempted: List[Sequence] = []
        for seq in sorted(self.running if seqs is None else seqs, key=lambda s: s.admitted_at):
            if seq.status != RUNNING:  # preempted by an earlier iteration of this loop
                continue
            want = min(seq.kv_upper + steps, seq.max_kv)  # drafts past max_kv write the scratch slot
            while not self._grow(seq, want):
                victim = max((s for s in self.running if s is not seq), key=lambda s: s.admitted_at, default=None)
                if victim is None:  # cannot happen: a lone sequence always fits (checked at add_request)
                    raise RuntimeError("KV pool too small for one sequence")
                self.preempt(victim)
                preempted.append(victim)
        return preempted

    def preempt(self, seq: Sequence) -> None:
        self._deactivate.append(seq.slot)
        self.free(seq)
        seq.status = WAITING
        seq.preemptions += 1
        self._requeue(seq)

    def observe(self, seq: Sequence, fed_positions: int, windows_since: int) -> None:
        """The host read that ``seq``'s device row had written ``fed_positions`` KV positions after some window,
        and ``windows_since`` windows were launched after that one: lower ``kv_upper`` to what those may still
        write and give the blocks past it back (a speculative round reserves a position for every draft; only
        the accepted ones are kept, and the device rewrites the others before reading them)."""
        if seq.status != RUNNING:
            return
        upper = min(fed_positions + windows_since * self.width, seq.max_kv)
        if upper >= seq.kv_upper:
            return
        seq.kv_upper = upper
        keep = self.alloc.blocks_for(upper)
        if keep < len(seq.blocks):
            self.alloc.release(seq.blocks[keep:])
            del seq.blocks[keep:]

    # ------------------------------------------------------------------ admission
    def admit(self, max_prefill_tokens: int, reserve_per_running: int = 1, window: int = 0) -> List["Admission"]:
        """Waiting sequences that get a slot and blocks now, grouped for prefill (in queue order).

        Fresh samples of one request that are next to each other in the queue share one prefill. Continuous
        policy: after admission at least ``reserve_per_running`` free blocks per running sequence remain (room to
        grow in the next window; a lone group needs room for its own first ``window`` positions), and the prefill
        batch holds at most ``max_prefill_tokens`` (padded) tokens (one group is always admitted if it fits the
        pool). Static policy: only when nothing runs."""
        if not self.rules.admits_now(self):
            return []
        groups: List[Admission] = []
        width = 0  # longest context admitted so far (the prefill batch is left padded to it)
        while self.waiting:
            free_slots = [i for i, s in enumerate(self.slots) if s is None]
            if not free_slots:
                break
            members = self._next_members(len(free_slots))
            context = members[0].context()
            if groups and max(width, len(context)) * (len(groups) + 1) > max_prefill_tokens:
                break
            group = self._allocate(context, members, reserve_per_running, window)
            if group is None:
                break
            for seq in group.sequences:
                self._start(seq, free_slots.pop(0), len(context))
            width = max(width, len(context))
            groups.append(group)
        return groups

    def _allocate(self, context, members, reserve_per_running: int, window: int) -> Optional[Admission]:
        """The policy's blocks for ``members``. Beside running rows, ``reserve_per_running`` blocks per running
        row stay free; a lone group needs room for its own first ``window`` positions and gives up samples
        until it fits."""
        if self.num_running:
            return self.rules.allocate_group(self, context, members,
                                             reserve_per_running * (self.num_running + len(members)))
        n = len(context)
        grow = max(0, self.alloc.blocks_for(min(n + window, members[0].max_kv)) - self.alloc.blocks_for(n))
        while True:
            group = self.rules.allocate_group(self, context, members, grow * len(members))
            if group is not None or len(members) == 1:
                return group
            members = members[:-1]

    def _next_members(self, free: int) -> List[Sequence]:
        """The head of the queue and the fresh samples of its request right behind it (they share a prefill)."""
        head = self.waiting[0]
        members = [head]
        if not head.tokens:
            for other in itertools.islice(self.waiting, 1, None):
                if other.request is not head.request or other.tokens or len(members) == free:
                    break
                members.append(other)
        return members

    def _start(self, seq: Sequence, slot: int, context_len: int) -> None:
        self.waiting.popleft()
        seq.slot = slot
        self.slots[slot] = seq
        seq.status = RUNNING
        seq.epoch += 1
        seq.admitted_at = next(self._admissions)
        seq.kv_upper = context_len

    # ------------------------------------------------------------------ slots
    def compact(self) -> List[tuple]:
        """Continuous policy: move running sequences from high slots into free low slots so that they occupy
        ``[0, num_running)``. Returns the ``(src, dst)`` slot moves (already applied here)."""
        if not self.rules.compacts():
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

    def finish(self, seq: Sequence, deactivate: bool = False) -> List[Sequence]:
        """Mark ``seq`` finished (``deactivate``: its device row may still be decoding: a stop string, an abort);
        returns the sequences whose slot and blocks are released now: ``seq`` itself (continuous policy), or the
        whole batch once its last sequence finishes (static policy)."""
        if deactivate and seq.slot is not None:
            self._deactivate.append(seq.slot)
        seq.status = FINISHED
        batch = self.rules.released_on_finish(self, seq)
        for s in batch:
            self.free(s)
        return batch

    def abort(self, seq: Sequence) -> None:
        """Stop ``seq`` wherever it is (waiting or running); the caller sets its finish fields."""
        if seq.status == RUNNING:
            self.finish(seq, deactivate=True)
        elif seq.status == WAITING:
            self.remove_waiting(seq)
            seq.status = FINISHED
