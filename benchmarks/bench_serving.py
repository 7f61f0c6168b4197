"""Serving benchmark: a long-tailed workload through the continuous paged engine, the static engine and the peer loop.

Every system gets identical work: ``--requests`` random prompts whose output lengths are drawn from a lognormal
(mean ``--mean-new``, shape ``--sigma``, at most ``--max-new``), each enforced with its own ``max_new_tokens`` and
EOS disabled. All requests arrive at once (an offline evaluation / RL-rollout batch). Systems:

* ``continuous``: ``RastEngine(scheduling="continuous", kv_cache_tokens=M)``: paged blocks taken on demand,
  requests join and leave the running batch at every poll;
* ``static``: ``RastEngine(scheduling="static", kv_cache_tokens=M)``: the fixed-batch behaviour of the engine
  before paging (each row holds a ``max_seq_len`` slab, a batch runs until its longest row ends) at the **same KV
  memory** ``M``;
* ``peer_loop``: the eager three-model loop public code runs (``peer_loop.py``), in batches of as many rows as the
  static engine holds, each batch run to its longest request;
* ``decode_step_*`` rows (``--step-batch``): per-step decode time at a fixed batch (all rows alive) of the new
  engine and, with ``--baseline-rev`` (default: the last commit before the paged engine), of the old static engine
  loaded from git into this process, side by side.

Reported per system: useful (requested) tokens/s, time to the last result, mean slot occupancy (running rows /
``max_batch_size`` per decode window), peak KV token slots held against the live tokens at that moment, and a
time series (tokens generated, occupancy) for the plot (``--plot``, needs matplotlib: ``pip install .[bench]``).

Examples::

    python benchmarks/bench_serving.py --out out/                              # tiny trio on CPU
    python benchmarks/bench_serving.py --trio qwen-small --dtype fp32 --requests 24 --out out/
    python benchmarks/bench_serving.py --trio qwen --requests 256 --max-batch 64 --out out/   # GPU

Writes ``serving.json`` under ``--out`` after each system. Random weights: the numbers are about speed.
"""
from __future__ import annotations

import argparse
import importlib
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import models
from common import device_name, run_to_json, sync, utc_now, versions
from rast_kernels import _cli
from peer_loop import peer_generate

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SYSTEMS = ("decode_step", "continuous", "static", "peer_loop")
BASELINE_REV = "5b8234d"  # the last commit with the static-slab engine


def parse_args(argv=None) -> argparse.Namespace:
    p = _cli.ArgumentParser(prog="bench_serving.py", description=__doc__.split("\n\n")[0].replace("``", ""),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trio", default=None, choices=sorted(models.TRIOS),
                   help="real configs with random weights (default: the tiny random trio)")
    p.add_argument("--device", type=_cli.device, default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--requests", type=_cli.int_range(1), default=64, help="requests in the workload (default 64)")
    p.add_argument("--prompt-len", type=_cli.int_range(1), default=32, help="prompt tokens per request (default 32)")
    p.add_argument("--mean-new", type=_cli.float_range(1.0), default=48.0, help="mean output length (default 48)")
    p.add_argument("--sigma", type=_cli.float_range(0.0), default=1.0,
                   help="lognormal shape of the output lengths (default 1)")
    p.add_argument("--max-new", type=_cli.int_range(1), default=512,
                   help="longest output (and max_seq_len - prompt; default 512)")
    p.add_argument("--max-batch", type=_cli.int_range(1), default=16, help="decode slots of the engines (default 16)")
    p.add_argument("--kv-tokens", type=_cli.int_range(1), default=None,
                   help="KV token slots per model for both engines (default: 4 static rows of max_seq_len, in whole blocks)")
    p.add_argument("--block-size", type=_cli.int_range(1), default=16, help="token slots per KV block (default 16)")
    p.add_argument("--step-batch", type=_cli.int_range(1), default=4,
                   help="fixed batch of the decode_step rows (default 4)")
    p.add_argument("--step-tokens", type=_cli.int_range(1), default=32,
                   help="tokens timed in the decode_step rows (default 32)")
    p.add_argument("--baseline-rev", default=BASELINE_REV,
                   help="git revision of the old static engine for the decode_step comparison ('' to skip)")
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS, help="what to run (default all)")
    p.add_argument("--temperature", type=_cli.float_range(0.0), default=1.0, help="sampling temperature (default 1)")
    p.add_argument("--top-p", type=_cli.float_range(0.0, 1.0, lo_open=True), default=0.95, help="top-p (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="workload and sampling seed (default 0)")
    p.add_argument("--plot", action="store_true", help="also write serving.png (matplotlib)")
    p.add_argument("--out", type=_cli.output_dir, default=None, help="folder for serving.json")
    args = p.parse_args(argv)
    if args.kv_tokens is not None and args.kv_tokens < args.block_size:
        _cli.fail(p, "--kv-tokens", f"must be >= --block-size ({args.block_size}), got {args.kv_tokens}")
    if args.out is not None:
        args.out = Path(args.out)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype is None:
        args.dtype = "bf16" if torch.device(args.device).type == "cuda" else "fp32"
    return args


def workload(args, vocab: int):
    """``[(prompt ids, max_new_tokens)]``: random prompts, lognormal lengths (clamped to ``[1, max_new]``)."""
    gen = torch.Generator().manual_seed(args.seed)
    mu = math.log(args.mean_new) - args.sigma ** 2 / 2
    lengths = torch.exp(mu + args.sigma * torch.randn(args.requests, generator=gen, dtype=torch.float64))
    lengths = lengths.round().clamp(1, args.max_new).long().tolist()
    prompts = torch.randint(2, vocab, (args.requests, args.prompt_len), generator=gen).tolist()
    return list(zip(prompts, lengths))


def drive(engine, work, args) -> dict:
    """Feed every request at once and step until all finish; measure throughput, occupancy and KV held."""
    from rast_kernels import SamplingParams

    max_seq = engine.max_seq_len
    sync(args.device)
    t0 = time.perf_counter()
    for i, (prompt, n) in enumerate(work):
        engine.add_request(prompt, SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=n,
                                                  eos_token_id=[], seed=args.seed + i))
    finished, series, occupancy, peak = 0, [], [], (0, 0)
    produced = {}
    while engine.has_unfinished_requests():
        outs = engine.step()
        sched = engine.scheduler
        running = [s for s in sched.running if s.status == "running"]
        live = sum(s.kv_upper for s in running)
        held = engine.allocator.num_used * engine.block_size
        if running:
            occupancy.append(len(running) / engine.max_batch_size)
        if held > peak[0]:
            peak = (held, live)
        for o in outs:
            if o.finished:
                finished += 1
                produced[o.request_id] = len(o.token_ids)
        series.append((time.perf_counter() - t0, engine.tokens_generated, len(running)))
    sync(args.device)
    wall = time.perf_counter() - t0
    useful = sum(n for _, n in work)
    assert sum(produced.values()) == useful, "every request must produce exactly its max_new_tokens"
    ratios = [h / l for h, l in [peak] if l]
    return {"wall_s": wall, "useful_tokens": useful, "tokens_per_s": useful / wall, "time_to_last_s": wall,
            "mean_occupancy": statistics.mean(occupancy) if occupancy else 0.0,
            "peak_kv_held_tokens": peak[0], "live_tokens_at_peak": peak[1],
            "kv_held_over_live_at_peak": ratios[0] if ratios else None, "max_seq_len": max_seq,
            "series": series[:: max(1, len(series) // 200)]}


def run_peer(trio, work, rows: int, args, vocab: int) -> dict:
    """The peer loop in arrival-order batches of ``rows`` requests, each batch run to its longest request."""
    sync(args.device)
    t0 = time.perf_counter()
    for start in range(0, len(work), rows):
        batch = work[start:start + rows]
        peer_generate(*trio, [p for p, _ in batch], max_new_tokens=max(n for _, n in batch),
                      temperature=args.temperature, top_p=args.top_p, vocab_size=vocab, seed=args.seed + start)
    sync(args.device)
    wall = time.perf_counter() - t0
    useful = sum(n for _, n in work)
    return {"wall_s": wall, "useful_tokens": useful, "tokens_per_s": useful / wall, "time_to_last_s": wall}


def load_baseline_package(rev: str):
    """The ``rast_kernels`` package of git revision ``rev`` imported as ``rast_kernels_baseline`` (its compiled
    sampler comes from the installed package: same C++ entry point), or None when git or the revision is not
    available (e.g. a copy of the tree without .git)."""
    root = Path(__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp(prefix="rast_baseline_"))
    try:
        tar = subprocess.run(["git", "-C", str(root), "archive", rev, "rast_kernels"], capture_output=True,
                             check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=tar, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    (tmp / "rast_kernels").rename(tmp / "rast_kernels_baseline")
    sys.path.insert(0, str(tmp))
    return importlib.import_module("rast_kernels_baseline")


def time_decode_step(make_engine, args, vocab: int) -> dict:
    """ms per decode step at a fixed batch (every row alive): ``(T(1 + n) - T(1)) / n`` from two generate calls."""
    engine = make_engine()
    gen = torch.Generator().manual_seed(args.seed + 1)
    prompts = torch.randint(2, vocab, (args.step_batch, args.prompt_len), generator=gen).tolist()

    def timed(n):
        sync(args.device)
        t = time.perf_counter()
        engine.generate(prompts, max_new_tokens=n, temperature=args.temperature, top_p=args.top_p, eos_token_id=[],
                        seed=0, progress=False)
        sync(args.device)
        return time.perf_counter() - t

    timed(2)  # warm-up (graphs, allocator)
    reps = [(timed(1 + args.step_tokens) - timed(1)) / args.step_tokens * 1e3 for _ in range(3)]
    return {"ms_per_step": statistics.median(reps), "ms_per_step_all": reps, "batch": args.step_batch}


def run(args, checkpoint=None) -> dict:
    from rast_kernels import RastEngine

    dtype = DTYPES[args.dtype]
    if args.trio is None:
        trio, names = models.build_trio(None, device=args.device, dtype=dtype)
        vocab = 480
    else:
        trio, names = models.build_trio(args.trio, device=args.device, dtype=dtype)
        vocab = models.TOKENIZER_LEN[trio[0].config.model_type]
    tokenizer = models.placeholder_tokenizer(vocab)
    max_seq = args.prompt_len + args.max_new
    slab = -(-max_seq // args.block_size) * args.block_size  # a static row's KV slots (whole blocks)
    kv_tokens = args.kv_tokens or 4 * slab
    static_rows = min(args.max_batch, kv_tokens // slab)
    work = workload(args, vocab)
    result = {"benchmark": "serving", "date": utc_now(), "device": device_name(torch.device(args.device)),
              "versions": versions(), "models": names, "dtype": args.dtype, "requests": args.requests,
              "prompt_len": args.prompt_len, "mean_new": args.mean_new, "sigma": args.sigma, "max_new": args.max_new,
              "lengths": [n for _, n in work], "max_batch": args.max_batch, "kv_cache_tokens": kv_tokens,
              "block_size": args.block_size, "static_rows": static_rows, "rows": []}

    def engine(policy, **kw):
        return RastEngine(*trio, tokenizer=tokenizer, dtype=dtype, devices=args.device, max_seq_len=max_seq,
                          max_batch_size=kw.pop("max_batch", args.max_batch), block_size=args.block_size,
                          kv_cache_tokens=kw.pop("kv", kv_tokens), scheduling=policy, **kw)

    def add(row):
        result["rows"].append(row)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "series"}, flush=True)
        if checkpoint:
            checkpoint(result)

    if "decode_step" in args.systems:
        roomy = args.step_batch * max_seq
        add({"system": "decode_step_paged", **time_decode_step(
            lambda: engine("continuous", max_batch=args.step_batch, kv=roomy), args, vocab)})
        base = load_baseline_package(args.baseline_rev) if args.baseline_rev else None
        if base is None:
            add({"system": "decode_step_static_baseline", "skipped": f"git revision {args.baseline_rev!r} not available"})
        else:
            add({"system": "decode_step_static_baseline", "revision": args.baseline_rev, **time_decode_step(
                lambda: base.RastEngine(*trio, tokenizer=tokenizer, dtype=dtype, devices=args.device,
                                        max_seq_len=max_seq, max_batch_size=args.step_batch), args, vocab)})
    for system in ("continuous", "static"):
        if system in args.systems:
            add({"system": system, **drive(engine(system), work, args)})
    if "peer_loop" in args.systems:
        add({"system": "peer_loop", "rows_per_batch": static_rows, **run_peer(trio, work, static_rows, args, vocab)})
    by = {r["system"]: r for r in result["rows"]}
    if "continuous" in by and "static" in by:
        result["continuous_over_static_tokens_per_s"] = by["continuous"]["tokens_per_s"] / by["static"]["tokens_per_s"]
    if "decode_step_paged" in by and by.get("decode_step_static_baseline", {}).get("ms_per_step"):
        result["decode_step_paged_over_static"] = (by["decode_step_paged"]["ms_per_step"]
                                                   / by["decode_step_static_baseline"]["ms_per_step"])
    return result


def plot(result, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for r in result["rows"]:
        if "series" not in r:
            continue
        t = [x[0] for x in r["series"]]
        a.plot(t, [x[1] for x in r["series"]], label=r["system"])
        b.plot(t, [x[2] / result["max_batch"] for x in r["series"]], label=r["system"])
    a.set(xlabel="s", ylabel="tokens generated", title="progress")
    b.set(xlabel="s", ylabel="slot occupancy", title="running rows / max_batch")
    a.legend()
    fig.suptitle(f"{'+'.join(result['models'])} {result['dtype']} on {result['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    args = parse_args(argv)
    result, path = run_to_json(run, args, "serving.json")
    for key in ("continuous_over_static_tokens_per_s", "decode_step_paged_over_static"):
        if key in result:
            print(f"{key}: {result[key]:.3f}")
    if args.plot and path is not None:
        try:
            plot(result, path.with_suffix(".png"))
            print(f"wrote {path.with_suffix('.png')}")
        except ImportError:
            print("plot skipped: matplotlib is not installed (pip install .[bench])")
    return 0


if __name__ == "__main__":
    sys.exit(main())
