"""OpenAI-compatible HTTP serving of a :class:`~rast_kernels.RastEngine` (the optional ``serve`` extra:
``pip install rast_kernels[serve]``, FastAPI + uvicorn).

``create_app(engine, ...)`` builds the app, ``serve(engine, host, port, ...)`` runs it until SIGTERM, and
``python -m rast_kernels serve`` (:func:`rast_kernels.serve.cli.main`) does both from the command line.
FastAPI and uvicorn are imported only when an app is built, so importing this package (e.g. for
:mod:`.protocol`, which needs pydantic alone) does not need them. Modules, one job each: :mod:`.protocol` (typed
request models, validation, errors), :mod:`.responses` (response and SSE chunk builders), :mod:`.app` (route
wiring, :func:`serve`), :mod:`.engine_loop` (the thread that drives the engine and scores ``echo``),
:mod:`.metrics` (``/metrics``), :mod:`.cli` (``python -m rast_kernels serve``).
"""
from __future__ import annotations

__all__ = ["create_app", "serve", "EngineLoop", "Metrics"]


def __getattr__(name):
    if name in ("create_app", "serve"):
        from . import app
        return getattr(app, name)
    if name == "EngineLoop":
        from .engine_loop import EngineLoop
        return EngineLoop
    if name == "Metrics":
        from .metrics import Metrics
        return Metrics
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
