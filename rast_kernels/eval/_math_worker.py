"""The math grader's worker process: reads JSON lines ``[completion, gold, seconds]`` on stdin, writes
``[correct, extracted]`` per line on stdout. Run by path (``python _math_worker.py``), never imported
by the package, so that starting it loads math-verify and SymPy only, not torch.

It runs math-verify in its own main thread, where math-verify's SIGALRM timeouts work
(``parsing_timeout`` / ``timeout_seconds``); the parent's deadline on each reply is the hard bound for what a
signal cannot interrupt (one long C-level operation such as a huge integer power).
"""
import json
import sys


def canonical(parsed):
    """A short text key for one parsed answer (what maj@k votes on), or None when nothing was parsed."""
    if not parsed:
        return None
    return str(parsed[0])


def gold_text(gold: str) -> str:
    # math-verify only extracts LaTeX inside an anchor ($...$, \boxed{}, "answer is"); a bare gold like
    # "\frac34" would parse to nothing, so an unanchored gold is put between dollars.
    return gold if ("$" in gold or "\\boxed" in gold) else f"${gold}$"


def main():
    from math_verify import parse, verify

    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        completion, gold, seconds = json.loads(line)
        secs = max(1, int(seconds))
        try:
            pred = parse(completion, parsing_timeout=secs)
            ref = parse(gold_text(gold), parsing_timeout=secs)
            ok = bool(pred) and bool(ref) and bool(verify(ref, pred, timeout_seconds=secs))
            reply = [ok, canonical(pred)]
        except Exception as exc:  # a grader crash on one answer is a wrong answer, not a dead run
            reply = [False, None, f"{type(exc).__name__}: {exc}"]
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
