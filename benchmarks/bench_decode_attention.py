"""Micro-benchmark of decode attention over a static KV cache: ``decode_attention`` (Triton) against SDPA.

For each attention shape (the heads of a real model), batch size, cache size ``S_max`` and valid length
``L`` (every row attends to ``[pad, pad + L)``: ``pad`` columns of left padding, then ``L`` tokens) it times

* ``rast``: :func:`rast_kernels.ops.decode_attention.decode_attention` (grouped heads, reads ``[start, end)``),
* ``sdpa_expanded``: what transformers' SDPA path does with a static cache and a mask: K/V expanded to the
  query heads over the whole cache (``repeat_kv``), then SDPA with a boolean ``[B, 1, 1, S_max]`` mask,
* ``sdpa_gqa``: SDPA with ``enable_gqa=True`` and the same mask over the whole cache (no expansion copy),

and the floor: the bytes that must be read (K and V of the valid range, q) and written (out), over the
device's copy bandwidth measured in the same run (bytes read plus written).

Timing: each op is captured ``--calls-per-graph`` times in one CUDA graph (inputs rotated over enough
buffer sets to exceed L2), the graph is replayed with CUDA events around it, and the per-call time is the
replay time divided by the calls: that is the GPU time the op costs inside the engine's captured step,
without Python launch overhead. ``eager_us`` (events around single eager calls) is reported beside it.
Every case is checked against :func:`decode_attention_reference` first.

Examples::

    python benchmarks/bench_decode_attention.py --out out/
    python benchmarks/bench_decode_attention.py --models Qwen2.5-7B --batch 1 --s-max 4352 --lengths 257 --out out/

Writes ``decode_attention.json`` under ``--out``. Needs CUDA.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

from common import copy_bandwidth, device_name, utc_now, versions, write_json
from rast_kernels.ops.decode_attention import decode_attention, decode_attention_reference, default_num_splits

# name -> (H_q, H_kv, head_dim), from the public configs (benchmarks/configs)
SHAPES = {
    "Qwen2.5-7B": (28, 4, 128),
    "Qwen2.5-1.5B": (12, 2, 128),
    "Qwen2.5-0.5B": (14, 2, 64),
    "Llama-3.1-8B": (32, 8, 128),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OPS = ("rast", "sdpa_expanded", "sdpa_gqa")
L2_ROTATE_BYTES = 256 * 2**20  # rotate inputs over at least this many bytes so that no case runs from L2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["Qwen2.5-7B", "Qwen2.5-1.5B"], choices=sorted(SHAPES))
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--s-max", type=int, nargs="+", default=[4352], help="cache positions (StaticCache max_cache_len)")
    p.add_argument("--lengths", type=int, nargs="+", default=[257, 1024, 4096], help="valid tokens per row")
    p.add_argument("--pad", type=int, default=0, help="left padding per row (start = pad, end = pad + length)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--num-splits", type=int, default=None, help="override the kernel's split count")
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    p.add_argument("--calls-per-graph", type=int, default=20)
    p.add_argument("--replays", type=int, default=30, help="timed graph replays per case (median taken)")
    p.add_argument("--max-bytes", type=float, default=24e9, help="skip cases whose buffers would exceed this")
    p.add_argument("--out", type=Path, default=None, help="directory for decode_attention.json")
    return p.parse_args(argv)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, H_kv, S, D] -> [B, H_kv * n_rep, S, D], the copy transformers' SDPA path makes."""
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def make_op(name: str, group: int, num_splits: int | None):
    if name == "rast":
        return lambda q, k, v, start, end, mask, out: decode_attention(q, k, v, start, end, out=out,
                                                                       num_splits=num_splits)
    if name == "sdpa_expanded":
        def sdpa_expanded(q, k, v, start, end, mask, out):
            o = torch.nn.functional.scaled_dot_product_attention(
                q[:, :, None], repeat_kv(k, group), repeat_kv(v, group), attn_mask=mask)
            return out.copy_(o[:, :, 0])
        return sdpa_expanded

    def sdpa_gqa(q, k, v, start, end, mask, out):
        o = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, enable_gqa=True)
        return out.copy_(o[:, :, 0])
    return sdpa_gqa


def time_in_graph(fn, sets, calls: int, replays: int) -> float:
    """Per-call microseconds of ``fn(*sets[i % len(sets)])`` captured ``calls`` times in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(3):
            fn(*sets[i % len(sets)])
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(*sets[i % len(sets)])
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    del graph
    return statistics.median(times)


def time_eager(fn, sets, repeats: int = 30) -> float:
    for i in range(3):
        fn(*sets[i % len(sets)])
    torch.cuda.synchronize()
    times = []
    for i in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(*sets[i % len(sets)])
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def run_case(model, batch, s_max, length, args, bandwidth) -> dict | None:
    h_q, h_kv, dim = SHAPES[model]
    dtype = DTYPES[args.dtype]
    if args.pad + length > s_max:
        return None
    elt = torch.finfo(dtype).bits // 8
    cache_bytes = 2 * batch * h_kv * s_max * dim * elt
    n_sets = max(1, min(args.calls_per_graph, -(-L2_ROTATE_BYTES // cache_bytes)))
    expanded_bytes = cache_bytes * (h_q // h_kv)  # sdpa_expanded's temporary copies
    if n_sets * cache_bytes + expanded_bytes > args.max_bytes:
        print(f"skip {model} B={batch} S={s_max}: {n_sets * cache_bytes / 1e9:.1f} GB of buffers", file=sys.stderr)
        return None
    gen = torch.Generator(device="cuda").manual_seed(0)
    start = torch.full((batch,), args.pad, dtype=torch.int32, device="cuda")
    end = start + length
    pos = torch.arange(s_max, device="cuda")
    mask = ((pos >= args.pad) & (pos < args.pad + length)).expand(batch, s_max)[:, None, None, :]
    sets = []
    for _ in range(n_sets):
        q = torch.randn(batch, h_q, dim, device="cuda", generator=gen).to(dtype)
        k = torch.randn(batch, h_kv, s_max, dim, device="cuda", generator=gen).to(dtype)
        v = torch.randn(batch, h_kv, s_max, dim, device="cuda", generator=gen).to(dtype)
        sets.append((q, k, v, start, end, mask, torch.empty_like(q)))
    q, k, v = sets[0][:3]
    want = decode_attention_reference(q, k, v, start, end).float()
    got = decode_attention(q, k, v, start, end, num_splits=args.num_splits).float()
    err = (got - want).abs().max().item()
    floor_bytes = 2 * batch * h_kv * length * dim * elt + 2 * batch * h_q * dim * elt  # K, V of [start, end); q, out
    row = dict(model=model, h_q=h_q, h_kv=h_kv, head_dim=dim, batch=batch, s_max=s_max, length=length,
               pad=args.pad, dtype=args.dtype, buffer_sets=n_sets, max_abs_err_vs_reference=err,
               num_splits=args.num_splits or default_num_splits(batch, h_kv, s_max, dim, q.device),
               floor_us=floor_bytes / bandwidth * 1e6, ops={})
    for name in args.ops:
        fn = make_op(name, h_q // h_kv, args.num_splits)
        try:
            graph_us = time_in_graph(fn, sets, args.calls_per_graph, args.replays)
            eager_us = time_eager(fn, sets)
        except RuntimeError as exc:  # e.g. enable_gqa unsupported with this mask on this torch
            row["ops"][name] = dict(error=f"{type(exc).__name__}: {exc}"[:300])
            continue
        row["ops"][name] = dict(graph_us=graph_us, eager_us=eager_us, floor_fraction=row["floor_us"] / graph_us)
    del sets
    torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode_attention.py needs a CUDA GPU (it times CUDA graphs with CUDA events); "
              "the kernel's correctness tests run on CPU: pytest tests/ops/test_decode_attention.py", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device, 1024, repeats=20)
    result = dict(
        benchmark="decode_attention", date_utc=utc_now(), device=device_name(device), versions=versions(),
        copy_bandwidth_bytes_per_s=bandwidth,
        args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, cases=[],
    )
    print(f"{result['device']}: copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print(f"{'model':<14}{'B':>4}{'S_max':>7}{'L':>6}{'floor us':>10}" + "".join(f"{o + ' us':>17}" for o in args.ops))
    for model in args.models:
        for batch in args.batch:
            for s_max in args.s_max:
                for length in args.lengths:
                    row = run_case(model, batch, s_max, length, args, bandwidth)
                    if row is None:
                        continue
                    result["cases"].append(row)
                    cells = "".join(f"{row['ops'][o]['graph_us']:>17.1f}" if "graph_us" in row["ops"].get(o, {})
                                    else f"{'err':>17}" for o in args.ops)
                    print(f"{model:<14}{batch:>4}{s_max:>7}{length:>6}{row['floor_us']:>10.1f}{cells}"
                          f"   (max err {row['max_abs_err_vs_reference']:.1e})")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / "decode_attention.json"
        write_json(result, path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
