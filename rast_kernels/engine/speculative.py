"""Speculative RAST: the small models draft ``k`` tokens, every other model verifies them in one forward, and the
tokens are exactly plain RAST's.

A round, per running row whose last token ``x0`` sits at position ``P`` with ``n`` tokens generated:

1. the drafting lanes (the expert alone, or both small models of every pair) decode ``x0 .. xk`` one token at a
   time; draft token ``x(j+1)`` is the exponential-race winner of the draft logits with the row's own seed,
   temperature and filters at Philox offset ``n + j`` (greedy rows: the argmax). Drafting ``k + 1`` steps also
   gives those lanes their logits at all ``k + 1`` positions;
2. every other lane (the base, and small models that do not draft) runs one forward over ``x0 .. xk``
   (``k + 1`` positions, causal among them);
3. the target token ``y(j+1)`` at position ``P + j`` is what :func:`~rast_kernels.rast_sample` gives plain decoding
   there: the same combination, filters, plausibility, seed and offset ``n + j`` (one sampler call over
   ``b * (k + 1)`` rows: its draw depends only on a row's own inputs, seed and offset);
4. the drafts are accepted while ``x(j) == y(j)``; the row keeps ``y(1) .. y(a + 1)`` (``a`` accepted drafts), cut
   at an EOS, ``max_new_tokens`` or a sampler error exactly where plain decoding stops
   (:meth:`~.slot_state.SlotState.commit`);
5. nothing is copied back: positions ``P .. P + kept - 1`` now hold the kept tokens' K/V in every model (an
   accepted draft is the target's token), and the positions after them hold rejected drafts that the next round
   overwrites before any query can read them (a query at position ``p`` reads positions ``<= p`` only). Drafts
   past a row's last position write the scratch slot; the scheduler returns unused block reservations
   (:meth:`~.scheduler.Scheduler.observe`).

So the tokens are plain decoding's, up to floating-point differences between a ``k + 1``-token forward and ``k + 1``
one-token forwards, which change a token only where two candidates tie to within rounding (the engine's usual
batch-shape invariance). The draft ``"combination"`` is ``z_eb + sum_i alpha_i (z_e_i - z_eb_i)`` with pair 0's
expert base standing in for the base. Device ops only: a round is captured in one CUDA graph.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from ..ops.rast_sample import sample_slots
from ..params import ParamError
from .slot_state import DEFAULT_RING

# row-rounds, draft tokens, drafts compared with the target (up to the first mismatch, within the row's end), drafts
# accepted, tokens kept
STATS = ("rounds", "drafted", "checked", "accepted", "emitted")


class Speculation:
    """A speculative configuration over the engine's lanes (module docstring).

    ``tokens``: drafted tokens ``k`` per round; ``draft``: ``"expert"`` or ``"combination"``; ``pairs``: the
    engine's ``(expert lane, expert-base lane)`` per pair; lane 0 is the base."""

    def __init__(self, tokens: int, draft: str, pairs: List[Tuple[int, int]]):
        self.tokens, self.draft, self.pairs = int(tokens), draft, list(pairs)
        num_lanes = max(max(p) for p in self.pairs) + 1
        self.draft_lanes = [self.pairs[0][0]] if draft == "expert" else sorted({i for p in self.pairs for i in p})
        self.verify_lanes = [i for i in range(num_lanes) if i not in self.draft_lanes]
        self.counters = None  # [len(STATS)] int64 running totals on the sampling device, made by the first round

    @classmethod
    def for_pairs(cls, tokens: int, draft: str, pairs) -> "Speculation":
        """Checked: a base alone has nothing to draft with, and no drafting lane may be the base itself."""
        if list(pairs) == [(0, 0)]:
            raise ParamError("speculative_tokens", "needs expert pairs: an engine of the base alone has no small "
                                                   "model to draft with")
        spec = cls(tokens, draft, pairs)
        if 0 in spec.draft_lanes:
            raise ParamError("speculative_draft", f"{draft!r} would draft with the base model itself (an expert or "
                                                  "expert base is the base, as in contrastive decoding): nothing to "
                                                  "gain; use speculative_tokens=0")
        return spec

    def ring_size(self, poll_interval: int = 4) -> int:
        """Ring columns for a window of ``poll_interval`` rounds of up to ``k + 1`` tokens, read one window late."""
        need = 2 * poll_interval * (self.tokens + 1)
        return max(DEFAULT_RING, 1 << (need - 1).bit_length())

    @staticmethod
    def stats(counters) -> dict:
        """``{name: total}`` (:data:`STATS`) from the counters a snapshot carried to the host (None: zeros): the
        host never reads the device for them."""
        return dict(zip(STATS, counters if counters is not None else [0] * len(STATS)))

    # ------------------------------------------------------------------ the round
    def round(self, runner, b: int, gathered: int, plausibility: bool) -> None:
        """One speculative round of rows ``[0, b)`` on ``runner`` (a :class:`~.runner.StepRunner`)."""
        st, k = runner.state, self.tokens
        q = k + 1
        active, n = ~st.done[:b], st.n_gen[:b]
        j = torch.arange(q, device=n.device)
        pos = st.pos[:b].unsqueeze(1) + j                                  # [b, q]
        keepable = j.unsqueeze(0) < (st.max_new[:b] - n).unsqueeze(1)      # positions a row can keep
        xs, drafts = self._draft(runner, b, gathered, active, pos, keepable)
        verified = runner.forward_lanes(self.verify_lanes, xs.clamp(min=0), pos,
                                        runner.kv_view(b, pos, active, gathered, keepable))
        logits = dict(zip(self.verify_lanes, verified))
        logits.update(drafts)
        flat = [logits[i].reshape(b * q, -1) for i in range(len(logits))]
        rows = st.slot_index[:b].unsqueeze(1).expand(b, q).reshape(-1)  # each row's slot, q times (static shape)
        y, lp, diag = runner.sample(flat, rows, (n.unsqueeze(1) + j).reshape(-1), plausibility)
        y, lp = y.view(b, q), lp.view(b, q)
        match = (xs[:, 1:] == y[:, :k]) & (xs[:, 1:] >= 0)
        accepted = match.long().cumprod(1).sum(1)
        before = n.clone()
        st.commit(slice(0, b), y, lp, accepted + 1, True, None if diag is None else diag.view(b, q, -1))
        self._count(active, accepted, st.n_gen[:b] - before)

    def _draft(self, runner, b: int, gathered: int, active, pos, keepable):
        """``(xs [b, k + 1], {drafting lane: logits [b, k + 1, V]})``: ``x0`` and the ``k`` drafts, and the
        drafting lanes' logits at every position (``k + 1`` one-token steps)."""
        st, k = runner.state, self.tokens
        x, outs = [st.tok[:b]], {i: [] for i in self.draft_lanes}
        for step in range(k + 1):
            p = pos[:, step:step + 1]
            view = runner.kv_view(b, p, active, gathered, keepable[:, step:step + 1])
            logits = runner.forward_lanes(self.draft_lanes, x[step].clamp(min=0).unsqueeze(1), p, view)
            for i, lg in zip(self.draft_lanes, logits):
                outs[i].append(lg[:, 0])
            if step < k:
                x.append(self._draft_token(runner, {i: lg[:, 0] for i, lg in zip(self.draft_lanes, logits)}, b,
                                           st.n_gen[:b] + step))
        return torch.stack(x, 1), {i: torch.stack(v, 1) for i, v in outs.items()}

    def _draft_token(self, runner, logits: dict, b: int, offset) -> torch.Tensor:
        """The draft's token for rows ``[0, b)`` (its own combination, the rows' seeds and filters, no
        plausibility)."""
        st = runner.state
        if self.draft == "expert":
            z = logits[self.draft_lanes[0]]
            base, experts, expert_bases = z, [z], [z]
            alpha = torch.zeros(b, 1, device=z.device)  # z + 0 * (z - z) == z
        else:
            base = logits[self.pairs[0][1]]
            experts = [logits[e] for e, _ in self.pairs]
            expert_bases = [logits[eb] for _, eb in self.pairs]
            alpha = st.alpha[:b]
        tok, lp = sample_slots(base, experts, expert_bases, alpha, st.temperature[:b], st.top_k[:b], st.top_p[:b],
                               st.min_p[:b], st.seed[:b], offset, None, runner.vocab_size)
        if runner.token_sync is not None:
            runner.token_sync(tok, lp)
        return tok

    def _count(self, active, accepted, kept) -> None:
        """Add one round to the totals (:data:`STATS`). A draft counts as checked when its target was decided:
        every draft before it matched and the row had not ended before it (EOS, length); the agreement rate
        ``accepted / checked`` is then the per-draft probability that the draft equals RAST's token."""
        if self.counters is None:
            self.counters = torch.zeros(len(STATS), dtype=torch.int64, device=active.device)
        a = active.long()
        checked = torch.minimum(torch.minimum(accepted + 1, kept), torch.full_like(kept, self.tokens))
        self.counters += torch.stack([a.sum(), a.sum() * self.tokens, (checked * a).sum(),
                                      (torch.minimum(accepted, checked) * a).sum(), (kept * a).sum()])
