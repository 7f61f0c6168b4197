"""The eval command: option checks before any model is loaded, and an end-to-end run on the shipped toy trio
(8 held-out problems, 4 samples each at T = 1, 24 new tokens) with its resume after an interruption."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from rast_kernels.eval import cli, report, run, store

DATA = os.path.join(os.path.dirname(__file__), "data")
TOY = ["--toy", "--max-problems", "8", "--n", "4", "--k", "1", "4", "--max-new-tokens", "24", "--no-progress"]


def data(name):
    return os.path.join(DATA, name)


@pytest.fixture
def no_models(monkeypatch):
    # any attempt to build an engine is a failure of "validate every option before loading models"
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the options were checked")

    monkeypatch.setattr(run, "run_eval", boom)
    monkeypatch.setattr("rast_kernels.engine.RastEngine", boom)


BAD = [
    (["--dataset", "math500", "--data", data("nope.jsonl"), "--base", "gpt2", "--base-only"], "--data", "no such file"),
    (["--dataset", "math500", "--data", data("missing_answer.jsonl"), "--base", "gpt2", "--base-only"], "--data",
     "record 1 has no answer field"),
    (["--dataset", "math500", "--data", data("custom_fields.jsonl"), "--field-problem", "q", "--field-answer",
      "nope", "--base", "gpt2", "--base-only"], "--field-answer", "no answer field 'nope'"),
    (["--dataset", "mmlu", "--data", data("math500.jsonl")], "--dataset", "invalid choice"),
    (TOY[:5] + ["--k", "8"], "--k", "k = 8 is more than --n 4"),
    (["--toy", "--template", data("template_no_input.txt")], "--template", "does not contain {input}"),
    (["--toy", "--template", "chat"], "--template", "chat template"),
    (["--toy", "--base", "gpt2"], "--base", "--toy loads the shipped trio"),
    (["--base", "gpt2", "--dataset", "toy", "--alpha", "1"], "--expert", "need --expert and --expert-base"),
    (["--base", "./no/such/model", "--dataset", "toy", "--base-only"], "--base", "no such directory"),
    (["--base", DATA, "--dataset", "toy", "--base-only"], "--base", "not a model directory"),
    (["--base", "gpt2", "--base-only", "--dataset", "math500", "gsm8k", "--data", data("math500.jsonl")],
     "--data", "expected 2 file(s)"),
    (["--toy", "--dataset", "toy", "math500", "--data", data("math500.jsonl")], "--template",
     "need different templates"),
    (["--toy", "--n", "0"], "--n", "must be >= 1"),
    (["--toy", "--top-p", "0"], "--top-p", "must be in (0, 1]"),
    (["--toy", "--alpha", "nan"], "--alpha", "must be finite"),
    (["--toy", "--scheduling", "fifo"], "--scheduling", "invalid choice"),
    (["--toy", "--tensor-parallel-size", "0"], "--tensor-parallel-size", ">= 1"),
]


@pytest.mark.parametrize("argv,option,why", BAD, ids=[b[1] + ":" + b[2][:20] for b in BAD])
def test_bad_options_are_one_line_exit_2(argv, option, why, no_models, capsys, tmp_path):
    assert cli.main(argv + ["--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{cli.PROG}: error: argument {option}"), err
    assert why in err, err


def test_out_with_other_settings_is_refused(no_models, capsys, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / store.RUN).write_text(json.dumps({"temperature": 0.0}))
    assert cli.main(["--toy", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --out" in err and "other settings" in err, err


def test_damaged_samples_file_is_refused(no_models, capsys, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / store.SAMPLES).write_text('{"dataset": "toy"}\n{oops\n{"dataset": "toy"}\n')
    assert cli.main(["--toy", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --out" in err and "samples.jsonl:2 is not a sample record" in err, err


def test_math_dataset_without_math_verify(no_models, monkeypatch, capsys, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "math_verify" else real(name, *a))
    assert cli.main(["--base", "gpt2", "--base-only", "--dataset", "math500", "--data", data("math500.jsonl"),
                     "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --dataset: math500 is graded with math-verify" in err, err


def test_subprocess_error_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "rast_kernels.eval.cli", "--toy", "--n", "2", "--k", "3",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"{cli.PROG}: error: argument --k: k = 3 is more than --n 2 samples "
                                             "per problem (see --help)"]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("toy_eval"))
    argv = TOY + ["--alpha", "0", "1", "--base-only", "--diagnostics", "--out", out]
    assert cli.main(argv) == 0
    with open(os.path.join(out, report.SUMMARY)) as f:
        summary = json.load(f)
    return argv, out, summary


def _records(out):
    with open(os.path.join(out, store.SAMPLES)) as f:
        return [json.loads(line) for line in f]


def test_toy_table_delta_beats_base(toy_run, capsys):
    argv, out, s = toy_run
    res = s["results"]
    assert res["rast@1"]["toy"]["problems"] == 8 and res["rast@1"]["toy"]["samples"] == 32
    assert res["rast@1"]["toy"]["pass@1"][0] > res["base"]["toy"]["pass@1"][0]
    assert res["rast@1"]["toy"]["pass@1"][0] >= 0.9  # the trio's recorded eval: base + delta ~0.99
    # alpha = 0 is the base's logits exactly, and configurations share seeds: the same samples as the base row
    assert res["rast@0"] == res["base"]
    table = open(os.path.join(out, report.TABLE)).read()
    lines = table.splitlines()
    assert lines[0].startswith("| model (pass@1 ± s.e., pass@4; n = 4) | toy (8) |")
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| base", "| base + delta (alpha=0)",
                                                              "| base + delta (alpha=1)"]
    recs = _records(out)
    assert len(recs) == 3 * 8 * 4
    assert len({store.record_key(r) for r in recs}) == len(recs)
    for r in recs:
        assert set(store.RECORD_FIELDS) <= set(r)
        assert r["correct"] == (r["extracted"] is not None and r["extracted"] == _gold(r["problem_id"]))
    assert s["run"]["new_tokens"] == sum(r["tokens"] for r in recs) > 0


def _gold(problem_id):
    from rast_kernels.toy import task

    i = int(problem_id.split("-")[1])
    return task.ANSWER_CHARS[task.heldout_problems(i + 1)[i].answer]


def test_toy_diagnostics_delta_flips_the_first_token(toy_run):
    _, out, s = toy_run
    d = s["diagnostics"]
    assert set(d) == {"rast@0", "rast@1"}  # only base + delta rows carry diagnostics
    assert d["rast@0"]["flip_share"] == 0.0 and d["rast@0"]["kl_percentiles"]["max"] == 0.0
    # the delta's job on the toy: switch the base's direct answer to the worked style "S" at the first token
    assert d["rast@1"]["first_token_flip_share"] > 0.5
    assert 0 < d["rast@1"]["flip_share"] < 1
    kl = d["rast@1"]["kl_percentiles"]
    assert 0 <= kl["p50"] <= kl["p90"] <= kl["p99"] <= kl["max"] and kl["max"] > 0
    assert "S" in [t["token"] for t in d["rast@1"]["top_raised"]]
    worked = [r for r in _records(out) if r["config"] == "rast@1"]
    flipped_to_s = sum(r["diag"]["first_flip"] and r["completion"].startswith("S") for r in worked)
    assert flipped_to_s > len(worked) / 2


def test_toy_resume_after_interruption_gives_the_same_summary(toy_run, tmp_path, capsys):
    argv, out, s = toy_run
    resumed = str(tmp_path / "resumed")
    shutil.copytree(out, resumed)
    path = os.path.join(resumed, store.SAMPLES)
    with open(path) as f:
        lines = f.readlines()
    # an interruption: the first 37 lines (mid-request) plus a torn half line
    with open(path, "w") as f:
        f.writelines(lines[:37])
        f.write(lines[37][: len(lines[37]) // 2])
    os.remove(os.path.join(resumed, report.SUMMARY))
    argv2 = [a if a != out else resumed for a in argv]
    assert cli.main(argv2) == 0
    with open(os.path.join(resumed, report.SUMMARY)) as f:
        s2 = json.load(f)
    assert s2["results"] == s["results"]
    assert s2["diagnostics"] == s["diagnostics"]
    assert s2["run"]["resumed_samples"] == 37
    before = {store.record_key(r): r["completion"] for r in _records(out)}
    after = {store.record_key(r): r["completion"] for r in _records(resumed)}
    assert after == before and len(_records(resumed)) == len(before)
    # a finished directory: nothing new to generate
    assert cli.main(argv2) == 0
    with open(os.path.join(resumed, report.SUMMARY)) as f:
        s3 = json.load(f)
    assert s3["run"]["new_tokens"] == 0 and s3["results"] == s["results"]


def test_plot_when_matplotlib_is_there(toy_run, tmp_path):
    pytest.importorskip("matplotlib")
    _, out, s = toy_run
    assert report.plot_alpha(s, str(tmp_path / "a.png")) is None
    assert (tmp_path / "a.png").stat().st_size > 0


def test_ctrl_c_keeps_what_was_written(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "o")
    argv = ["--toy", "--max-problems", "4", "--n", "2", "--base-only", "--no-progress", "--out", out]
    real, calls = run.grade_detail, []

    def interrupt_on_fifth(*a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(run, "grade_detail", interrupt_on_fifth)
    assert cli.main(argv) == 130
    assert "re-run the same command to resume" in capsys.readouterr().err
    assert len(_records(out)) == 4
    monkeypatch.setattr(run, "grade_detail", real)
    assert cli.main(argv) == 0
    recs = _records(out)
    assert len(recs) == 8 and len({store.record_key(r) for r in recs}) == 8


def test_toy_speculative_run_gives_the_same_samples_and_reports_its_rounds(toy_run, tmp_path):
    """--speculative-tokens changes how fast, not what: the same completions as the plain run, and the summary
    reports the drafted / accepted tokens (the base-only row has no draft and decodes plainly)."""
    argv, out, s = toy_run
    spec_out = str(tmp_path / "spec")
    spec_argv = [a for a in argv if a != "--diagnostics"][:-1] + [spec_out, "--speculative-tokens", "3"]
    assert cli.main(spec_argv) == 0
    key = lambda r: store.record_key(r)  # noqa: E731
    want = {key(r): r["completion"] for r in _records(out)}
    assert {key(r): r["completion"] for r in _records(spec_out)} == want
    with open(os.path.join(spec_out, report.SUMMARY)) as f:
        run_stats = json.load(f)["run"]["speculative"]
    assert run_stats["drafted"] == 3 * run_stats["rounds"] > 0
    assert 1.0 <= run_stats["tokens_per_round"] <= 4.0 and 0.0 <= run_stats["acceptance"] <= 1.0


def test_every_engine_setting_is_an_eval_option(tmp_path, capsys):
    """--max-seq-len below what the prompts need is one line naming it (before any model loads), a bad engine value
    is refused at parse time (tests/test_cli.py checks that every engine setting is an option here)."""
    assert cli.main(TOY + ["--base-only", "--max-seq-len", "5", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--max-seq-len" in err and "need" in err
    assert cli.main(TOY + ["--speculative-draft", "bogus", "--out", str(tmp_path / "b")]) == 2
    assert "--speculative-draft" in capsys.readouterr().err

