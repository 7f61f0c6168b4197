"""``python -m rast_kernels demo``: RAST on the embedded toy trio, on held-out problems.

Runs the shipped base, expert and expert base (``rast_kernels/toy/trio``) through ``rast_generate`` on
held-out parity problems (:mod:`rast_kernels.toy.task`), with and without the expert's RL delta, then prints an accuracy table
(with binomial standard errors), the table measured at training time, and a few side-by-side samples.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

from . import task
from .train import DEFAULT_OUT, MAX_NEW_TOKENS, row_seed


def run_rows(prompts, models, rows, *, temperature, top_p, seed):
    """Decode ``prompts`` once per row; returns ``{row name: [completion text]}`` and the decoder used.

    ``rows``: ``[(name, base, expert, expert_base, alpha)]`` naming which of ``models`` fill each role;
    ``expert = expert_base = None`` decodes the model alone (the engine's base-alone mode, ``z = z_base``). Prompt ``i`` gets
    the Philox seed ``row_seed(seed, i)`` in every row, as in the training-time table."""
    from ..engine import rast_generate

    out = {}
    for name, b, e, eb, alpha in rows:
        res = rast_generate(prompts, base=models[b], expert=models.get(e), expert_base=models.get(eb), alpha=alpha,
                            temperature=temperature, top_p=top_p, max_new_tokens=MAX_NEW_TOKENS,
                            tokenizer=models["tokenizer"], seed=[row_seed(seed, i) for i in range(len(prompts))],
                            max_batch_size=min(len(prompts), 128), max_seq_len=64)
        out[name] = [r.text for r in res]
    return out, "rast_generate"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rast_kernels demo", description=__doc__.split("\n")[0])
    ap.add_argument("--alpha", type=float, default=1.0, help="weight of the expert's RL delta (default 1)")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--problems", type=int, default=200, help="held-out problems to run (default 200)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    ap.add_argument("--samples", type=int, default=4, help="side-by-side samples to print (default 4)")
    ap.add_argument("--device", default="cpu", help="torch device (default cpu)")
    ap.add_argument("--trio", default=DEFAULT_OUT, help="folder with base/ expert/ expert_base/ (default: shipped)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.problems < 1:
        ap.error("--problems must be >= 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        ap.error("--temperature must be >= 0")
    if not 0 < args.top_p <= 1:
        ap.error("--top-p must be in (0, 1]")
    if not math.isfinite(args.alpha):
        ap.error("--alpha must be finite")

    import torch
    import transformers
    from transformers import AutoTokenizer

    from .train import load_trio

    transformers.utils.logging.disable_progress_bar()  # the weight-loading bars are noise for three tiny models

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    models = load_trio(args.trio, device=args.device)
    models["tokenizer"] = AutoTokenizer.from_pretrained(os.path.join(args.trio, "base"))
    problems = task.heldout_problems(args.problems)
    prompts = [p.prompt for p in problems]
    a = args.alpha
    rows = [("base", "base", None, None, 0.0),
            ("expert_base", "expert_base", None, None, 0.0),
            ("expert", "expert", None, None, 0.0),
            (f"base + delta (alpha={a:g})", "base", "expert", "expert_base", a)]
    texts, decoder = run_rows(prompts, models, rows, temperature=args.temperature, top_p=args.top_p,
                              seed=args.seed)
    dt = time.time() - t0

    mode = "greedy" if args.temperature == 0 else f"temperature {args.temperature:g}, top-p {args.top_p:g}, seed {args.seed}"
    cfg = {r: models[r].config for r in ("base", "expert")}
    print(f"RAST toy demo: parity of {task.N_BITS}-bit strings, {len(problems)} held-out problems, {mode}, "
          f"decoder: {decoder}, device {args.device}, {dt:.1f}s")
    print("answer E (even) / O (odd), either at once (direct style) or after the running count of ones (worked style: S...)")
    print(f"z = z_base + alpha * (z_expert - z_expert_base); base: {cfg['base'].num_hidden_layers} layers x "
          f"{cfg['base'].hidden_size}, expert and expert_base: {cfg['expert'].num_hidden_layers} layers x "
          f"{cfg['expert'].hidden_size}, expert = expert_base after RL\n")
    width = max(len(r[0]) for r in rows)
    print(f"{'model':<{width}}  accuracy (± s.e.)   worked-style share")
    acc = {}
    for name, *_ in rows:
        ok = [task.check_answer(p, t) for p, t in zip(problems, texts[name])]
        p_hat = sum(ok) / len(ok)
        acc[name] = ok
        se = math.sqrt(p_hat * (1 - p_hat) / len(ok))
        worked = sum(task.style_of(t) == "worked" for t in texts[name]) / len(ok)
        print(f"{name:<{width}}  {p_hat:.3f} ± {se:.3f}      {worked:.2f}")
    d = [x - y for x, y in zip(acc[rows[3][0]], acc["base"])]
    m = sum(d) / len(d)
    se = math.sqrt(sum((x - m) ** 2 for x in d) / max(1, len(d) - 1) / len(d))
    print(f"\ngain of base + delta over base: {m:+.3f} ± {se:.3f} (paired s.e., {len(d)} problems)")

    shipped = os.path.join(args.trio, "eval.json")
    if os.path.exists(shipped):
        from .train import format_table
        with open(shipped) as f:
            ev = json.load(f)
        print(f"\nTable measured at training time (seed {ev['seed']}, {ev['eval']['problems']} held-out problems, "
              f"sampling at temperature {ev['eval']['sample_temperature']:g}):")
        print(format_table(ev["table"]))

    if args.samples > 0:
        print("\nSide by side (base alone | base + delta):")
        for i, p in enumerate(problems[:args.samples]):
            b, r = texts["base"][i], texts[rows[3][0]][i]
            mark = lambda t: "ok " if task.check_answer(p, t) else "bad"
            print(f"  {p.prompt}  answer {task.ANSWER_CHARS[p.answer]}\n    base        [{mark(b)}] {b}\n    base+delta  [{mark(r)}] {r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
