"""python -m rast_kernels demo: RAST on the embedded toy trio, on held-out problems.

Runs the shipped base, expert and expert base (``rast_kernels/toy/trio``) through ``rast_generate`` on
held-out parity problems (:mod:`rast_kernels.toy.task`), with and without the expert's RL delta, then prints an accuracy table
(with binomial standard errors), the table measured at training time, and a few side-by-side samples.
Progress goes to stderr, results to stdout.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

from .. import _cli
from ..ops.philox import mix_seed
from . import task
from .common import DEFAULT_OUT, MAX_NEW_TOKENS, format_table, load_trio, trio_problem


def _progress(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def run_rows(prompts, models, rows, *, temperature, top_p, seed, progress=_progress):
    """Decode ``prompts`` once per row; returns ``{row name: [completion text]}`` and the decoder used.

    ``rows``: ``[(name, base, expert, expert_base, alpha)]`` naming which of ``models`` fill each role;
    ``expert = expert_base = None`` decodes the model alone (the engine's base-alone mode, ``z = z_base``). Prompt ``i`` gets
    the Philox seed ``mix_seed(seed, i)`` in every row, as in the training-time table."""
    from ..engine import rast_generate

    out = {}
    seeds = [mix_seed(seed, i) for i in range(len(prompts))]
    for k, (name, b, e, eb, alpha) in enumerate(rows):
        t = time.time()
        res = rast_generate(prompts, base=models[b], expert=models.get(e), expert_base=models.get(eb), alpha=alpha,
                            temperature=temperature, top_p=top_p, max_new_tokens=MAX_NEW_TOKENS,
                            tokenizer=models["tokenizer"], seed=seeds,
                            max_batch_size=min(len(prompts), 128), max_seq_len=64)
        out[name] = [r.text for r in res]
        progress(f"row {k + 1}/{len(rows)} {name}: {len(prompts)} problems in {time.time() - t:.1f}s")
    return out, "rast_generate"


def build_parser():
    ap = _cli.ArgumentParser(prog="python -m rast_kernels demo", description=__doc__.split("\n")[0])
    ap.add_argument("--alpha", type=_cli.finite_float, default=1.0,
                    help="weight of the expert's RL delta in z_base + alpha * (z_expert - z_expert_base) (default 1)")
    ap.add_argument("--temperature", type=_cli.float_range(0.0), default=0.0,
                    help="sampling temperature: 0 = greedy (default), > 0 samples")
    ap.add_argument("--top-p", type=_cli.float_range(0.0, 1.0, lo_open=True), default=None,
                    help="nucleus sampling threshold in (0, 1] (default 1 = off; only used when --temperature > 0)")
    ap.add_argument("--problems", type=_cli.int_range(1, task.HELDOUT_SIZE), default=200,
                    help=f"held-out problems to run, 1..{task.HELDOUT_SIZE} (the size of the held-out split; default 200)")
    ap.add_argument("--seed", type=_cli.int_range(0), default=None,
                    help="sampling seed, >= 0 (default 0; only used when --temperature > 0)")
    ap.add_argument("--samples", type=_cli.int_range(0), default=4,
                    help="side-by-side samples to print, >= 0 (default 4)")
    ap.add_argument("--device", type=_cli.device, default="cpu", help="torch device: cpu (default), cuda or cuda:N")
    ap.add_argument("--trio", default=DEFAULT_OUT,
                    help="folder with base/, expert/ and expert_base/ (default: the shipped trio)")
    ap.add_argument("--threads", type=_cli.int_range(1), default=None,
                    help="torch CPU threads, >= 1 (default: torch's choice)")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    problem = trio_problem(args.trio)
    if problem:
        _cli.fail(ap, "--trio", problem)
    if args.temperature == 0:
        # greedy decoding takes the argmax: a nucleus or a seed cannot change any token, so say so
        # rather than let the user think they were applied
        ignored = [o for o, v in (("--top-p", args.top_p), ("--seed", args.seed)) if v is not None]
        if ignored:
            _progress(f"note: {' and '.join(ignored)} have no effect under greedy decoding (--temperature 0)")
    top_p = 1.0 if args.top_p is None else args.top_p
    seed = 0 if args.seed is None else args.seed

    _progress(f"loading the trio from {args.trio} (device {args.device})")
    t0 = time.time()
    import torch
    import transformers
    from transformers import AutoTokenizer

    transformers.utils.logging.disable_progress_bar()  # the weight-loading bars are noise for three tiny models

    if args.threads:
        torch.set_num_threads(args.threads)
    models = load_trio(args.trio, device=args.device)
    models["tokenizer"] = AutoTokenizer.from_pretrained(os.path.join(args.trio, "base"))
    problems = task.heldout_problems(args.problems)
    prompts = [p.prompt for p in problems]
    a = args.alpha
    rows = [("base", "base", None, None, 0.0),
            ("expert_base", "expert_base", None, None, 0.0),
            ("expert", "expert", None, None, 0.0),
            (f"base + delta (alpha={a:g})", "base", "expert", "expert_base", a)]
    _progress(f"loaded in {time.time() - t0:.1f}s; decoding {len(problems)} held-out problems, {len(rows)} rows")
    texts, decoder = run_rows(prompts, models, rows, temperature=args.temperature, top_p=top_p, seed=seed)
    dt = time.time() - t0

    mode = "greedy" if args.temperature == 0 else f"temperature {args.temperature:g}, top-p {top_p:g}, seed {seed}"
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
