"""Command line: python -m rast_kernels {info, selftest, demo, eval, serve} [options] | --version."""
from __future__ import annotations

import importlib.metadata
import platform
import sys

from rast_kernels import _cli


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info() -> str:
    """Versions, available backends and the GPU, as printable text."""
    import torch

    import rast_kernels
    from rast_kernels import _backends

    mod = _backends.cpp_module()
    lines = [
        f"rast_kernels  {rast_kernels.__version__}",
        f"python        {platform.python_version()} ({sys.platform})",
        f"torch         {torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        f"triton        {_version('triton')}",
        f"transformers  {_version('transformers')}",
        "backends:",
        f"  triton              {'yes' if _backends.has_triton() else 'no'}"
        + (" (interpreter: TRITON_INTERPRET set)" if _backends.triton_interpreting() else ""),
        # why it did not import: not built, or built against another torch / CUDA (the ImportError says which)
        f"  compiled CPU (_C)   {'yes' if mod is not None else f'no ({_backends.cpp_import_error()})'}",
        f"  compiled CUDA (_C)  {'yes' if _backends.has_cpp_cuda() else 'no'}",
    ]
    if mod is not None and hasattr(mod, "__build_info__"):
        lines.append(f"  build               {mod.__build_info__}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            prop = torch.cuda.get_device_properties(i)
            lines.append(f"gpu {i}: {prop.name}, sm_{prop.major}{prop.minor}, {prop.total_memory / 2**30:.0f} GiB")
    else:
        lines.append("gpu: none (CPU only)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import rast_kernels

    parser = _cli.ArgumentParser(prog="python -m rast_kernels", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"rast_kernels {rast_kernels.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{info,selftest,demo,eval,serve}")
    sub.add_parser("info", help="versions, backends and GPU")
    sub.add_parser("selftest", help="check every kernel against its reference and the engine's graph against eager "
                                    "(options: selftest --help)", add_help=False)
    # the other commands parse their own options in their modules, so their --help is the full one
    sub.add_parser("demo", help="RAST on the embedded toy model trio (options: demo --help)", add_help=False)
    sub.add_parser("eval", help="evaluate base, expert and base + delta on datasets (options: eval --help)",
                   add_help=False)
    sub.add_parser("serve", help="OpenAI-compatible HTTP server over one RAST engine (options: serve --help)",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "info":
        if rest:
            parser.error(f"info takes no arguments, got {' '.join(rest)}")
        print(info())
        return 0
    if args.command == "selftest":
        from rast_kernels.selftest import main as command_main
    elif args.command == "eval":
        from rast_kernels.eval.cli import main as command_main
    elif args.command == "serve":
        from rast_kernels.serve.cli import main as command_main
    else:
        from rast_kernels.toy.demo import main as command_main
    return command_main(rest)


if __name__ == "__main__":
    sys.exit(main())
