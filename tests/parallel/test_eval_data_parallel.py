"""``torchrun -m rast_kernels eval`` with 2 data-parallel ranks on the toy trio: the same sample records (as a set)
and summary as one process; a resume with part files left by an interrupted run (of any group count) completes
them; merging parts is idempotent; option errors are reported once."""
import json
import os
import shutil

import pytest

from parallel_launch import needs_dist, torchrun
from rast_kernels.eval import cli, report, store

pytestmark = needs_dist
ARGS = ["--toy", "--max-problems", "6", "--n", "2", "--k", "1", "2", "--alpha", "1", "--base-only", "--diagnostics",
        "--no-progress"]


def _records(out):
    return store.read_records(os.path.join(out, store.SAMPLES))


def _as_set(records):
    return sorted(json.dumps(r, sort_keys=True) for r in records)


def _summary(out):
    with open(os.path.join(out, report.SUMMARY)) as f:
        s = json.load(f)
    return {k: s[k] for k in ("results", "diagnostics", "configs")}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("eval1"))
    assert cli.main(ARGS + ["--out", out]) == 0
    return out


def _eval_dp2(out):
    # "--" keeps torchrun's parser off the eval options ("--n" would be an ambiguous abbreviation for it)
    r = torchrun(2, "-m", "rast_kernels", "--", "eval", *ARGS, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_two_ranks_match_one_process(one_process, tmp_path):
    out = str(tmp_path / "dp2")
    r = _eval_dp2(out)
    assert _as_set(_records(out)) == _as_set(_records(one_process)) and len(_records(out)) == 2 * 6 * 2
    assert _summary(out) == _summary(one_process)
    assert store.part_files(out) == []  # merged into samples.jsonl
    assert r.stdout.count("| base + delta (alpha=1) |") == 1  # only rank 0 prints the table


def test_tensor_parallel_eval_matches_one_process(one_process, tmp_path):
    """--tensor-parallel-size 2 on 2 ranks (one TP group: the base sharded): the same completions and grades
    (the diagnostics' floats may differ in the last places: the sharded sums round differently)."""
    out = str(tmp_path / "tp2")
    r = torchrun(2, "-m", "rast_kernels", "--", "eval", *ARGS, "--out", out, "--tensor-parallel-size", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    keep = lambda recs: sorted((x["problem_id"], x["config"], x["sample_index"], x["completion"], x["correct"])  # noqa: E731
                               for x in recs)
    assert keep(_records(out)) == keep(_records(one_process)) and len(_records(out)) == 2 * 6 * 2
    assert _summary(out)["results"] == _summary(one_process)["results"]


def test_resume_with_parts_left_by_an_interrupted_run(one_process, tmp_path):
    out = str(tmp_path / "resumed")
    shutil.copytree(one_process, out)
    recs = _records(one_process)
    lines = [json.dumps(r) + "\n" for r in recs]
    with open(os.path.join(out, store.SAMPLES), "w") as f:
        f.writelines(lines[:5])
    with open(store.part_path(out, 0), "w") as f:  # group 0 of the interrupted run, killed mid-line
        f.writelines(lines[5:9] + [lines[9][:20]])
    with open(store.part_path(out, 3), "w") as f:  # a group of an earlier run with more groups
        f.writelines(lines[9:12] + lines[2:3])  # ... and one record samples.jsonl already has
    os.remove(os.path.join(out, report.SUMMARY))
    _eval_dp2(out)
    assert _as_set(_records(out)) == _as_set(recs) and len(_records(out)) == len(recs)
    assert store.part_files(out) == []
    assert _summary(out) == _summary(one_process)
    with open(os.path.join(out, report.SUMMARY)) as f:
        assert json.load(f)["run"]["resumed_samples"] == 12


def test_merge_parts_is_idempotent(tmp_path):
    out = str(tmp_path)
    rec = lambda i: dict(dataset="toy", problem_id=f"p{i}", config="base", sample_index=0)  # noqa: E731
    with open(os.path.join(out, store.SAMPLES), "w") as f:
        f.write(json.dumps(rec(0)) + "\n")
    for g, ids in ((0, [1, 2]), (1, [2, 3])):
        with open(store.part_path(out, g), "w") as f:
            f.writelines(json.dumps(rec(i)) + "\n" for i in ids)
    assert [os.path.basename(p) for p in store.part_files(out)] == ["samples.part-0.jsonl", "samples.part-1.jsonl"]
    assert store.merge_parts(out) == 3 and store.merge_parts(out) == 0
    assert [r["problem_id"] for r in _records(out)] == ["p0", "p1", "p2", "p3"]


def test_option_error_under_torchrun_is_one_line_from_rank_0(tmp_path):
    r = torchrun(2, "-m", "rast_kernels", "--", "eval", "--toy", "--n", "2", "--k", "3", "--out", str(tmp_path))
    assert r.returncode != 0
    assert r.stderr.count("error: argument --k: k = 3 is more than --n 2") == 1, r.stderr[-3000:]


def test_tensor_parallel_size_without_torchrun_is_an_option_error(tmp_path, capsys):
    assert cli.main(["--toy", "--tensor-parallel-size", "2", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --tensor-parallel-size: 2 needs 2 processes" in err, err
