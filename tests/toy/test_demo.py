"""``python -m rast_kernels demo`` end to end on a few held-out problems."""
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


def test_demo_sampling_options(capsys):
    assert demo.main(["--problems", "3", "--samples", "0", "--temperature", "0.8", "--top-p", "0.9",
                      "--alpha", "2", "--seed", "5"]) == 0
    assert "base + delta (alpha=2)" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--problems", "0"], ["--temperature", "-1"], ["--top-p", "0"]])
def test_demo_rejects_bad_options(argv):
    with pytest.raises(SystemExit):
        demo.main(argv)
