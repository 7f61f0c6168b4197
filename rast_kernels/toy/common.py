"""What the demo and the trainer share about the shipped trio: where it lives, the decode length, how
to load it and how its evaluation table is printed. Kept apart from :mod:`rast_kernels.toy.train` so
that the demo does not import the trainer (and the trainer's training code) just for these."""
from __future__ import annotations

import os

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trio")
MAX_NEW_TOKENS = 24  # the worked completion is N_BITS + 3 = 19 tokens
ROLES = ("base", "expert", "expert_base")


def trio_problem(path: str) -> str | None:
    """Why ``path`` is not a trio folder (``base/``, ``expert/``, ``expert_base/`` each with a
    ``config.json``), or None when it is one. Lets a CLI reject a bad ``--trio`` before loading."""
    if not os.path.isdir(path):
        return f"no such directory: {path!r}"
    missing = [r for r in ROLES if not os.path.isfile(os.path.join(path, r, "config.json"))]
    if missing:
        return f"{path!r} is not a trio folder: missing {', '.join(m + '/config.json' for m in missing)}"
    return None


def load_trio(path: str = DEFAULT_OUT, device="cpu"):
    """``{'base','expert','expert_base'}`` -> ``LlamaForCausalLM`` in eval mode, from ``path``."""
    from transformers import AutoModelForCausalLM

    return {k: AutoModelForCausalLM.from_pretrained(os.path.join(path, k)).to(device).eval() for k in ROLES}


def format_table(table) -> str:
    """Markdown table: accuracy +- standard error (worked-style share) for greedy and sampled rows."""
    rows = {}
    for r in table:
        rows.setdefault(r["row"], {})[r["decoding"]] = r
    n = table[0]["n"]
    lines = [f"| model (n = {n} held-out problems) | greedy acc | greedy worked | sample acc | sample worked |",
             "|---|---|---|---|---|"]
    for name, d in rows.items():
        cells = []
        for dec in ("greedy", "sample"):
            r = d.get(dec)
            cells += [f"{r['accuracy']:.3f} ± {r['stderr']:.3f}", f"{r['worked_share']:.2f}"] if r else ["", ""]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
