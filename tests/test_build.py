"""The compiled extension rast_kernels._C is built, imports, and describes its build."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rast_kernels import _backends


def test_extension_imports_and_reports_build():
    from rast_kernels import _C  # fails when the package was installed without building the extension

    assert _backends.has_cpp_cpu()
    assert isinstance(_C.WITH_CUDA, bool)
    info = _C.__build_info__
    assert isinstance(info, str)
    assert torch.__version__.split("+")[0] in info
    assert ("CUDA on" in info) == _C.WITH_CUDA and ("CUDA off" in info) != _C.WITH_CUDA
    assert "parallel" in info
    for name in ("rast_sample_cpu", "philox_words_cpu"):
        assert callable(getattr(_C, name))


def test_cuda_matches_torch_build():
    from rast_kernels import _C

    if torch.version.cuda is None:
        # a CPU-only torch can only give the CPU kernels
        assert _C.WITH_CUDA is False
        assert not _backends.has_cpp_cuda()
        assert not hasattr(_C, "philox_words_cuda")
    else:
        assert _backends.has_cpp_cuda() == _C.WITH_CUDA
        assert hasattr(_C, "philox_words_cuda") == _C.WITH_CUDA


def _nvcc_present() -> bool:
    # the rule setup.py builds by: CUDA sources when torch is a CUDA build and nvcc is found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    return bool((home and (Path(home) / "bin" / "nvcc").is_file()) or shutil.which("nvcc")
                or Path("/usr/local/cuda/bin/nvcc").is_file())


@pytest.mark.skipif(os.environ.get("RAST_KERNELS_NO_CUDA", "0") not in ("", "0"), reason="CUDA build disabled")
def test_cuda_built_when_toolkit_present():
    from rast_kernels import _C

    expected = bool(torch.version.cuda) and _nvcc_present()
    assert _C.WITH_CUDA == expected, f"WITH_CUDA={_C.WITH_CUDA}, expected {expected}: {_C.__build_info__}"


def test_cuda_philox_words_match_reference():
    from rast_kernels import _C
    from rast_kernels.ops.philox import random_words

    if not (_C.WITH_CUDA and torch.cuda.is_available()):
        pytest.skip("needs the CUDA build and a GPU")
    seeds = torch.tensor([0, 1, -1, 2**63 - 1, -(2**63), 123456789012345], dtype=torch.int64)
    offsets = torch.tensor([0, 2**32 - 1, 2**32, -1, 7, -(2**40) + 3], dtype=torch.int64)
    for n in (1, 5, 131, 152064):
        got = _C.philox_words_cuda(seeds.cuda(), offsets.cuda(), n)
        assert got.is_cuda and got.dtype == torch.int64 and got.shape == (6, n)
        assert torch.equal(got.cpu(), _C.philox_words_cpu(seeds, offsets, n))
        if n <= 131:
            assert torch.equal(got.cpu(), random_words(seeds, offsets, torch.arange(n)))
    with pytest.raises(ValueError, match="seed"):
        _C.philox_words_cuda(seeds, offsets.cuda(), 3)  # seed on the CPU


ROOT = Path(__file__).resolve().parents[1]


def test_setup_without_torch_fails_at_once_with_the_right_command():
    """What pip's default build isolation gives setup.py: no torch. One line naming the command that
    works, instead of a traceback from the middle of the build."""
    hide_torch = ("import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--version']; "
                  "exec(compile(open('setup.py').read(), 'setup.py', 'exec'), {'__name__': '__main__', '__file__': 'setup.py'})")
    env = {k: v for k, v in os.environ.items() if k != "RAST_KERNELS_ALLOW_NO_EXT"}
    res = subprocess.run([sys.executable, "-c", hide_torch], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.strip().splitlines() == ["rast_kernels: build with `pip install --no-build-isolation .` "
                                               "(torch must be importable at build time; install torch first)"]
    # with torch importable (this environment) the same check passes
    res = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env=env)
    assert res.returncode == 0 and res.stdout.strip().splitlines()[-1] == __import__("rast_kernels").__version__


def _dry_run(tmp_path, script, steps=None):
    env = dict(os.environ, GPU_CHECK_DRY_RUN="1", OUT=str(tmp_path / "out"), PYTHON=sys.executable)
    if steps:
        env["GPU_CHECK_STEPS"] = steps
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=300, env=env)
    return res, (tmp_path / "out" / "summary.txt").read_text()


def test_gpu_check_dry_run(tmp_path):
    """benchmarks/gpu_check.sh without a GPU: syntax, step functions, every script it runs and the options
    it passes them (argparse only), pytest folders; so a typo cannot cost a GPU session."""
    res, summary = _dry_run(tmp_path, ROOT / "benchmarks" / "gpu_check.sh")
    assert res.returncode == 0, summary + res.stdout[-2000:] + res.stderr[-2000:]
    for name in ("env", "install", "tests", "tp", "decode", "profile", "sampler", "attention"):
        assert f"{name:<10} rc=0    dry run" in summary, summary
    parsed = [line for line in summary.splitlines() if line.startswith("parse")]
    # 6 benchmark invocations: bench_decode twice (the tp step's under env RAST_FORCE_PG=1, parsed with it set)
    assert len(parsed) == 6 and all(" rc=0 " in line for line in parsed), summary
    assert any(line.split()[2:4] == ["RAST_FORCE_PG=1", "benchmarks/bench_decode.py"] for line in parsed), summary


def test_gpu_check_dry_run_catches_typos(tmp_path):
    # the script with a misspelt option and a misspelt test folder, in a copy of the layout whose
    # bench_decode.py is a torch-free stand-in with the same options (the real ones are parsed above)
    root = tmp_path / "repo"
    (root / "benchmarks").mkdir(parents=True)
    (root / "tests" / "engine").mkdir(parents=True)
    (root / "benchmarks" / "bench_decode.py").write_text(
        "import argparse\n"
        "p = argparse.ArgumentParser()\n"
        "for o in ('--trio', '--batch', '--repeats', '--peer-new-tokens', '--out'):\n"
        "    p.add_argument(o, nargs='+')\n"
        "p.parse_args()\n"
        "raise SystemExit('the dry run must not get here')\n")
    text = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    assert "--repeats 2" in text and "tests/ops tests/engine" in text
    text = text.replace("--repeats 2", "--repeatz 2").replace("tests/ops tests/engine", "tests/opz tests/engine")
    (root / "benchmarks" / "gpu_check.sh").write_text(text)
    res, summary = _dry_run(tmp_path, root / "benchmarks" / "gpu_check.sh", steps="tests decode")
    assert res.returncode != 0
    assert "missing tests/opz" in summary and "tests/engine" not in summary.split("missing", 1)[1], summary
    parsed = [line for line in summary.splitlines() if line.startswith("parse")]
    assert len(parsed) == 1 and " rc=1 " in parsed[0] and "--repeatz" in parsed[0], summary
    assert "must not get here" not in summary
