"""Running an evaluation: every (dataset, problem, configuration, sample) through one engine per model set.

It owns what is run and how: the configurations (:class:`Config`, the rows of the RAST paper's tables: ``base``
the base model alone, ``expert`` the RL expert alone, ``rast`` at each alpha: base + alpha * delta), the
:class:`Settings` that decide the samples, the seeds, the feeding of requests into the engine, and
:func:`run_eval`, which generates what the output directory lacks and ends with the report. The files belong to
:mod:`rast_kernels.eval.store` (``samples.jsonl``, part files, ``run.json``: resume) and
:mod:`rast_kernels.eval.report` (``summary.json``, ``table.md``, ``alpha.png``).

Invariants:

* Configurations that need the same models share one :class:`~rast_kernels.RastEngine` (alpha is a per-request
  setting); the base and expert rows use ``RastEngine(model, None, None)``. Requests are fed continuously
  (:meth:`~rast_kernels.RastEngine.add_request` / :meth:`~rast_kernels.RastEngine.step`, the waiting queue kept
  topped up), so the batch never drains between problems.
* Seeds: problem ``p`` of dataset ``d`` gets the request seed ``mix_seed(seed, h(d, p.id))`` (``h``: SHA-256 of
  the names), the same for every configuration, so that configurations are compared on common random numbers;
  sample ``j`` uses ``sample_seed(that, j)``, and a sample whose request is re-made alone on resume uses exactly
  that seed. So a sample does not depend on the run, the resume or the data-parallel group that made it.
* Each finished sample is graded and appended to the store at once (flushed): Ctrl-C or a crash loses nothing
  that was written.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from .datasets import Dataset
from .grading import grade_detail
from .report import build_summary, run_stats, sample_diagnostics, write_outputs
from .store import SAMPLES, check_resume, merge_parts, part_path, read_samples, record_key
from .templates import Template


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
    """The request seed of a problem, shared by every configuration (module docstring)."""
    from ..ops.philox import mix_seed

    h = int.from_bytes(hashlib.sha256(f"{dataset}\0{problem_id}".encode()).digest()[:8], "big") >> 1
    return mix_seed(seed, h)


# ---------------------------------------------------------------------------------------------- the plan
@dataclass
class _Unit:
    """One (problem, configuration) pair with samples still missing."""

    dataset: Dataset
    index: int
    config: Config
    seed: int
    missing: List[int]


@dataclass
class _Plan:
    """What this data-parallel group generates: its units per model set (in set order, empty sets kept), each
    set's engine length, and the tokenized prompts (dataset name -> token ids per problem)."""

    prompts: Dict[str, List[List[int]]]
    units: Dict[str, List[_Unit]]
    seq_len: Dict[str, int]
    resumed: int  # samples already done, in every group (the same on every rank: the done keys are broadcast)


def _make_plan(datasets, configs, settings: Settings, tokenizer, done_keys: set, ctx) -> _Plan:
    """The units still missing, dealt round-robin over the DP groups (:func:`~rast_kernels.parallel.share`)."""
    from ..parallel import share

    prompts = {d.name: [list(tokenizer(settings.template.render(it.input, tokenizer), add_special_tokens=True)
                             ["input_ids"]) for it in d.items] for d in datasets}
    sets = [m for m in ("trio", "base", "expert") if any(c.models == m for c in configs)]
    units = {m: [] for m in sets}
    resumed = 0
    for d in datasets:
        for i, it in enumerate(d.items):
            seed = problem_seed(settings.seed, d.name, it.id)
            for c in configs:
                missing = [j for j in range(settings.n) if (d.name, it.id, c.name, j) not in done_keys]
                resumed += settings.n - len(missing)
                if missing:
                    units[c.models].append(_Unit(d, i, c, seed, missing))
    # engines sized for the whole set, as one process would size them: the same shapes for any number of groups
    seq_len = {m: max(len(prompts[u.dataset.name][u.index]) for u in units[m]) + settings.max_new_tokens
               for m in sets if units[m]}
    mine = share([(m, u) for m in sets for u in units[m]], ctx)  # one deal over all sets balances the groups
    return _Plan(prompts, {m: [u for mm, u in mine if mm == m] for m in sets}, seq_len, resumed)


# ---------------------------------------------------------------------------------------------- feeding
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


def _record(unit: _Unit, j: int, out) -> dict:
    """The graded sample record (:data:`~rast_kernels.eval.store.RECORD_FIELDS`) of sample ``j`` of ``unit``,
    from its finished :class:`~rast_kernels.GenerationOutput`."""
    from ..engine import sample_seed

    item = unit.dataset.items[unit.index]
    ok, extracted = grade_detail(out.text, item.answer, unit.dataset.grader)
    rec = dict(dataset=unit.dataset.name, problem_id=item.id, config=unit.config.name, sample_index=j,
               seed=sample_seed(unit.seed, j), completion=out.text, extracted=extracted, correct=ok,
               tokens=len(out.token_ids), finish_reason=out.finish_reason)
    if out.diagnostics is not None:
        rec["diag"] = sample_diagnostics(out.diagnostics, out.token_ids)
    return rec


class _Tally:
    """The running totals of this process: new tokens and model-loading time (for the summary), and the
    progress bar (``show``: global rank 0 only; under DP it shows what was done before plus what group 0 does).
    ``done_records``: the records already in the store (accuracy and problems done start from them)."""

    def __init__(self, datasets, configs, settings: Settings, done_records, plan: _Plan, show: bool, dp: int):
        self.bar = None
        if show:
            from tqdm.auto import tqdm

            todo = sum(len(u.missing) for units in plan.units.values() for u in units)
            self.bar = tqdm(total=plan.resumed + todo, initial=plan.resumed, unit="sample", file=sys.stderr,
                            desc="eval" if dp == 1 else f"eval [DP group 0 of {dp}]")
        self.n = settings.n
        relevant = [r for r in done_records if r["sample_index"] < settings.n]
        self.right, self.graded = sum(r["correct"] for r in relevant), len(relevant)
        # problems done = (problem, configuration) pairs with all n samples
        self.per_pair = Counter((r["dataset"], r["problem_id"], r["config"]) for r in relevant)
        self.pairs_total = sum(len(d.items) for d in datasets) * len(configs)
        self.pairs_done = sum(v >= settings.n for v in self.per_pair.values())
        self.t0, self.tokens, self.loading = time.perf_counter(), 0, 0.0
        self.speculative = Counter()  # the engines' speculative_* counts (RastEngine.stats())

    def add_engine(self, engine) -> None:
        """Count what an engine reports about its speculative rounds (nothing without speculation)."""
        self.speculative.update({k[len("speculative_"):]: v for k, v in engine.stats().items()
                                 if k.startswith("speculative_") and k not in ("speculative_tokens_per_round",
                                                                               "speculative_acceptance")})

    def add(self, rec: dict) -> None:
        """Count one new sample record."""
        self.tokens += rec["tokens"]
        self.right, self.graded = self.right + rec["correct"], self.graded + 1
        pair = (rec["dataset"], rec["problem_id"], rec["config"])
        self.per_pair[pair] += 1
        self.pairs_done += self.per_pair[pair] == self.n
        if self.bar is not None:
            el = time.perf_counter() - self.t0 - self.loading  # tokens/s counts generation and grading only
            self.bar.update(1)
            self.bar.set_postfix(problems=f"{self.pairs_done}/{self.pairs_total}",
                                 tok_s=f"{self.tokens / el:.0f}" if el > 0 else "-",
                                 acc=f"{self.right / self.graded:.3f}",
                                 refresh=False)  # redrawn at tqdm's own pace, not per sample

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _generate(engine, units: List[_Unit], prompts, settings: Settings, sink, leader: bool,
              tally: _Tally) -> None:
    """Feed ``units`` through ``engine`` until every request finishes. The leader of a TP group grades each
    finished sample and appends its record to ``sink`` (flushed at once); its other ranks make the same engine
    calls (SPMD) and drop the outputs."""
    feeder = _Feeder(engine, units, lambda u: prompts[u.dataset.name][u.index], settings)
    feeder.top_up()
    while feeder.busy():
        for out in engine.step():
            if not out.finished or not leader:
                continue
            unit, idx = feeder.live[out.request_id]
            rec = _record(unit, idx[out.sample_index], out)
            sink.write(json.dumps(rec) + "\n")
            sink.flush()  # Ctrl-C or a crash loses nothing that was written
            tally.add(rec)
        feeder.top_up()


def _release_memory():
    import gc

    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- the run
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
    from ..parallel import broadcast_object, current, gather_objects

    ctx = context if context is not None else current()
    dp = ctx.dp_size if ctx is not None else 1
    rank0, leader = ctx is None or ctx.rank == 0, ctx is None or ctx.is_leader
    done = {}
    if rank0:  # one reader: the leaders start appending only once the plan is broadcast
        check_resume(out_dir, settings)
        done = {record_key(r): r for r in read_samples(out_dir, parts=True)}
    done_keys = broadcast_object(set(done) if rank0 else None, context=ctx)
    plan = _make_plan(datasets, configs, settings, tokenizer, done_keys, ctx)
    tally = _Tally(datasets, configs, settings, done.values(), plan, progress and rank0, dp)
    path = os.path.join(out_dir, SAMPLES) if dp == 1 else part_path(out_dir, ctx.dp_rank)
    try:
        # only the leader of a TP group writes; its other ranks make the same engine calls (SPMD) and drop outputs
        with open(path if leader else os.devnull, "a", encoding="utf-8") as sink:
            for m, units in plan.units.items():
                if not units:
                    continue
                t_make = time.perf_counter()
                engine = engine_factory(m, plan.seq_len[m], settings.diagnostics and m == "trio")
                tally.loading += time.perf_counter() - t_make  # tokens/s counts generation and grading only
                _generate(engine, units, plan.prompts, settings, sink, leader, tally)
                tally.add_engine(engine)
                del engine
                _release_memory()  # the next model set's engine sizes its KV pool from the memory left free
    finally:
        tally.close()
    # the end of every group's work (this waits for the slowest one); leaders report (new tokens, loading time)
    reports = gather_objects((tally.tokens, tally.loading, dict(tally.speculative)) if leader else None, context=ctx)
    if not rank0:
        return None
    merge_parts(out_dir)
    wall = time.perf_counter() - tally.t0
    reports = [r for r in reports if r is not None]
    tokens, loading = sum(r[0] for r in reports), max(r[1] for r in reports)  # groups load in parallel
    speculative = sum((Counter(r[2]) for r in reports), Counter())
    # in key order: the summary (e.g. the order of tied top_raised tokens) must not depend on the file's order,
    # which depends on the number of groups and on when samples finished
    summary = build_summary(datasets, configs, settings, sorted(read_samples(out_dir), key=record_key),
                            decode=lambda ids: tokenizer.decode(ids))
    summary["run"] = run_stats(wall, loading, tokens, plan.resumed, speculative)
    write_outputs(out_dir, summary, configs, datasets, log)
    return summary
