"""Markdown tables from ``sampler.json`` / ``decode.json`` for ``benchmarks/RESULTS.md``.

    python benchmarks/results_table.py out/sampler.json out/decode.json

Prints, per file, a header line (device, versions, date, command) and one table; paste it under the
matching section of RESULTS.md with the card and date.
"""
from __future__ import annotations

from pathlib import Path

from rast_kernels import _cli


def _f(x, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def _header(meta: dict) -> str:
    v = meta.get("versions", {})
    return (f"Device: {meta.get('device')}; torch {v.get('torch')}, triton {v.get('triton')}, "
            f"transformers {v.get('transformers')}; {meta.get('date')}; copy bandwidth "
            f"{_f(meta.get('copy_bandwidth_GBps'))} GB/s (read + write).\n"
            f"Command: `python benchmarks/{meta.get('command')}`\n")


def sampler_table(result: dict) -> str:
    """One row per (dtype, setting, K, V, B): median us of each op, floor, our speedups. On CPU each cell
    is "wall / process-CPU" time (the CPU time is steadier on a shared machine). K is the number of expert
    pairs (results written before the K rows existed have K = 1)."""
    rows = result["rows"]
    ops = list(dict.fromkeys(r["op"] for r in rows))
    cols = [op for op in ("rast_sample", "rast_sample_reference", "hf_chain", "flashinfer_top_k_top_p_from_logits")
            if op in ops]
    names = {"rast_sample": "ours", "rast_sample_reference": "reference", "hf_chain": "HF chain",
             "flashinfer_top_k_top_p_from_logits": "FlashInfer"}
    cpu = any("cpu_median_us" in r for r in rows)
    unit = "us (wall / CPU)" if cpu else "us"
    backend = next((r["backend"] for r in rows if r["op"] == "rast_sample"), "?")
    lines = [_header(result["meta"]),
             "| dtype | setting | K | V | B | " + " | ".join(f"{names[c]} {unit}" for c in cols)
             + " | floor us | ours vs reference | ours vs HF chain |",
             "|" + "---|" * (5 + len(cols) + 3)]

    def cell(r):
        if not r or r.get("median_us") is None:
            return "skipped" if r and r.get("skipped") else "-"
        return f"{_f(r['median_us'])} / {_f(r.get('cpu_median_us'))}" if cpu else _f(r["median_us"])

    def speedup(r, name):
        wall, c = r.get(name), r.get("cpu_" + name)
        if wall is None:
            return "-"
        return f"{wall:.1f}x / {c:.1f}x" if cpu and c is not None else f"{wall:.1f}x"

    def case(r):
        return r["dtype"], r["setting"], r.get("pairs", 1), r["V"], r["B"]

    for key in sorted({case(r) for r in rows}):
        sel = {r["op"]: r for r in rows if case(r) == key}
        ours = sel.get("rast_sample", {})
        floor = next(iter(sel.values()))["floor_us"]
        lines.append(f"| {' | '.join(map(str, key))} | " + " | ".join(cell(sel.get(c)) for c in cols)
                     + f" | {_f(floor, '.2f')} | {speedup(ours, 'speedup_vs_reference')}"
                     + f" | {speedup(ours, 'speedup_vs_hf_chain')} |")
    reasons = sorted({f"{r['op']}: {r['skipped']}" for r in rows if r.get("skipped")})
    if reasons:
        lines.append("\nskipped: " + "; ".join(reasons))
    lines.append(f"\n`ours` = `rast_sample` backend `auto` -> `{backend}`; K expert pairs (floor: 2K + 1 inputs); "
                 "medians of per-call times "
                 f"({result['meta'].get('timer', {}).get('clock')}"
                 + ("; wall-clock / process CPU time, speedups likewise" if cpu else "") + ").")
    return "\n".join(lines)


def decode_table(result: dict) -> str:
    meta = result["meta"]
    lines = [_header(meta),
             f"Models: {' + '.join(meta.get('models', []))} "
             f"({meta.get('dtype')}, {_f(meta.get('weight_GB'), '.2f')} GB)"
             + (f"; second pair (`engine_2pairs`, K = 2): {' + '.join(meta['second_pair'])} "
                f"({_f(meta.get('weight_GB_2pairs'), '.2f')} GB with the trio)" if meta.get("second_pair") else "")
             + "; "
             f"prompt {meta.get('prompt_len')}, {meta.get('new_tokens')} new tokens "
             f"(peer loop {meta.get('peer_new_tokens')}); sampling {meta.get('sampling')}.\n",
             "| B | system | ms/token | tokens/s | vs peer loop | % of floor | note |",
             "|---|---|---|---|---|---|---|"]
    order = ["engine", "engine_2pairs", "peer_loop", "base_alone_engine", "base_alone_eager", "floor", "floor_2pairs",
             "floor_base_alone"]
    for r in sorted(result["rows"], key=lambda r: (r["B"], order.index(r["system"]) if r["system"] in order else 99)):
        note = r.get("error") or r.get("note", "")
        if "attn_implementation" in r:
            note += f" [attention {r['attn_implementation']}, CUDA graph {r.get('cuda_graph')}]"
        x_peer = f"{r['speedup_vs_peer']:.2f}x" if r.get("speedup_vs_peer") else "-"
        lines.append(f"| {r['B']} | {r['system']} | {_f(r.get('ms_per_token'), '.2f')} | {_f(r.get('tokens_per_s'))} | "
                     f"{x_peer} | {_f(r.get('pct_of_floor'))} | {note} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = _cli.ArgumentParser(prog="results_table.py", description="Markdown tables from bench_sampler / bench_decode JSON")
    p.add_argument("files", type=Path, nargs="+", help="sampler.json and/or decode.json")
    args = p.parse_args(argv)
    results = []
    for path in args.files:  # read and check them all before printing any table
        result = _cli.read_json(p, "files", str(path))
        kind = result.get("meta", {}).get("benchmark") if isinstance(result, dict) else None
        if kind not in ("sampler", "decode") or not isinstance(result.get("rows"), list):
            _cli.fail(p, "files", f"{str(path)!r} is not a bench_sampler / bench_decode result (meta.benchmark={kind!r})")
        results.append(result)
    for result in results:
        print(sampler_table(result) if result["meta"]["benchmark"] == "sampler" else decode_table(result))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
