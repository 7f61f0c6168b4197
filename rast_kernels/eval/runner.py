"""The evaluation runner: every (dataset, problem, configuration, sample) through one engine per model set.

Configurations (:class:`Config`) are the rows of the RAST paper's tables: ``base`` (the base model alone),
``expert`` (the RL expert alone) and ``rast`` at each alpha (base + alpha * delta). Configurations that need the
same models share one :class:`~rast_kernels.RastEngine` (alpha is a per-request setting); the base and expert rows
use ``RastEngine(model, None, None)``. Requests are fed continuously (:meth:`~rast_kernels.RastEngine.add_request`
/ :meth:`~rast_kernels.RastEngine.step`, the waiting queue kept topped up), so the batch never drains between
problems.

Seeds: problem ``p`` of dataset ``d`` gets the request seed ``mix_seed(seed, h(d, p.id))`` (``h``: SHA-256 of the
names), the same for every configuration, so that configurations are compared on common random numbers; sample
``j`` uses ``sample_seed(that, j)``, and a sample whose request is re-made alone on resume uses exactly that seed.

Files in the output directory:

* ``samples.jsonl`` — one line per sample, appended and flushed as each finishes (:data:`RECORD_FIELDS`);
  re-running with the same settings reads it and generates only what is missing (a torn last line from a hard
  kill is dropped). With diagnostics each line also holds ``diag`` (per-sample delta statistics).
* ``samples.part-G.jsonl`` — under torchrun with several data-parallel groups: what group ``G`` has written so
  far, in the same format (each group appends to its own file, so nothing is shared while running and an
  interruption loses nothing). At the end global rank 0 appends every part's new records to ``samples.jsonl``
  and deletes the parts; a resumed run (any number of groups, or one process) reads the parts as done.
* ``run.json`` — the settings that decide the samples (models, template, temperature, top-p, max-new-tokens,
  seed); resuming with different ones is refused (:func:`check_resume`).
* ``summary.json`` (metrics per configuration and dataset, diagnostics aggregates, throughput), ``table.md``
  (:func:`format_table`) and ``alpha.png`` (when matplotlib is importable).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

from .datasets import Dataset
from .grading import grade_detail
from .metrics import summarize
from .templates import Template

RECORD_FIELDS = ("dataset", "problem_id", "config", "sample_index", "seed", "completion", "extracted", "correct",
                 "tokens", "finish_reason")
SAMPLES, RUN, SUMMARY, TABLE, PLOT = "samples.jsonl", "run.json", "summary.json", "table.md", "alpha.png"
PART_PREFIX, PART_SUFFIX = "samples.part-", ".jsonl"  # + the DP group's index: one file per group (module doc)
KL_PERCENTILES = (50, 90, 99)
TOP_RAISED = 10


@dataclass(frozen=True)
class Config:
    """One row of the table. ``models``: which engine serves it (``"trio"``, ``"base"`` or ``"expert"``)."""

    name: str
    row: str
    alpha: float = 1.0

    @property
    def models(self) -> str:
        return "trio" if self.row == "rast" else self.row

    @property
    def label(self) -> str:
        return {"base": "base", "expert": "expert (RL)"}.get(self.row, f"base + delta (alpha={self.alpha:g})")


def make_configs(alphas, base_only: bool, expert_only: bool) -> List[Config]:
    """Rows in the paper's order: base, expert, then base + delta per alpha (as given, duplicates dropped)."""
    out = []
    if base_only:
        out.append(Config("base", "base"))
    if expert_only:
        out.append(Config("expert", "expert"))
    seen = set()
    for a in alphas:
        if float(a) not in seen:
            seen.add(float(a))
            out.append(Config(f"rast@{float(a):g}", "rast", float(a)))
    return out


@dataclass
class Settings:
    """What decides the samples (``fingerprint``) and how many are drawn."""

    models: Dict[str, Optional[str]]
    template: Template
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    n: int = 1
    ks: List[int] = field(default_factory=lambda: [1])
    diagnostics: bool = False
    max_batch_size: int = 32

    def fingerprint(self) -> dict:
        return dict(models=self.models, template=self.template.text, chat=self.template.chat,
                    temperature=self.temperature, top_p=self.top_p, max_new_tokens=self.max_new_tokens,
                    seed=self.seed)


def problem_seed(seed: int, dataset: str, problem_id: str) -> int:
    from ..ops.philox import mix_seed

    h = int.from_bytes(hashlib.sha256(f"{dataset}\0{problem_id}".encode()).digest()[:8], "big") >> 1
    return mix_seed(seed, h)


# ---------------------------------------------------------------------------------------------- files
def check_resume(out_dir: str, settings: Settings) -> None:
    """``ValueError`` naming ``out`` when ``out_dir`` holds samples made with other settings; writes ``run.json``
    on a fresh directory."""
    path = os.path.join(out_dir, RUN)
    mine = settings.fingerprint()
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            try:
                theirs = json.load(f)
            except json.JSONDecodeError:
                raise ValueError(f"out: {path} is not JSON; delete it or use another --out") from None
        diff = [k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
        if diff:
            k = diff[0]
            raise ValueError(f"out: {out_dir!r} holds samples made with other settings ({k}: {theirs.get(k)!r} "
                             f"there, {mine.get(k)!r} now); use another --out to keep both")
    else:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(mine, f, indent=1)


def part_path(out_dir: str, dp_rank: int) -> str:
    """Where data-parallel group ``dp_rank`` writes its samples while it runs."""
    return os.path.join(out_dir, f"{PART_PREFIX}{dp_rank}{PART_SUFFIX}")


def part_files(out_dir: str) -> List[str]:
    """The part files in ``out_dir`` (left by a data-parallel run not merged yet), in group order."""
    names = [n for n in os.listdir(out_dir) if n.startswith(PART_PREFIX) and n.endswith(PART_SUFFIX)
             and n[len(PART_PREFIX):-len(PART_SUFFIX)].isdigit()]
    return [os.path.join(out_dir, n) for n in sorted(names, key=lambda n: int(n[len(PART_PREFIX):-len(PART_SUFFIX)]))]


def read_samples(out_dir: str, parts: bool = False) -> list:
    """The records of ``samples.jsonl`` (and, with ``parts``, then of every part file); a torn last line (a run
    killed mid-write) is cut from its file, so that appending goes on from a whole line."""
    paths = [os.path.join(out_dir, SAMPLES)] + (part_files(out_dir) if parts else [])
    return [r for path in paths for r in _read_records(path)]


def merge_parts(out_dir: str) -> int:
    """Append the records of every part file that ``samples.jsonl`` lacks to it, then delete the parts; returns
    how many were appended. Safe to repeat after a crash midway (a record already there is not appended twice)."""
    path = os.path.join(out_dir, SAMPLES)
    have = {_key(r) for r in _read_records(path)}
    added = 0
    for part in part_files(out_dir):
        with open(path, "a", encoding="utf-8") as sink:
            for rec in _read_records(part):
                if _key(rec) not in have:
                    have.add(_key(rec))
                    sink.write(json.dumps(rec) + "\n")
                    added += 1
            sink.flush()
            os.fsync(sink.fileno())  # on disk before its part goes
        os.remove(part)
    return added


def _read_records(path: str) -> list:
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    out = []
    for lineno, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"out: {path}:{lineno} is not a sample record (not JSON); fix or delete that "
                                 "line, or use another --out") from None
    return out


def _key(rec) -> tuple:
    return rec["dataset"], rec["problem_id"], rec["config"], rec["sample_index"]


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


# ---------------------------------------------------------------------------------------------- the run
@dataclass
class _Unit:
    dataset: Dataset
    index: int
    config: Config
    seed: int
    missing: List[int]


class _Feeder:
    """Requests for one engine, made lazily and added while the engine's waiting queue is short."""

    def __init__(self, engine, units, ids_of, settings: Settings):
        self.engine, self.units, self.ids_of, self.settings = engine, iter(units), ids_of, settings
        self.live: dict = {}  # request id -> (unit, sample indices by the request's sample_index)
        self.exhausted = False

    def top_up(self):
        from ..engine import SamplingParams, sample_seed

        s = self.settings
        while not self.exhausted and self.engine.stats()["waiting"] < 2 * s.max_batch_size:
            unit = next(self.units, None)
            if unit is None:
                self.exhausted = True
                return
            ids = self.ids_of(unit)
            base = dict(alpha=unit.config.alpha, temperature=s.temperature, top_p=s.top_p,
                        max_new_tokens=s.max_new_tokens)
            if unit.missing == list(range(s.n)):  # the whole request: its n samples share one prefill
                rid = self.engine.add_request(ids, SamplingParams(n=s.n, seed=unit.seed, **base))
                self.live[rid] = (unit, unit.missing)
            else:  # a partly done request (resume): each missing sample alone, with the seed it had
                for j in unit.missing:
                    rid = self.engine.add_request(ids, SamplingParams(n=1, seed=sample_seed(unit.seed, j), **base))
                    self.live[rid] = (unit, [j])

    def busy(self) -> bool:
        return not self.exhausted or self.engine.has_unfinished_requests()


def run_eval(datasets: List[Dataset], configs: List[Config], settings: Settings, out_dir: str, *, tokenizer,
             engine_factory: Callable, progress: bool = True, log: Callable = print,
             context=None) -> Optional[dict]:
    """Generate what ``out_dir`` lacks, grade it, and write the summary files (module docstring); returns the
    summary. ``engine_factory(models, max_seq_len, diagnostics)`` builds the engine of a model set (``"trio"``,
    ``"base"``, ``"expert"``); it is called only for sets with missing samples. ``tokenizer`` renders templates
    and tokenizes prompts (the engine gets token ids) and decodes the diagnostics' tokens.

    Data parallel (``context``, a :class:`~rast_kernels.parallel.ParallelContext`; default the current one): call
    it on every rank. The (problem, configuration) units still missing are dealt round-robin over the DP groups
    (:func:`~rast_kernels.parallel.share`); each group's leader grades and writes its part file; global rank 0
    plans (reads what is done), merges the parts, writes the summary files and returns the summary; the other
    ranks return None. A unit's samples do not depend on the group that made them (seeds are per problem)."""
    from ..parallel import broadcast_object, current, gather_objects, share

    ctx = context if context is not None else current()
    dp = ctx.dp_size if ctx is not None else 1
    rank0, leader = ctx is None or ctx.rank == 0, ctx is None or ctx.is_leader
    done = {}
    if rank0:  # one reader: the leaders start appending only once the plan is broadcast
        check_resume(out_dir, settings)
        done = {_key(r): r for r in read_samples(out_dir, parts=True)}
    done_keys = broadcast_object(set(done) if rank0 else None, context=ctx)
    prompts = {d.name: [list(tokenizer(settings.template.render(it.input, tokenizer), add_special_tokens=True)
                             ["input_ids"]) for it in d.items] for d in datasets}
    sets = [m for m in ("trio", "base", "expert") if any(c.models == m for c in configs)]
    units = {m: [] for m in sets}
    done_now = 0
    for d in datasets:
        for i, it in enumerate(d.items):
            seed = problem_seed(settings.seed, d.name, it.id)
            for c in configs:
                missing = [j for j in range(settings.n) if (d.name, it.id, c.name, j) not in done_keys]
                done_now += settings.n - len(missing)
                if missing:
                    units[c.models].append(_Unit(d, i, c, seed, missing))
    # engines sized for the whole set, as one process would size them: the same shapes for any number of groups
    seq_len = {m: max(len(prompts[u.dataset.name][u.index]) for u in units[m]) + settings.max_new_tokens
               for m in sets if units[m]}
    mine = share([(m, u) for m in sets for u in units[m]], ctx)  # one deal over all sets balances the groups
    units = {m: [u for mm, u in mine if mm == m] for m in sets}

    bar = None
    if progress and rank0:  # under DP: what is done plus what group 0 does
        from tqdm.auto import tqdm

        bar = tqdm(total=done_now + sum(len(u.missing) for _, u in mine), initial=done_now,
                   desc="eval" if dp == 1 else f"eval [DP group 0 of {dp}]", unit="sample", file=sys.stderr)
    relevant = [r for r in done.values() if r["sample_index"] < settings.n]
    right, graded = sum(r["correct"] for r in relevant), len(relevant)
    # problems done = (problem, configuration) pairs with all n samples, for the progress bar
    per_pair = Counter((r["dataset"], r["problem_id"], r["config"]) for r in relevant)
    pairs_total = sum(len(d.items) for d in datasets) * len(configs)
    pairs_done = sum(v >= settings.n for v in per_pair.values())
    t0, tokens, loading = time.perf_counter(), 0, 0.0
    path = os.path.join(out_dir, SAMPLES) if dp == 1 else part_path(out_dir, ctx.dp_rank)
    try:
        # only the leader of a TP group writes; its other ranks make the same engine calls (SPMD) and drop outputs
        with open(path if leader else os.devnull, "a", encoding="utf-8") as sink:
            for m in sets:
                if not units[m]:
                    continue
                diag = settings.diagnostics and m == "trio"
                t_make = time.perf_counter()
                engine = engine_factory(m, seq_len[m], diag)
                loading += time.perf_counter() - t_make  # tokens/s counts generation and grading, not loading
                feeder = _Feeder(engine, units[m], lambda u: prompts[u.dataset.name][u.index], settings)
                feeder.top_up()
                while feeder.busy():
                    for out in engine.step():
                        if not out.finished or not leader:
                            continue
                        unit, idx = feeder.live[out.request_id]
                        j = idx[out.sample_index]
                        item = unit.dataset.items[unit.index]
                        ok, extracted = grade_detail(out.text, item.answer, unit.dataset.grader)
                        rec = dict(dataset=unit.dataset.name, problem_id=item.id, config=unit.config.name,
                                   sample_index=j, seed=_sample_seed(unit.seed, j), completion=out.text,
                                   extracted=extracted, correct=ok, tokens=len(out.token_ids),
                                   finish_reason=out.finish_reason)
                        if out.diagnostics is not None:
                            rec["diag"] = sample_diagnostics(out.diagnostics, out.token_ids)
                        sink.write(json.dumps(rec) + "\n")
                        sink.flush()  # Ctrl-C or a crash loses nothing that was written
                        tokens += rec["tokens"]
                        right, graded = right + ok, graded + 1
                        pair = (rec["dataset"], rec["problem_id"], rec["config"])
                        per_pair[pair] += 1
                        pairs_done += per_pair[pair] == settings.n
                        if bar is not None:
                            el = time.perf_counter() - t0 - loading
                            bar.update(1)
                            bar.set_postfix(problems=f"{pairs_done}/{pairs_total}",
                                            tok_s=f"{tokens / el:.0f}" if el > 0 else "-", acc=f"{right / graded:.3f}",
                                            refresh=False)  # redrawn at tqdm's own pace, not per sample
                    feeder.top_up()
                del engine, feeder
                _release_memory()  # the next model set's engine sizes its KV pool from the memory left free
    finally:
        if bar is not None:
            bar.close()
    # the end of every group's work (this waits for the slowest one); leaders report (new tokens, loading time)
    reports = gather_objects((tokens, loading) if leader else None, context=ctx)
    if not rank0:
        return None
    merge_parts(out_dir)
    wall = time.perf_counter() - t0
    reports = [r for r in reports if r is not None]
    tokens, loading = sum(r[0] for r in reports), max(r[1] for r in reports)  # groups load in parallel
    gen = wall - loading
    # in key order: the summary (e.g. the order of tied top_raised tokens) must not depend on the file's order,
    # which depends on the number of groups and on when samples finished
    summary = build_summary(datasets, configs, settings, sorted(read_samples(out_dir), key=_key),
                            decode=lambda ids: tokenizer.decode(ids))
    summary["run"] = dict(wall_s=round(wall, 3), loading_s=round(loading, 3), new_tokens=tokens,
                          tokens_per_s=round(tokens / gen, 1) if gen > 0 and tokens else None,
                          resumed_samples=done_now)
    write_outputs(out_dir, summary, configs, datasets, log)
    return summary


def _release_memory():
    import gc

    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _sample_seed(seed, j):
    from ..engine import sample_seed

    return sample_seed(seed, j)


def build_summary(datasets, configs, settings: Settings, records, decode=None) -> dict:
    """Metrics per configuration and dataset from the records of the current problems and samples."""
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
    with open(os.path.join(out_dir, SUMMARY), "w", encoding="utf-8") as f:
        json.dump(_json_safe(summary), f, indent=1, allow_nan=False)
    table = format_table(summary)
    with open(os.path.join(out_dir, TABLE), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    log(table)
    why = plot_alpha(summary, os.path.join(out_dir, PLOT))
    log(f"plot: {os.path.join(out_dir, PLOT)}" if why is None else f"plot skipped: {why}")
