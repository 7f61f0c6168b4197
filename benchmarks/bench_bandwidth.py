"""Memory bandwidth the decode step can reach on this machine: a large copy (the floor the decode benchmarks use,
bytes read plus written), a read-only reduction, and matrix-vector products (``[M, K] @ [N, K]^T``, fp32) of a
model's linear layers through PyTorch's ``linear`` (MKL on CPU), through oneDNN, and through
:func:`rast_kernels.ops.linear_rows.linear_rows` (the fused CPU decoder's linear for up to 8 rows), each as weight
bytes read per second. All in one process, interleaved, medians.

Why: a B=1 decode step reads every weight once, so its time is bounded below by weight bytes over bandwidth, and
the question is which bandwidth a matrix-vector product actually attains here.

Examples::

    python benchmarks/bench_bandwidth.py --out out/                 # Qwen2.5-1.5B's layer shapes, M = 1 and 4
    python benchmarks/bench_bandwidth.py --batch 1 2 5 8 --out out/  # the rows of a speculative verify pass
    python benchmarks/bench_bandwidth.py --shapes 8960x1536 --batch 1 --repeats 9

Writes ``bandwidth.json`` under ``--out``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from rast_kernels import _cli
from common import device_name, run_to_json, utc_now, versions

# Qwen2.5-1.5B's decode GEMMs as [N, K]: q/k/v fused, o, gate/up fused, down, the LM head
QWEN_1_5B = ("2048x1536", "1536x1536", "17920x1536", "1536x8960", "151936x1536")


def _shape(text: str) -> tuple:
    try:
        n, k = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NxK (e.g. 8960x1536), got {text!r}") from None
    if n < 1 or k < 1:
        raise argparse.ArgumentTypeError(f"N and K must be >= 1, got {text!r}")
    return n, k


def parse_args(argv=None) -> argparse.Namespace:
    p = _cli.ArgumentParser(prog="bench_bandwidth.py", description=__doc__.split("\n\n")[0].replace("``", ""),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=_shape, nargs="+", default=[_shape(s) for s in QWEN_1_5B],
                   help="weight shapes NxK (default: Qwen2.5-1.5B's decode GEMMs)")
    p.add_argument("--batch", type=_cli.int_range(1, 64), nargs="+", default=[1, 4], help="rows M (default 1 4)")
    p.add_argument("--stream-mib", type=_cli.int_range(64), default=1024,
                   help="size of the copy / reduction buffer in MiB (default 1024: far beyond the caches)")
    p.add_argument("--repeats", type=_cli.int_range(3), default=15, help="timed calls per case (default 15)")
    p.add_argument("--out", type=_cli.output_dir, default=None, help="directory for bandwidth.json")
    args = p.parse_args(argv)
    args.out = Path(args.out) if args.out is not None else None
    return args


def _median_s(fns: dict, repeats: int) -> dict:
    """Median seconds per call of each function, the calls interleaved (so drift hits them alike)."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def run(args, checkpoint=None) -> dict:
    from rast_kernels.engine.fused_decode import onednn_linear, onednn_linear_available
    from rast_kernels.ops.linear_rows import MAX_ROWS, linear_rows, linear_rows_available

    torch.manual_seed(0)
    result = dict(benchmark="bandwidth", date=utc_now(), device=device_name(torch.device("cpu")),
                  versions=versions(), threads=torch.get_num_threads(), rows=[])
    src = torch.randn(args.stream_mib * (1 << 20) // 4)
    dst = torch.empty_like(src)
    t = _median_s(dict(copy=lambda: dst.copy_(src), read=lambda: src.sum()), args.repeats)
    nbytes = src.numel() * 4
    result["copy_gb_s"] = round(2 * nbytes / t["copy"] / 1e9, 2)   # read + written
    result["read_gb_s"] = round(nbytes / t["read"] / 1e9, 2)
    print(f"copy {result['copy_gb_s']} GB/s (read + written), read-only reduction {result['read_gb_s']} GB/s")
    del src, dst
    for n, k in args.shapes:
        w = torch.randn(n, k)
        for m in args.batch:
            x = torch.randn(m, k)
            fns = {"torch_linear": lambda: torch.nn.functional.linear(x, w)}
            if onednn_linear_available():
                fns["onednn"] = lambda: onednn_linear(x, w)
            if m <= MAX_ROWS and linear_rows_available():
                fns["linear_rows"] = lambda: linear_rows(x, w)
            t = _median_s(fns, args.repeats)
            row = dict(n=n, k=k, m=m, weight_mb=round(w.numel() * 4 / 1e6, 1),
                       **{f"{name}_gb_s": round(w.numel() * 4 / s / 1e9, 2) for name, s in t.items()})
            result["rows"].append(row)
            print(" ".join(f"{key}={v}" for key, v in row.items()), flush=True)
            if checkpoint is not None:
                checkpoint(result)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    run_to_json(run, args, "bandwidth.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
