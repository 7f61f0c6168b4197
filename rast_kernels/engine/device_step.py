"""The device side of the engine: per-slot state, the models' lanes, prefill, the decode step and its CUDA graphs.

Owns
----
* :class:`SlotState`: one row per decode slot, ``[num_slots]`` tensors on the sampling device (the base model's):
  the sampling parameters copied from each sequence's :class:`~.sampling_params.SamplingParams` (validated once,
  on the host; ``alpha`` is ``[num_slots, K]``, one weight per expert pair), the token to feed and its position, the generated count (= the sampler's Philox offset: the index
  of the next token), the finish state, the block table ``[num_slots, max_blocks]`` int32 shared by every model,
  and a ring ``[num_slots, RING + 1]`` of the last tokens/logprobs for the host to read (column ``RING`` is
  scratch: inert rows write there).
* :class:`Lane`: one model, its :class:`~.cache.PagedKVCache`, and its decode forward (the engine's
  :class:`~.fused_decode.FusedDecoder` over the pools, or transformers' forward over a gathered view).
* :class:`StepRunner`: prefill of admitted sequences, the decode step (the function the CUDA graphs capture, one
  per ``(batch bucket, gathered length)``), slot moves, snapshots for the host, and the sampler workspace the
  graphs point into.

Invariants of the decode step (device ops only, no host reads, graph-capturable): rows ``[0, b)`` run; a row with
``done`` set is inert (writes its K/V to the scratch slot, attends to nothing, keeps its state); an active row feeds
``tok`` at ``pos``, writes its K/V at the block-table slot of ``pos``, draws the next token with Philox offset
``n_gen`` and advances ``pos`` and ``n_gen``; EOS, ``max_new`` or a sampler error set ``done`` and ``finish``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from ..ops.rast_sample import rast_sample
from ..ops.rast_sample_reference import combined_logits
from .cache import PagedKVCache
from .fused_decode import FusedDecoder
from .loading import cache_kwarg, set_attn_implementation
from .sampling_params import MAX_EOS_IDS

# per-row finish codes held on the device
RUNNING, EOS, LENGTH, ERROR = 0, 1, 2, 3
RING = 64  # tokens a row may produce between two host reads (a poll window plus one deferred window, and more)
# per-token delta diagnostics (RastEngine(diagnostics=True)), in ring order; see delta_diagnostics
DIAGNOSTICS = ("argmax_flip", "kl_base_rast", "p_base", "p_rast")


def delta_diagnostics(base, z, temperature, tok, vocab_size):
    """``[b, 4]`` fp32 per row (:data:`DIAGNOSTICS`): whether the delta moved the argmax (1/0) of the base logits
    ``base [b, >= V]`` to that of the combined logits ``z [b, V]`` (fp32, -inf masked); ``KL(p_base || p_rast)``
    of the two softmaxes at the row's temperature (1 for greedy rows: no filters); the chosen token's probability
    under each (0 for a row without a token). Device ops only (graph-capturable)."""
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


class SlotState:
    """The per-slot device buffers (module docstring), ``[num_slots]`` unless noted."""

    FLOAT = ("temperature", "top_p", "min_p", "base_plausibility")
    INT = ("top_k", "seed", "n_gen", "max_new", "tok", "pos", "finish", "err_step")

    def __init__(self, num_slots: int, max_blocks: int, device, diagnostics: bool = False, num_pairs: int = 1):
        self.alpha = torch.zeros((num_slots, num_pairs), dtype=torch.float32, device=device)
        for name in self.FLOAT:
            setattr(self, name, torch.zeros(num_slots, dtype=torch.float32, device=device))
        for name in self.INT:
            setattr(self, name, torch.zeros(num_slots, dtype=torch.int64, device=device))
        self.done = torch.ones(num_slots, dtype=torch.bool, device=device)  # empty slots are inert
        self.eos = torch.full((num_slots, MAX_EOS_IDS), -2, dtype=torch.int64, device=device)  # -2 never matches
        self.block_table = torch.zeros((num_slots, max_blocks), dtype=torch.int32, device=device)
        self.ring_tok = torch.full((num_slots, RING + 1), -1, dtype=torch.int64, device=device)
        self.ring_lp = torch.zeros((num_slots, RING + 1), dtype=torch.float32, device=device)
        # delta diagnostics per generated token (DIAGNOSTICS order), only when the engine asks for them
        self.ring_diag = torch.zeros((num_slots, RING + 1, len(DIAGNOSTICS)), dtype=torch.float32,
                                     device=device) if diagnostics else None

    def per_slot(self):
        """Every per-slot tensor (what a slot move copies)."""
        extra = [self.ring_diag] if self.ring_diag is not None else []
        return [self.alpha] + [getattr(self, n) for n in self.FLOAT + self.INT] + [self.done, self.eos, self.block_table,
                                                                     self.ring_tok, self.ring_lp] + extra


@dataclass
class Lane:
    """One model of the engine with its paged cache and decode forward."""

    role: str
    model: torch.nn.Module
    device: torch.device
    cache: PagedKVCache
    attn: str                # the model's attention implementation (transformers' forward)
    cache_arg: str           # the keyword its forward takes the cache under
    logits_to_keep: bool     # its forward accepts logits_to_keep
    decoder: Optional[FusedDecoder] = None  # the engine's fused decode forward, else transformers'


def kv_geometry(model):
    """``(num_layers, kv_heads, head_dim)`` of a causal LM from its (text) config."""
    cfg = model.config
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    layers = getattr(cfg, "num_hidden_layers", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if layers is None or heads is None:
        raise ValueError("config has no num_hidden_layers / num_attention_heads")
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return int(layers), int(kv), int(head_dim)


def make_lane(role: str, model, device, attn: str, num_blocks: int, block_size: int, max_seq_len: int,
              fused: bool) -> Lane:
    """A lane with its pools allocated (zeros) in the model's dtype on ``device``."""
    import inspect

    layers, kv, head_dim = kv_geometry(model)
    cache = PagedKVCache(layers, num_blocks, block_size, max_seq_len)
    cache.allocate(kv, head_dim, next(model.parameters()).dtype, device)
    return Lane(role=role, model=model, device=device, cache=cache, attn=attn, cache_arg=cache_kwarg(model),
                logits_to_keep="logits_to_keep" in inspect.signature(model.forward).parameters,
                decoder=FusedDecoder(model) if fused else None)


def kv_bucket(need: int, max_seq_len: int) -> int:
    """Gathered cache length for a decode window needing ``need`` positions: the next power of two (>= 64),
    capped at ``max_seq_len``. Graph and eager paths use the same value, so they do the same math."""
    return min(max_seq_len, max(64, 1 << (max(need, 1) - 1).bit_length()))


class Snapshot:
    """A host copy of rows ``[0, b)``'s counts, finish state and ring, taken in stream order; ``owners[i]`` is
    ``(sequence, epoch)`` of slot ``i`` when it was taken."""

    def __init__(self, ints: torch.Tensor, lps: torch.Tensor, event, owners: list, diag=None):
        self.ints, self.lps, self.event, self.owners, self.diag = ints, lps, event, owners, diag

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def read(self):
        """``(ints, lps, diag)`` as lists: ints rows are ``[n_gen, done, finish, err_step, ring...]``; diag rows
        ``[RING][len(DIAGNOSTICS)]`` (None without diagnostics)."""
        if self.event is not None:
            self.event.synchronize()
        return self.ints.tolist(), self.lps.tolist(), (self.diag.tolist() if self.diag is not None else None)


class StepRunner:
    """Device work of the engine (module docstring).

    Parameters
    ----------
    lanes : list[Lane]
        One per distinct model, the base first (its device samples).
    num_slots, max_blocks, block_size, max_seq_len, vocab_size : int
    use_cuda_graph : bool
        Capture the decode step per ``(batch bucket, gathered length)`` (CUDA, all lanes on one device).
    overlap_models : bool
        Run lanes 1.. on their own CUDA streams inside the step (joined before the sampler).
    diagnostics : bool
        Also record :data:`DIAGNOSTICS` per generated token (:func:`delta_diagnostics`).
    pairs : list[tuple[int, int]]
        ``(expert lane, expert-base lane)`` per expert pair (K >= 1 entries; a lane may serve several roles).
    token_sync : callable or None
        Under tensor parallelism: ``token_sync(tok, lp)`` overwrites the sampled tokens and log-probabilities
        with the TP leader's, in place (device collectives), so every rank's state stays identical.
    """

    def __init__(self, lanes: List[Lane], num_slots: int, max_blocks: int, block_size: int, max_seq_len: int,
                 vocab_size: int, use_cuda_graph: bool, overlap_models: bool, diagnostics: bool = False,
                 *, pairs, token_sync=None):
        self.lanes = lanes
        self.pairs = list(pairs)
        self.token_sync = token_sync
        self.device = lanes[0].device
        self.num_slots, self.max_blocks, self.block_size = num_slots, max_blocks, block_size
        self.max_seq_len, self.vocab_size = max_seq_len, vocab_size
        self.scratch = lanes[0].cache.scratch_slot
        self.diagnostics = diagnostics
        self.state = SlotState(num_slots, max_blocks, self.device, diagnostics, len(self.pairs))
        self.use_cuda_graph = use_cuda_graph
        self.pad_to_buckets = use_cuda_graph  # eager runs exactly the rows it has (tests may pad on CPU)
        self.fused = all(lane.decoder is not None for lane in lanes)
        self._rows = torch.arange(num_slots, device=self.device)
        self._cols = torch.arange(max_seq_len, device=self.device)
        self._streams = [None] + [torch.cuda.Stream(self.device) if overlap_models else None for _ in lanes[1:]]
        self.overlap_models = overlap_models
        self._graphs: dict = {}
        self._graph_pool = None
        self._workspace = None  # the sampler workspace the captured graphs point into (kept alive here)
        self.buckets = sorted({min(1 << i, num_slots) for i in range(num_slots.bit_length() + 1)})

    # ------------------------------------------------------------------ host -> device slot updates
    def load_slots(self, slots: List[int], fields: dict, blocks: List[List[int]]) -> None:
        """Initialise ``slots`` for newly admitted sequences: ``fields`` maps a :class:`SlotState` name to one
        value per slot (``eos``: a list of ids per slot); ``blocks`` the block list of each slot."""
        st, dev = self.state, self.device
        idx = torch.tensor(slots, dtype=torch.int64, device=dev)
        for name, values in fields.items():
            t = getattr(st, name)
            if name == "eos":
                host = torch.full((len(slots), MAX_EOS_IDS), -2, dtype=torch.int64)
                for i, ids in enumerate(values):
                    host[i, :len(ids)] = torch.tensor(list(ids), dtype=torch.int64)
                t.index_copy_(0, idx, host.to(dev))
            else:
                t.index_copy_(0, idx, torch.tensor(values, dtype=t.dtype).to(dev))
        table = torch.zeros((len(slots), self.max_blocks), dtype=torch.int32)
        for i, b in enumerate(blocks):
            table[i, :len(b)] = torch.tensor(b, dtype=torch.int32)
        st.block_table.index_copy_(0, idx, table.to(dev))

    def set_blocks(self, updates: List[tuple]) -> None:
        """Block-table entries ``(slot, logical block, physical block)`` for sequences that grew."""
        if not updates:
            return
        rows, cols, vals = (torch.tensor(x, dtype=torch.int64) for x in zip(*updates))
        self.state.block_table.index_put_((rows.to(self.device), cols.to(self.device)),
                                          vals.to(torch.int32).to(self.device))

    def mark_done(self, slots: List[int]) -> None:
        """Make ``slots`` inert (a stop string, a preemption, an abort); stream-ordered after queued steps."""
        if slots:
            self.state.done.index_fill_(0, torch.tensor(slots, dtype=torch.int64, device=self.device), True)

    def move_slots(self, moves: List[tuple]) -> None:
        """Copy every per-slot row ``src -> dst`` for ``(src, dst)`` in ``moves`` (compaction)."""
        if not moves:
            return
        src = torch.tensor([m[0] for m in moves], dtype=torch.int64, device=self.device)
        dst = torch.tensor([m[1] for m in moves], dtype=torch.int64, device=self.device)
        for t in self.state.per_slot():
            t.index_copy_(0, dst, t.index_select(0, src))
        self.state.done.index_fill_(0, src, True)  # the old rows are empty now

    # ------------------------------------------------------------------ prefill
    def prefill(self, contexts: List[List[int]], owner_blocks: List[List[int]], rows: List[List[int]],
                copies: List[tuple], plausibility: bool = False) -> None:
        """Run the prompt forwards of ``contexts`` (left padded into one batch), writing each context's K/V into
        its owner's blocks, copy shared partial blocks (``copies``: ``(src, dst)`` block ids), and sample token
        ``n_gen`` for every slot in ``rows[i]`` from context ``i``'s logits (``plausibility``: some slot has a base
        plausibility above 0). The slots were loaded first (:meth:`load_slots`) with ``pos = len(context)``."""
        g = len(contexts)
        lens = [len(c) for c in contexts]
        P = max(lens)
        bs = self.block_size
        ids_host = torch.zeros(g, P, dtype=torch.int64)
        slots_host = torch.full((g, P), self.scratch, dtype=torch.int64)
        for i, (ctx, blocks) in enumerate(zip(contexts, owner_blocks)):
            n = len(ctx)
            ids_host[i, P - n:] = torch.tensor(ctx, dtype=torch.int64)
            t = torch.arange(n)
            blk = torch.tensor(blocks, dtype=torch.int64)[t // bs]
            slots_host[i, P - n:] = blk * bs + t % bs
        pad = P - torch.tensor(lens, dtype=torch.int64)
        logits = []
        for lane in self.lanes:
            dev, mdtype = lane.device, next(lane.model.parameters()).dtype
            neg = torch.finfo(mdtype).min
            k = torch.arange(P, device=dev)
            real = k.unsqueeze(0) >= pad.to(dev).unsqueeze(1)                  # [g, P] real (non-pad) columns
            pos = (real.long().cumsum(1) - 1).clamp(min=0)
            # query q sees key k <= q among its row's real tokens; a pad query sees itself only, so no softmax
            # row is empty
            allowed = (k.view(1, 1, P) <= k.view(1, P, 1)) & real.unsqueeze(1)
            allowed |= torch.eye(P, dtype=torch.bool, device=dev).unsqueeze(0)
            mask4 = torch.zeros(g, 1, P, P, dtype=mdtype, device=dev).masked_fill_(~allowed.unsqueeze(1), neg)
            cache = lane.cache
            cache.prefill, cache.seq_length, cache.mask_len = True, 0, P
            cache.write_slots = slots_host.view(-1).to(dev)
            extra = {"logits_to_keep": 1} if lane.logits_to_keep else {}
            set_attn_implementation(lane.model, lane.attn, lane.role)
            try:
                lg = self._forward(lane, input_ids=ids_host.to(dev), attention_mask=mask4, position_ids=pos, **extra)
            finally:
                cache.prefill = False
                cache.write_slots = None
            logits.append(lg.to(self.device))
            if copies:
                cache.copy_blocks(torch.tensor([c[0] for c in copies], device=dev),
                                  torch.tensor([c[1] for c in copies], device=dev))
        which = torch.tensor([i for i, r in enumerate(rows) for _ in r], dtype=torch.int64, device=self.device)
        slots = torch.tensor([s for r in rows for s in r], dtype=torch.int64, device=self.device)
        self._sample_update(slots, [lg.index_select(0, which) for lg in logits], False, plausibility)

    @staticmethod
    def _forward(lane: Lane, **kwargs) -> torch.Tensor:
        kwargs[lane.cache_arg] = lane.cache
        out = lane.model(use_cache=True, **kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits[:, -1, :]

    # ------------------------------------------------------------------ decode
    def decode(self, b: int, gathered: int, steps: int, plausibility: bool = False) -> None:
        """Run ``steps`` decode steps for rows ``[0, b)`` (``gathered``: a :func:`kv_bucket` covering every row's
        cache in the window: transformers' forward reads that many positions, the eager fused forward that many
        blocks of the table; captured fused steps read each row's own blocks, whatever the bucket;
        ``plausibility``: some row has a base plausibility above 0, else the sampler skips that filter): graph
        replays on CUDA, else eager."""
        b = next(x for x in self.buckets if x >= b) if self.use_cuda_graph or self.pad_to_buckets else b
        # the fused forward's paged kernel needs no length bucket in a graph (it reads each row's own blocks);
        # run eagerly, it gets the bucket too, so the PyTorch reference gathers only that many positions
        key = (b, 0 if self.fused and self.use_cuda_graph else gathered, bool(plausibility))
        for lane in self.lanes:  # another engine sharing a model object may have switched its attention
            set_attn_implementation(lane.model, lane.attn, lane.role)
        graph = self._graph(*key) if self.use_cuda_graph else None
        for _ in range(steps):
            if graph is not None:
                graph.replay()
            else:
                self._decode_step(*key)

    def _decode_step(self, b: int, gathered: int, plausibility: bool) -> None:
        """One lockstep decode step of rows ``[0, b)`` (module docstring: the invariants)."""
        st, bs = self.state, self.block_size
        active = ~st.done[:b]
        pos = st.pos[:b]
        blk = st.block_table[:b].gather(1, (pos // bs).clamp(max=self.max_blocks - 1).unsqueeze(1)).squeeze(1)
        slot = torch.where(active, blk.long() * bs + pos % bs, self.scratch)  # inert rows: the scratch slot
        lens = torch.where(active, pos + 1, 0)
        gidx = valid = None
        if not self.fused:  # transformers' forward reads a dense [b, H, L, D] gather of each row's cache
            j = self._cols[:gathered]
            gidx = st.block_table[:b].index_select(1, (j // bs).clamp(max=self.max_blocks - 1)).long() * bs + j % bs
            valid = j.unsqueeze(0) < lens.unsqueeze(1)                     # [b, L]
            gidx = torch.where(valid, gidx, self.scratch)
        logits = []
        main = torch.cuda.current_stream(self.device) if self.overlap_models else None
        for lane, stream in zip(self.lanes, self._streams):
            if stream is None:
                logits.append(self._lane_step(lane, b, gathered, slot, lens, gidx, valid))
            else:  # fork: the side stream sees this step's inputs (written on the main stream) first
                stream.wait_stream(main)
                with torch.cuda.stream(stream):
                    logits.append(self._lane_step(lane, b, gathered, slot, lens, gidx, valid))
        for stream in self._streams:
            if stream is not None:
                main.wait_stream(stream)  # join before the sampler reads the logits
        self._sample_update(slice(0, b), logits, True, plausibility)

    def _lane_step(self, lane: Lane, b: int, gathered: int, slot, lens, gidx, valid) -> torch.Tensor:
        """One model's decode forward for rows ``[0, b)``: ``[b, V]`` logits on the sampling device (``gathered``:
        the cache length bucket, 0 for the whole block table)."""
        st, dev = self.state, lane.device
        move = (lambda t: t.to(dev, non_blocking=True)) if dev != self.device else (lambda t: t)
        ids, pos, slot, lens = move(st.tok[:b].unsqueeze(1)), move(st.pos[:b].unsqueeze(1)), move(slot), move(lens)
        if lane.decoder is not None:
            blocks = -(-gathered // self.block_size) if gathered else self.max_blocks  # 0: the whole table
            lg = lane.decoder(ids, pos, lane.cache, slot, lens, move(st.block_table[:b, :blocks]))
        else:
            cache = lane.cache
            gidx, valid = move(gidx), move(valid)
            cache.write_slots, cache.gather_index = slot, gidx
            cache.seq_length, cache.mask_len = gidx.shape[1] - 1, gidx.shape[1]
            mdtype = next(lane.model.parameters()).dtype
            mask = torch.where(valid, 0.0, torch.finfo(mdtype).min).to(mdtype).view(b, 1, 1, -1)
            extra = {}
            if lane.attn == "rast_decode":  # the decode-attention kernel reads these bounds, not the mask
                extra = dict(rast_start=torch.zeros_like(lens), rast_end=lens)
            lg = self._forward(lane, input_ids=ids, attention_mask=mask, position_ids=pos, **extra)
            cache.write_slots = cache.gather_index = None
        return lg.to(self.device, non_blocking=True)

    def _combination(self, logits: list, rows) -> tuple:
        """``(base, expert, expert_base, alpha)`` for :func:`rast_sample` from the lanes' logits: single tensors
        and ``alpha [b]`` for one pair (the single-pair call), lists of K and ``alpha [b, K]`` for several."""
        alpha = self.state.alpha[rows]
        experts = [logits[e] for e, _ in self.pairs]
        expert_bases = [logits[eb] for _, eb in self.pairs]
        if len(self.pairs) == 1:
            return logits[0], experts[0], expert_bases[0], alpha[:, 0]
        return logits[0], experts, expert_bases, alpha

    def _sample_update(self, rows, logits: list, advance: bool, plausibility: bool) -> None:
        """Sample one token for each slot in ``rows`` and do the bookkeeping (device only). ``rows``: a slice
        ``[0, b)`` (a decode step: views, in-place writes) or an int64 device tensor of slots (a prefill).
        ``logits``: ``[b, >= V]`` per lane. ``advance``: the sampled token is one position past ``pos`` (a decode
        step) rather than at ``pos`` (a prefill, whose host set ``pos`` to the context length).
        ``plausibility``: apply the rows' base plausibility (else the sampler skips that pass)."""
        st = self.state
        base, expert, expert_base, alpha = self._combination(logits, rows)
        n_gen = st.n_gen[rows]
        tok, lp = rast_sample(base, expert, expert_base, alpha=alpha, temperature=st.temperature[rows],
                              top_k=st.top_k[rows], top_p=st.top_p[rows], min_p=st.min_p[rows],
                              vocab_size=self.vocab_size, seed=st.seed[rows], offset=n_gen, return_logprobs=True,
                              base_plausibility=st.base_plausibility[rows] if plausibility else 0.0)
        if self.token_sync is not None:
            self.token_sync(tok, lp)
        done = st.done[rows]
        active = ~done
        ok = tok >= 0
        good = active & ok
        index = self._rows[rows] if isinstance(rows, slice) else rows
        col = torch.where(active, n_gen % RING, RING)  # inert rows write the scratch column
        st.ring_tok.index_put_((index, col), torch.where(active, tok, -1))
        st.ring_lp.index_put_((index, col), lp)
        if st.ring_diag is not None:
            z = combined_logits(base, expert, expert_base, alpha, self.vocab_size)
            st.ring_diag.index_put_((index, col), delta_diagnostics(base, z, st.temperature[rows], tok,
                                                                    self.vocab_size))
        n_new = n_gen + good.long()
        eos = good & (tok.unsqueeze(1) == st.eos[rows]).any(1)
        length = good & ~eos & (n_new >= st.max_new[rows])
        err = active & ~ok
        finish = torch.where(err, ERROR, torch.where(eos, EOS, torch.where(length, LENGTH, st.finish[rows])))
        # every value is computed before the first write: with a slice, the reads above are views of these rows
        new_err_step = torch.where(err, n_gen, st.err_step[rows])
        new_tok = torch.where(good, tok, st.tok[rows])
        new_pos = st.pos[rows] + good.long() if advance else None
        new_done = done | err | eos | length
        st.err_step[rows] = new_err_step
        st.finish[rows] = finish
        st.n_gen[rows] = n_new
        st.tok[rows] = new_tok
        st.done[rows] = new_done
        if advance:
            st.pos[rows] = new_pos

    # ------------------------------------------------------------------ graphs
    def _graph(self, b: int, gathered: int, plausibility: bool):
        """The captured decode step for ``(b, gathered, plausibility)`` (captured once). Warm-up and capture run with every
        row made inert (``done`` saved and restored), so they change no slot's state whatever is running."""
        key = (b, gathered, plausibility)
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
                self._decode_step(*key)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # one memory pool for all of this engine's graphs: a step keeps nothing alive in it between replays
        # (all state lives in the static buffers allocated outside), and replays never overlap
        with torch.cuda.graph(graph, pool=self._graph_pool):
            self._decode_step(*key)
        self.state.done.copy_(saved)
        torch.cuda.synchronize(self.device)
        self._graphs[key] = graph
        return graph

    def _reserve_sampler_workspace(self):
        """The Triton sampler keeps one cached workspace per device and grows it when a call needs more; a captured
        graph holds its raw pointer. Size it for the largest bucket before the first capture and keep the buffer
        (if another caller grows the cache later, the old buffer stays alive for these graphs)."""
        try:
            from ..ops.rast_sample_triton import reserve_workspace
        except ImportError:  # no Triton: the sampler has no shared workspace
            return ()
        return reserve_workspace(self.buckets[-1], self.vocab_size, self.device, True)

    # ------------------------------------------------------------------ host reads
    def snapshot(self, b: int, owners: list) -> Snapshot:
        """Start copying rows ``[0, b)``'s counts, finish state and ring to the host (non-blocking on CUDA)."""
        st = self.state
        ints = torch.cat([st.n_gen[:b, None], st.done[:b, None].long(), st.finish[:b, None], st.err_step[:b, None],
                          st.ring_tok[:b, :RING]], 1)
        lps = st.ring_lp[:b, :RING]
        diag = st.ring_diag[:b, :RING] if st.ring_diag is not None else None
        if self.device.type != "cuda":
            return Snapshot(ints, lps.clone(), None, owners, diag.clone() if diag is not None else None)
        host = []
        for t in (ints, lps) + ((diag,) if diag is not None else ()):
            h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            h.copy_(t, non_blocking=True)
            host.append(h)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return Snapshot(host[0], host[1], event, owners, host[2] if diag is not None else None)
