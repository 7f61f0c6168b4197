"""Benchmark one RAST sampling step: ``rast_kernels.rast_sample`` against the baselines.

For each batch size B, vocabulary width V, input dtype, sampling setting and number of expert pairs K
(``z = base + sum_i alpha * (expert_i - expert_base_i)``; K = 1 is the plain three-tensor call) it times

* ``rast_sample`` (backend ``auto``: Triton on CUDA, the compiled C++ kernel on CPU),
* ``rast_sample_reference`` (the PyTorch reference, the spec),
* ``hf_chain``: the chain of PyTorch ops public code runs (``baselines.hf_chain_sample``; K pairs combined
  one term at a time),
* ``flashinfer``: FlashInfer's ``top_k_top_p_sampling_from_logits`` after an unfused combine
  (CUDA, when ``flashinfer`` is importable),

and the floor: the bytes of the 2K + 1 input logit tensors read once over the device's copy bandwidth
(measured in the same run with a large tensor copy, counting bytes read plus written).

CUDA: CUDA events around each call, warm-up, median and p10/p90 of many calls, inputs rotated over
several buffers so that small cases are not timed out of L2. CPU: ``time.perf_counter`` around each call.

Examples::

    python benchmarks/bench_sampler.py --out out/             # CUDA: full grid; CPU: the --quick grid
    python benchmarks/bench_sampler.py --full --out out/      # full grid on CPU too (slow)
    python benchmarks/bench_sampler.py --batch 1 --vocab 4096 --dtypes fp32 --settings top_p --repeats 3
    python benchmarks/bench_sampler.py --pairs 2 --vocab 152064 --dtypes bf16 --out out/   # two pairs only

Writes ``sampler.json`` (and ``sampler.png`` via ``plot_sampler.py``) under ``--out``.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

import baselines
import rast_kernels
from rast_kernels import _cli
from common import copy_bandwidth, device_name, run_to_json, sync, utc_now, versions
from rast_kernels.ops.rast_sample import _resolve_backend

FULL_BATCHES = (1, 16, 64, 256)
FULL_VOCABS = (32000, 128256, 152064)
QUICK_BATCHES = (1, 16, 64)
QUICK_VOCABS = (152064, 32000)
PAIRS = (1, 2, 3)  # the official RAST code combines up to three expert pairs
MAX_PAIRS = 8
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
# name -> sampling parameters; alpha 1.0 is the RAST scripts' default
SETTINGS = {
    "top_p": dict(alpha=1.0, temperature=1.0, top_k=0, top_p=0.95, min_p=0.0),
    "none": dict(alpha=1.0, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0),
}
OPS = ("rast_sample", "reference", "hf_chain", "flashinfer")
LOGIT_STD = 2.0  # spread of the random logits (N(0, 2^2) per input): a realistic few-hundred-token nucleus


def parse_args(argv=None) -> argparse.Namespace:
    p = _cli.ArgumentParser(prog="bench_sampler.py", description=__doc__.split("\n\n")[0].replace("``", ""),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", type=_cli.device, default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    grid = p.add_mutually_exclusive_group()
    grid.add_argument("--quick", action="store_true",
                      help=f"small grid B={QUICK_BATCHES}, V={QUICK_VOCABS}, fewer repeats (default on CPU)")
    grid.add_argument("--full", action="store_true",
                      help=f"full grid B={FULL_BATCHES}, V={FULL_VOCABS} (default on CUDA)")
    p.add_argument("--batch", type=_cli.int_range(1, 65536), nargs="+", default=None,
                   help="batch sizes, 1..65536 (overrides the grid)")
    p.add_argument("--vocab", type=_cli.int_range(2, 2**24), nargs="+", default=None,
                   help="vocabulary widths, 2..2^24 (overrides the grid)")
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES), help="input dtypes")
    p.add_argument("--pairs", type=_cli.int_range(1, MAX_PAIRS), nargs="+", default=list(PAIRS),
                   help=f"numbers of expert pairs K, 1..{MAX_PAIRS} (default {' '.join(map(str, PAIRS))}): "
                        "each K times every op over the whole grid")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                   help="sampling settings: " + "; ".join(f"{k}: {v}" for k, v in SETTINGS.items()))
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS,
                   help="what to time (unavailable ones are listed as skipped, with the reason)")
    p.add_argument("--warmup", type=_cli.int_range(0), default=None,
                   help="warm-up calls per case, >= 0 (default 10 CUDA, 2 CPU)")
    p.add_argument("--repeats", type=_cli.int_range(1), default=None,
                   help="most timed calls per case, >= 1 (default 200 CUDA, 15 quick CPU); fewer if --budget-s runs out")
    p.add_argument("--min-repeats", type=_cli.int_range(1), default=None,
                   help="fewest timed calls per case, >= 1 (default 20 CUDA, 3 CPU)")
    p.add_argument("--budget-s", type=_cli.float_range(0.0, lo_open=True), default=None,
                   help="target timed seconds per case, > 0 (default 0.5 CUDA, 1.0 CPU)")
    p.add_argument("--copy-mib", type=_cli.int_range(1), default=None,
                   help="tensor size for the copy-bandwidth probe, >= 1 (default 1024 CUDA, 256 CPU)")
    p.add_argument("--reference-max-elems", type=_cli.int_range(0), default=16 * 152064,
                   help="CPU: skip timing the reference above this B*V (default 16*152064; 0 = no limit)")
    p.add_argument("--seed", type=_cli.int_range(0), default=0, help="seed of the random logits (default 0)")
    p.add_argument("--out", type=_cli.output_dir, default=None, help="directory for sampler.json and sampler.png")
    p.add_argument("--no-plot", action="store_true", help="write the JSON only")
    args = p.parse_args(argv)
    args.out = Path(args.out) if args.out is not None else None
    args.command = " ".join([Path(__file__).name, *(sys.argv[1:] if argv is None else argv)])
    return args


class Timer:
    """Times ``fn(i)`` calls: CUDA events on CUDA, perf_counter on CPU; adaptive repeat count."""

    def __init__(self, device: torch.device, warmup: int, repeats: int, min_repeats: int, budget_s: float):
        self.device, self.warmup, self.repeats = device, warmup, repeats
        self.min_repeats, self.budget_s = min_repeats, budget_s
        self.last_cpu_times: list[float] | None = None  # process CPU times of the last CPU measurement

    def __call__(self, fn) -> tuple[list[float], object]:
        """``(per-call times in microseconds, the first call's result)``; ``fn(i)`` gets the call index."""
        # warm-up (compilation, caches, allocator); cut short for slow cases, where it would cost minutes
        t0 = time.perf_counter()
        first = fn(0)
        done = 1
        sync(self.device)
        while done < self.warmup and time.perf_counter() - t0 <= self.budget_s / 2:
            fn(done)
            done += 1
            sync(self.device)
        per_call = (time.perf_counter() - t0) / done
        n = int(min(self.repeats, max(self.min_repeats, self.budget_s / max(per_call, 1e-7))))
        if self.device.type == "cuda":
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
            for i, (start, end) in enumerate(events):
                start.record()
                fn(done + i)
                end.record()
            sync(self.device)
            return [start.elapsed_time(end) * 1e3 for start, end in events], first
        times, cpu_times = [], []
        for i in range(n):
            c, t = time.process_time(), time.perf_counter()
            fn(done + i)
            times.append((time.perf_counter() - t) * 1e6)
            cpu_times.append((time.process_time() - c) * 1e6)
        # CPU time of this process: on a shared, loaded machine it is steadier than wall-clock time
        self.last_cpu_times = cpu_times
        return times, first


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in [0, 100]."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def make_inputs(B: int, V: int, dtype: torch.dtype, device: torch.device, n_sets: int, seed: int, n_tensors: int = 3):
    """``n_sets`` tuples of ``n_tensors`` random ``[B, V]`` logits (N(0, LOGIT_STD^2)), made on ``device``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return [tuple((torch.randn(B, V, generator=gen, device=device) * LOGIT_STD).to(dtype) for _ in range(n_tensors))
            for _ in range(n_sets)]


def pair_inputs(tensors: tuple, pairs: int) -> tuple:
    """The call's ``(base, expert, expert_base)`` from one :func:`make_inputs` tuple of ``1 + 2 * max_pairs``
    tensors (base, the experts, then the expert bases): plain tensors for K = 1 (the single-pair call, as
    before the K rows existed), lists of K tensors otherwise."""
    max_pairs = (len(tensors) - 1) // 2
    experts, expert_bases = tensors[1:1 + pairs], tensors[1 + max_pairs:1 + max_pairs + pairs]
    if pairs == 1:
        return tensors[0], experts[0], expert_bases[0]
    return tensors[0], list(experts), list(expert_bases)


# an op that cannot run here is listed with one of these reasons instead of its timing function, so the
# table and the JSON say why a column is empty instead of silently leaving it out
FLASHINFER_SKIP_CPU = "FlashInfer runs on CUDA only"
FLASHINFER_SKIP_MISSING = "flashinfer not importable here (install flashinfer-python on a CUDA machine)"


def build_ops(names, device: torch.device, params: dict):
    """[(op, backend, fn((base, expert, expert_base), i))] for the requested ops (every op takes the K-pair lists
    too); ``fn`` is a string, the reason it is
    skipped, for an op this machine does not have."""
    ops = []
    for name in names:
        if name == "rast_sample":
            backend = _resolve_backend("auto", device)
            ops.append((name, backend, lambda x, i: rast_kernels.rast_sample(*x, **params, seed=0, offset=i)))
        elif name == "reference":
            ops.append(("rast_sample_reference", "torch",
                        lambda x, i: rast_kernels.rast_sample_reference(*x, **params, seed=0, offset=i)))
        elif name == "hf_chain":
            gen = torch.Generator(device=device).manual_seed(0)
            ops.append(("hf_chain", "torch", lambda x, i, g=gen: baselines.hf_chain_sample(*x, **params, generator=g)))
        elif name == "flashinfer":
            fi_name = "flashinfer_top_k_top_p_from_logits"
            if device.type != "cuda":
                ops.append((fi_name, "flashinfer", FLASHINFER_SKIP_CPU))
            elif not baselines.flashinfer_available():
                ops.append((fi_name, "flashinfer", FLASHINFER_SKIP_MISSING))
            else:
                fi_params = {k: v for k, v in params.items() if k != "min_p"}
                ops.append((fi_name, "flashinfer", lambda x, i: baselines.flashinfer_sample(*x, **fi_params)))
    return ops


def check_tokens(tokens, B: int, V: int) -> str | None:
    """A problem with a sampler's output, or None: ids must be in [0, V) (the inputs hold no bad rows)."""
    t = tokens[0] if isinstance(tokens, tuple) else tokens
    if tuple(t.shape) != (B,):
        return f"shape {tuple(t.shape)} != ({B},)"
    t = t.long().cpu()
    if bool(((t < 0) | (t >= V)).any()):
        return f"ids out of [0, {V}): {t[(t < 0) | (t >= V)][:4].tolist()}"
    return None


def run(args: argparse.Namespace, checkpoint=None) -> dict:
    """Time the grid; ``checkpoint(result)`` (optional) is called after each case with the result so far."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    quick = args.quick or (not cuda and not args.full)
    batches = args.batch or (QUICK_BATCHES if quick else FULL_BATCHES)
    vocabs = args.vocab or (QUICK_VOCABS if quick else FULL_VOCABS)
    timer = Timer(
        device,
        warmup=args.warmup if args.warmup is not None else (10 if cuda else 2),
        repeats=args.repeats or (200 if cuda else (15 if quick else 30)),
        min_repeats=args.min_repeats or (20 if cuda else 3),
        budget_s=args.budget_s if args.budget_s is not None else (0.5 if cuda else 1.0),
    )
    if timer.min_repeats > timer.repeats:
        timer.min_repeats = timer.repeats
    bw = copy_bandwidth(device, args.copy_mib or (1024 if cuda else 256))
    meta = {
        "benchmark": "sampler", "device": device_name(device), "device_type": device.type,
        "versions": versions(), "date": utc_now(), "copy_bandwidth_GBps": bw / 1e9,
        "copy_bandwidth_note": "bytes read + bytes written per second of a large device-to-device tensor copy",
        "grid": {"B": list(batches), "V": list(vocabs), "dtypes": args.dtypes, "settings": args.settings,
                 "pairs": args.pairs},
        "settings": {k: SETTINGS[k] for k in args.settings},
        "timer": {"warmup": timer.warmup, "max_repeats": timer.repeats, "min_repeats": timer.min_repeats,
                  "budget_s": timer.budget_s, "clock": "cuda events" if cuda else "time.perf_counter"},
        "logit_std": LOGIT_STD, "threads": torch.get_num_threads(), "command": args.command,
    }
    print(f"# {meta['device']}; torch {torch.__version__}; copy bandwidth {bw / 1e9:.1f} GB/s", flush=True)
    rows = []
    max_pairs = max(args.pairs)
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for V in vocabs:
            for B in batches:
                tensor_bytes = B * V * torch.tensor([], dtype=dtype).element_size()
                # on CUDA rotate over enough input sets (>= 256 MB of what one K = 1 call reads, several times the
                # L2) that consecutive calls do not find their inputs in L2; on CPU one set (generation would
                # dominate the run). A set holds the tensors of the largest K; a K call reads 2K + 1 of them
                n_sets = min(512, max(1, math.ceil(256e6 / (3 * tensor_bytes)))) if cuda else 1
                inputs = make_inputs(B, V, dtype, device, n_sets, args.seed, n_tensors=1 + 2 * max_pairs)
                for setting, K in ((setting, K) for setting in args.settings for K in args.pairs):
                    params = SETTINGS[setting]
                    floor_us = (2 * K + 1) * tensor_bytes / bw * 1e6
                    calls = [pair_inputs(x, K) for x in inputs]  # built outside the timed calls
                    group = []
                    for op, backend, fn in build_ops(args.ops, device, params):
                        row = {"op": op, "backend": backend, "B": B, "V": V, "dtype": dtype_name, "setting": setting,
                               "pairs": K, "floor_us": floor_us, "input_sets": n_sets}
                        try:
                            if isinstance(fn, str):
                                row.update(median_us=None, p10=None, p90=None, n=0, skipped=fn)
                                group.append(row)
                                continue
                            if op == "rast_sample_reference" and not cuda and 0 < args.reference_max_elems < B * V:
                                row.update(median_us=None, p10=None, p90=None, n=0,
                                           skipped=f"reference not timed on CPU above B*V = {args.reference_max_elems} "
                                                   "(--reference-max-elems): one call takes tens of seconds")
                                group.append(row)
                                continue
                            times, first = timer(lambda i: fn(calls[i % n_sets], i))
                            problem = check_tokens(first, B, V)
                            row.update(median_us=statistics.median(times), p10=percentile(times, 10),
                                       p90=percentile(times, 90), n=len(times))
                            if not cuda:
                                row["cpu_median_us"] = statistics.median(timer.last_cpu_times)
                            if problem:
                                row["invalid_output"] = problem
                        except Exception as exc:  # one failing op must not lose the rest of the grid
                            traceback.print_exc()
                            row.update(median_us=None, p10=None, p90=None, n=0, error=f"{type(exc).__name__}: {exc}")
                        group.append(row)
                    _add_speedups(group)
                    for row in group:
                        row.update(device=meta["device"], torch=torch.__version__, triton=meta["versions"]["triton"],
                                   date=meta["date"])
                        print(_format_row(row), flush=True)
                    rows.append(group)
                    if checkpoint is not None:
                        checkpoint({"meta": meta, "rows": [r for g in rows for r in g]})
                del inputs
                if cuda:
                    torch.cuda.empty_cache()
    return {"meta": meta, "rows": [r for g in rows for r in g]}


def _add_speedups(group: list[dict]) -> None:
    """Speedups over the reference and the HF chain from wall-clock medians (and, on CPU, from
    process-CPU-time medians), and the share of the read floor reached."""
    for prefix, key in (("", "median_us"), ("cpu_", "cpu_median_us")):
        base = {r["op"]: r.get(key) for r in group}
        for r in group:
            t = r.get(key)
            if prefix and t is None:
                continue
            for name, ref in (("speedup_vs_reference", base.get("rast_sample_reference")),
                              ("speedup_vs_hf_chain", base.get("hf_chain"))):
                r[prefix + name] = ref / t if (t and ref) else None
    for r in group:
        r["pct_of_floor"] = 100 * r["floor_us"] / r["median_us"] if r["median_us"] else None


def _format_row(r: dict) -> str:
    def f(x, fmt):
        return format(x, fmt) if x is not None else "-"
    return (f"{r['op']:<36} {r['backend']:<10} B={r['B']:<4} V={r['V']:<7} K={r['pairs']} {r['dtype']:<5} "
            f"{r['setting']:<6} "
            f"median {f(r['median_us'], '10.1f')} us  p10 {f(r['p10'], '9.1f')}  p90 {f(r['p90'], '9.1f')}  "
            f"floor {r['floor_us']:8.2f} us  x_ref {f(r['speedup_vs_reference'], '6.2f')}  "
            f"x_hf {f(r['speedup_vs_hf_chain'], '6.2f')}"
            + (f"  cpu {f(r['cpu_median_us'], '10.1f')} us" if "cpu_median_us" in r else "")
            + (f"  skipped: {r['skipped']}" if r.get("skipped") else "")
            + (f"  ERROR {r['error']}" if r.get("error") else "")
            + (f"  INVALID {r['invalid_output']}" if r.get("invalid_output") else ""))


def main(argv=None) -> int:
    args = parse_args(argv)
    result, path = run_to_json(run, args, "sampler.json")
    if path is not None and not args.no_plot:
        import plot_sampler

        if not plot_sampler.have_matplotlib():
            # the JSON is the result; the plot is optional and matplotlib is only in the [bench] extra
            print(f"plot skipped: {plot_sampler.MATPLOTLIB_HINT}; {path} has every number")
        elif any(r.get("median_us") for r in result["rows"]):
            print(f"wrote {plot_sampler.plot(result, args.out / 'sampler.png')}")
        else:
            print("plot skipped: no timed rows")
    failed = [r for r in result["rows"] if r.get("error") or r.get("invalid_output")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
