#!/usr/bin/env python
"""The logit-arithmetic presets on one engine, run on the shipped toy trio (CPU, seconds):

* ``rast``: RAST, ``z = base + alpha * (expert - expert_base)`` (one pair; lists of models give several pairs:
  ``RastEngine(base, [e1, e2], [eb1, eb2])`` with ``alpha=[a1, a2]``);
* ``two-pairs``: the toy's one delta split over two pairs with weights ``alpha/2`` each (the same distribution as
  ``rast``, here as a check that several pairs add up: the tokens match ``rast``'s up to float rounding);
* ``proxy-tuning``: ``z = base + alpha * (expert - anti_expert)``: RAST's formula with the tuned small model
  as the expert and its untuned version as the anti-expert (the same models here; the point is the mapping);
* ``contrastive``: contrastive decoding, ``z = (1 + beta) * z_expert - beta * z_amateur`` over the expert's
  plausible tokens (``p_expert >= a * max p_expert``): ``base = expert = the strong model``, ``expert_base =
  the amateur``, ``alpha = beta``, ``base_plausibility = a``. The strong model is given twice and runs once per
  step.

Prints each preset's greedy accuracy on held-out toy problems. Example::

    python python/presets.py --problems 64
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def build_parser():
    from rast_kernels import _cli

    ap = _cli.ArgumentParser(prog="presets.py", description=__doc__.replace("``", ""),
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=_cli.int_range(1, 1024), default=64, help="held-out toy problems (default 64)")
    ap.add_argument("--alpha", type=_cli.finite_float, default=1.0, help="RAST / proxy-tuning weight (default 1)")
    ap.add_argument("--beta", type=_cli.finite_float, default=0.5, help="contrastive decoding's beta (default 0.5)")
    ap.add_argument("--plausibility", type=_cli.float_range(0.0, 1.0), default=0.1,
                    help="contrastive decoding's a (default 0.1, as in the papers)")
    return ap


def presets(paths: dict, alpha: float, beta: float, plausibility: float) -> dict:
    """``{name: (engine arguments (base, expert, expert_base), sampling keywords)}``."""
    base, expert, expert_base = paths["base"], paths["expert"], paths["expert_base"]
    return {
        "base alone": ((base, None, None), {}),
        "rast": ((base, expert, expert_base), dict(alpha=alpha)),
        "two-pairs": ((base, [expert, expert], [expert_base, expert_base]), dict(alpha=[alpha / 2, alpha / 2])),
        "proxy-tuning": ((base, expert, expert_base), dict(alpha=alpha)),
        "contrastive": ((expert, expert, base), dict(alpha=beta, base_plausibility=plausibility)),
    }


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from rast_kernels import RastEngine
    from rast_kernels.toy.common import DEFAULT_OUT, MAX_NEW_TOKENS, ROLES
    from rast_kernels.toy.task import check_answer, heldout_problems

    paths = {r: os.path.join(DEFAULT_OUT, r) for r in ROLES}
    problems = heldout_problems(args.problems)
    prompts = [p.prompt for p in problems]
    for name, (models, kw) in presets(paths, args.alpha, args.beta, args.plausibility).items():
        t0 = time.perf_counter()
        engine = RastEngine(*models, devices="cpu", max_batch_size=32, max_seq_len=64)
        outs = engine.generate(prompts, temperature=0.0, max_new_tokens=MAX_NEW_TOKENS, **kw)
        acc = sum(check_answer(p, o.text) for p, o in zip(problems, outs)) / len(problems)
        print(f"{name:13s} models={len(engine.lanes)}  greedy accuracy {acc:.3f}  "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
