"""Shared command-line validation for every CLI of the project (``python -m rast_kernels``, ``python/*.py``,
``benchmarks/*.py``): an argparse parser whose errors are one line, argparse ``type=`` helpers that
range-check numbers, device strings checked against this machine, and paths checked before any work.

A user error must surface as ``prog: error: argument --name: why`` on one stderr line with exit status 2,
before a model is loaded or a kernel compiled; these helpers exist so that each script does not grow its
own slightly different copy of the same checks.
"""
from __future__ import annotations

import argparse
import math
import os


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose ``error()`` prints a single line (no usage block) and exits 2.

    argparse's default prints the whole usage first, which for these CLIs wraps over many lines and
    buries the message; ``--help`` still shows the usage. Subparsers inherit the class."""

    def error(self, message: str):  # noqa: D401 - argparse's signature
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def fail(parser: argparse.ArgumentParser, option: str, why: str):
    """Report ``option``'s bad value through ``parser`` (one line, exit 2); for checks made after parsing."""
    parser.error(f"argument {option}: {why}")


def _number(kind, text: str):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def int_range(lo: int | None = None, hi: int | None = None):
    """argparse ``type=``: an int in ``[lo, hi]`` (either bound may be None)."""

    def parse(text: str) -> int:
        value = _number(int, text)
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {_bounds(lo, hi)}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in some messages
    return parse


def float_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False):
    """argparse ``type=``: a finite float in the interval ``lo..hi`` (open ends where asked)."""

    def parse(text: str) -> float:
        value = _number(float, text)
        bad = ((lo is not None and (value <= lo if lo_open else value < lo))
               or (hi is not None and (value >= hi if hi_open else value > hi)))
        if bad:
            raise argparse.ArgumentTypeError(f"must be {_interval(lo, hi, lo_open, hi_open)}, got {text}")
        return value

    parse.__name__ = "float"
    return parse


def finite_float(text: str) -> float:
    """argparse ``type=``: any finite float (NaN and inf are rejected: they would poison every logit)."""
    return _number(float, text)


def _bounds(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f"between {lo} and {hi}"
    return f">= {lo}" if lo is not None else f"<= {hi}"


def _interval(lo, hi, lo_open, hi_open) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    return f"{'<' if hi_open else '<='} {hi:g}"


def device(text: str) -> str:
    """argparse ``type=``: a torch device string that exists on this machine (``cpu``, ``cuda``, ``cuda:N``).

    Checked here because torch's own errors for these come late (after models are loaded) and as
    tracebacks: ``cuda`` on a machine without a usable GPU, an index past the device count, a typo."""
    if text == "cpu":  # the usual default: no need to import torch (seconds) just to parse options
        return text
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (expected cpu, cuda or cuda:N)")
    if dev.type == "cpu":
        return text
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r} asked for, but CUDA is not available here "
                                             f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: only {torch.cuda.device_count()} CUDA device(s) here")
        return text
    raise argparse.ArgumentTypeError(f"unsupported device {text!r} (expected cpu, cuda or cuda:N)")


def existing_file(text: str) -> str:
    """argparse ``type=``: a readable regular file."""
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    if not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"not readable: {text!r}")
    return text


def existing_dir(text: str) -> str:
    """argparse ``type=``: an existing directory."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"no such directory: {text!r}")
    return text


def output_dir(text: str) -> str:
    """argparse ``type=``: a directory that exists or can be created (created here, so that a typo or a
    read-only place fails before a long run rather than when its results are written)."""
    try:
        os.makedirs(text, exist_ok=True)
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot create directory {text!r}: {exc.strerror or exc}")
    if not os.access(text, os.W_OK):
        raise argparse.ArgumentTypeError(f"directory not writable: {text!r}")
    return text



def read_json(parser: argparse.ArgumentParser, option: str, path: str):
    """The JSON value in ``path``; a missing, unreadable or malformed file is ``option``'s error."""
    import json

    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as exc:
        fail(parser, option, f"cannot read {path!r}: {exc.strerror or exc}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        fail(parser, option, f"{path!r} is not valid JSON ({exc})")
