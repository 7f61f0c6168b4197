"""``python -m rast_kernels selftest`` on CPU: every check passes on the C++ / reference paths (the whole command
runs once), a check that goes wrong is a FAIL row with exit status 1 (a wrong op, a raising op, a biased sampler),
the C++ sampler's absence is a SKIP row with the reason, bad options exit 2 on one line."""
import contextlib
import io
import json

import pytest
import torch

from rast_kernels import _backends, ops, selftest
from rast_kernels.__main__ import main


def _run(argv):
    """``(exit status, stdout)`` of ``python -m rast_kernels selftest ARGV`` run in this process."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["selftest", "--device", "cpu", *argv])
    return code, out.getvalue()


def _rows(stdout):
    """``{check: (result, note)}`` from the printed table."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[5] in ("PASS", "FAIL", "SKIP"):
            rows[cells[0]] = (cells[5], cells[7])
    return rows


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("selftest")
    code, stdout = _run(["--out", str(out)])
    return code, stdout, json.loads((out / "selftest.json").read_text())


def test_every_check_passes_on_cpu(full_run):
    code, stdout, rec = full_run
    labels = [c.label for c in selftest.cases(torch.device("cpu"))]
    rows = _rows(stdout)
    assert code == 0, stdout
    assert list(rows) == labels and all(result == "PASS" for result, _ in rows.values()), stdout
    assert {c.check for c in selftest.cases(torch.device("cpu"))} == set(selftest.CHECKS)
    # ready for a bug report: the versions first, then the table
    assert stdout.startswith("rast_kernels  ") and "torch " in stdout and "compiled CPU (_C)" in stdout
    assert rec["finished"] and rec["passed"] and [r["check"] for r in rec["rows"]] == labels
    sampler = [r for r in rec["rows"] if r["check"].startswith("rast_sample")]
    if _backends.has_cpp_cpu():
        assert all(r["path"].startswith("cpp") for r in sampler)
    assert "V=152064" in sampler[0]["shape"]


def test_a_wrong_op_fails_its_rows_and_the_run(monkeypatch):
    monkeypatch.setattr(ops, "silu_mul", lambda gate, up, backend="auto": ops.silu_mul_reference(gate, up) * 1.1)
    code, stdout = _run(["--checks", "silu_mul", "rms_norm"])
    rows = _rows(stdout)
    assert code == 1
    assert rows["silu_mul 7B"][0] == rows["silu_mul 1.5B"][0] == "FAIL"
    assert rows["add_rms_norm 7B"][0] == rows["add_rms_norm 1.5B"][0] == "PASS"  # the others still run


def test_a_raising_op_is_a_fail_row_not_a_crash(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(ops, "add_rms_norm", boom)
    code, stdout = _run(["--checks", "rms_norm", "silu_mul"])
    rows = _rows(stdout)
    assert code == 1 and rows["add_rms_norm 7B"] == ("FAIL", "RuntimeError: boom")
    assert rows["silu_mul 7B"][0] == "PASS"


def test_a_biased_sampler_fails_the_distribution_check(monkeypatch):
    """Draws moved from the most drawn token to the second (their log-probabilities moved with them, so only the
    frequencies are wrong) fail the chi-square test."""
    real = ops.rast_sample

    def biased(*args, **kwargs):
        tokens, logprobs = real(*args, **kwargs)
        top, second = torch.bincount(tokens).topk(2).indices.tolist()
        moved = (tokens == top).nonzero().flatten()[::10]
        logprobs[moved] = logprobs[tokens == second][0]
        tokens[moved] = second
        return tokens, logprobs

    monkeypatch.setattr(ops, "rast_sample", biased)
    code, stdout = _run(["--checks", "distribution"])
    result, note = _rows(stdout)["rast_sample distribution"]
    assert code == 1 and result == "FAIL" and note.startswith("chi2"), stdout


def test_chi_square_critical_values():
    # textbook quantiles of the chi-square distribution
    for df, p, want in ((1, 0.05, 3.841), (10, 0.01, 23.209), (5, 1e-6, 35.888)):
        assert selftest.chi2_critical(df, p) == pytest.approx(want, abs=2e-3)


def test_without_the_cpp_extension_the_sampler_rows_are_skipped_with_the_reason(monkeypatch):
    monkeypatch.setattr(_backends, "has_cpp_cpu", lambda: False)
    monkeypatch.setattr(_backends, "cpp_unavailable_reason",
                        lambda: "rast_kernels._C did not import (ImportError: undefined symbol: _ZN3c10)")
    code, stdout = _run(["--checks", "distribution"])
    assert code == 0  # skipped is not failed
    assert _rows(stdout)["rast_sample distribution"] == (
        "SKIP", "rast_kernels._C did not import (ImportError: undefined symbol: _ZN3c10)")


@pytest.mark.parametrize("argv,option", [(["--checks", "bogus"], "--checks"), (["--device", "nonsense"], "--device"),
                                         (["--out", "/proc/nope"], "--out")])
def test_bad_options_are_one_line_and_exit_2(argv, option, capsys):
    with pytest.raises(SystemExit) as e:
        main(["selftest", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and option in err, err
