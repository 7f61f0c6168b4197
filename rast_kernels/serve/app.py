"""The OpenAI-compatible HTTP app (FastAPI) over one :class:`~rast_kernels.RastEngine`, and :func:`serve`.
This module only wires: requests are :mod:`.protocol`'s, answers :mod:`.responses`', the engine is driven by
:mod:`.engine_loop`, counters are :mod:`.metrics`'.

Endpoints:

* ``POST /v1/completions``, ``POST /v1/chat/completions`` (:mod:`.protocol` for the fields, :mod:`.responses` for
  the answers): a JSON response with ``choices`` and ``usage``, or with ``"stream": true`` server-sent events in
  OpenAI's chunk format. Validation errors are answered before anything runs (400, 404 for an unknown ``model``),
  with ``{"error": {"message", "type", "param", "code"}}`` (always ASCII JSON: it may quote the client's bytes).
* ``GET /openapi.json`` (the OpenAPI document: both request bodies' schemas) and ``GET /docs`` (FastAPI's
  interactive page over it).
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

from .. import __version__
from .engine_loop import EngineLoop, Ticket
from .metrics import Metrics
from .protocol import APIError, ErrorResponse, Limits, bad, parse_json, parse_request, render_chat, request_schemas
from .responses import Reply, StreamBuilder, collect, dumps, error_json, full_response

log = logging.getLogger("rast_kernels.serve")

DEFAULT_MAX_BODY_BYTES = 4 << 20
_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


def _json_response(obj, status=200, headers=None):
    from starlette.responses import Response

    return Response(dumps(obj), status_code=status, media_type="application/json", headers=headers)


def _error_response(err: APIError):
    from starlette.responses import Response

    return Response(error_json(err), status_code=err.status, media_type="application/json", headers=err.headers)


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


def _openapi(app, description: str, limits: Limits):
    """FastAPI's OpenAPI document plus the request models' schemas (the POST bodies refer to them)."""
    from fastapi.openapi.utils import get_openapi

    def openapi():
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=description, routes=app.routes)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(request_schemas(limits))
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


def _body(model_name: str) -> dict:
    """``openapi_extra`` of a POST whose JSON body is the request model ``model_name`` (read and validated by
    the handler itself: FastAPI's own body parsing would skip the byte limit and the body checks)."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model_name}"}}}}}


_ERRORS = {400: {"model": ErrorResponse, "description": "a bad request: `param` names the field"},
           404: {"model": ErrorResponse, "description": "an unknown `model`"},
           429: {"model": ErrorResponse, "description": "too many requests waiting (see Retry-After)"},
           503: {"model": ErrorResponse, "description": "shutting down, or the engine loop stopped"}}


def _check_options(max_waiting, max_body_bytes, max_n, default_alpha, model_name, chat_template) -> None:
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


class _Service:
    """What the two POST routes share: read and validate a body, submit its job to the engine loop, answer with
    :mod:`.responses`' builders (whole, or streamed)."""

    def __init__(self, loop: EngineLoop, limits: Limits, tokenizer, chat_template: Optional[str],
                 max_body_bytes: int):
        self.loop, self.limits, self.tokenizer, self.max_body_bytes = loop, limits, tokenizer, max_body_bytes
        self.template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)

    def token_text(self, t: int) -> str:
        return self.tokenizer.decode([t], skip_special_tokens=False)

    async def handle(self, request, kind: str):
        from starlette.responses import StreamingResponse

        t0 = time.perf_counter()
        job = parse_request(parse_json(await _read_body(request, self.max_body_bytes)), kind, self.limits)
        if kind == "chat":
            job.prompts = [render_chat(self.tokenizer, self.template, job.prompts[0])]
        loop = self.loop
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
        reply = Reply(job=job, rid=("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex,
                      created=int(time.time()), model=self.limits.model_name, token_text=self.token_text,
                      prompt_ids=first[1], prompt_texts=first[2])
        if job.stream:
            return StreamingResponse(self._stream(ticket, reply, watcher), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        finals = {}
        try:
            while not collect(finals, await ticket.queue.get(), ticket.sequences):
                pass
        finally:
            watcher.cancel()
            loop.abort(ticket)  # no-op when it finished; frees it when this handler was cancelled
        return _json_response(full_response(reply, finals, int(time.time())))

    async def _stream(self, ticket: Ticket, reply: Reply, watcher):
        builder = StreamBuilder(reply, ticket.sequences, reply.created, warn=log.warning)
        try:
            for chunk in builder.start():
                yield chunk
            while not builder.done:
                for chunk in builder.on_event(await ticket.queue.get()):
                    yield chunk
            for chunk in builder.finish():
                yield chunk
        finally:
            watcher.cancel()
            self.loop.abort(ticket)  # no-op when finished; a client gone mid-stream frees its slot and blocks now


def _error_handlers(app) -> None:
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        return _error_response(APIError(exc.status_code, None, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _bug(request, exc):  # a bug of ours, not the client's: say so in JSON, log it, keep serving
        log.error("unhandled error on %s:\n%s", request.url.path,
                  "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        return _error_response(APIError(500, None, f"internal error: {type(exc).__name__}", type="server_error"))


def create_app(engine, *, model_name: str = "rast", max_waiting: int = 256,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, default_alpha: float = 1.0, max_n: int = 64,
               chat_template: Optional[str] = None):
    """A FastAPI app serving ``engine`` (module docstring). The engine loop thread starts with the app's lifespan
    (and stops with it); ``app.state.loop`` is the :class:`~.engine_loop.EngineLoop`. ``chat_template`` (a Jinja
    string) replaces the tokenizer's for ``/v1/chat/completions``."""
    from fastapi import FastAPI, Request
    from starlette.responses import PlainTextResponse

    _check_options(max_waiting, max_body_bytes, max_n, default_alpha, model_name, chat_template)
    metrics = Metrics()
    loop = EngineLoop(engine, metrics=metrics, max_waiting=max_waiting)
    limits = Limits(max_seq_len=engine.max_seq_len, max_n=max_n, default_alpha=float(default_alpha),
                    model_name=model_name, vocab_size=engine.vocab_size)
    service = _Service(loop, limits, engine.tokenizer, chat_template, max_body_bytes)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        loop.start()
        try:
            yield
        finally:
            loop.stop()

    app = FastAPI(title="rast_kernels", version=__version__, lifespan=lifespan, docs_url="/docs", redoc_url=None,
                  openapi_url="/openapi.json")
    app.openapi = _openapi(app, "OpenAI-compatible completions over one RAST engine (rast_kernels): "
                                "z = z_base + sum_i alpha_i (z_expert_i - z_expert_base_i)", limits)
    app.state.loop = loop
    app.state.metrics = metrics
    app.add_middleware(_CountRequests, metrics=metrics)
    _error_handlers(app)

    @app.post("/v1/completions", openapi_extra=_body("CompletionRequest"), responses=_ERRORS,
              summary="Completions (OpenAI legacy) with RAST's fields; echo scores the prompt")
    async def completions(request: Request):
        return await service.handle(request, "completion")

    @app.post("/v1/chat/completions", openapi_extra=_body("ChatCompletionRequest"), responses=_ERRORS,
              summary="Chat completions with RAST's fields")
    async def chat_completions(request: Request):
        return await service.handle(request, "chat")

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
