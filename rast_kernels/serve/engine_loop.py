"""The engine loop: one thread owns the (not thread-safe) :class:`~rast_kernels.RastEngine` and is the only
caller of its methods; request handlers talk to it through a command queue and get events back on their own
asyncio queues.

Spec:

* :meth:`EngineLoop.submit` (event-loop side) queues a validated :class:`~.protocol.Job` and returns a
  :class:`Ticket`, or raises :class:`~.protocol.APIError`: 503 while draining or after the loop died, 429 with
  ``Retry-After`` when the engine's waiting sequences plus the queued ones reach ``max_waiting`` (back-pressure:
  a queue that only grows helps nobody).
* The loop thread tokenizes a job's prompts, checks each in the request's terms (empty, token ids outside the
  vocabulary, prompt + max_tokens beyond ``max_seq_len``, an ``alpha`` list that does not match the expert pairs:
  a 400 naming the field) and adds them with :meth:`RastEngine.add_request` (all or none: a prompt that does not
  fit aborts the ones added before it, which have not run yet). It answers ``("added", prompt_token_ids,
  prompt_texts)`` (texts for ``echo`` only) or ``("rejected", APIError)``; then one ``("output",
  GenerationOutput, choice_index, Scored | None)`` per engine update and ``("done",)`` once every choice
  finished. Choice ``i * n + j`` is sample ``j`` of prompt ``i``.
* ``echo`` with ``logprobs``: when a choice finishes, this thread scores its prompt + completion tokens with
  :func:`score_tokens` (between two steps: the engine's models are this thread's alone) and sends the
  :class:`~.responses.Scored` with the final output; with ``max_tokens = 0`` nothing is added to the engine and
  the prompts' scores are the answer. A scoring failure is that choice's error, not the server's.
* :meth:`EngineLoop.abort` (a client went away) aborts the job's engine requests at once: slots and KV blocks
  are free before the next step, and the published stats (``/metrics``) show it.
* ``engine.step()`` raising does not end the loop: every job in flight (the step served them all, none can be
  trusted to continue) is aborted and gets ``("ended", "error", message)``; the loop goes on with new jobs.
* :meth:`EngineLoop.begin_drain` (SIGTERM): new jobs get 503; jobs still running after ``timeout`` seconds get
  ``("ended", "abort", message)`` so that their responses end cleanly. :meth:`EngineLoop.stop` ends the thread.
* A job's finished engine requests are released with ``abort_request`` (a no-op for finished sequences) because
  the engine keeps every ``add_request`` entry until then; a server that never released them would grow without
  bound.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
import time
import traceback
from typing import List, Optional

import torch

from ..engine import GenerationOutput
from ..engine.scoring import combined_logprobs
from ..params import ParamError
from .metrics import Metrics
from .protocol import APIError, ChatPrompt, Job, bad, from_param_error
from .responses import Scored, echoed_ids

log = logging.getLogger("rast_kernels.serve")


class _Sample:
    __slots__ = ("first", "last", "ntok", "finished")

    def __init__(self):
        self.first = None
        self.last = None
        self.ntok = 0
        self.finished = False


class Ticket:
    """One HTTP request in flight: its job, its engine request ids and the asyncio queue its events arrive on."""

    def __init__(self, job: Job, aio_loop: asyncio.AbstractEventLoop, t0: float):
        self.job = job
        self.t0 = t0
        self.queue: asyncio.Queue = asyncio.Queue()
        self.rids: List[str] = []
        self.samples = [_Sample() for _ in range(len(job.prompts) * job.params.n)]
        self.remaining = len(self.samples)
        self.cancelled = False  # set by abort() before the loop saw the job
        self.closed = False  # no more events will come
        self.outbox: list = []
        self.prompt_ids: List[List[int]] = []  # per prompt, once added
        self._aio = aio_loop

    @property
    def sequences(self) -> int:
        return len(self.samples)

    def put(self, event) -> None:
        self.outbox.append(event)  # sent by EngineLoop._flush, after the stats that reflect it are published

    def send(self) -> None:
        _send_all([self])

    def _deliver(self, events) -> None:  # on the event loop
        for event in events:
            self.queue.put_nowait(event)


def score_tokens(engine, ids: List[int], params, top_n: int) -> Scored:
    """Every token of ``ids`` but the first scored under ``engine``'s combined distribution with ``params``'
    weights (:func:`~rast_kernels.engine.scoring.combined_logprobs`), with the ``top_n`` most likely tokens at
    each position. The caller owns the engine's models meanwhile (the engine-loop thread)."""
    if len(ids) < 2:
        return Scored([None] * len(ids), [None] * len(ids))
    alphas = params.pair_alphas(engine.num_pairs) if engine.num_pairs else ()
    lp = combined_logprobs(engine.models, ids[:-1], alphas, engine.vocab_size)
    target = torch.tensor(ids[1:], device=lp.device)
    chosen = lp.gather(1, target[:, None])[:, 0].tolist()
    k = min(top_n, lp.shape[-1])
    if k:
        values, indices = lp.topk(k, dim=-1)
        top = [list(zip(i, v)) for i, v in zip(indices.tolist(), values.tolist())]
    else:
        top = [[] for _ in chosen]
    return Scored([None] + chosen, [None] + top)


def _send_all(tickets) -> None:
    """Hand the tickets' outboxes to their event loop in one wake-up per loop (not one per event: with many
    streams, one per token each, the wake-ups alone cost the event loop a good share of its time)."""
    batches: dict = {}
    for t in tickets:
        if t.outbox:
            events, t.outbox = t.outbox, []
            batches.setdefault(t._aio, []).append((t, events))
    for aio, batch in batches.items():
        try:
            aio.call_soon_threadsafe(_deliver_batch, batch)
        except RuntimeError:  # the event loop is closed (shutdown): nobody is listening any more
            pass


def _deliver_batch(batch) -> None:
    for ticket, events in batch:
        ticket._deliver(events)


class EngineLoop:
    """Drives one engine from a thread (module docstring)."""

    def __init__(self, engine, *, metrics: Optional[Metrics] = None, max_waiting: int = 256,
                 idle_wait_s: float = 0.5):
        self.engine = engine
        self.metrics = metrics or Metrics()
        self.max_waiting = int(max_waiting)
        self.idle_wait_s = idle_wait_s
        self._cmds = collections.deque()  # (kind, ticket); deque appends/pops are atomic
        self._wake = threading.Event()
        self._active: dict = {}  # ticket -> None (insertion ordered)
        self._by_rid: dict = {}  # engine request id -> (ticket, prompt index)
        self._queued = 0  # sequences submitted and not yet added (read by submit's back-pressure check)
        self._lock = threading.Lock()
        self._stopping = False
        self._drain_deadline: Optional[float] = None
        self.draining = False
        self.dead: Optional[str] = None
        self.steps_failed = 0
        self._thread: Optional[threading.Thread] = None
        self._to_send: list = []  # tickets with events in their outbox

    # ------------------------------------------------------------------ event-loop side
    def start(self) -> None:
        self._publish()
        self._thread = threading.Thread(target=self._run, name="rast-engine-loop", daemon=True)
        self._thread.start()

    def submit(self, job: Job, t0: Optional[float] = None) -> Ticket:
        if self.dead is not None:
            raise APIError(503, None, f"engine loop stopped: {self.dead}", type="server_error")
        if self.draining:
            raise APIError(503, None, "server is shutting down", type="server_error", headers={"Retry-After": "5"})
        ticket = Ticket(job, asyncio.get_running_loop(), time.perf_counter() if t0 is None else t0)
        with self._lock:
            waiting = self.metrics.engine_stats.get("waiting", 0) + self._queued
            if waiting >= self.max_waiting:
                raise APIError(429, None, f"too many requests waiting ({waiting} sequences, limit "
                                          f"max_waiting={self.max_waiting}); retry later",
                               type="rate_limit_error", code="too_many_waiting", headers={"Retry-After": "1"})
            self._queued += ticket.sequences
        self._cmds.append(("add", ticket))
        self._wake.set()
        return ticket

    def abort(self, ticket: Ticket) -> None:
        """End ``ticket`` now (idempotent; harmless after it finished)."""
        if ticket.closed:
            return
        ticket.cancelled = True
        self._cmds.append(("abort", ticket))
        self._wake.set()

    def begin_drain(self, timeout: float) -> None:
        self.draining = True
        self._drain_deadline = time.monotonic() + max(0.0, timeout)
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.dead is None

    # ------------------------------------------------------------------ loop thread
    def _run(self) -> None:
        try:
            while True:
                self._wake.clear()
                while self._cmds:
                    kind, ticket = self._cmds.popleft()
                    if kind == "add":
                        self._add(ticket)
                    else:
                        self._abort(ticket, "abort", "client disconnected")
                    self._to_send.append(ticket)
                if self._drain_deadline is not None and time.monotonic() >= self._drain_deadline and self._active:
                    self._end_all("abort", "server shutting down: the request was ended before it finished")
                if self._stopping:
                    self._end_all("abort", "server stopped")
                    self._flush()
                    return
                if self._active:
                    try:
                        outs = self.engine.step()
                    except Exception as exc:  # the server outlives a failing step; its jobs do not
                        self.steps_failed += 1
                        log.error("engine step failed; ending %d request(s):\n%s", len(self._active),
                                  traceback.format_exc())
                        self._end_all("error", f"engine error: {type(exc).__name__}: {exc}")
                    else:
                        self._dispatch(outs)
                    self._flush()
                else:
                    self._flush()
                    timeout = self.idle_wait_s
                    if self._drain_deadline is not None:
                        timeout = min(timeout, max(0.0, self._drain_deadline - time.monotonic()))
                    self._wake.wait(timeout)
        except BaseException as exc:  # a bug here: fail everyone loudly rather than leave handlers waiting
            self.dead = f"{type(exc).__name__}: {exc}"
            log.critical("engine loop died:\n%s", traceback.format_exc())
            for ticket in list(self._active):
                ticket.closed = True
                ticket.put(("ended", "error", f"engine loop died: {self.dead}"))
                ticket.send()
            while self._cmds:
                _, ticket = self._cmds.popleft()
                ticket.closed = True
                ticket.put(("rejected", APIError(503, None, f"engine loop stopped: {self.dead}",
                                                 type="server_error")))
                ticket.send()

    def _publish(self) -> None:
        with self._lock:
            self.metrics.set_engine_stats(self.engine.stats(), self._queued)

    def _flush(self) -> None:
        # stats first: a client that got its answer and then reads /metrics sees the engine state after it
        self._publish()
        _send_all(list(self._active) + self._to_send)
        self._to_send = []

    def _tokenize(self, p) -> List[int]:
        # tokenized exactly as RastEngine does for a string prompt (so a server completion equals
        # engine.generate(prompt)); a chat rendering already holds the template's special tokens
        tok = self.engine.tokenizer
        if isinstance(p, ChatPrompt):
            return list(tok(p.text, add_special_tokens=False)["input_ids"])
        if isinstance(p, str):
            return list(tok(p, add_special_tokens=True)["input_ids"])
        return list(p)

    def _params_for(self, job: Job, ids: List[int], name: str):
        """The job's params for one tokenized prompt, or an :class:`APIError` naming ``name`` when the prompt
        cannot be served (checked here, in the request's terms, before the engine sees it)."""
        eng, params = self.engine, job.params
        if not ids:
            raise bad(name, "empty after tokenization: give at least one token")
        bad_ids = [t for t in ids if not 0 <= t < eng.vocab_size]
        if bad_ids:
            raise bad(name, f"token id {bad_ids[0]} outside the vocabulary [0, {eng.vocab_size})")
        if isinstance(params.alpha, tuple):
            if eng.num_pairs == 0:
                raise bad("alpha", "a list of weights needs expert pairs; this server decodes the base alone")
            params.pair_alphas(eng.num_pairs)  # a ParamError naming alpha on a length mismatch
        if job.max_tokens_auto:
            s = eng.stats()
            room = min(eng.max_seq_len - len(ids), s["kv_blocks_total"] * s["block_size"] - len(ids) + 1)
            if room < 1:
                raise bad(name, f"{len(ids)} prompt tokens leave no room to generate within "
                                f"max_seq_len={eng.max_seq_len}")
            return dataclasses.replace(params, max_new_tokens=room)
        new = params.max_new_tokens if job.generate else 0
        if len(ids) + new > eng.max_seq_len:
            raise bad(name, f"{len(ids)} prompt tokens + max_tokens={new} exceed max_seq_len={eng.max_seq_len}")
        return params

    def _add(self, ticket: Ticket) -> None:
        with self._lock:
            self._queued -= ticket.sequences
        if ticket.cancelled:  # its client left before the loop saw it: answer the handler, queue nothing
            ticket.closed = True
            ticket.put(("rejected", APIError(400, None, "client disconnected before the request was queued")))
            return
        job, eng = ticket.job, self.engine
        rids, all_ids = [], []
        try:
            for i, p in enumerate(job.prompts):
                name = job.prompt_param if len(job.prompts) == 1 else f"{job.prompt_param}.{i}"
                try:
                    ids = self._tokenize(p)
                    params = self._params_for(job, ids, name)
                    if job.generate:
                        rids.append(eng.add_request(ids, params))
                except ParamError as exc:
                    raise from_param_error(exc, name)
                except (ValueError, TypeError) as exc:  # the engine's own checks (e.g. the KV pool's size)
                    raise bad(name, f"cannot be served: {exc}")
                all_ids.append(ids)
        except APIError as err:
            self._reject(ticket, rids, err)
            return
        except Exception as exc:  # e.g. a tokenizer failure on odd input: the request's fault or ours, not fatal
            log.error("adding a request failed:\n%s", traceback.format_exc())
            self._reject(ticket, rids, bad(job.prompt_param, f"could not be queued: {type(exc).__name__}: {exc}"))
            return
        ticket.prompt_ids = all_ids
        texts = [p if isinstance(p, str) else eng.tokenizer.decode(ids, skip_special_tokens=False)
                 for p, ids in zip(job.prompts, all_ids)] if job.echo else []
        self.metrics.add_prompt_tokens(sum(len(x) for x in all_ids))
        ticket.put(("added", all_ids, texts))
        if not job.generate:  # echo with max_tokens = 0: the prompts' scores are the whole answer
            self._answer_scores_only(ticket)
            return
        ticket.rids = rids
        for i, rid in enumerate(rids):
            self._by_rid[rid] = (ticket, i)
        self._active[ticket] = None

    def _reject(self, ticket: Ticket, rids, err: APIError) -> None:
        for rid in rids:  # added this iteration, never stepped: nothing ran
            self.engine.abort_request(rid)
        ticket.closed = True
        ticket.put(("rejected", err))

    def _score(self, ticket: Ticket, ids: List[int]) -> Optional[Scored]:
        """``ids`` scored under the combined distribution with the job's weights (on this thread: the engine's
        models are not used by anything else meanwhile); None unless the job asks for it."""
        job = ticket.job
        if not job.scored:
            return None
        try:
            return score_tokens(self.engine, ids, job.params, job.top_logprobs)
        except Exception as exc:  # e.g. out of memory on a long prompt: this choice's error, not the server's
            log.error("scoring failed:\n%s", traceback.format_exc())
            return Scored([], [], f"scoring failed: {type(exc).__name__}: {exc}")

    def _answer_scores_only(self, ticket: Ticket) -> None:
        n = ticket.job.params.n
        for pi, ids in enumerate(ticket.prompt_ids):
            scored = self._score(ticket, ids)  # the same for the n identical choices of a prompt
            for j in range(n):
                out = GenerationOutput(text="", token_ids=[], num_prompt_tokens=len(ids), finish_reason="length",
                                       prompt_index=pi, sample_index=j, finished=True)
                ticket.put(("output", out, pi * n + j, scored))
        ticket.remaining = 0
        ticket.closed = True
        ticket.put(("done",))

    def _dispatch(self, outs) -> None:
        now = time.perf_counter()
        for out in outs:
            entry = self._by_rid.get(out.request_id)
            if entry is None:
                continue
            ticket, pi = entry
            ci = pi * ticket.job.params.n + out.sample_index
            st = ticket.samples[ci]
            if st.finished:
                continue
            if len(out.token_ids) > st.ntok:
                if st.first is None:
                    st.first = now
                    self.metrics.observe_ttft(now - ticket.t0)
                st.last = now
                st.ntok = len(out.token_ids)
            scored = None
            if out.finished and ticket.job.scored:
                scored = self._score(ticket, ticket.prompt_ids[pi] + echoed_ids(out))
            ticket.put(("output", out, ci, scored))
            if out.finished:
                st.finished = True
                ticket.remaining -= 1
                tpot = (st.last - st.first) / (st.ntok - 1) if st.ntok >= 2 else None
                self.metrics.observe_finish(out.finish_reason, tpot)
                n = ticket.job.params.n
                if all(s.finished for s in ticket.samples[pi * n:(pi + 1) * n]):
                    self.engine.abort_request(out.request_id)  # releases the engine's bookkeeping entry
                    self._by_rid.pop(out.request_id, None)
                if ticket.remaining == 0:
                    self._active.pop(ticket, None)
                    ticket.closed = True
                    ticket.put(("done",))
                    self._to_send.append(ticket)

    def _abort(self, ticket: Ticket, reason: str, message: str) -> None:
        if ticket not in self._active:
            return
        for rid in ticket.rids:
            try:
                self.engine.abort_request(rid)
            except Exception:  # keep going: the other rids must be freed too
                log.error("abort_request(%s) failed:\n%s", rid, traceback.format_exc())
            self._by_rid.pop(rid, None)
        for st in ticket.samples:
            if not st.finished:
                st.finished = True
                self.metrics.observe_finish(reason, None)
        self._active.pop(ticket, None)
        ticket.closed = True
        ticket.put(("ended", reason, message))  # a handler may still be waiting (non-streamed, disconnected)
        self._to_send.append(ticket)

    def _end_all(self, reason: str, message: str) -> None:
        for ticket in list(self._active):
            self._abort(ticket, reason, message)
