"""The report of an evaluation: the summary of its sample records, the table and the alpha plot.

It owns these files in the output directory: ``summary.json`` (:data:`SUMMARY`: metrics per configuration and
dataset, diagnostics aggregates, the run's throughput), ``table.md`` (:data:`TABLE`, :func:`format_table`) and
``alpha.png`` (:data:`PLOT`, :func:`plot_alpha`, when matplotlib is importable); and the compact per-sample
diagnostics format that a record's ``diag`` holds (:func:`sample_diagnostics`) with its aggregation
(:func:`aggregate_diagnostics`).

Invariants: the summary is a function of the records alone (and the settings), never of how they were made: a
resumed run, or one over any number of data-parallel groups, summarises the same numbers, because a record keeps
exactly what the summary aggregates and :func:`build_summary` takes the records in key order. ``summary.json``
is strict JSON (a NaN, e.g. the s.e. of a single problem, is written as null).
"""
from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import asdict
from typing import TYPE_CHECKING, Callable, Optional

from .metrics import summarize

if TYPE_CHECKING:
    from .run import Settings

SUMMARY, TABLE, PLOT = "summary.json", "table.md", "alpha.png"
KL_PERCENTILES = (50, 90, 99)
TOP_RAISED = 10


# ---------------------------------------------------------------------------------------------- diagnostics
def sample_diagnostics(diag: dict, token_ids) -> dict:
    """Per-sample delta statistics from a :attr:`GenerationOutput.diagnostics` dict and the sample's token ids,
    kept compact: what the summary aggregates, so that a resumed run summarises the same numbers. ``raised``
    counts, per token id, the steps where the delta raised the chosen token's probability (``p_rast > p_base``)."""
    flips = diag["argmax_flip"]
    raised = Counter(str(t) for t, pb, pr in zip(token_ids, diag["p_base"], diag["p_rast"]) if pr > pb)
    return dict(steps=len(flips), flips=int(sum(flips)), first_flip=bool(flips[0]) if flips else None,
                kl=[float(f"{x:.4g}") for x in diag["kl_base_rast"]], raised=dict(raised))


def _percentile(sorted_vals, q):
    if not sorted_vals:
        return None
    pos = (len(sorted_vals) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def aggregate_diagnostics(records: list, decode: Optional[Callable] = None) -> dict:
    """Per configuration: ``flip_share`` (steps where the delta moved the argmax / all steps),
    ``first_token_flip_share`` (samples whose first token's argmax moved), ``kl_percentiles`` (of
    ``KL(p_base || p_rast)`` over all steps, linear interpolation) and ``top_raised`` (the tokens whose probability
    the delta raised most often: decoded text, id, count)."""
    by_cfg: dict = {}
    for r in records:
        d = r.get("diag")
        if d is None:
            continue
        by_cfg.setdefault(r["config"], []).append(d)
    out = {}
    for cfg, ds in by_cfg.items():
        steps = sum(d["steps"] for d in ds)
        firsts = [d["first_flip"] for d in ds if d["first_flip"] is not None]
        kl = sorted(x for d in ds for x in d["kl"])
        raised = Counter()
        for d in ds:
            raised.update({int(k): v for k, v in d["raised"].items()})
        out[cfg] = dict(
            samples=len(ds), steps=steps, flip_share=(sum(d["flips"] for d in ds) / steps) if steps else None,
            first_token_flip_share=(sum(firsts) / len(firsts)) if firsts else None,
            kl_percentiles={f"p{q}": _percentile(kl, q) for q in KL_PERCENTILES} | {"max": kl[-1] if kl else None},
            top_raised=[dict(token=decode([t]) if decode else None, id=t, count=c)
                        for t, c in raised.most_common(TOP_RAISED)])
    return out


# ---------------------------------------------------------------------------------------------- summary
def build_summary(datasets, configs, settings: Settings, records, decode=None) -> dict:
    """Metrics per configuration and dataset from the records of the current problems and samples (``records`` in
    :func:`~rast_kernels.eval.store.record_key` order, so that ties, e.g. of ``top_raised``, do not depend on the
    file's order); ``decode(ids) -> str`` names the diagnostics' tokens."""
    want = {(d.name, it.id) for d in datasets for it in d.items}
    recs = [r for r in records if (r["dataset"], r["problem_id"]) in want and r["sample_index"] < settings.n
            and r["config"] in {c.name for c in configs}]
    results = {}
    for c in configs:
        results[c.name] = {}
        for d in datasets:
            per = {}
            for r in recs:
                if r["config"] == c.name and r["dataset"] == d.name:
                    per.setdefault(r["problem_id"], {})[r["sample_index"]] = r
            rows = [dict(correct=[per[it.id][j]["correct"] for j in range(settings.n)],
                         answers=[per[it.id][j]["extracted"] for j in range(settings.n)])
                    for it in d.items if it.id in per and len(per[it.id]) == settings.n]
            m = summarize(rows, settings.ks) if rows else {"problems": 0}
            m["finish_reasons"] = dict(Counter(r["finish_reason"] for p in per.values() for r in p.values()))
            results[c.name][d.name] = m
    s = dict(settings=dict(asdict(settings), template=settings.template.name), configs=[asdict(c) for c in configs],
             labels={c.name: c.label for c in configs}, results=results)
    if settings.diagnostics:
        s["diagnostics"] = aggregate_diagnostics(recs, decode)
    return s


def run_stats(wall: float, loading: float, tokens: int, resumed: int, speculative=None) -> dict:
    """The summary's ``run`` entry: wall and model-loading seconds, new tokens, tokens/s over the time not spent
    loading (None when nothing was generated), and how many samples were already done; with speculative decoding
    (``speculative``: summed ``RastEngine.stats()`` counts ``rounds``, ``drafted``, ``checked``, ``accepted``,
    ``emitted``) also those counts, the acceptance rate (accepted / checked) and the mean tokens per round."""
    gen = wall - loading
    out = dict(wall_s=round(wall, 3), loading_s=round(loading, 3), new_tokens=tokens,
               tokens_per_s=round(tokens / gen, 1) if gen > 0 and tokens else None, resumed_samples=resumed)
    if speculative and speculative.get("rounds"):
        acceptance = speculative["accepted"] / max(1, speculative["checked"])
        out["speculative"] = dict(speculative, acceptance=round(acceptance, 4),
                                  tokens_per_round=round(speculative["emitted"] / speculative["rounds"], 3))
    return out


# ---------------------------------------------------------------------------------------------- table and plot
def _pct(x):
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def format_table(summary: dict) -> str:
    """Markdown, the paper's layout: rows base, expert, base + delta per alpha; one column per dataset; cells
    ``pass@1 ± s.e.`` then ``pass@k`` for each ``k > 1`` (percent)."""
    datasets = list(next(iter(summary["results"].values())).keys())
    ks = [k for k in summary["settings"]["ks"] if k > 1]
    n = summary["settings"]["n"]
    lines = [f"| model (pass@1 ± s.e.{''.join(f', pass@{k}' for k in ks)}; n = {n}) | "
             + " | ".join(f"{d} ({summary['results'][next(iter(summary['results']))][d]['problems']})"
                          for d in datasets) + " |",
             "|---|" + "---|" * len(datasets)]
    for cfg, per in summary["results"].items():
        cells = []
        for d in datasets:
            m = per[d]
            if not m.get("problems"):
                cells.append("-")
                continue
            p1, se = m["pass@1"]
            cells.append(f"{_pct(p1)} ± {_pct(se)}" + "".join(f" · {_pct(m[f'pass@{k}'][0])}" for k in ks))
        lines.append(f"| {summary['labels'][cfg]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_alpha(summary: dict, path: str) -> Optional[str]:
    """pass@1 against alpha per dataset (error bars: s.e.; the base / expert rows as horizontal lines). Returns
    None when drawn, else why not (matplotlib missing, no alpha row)."""
    rast = [c for c in summary["configs"] if c["row"] == "rast"]
    if not rast:
        return "no base + delta rows to plot"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for d in next(iter(summary["results"].values())):
        pts = sorted((c["alpha"], summary["results"][c["name"]][d]) for c in rast)
        pts = [(a, m) for a, m in pts if m.get("problems")]
        line = ax.errorbar([a for a, _ in pts], [100 * m["pass@1"][0] for _, m in pts],
                           yerr=[0 if math.isnan(m["pass@1"][1]) else 100 * m["pass@1"][1] for _, m in pts],
                           marker="o", capsize=3, label=f"{d}: base + delta")
        for c in summary["configs"]:
            if c["row"] != "rast" and summary["results"][c["name"]][d].get("problems"):
                ax.axhline(100 * summary["results"][c["name"]][d]["pass@1"][0], color=line[0].get_color(),
                           ls="--" if c["row"] == "base" else ":", lw=1, label=f"{d}: {summary['labels'][c['name']]}")
    ax.set_xlabel("alpha")
    ax.set_ylabel("pass@1 (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def _json_safe(x):
    # NaN (the s.e. of a single problem) is not JSON; null is
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_outputs(out_dir, summary, configs, datasets, log=print) -> None:
    """Write ``summary.json``, ``table.md`` and (when it can) ``alpha.png`` into ``out_dir``; ``log`` the table
    and where the plot went or why it was skipped."""
    with open(os.path.join(out_dir, SUMMARY), "w", encoding="utf-8") as f:
        json.dump(_json_safe(summary), f, indent=1, allow_nan=False)
    table = format_table(summary)
    with open(os.path.join(out_dir, TABLE), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    log(table)
    why = plot_alpha(summary, os.path.join(out_dir, PLOT))
    log(f"plot: {os.path.join(out_dir, PLOT)}" if why is None else f"plot skipped: {why}")
