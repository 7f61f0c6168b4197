"""Micro-benchmark of decode attention: ``decode_attention`` (Triton, static cache), ``paged_decode_attention``
(Triton, paged cache) and SDPA.

For each attention shape (the heads of a real model), batch size, cache size ``S_max`` and valid length
``L`` (every row attends to ``[pad, pad + L)``: ``pad`` columns of left padding, then ``L`` tokens) it times

* ``rast``: :func:`rast_kernels.ops.decode_attention.decode_attention` (grouped heads, reads ``[start, end)``),
* ``sdpa_expanded``: what transformers' SDPA path does with a static cache and a mask: K/V expanded to the
  query heads over the whole cache (``repeat_kv``), then SDPA with a boolean ``[B, 1, 1, S_max]`` mask,
* ``sdpa_gqa``: SDPA with ``enable_gqa=True`` and the same mask over the whole cache (no expansion copy),
* ``paged``: :func:`rast_kernels.ops.paged_attention.paged_decode_attention` on the same K/V laid out in
  ``[NB, --block-size, H_kv, D]`` pools through a randomly permuted block table (rows attend ``[0, L)``: the
  same number of positions as ``rast``, the paged cache has no padding), against ``rast`` on the same lengths,

and the floor: the bytes that must be read (K and V of the valid range, q) and written (out), over the
device's copy bandwidth measured in the same run (bytes read plus written).

Timing: each op is captured ``--calls-per-graph`` times in one CUDA graph (inputs rotated over enough
buffer sets to exceed L2), the graph is replayed with CUDA events around it, and the per-call time is the
replay time divided by the calls: that is the GPU time the op costs inside the engine's captured step,
without Python launch overhead. ``eager_us`` (events around single eager calls) is reported beside it.
Every case is checked against :func:`decode_attention_reference` (and the paged one against
:func:`paged_decode_attention_reference`) first.

Examples::

    python benchmarks/bench_decode_attention.py --out out/
    python benchmarks/bench_decode_attention.py --models Qwen2.5-7B --batch 1 --s-max 4352 --lengths 257 --out out/
    python benchmarks/bench_decode_attention.py --quick --out out/      # tiny cases; runs on CPU too

Writes ``decode_attention.json`` under ``--out``, rewritten after every case (a run cut short keeps what it
measured). Timing needs CUDA; on CPU only ``--quick`` runs: the kernels under the Triton interpreter, checked
against the references, no timing.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # the CPU quick mode runs the Triton kernels interpreted (set before Triton loads)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from common import copy_bandwidth, device_name, run_to_json, utc_now, versions  # noqa: E402
from rast_kernels import _cli  # noqa: E402
from rast_kernels.ops.decode_attention import (  # noqa: E402
    decode_attention, decode_attention_reference, default_num_splits)
from rast_kernels.ops.paged_attention import (  # noqa: E402
    paged_decode_attention, paged_decode_attention_reference)

# name -> (H_q, H_kv, head_dim), from the public configs (benchmarks/configs)
SHAPES = {
    "Qwen2.5-7B": (28, 4, 128),
    "Qwen2.5-1.5B": (12, 2, 128),
    "Qwen2.5-0.5B": (14, 2, 64),
    "Llama-3.1-8B": (32, 8, 128),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OPS = ("rast", "sdpa_expanded", "sdpa_gqa", "paged")
# --quick: a few tiny cases (odd lengths crossing blocks, GQA 7) that the Triton interpreter runs in seconds
QUICK = dict(models=["Qwen2.5-0.5B"], batch=[2], s_max=[80], lengths=[33, 70], calls_per_graph=4, replays=5)
L2_ROTATE_BYTES = 256 * 2**20  # rotate inputs over at least this many bytes so that no case runs from L2


def parse_args(argv=None) -> argparse.Namespace:
    p = _cli.ArgumentParser(prog="bench_decode_attention.py", description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["Qwen2.5-7B", "Qwen2.5-1.5B"], choices=sorted(SHAPES),
                   help="attention shapes of these models (default Qwen2.5-7B Qwen2.5-1.5B)")
    p.add_argument("--batch", type=_cli.int_range(1), nargs="+", default=[1, 8, 32], help="rows (default 1 8 32)")
    p.add_argument("--s-max", type=_cli.int_range(1), nargs="+", default=[4352],
                   help="cache positions (StaticCache max_cache_len; default 4352)")
    p.add_argument("--lengths", type=_cli.int_range(1), nargs="+", default=[257, 1024, 4096],
                   help="valid tokens per row (default 257 1024 4096)")
    p.add_argument("--pad", type=_cli.int_range(0), default=0,
                   help="left padding per row (start = pad, end = pad + length; default 0)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="default bf16")
    p.add_argument("--num-splits", type=_cli.int_range(1, 64), default=None, help="override the kernel's split count")
    p.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS, help="what to time (default all)")
    p.add_argument("--calls-per-graph", type=_cli.int_range(1), default=20,
                   help="op calls captured per CUDA graph (default 20)")
    p.add_argument("--replays", type=_cli.int_range(1), default=30, help="timed graph replays per case (median taken)")
    p.add_argument("--max-bytes", type=_cli.float_range(0.0, lo_open=True), default=24e9,
                   help="skip cases whose buffers would exceed this (default 24e9)")
    p.add_argument("--block-size", type=_cli.int_range(1), default=16,
                   help="positions per block of the paged cache (default 16)")
    p.add_argument("--quick", action="store_true", help=f"tiny cases ({QUICK}); the only mode that runs on CPU")
    p.add_argument("--out", type=_cli.output_dir, default=None, help="directory for decode_attention.json")
    args = p.parse_args(argv)
    if args.out is not None:
        args.out = Path(args.out)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, H_kv, S, D] -> [B, H_kv * n_rep, S, D], the copy transformers' SDPA path makes."""
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def make_op(name: str, group: int, num_splits: int | None):
    """``fn(q, k, v, start, end, mask, out, k_pool, v_pool, table, seq_lens)`` for op ``name``."""
    if name == "paged":
        return lambda q, k, v, start, end, mask, out, kp, vp, table, lens: paged_decode_attention(
            q, kp, vp, table, lens, out=out, num_splits=num_splits)
    if name == "rast":
        return lambda q, k, v, start, end, mask, out, *paged: decode_attention(q, k, v, start, end, out=out,
                                                                                num_splits=num_splits)
    if name == "sdpa_expanded":
        def sdpa_expanded(q, k, v, start, end, mask, out, *paged):
            o = torch.nn.functional.scaled_dot_product_attention(
                q[:, :, None], repeat_kv(k, group), repeat_kv(v, group), attn_mask=mask)
            return out.copy_(o[:, :, 0])
        return sdpa_expanded

    def sdpa_gqa(q, k, v, start, end, mask, out, *paged):
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


def to_pages(k, v, block_size, gen):
    """``(k_pool, v_pool, table)``: the static caches ``[B, H_kv, S, D]`` as ``[B * MAXBLK, BS, H_kv, D]`` pools
    (the last block zero-padded) whose blocks are placed by a random permutation; ``table`` [B, MAXBLK] int32."""
    batch, h_kv, s_max, dim = k.shape
    max_blocks = -(-s_max // block_size)
    perm = torch.randperm(batch * max_blocks, generator=gen, device=gen.device)
    table = perm.view(batch, max_blocks).to(torch.int32)
    pools = []
    for cache in (k, v):
        padded = torch.zeros(batch, h_kv, max_blocks * block_size, dim, dtype=cache.dtype, device=cache.device)
        padded[:, :, :s_max] = cache
        blocks = padded.view(batch, h_kv, max_blocks, block_size, dim).permute(0, 2, 3, 1, 4)  # [B, MAXBLK, BS, H, D]
        pool = torch.empty(batch * max_blocks, block_size, h_kv, dim, dtype=cache.dtype, device=cache.device)
        pool[perm] = blocks.reshape(batch * max_blocks, block_size, h_kv, dim)
        pools.append(pool)
    return pools[0], pools[1], table


def run_case(model, batch, s_max, length, args, bandwidth, device) -> dict | None:
    """One case's row; ``bandwidth`` None: no timing (CPU), only the checks against the references."""
    h_q, h_kv, dim = SHAPES[model]
    dtype = DTYPES[args.dtype]
    if args.pad + length > s_max:
        return None
    elt = torch.finfo(dtype).bits // 8
    cache_bytes = 2 * batch * h_kv * s_max * dim * elt
    paged = "paged" in args.ops
    n_sets = max(1, min(args.calls_per_graph, -(-L2_ROTATE_BYTES // cache_bytes))) if bandwidth else 1
    expanded_bytes = cache_bytes * (h_q // h_kv)  # sdpa_expanded's temporary copies
    if n_sets * cache_bytes * (2 if paged else 1) + expanded_bytes > args.max_bytes:
        print(f"skip {model} B={batch} S={s_max}: {n_sets * cache_bytes / 1e9:.1f} GB of buffers", file=sys.stderr)
        return None
    gen = torch.Generator(device=device).manual_seed(0)
    start = torch.full((batch,), args.pad, dtype=torch.int32, device=device)
    end = start + length
    seq_lens = torch.full((batch,), length, dtype=torch.int32, device=device)  # paged rows: [0, L)
    pos = torch.arange(s_max, device=device)
    mask = ((pos >= args.pad) & (pos < args.pad + length)).expand(batch, s_max)[:, None, None, :]
    sets = []
    for _ in range(n_sets):
        q = torch.randn(batch, h_q, dim, device=device, generator=gen).to(dtype)
        k = torch.randn(batch, h_kv, s_max, dim, device=device, generator=gen).to(dtype)
        v = torch.randn(batch, h_kv, s_max, dim, device=device, generator=gen).to(dtype)
        # the paged pools hold the same positions [pad, pad + L) at [0, L): the shift keeps the values equal
        pages = to_pages(k[:, :, args.pad:], v[:, :, args.pad:], args.block_size, gen) if paged else (None,) * 3
        sets.append((q, k, v, start, end, mask, torch.empty_like(q), *pages, seq_lens))
    q, k, v = sets[0][:3]
    want = decode_attention_reference(q, k, v, start, end).float()
    got = decode_attention(q, k, v, start, end, backend="triton", num_splits=args.num_splits).float()
    err = (got - want).abs().max().item()
    floor_bytes = 2 * batch * h_kv * length * dim * elt + 2 * batch * h_q * dim * elt  # K, V of [start, end); q, out
    row = dict(model=model, h_q=h_q, h_kv=h_kv, head_dim=dim, batch=batch, s_max=s_max, length=length,
               pad=args.pad, dtype=args.dtype, buffer_sets=n_sets, max_abs_err_vs_reference=err,
               num_splits=args.num_splits or default_num_splits(batch, h_kv, s_max, dim, q.device),
               floor_us=floor_bytes / bandwidth * 1e6 if bandwidth else None, ops={})
    if paged:
        k_pool, v_pool, table = sets[0][7:10]
        got_paged = paged_decode_attention(q, k_pool, v_pool, table, seq_lens, backend="triton",
                                           num_splits=args.num_splits).float()
        want_paged = paged_decode_attention_reference(q, k_pool, v_pool, table, seq_lens).float()
        row.update(block_size=args.block_size, paged_max_abs_err_vs_reference=(got_paged - want_paged).abs().max().item(),
                   paged_max_abs_diff_vs_rast=(got_paged - got).abs().max().item())
    if not bandwidth:
        return row
    for name in args.ops:
        fn = make_op(name, h_q // h_kv, args.num_splits)
        try:
            graph_us = time_in_graph(fn, sets, args.calls_per_graph, args.replays)
            eager_us = time_eager(fn, sets)
        except RuntimeError as exc:  # e.g. enable_gqa unsupported with this mask on this torch
            row["ops"][name] = dict(error=f"{type(exc).__name__}: {exc}"[:300])
            continue
        row["ops"][name] = dict(graph_us=graph_us, eager_us=eager_us, floor_fraction=row["floor_us"] / graph_us)
    if "graph_us" in row["ops"].get("paged", {}) and "graph_us" in row["ops"].get("rast", {}):
        row["paged_over_rast"] = row["ops"]["paged"]["graph_us"] / row["ops"]["rast"]["graph_us"]
    del sets
    torch.cuda.empty_cache()
    return row


def run(args, checkpoint=None) -> dict:
    """All cases; ``checkpoint(result)`` after each one (run_to_json writes the JSON there)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bandwidth = copy_bandwidth(device, 1024, repeats=20) if device.type == "cuda" else None
    result = dict(
        benchmark="decode_attention", date_utc=utc_now(), device=device_name(device), versions=versions(),
        copy_bandwidth_bytes_per_s=bandwidth, timed=bandwidth is not None,
        args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, cases=[],
    )
    if bandwidth:
        print(f"{result['device']}: copy bandwidth {bandwidth / 1e12:.2f} TB/s")
        print(f"{'model':<14}{'B':>4}{'S_max':>7}{'L':>6}{'floor us':>10}" + "".join(f"{o + ' us':>17}" for o in args.ops))
    else:
        print(f"{result['device']}: no CUDA, checks only (Triton interpreter, no timing)")
    for model in args.models:
        for batch in args.batch:
            for s_max in args.s_max:
                for length in args.lengths:
                    row = run_case(model, batch, s_max, length, args, bandwidth, device)
                    if row is None:
                        continue
                    result["cases"].append(row)
                    if checkpoint is not None:
                        checkpoint(result)
                    errs = f"max err {row['max_abs_err_vs_reference']:.1e}" + (
                        f", paged {row['paged_max_abs_err_vs_reference']:.1e}" if "block_size" in row else "")
                    if not bandwidth:
                        print(f"{model:<14}{batch:>4}{s_max:>7}{length:>6}   ({errs})")
                        continue
                    cells = "".join(f"{row['ops'][o]['graph_us']:>17.1f}" if "graph_us" in row["ops"].get(o, {})
                                    else f"{'err':>17}" for o in args.ops)
                    print(f"{model:<14}{batch:>4}{s_max:>7}{length:>6}{row['floor_us']:>10.1f}{cells}   ({errs})")
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available() and not args.quick:
        print("bench_decode_attention.py times CUDA graphs with CUDA events and needs a CUDA GPU; on CPU, --quick "
              "runs tiny cases through the Triton interpreter (checks only); the kernels' tests: "
              "pytest tests/ops/test_decode_attention.py tests/ops/test_paged_attention.py", file=sys.stderr)
        return 2
    run_to_json(run, args, "decode_attention.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
