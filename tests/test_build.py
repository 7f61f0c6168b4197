"""The compiled extension rast_kernels._C is built, imports, and describes its build."""
import importlib.util
import json
import os
import re
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


def _dry_run(tmp_path, script, steps=None, budget=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}  # the script's defaults
    env.update(GPU_CHECK_DRY_RUN="1", OUT=str(tmp_path / "out"), PYTHON=sys.executable)
    if steps:
        env["GPU_CHECK_STEPS"] = steps
    if budget:
        env["GPU_CHECK_BUDGET_S"] = str(budget)
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=300, env=env)
    return res, (tmp_path / "out" / "summary.txt").read_text()


STEPS = ["env", "install", "selftest", "graph", "sampler", "decode", "serving", "engine", "speculative", "attention",
         "tp", "cext", "ops"]


def test_gpu_check_dry_run(tmp_path):
    """benchmarks/gpu_check.sh without a GPU: the ordered plan fits the default budget; syntax, step functions,
    every script it runs and the options it passes them (argparse only), pytest paths; so a typo cannot cost a GPU
    session."""
    res, summary = _dry_run(tmp_path, ROOT / "benchmarks" / "gpu_check.sh")
    assert res.returncode == 0, summary + res.stdout[-2000:] + res.stderr[-2000:]
    for name in STEPS:
        assert f"{name:<10} rc=0    dry run" in summary, summary
    # the printed plan: every step in order of value, the selftest the first measuring step, each with its limit
    plan = re.findall(r"^ +\d+\. (\w+) +(\d+)s", res.stdout, re.M)
    assert [name for name, _ in plan] == STEPS[:10] + ["tp", "tp"] + STEPS[11:], res.stdout
    fit = re.search(r"^plan +rc=0 +(\d+) steps, limits (\d+)s \+ reserve (\d+)s <= budget (\d+)s$", summary, re.M)
    assert fit, summary
    steps, limits, reserve, budget = map(int, fit.groups())
    assert steps == len(plan) and limits == sum(int(limit) for _, limit in plan)
    assert budget == 540 and limits + reserve <= budget  # the default budget: one device call
    parsed = [line for line in summary.splitlines() if line.startswith("parse")]
    # 8 invocations: the selftest subcommand, 6 benchmarks, bench_decode again under env RAST_FORCE_PG=1 (parsed
    # with it set)
    assert len(parsed) == 8 and all(" rc=0 " in line for line in parsed), summary
    assert any(line.split()[2:5] == ["-m", "rast_kernels", "selftest"] for line in parsed), summary
    assert any(line.split()[2:4] == ["RAST_FORCE_PG=1", "benchmarks/bench_decode.py"] for line in parsed), summary
    # one pytest process per step, and no failure count that could end a step before its later tests
    code = [line for line in (ROOT / "benchmarks" / "gpu_check.sh").read_text().splitlines()
            if not line.lstrip().startswith("#")]
    assert not [line for line in code if "--maxfail" in line or "-n auto" in line or "xdist" in line]


def test_gpu_check_dry_run_fails_when_the_plan_exceeds_the_budget(tmp_path):
    # (steps whose commands need no Python start to check)
    res, summary = _dry_run(tmp_path, ROOT / "benchmarks" / "gpu_check.sh", steps="env install graph", budget=100)
    assert res.returncode != 0
    assert re.search(r"^plan +rc=1 +3 steps, limits \d+s \+ reserve \d+s > budget 100s$", summary, re.M), summary


def test_gpu_check_dry_run_catches_typos(tmp_path):
    # the script with a misspelt option and a misspelt test file, in a copy of the layout whose
    # bench_decode.py is a torch-free stand-in with the same options (the real ones are parsed above)
    root = tmp_path / "repo"
    (root / "benchmarks").mkdir(parents=True)
    (root / "tests" / "engine").mkdir(parents=True)
    (root / "benchmarks" / "bench_decode.py").write_text(
        "import argparse\n"
        "p = argparse.ArgumentParser()\n"
        "for o in ('--trio', '--batch', '--new-tokens', '--repeats', '--peer-new-tokens', '--systems', '--out'):\n"
        "    p.add_argument(o, nargs='+')\n"
        "p.parse_args()\n"
        "raise SystemExit('the dry run must not get here')\n")
    text = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    decode = "--new-tokens 32 --repeats 1 \\\n        --peer-new-tokens"
    graph = "tests/engine/test_engine_cuda.py $(pytest_args graph)"
    assert decode in text and graph in text
    text = text.replace(decode, decode.replace("--repeats", "--repeatz")).replace(graph, graph.replace("cuda", "cudaa"))
    (root / "benchmarks" / "gpu_check.sh").write_text(text)
    res, summary = _dry_run(tmp_path, root / "benchmarks" / "gpu_check.sh", steps="graph decode")
    assert res.returncode != 0
    assert "graph      rc=1    dry run: missing tests/engine/test_engine_cudaa.py" in summary, summary
    parsed = [line for line in summary.splitlines() if line.startswith("parse")]
    assert len(parsed) == 1 and " rc=1 " in parsed[0] and "--repeatz" in parsed[0], summary
    assert "must not get here" not in summary


def test_gpu_engine_checks_on_cpu(tmp_path, monkeypatch):
    """gpu_check.sh's engine step, smoke-run on CPU with the tiny trio (in this process, as the script runs from
    benchmarks/): the pool and sizing recorded, the workload finished in each of its three passes (no sync debug
    mode on CPU)."""
    bench = ROOT / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))
    spec = importlib.util.spec_from_file_location("gpu_engine_checks", bench / "gpu_engine_checks.py")
    mod = importlib.util.module_from_spec(spec)
    argv = ["--trio", "tiny", "--device", "cpu", "--max-seq-len", "64", "--prompt-lens", "3", "20", "--max-new", "6",
            "--requests", "3", "--max-batch", "4", "--out", str(tmp_path)]
    try:
        spec.loader.exec_module(mod)
        code = mod.main(argv)
        rec = json.loads((tmp_path / "engine_checks.json").read_text())

        def boom(self):
            raise RuntimeError("boom")

        from rast_kernels import RastEngine

        monkeypatch.setattr(RastEngine, "step", boom)  # a pass that fails is recorded, not a lost run
        failed_code = mod.main(argv)
        failed = json.loads((tmp_path / "engine_checks.json").read_text())
    finally:  # the scripts' own modules (models, common) are not this suite's
        for name in [n for n, m in sys.modules.items() if Path(getattr(m, "__file__", None) or "/").parent == bench]:
            del sys.modules[name]
    assert code == 0 and rec["ok"], rec
    assert rec["engine"]["kv_cache_tokens"] == 4 * 64  # CPU: max_batch_size * max_seq_len
    assert [p["mode"] for p in rec["passes"]] == ["warmup", "warn", "error"]
    assert all(p["finished"] == 3 and p["sync"] is None and not p["sites"] for p in rec["passes"])
    assert failed_code == 1 and not failed["ok"] and len(failed["passes"]) == 1
    assert failed["passes"][0]["failed"]["error"] == "RuntimeError: boom"
