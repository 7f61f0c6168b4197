"""``python -m rast_kernels serve``: an OpenAI-compatible HTTP server over one RAST engine.

Every option is checked before a model is loaded (a bad one is one stderr line, exit status 2): the serve extra is
installed, the models are existing folders or well-formed hub ids, the port can be bound, the chat template file
is readable. Exit status 0 after a clean shutdown (SIGTERM / SIGINT).
"""
from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import sys

from .. import _cli

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def build_parser():
    from ..engine.config import add_engine_arguments

    ap = _cli.ArgumentParser(prog="python -m rast_kernels serve",
                             description="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, "
                                         "/v1/models, /health, /metrics; schema at /openapi.json, /docs) over one "
                                         "RAST engine")
    m = ap.add_argument_group("models")
    m.add_argument("--base", help="base model: a local folder or a hub id")
    m.add_argument("--expert", help="RL expert (small): folder or hub id; with --expert-base (omit both to serve "
                                    "the base model alone)")
    m.add_argument("--expert-base", help="the expert's base model: folder or hub id")
    m.add_argument("--toy", action="store_true", help="serve the shipped toy trio (rast_kernels/toy/trio)")
    m.add_argument("--chat-template", type=_cli.existing_file,
                   help="a Jinja chat template file for /v1/chat/completions (default: the tokenizer's)")
    m.add_argument("--model-name", default="rast", help="the name /v1/models lists and requests give (default rast)")
    m.add_argument("--alpha", type=_cli.finite_float, default=1.0,
                   help="alpha for requests that do not give one (default 1)")
    # every engine setting, under the engine's names (rast_kernels.engine.config)
    add_engine_arguments(ap)
    s = ap.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=_cli.int_range(0, 65535), default=8000, help="port (default 8000; 0: any free)")
    s.add_argument("--max-waiting", type=_cli.int_range(1), default=256,
                   help="waiting sequences beyond which new requests get 429 + Retry-After (default 256)")
    s.add_argument("--max-body-bytes", type=_cli.int_range(1024), default=4 << 20,
                   help="largest request body accepted (default 4 MiB)")
    s.add_argument("--max-n", type=_cli.int_range(1), default=64, help="largest n per request (default 64)")
    s.add_argument("--drain-timeout", type=_cli.float_range(0.0), default=30.0,
                   help="seconds running requests get to finish after SIGTERM before they are ended (default 30)")
    s.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info")
    s.add_argument("--ready-file", help="write host:port to this file once listening (for scripts and tests)")
    return ap


def _check_model(ap, option: str, value: str) -> str:
    if os.path.isdir(value):
        return value
    if os.path.exists(value):
        _cli.fail(ap, option, f"{value!r} is not a folder")
    looks_like_path = value.startswith((".", "/", "~")) or value.count("/") > 1 or os.sep in value.replace("/", "")
    if looks_like_path or not _HUB_ID.match(value):
        _cli.fail(ap, option, f"no such folder and not a hub id: {value!r}")
    return value


def _check_bind(ap, host: str, port: int) -> None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        _cli.fail(ap, "--host", f"cannot resolve {host!r}: {exc.strerror}")
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        sock.bind(addr)
    except OSError as exc:
        _cli.fail(ap, "--port", f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    finally:
        sock.close()


def parse_args(argv):
    """Parsed and checked options (exits 2 with one line on a bad one); loads nothing."""
    ap = build_parser()
    args = ap.parse_args(argv)
    missing = [mod for mod in ("fastapi", "uvicorn") if importlib.util.find_spec(mod) is None]
    if missing:
        ap.exit(2, f"{ap.prog}: error: the serve extra is not installed (missing {', '.join(missing)}): "
                   "pip install 'rast_kernels[serve]'\n")
    if args.toy:
        for opt in ("base", "expert", "expert_base"):
            if getattr(args, opt) is not None:
                _cli.fail(ap, "--toy", f"serves the shipped trio; do not also give --{opt.replace('_', '-')}")
        from ..toy.common import DEFAULT_OUT, ROLES, trio_problem

        why = trio_problem(DEFAULT_OUT)
        if why:
            _cli.fail(ap, "--toy", why)
        args.base, args.expert, args.expert_base = (os.path.join(DEFAULT_OUT, r) for r in ROLES)
    else:
        if args.base is None:
            _cli.fail(ap, "--base", "required (or --toy)")
        if (args.expert is None) != (args.expert_base is None):
            _cli.fail(ap, "--expert" if args.expert is None else "--expert-base",
                      "give --expert and --expert-base together (or neither: the base model alone)")
        for opt in ("base", "expert", "expert_base"):
            if getattr(args, opt) is not None:
                _check_model(ap, "--" + opt.replace("_", "-"), getattr(args, opt))
    if args.tokenizer is not None:
        _check_model(ap, "--tokenizer", args.tokenizer)
    if args.kv_cache_tokens is not None and args.kv_cache_tokens < args.block_size:
        _cli.fail(ap, "--kv-cache-tokens", f"must be >= --block-size ({args.block_size}), got {args.kv_cache_tokens}")
    if not args.model_name.strip() or len(args.model_name) > 256:
        _cli.fail(ap, "--model-name", "must be a non-empty name of at most 256 characters")
    args.chat_template_text = None
    if args.chat_template is not None:
        try:
            with open(args.chat_template, encoding="utf-8") as f:
                args.chat_template_text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            _cli.fail(ap, "--chat-template", f"cannot read {args.chat_template!r}: {exc}")
        try:
            import jinja2

            jinja2.Environment().parse(args.chat_template_text)
        except ImportError:
            pass
        except Exception as exc:  # jinja2.TemplateSyntaxError: found now, not at the first chat request
            _cli.fail(ap, "--chat-template", f"not a valid Jinja template: {exc}")
    if args.ready_file is not None:
        d = os.path.dirname(os.path.abspath(args.ready_file))
        if not os.path.isdir(d):
            _cli.fail(ap, "--ready-file", f"no such directory: {d!r}")
    if args.port != 0:
        _check_bind(ap, args.host, args.port)
    return ap, args


def main(argv=None) -> int:
    """Entry point of ``python -m rast_kernels serve [options]``; returns the exit status."""
    ap, args = parse_args(sys.argv[1:] if argv is None else argv)
    # SIGTERM while the models load: nothing is in flight yet, so a plain clean exit (serve() takes over after)
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: sys.exit(0))
    from ..engine import EngineConfig, RastEngine

    try:
        engine = RastEngine(args.base, args.expert, args.expert_base, config=EngineConfig.from_args(args))
    except (ValueError, TypeError, OSError) as exc:  # a model that will not load is the user's input too
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        ap.exit(2, f"{ap.prog}: error: could not build the engine: {msg}\n")
    except KeyboardInterrupt:
        print(f"{ap.prog}: interrupted while loading the models", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    from .app import serve

    print(f"[serve] {engine!r}", file=sys.stderr, flush=True)
    return serve(engine, args.host, args.port, drain_timeout=args.drain_timeout, log_level=args.log_level,
                 ready_file=args.ready_file, model_name=args.model_name, max_waiting=args.max_waiting,
                 max_body_bytes=args.max_body_bytes, default_alpha=args.alpha, max_n=args.max_n,
                 chat_template=args.chat_template_text)


if __name__ == "__main__":
    sys.exit(main())
