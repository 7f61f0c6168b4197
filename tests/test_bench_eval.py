"""benchmarks/bench_eval.py end to end on a few toy problems: both systems run, write eval.json, and agree on
every pass@1 (the same seeds give the same samples whatever the scheduling); a bad option is one line, exit 2."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_eval_runs_and_the_systems_agree(tmp_path):
    r = subprocess.run([sys.executable, "benchmarks/bench_eval.py", "--problems", "12", "--n", "2",
                        "--max-batch-size", "8", "--warmup-problems", "2", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads((tmp_path / "eval.json").read_text())["rows"]
    assert [row["system"] for row in rows] == ["continuous", "static"]
    assert all(row["new_tokens"] > 0 and row["tokens_per_s"] > 0 for row in rows)
    assert rows[0]["pass_at_1"] == rows[1]["pass_at_1"] and rows[0]["new_tokens"] == rows[1]["new_tokens"]


def test_bench_eval_option_error_as_a_subprocess():
    r = subprocess.run([sys.executable, "benchmarks/bench_eval.py", "--problems", "0"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--problems" in r.stderr, r.stderr
