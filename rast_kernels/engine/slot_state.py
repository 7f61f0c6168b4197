"""The per-slot device state of the engine, how tokens are committed to it, and the host's snapshots of it.

Owns
----
* :class:`SlotState`: one row per decode slot, ``[num_slots]`` tensors on the sampling device (the base model's):
  the sampler settings of each row (``alpha`` ``[num_slots, K]``: one weight per expert pair), the token to feed
  next and its position, ``n_gen`` (tokens generated = the sampler's Philox offset of the next token), the finish
  state, the block table ``[num_slots, max_blocks]`` int32 shared by every model, and a ring
  ``[num_slots, ring + 1]`` of the last tokens / logprobs (/ delta diagnostics) for the host to read (column
  ``ring`` is scratch: inert rows and tokens that are not kept write there);
* :meth:`SlotState.commit`: the one bookkeeping rule for sampled tokens (prefill, decode step, speculative round);
* :class:`Snapshot`: a host copy of some rows' counts, finish state and ring;
* :func:`upload`: every host-to-device write of the engine (pinned memory, non-blocking on CUDA: ``step()`` never
  waits for the GPU).

Invariants: an inert row (``done``) keeps its state whatever runs; rows only change through :meth:`load`,
:meth:`commit`, :meth:`deactivate` and :meth:`move` (device ops only, no host reads: graph-capturable).
"""
from __future__ import annotations

from typing import List, Optional

import torch

from .plan import SlotInit
from .sampling_params import MAX_EOS_IDS

# per-row finish codes held on the device
RUNNING, EOS, LENGTH, ERROR = 0, 1, 2, 3
DEFAULT_RING = 64  # tokens a row may produce between two host reads (plain decoding)
# per-token delta diagnostics (RastEngine(diagnostics=True)), in ring order; see .decode.delta_diagnostics
DIAGNOSTICS = ("argmax_flip", "kl_base_rast", "p_base", "p_rast")


def upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` (a CPU tensor) on ``device``: pinned and non-blocking on CUDA (the copy is stream-ordered and the
    host does not wait; PyTorch's pinned-memory allocator keeps the buffer until the copy has run)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


class SlotState:
    """The per-slot device buffers (module docstring), ``[num_slots]`` unless noted."""

    def __init__(self, num_slots: int, max_blocks: int, device, diagnostics: bool = False, num_pairs: int = 1,
                 ring: int = DEFAULT_RING):
        f32 = dict(dtype=torch.float32, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        self.device, self.ring = torch.device(device), int(ring)
        self.alpha = torch.zeros((num_slots, num_pairs), **f32)
        self.temperature, self.top_p = torch.zeros(num_slots, **f32), torch.zeros(num_slots, **f32)
        self.min_p, self.base_plausibility = torch.zeros(num_slots, **f32), torch.zeros(num_slots, **f32)
        self.top_k, self.seed, self.max_new = (torch.zeros(num_slots, **i64) for _ in range(3))
        self.n_gen, self.tok, self.pos = (torch.zeros(num_slots, **i64) for _ in range(3))
        self.finish, self.err_step = torch.zeros(num_slots, **i64), torch.zeros(num_slots, **i64)
        self.done = torch.ones(num_slots, dtype=torch.bool, device=device)  # empty slots are inert
        self.eos = torch.full((num_slots, MAX_EOS_IDS), -2, **i64)  # -2 never matches
        self.block_table = torch.zeros((num_slots, max_blocks), dtype=torch.int32, device=device)
        self.ring_tok = torch.full((num_slots, self.ring + 1), -1, **i64)
        self.ring_lp = torch.zeros((num_slots, self.ring + 1), **f32)
        self.ring_diag = torch.zeros((num_slots, self.ring + 1, len(DIAGNOSTICS)), **f32) if diagnostics else None
        self.slot_index = torch.arange(num_slots, device=device)           # (constants the steps index with)
        self.token_index = torch.arange(self.ring, device=device)

    def per_slot(self) -> List[torch.Tensor]:
        """Every per-slot tensor (what a slot move copies)."""
        extra = [self.ring_diag] if self.ring_diag is not None else []
        return [self.alpha, self.temperature, self.top_p, self.min_p, self.base_plausibility, self.top_k, self.seed,
                self.max_new, self.n_gen, self.tok, self.pos, self.finish, self.err_step] + [
                self.done, self.eos, self.block_table, self.ring_tok, self.ring_lp] + extra

    # ------------------------------------------------------------------ host -> device
    def load(self, inits: List[SlotInit]) -> None:
        """Initialise the rows of newly admitted sequences (their settings, seed, counts and block table)."""
        dev = self.device
        idx = upload(torch.tensor([i.slot for i in inits], dtype=torch.int64), dev)
        settings = [i.settings for i in inits]
        rows = [(self.alpha, [s.alpha for s in settings]), (self.temperature, [s.temperature for s in settings]),
                (self.top_p, [s.top_p for s in settings]), (self.min_p, [s.min_p for s in settings]),
                (self.base_plausibility, [s.base_plausibility for s in settings]),
                (self.top_k, [s.top_k for s in settings]), (self.max_new, [s.max_new for s in settings]),
                (self.seed, [i.seed for i in inits]), (self.n_gen, [i.n_gen for i in inits]),
                (self.pos, [i.pos for i in inits]), (self.tok, [0] * len(inits)),
                (self.finish, [RUNNING] * len(inits)), (self.err_step, [-1] * len(inits)),
                (self.done, [False] * len(inits))]
        for t, values in rows:
            t.index_copy_(0, idx, upload(torch.tensor(values, dtype=t.dtype), dev))
        eos = torch.full((len(inits), MAX_EOS_IDS), -2, dtype=torch.int64)
        table = torch.zeros((len(inits), self.block_table.shape[1]), dtype=torch.int32)
        for r, i in enumerate(inits):
            eos[r, :len(i.settings.eos)] = torch.tensor(i.settings.eos, dtype=torch.int64)
            table[r, :len(i.blocks)] = torch.tensor(i.blocks, dtype=torch.int32)
        self.eos.index_copy_(0, idx, upload(eos, dev))
        self.block_table.index_copy_(0, idx, upload(table, dev))

    def set_blocks(self, updates) -> None:
        """Block-table entries ``(slot, logical block, physical block)`` of sequences that grew."""
        if updates:
            rows, cols, vals = (torch.tensor(x, dtype=torch.int64) for x in zip(*updates))
            self.block_table.index_put_((upload(rows, self.device), upload(cols, self.device)),
                                        upload(vals.to(torch.int32), self.device))

    def deactivate(self, slots) -> None:
        """Make ``slots`` inert (stream-ordered after any queued step)."""
        if slots:
            self.done.index_fill_(0, upload(torch.tensor(slots, dtype=torch.int64), self.device), True)

    def move(self, moves) -> None:
        """Copy every per-slot row ``src -> dst`` for ``(src, dst)`` in ``moves``; the sources become empty."""
        if moves:
            both = upload(torch.tensor(moves, dtype=torch.int64), self.device)
            src, dst = both[:, 0], both[:, 1]
            for t in self.per_slot():
                t.index_copy_(0, dst, t.index_select(0, src))
            self.done.index_fill_(0, src, True)

    # ------------------------------------------------------------------ tokens
    def commit(self, rows, tok: torch.Tensor, lp: torch.Tensor, count: Optional[torch.Tensor], advance: bool,
               diag: Optional[torch.Tensor] = None) -> None:
        """Commit up to ``T`` sampled tokens per row (device ops only).

        ``rows``: a slice ``[0, b)`` or an int64 tensor of slots; ``tok`` / ``lp``: ``[b, T]`` candidate tokens in
        order (``-1``: the sampler rejected the row there) and their logprobs; ``count``: ``[b]`` how many of
        them are proposed (None: all ``T``); ``advance``: positions move on by the tokens kept (a decode step or
        round; a prefill leaves ``pos`` at the context length, where its token goes); ``diag``: ``[b, T, 4]``.
        For each active row the tokens are kept in order until the first that ends it: an EOS id (kept,
        finish ``EOS``), the ``max_new``-th token (kept, ``LENGTH``, an EOS wins at the same token) or a ``-1``
        (not kept, ``ERROR``, ``err_step`` = its token index). Kept tokens go to the ring at ``n_gen % ring`` in
        order; ``n_gen`` (and ``pos`` when advancing) grow by their number; ``tok`` becomes the last one."""
        b, T = tok.shape
        n_gen, done = self.n_gen[rows], self.done[rows]
        t = self.token_index[:T]
        live = ~done.unsqueeze(1)
        if count is not None:
            live = live & (t < count.unsqueeze(1))
        bad = tok < 0  # never equal to an EOS id (padded with -2) either
        eos = (tok.unsqueeze(2) == self.eos[rows].unsqueeze(1)).any(2)
        length = n_gen.unsqueeze(1) + t + 1 >= self.max_new[rows].unsqueeze(1)
        stop = live & (bad | eos | length)
        if T > 1:  # only up to the first stop (one token: it is the first)
            first = stop.cumsum(1) <= stop.long()
            stop, live = stop & first, live & first
        keep = live & ~bad                                             # [b, T] tokens kept
        kept = keep.sum(1)
        code = (torch.where(bad, ERROR, torch.where(eos, EOS, LENGTH)) * stop).sum(1)
        index = self.slot_index[rows] if isinstance(rows, slice) else rows
        col = torch.where(keep, (n_gen.unsqueeze(1) + t) % self.ring, self.ring)  # not kept: the scratch column
        rows2 = index.unsqueeze(1).expand(b, T)
        self.ring_tok.index_put_((rows2, col), tok)
        self.ring_lp.index_put_((rows2, col), lp)
        if self.ring_diag is not None and diag is not None:
            self.ring_diag.index_put_((rows2, col), diag)
        last = tok[:, 0] if T == 1 else tok.gather(1, (kept - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        # every value is computed before the first write: with a slice, the reads above are views of these rows
        errored = (stop & bad).any(1)
        new_err_step = torch.where(errored, n_gen + (stop.long() * t).sum(1), self.err_step[rows])
        new_finish = torch.where(code > 0, code, self.finish[rows])
        new_tok = torch.where(kept > 0, last, self.tok[rows])
        new_pos = self.pos[rows] + kept if advance else None
        self.err_step[rows] = new_err_step
        self.finish[rows] = new_finish
        self.n_gen[rows] = n_gen + kept
        self.tok[rows] = new_tok
        self.done[rows] = done | (code > 0)
        if advance:
            self.pos[rows] = new_pos

    # ------------------------------------------------------------------ device -> host
    def snapshot(self, rows: int, window, counters: Optional[torch.Tensor] = None) -> "Snapshot":
        """Start copying rows ``[0, rows)``'s counts, finish state and ring to the host (non-blocking on CUDA);
        ``window``: the :class:`~.plan.DecodeWindow` (its owners) and its number, for reading it back;
        ``counters``: a small device tensor copied along (the speculative rounds' running totals)."""
        r = self.ring
        ints = torch.cat([self.n_gen[:rows, None], self.done[:rows, None].long(), self.finish[:rows, None],
                          self.err_step[:rows, None], self.ring_tok[:rows, :r]], 1)
        diag = self.ring_diag[:rows, :r] if self.ring_diag is not None else None
        parts = [ints, self.ring_lp[:rows, :r], diag, counters]
        if self.device.type != "cuda":
            return Snapshot(*[None if p is None else p.clone() for p in parts], None, window, r)
        host = []
        for p in parts:
            if p is None:
                host.append(None)
                continue
            h = torch.empty(p.shape, dtype=p.dtype, pin_memory=True)
            h.copy_(p, non_blocking=True)
            host.append(h)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return Snapshot(*host, event, window, r)


class Snapshot:
    """A host copy of some rows' ``[n_gen, done, finish, err_step, ring...]`` (``ints``), ring logprobs (``lps``),
    diagnostics and ``counters`` (None where absent), taken in stream order after a decode window
    (``window``: ``(number, DecodeWindow)``)."""

    def __init__(self, ints, lps, diag, counters, event, window, ring: int):
        self.ints, self.lps, self.diag, self.counters = ints, lps, diag, counters
        self.event, self.window, self.ring = event, window, ring

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def read(self):
        """``(ints, lps, diag, counters)`` as lists (None where absent); waits for the copy on CUDA."""
        if self.event is not None:
            self.event.synchronize()
        return tuple(None if p is None else p.tolist() for p in (self.ints, self.lps, self.diag, self.counters))
