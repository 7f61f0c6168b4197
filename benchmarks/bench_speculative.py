"""Benchmark speculative RAST: how often the drafts agree, what a round costs, and what that buys end to end.

Parts (``--parts``, run in the order given; each writes its rows to ``speculative.json`` as soon as they exist):

* ``acceptance``: the shipped toy trio (the only trained models we have; acceptance depends on real distributions)
  on held-out problems: for every ``k`` in ``--k``, both drafts (``expert``: the RL expert alone;
  ``combination``: the small models' own ``z_eb + alpha (z_e - z_eb)``), ``alpha`` in ``--alpha`` and
  ``temperature`` in ``--temperature``: drafted tokens, drafts checked against RAST's token (up to the first
  mismatch, within the row's end), accepted drafts, the acceptance rate (accepted / checked: the per-draft
  agreement) and the mean tokens per round; every run's tokens are compared with plain decoding's (``identical``).
* ``e2e``: tokens/s on the toy trio at each ``--batch``, greedy, alpha 1: plain RAST, speculative RAST
  (``--e2e-k``, the default draft) and the base alone through the same engine, interleaved ``--repeats`` times in
  one process (medians). RAST's completions are worked answers (~19 tokens); the base alone mostly answers in
  one token, so ``base_alone`` also decodes 24 tokens with EOS off (``base_alone_24``): the per-token comparison.
* ``round_cost``: random-init models with real configs (``--trio``, default ``qwen-small`` = Qwen2.5-1.5B +
  2 x Qwen2.5-0.5B; ``qwen`` = 7B + 2 x 1.5B on a GPU): the time of one speculative round against ``k + 1`` plain
  decode steps, and the base's forward over ``k + 1`` tokens against its one-token forward, both on the engine's
  own decode path (``--round-batch`` rows, ``--prompt-len`` tokens of context); each pair of the two timed
  alternately ``2 x --repeats`` times, reported as the median of the per-pair ratios.
* ``model`` (computed last, from the parts that ran): predicted speedups (MODEL, not measured):
  ``tokens per round x plain step / round``, from the measured round costs and the toy's acceptance, and for
  larger trios from a weight-bandwidth model (a step reads every model's weights once; a ``Q``-token forward
  costs ``verify_ratio(Q)`` one-token forwards: as measured here, and 1.0, the memory-bound case); with the
  per-token agreement ``p`` at which speculation breaks even.

Examples::

    python benchmarks/bench_speculative.py --out out/                       # CPU: toy trio + qwen-small
    python benchmarks/bench_speculative.py --parts acceptance e2e --out out/
    python benchmarks/bench_speculative.py --trio qwen --parts round_cost model --out out/   # on a GPU

Writes ``speculative.json`` (and ``speculative.png``: tokens per round against k, with matplotlib) under ``--out``.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
from pathlib import Path

import torch

import models
from common import device_name, interleaved, run_to_json, timed_s, utc_now, versions
from rast_kernels import RastEngine, SamplingParams, _cli
from rast_kernels.engine.plan import kv_bucket
from rast_kernels.toy.common import DEFAULT_OUT, ROLES

PARTS = ("acceptance", "e2e", "round_cost", "model")
DRAFTS = ("expert", "combination")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOY_NEW_TOKENS = 24  # the toy's completions: a worked answer is 18 tokens + EOS
# the model part's trios: (base, expert pair) config names in benchmarks/configs or ../shared/model-configs.json
MODEL_TRIOS = {"7B + 2 x 1.5B": ("Qwen2.5-7B", "Qwen2.5-1.5B"), "32B + 2 x 1.5B": ("Qwen2.5-32B", "Qwen2.5-1.5B"),
               "32B + 2 x 14B": ("Qwen2.5-32B", "Qwen2.5-14B")}
PARAMS_B = {"Qwen2.5-0.5B": 0.494, "Qwen2.5-1.5B": 1.544, "Qwen2.5-7B": 7.616, "Qwen2.5-14B": 14.770,
            "Qwen2.5-32B": 32.764}  # billions of parameters, from the public model cards


def parse_args(argv=None) -> argparse.Namespace:
    p = _cli.ArgumentParser(prog="bench_speculative.py", description=__doc__.split("\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="what to run (default: all)")
    p.add_argument("--device", type=_cli.device, default=None, help="device (default: cuda if any, else cpu)")
    p.add_argument("--k", type=_cli.int_range(1, 15), nargs="+", default=[1, 2, 3, 4, 6, 8],
                   help="drafted tokens per round to measure (default 1 2 3 4 6 8)")
    p.add_argument("--alpha", type=_cli.finite_float, nargs="+", default=[0.5, 1.0], help="acceptance: alphas")
    p.add_argument("--temperature", type=_cli.float_range(0.0), nargs="+", default=[0.0, 1.0],
                   help="acceptance: temperatures (0 = greedy)")
    p.add_argument("--problems", type=_cli.int_range(1, 13059), default=64, help="toy held-out problems (default 64)")
    p.add_argument("--batch", type=_cli.int_range(1, 256), nargs="+", default=[1, 8],
                   help="e2e batch sizes (default 1 8)")
    p.add_argument("--round-batch", type=_cli.int_range(1, 256), nargs="+", default=[1, 4],
                   help="round_cost batch sizes (default 1 4)")
    p.add_argument("--e2e-k", type=_cli.int_range(1, 15), default=4, help="e2e: drafted tokens per round (default 4)")
    p.add_argument("--repeats", type=_cli.int_range(1), default=3, help="timing repeats (medians; default 3)")
    p.add_argument("--trio", choices=sorted(models.TRIOS) + ["tiny"], default="qwen-small",
                   help="round_cost: random-init trio of real configs (default qwen-small; tiny: a smoke run)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="round_cost: weights (default fp32 on CPU, "
                                                                         "bf16 on CUDA)")
    p.add_argument("--prompt-len", type=_cli.int_range(1), default=64, help="round_cost: context tokens (default 64)")
    p.add_argument("--threads", type=_cli.int_range(1), default=None, help="CPU threads (default: torch's)")
    p.add_argument("--out", type=_cli.output_dir, default=None, help="directory for speculative.json")
    args = p.parse_args(argv)
    args.out = Path(args.out) if args.out is not None else None
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype is None:
        args.dtype = "fp32" if torch.device(args.device).type == "cpu" else "bf16"
    return args


# ---------------------------------------------------------------------------------------------------- toy trio
def toy_prompts(n: int, seed: int = 0) -> list:
    from rast_kernels.toy import task

    rng = random.Random(seed)
    out = []
    while len(out) < n:
        prompt = "Q" + "".join(rng.choice("01") for _ in range(task.N_BITS)) + "="
        if task.is_heldout(prompt):
            out.append(prompt)
    return out


def toy_engine(args, batch: int, **kw) -> RastEngine:
    paths = [os.path.join(DEFAULT_OUT, r) for r in ROLES]
    if kw.pop("base_alone", False):
        paths = [paths[0], None, None]
    return RastEngine(*paths, devices=args.device, max_batch_size=batch, max_seq_len=48, **kw)


def acceptance_rows(args, checkpoint) -> list:
    """Acceptance and tokens per round of every (k, draft, alpha, temperature) on the toy trio."""
    prompts, rows = toy_prompts(args.problems), []
    for temperature in args.temperature:
        for alpha in args.alpha:
            kw = dict(alpha=alpha, temperature=temperature, max_new_tokens=TOY_NEW_TOKENS, seed=11)
            plain = [o.token_ids for o in toy_engine(args, 8).generate(prompts, **kw)]
            for draft in DRAFTS:
                for k in args.k:
                    engine = toy_engine(args, 8, speculative_tokens=k, speculative_draft=draft)
                    got = [o.token_ids for o in engine.generate(prompts, **kw)]
                    s = engine.stats()
                    rows.append(dict(part="acceptance", k=k, draft=draft, alpha=alpha, temperature=temperature,
                                     problems=len(prompts), rounds=s["speculative_rounds"],
                                     drafted=s["speculative_drafted"], checked=s["speculative_checked"],
                                     accepted=s["speculative_accepted"], acceptance=s["speculative_acceptance"],
                                     tokens_per_round=s["speculative_tokens_per_round"], identical=got == plain))
                    print(f"acceptance k={k} {draft:11s} alpha={alpha} T={temperature}: "
                          f"{rows[-1]['acceptance']:.3f} accepted, {rows[-1]['tokens_per_round']:.2f} tokens/round, "
                          f"identical={rows[-1]['identical']}")
                    checkpoint(rows)
    return rows


def e2e_rows(args, checkpoint) -> list:
    """Tokens/s of plain RAST, speculative RAST and the base alone on the toy trio, interleaved."""
    rows = []
    for batch in args.batch:
        prompts = toy_prompts(max(16, 4 * batch), seed=1)
        base_alone = toy_engine(args, batch, base_alone=True)
        systems = {"rast": toy_engine(args, batch), "rast_speculative": toy_engine(
            args, batch, speculative_tokens=args.e2e_k), "base_alone": base_alone, "base_alone_24": base_alone}
        kw = dict(alpha=1.0, temperature=0.0, max_new_tokens=TOY_NEW_TOKENS, seed=5)
        per = {name: dict(kw, eos_token_id=[]) if name == "base_alone_24" else kw for name in systems}
        times = {name: [] for name in systems}
        tokens = {}
        for name, engine in systems.items():  # warm-up
            engine.generate(prompts[:batch], **per[name])
        for _ in range(args.repeats):
            for name, engine in systems.items():
                outs = []
                times[name].append(timed_s(lambda: outs.extend(engine.generate(prompts, **per[name])), args.device))
                tokens[name] = [o.token_ids for o in outs]
        for name in systems:
            n = sum(len(t) for t in tokens[name])
            med = statistics.median(times[name])
            rows.append(dict(part="e2e", system=name, batch=batch, prompts=len(prompts), tokens=n, s=med,
                             runs_s=times[name], tokens_per_s=n / med,
                             k=args.e2e_k if name == "rast_speculative" else 0,
                             identical_to_rast=tokens[name] == tokens["rast"]))
        base = next(r for r in rows if r["batch"] == batch and r["system"] == "rast")
        for r in rows:
            if r["batch"] == batch:
                r["vs_rast"] = r["tokens_per_s"] / base["tokens_per_s"]
                print(f"e2e B={batch} {r['system']:17s} {r['tokens_per_s']:8.1f} tokens/s ({r['vs_rast']:.2f}x RAST)")
        checkpoint(rows)
    return rows


# ---------------------------------------------------------------------------------------------------- round costs
def _running_engine(trio, tokenizer, args, batch: int, k: int) -> RastEngine:
    engine = RastEngine(*trio, tokenizer=tokenizer, devices=args.device, max_batch_size=batch,
                        max_seq_len=args.prompt_len + 512, speculative_tokens=k)
    rng = random.Random(0)
    for i in range(batch):
        ids = [rng.randrange(10, min(1000, len(tokenizer))) for _ in range(args.prompt_len)]
        engine.add_request(ids, SamplingParams(temperature=1.0, max_new_tokens=480, eos_token_id=[], seed=i))
    engine.step()  # admits, prefills and runs a first window: every row is running now
    return engine


def _base_forward(engine: RastEngine, b: int, q: int):
    """A call of the base lane's forward over ``q`` new tokens per row at the rows' positions, on the engine's
    decode path (its writes go to the scratch slot: the rows' caches are untouched)."""
    runner, st = engine.runner, engine.runner.state
    pos = st.pos[:b].unsqueeze(1) + torch.arange(q, device=st.pos.device)
    gathered = 0 if runner.fused and runner.use_cuda_graph else kv_bucket(int(pos.max()) + 1, engine.max_seq_len)
    view = runner.kv_view(b, pos, ~st.done[:b], gathered, torch.zeros_like(pos, dtype=torch.bool))
    ids = st.tok[:b].unsqueeze(1).expand(b, q).contiguous()

    def forward():
        with torch.no_grad():
            engine.lanes[0].forward(ids, pos, view)
    return forward


def round_cost_rows(args, checkpoint) -> list:
    """One round against k + 1 plain steps, and the base's Q-token forward against its 1-token forward, each
    interleaved ``2 x --repeats`` times. A step is a steady-state ``step()`` (a window of ``poll_interval`` decode
    steps or rounds, with the scheduler's block reservations and the host's poll) divided by its steps:
    bench_decode.py's statistic."""
    trio, names = models.build_trio(None if args.trio == "tiny" else args.trio, args.device, DTYPES[args.dtype])
    tokenizer = models.placeholder_tokenizer(470 if args.trio == "tiny" else models.TOKENIZER_LEN[
        trio[0].config.model_type])
    pairs = max(3, 2 * args.repeats)
    rows = []
    for b in args.round_batch:
        plain = _running_engine(trio, tokenizer, args, b, 0)
        for k in args.k:
            one_s, q_s, verify = interleaved(_base_forward(plain, b, 1), _base_forward(plain, b, k + 1), pairs,
                                             args.device)
            spec = _running_engine(trio, tokenizer, args, b, k)
            step_s, round_s, ratio = interleaved(plain.step, spec.step, pairs, args.device)
            del spec
            step, rnd = step_s / plain.poll_interval, round_s / plain.poll_interval
            rows.append(dict(part="round_cost", trio=args.trio, models=names, dtype=args.dtype, batch=b, k=k,
                             device=device_name(args.device), fused_decode=plain.fused_decode, pairs=pairs,
                             plain_step_ms=step * 1e3, round_ms=rnd * 1e3, round_vs_plain_steps=ratio / (k + 1),
                             base_forward_1_ms=one_s * 1e3, base_forward_q_ms=q_s * 1e3, verify_ratio=verify))
            print(f"round_cost {args.trio} B={b} k={k}: round {rnd * 1e3:.1f} ms = "
                  f"{rows[-1]['round_vs_plain_steps']:.2f} x (k + 1) plain steps of {step * 1e3:.1f} ms; base "
                  f"forward over {k + 1} tokens {verify:.2f} x one token (medians of {pairs} interleaved pairs)")
            checkpoint(rows)
        del plain
    return rows


# ---------------------------------------------------------------------------------------------------- the model
def tokens_per_round(p: float, k: int) -> float:
    """Expected tokens per round when each draft agrees with probability ``p`` (independently):
    ``1 + p + ... + p^k``."""
    return float(k + 1) if p >= 1 else (1 - p ** (k + 1)) / (1 - p)


def model_rows(acceptance: list, costs: list) -> list:
    """MODEL rows: measured-input speedup for the round_cost trio, and weight-bandwidth predictions."""
    rows = []
    best = {}
    for r in acceptance:
        if r["draft"] == "expert":
            best.setdefault((r["alpha"], r["temperature"]), {})[r["k"]] = r["tokens_per_round"]
    for c in costs:
        for (alpha, temp), tpr in sorted(best.items()):
            if c["k"] in tpr:
                rows.append(dict(part="model", label="MODEL", trio=c["trio"], batch=c["batch"], k=c["k"],
                                 alpha=alpha, temperature=temp, toy_tokens_per_round=tpr[c["k"]],
                                 predicted_speedup=tpr[c["k"]] * c["plain_step_ms"] / c["round_ms"],
                                 inputs="measured round_ms and plain_step_ms x the toy's tokens per round"))
    measured = {c["k"]: c["verify_ratio"] for c in costs if c["batch"] == min(x["batch"] for x in costs)}
    for name, (big, small) in MODEL_TRIOS.items():
        wb, ws = PARAMS_B[big], PARAMS_B[small]
        for k in sorted(measured):
            for source, vr in ((f"measured on {costs[0]['trio']} ({costs[0]['device']}, B = 1)", measured[k]),
                               ("assumed 1.0 (a memory-bound forward: k + 1 tokens read the weights once)", 1.0)):
                plain = wb + 2 * ws                          # one step reads every model once
                rnd = (k + 1) * ws + vr * (wb + ws)          # the expert drafts k + 1 steps; base + expert base verify
                rows.append(dict(part="model", label="MODEL", trio=name, k=k, verify_ratio=vr, verify_source=source,
                                 round_vs_plain=rnd / plain, break_even_p=_break_even(plain, rnd, k),
                                 speedup_at_p={str(p): tokens_per_round(p, k) * plain / rnd
                                               for p in (0.7, 0.8, 0.9, 0.95)},
                                 inputs=f"weights {big} {wb}B + 2 x {small} {ws}B params, memory-bound steps, the "
                                        f"expert drafting; verify_ratio {source}"))
    return rows


def _break_even(plain: float, rnd: float, k: int) -> float:
    """The per-token agreement at which a round's tokens pay for it (bisection on a monotone function)."""
    lo, hi = 0.0, 1.0
    if tokens_per_round(1.0, k) * plain < rnd:
        return float("nan")  # never pays
    for _ in range(50):
        mid = (lo + hi) / 2
        if tokens_per_round(mid, k) * plain >= rnd:
            hi = mid
        else:
            lo = mid
    return hi


# ---------------------------------------------------------------------------------------------------- driver
def run(args, checkpoint=None) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    result = dict(benchmark="speculative", date=utc_now(), device=device_name(args.device), versions=versions(),
                  args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, rows=[])
    save = (lambda rows: checkpoint({**result, "rows": result["rows"] + rows})) if checkpoint else (lambda rows: None)
    parts, run_part = {}, dict(acceptance=acceptance_rows, e2e=e2e_rows, round_cost=round_cost_rows)
    for part in args.parts:  # in the order given: a run cut by a time limit keeps the first parts' rows
        if part in run_part:
            parts[part] = run_part[part](args, save)
            result["rows"] += parts[part]
            save([])
    if "model" in args.parts:
        result["rows"] += model_rows(parts.get("acceptance", []), parts.get("round_cost", []))
    return result


def plot(result: dict, out: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: speculative.png skipped (pip install matplotlib)")
        return
    rows = [r for r in result["rows"] if r["part"] == "acceptance"]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in sorted({(r["draft"], r["alpha"], r["temperature"]) for r in rows}):
        pts = sorted((r["k"], r["tokens_per_round"]) for r in rows if (r["draft"], r["alpha"], r["temperature"]) == key)
        ax.plot(*zip(*pts), marker="o", label=f"{key[0]}, alpha {key[1]}, T {key[2]}")
    ks = sorted({r["k"] for r in rows})
    ax.plot(ks, [k + 1 for k in ks], "k:", label="k + 1 (every draft accepted)")
    ax.set(xlabel="drafted tokens per round k", ylabel="tokens per round", title=f"toy trio, {result['date'][:10]}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "speculative.png", dpi=120)
    print(f"wrote {out / 'speculative.png'}")


def main(argv=None) -> int:
    args = parse_args(argv)
    result, path = run_to_json(run, args, "speculative.json")
    if path is not None:
        plot(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
