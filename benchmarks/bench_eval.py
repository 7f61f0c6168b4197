"""Benchmark a whole toy evaluation: ``python -m rast_kernels eval --toy`` (base, expert, base + delta; n samples
per problem) with the engine's continuous batching against the same evaluation through fixed batches of the
static engine (``--scheduling static``), in one process, one after the other.

Reports per system the wall time, the generation tokens/s (the eval's own count: generation and grading, model
loading excluded) and the table's pass@1, which must agree (the same seeds give the same samples).

Examples::

    python benchmarks/bench_eval.py --out out/                  # all 13059 held-out toy problems, n = 8
    python benchmarks/bench_eval.py --problems 64 --n 2 --out out/

Writes ``eval.json`` under ``--out``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from rast_kernels import _cli
from common import device_name, run_to_json, utc_now, versions

SYSTEMS = ("continuous", "static")


def parse_args(argv=None) -> argparse.Namespace:
    from rast_kernels.toy.task import heldout_size

    p = _cli.ArgumentParser(prog="bench_eval.py", description=__doc__.split("\n\n")[0].replace("``", ""),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", type=_cli.int_range(1, heldout_size()), default=heldout_size(),
                   help=f"held-out toy problems (default: all {heldout_size()})")
    p.add_argument("--n", type=_cli.int_range(1), default=8, help="samples per problem and configuration (default 8)")
    p.add_argument("--max-batch-size", type=_cli.int_range(1), default=256, help="decode slots (default 256)")
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS), help="what to time")
    p.add_argument("--warmup-problems", type=_cli.int_range(0), default=64,
                   help="an untimed evaluation of this many problems per system first (default 64; 0: none): the "
                        "first evaluation in a process pays one-time costs, about 10 s here, that would favour "
                        "whichever system runs second")
    p.add_argument("--out", type=_cli.output_dir, default=None, help="directory for eval.json")
    args = p.parse_args(argv)
    args.out = Path(args.out) if args.out is not None else None
    return args


def run_one(system: str, args, work: str, problems: int) -> dict:
    """One evaluation of ``problems`` problems with ``--scheduling system`` into a fresh folder; its summary's
    run stats and pass@1."""
    import json

    from rast_kernels.eval import cli

    out = os.path.join(work, f"{system}-{problems}")
    argv = ["--toy", "--max-problems", str(problems), "--base-only", "--expert-only", "--alpha", "1",
            "--n", str(args.n), "--k", "1", str(args.n), "--max-batch-size", str(args.max_batch_size),
            "--scheduling", system, "--no-progress", "--out", out]
    t0 = time.perf_counter()
    rc = cli.main(argv)
    wall = time.perf_counter() - t0
    if rc != 0:
        return dict(system=system, error=f"eval exited {rc}")
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    pass1 = {cfg: round(cells["toy"]["pass@1"][0], 4) for cfg, cells in summary["results"].items()}
    return dict(system=system, process_wall_s=round(wall, 2), **summary["run"], pass_at_1=pass1)


def run(args, checkpoint=None) -> dict:
    import torch

    result = dict(benchmark="eval", date=utc_now(), device=device_name(torch.device("cpu")), versions=versions(),
                  settings=dict(problems=args.problems, n=args.n, max_batch_size=args.max_batch_size,
                                configurations=3, warmup_problems=args.warmup_problems), rows=[])
    with tempfile.TemporaryDirectory() as work:
        if args.warmup_problems:
            for system in args.systems:
                run_one(system, args, work, args.warmup_problems)
        for system in args.systems:
            row = run_one(system, args, work, args.problems)
            result["rows"].append(row)
            print(f"{system:10s} " + ", ".join(f"{k}={v}" for k, v in row.items() if k != "system"), flush=True)
            if checkpoint is not None:
                checkpoint(result)
    rows = result["rows"]
    if len(rows) == 2 and all(r.get("tokens_per_s") for r in rows):
        result["continuous_over_static"] = round(rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"], 2)
        print(f"continuous / static tokens/s: {result['continuous_over_static']}x")
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    run_to_json(run, args, "eval.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
