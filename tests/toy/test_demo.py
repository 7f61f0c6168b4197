"""``python -m rast_kernels demo`` end to end on a few held-out problems."""
import subprocess
import sys

import pytest

from rast_kernels.toy import demo, task


def test_demo_runs(capsys):
    assert demo.main(["--problems", "5", "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "decoder: rast_generate" in out  # the demo goes through the engine, not the training loop
    for name in ("base ", "expert_base", "expert ", "base + delta (alpha=1)", "gain of base + delta over base"):
        assert name in out
    for p in task.heldout_problems(2):
        assert p.prompt in out  # side-by-side samples are the held-out problems


def test_demo_progress_on_stderr_and_note_on_greedy_sampling_options(capsys):
    assert demo.main(["--problems", "2", "--samples", "0", "--top-p", "0.5", "--seed", "3"]) == 0
    err = capsys.readouterr().err
    # one line per stage: loading, then each of the four decoded rows
    assert "[demo] loading the trio" in err and err.count("[demo] row ") == 4
    assert "note: --top-p and --seed have no effect under greedy decoding" in err
    assert demo.main(["--problems", "2", "--samples", "0", "--temperature", "0.5", "--top-p", "0.5"]) == 0
    assert "note:" not in capsys.readouterr().err


def test_demo_does_not_import_the_trainer():
    code = "import sys, rast_kernels.toy.demo; print('rast_kernels.toy.train' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr


def test_demo_sampling_options(capsys):
    assert demo.main(["--problems", "3", "--samples", "0", "--temperature", "0.8", "--top-p", "0.9",
                      "--alpha", "2", "--seed", "5"]) == 0
    assert "base + delta (alpha=2)" in capsys.readouterr().out


def test_demo_help_has_text_for_every_option_and_no_rst(capsys):
    parser = demo.build_parser()
    for action in parser._actions:
        assert action.help, action.option_strings
    with pytest.raises(SystemExit) as e:
        demo.main(["--help"])
    assert e.value.code == 0
    assert "``" not in capsys.readouterr().out
