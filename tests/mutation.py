#!/usr/bin/env python
"""Mutation check: apply deliberate bugs to the sampler, the engine and the attention ops one at a time, run the
tests that should catch each, and report the survivors (bugs the suite would let through).

Each mutant is ``(name, file, original snippet, mutated snippet, tests)``. The tree is copied to a temporary
folder (the working tree as it is, the compiled extension included), the snippet is replaced there (it must occur
exactly once: a stale mutant is reported, never silently skipped), and ``pytest -x`` runs the listed tests with
that copy first on ``sys.path``. A mutant of ``csrc/`` rebuilds the extension in the copy first (about a minute).

    python tests/mutation.py                 # every mutant
    python tests/mutation.py --list          # names only
    python tests/mutation.py topp_reference engine_offset    # some of them

Exit status 1 when a mutant survives or is stale. tests/test_mutation_list.py checks in CI that every original
snippet still occurs exactly once, so the list cannot rot unnoticed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPY = ("rast_kernels", "tests", "csrc", "setup.py", "pyproject.toml", "CMakeLists.txt", "benchmarks")

SAMPLER_TESTS = ["tests/ops/test_rast_sample.py"]
SERVING_TESTS = ["tests/engine/test_serving.py"]
SPECULATIVE_TESTS = ["tests/engine/test_speculative.py"]

MUTANTS = [
    ("topp_reference", "rast_kernels/ops/rast_sample_reference.py",
     "keep &= (p >= 1) | (mass_above < p * w.sum(1, keepdim=True))",
     "keep &= (p >= 1) | (mass_above <= p * w.sum(1, keepdim=True))", SAMPLER_TESTS),
    ("minp_reference", "rast_kernels/ops/rast_sample_reference.py",
     "keep &= (m <= 0) | (w >= m)", "keep &= (m <= 0) | (w > m)", SAMPLER_TESTS),
    ("topk_reference", "rast_kernels/ops/rast_sample_reference.py",
     "keep &= (k <= 0) | (rank < k)", "keep &= (k <= 0) | (rank <= k)", SAMPLER_TESTS),
    ("engine_offset", "rast_kernels/engine/runner.py",
     "st.top_p[rows], st.min_p[rows], st.seed[rows], offset,",
     "st.top_p[rows], st.min_p[rows], st.seed[rows], torch.zeros_like(offset),",
     ["tests/engine/test_serving.py::test_sampled_output_equals_full_forwards_and_the_reference_sampler"]),
    ("engine_seed_per_sample", "rast_kernels/engine/sampling_params.py",
     "return int(seed) if sample_index == 0 else mix_seed(seed, sample_index)", "return int(seed)",
     ["tests/engine/test_serving.py::test_sampled_output_equals_full_forwards_and_the_reference_sampler"]),
    ("engine_max_seq_len_boundary", "rast_kernels/engine/inputs.py",
     "if len(ids) + params.max_new_tokens > engine.max_seq_len:",
     "if len(ids) + params.max_new_tokens >= engine.max_seq_len:",
     ["tests/engine/test_serving.py::test_max_seq_len_boundary_and_pool_limits"]),
    ("engine_inert_rows_write", "rast_kernels/engine/runner.py",
     "slots = torch.where(ok, blk.long() * bs + pos % bs, self.scratch).reshape(-1)",
     "slots = (blk.long() * bs + pos % bs).reshape(-1)",
     ["tests/engine/test_serving.py::test_padding_rows_never_write_into_reused_blocks"]),
    ("engine_shared_partial_block_not_copied", "rast_kernels/engine/runner.py",
     "            if copies:\n                lane.cache.copy_blocks(",
     "            if False:\n                lane.cache.copy_blocks(",
     ["tests/engine/test_serving.py::test_n_samples_equal_their_solo_reproduction"]),
    ("engine_eos_kept", "rast_kernels/engine/output_processor.py",
     "            seq.stop_reason = new.pop()\n", "            seq.stop_reason = new[-1]\n",
     ["tests/engine/test_engine.py"]),
    ("engine_stop_window", "rast_kernels/engine/detokenize.py",
     "self.stop_at = find_stop(self.text, self.stops, max(0, old_len - self.hold))[0]",
     "self.stop_at = find_stop(self.text, self.stops, old_len)[0]", ["tests/engine/test_detokenize.py"]),
    ("engine_pos_not_advanced", "rast_kernels/engine/slot_state.py",
     "new_pos = self.pos[rows] + kept if advance else None", "new_pos = self.pos[rows] if advance else None",
     ["tests/engine/test_engine.py::test_greedy_matches_full_forward_oracle"]),
    ("scheduler_preempts_oldest", "rast_kernels/engine/scheduler.py",
     "victim = max((s for s in self.running if s is not seq), key=lambda s: s.admitted_at, default=None)",
     "victim = min((s for s in self.running if s is not seq), key=lambda s: s.admitted_at, default=None)",
     ["tests/engine/test_scheduler.py"]),
    ("scheduler_block_leak", "rast_kernels/engine/scheduler.py",
     "        self.alloc.release(seq.blocks)\n        seq.blocks = []", "        seq.blocks = []",
     ["tests/engine/test_scheduler.py"]),
    # (the ring need not move: every token in it was copied by the snapshot taken before the move)
    ("compaction_forgets_the_block_table", "rast_kernels/engine/slot_state.py",
     "self.done, self.eos, self.block_table, self.ring_tok,", "self.done, self.eos, self.ring_tok,", SERVING_TESTS),
    ("engine_pairs_expert_base_lane", "rast_kernels/engine/runner.py",
     "expert_bases = [logits[eb] for _, eb in self.pairs]", "expert_bases = [logits[e] for e, _ in self.pairs]",
     ["tests/engine/test_pairs.py"]),
    ("engine_plausibility_dropped", "rast_kernels/engine/runner.py",
     "st.base_plausibility[rows] if plausibility else None, self.vocab_size)", "None, self.vocab_size)",
     ["tests/engine/test_pairs.py"]),
    ("speculative_accepts_every_draft", "rast_kernels/engine/speculative.py",
     "match = (xs[:, 1:] == y[:, :k]) & (xs[:, 1:] >= 0)", "match = xs[:, 1:] >= 0", SPECULATIVE_TESTS),
    ("speculative_target_offset", "rast_kernels/engine/speculative.py",
     "(n.unsqueeze(1) + j).reshape(-1), plausibility)", "n.repeat_interleave(q), plausibility)", SPECULATIVE_TESTS),
    ("scheduler_returns_blocks_in_use", "rast_kernels/engine/scheduler.py",
     "keep = self.alloc.blocks_for(upper)\n", "keep = self.alloc.blocks_for(upper) - 1\n",
     ["tests/engine/test_step_plan.py"] + SPECULATIVE_TESTS),
    ("decode_attention_reference_end", "rast_kernels/ops/decode_attention.py",
     "(pos[None, :] < end.to(q.device).long()[:, None])", "(pos[None, :] <= end.to(q.device).long()[:, None])",
     ["tests/ops/test_decode_attention.py"]),
    ("cpp_topp", "csrc/rast_sample_cpu.h", "while (i < its.size() && cum < target) {",
     "while (i < its.size() && cum <= target) {", SAMPLER_TESTS + ["tests/ops/test_rast_sample_cpp.py"]),
]


def _copy_tree(dst: Path) -> None:
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
        elif src.exists():
            shutil.copy2(src, dst / name)


def check_snippets() -> list:
    """``[(name, problem)]`` for mutants whose original snippet does not occur exactly once."""
    bad = []
    for name, path, orig, _, _ in MUTANTS:
        n = (ROOT / path).read_text().count(orig)
        if n != 1:
            bad.append((name, f"snippet occurs {n} times in {path}"))
    return bad


def run_mutant(mutant, timeout: int) -> str:
    name, path, orig, new, tests = mutant
    with tempfile.TemporaryDirectory(prefix=f"mutant_{name}_") as tmp:
        tmp = Path(tmp)
        _copy_tree(tmp)
        f = tmp / path
        text = f.read_text()
        f.write_text(text.replace(orig, new, 1))
        env = dict(os.environ, PYTHONPATH=str(tmp), PYTHONDONTWRITEBYTECODE="1")
        if path.startswith("csrc/"):
            build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tmp, env=env,
                                   capture_output=True, text=True, timeout=timeout)
            if build.returncode:
                return f"build failed: {build.stderr[-300:]}"
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=tmp,
                           env=env, capture_output=True, text=True, timeout=timeout)
        return "caught" if r.returncode != 0 else "SURVIVED"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="mutants to run (default: all)")
    ap.add_argument("--list", action="store_true", help="print the mutant names and exit")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per mutant (default 900)")
    args = ap.parse_args(argv)
    known = {m[0]: m for m in MUTANTS}
    if args.list:
        print("\n".join(known))
        return 0
    unknown = [n for n in args.names if n not in known]
    if unknown:
        ap.error(f"names: unknown mutant(s) {unknown}; --list shows them")
    stale = dict(check_snippets())
    failed = False
    for name in args.names or list(known):
        if name in stale:
            print(f"{name:42s} STALE ({stale[name]})", flush=True)
            failed = True
            continue
        t = time.time()
        verdict = run_mutant(known[name], args.timeout)
        failed |= verdict != "caught"
        print(f"{name:42s} {verdict} ({time.time() - t:.0f}s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
