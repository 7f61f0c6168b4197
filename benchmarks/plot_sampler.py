"""Plot ``sampler.json`` from ``bench_sampler.py``: median time per sampling step against batch size.

One panel per (input dtype, setting) row and vocabulary width column; one line per op (p10-p90 band)
and number of expert pairs K (line style: solid K = 1, then dashed, dotted...), and the read floor of each K
in black. Log-log axes.

    python benchmarks/plot_sampler.py out/sampler.json            # writes out/sampler.png
    python benchmarks/plot_sampler.py out/sampler.json -o fig.png
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from rast_kernels import _cli

# matplotlib is only in the [bench] extra: imported when a plot is drawn, so that a missing one is a
# one-line message (here and in bench_sampler.py) instead of an import-time traceback
MATPLOTLIB_HINT = ("matplotlib is not installed (pip install matplotlib, or the [bench] extra: "
                   "pip install --no-build-isolation \".[bench]\")")


def have_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on CI or the GPU machine
    import matplotlib.pyplot as plt

    return plt


def _label(row: dict) -> str:
    return f"{row['op']} ({row['backend']})"


def _pairs(row: dict) -> int:
    return row.get("pairs", 1)  # results from before the K rows are K = 1


LINE_STYLES = ("-", "--", ":", "-.")


def plot(result: dict, path: Path) -> Path:
    """Draw ``result`` (the JSON object ``bench_sampler`` writes) to the PNG at ``path``."""
    rows = [r for r in result["rows"] if r.get("median_us")]
    panels = sorted({(r["dtype"], r["setting"]) for r in rows})
    vocabs = sorted({r["V"] for r in rows})
    ops = list(dict.fromkeys(_label(r) for r in rows))
    pairs = sorted({_pairs(r) for r in rows})
    styles = {k: LINE_STYLES[i % len(LINE_STYLES)] for i, k in enumerate(pairs)}

    def suffix(k):  # the K of a line, named only when the result has several
        return f", K={k}" if len(pairs) > 1 else ""
    if not panels:
        raise ValueError("result: no timed rows to plot")
    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), len(vocabs), figsize=(max(4.2 * len(vocabs), 8.0), 3.2 * len(panels) + 0.8),
                             squeeze=False, sharex=True)
    colors = {op: f"C{i}" for i, op in enumerate(ops)}
    for i, (dtype, setting) in enumerate(panels):
        for j, V in enumerate(vocabs):
            ax = axes[i][j]
            sel = [r for r in rows if (r["dtype"], r["setting"], r["V"]) == (dtype, setting, V)]
            for k in pairs:
                for op in ops:
                    pts = sorted((r["B"], r["median_us"], r["p10"], r["p90"]) for r in sel
                                 if _label(r) == op and _pairs(r) == k)
                    if not pts:
                        continue
                    bs, med, lo, hi = zip(*pts)
                    ax.plot(bs, med, marker="o", ls=styles[k], color=colors[op], label=op + suffix(k), ms=3)
                    ax.fill_between(bs, lo, hi, color=colors[op], alpha=0.2)
                floor = sorted({(r["B"], r["floor_us"]) for r in sel if _pairs(r) == k})
                if floor:
                    ax.plot(*zip(*floor), color="k", ls=styles[k] if len(pairs) > 1 else "--", lw=1,
                            label="read floor" + suffix(k))
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"V={V}, {dtype}, {setting}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if j == 0:
                ax.set_ylabel("us per step (median)")
            if i == len(panels) - 1:
                ax.set_xlabel("batch size B")
    handles, labels = axes[0][0].get_legend_handles_labels()
    meta = result.get("meta", {})
    fig.suptitle(f"RAST sampling step: {meta.get('device', '?')}, torch {meta.get('versions', {}).get('torch', '?')}, "
                 f"{meta.get('date', '')}", fontsize=10)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=8)
    # room under the panels for the legend: about 0.2 in per legend row (one line per op and K)
    legend_rows = -(-len(labels) // 3)
    fig.tight_layout(rect=(0, max(0.08, (0.3 + 0.2 * legend_rows) / fig.get_figheight()), 1, 0.95))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = _cli.ArgumentParser(prog="plot_sampler.py", description="Plot bench_sampler.py's JSON")
    p.add_argument("json", type=Path, help="sampler.json")
    p.add_argument("-o", "--output", type=Path, default=None, help="PNG path (default: beside the JSON)")
    args = p.parse_args(argv)
    result = _cli.read_json(p, "json", str(args.json))
    if not (isinstance(result, dict) and result.get("meta", {}).get("benchmark") == "sampler"):
        _cli.fail(p, "json", f"{str(args.json)!r} is not a bench_sampler.py result")
    if not any(r.get("median_us") for r in result.get("rows", [])):
        _cli.fail(p, "json", f"{str(args.json)!r} has no timed rows to plot")
    if not have_matplotlib():
        p.exit(2, f"{p.prog}: error: {MATPLOTLIB_HINT}\n")
    out = plot(result, args.output or args.json.with_suffix(".png"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
