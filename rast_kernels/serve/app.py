"""The OpenAI-compatible HTTP app (FastAPI) over one :class:`~rast_kernels.RastEngine`, and :func:`serve`.

Endpoints:

* ``POST /v1/completions``, ``POST /v1/chat/completions`` (:mod:`.protocol` for the fields): a JSON response with
  ``choices`` (``index``, ``text`` or ``message``, ``finish_reason`` "stop"/"length"; "error" plus an ``error``
  object for a row the sampler rejected or a failed engine step; "abort" when shutdown ended it) and ``usage``;
  with ``"stream": true``, server-sent events in OpenAI's chunk format (``data: {...}\\n\\n``, last
  ``data: [DONE]\\n\\n``). Validation errors are answered before anything runs (400, 404 for an unknown
  ``model``), with ``{"error": {"message", "type", "param", "code"}}``.
* ``GET /v1/models``, ``GET /health`` (200, or 503 while draining or after the engine loop died), ``GET /metrics``
  (:mod:`.metrics`).

Faults: a body over ``max_body_bytes`` is refused (400, ``param: "body"``) without being read to the end; a
client that disconnects aborts its request at once (a watcher task waits for ``http.disconnect``); past
``max_waiting`` waiting sequences new requests get 429 with ``Retry-After``. :func:`serve` handles SIGTERM /
SIGINT: stop accepting, let running requests finish for ``drain_timeout`` seconds, end the rest with
``finish_reason: "abort"``, return 0.
"""
# no `from __future__ import annotations`: FastAPI must see the real `Request` class in the handlers' signatures
import asyncio
import contextlib
import logging
import math
import signal
import traceback
import time
import uuid
from typing import Optional

from .engine_loop import EngineLoop, Ticket
from .metrics import Metrics
from .protocol import APIError, ChatPrompt, Job, Limits, bad, dumps, finite, parse_json, parse_request

log = logging.getLogger("rast_kernels.serve")

DEFAULT_MAX_BODY_BYTES = 4 << 20
_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


def _json_response(obj, status=200, headers=None):
    from starlette.responses import Response

    return Response(dumps(obj), status_code=status, media_type="application/json", headers=headers)


def _error_response(err: APIError):
    return _json_response(err.body(), err.status, err.headers)


class _CountRequests:
    """ASGI middleware: counts answered requests per endpoint and status for ``/metrics``."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = path if path in _ENDPOINTS else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.count_http(endpoint, message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


async def _read_body(request, limit: int) -> bytes:
    """The body, refusing more than ``limit`` bytes before reading them (Content-Length) or as they arrive."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise bad("body", f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes "
                          "(max_body_bytes)", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise bad("body", f"request body exceeds the limit of {limit} bytes (max_body_bytes)",
                      code="body_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _watch_disconnect(request, loop: EngineLoop, ticket: Ticket) -> None:
    # uvicorn answers receive() with http.disconnect once the client is gone (or the response is complete, when
    # the abort is a no-op); the body has been read, so nothing else is waiting for messages here
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            loop.abort(ticket)
            return


def create_app(engine, *, model_name: str = "rast", max_waiting: int = 256,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, default_alpha: float = 1.0, max_n: int = 64,
               chat_template: Optional[str] = None):
    """A FastAPI app serving ``engine`` (module docstring). The engine loop thread starts with the app's lifespan
    (and stops with it); ``app.state.loop`` is the :class:`~.engine_loop.EngineLoop`. ``chat_template`` (a Jinja
    string) replaces the tokenizer's for ``/v1/chat/completions``."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.responses import PlainTextResponse, StreamingResponse

    for name, value, low in (("max_waiting", max_waiting, 1), ("max_body_bytes", max_body_bytes, 1),
                             ("max_n", max_n, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    if isinstance(default_alpha, bool) or not isinstance(default_alpha, (int, float)) \
            or not math.isfinite(default_alpha):
        raise ValueError(f"default_alpha: expected a finite number, got {default_alpha!r}")
    if not isinstance(model_name, str) or not model_name:
        raise ValueError(f"model_name: expected a non-empty str, got {model_name!r}")
    if chat_template is not None and not isinstance(chat_template, str):
        raise TypeError(f"chat_template: expected a str, got {type(chat_template).__name__}")
    metrics = Metrics()
    loop = EngineLoop(engine, metrics=metrics, max_waiting=max_waiting)
    limits = Limits(max_seq_len=engine.max_seq_len, max_n=max_n, default_alpha=float(default_alpha),
                    model_name=model_name)
    tokenizer = engine.tokenizer
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loop.start()
        try:
            yield
        finally:
            loop.stop()

    app = FastAPI(title="rast_kernels", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.loop = loop
    app.state.metrics = metrics
    app.add_middleware(_CountRequests, metrics=metrics)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return _json_response({"error": {"message": str(exc.detail), "type": "invalid_request_error",
                                         "param": None, "code": None}}, exc.status_code)

    @app.exception_handler(Exception)
    async def _bug(request, exc):  # a bug of ours, not the client's: say so in JSON, log it, keep serving
        log.error("unhandled error on %s:\n%s", request.url.path,
                  "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        return _json_response({"error": {"message": f"internal error: {type(exc).__name__}", "type": "server_error",
                                         "param": None, "code": None}}, 500)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return _json_response({"error": {"message": str(exc), "type": "invalid_request_error", "param": None,
                                         "code": None}}, 422)

    def render_chat(messages) -> ChatPrompt:
        if not template:
            raise bad("messages", "the tokenizer has no chat template; start the server with --chat-template FILE "
                                  "(or chat_template=...) or use /v1/completions", code="no_chat_template")
        try:
            text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as exc:  # the template's own checks (e.g. roles must alternate) raise from Jinja
            raise bad("messages", f"the chat template rejected them: {type(exc).__name__}: {exc}")
        if not isinstance(text, str):
            raise bad("messages", "the chat template did not render to text")
        return ChatPrompt(text)

    async def handle(request: Request, kind: str):
        t0 = time.perf_counter()
        body = parse_json(await _read_body(request, max_body_bytes))
        job = parse_request(body, kind, limits)
        if kind == "chat":
            job.prompts = [render_chat(job.prompts[0])]
        ticket = loop.submit(job, t0)
        watcher = asyncio.create_task(_watch_disconnect(request, loop, ticket))
        try:
            first = await ticket.queue.get()
        except BaseException:
            watcher.cancel()
            loop.abort(ticket)
            raise
        if first[0] == "rejected":
            watcher.cancel()
            raise first[1]
        counts = first[1]
        rid = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex
        if job.stream:
            return StreamingResponse(_stream(ticket, job, kind, rid, counts, watcher), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            finals = await _collect(ticket)
        finally:
            watcher.cancel()
            loop.abort(ticket)  # no-op when it finished; frees it when this handler was cancelled
        return _json_response(_full_response(job, kind, rid, counts, finals))

    def _choice_error(type_, message):
        return {"message": message, "type": type_}

    def _ended_error(reason, message):  # an engine step failed ("error") or shutdown / a disconnect ended it
        return _choice_error("engine_error" if reason == "error" else "aborted", message)

    async def _collect(ticket: Ticket) -> dict:
        finals = {}
        while True:
            ev = await ticket.queue.get()
            if ev[0] == "output":
                if ev[1].finished:
                    finals[ev[2]] = dict(out=ev[1])
            elif ev[0] == "ended":
                for ci in range(ticket.sequences):
                    finals.setdefault(ci, dict(out=None, reason=ev[1], message=ev[2]))
                return finals
            elif ev[0] == "done":
                return finals

    def _logprobs(job, kind, ids, lps, offset0=0):
        toks = [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
        vals = [finite(x) for x in lps]
        if kind == "chat":
            return {"content": [{"token": s, "logprob": v, "bytes": list(s.encode("utf-8")), "top_logprobs": []}
                                for s, v in zip(toks, vals)]}
        offsets, pos = [], offset0
        for s in toks:
            offsets.append(pos)
            pos += len(s)
        return {"tokens": toks, "token_logprobs": vals, "top_logprobs": None, "text_offset": offsets}

    def _full_response(job: Job, kind: str, rid: str, counts, finals) -> dict:
        choices, completion_tokens = [], 0
        for ci in range(len(finals)):
            f = finals[ci]
            out = f["out"]
            if out is None:
                text, reason, ids, lps, err = "", f["reason"], [], [], _ended_error(f["reason"], f["message"])
            else:
                text, reason, ids, lps = out.text, out.finish_reason, out.token_ids, out.logprobs or []
                err = _choice_error("sampler_error", out.error) if out.finish_reason == "error" else None
            completion_tokens += len(ids)
            c = {"index": ci}
            if kind == "chat":
                c["message"] = {"role": "assistant", "content": text}
            else:
                c["text"] = text
            c["logprobs"] = _logprobs(job, kind, ids, lps) if job.logprobs and out is not None else None
            c["finish_reason"] = reason
            if err is not None:
                c["error"] = err
            if job.return_token_ids:
                c["token_ids"] = list(ids)
            choices.append(c)
        prompt_tokens = sum(counts)
        return {"id": rid, "object": "text_completion" if kind == "completion" else "chat.completion",
                "created": int(time.time()), "model": model_name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}

    async def _stream(ticket: Ticket, job: Job, kind: str, rid: str, counts, watcher):
        obj = "text_completion" if kind == "completion" else "chat.completion.chunk"
        created = int(time.time())
        emitted = [""] * ticket.sequences
        sent_tok = [0] * ticket.sequences
        ntok = [0] * ticket.sequences
        open_ = set(range(ticket.sequences))

        def chunk(ci, delta_text, reason=None, lp=None, extra=None):
            if kind == "chat":
                delta = {} if delta_text is None else {"content": delta_text}
                c = {"index": ci, "delta": delta, "logprobs": lp, "finish_reason": reason}
            else:
                c = {"index": ci, "text": delta_text or "", "logprobs": lp, "finish_reason": reason}
            if extra:
                c.update(extra)
            return "data: " + dumps({"id": rid, "object": obj, "created": created, "model": model_name,
                                     "choices": [c]}) + "\n\n"

        try:
            if kind == "chat":
                for ci in range(ticket.sequences):
                    yield "data: " + dumps({"id": rid, "object": obj, "created": created, "model": model_name,
                                            "choices": [{"index": ci, "delta": {"role": "assistant", "content": ""},
                                                         "logprobs": None, "finish_reason": None}]}) + "\n\n"
            while open_:
                ev = await ticket.queue.get()
                if ev[0] == "output":
                    out, ci = ev[1], ev[2]
                    if ci not in open_:
                        continue
                    text = out.text
                    delta = ""
                    if text.startswith(emitted[ci]):
                        delta = text[len(emitted[ci]):]
                        emitted[ci] = text
                    elif out.finished:  # the final decode is not an extension of what was streamed (rare)
                        log.warning("stream %s choice %d: final text diverged from the streamed prefix", rid, ci)
                    ids = out.token_ids
                    ntok[ci] = len(ids)
                    lp = None
                    if job.logprobs and out.logprobs is not None and len(ids) > sent_tok[ci]:
                        lp = _logprobs(job, kind, ids[sent_tok[ci]:], out.logprobs[sent_tok[ci]:],
                                       len(emitted[ci]) - len(delta))
                        sent_tok[ci] = len(ids)
                    extra = None
                    if out.finished:
                        extra = {}
                        if out.finish_reason == "error":
                            extra["error"] = _choice_error("sampler_error", out.error)
                        if job.return_token_ids:
                            extra["token_ids"] = list(ids)
                        open_.discard(ci)
                        yield chunk(ci, delta, out.finish_reason, lp, extra)
                    elif delta or lp is not None:
                        yield chunk(ci, delta, None, lp)
                elif ev[0] == "ended":
                    for ci in sorted(open_):
                        yield chunk(ci, None if kind == "chat" else "", ev[1], None,
                                    {"error": _ended_error(ev[1], ev[2])})
                    open_.clear()
                elif ev[0] == "done":
                    open_.clear()
            if job.include_usage:
                prompt_tokens = sum(counts)
                yield "data: " + dumps({"id": rid, "object": obj, "created": created, "model": model_name,
                                        "choices": [], "usage": {"prompt_tokens": prompt_tokens,
                                                                 "completion_tokens": sum(ntok),
                                                                 "total_tokens": prompt_tokens + sum(ntok)}}) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            loop.abort(ticket)  # no-op when finished; a client gone mid-stream frees its slot and blocks now

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, "chat")

    @app.get("/v1/models")
    async def models():
        return _json_response({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": created, "owned_by": "rast_kernels",
             "max_model_len": engine.max_seq_len}]})

    @app.get("/health")
    async def health():
        if loop.dead is not None:
            return _json_response({"status": "dead", "error": loop.dead}, 503)
        if loop.draining:
            return _json_response({"status": "draining"}, 503)
        return _json_response({"status": "ok"})

    @app.get("/metrics")
    async def metrics_endpoint():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


def serve(engine, host: str = "127.0.0.1", port: int = 8000, *, drain_timeout: float = 30.0,
          log_level: str = "info", ready_file: Optional[str] = None, **app_options) -> int:
    """Serve ``engine`` over HTTP until SIGTERM / SIGINT (module docstring); returns 0 after a clean shutdown.
    ``app_options`` go to :func:`create_app`. ``ready_file``: written with ``host:port`` once listening."""
    import uvicorn

    app = create_app(engine, **app_options)
    loop: EngineLoop = app.state.loop

    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            if not loop.draining:
                log.info("signal %s: draining (up to %.1f s for running requests)", sig, drain_timeout)
                loop.begin_drain(drain_timeout)
            super().handle_exit(sig, frame)

        async def startup(self, sockets=None):
            await super().startup(sockets)
            if ready_file and self.started:
                bound = [s.getsockname() for srv in self.servers for s in srv.sockets]
                with open(ready_file, "w") as f:
                    f.write(f"{bound[0][0]}:{bound[0][1]}\n" if bound else f"{host}:{port}\n")

    # running requests end by drain_timeout (the loop aborts them); the margin lets their last chunks go out
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=int(drain_timeout) + 5, access_log=log_level == "debug")
    server = _Server(config)
    # uvicorn re-raises a captured signal after shutdown with the handler that was there before it started: make
    # that a no-op so a SIGTERM ends in exit status 0 rather than death by the default action
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            previous[sig] = signal.signal(sig, lambda s, f: None)
        except ValueError:  # not the main thread: uvicorn does not capture signals there either
            pass
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        loop.stop()
    if not server.started:
        return 1
    return 0
