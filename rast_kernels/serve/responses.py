"""Responses of the OpenAI-compatible endpoints: pure functions from a :class:`~.protocol.Job`'s engine events to
JSON objects and server-sent-event chunks (no I/O: the app feeds them events and writes what they return).

Spec:

* a choice is ``{"index", "text" | "message", "logprobs", "finish_reason"}``, plus ``"error"`` (``{"message",
  "type"}``: ``sampler_error``, ``engine_error``, ``aborted``, ``scoring_error``) when it did not end normally and
  ``"token_ids"`` with ``return_token_ids``; choice ``i * n + j`` is sample ``j`` of prompt ``i``; ``usage`` counts
  each prompt's tokens once and every generated token.
* completion logprobs (OpenAI's legacy object): ``tokens`` (each token decoded alone), ``token_logprobs`` (null
  where there is none or it is not finite), ``top_logprobs`` (null, or per token ``{token: logprob}`` of the most
  likely tokens plus the token itself; -inf is written -9999.0 as vLLM does) and ``text_offset``: the offset of each
  token in the concatenation of the ``tokens`` strings, from 0 at the first token of the choice's text. A stream's
  chunks carry the same values, split over chunks, whatever text the stream holds back for stop strings.
* ``echo``: the choice's text is the prompt's text (the string given, or the token ids decoded) followed by the
  completion; its logprobs cover the prompt's tokens then the completion's (with the EOS token that ended it, as
  vLLM lists it: :func:`echoed_ids`), from :class:`Scored`.
* a stream: for chat, one ``{"role": "assistant", "content": ""}`` delta per choice first; then a chunk whenever a
  choice's text grows (or its logprobs do), the last one of a choice with its ``finish_reason``; with
  ``include_usage`` a last chunk with ``"choices": []`` and ``usage``; then ``data: [DONE]``.
"""
from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

from .protocol import APIError, Job


def dumps(obj) -> str:
    """Compact JSON (responses and stream chunks)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def error_json(err: APIError) -> str:
    """An error body as ASCII JSON: whatever the message quotes (a client's bytes), it encodes."""
    return json.dumps(err.body(), separators=(",", ":"), ensure_ascii=True)


def finite(x) -> Optional[float]:
    """A logprob for JSON (``-inf`` and NaN cannot be encoded: null)."""
    return float(x) if isinstance(x, numbers.Real) and math.isfinite(x) else None


def _top_value(x: float) -> Optional[float]:
    return max(float(x), -9999.0) if not math.isnan(x) else None


class Scored(NamedTuple):
    """A token sequence scored under the combined distribution (:mod:`rast_kernels.engine.scoring`): per token,
    its logprob (None for the first: nothing precedes it) and ``(token id, logprob)`` of the most likely tokens at
    its position (None for the first); ``error`` when scoring failed (then both lists are empty)."""

    logprobs: List[Optional[float]]
    top: List[Optional[List[Tuple[int, float]]]]
    error: Optional[str] = None


@dataclass
class Reply:
    """What every builder of one request's answer needs."""

    job: Job
    rid: str
    created: int
    model: str
    token_text: Callable[[int], str]  # one token id decoded alone
    prompt_ids: List[List[int]] = field(default_factory=list)  # per prompt, as tokenized
    prompt_texts: List[str] = field(default_factory=list)  # per prompt (echo)

    @property
    def kind(self) -> str:
        return self.job.kind

    def prompt_of(self, ci: int) -> int:
        return ci // self.job.params.n


def completion_logprobs(token_text, ids, logprobs, top=None, offset0: int = 0) -> dict:
    """OpenAI's legacy logprobs object for ``ids`` (module docstring); ``top``: per token None or
    ``[(id, logprob)]``, or None for no ``top_logprobs`` at all; offsets start at ``offset0``."""
    toks = [token_text(t) for t in ids]
    offsets, pos = [], offset0
    for s in toks:
        offsets.append(pos)
        pos += len(s)
    tops = None
    if top is not None:
        tops = []
        for s, lp, alts in zip(toks, logprobs, top):
            if alts is None:
                tops.append(None)
                continue
            d = {s: _top_value(lp)}
            for tid, v in alts:
                d.setdefault(token_text(tid), _top_value(v))
            tops.append(d)
    return {"tokens": toks, "token_logprobs": [finite(x) for x in logprobs], "top_logprobs": tops,
            "text_offset": offsets}


def chat_logprobs(token_text, ids, logprobs) -> dict:
    toks = [token_text(t) for t in ids]
    return {"content": [{"token": s, "logprob": finite(v), "bytes": list(s.encode("utf-8")), "top_logprobs": []}
                        for s, v in zip(toks, logprobs)]}


def _error(type_: str, message: str) -> dict:
    return {"message": message, "type": type_}


def _ended_error(reason: str, message: str) -> dict:  # an engine step failed ("error"), or an abort ended it
    return _error("engine_error" if reason == "error" else "aborted", message)


def echoed_ids(out) -> List[int]:
    """A completion's tokens as ``echo`` scores and lists them: the generated ids plus the EOS id that ended the
    row, which the engine leaves out of ``token_ids`` (vLLM lists it: lm-eval drops each response's last token as
    the generated one, so without it a continuation would lose its last token)."""
    eos = out.stop_reason if out.finish_reason == "stop" else None
    tail = [eos] if isinstance(eos, int) and not isinstance(eos, bool) else []
    return list(out.token_ids) + tail


def _echo_logprobs(reply: Reply, ci: int, out, scored: Optional[Scored]):
    """``(logprobs object or None, error or None)`` of an echoed choice."""
    if not reply.job.logprobs:
        return None, None
    if scored is None or scored.error is not None:
        return None, _error("scoring_error", scored.error if scored is not None else "not scored")
    ids = reply.prompt_ids[reply.prompt_of(ci)] + echoed_ids(out)
    return completion_logprobs(reply.token_text, ids, scored.logprobs, scored.top), None


def choice(reply: Reply, ci: int, final: dict) -> dict:
    """Choice ``ci`` of a whole response; ``final``: ``{"out": GenerationOutput, "scored": Scored | None}``, or
    ``{"out": None, "reason", "message"}`` for a choice that an abort or a failed step ended."""
    job, out = reply.job, final["out"]
    echo = reply.prompt_texts[reply.prompt_of(ci)] if job.echo else ""
    lp, err = None, None
    if out is None:
        text, reason, ids, err = echo, final["reason"], [], _ended_error(final["reason"], final["message"])
    else:
        text, reason, ids = echo + out.text, out.finish_reason, out.token_ids
        if out.finish_reason == "error":
            err = _error("sampler_error", out.error)
        if job.echo:
            lp, scoring_err = _echo_logprobs(reply, ci, out, final.get("scored"))
            err = err or scoring_err
        elif job.logprobs:
            lp = (chat_logprobs if job.kind == "chat" else completion_logprobs)(reply.token_text, ids,
                                                                                 out.logprobs or [])
    c = {"index": ci}
    if job.kind == "chat":
        c["message"] = {"role": "assistant", "content": text}
    else:
        c["text"] = text
    c["logprobs"] = lp
    c["finish_reason"] = reason
    if err is not None:
        c["error"] = err
    if job.return_token_ids:
        c["token_ids"] = list(ids)
    return c


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def full_response(reply: Reply, finals: Dict[int, dict], created: int) -> dict:
    """The non-streamed answer from every choice's final state (see :func:`choice`)."""
    choices = [choice(reply, ci, finals[ci]) for ci in range(len(finals))]
    generated = sum(len(f["out"].token_ids) for f in finals.values() if f["out"] is not None)
    return {"id": reply.rid, "object": "text_completion" if reply.kind == "completion" else "chat.completion",
            "created": created, "model": reply.model, "choices": choices,
            "usage": usage(sum(len(p) for p in reply.prompt_ids), generated)}


def collect(finals: Dict[int, dict], event, sequences: int) -> bool:
    """Record an engine event of a non-streamed request in ``finals``; True once the request is over."""
    if event[0] == "output":
        _, out, ci, scored = event
        if out.finished:
            finals[ci] = {"out": out, "scored": scored}
        return False
    if event[0] == "ended":
        for ci in range(sequences):
            finals.setdefault(ci, {"out": None, "reason": event[1], "message": event[2]})
    return event[0] in ("ended", "done")


def sse(obj) -> str:
    return "data: " + dumps(obj) + "\n\n"


SSE_DONE = "data: [DONE]\n\n"


class _ChoiceState:
    __slots__ = ("text", "tokens", "offset", "ntok", "open")

    def __init__(self):
        self.text = ""  # streamed so far
        self.tokens = 0  # tokens whose logprobs were sent
        self.offset = 0  # text_offset of the next token: the sent tokens' strings' total length
        self.ntok = 0
        self.open = True


class StreamBuilder:
    """The chunks of a streamed answer, event by event (module docstring). Call :meth:`start`, then
    :meth:`on_event` for each engine event until :attr:`done`, then :meth:`finish`."""

    def __init__(self, reply: Reply, sequences: int, created: int, warn: Optional[Callable[[str], None]] = None):
        self.reply, self.created, self.warn = reply, created, warn
        self.state = [_ChoiceState() for _ in range(sequences)]
        self.object = "text_completion" if reply.kind == "completion" else "chat.completion.chunk"

    @property
    def done(self) -> bool:
        return not any(s.open for s in self.state)

    def _chunk(self, choices: list, **extra) -> str:
        return sse({"id": self.reply.rid, "object": self.object, "created": self.created, "model": self.reply.model,
                    "choices": choices, **extra})

    def _choice(self, ci, text, reason=None, lp=None, extra=None) -> str:
        if self.reply.kind == "chat":
            c = {"index": ci, "delta": {} if text is None else {"content": text}, "logprobs": lp,
                 "finish_reason": reason}
        else:
            c = {"index": ci, "text": text or "", "logprobs": lp, "finish_reason": reason}
        return self._chunk([dict(c, **(extra or {}))])

    def start(self) -> List[str]:
        if self.reply.kind != "chat":
            return []
        return [self._chunk([{"index": ci, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]) for ci in range(len(self.state))]

    def _logprobs(self, st: _ChoiceState, out):
        ids = out.token_ids
        if not (self.reply.job.logprobs and out.logprobs is not None and len(ids) > st.tokens):
            return None
        new_ids, new_lps = ids[st.tokens:], out.logprobs[st.tokens:]
        st.tokens = len(ids)
        if self.reply.kind == "chat":
            return chat_logprobs(self.reply.token_text, new_ids, new_lps)
        lp = completion_logprobs(self.reply.token_text, new_ids, new_lps, offset0=st.offset)
        st.offset += sum(len(s) for s in lp["tokens"])
        return lp

    def _output(self, out, ci) -> List[str]:
        st = self.state[ci]
        if not st.open:
            return []
        delta = ""
        if out.text.startswith(st.text):
            delta, st.text = out.text[len(st.text):], out.text
        elif out.finished and self.warn:  # the final decode is not an extension of what was streamed (rare)
            self.warn(f"stream {self.reply.rid} choice {ci}: final text diverged from the streamed prefix")
        st.ntok = len(out.token_ids)
        lp = self._logprobs(st, out)
        if out.finished:
            extra = {}
            if out.finish_reason == "error":
                extra["error"] = _error("sampler_error", out.error)
            if self.reply.job.return_token_ids:
                extra["token_ids"] = list(out.token_ids)
            st.open = False
            return [self._choice(ci, delta, out.finish_reason, lp, extra)]
        return [self._choice(ci, delta, None, lp)] if delta or lp is not None else []

    def on_event(self, event) -> List[str]:
        if event[0] == "output":
            return self._output(event[1], event[2])
        chunks = []
        if event[0] == "ended":
            for ci, st in enumerate(self.state):
                if st.open:
                    chunks.append(self._choice(ci, None if self.reply.kind == "chat" else "", event[1], None,
                                               {"error": _ended_error(event[1], event[2])}))
        if event[0] in ("ended", "done"):
            for st in self.state:
                st.open = False
        return chunks

    def finish(self) -> List[str]:
        out = []
        if self.reply.job.include_usage:
            out.append(self._chunk([], usage=usage(sum(len(p) for p in self.reply.prompt_ids),
                                                   sum(s.ntok for s in self.state))))
        return out + [SSE_DONE]
