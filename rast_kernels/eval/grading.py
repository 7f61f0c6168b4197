"""Answer grading: is a completion's final answer equal to the gold answer?

``grade(completion, gold, kind)`` returns a bool; :func:`grade_detail` also returns the extracted answer (the
key maj@k votes on). Kinds:

``"math"``
    math-verify (``pip install math-verify``, the ``eval`` extra): LaTeX / plain expression parsing,
    ``\\boxed{}`` extraction (only the last boxed answer is passed on when there are several: math-verify alone
    would join them into a set), symbolic and numeric
    equivalence (``\\frac12`` = ``0.5``, ``x = 3`` = ``3``, intervals, sets, units and ``^\\circ`` dropped).
    A gold answer without ``$`` or ``\\boxed`` is read as LaTeX math (it is wrapped in ``$...$``).
    **Time bound**: every call runs in a persistent worker *process* (started on first use, loading only
    math-verify and SymPy) and waits at most ``timeout`` seconds for its reply; past that the worker is killed
    (and restarted on the next call) and the answer counts as wrong. Inside the worker math-verify's own
    SIGALRM timeouts are set too (``parsing_timeout`` and ``timeout_seconds``, ``timeout / 2`` each, at least
    1 s): they end most slow cases cleanly, the deadline covers what a signal cannot interrupt (one long
    C-level operation) and callers outside the main thread, where those signals do not work.
``"gsm8k"``
    The final number. Gold: the number after the last ``####`` (GSM8K's format; a plain number works too).
    Completion: the number after its last ``####``, else in its last ``\\boxed{}``, else its last number.
    Thousands separators and ``$`` are dropped; numbers compare exactly as decimals (``18.00`` = ``18``).
``"toy"``
    The shipped parity task (:mod:`rast_kernels.toy.task`): the first ``E``/``O`` of the completion against the
    gold, which is ``"E"``/``"O"`` (or ``"0"``/``"1"``, or the problem's prompt ``Q<bits>=``).
"""
from __future__ import annotations

import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
from decimal import Decimal, InvalidOperation
from typing import Optional, Tuple

KINDS = ("math", "gsm8k", "toy")
DEFAULT_TIMEOUT = 10.0

_NUMBER = re.compile(r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


def _check(completion, gold, kind, timeout):
    if not isinstance(completion, str):
        raise TypeError(f"completion: expected a str, got {type(completion).__name__}")
    if not isinstance(gold, str):
        raise TypeError(f"gold: expected a str, got {type(gold).__name__}")
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout: expected a number of seconds > 0, got {timeout!r}")


def grade(completion: str, gold: str, kind: str, *, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """True when ``completion``'s final answer equals ``gold`` under ``kind`` (module docstring); never raises
    for a malformed answer (that is a wrong answer), only for bad arguments."""
    return grade_detail(completion, gold, kind, timeout=timeout)[0]


def grade_detail(completion: str, gold: str, kind: str, *,
                 timeout: float = DEFAULT_TIMEOUT) -> Tuple[bool, Optional[str]]:
    """``(correct, extracted)``: :func:`grade` plus the completion's extracted answer as a canonical string
    (None when it has none). Equal strings mean equal answers (what maj@k counts); for ``"math"`` it is
    SymPy's text of math-verify's first parse, so some equal values written differently get different keys."""
    _check(completion, gold, kind, timeout)
    if kind == "gsm8k":
        pred, ref = gsm8k_number(completion), gsm8k_number(gold)
        return (pred is not None and ref is not None and pred == ref), (None if pred is None else _fmt(pred))
    if kind == "toy":
        return _toy(completion, gold)
    boxed = _last_boxed(completion)
    if boxed is not None:
        # math-verify joins several boxed answers into one set ({2, 3}); a solution that boxes an attempt and
        # then a correction means the last one (the MATH convention, "last boxed only")
        completion = "\\boxed{" + boxed + "}"
    return _math_worker().grade(completion, gold, float(timeout))


# ---------------------------------------------------------------------------------------------- gsm8k
def _to_decimal(text: str) -> Optional[Decimal]:
    try:
        return Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None


def _fmt(d: Decimal) -> str:
    # one spelling per value, so that "18", "18.0" and "18.00" vote together in maj@k
    s = format(d.normalize(), "f")
    return "0" if s in ("-0", "0") else s


def _last_boxed(text: str) -> Optional[str]:
    """The content of the last ``\\boxed{...}`` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def gsm8k_number(text: str) -> Optional[Decimal]:
    """The final number of a GSM8K-style text (module docstring), as a ``Decimal``; None if there is none."""
    if "####" in text:
        region = text.rsplit("####", 1)[1]
        m = _NUMBER.search(region.replace("$", ""))
        return _to_decimal(m.group()) if m else None
    boxed = _last_boxed(text)
    if boxed is not None:
        nums = _NUMBER.findall(boxed.replace("{,}", ","))
        if nums:
            return _to_decimal(nums[-1])
    nums = _NUMBER.findall(text.replace("{,}", ","))
    return _to_decimal(nums[-1].rstrip(",")) if nums else None


# ---------------------------------------------------------------------------------------------- toy
def _toy(completion: str, gold: str):
    from ..toy import task

    g = gold.strip()
    if g in ("E", "O"):
        ref = task.ANSWER_CHARS.index(g)
    elif g in ("0", "1"):
        ref = int(g)
    else:
        try:
            ref = task.parse_prompt(g).answer
        except ValueError:
            raise ValueError(f"gold: a toy answer is 'E'/'O', '0'/'1' or a prompt 'Q<bits>=', got {gold!r}")
    pred = task.extract_answer(completion)
    return pred == ref, (None if pred is None else task.ANSWER_CHARS[pred])


# ---------------------------------------------------------------------------------------------- math
class _MathWorker:
    """One math-verify process, fed one JSON line per answer; killed and restarted when a reply is late."""

    def __init__(self):
        self.proc = None
        self.lock = threading.Lock()  # one request in flight per pipe

    def _start(self):
        try:
            import math_verify  # noqa: F401 - fail here, in the caller, with the install hint
        except ImportError:
            raise ImportError("grading kind 'math' needs math-verify: pip install math-verify "
                              "(or pip install 'rast_kernels[eval]')") from None
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_math_worker.py")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, text=True, bufsize=1)
        # the worker says "ready" once its imports are done, so that their time (about a second) is not
        # charged to the first answer's deadline
        ready, _, _ = select.select([self.proc.stdout], [], [], 120.0)
        if not ready or self.proc.stdout.readline().strip() != "ready":
            self.close()
            raise RuntimeError("grading kind 'math': the math-verify worker process did not start")

    def close(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def grade(self, completion: str, gold: str, timeout: float):
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            self.proc.stdin.write(json.dumps([completion, gold, max(1.0, timeout / 2)]) + "\n")
            self.proc.stdin.flush()
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            line = self.proc.stdout.readline() if ready else ""
            if not line:  # past the deadline, or the worker died: that answer is wrong, the next call restarts
                self.close()
                return False, None
            reply = json.loads(line)
            return bool(reply[0]), reply[1]


_WORKER: Optional[_MathWorker] = None


def _math_worker() -> _MathWorker:
    global _WORKER
    if _WORKER is None:
        _WORKER = _MathWorker()
        atexit.register(_WORKER.close)
    return _WORKER
