"""This tree's engine against a git revision's, interleaved in one process: has a change cost speed?

The revision's ``rast_kernels`` is imported from ``git archive`` as ``rast_kernels_baseline`` (bench_serving.py's
loader; its compiled sampler is the installed one) and both engines run the same work, alternating:

* ``step_ms_B*``: the decode benchmark's statistic (bench_decode.py): a steady-state ``step()`` divided by its
  ``poll_interval`` decode steps, every row alive, ``--pairs`` alternations of one ``step()`` each (new then old,
  old then new, ...); reported as each system's median and the median of the per-pair ratios new / old, which
  cancels the machine's drift (on a shared VM single timings vary by +-30 %);
* ``serving``: bench_serving.py's long-tailed workload through the continuous engine (useful tokens/s), ``--rounds``
  alternations; the two engines' tokens must be identical.

Random-init models (the tiny trio by default, ``--trio`` for real configs). Example::

    python benchmarks/bench_revision.py --rev HEAD --out out/      # uncommitted changes against the last commit

Writes ``revision.json`` under ``--out``.
"""
from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
from pathlib import Path

import torch

import models
from bench_serving import load_baseline_package
from common import device_name, interleaved, run_to_json, timed_s, utc_now, versions
from rast_kernels import _cli


def parse_args(argv=None) -> argparse.Namespace:
    p = _cli.ArgumentParser(prog="bench_revision.py", description=__doc__.split("\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rev", default="HEAD", help="git revision to compare with (default HEAD)")
    p.add_argument("--trio", default=None, choices=sorted(models.TRIOS), help="default: the tiny random trio")
    p.add_argument("--batch", type=_cli.int_range(1, 256), nargs="+", default=[1, 4], help="step batches (1 4)")
    p.add_argument("--pairs", type=_cli.int_range(2), default=300, help="step alternations per batch (300)")
    p.add_argument("--rounds", type=_cli.int_range(0), default=5, help="serving alternations (5; 0 skips)")
    p.add_argument("--requests", type=_cli.int_range(1), default=48, help="serving requests (48)")
    p.add_argument("--device", type=_cli.device, default="cpu", help="device (default cpu)")
    p.add_argument("--out", type=_cli.output_dir, default=None, help="directory for revision.json")
    args = p.parse_args(argv)
    args.out = Path(args.out) if args.out is not None else None
    return args


def _running(pkg, trio, tokenizer, batch: int, device):
    """An engine of ``pkg`` with ``batch`` rows that will not finish during the comparison."""
    engine = pkg.RastEngine(*trio, tokenizer=tokenizer, devices=device, max_batch_size=batch, max_seq_len=12000)
    for i in range(batch):
        engine.add_request(list(range(2, 34)), pkg.SamplingParams(max_new_tokens=11900, eos_token_id=[],
                                                                  temperature=1.0, top_p=0.95, seed=i))
    for _ in range(3):
        engine.step()
    return engine


def step_rows(pkgs: dict, trio, tokenizer, args) -> list:
    rows = []
    for batch in args.batch:
        old, new = (_running(pkgs[name], trio, tokenizer, batch, args.device) for name in ("old", "new"))
        old_s, new_s, ratio = interleaved(old.step, new.step, args.pairs, args.device, warmup=False)
        # per decode step: a step() runs poll_interval of them
        rows.append(dict(measure=f"step_ms_B{batch}", batch=batch, new_ms=new_s / new.poll_interval * 1e3,
                         old_ms=old_s / old.poll_interval * 1e3,
                         new_over_old=ratio * old.poll_interval / new.poll_interval, pairs=args.pairs))
        print(f"step B={batch}: new {rows[-1]['new_ms']:.3f} ms, old {rows[-1]['old_ms']:.3f} ms, "
              f"median pair ratio {rows[-1]['new_over_old']:.3f}")
    return rows


def serving_row(pkgs: dict, trio, tokenizer, args, vocab: int) -> dict:
    g, rng = torch.Generator().manual_seed(0), random.Random(0)
    work = [(torch.randint(2, vocab, (32,), generator=g).tolist(),
             max(1, min(256, int(rng.lognormvariate(math.log(48) - 0.5, 1.0))))) for _ in range(args.requests)]
    engines = {name: pkg.RastEngine(*trio, tokenizer=tokenizer, devices=args.device, max_batch_size=16,
                                    max_seq_len=32 + 256 + 1, kv_cache_tokens=16 * 128) for name, pkg in pkgs.items()}
    rates, tokens = {name: [] for name in pkgs}, {}
    for r in range(args.rounds):
        for name in (("new", "old") if r % 2 else ("old", "new")):
            pkg = pkgs[name]
            params = [pkg.SamplingParams(max_new_tokens=n, eos_token_id=[], temperature=1.0, top_p=0.95, seed=i)
                      for i, (_, n) in enumerate(work)]
            outs = []
            s = timed_s(lambda: outs.extend(engines[name].generate([w[0] for w in work], params)), args.device)
            rates[name].append(sum(len(o.token_ids) for o in outs) / s)
            tokens[name] = [o.token_ids for o in outs]
    row = dict(measure="serving_tokens_per_s", new=statistics.median(rates["new"]), old=statistics.median(rates["old"]),
               runs_new=rates["new"], runs_old=rates["old"], identical=tokens["new"] == tokens["old"])
    row["new_over_old"] = row["new"] / row["old"]
    print(f"serving: new {row['new']:.1f}, old {row['old']:.1f} tokens/s ({row['new_over_old']:.3f}), "
          f"identical tokens: {row['identical']}")
    return row


def run(args, checkpoint=None) -> dict:
    import rast_kernels

    old = load_baseline_package(args.rev)
    if old is None:
        raise SystemExit(f"bench_revision.py: error: argument --rev: git revision {args.rev!r} is not available")
    trio, names = models.build_trio(args.trio, device=args.device, dtype=torch.float32 if args.trio is None
                                    or torch.device(args.device).type == "cpu" else torch.bfloat16)
    vocab = 470 if args.trio is None else models.TOKENIZER_LEN[trio[0].config.model_type]
    tokenizer = models.placeholder_tokenizer(vocab)
    pkgs = {"new": rast_kernels, "old": old}
    result = dict(benchmark="revision", rev=args.rev, date=utc_now(), device=device_name(args.device),
                  versions=versions(), models=names, rows=step_rows(pkgs, trio, tokenizer, args))
    if args.rounds:
        result["rows"].append(serving_row(pkgs, trio, tokenizer, args, vocab))
    return result


def main(argv=None) -> int:
    run_to_json(run, parse_args(argv), "revision.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
