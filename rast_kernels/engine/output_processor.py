"""From device snapshots to outputs: new tokens, finished sequences, stop strings, :class:`GenerationOutput`.

Owns :class:`OutputProcessor`: it reads a :class:`~.slot_state.Snapshot` of a decode window, appends each row's
new tokens (logprobs, diagnostics) to its :class:`~.request.Sequence`, finishes sequences (EOS, length, sampler
error, stop string, abort) through the scheduler, tells the scheduler how far every running row really got
(:meth:`~.scheduler.Scheduler.observe`), and builds the :class:`~.outputs.GenerationOutput` of a sequence.

Invariant: a row's results are read only while the sequence that was in its slot when the snapshot was taken
still holds it in the same stay (``epoch``) and runs; a finished sequence's tokens and text never change again.
"""
from __future__ import annotations

from typing import Callable, Dict

from .detokenize import final_text
from .outputs import GenerationOutput
from .request import FINISHED, RUNNING, Sequence
from .slot_state import DIAGNOSTICS, EOS, ERROR, LENGTH, Snapshot

_FINISH = {EOS: "stop", LENGTH: "length", ERROR: "error"}


class OutputProcessor:
    """Reads snapshots into sequences and outputs (module docstring). ``decode``: token ids -> text;
    ``scheduler``: the engine's :class:`~.scheduler.Scheduler`; ``diagnostics``: outputs carry them."""

    def __init__(self, scheduler, decode: Callable[[list], str], diagnostics: bool = False):
        self.scheduler, self.decode, self.diagnostics = scheduler, decode, diagnostics
        self.tokens_generated = 0
        self.device_counters = None  # the last snapshot's running totals from the device (speculative rounds)

    def process(self, snap: Snapshot, updates: Dict[Sequence, bool]) -> None:
        """Read ``snap`` into its rows' sequences; every sequence that got tokens or finished goes into
        ``updates`` (an insertion-ordered dict used as a set)."""
        ints, lps, diag, counters = snap.read()
        if counters is not None:
            self.device_counters = counters
        number, window = snap.window
        since = self.scheduler.window - number
        for i, owner in enumerate(window.owners):
            if owner is None:
                continue
            seq, epoch = owner
            if seq.epoch != epoch or seq.status != RUNNING:
                continue  # the sequence left the slot since (preempted, aborted, stopped)
            if self._read_row(seq, ints[i], lps[i], diag[i] if diag is not None else None, snap.ring):
                updates[seq] = True
            if seq.status == RUNNING:  # speculative rounds reserve for drafts: what was not kept goes back
                self.scheduler.observe(seq, seq.prompt_len + ints[i][0] - 1, since)

    def _read_row(self, seq: Sequence, ints: list, lps: list, diag, ring: int) -> bool:
        """Append one row's new tokens; finish it if it ended. True when anything changed."""
        n_gen, done, finish, err_step = ints[:4]
        start = len(seq.tokens)
        if n_gen - start > ring:
            raise RuntimeError(f"engine: {n_gen - start} tokens between two reads exceed the ring of {ring}")
        new = [ints[4 + t % ring] for t in range(start, n_gen)]
        new_lp = [lps[t % ring] for t in range(start, n_gen)]
        new_diag = [diag[t % ring] for t in range(start, n_gen)] if diag is not None else []
        if done and finish == EOS:  # the ending EOS id is not part of the output
            seq.stop_reason = new.pop()
            new_lp.pop()
            new_diag = new_diag[:-1]
        if new:
            seq.tokens.extend(new)
            seq.logprobs.extend(new_lp)
            seq.diagnostics.extend(new_diag)
            self.tokens_generated += len(new)
        stopped = seq.detok.extend(new)
        if done:
            if finish not in _FINISH:
                raise RuntimeError(f"engine: slot {seq.slot} is done with finish code {finish}")
            seq.finish_reason = _FINISH[finish]
            if finish == ERROR:
                seq.error = (f"rast_sample returned -1 at decode step {err_step} (generated token {err_step}): the "
                             "combined logits held NaN/+inf, every token was masked, or a sampling parameter was "
                             "out of range")
            self.finish(seq)
        elif stopped:
            seq.finish_reason = "stop"
            self.finish(seq, deactivate=True)  # it may still run in a queued window: its extra tokens are cut
        return bool(new) or seq.status == FINISHED

    def finish(self, seq: Sequence, deactivate: bool = False) -> None:
        """Finish ``seq`` (its ``finish_reason`` set): final text and tokens (cut at a stop string), then the
        scheduler frees what it held (``deactivate``: its device row may still be running)."""
        text, toks, stop = final_text(self.decode, seq.tokens, seq.request.params.stop)
        if stop is not None:  # a stop string: the text and the tokens end there, whatever ended the row
            seq.finish_reason, seq.stop_reason, seq.error = "stop", stop, None
            seq.logprobs = seq.logprobs[:len(toks)]
            seq.diagnostics = seq.diagnostics[:len(toks)]
            seq.tokens = toks
        seq.final_text = text
        if seq.status == RUNNING:
            self.scheduler.finish(seq, deactivate=deactivate)
        else:  # waiting (an abort)
            self.scheduler.abort(seq)

    def output(self, seq: Sequence) -> GenerationOutput:
        """The sequence's output now: final when it finished, else its tokens so far and the stable text."""
        req = seq.request
        finished = seq.status == FINISHED
        return GenerationOutput(
            text=seq.final_text if finished else seq.detok.stable(), token_ids=list(seq.tokens),
            num_prompt_tokens=len(req.prompt), finish_reason=seq.finish_reason if finished else None,
            stop_reason=seq.stop_reason if finished else None, error=seq.error,
            logprobs=list(seq.logprobs) if req.params.return_logprobs else None, request_id=req.request_id,
            prompt_index=req.prompt_index, sample_index=seq.sample_index, finished=finished,
            diagnostics=_diagnostics(seq) if self.diagnostics else None)


def _diagnostics(seq: Sequence) -> dict:
    cols = list(zip(*seq.diagnostics)) if seq.diagnostics else [()] * len(DIAGNOSTICS)
    out = {name: list(col) for name, col in zip(DIAGNOSTICS, cols)}
    out["argmax_flip"] = [bool(x) for x in out["argmax_flip"]]
    return out


