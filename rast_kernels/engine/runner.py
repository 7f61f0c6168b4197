"""The device side of the engine: :class:`StepRunner` carries out step plans.

Owns
----
* :meth:`StepRunner.execute`: one :class:`~.plan.StepPlan`, applied in the plan's order (deactivations, slot moves,
  block-table entries, admissions with their prefill, the decode window), returning a
  :class:`~.slot_state.Snapshot` of the decoded rows;
* the prefill (left-padded contexts in chunks of at most :data:`PREFILL_CHUNK_TOKENS` padded tokens, so its memory
  is bounded by the chunk, not the square of the prompt);
* the decode step (every lane reads the same token per row, one sampler call) and, with speculation, the round of
  :mod:`.speculative`; both captured in CUDA graphs, one per ``(batch bucket, length bucket, plausibility)``;
* the sampler calls for the lanes' logits (:meth:`StepRunner.sample`) and the delta diagnostics.

Invariants of a decode step (device ops only, no host reads, graph-capturable): rows ``[0, b)`` run; an inert row
(``done``) writes its K/V to the scratch slot, attends to nothing and keeps its state; an active row feeds ``tok``
at ``pos``, draws the next token with Philox offset ``n_gen`` and commits it (:meth:`~.slot_state.SlotState.commit`).
A part of the fast path that fails the first time it runs (the fused decode forward, a graph capture) raises
:class:`FastPathError` naming it and the setting that turns it off.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from ..ops.rast_sample import sample_slots
from ..ops.rast_sample_reference import combined_logits
from .lanes import KVView, Lane
from .plan import DecodeWindow, PrefillGroup, StepPlan
from .slot_state import DEFAULT_RING, SlotState, Snapshot, upload

PREFILL_CHUNK_TOKENS = 1024  # padded prompt tokens per prefill forward (its activations and mask scale with it)


class FastPathError(RuntimeError):
    """A fast-path component failed on first use; ``part`` names it and ``setting`` is the engine setting (with
    its value) that runs without it."""

    def __init__(self, part: str, setting: str, cause: BaseException):
        super().__init__(f"{part} failed on first use ({type(cause).__name__}: {cause}); the engine can run "
                         f"without it: RastEngine(..., {setting})")
        self.part, self.setting = part, setting


def delta_diagnostics(base, z, temperature, tok, vocab_size):
    """``[n, 4]`` fp32 per row (:data:`~.slot_state.DIAGNOSTICS`): whether the delta moved the argmax (1/0) of the
    base logits ``base [n, >= V]`` to that of the combined logits ``z [n, V]`` (fp32, -inf masked);
    ``KL(p_base || p_rast)`` of the two softmaxes at the row's temperature (1 for greedy rows; no filters); the
    chosen token's probability under each (0 for a row without a token). Device ops only."""
    zb = base[:, :vocab_size].float()
    t = torch.where(temperature > 0, temperature, 1.0).unsqueeze(1)
    lb = torch.log_softmax(zb / t, 1)
    lr = torch.log_softmax(z / t, 1)
    pb = lb.exp()
    # columns p_base gives no mass contribute nothing (0 * log 0 = 0), also where both are masked
    kl = torch.where(pb > 0, pb * (lb - lr), 0.0).sum(1)
    flip = (zb.argmax(1) != z.argmax(1)).float()
    idx = tok.clamp(min=0).unsqueeze(1)
    ok = (tok >= 0).float()
    return torch.stack([flip, kl, lb.gather(1, idx).squeeze(1).exp() * ok, lr.gather(1, idx).squeeze(1).exp() * ok], 1)


class StepRunner:
    """Device work of the engine (module docstring).

    Parameters
    ----------
    lanes : list[Lane]
        One per distinct model, the base first (its device samples).
    num_slots, max_blocks, block_size, max_seq_len, vocab_size : int
    use_cuda_graph : bool
        Capture the decode step per ``(batch bucket, length bucket, plausibility)`` (CUDA, lanes on one device).
    overlap_models : bool
        Run lanes 1.. on their own CUDA streams inside a plain decode step (joined before the sampler).
    diagnostics : bool
        Also record the delta diagnostics per generated token (:func:`delta_diagnostics`).
    pairs : list[tuple[int, int]]
        ``(expert lane, expert-base lane)`` per expert pair (K >= 1 entries; a lane may serve several roles).
    token_sync : callable or None
        Under tensor parallelism: ``token_sync(tok, lp)`` overwrites sampled tokens and logprobs with the TP
        leader's, in place (device collectives), so every rank's state stays identical.
    speculation : object or None
        A :class:`~.speculative.Speculation` (drafted tokens per round, drafting lanes): decode windows run
        speculative rounds instead of plain steps.
    """

    def __init__(self, lanes: List[Lane], num_slots: int, max_blocks: int, block_size: int, max_seq_len: int,
                 vocab_size: int, use_cuda_graph: bool, overlap_models: bool, diagnostics: bool = False,
                 *, pairs, token_sync=None, speculation=None):
        self.lanes = lanes
        self.pairs = list(pairs)
        self.token_sync = token_sync
        self.speculation = speculation
        self.device = lanes[0].device
        self.num_slots, self.max_blocks, self.block_size = num_slots, max_blocks, block_size
        self.max_seq_len, self.vocab_size = max_seq_len, vocab_size
        self.scratch = lanes[0].cache.scratch_slot
        self.diagnostics = diagnostics
        ring = DEFAULT_RING if speculation is None else speculation.ring_size()
        self.state = SlotState(num_slots, max_blocks, self.device, diagnostics, len(self.pairs), ring)
        self.use_cuda_graph = use_cuda_graph
        self.pad_to_buckets = use_cuda_graph  # eager runs exactly the rows it has (tests may pad on CPU)
        self.fused = all(lane.decoder is not None for lane in lanes)
        self.positions = torch.arange(max_seq_len + 64, device=self.device)
        self.overlap_models = overlap_models
        self._streams = [None] + [torch.cuda.Stream(self.device) if self.overlap_models else None for _ in lanes[1:]]
        self._graphs: dict = {}
        self._ran: set = set()  # decode keys that ran once (a failure before that is a fast-path failure)
        self._graph_pool = None
        self._workspace = None  # the sampler workspace the captured graphs point into (kept alive here)
        self.buckets = sorted({min(1 << i, num_slots) for i in range(num_slots.bit_length() + 1)})

    # ------------------------------------------------------------------ the plan
    def execute(self, plan: StepPlan) -> Optional[Snapshot]:
        """Carry out ``plan`` (the :mod:`.plan` order); a snapshot of the decoded rows when it decodes."""
        st = self.state
        st.deactivate(plan.deactivate)
        st.move(plan.moves)
        st.set_blocks(plan.block_updates)
        if plan.inits:
            st.load(plan.inits)
            plausible = any(i.settings.base_plausibility > 0 for i in plan.inits)
            self.prefill(plan.prefill, plausible)
        if plan.decode is None:
            return None
        self.decode(plan.decode)
        counters = self.speculation.counters if self.speculation is not None else None
        return st.snapshot(plan.decode.rows, (plan.window, plan.decode), counters)

    # ------------------------------------------------------------------ prefill
    def prefill(self, groups: tuple, plausibility: bool = False) -> None:
        """The prompt forwards of ``groups`` (contexts left padded into one batch, in chunks), each context's K/V
        written to its owner's blocks, shared partial blocks copied, and token ``n_gen`` sampled for every slot of
        a group from its context's last logits (the slots were loaded with ``pos = len(context)``)."""
        g, P = len(groups), max(len(gr.context) for gr in groups)
        ids, pos, slots, gather = self._prefill_layout(groups, P)
        chunk = max(1, min(P, PREFILL_CHUNK_TOKENS // g))
        cols = self.positions[:P]
        copies = [c for gr in groups for c in gr.copies]
        logits = []
        for lane in self.lanes:
            lane.use_attention()
            dev = lane.device
            l_ids, l_pos, l_slots, l_gather, l_cols = (t.to(dev, non_blocking=True)
                                                       for t in (ids, pos, slots, gather, cols))
            for c0 in range(0, P, chunk):
                p = l_pos[:, c0:c0 + chunk]
                # query at position p reads positions <= p; a padding query (p < 0) reads position 0 only, so no
                # softmax row is empty (its output is never used)
                allowed = l_cols.view(1, 1, P) <= p.clamp(min=0).unsqueeze(2)
                allowed &= (p >= 0).unsqueeze(2) | (l_cols.view(1, 1, P) == 0)
                view = KVView(l_slots[:, c0:c0 + chunk].reshape(-1), None, None, l_gather, allowed.unsqueeze(1))
                last = lane.forward(l_ids[:, c0:c0 + chunk], p.clamp(min=0), view, keep=1)
            logits.append(last[:, 0].to(self.device, non_blocking=True))
            if copies:
                lane.cache.copy_blocks(upload(torch.tensor([c[0] for c in copies]), dev),
                                       upload(torch.tensor([c[1] for c in copies]), dev))
        which = upload(torch.tensor([i for i, gr in enumerate(groups) for _ in gr.slots]), self.device)
        rows = upload(torch.tensor([s for gr in groups for s in gr.slots]), self.device)
        tok, lp, diag = self.sample([lg.index_select(0, which) for lg in logits], rows, self.state.n_gen[rows],
                                    plausibility)
        self.state.commit(rows, tok[:, None], lp[:, None], None, False, None if diag is None else diag[:, None])

    def _prefill_layout(self, groups, P: int):
        """``[g, P]`` token ids, positions (``< 0`` for the left padding) and write slots (padding: scratch) of
        the padded columns, and ``[g, P]`` the slot of each position ``0 .. P - 1`` (past a context: scratch), on
        the sampling device."""
        g, bs = len(groups), self.block_size
        ids = torch.zeros(g, P, dtype=torch.int64)
        pos = torch.arange(P, dtype=torch.int64).repeat(g, 1)
        slots = torch.full((g, P), self.scratch, dtype=torch.int64)
        gather = torch.full((g, P), self.scratch, dtype=torch.int64)
        for i, gr in enumerate(groups):
            n = len(gr.context)
            ids[i, P - n:] = torch.tensor(gr.context, dtype=torch.int64)
            pos[i] -= P - n
            t = torch.arange(n)
            gather[i, :n] = torch.tensor(gr.owner_blocks, dtype=torch.int64)[t // bs] * bs + t % bs
            slots[i, P - n:] = gather[i, :n]
        return tuple(upload(x, self.device) for x in (ids, pos, slots, gather))

    # ------------------------------------------------------------------ decode
    def decode(self, window: DecodeWindow) -> None:
        """Run ``window.steps`` decode steps (or speculative rounds) over rows ``[0, window.rows)``: graph replays
        on CUDA, else eager."""
        b = window.rows
        if self.use_cuda_graph or self.pad_to_buckets:
            b = next(x for x in self.buckets if x >= b)
        # the fused forward's paged kernel needs no length bucket in a graph (it reads each row's own blocks);
        # run eagerly, it gets the bucket too, so the PyTorch reference gathers only that many positions
        key = (b, 0 if self.fused and self.use_cuda_graph else window.kv_len, bool(window.plausibility))
        for lane in self.lanes:  # another engine sharing a model object may have switched its attention
            lane.use_attention()
        graph = self._graph(key) if self.use_cuda_graph else None
        for _ in range(window.steps):
            if graph is not None:
                graph.replay()
            else:
                self._first_use(key, lambda: self.step_rows(*key))

    def step_rows(self, b: int, gathered: int, plausibility: bool) -> None:
        """One decode step (or speculative round) of rows ``[0, b)``."""
        if self.speculation is not None:
            self.speculation.round(self, b, gathered, plausibility)
        else:
            self.plain_step(b, gathered, plausibility)

    def plain_step(self, b: int, gathered: int, plausibility: bool) -> None:
        """One lockstep decode step of rows ``[0, b)`` (module docstring: the invariants)."""
        st = self.state
        pos = st.pos[:b].unsqueeze(1)
        view = self.kv_view(b, pos, ~st.done[:b], gathered)
        ids = st.tok[:b].unsqueeze(1)
        logits = self.forward_lanes(range(len(self.lanes)), ids, pos, view)
        tok, lp, diag = self.sample([lg[:, 0] for lg in logits], slice(0, b), st.n_gen[:b], plausibility)
        st.commit(slice(0, b), tok[:, None], lp[:, None], None, True, None if diag is None else diag[:, None])

    def kv_view(self, b: int, pos: torch.Tensor, active: torch.Tensor, gathered: int,
                writable: Optional[torch.Tensor] = None) -> KVView:
        """The view of rows ``[0, b)`` feeding tokens at ``pos`` ``[b, Q]`` (consecutive positions): tokens of
        inert rows, and where ``writable`` ``[b, Q]`` is False, write the scratch slot; each active row then reads
        its first ``pos[:, -1] + 1`` positions. ``gathered``: the length bucket (0: the whole block table)."""
        st, bs = self.state, self.block_size
        table = st.block_table[:b]
        blk = table.gather(1, (pos // bs).clamp(max=self.max_blocks - 1))
        ok = active.unsqueeze(1) if writable is None else active.unsqueeze(1) & writable
        slots = torch.where(ok, blk.long() * bs + pos % bs, self.scratch).reshape(-1)
        lens = torch.where(active, pos[:, -1] + 1, 0)
        blocks = -(-gathered // bs) if gathered else self.max_blocks
        if self.fused:
            return KVView(slots, lens, table[:, :blocks])
        j = self.positions[:gathered]
        gather = table.index_select(1, (j // bs).clamp(max=self.max_blocks - 1)).long() * bs + j % bs
        valid = j.unsqueeze(0) < lens.unsqueeze(1)                                   # [b, L]
        gather = torch.where(valid, gather, self.scratch)
        # query q reads positions <= its own (one query: that is every valid position)
        mask = valid.unsqueeze(1) if pos.shape[1] == 1 else valid.unsqueeze(1) & (j.view(1, 1, -1) <= pos.unsqueeze(2))
        return KVView(slots, lens, table[:, :blocks], gather, mask.unsqueeze(1))

    def forward_lanes(self, which, ids: torch.Tensor, pos: torch.Tensor, view: KVView) -> List[torch.Tensor]:
        """Logits ``[b, Q, V]`` on the sampling device of each lane in ``which`` (indices) for the same tokens;
        lanes 1.. on side streams with ``overlap_models``."""
        out = []
        main = torch.cuda.current_stream(self.device) if self.overlap_models else None
        for i in which:
            lane, stream = self.lanes[i], self._streams[i]
            args = (ids, pos, view) if lane.device == self.device else (
                ids.to(lane.device, non_blocking=True), pos.to(lane.device, non_blocking=True), view.to(lane.device))
            if stream is None:
                out.append(lane.forward(*args).to(self.device, non_blocking=True))
                continue
            stream.wait_stream(main)  # fork: the side stream sees this step's inputs (written on main) first
            with torch.cuda.stream(stream):
                out.append(lane.forward(*args).to(self.device, non_blocking=True))
        for stream in self._streams:
            if stream is not None:
                main.wait_stream(stream)  # join before the sampler reads the logits
        return out

    # ------------------------------------------------------------------ sampling
    def sample(self, logits: list, rows, offset: torch.Tensor, plausibility: bool):
        """Tokens, logprobs (and diagnostics or None) for the rows' combined logits: ``logits`` ``[n, >= V]`` per
        lane, ``rows`` the slot of each of the ``n`` rows (a slice, or an int64 tensor, repeats allowed) whose
        settings apply, ``offset`` ``[n]`` the Philox offsets."""
        st = self.state
        base = logits[0]
        experts = [logits[e] for e, _ in self.pairs]
        expert_bases = [logits[eb] for _, eb in self.pairs]
        alpha = st.alpha[rows]
        tok, lp = sample_slots(base, experts, expert_bases, alpha, st.temperature[rows], st.top_k[rows],
                               st.top_p[rows], st.min_p[rows], st.seed[rows], offset,
                               st.base_plausibility[rows] if plausibility else None, self.vocab_size)
        if self.token_sync is not None:
            self.token_sync(tok, lp)
        diag = None
        if st.ring_diag is not None:
            z = combined_logits(base, experts, expert_bases, alpha, self.vocab_size)
            diag = delta_diagnostics(base, z, st.temperature[rows], tok, self.vocab_size)
        return tok, lp, diag

    # ------------------------------------------------------------------ graphs and first use
    @property
    def graphs_captured(self) -> int:
        """CUDA graphs captured so far (one per decode key)."""
        return len(self._graphs)

    def _first_use(self, key, fn):
        """Run ``fn``; the first time ``key`` runs, a failure is a :class:`FastPathError` when the fused decode
        forward was in it."""
        if key in self._ran or not self.fused:
            return fn()
        try:
            out = fn()
        except Exception as exc:  # a Triton compile error, an unsupported shape, ...
            raise FastPathError("the fused decode forward", "fused_decode=False", exc) from exc
        self._ran.add(key)
        return out

    def warm_up(self) -> None:
        """One decode step with every row inert (nothing changes): compiles the decode path's kernels and
        surfaces a failing fast path when the engine is built, not at the first request."""
        self._first_use(("warm-up",), lambda: self.step_rows(1, min(64, self.max_seq_len), False))

    def _graph(self, key):
        """The captured decode step for ``key`` (captured once). Warm-up and capture run with every row made inert
        (``done`` saved and restored), so they change no slot's state whatever is running."""
        if key in self._graphs:
            return self._graphs[key]
        if self._workspace is None:
            self._workspace = self._reserve_sampler_workspace()
        saved = self.state.done.clone()
        self.state.done.fill_(True)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):  # compiles the kernels and sizes transformers' / our caches' temporaries
                self._first_use(key, lambda: self.step_rows(*key))
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            # one memory pool for all of this engine's graphs: a step keeps nothing alive in it between replays
            # (all state lives in the static buffers allocated outside), and replays never overlap
            with torch.cuda.graph(graph, pool=self._graph_pool):
                self.step_rows(*key)
        except Exception as exc:
            raise FastPathError("CUDA graph capture of the decode step", "use_cuda_graph=False", exc) from exc
        self.state.done.copy_(saved)
        torch.cuda.synchronize(self.device)
        self._graphs[key] = graph
        return graph

    def _reserve_sampler_workspace(self):
        """The Triton sampler keeps one cached workspace per device and grows it when a call needs more; a captured
        graph holds its raw pointer. Size it for the largest call before the first capture and keep the buffer
        (if another caller grows the cache later, the old buffer stays alive for these graphs)."""
        try:
            from ..ops.rast_sample_triton import reserve_workspace
        except ImportError:  # no Triton: the sampler has no shared workspace
            return ()
        rows = self.buckets[-1] * (1 if self.speculation is None else self.speculation.tokens + 1)
        return reserve_workspace(rows, self.vocab_size, self.device, True)
