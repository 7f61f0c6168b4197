"""Every command-line entry point: ``python -m rast_kernels``, ``python/*.py`` and the benchmark scripts.

A user error (a bad option value, a missing file, a device this machine does not have) must be one
line on stderr naming the option, exit status 2 and no traceback, before any model is loaded. Most
cases run the scripts' ``main(argv)`` in this process (the same parser, no second torch import); one
real subprocess per CLI, all started at once, proves the exit status and the absence of a traceback
from the outside."""
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rast_kernels.__main__ import info, main

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
NO_CUDA = not torch.cuda.is_available()
MODELS = ["--base", "a", "--expert", "b", "--expert-base", "c", "--prompt", "x"]


def test_info_lists_versions_backends_and_gpu(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    for needle in ("rast_kernels", "torch", "triton", "transformers", "compiled CPU (_C)", "compiled CUDA (_C)", "gpu"):
        assert needle in text
    assert text.strip() == info()


def test_info_says_why_the_extension_did_not_import(monkeypatch):
    """An extension built against another torch loads with an undefined symbol (simulated: its import raises
    that): info, and the skip reason of the C++ tests (``cpp_unavailable_reason``), carry the ImportError."""
    import importlib

    from rast_kernels import _backends

    why = "ImportError: /site/rast_kernels/_C.so: undefined symbol: _ZN3c1017RegisterOperatorsD1Ev"
    real = importlib.import_module

    def import_module(name, *args, **kwargs):
        if name == "rast_kernels._C":
            raise ImportError(why.split(": ", 1)[1])
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", import_module)
    _backends.cpp_module.cache_clear()
    try:
        assert f"compiled CPU (_C)   no ({why})" in info().splitlines()[7]
        assert _backends.cpp_import_error() == why and not _backends.has_cpp_cpu() and not _backends.has_cpp_cuda()
        assert _backends.cpp_unavailable_reason() == f"rast_kernels._C did not import ({why})"
    finally:
        monkeypatch.undo()
        _backends.cpp_module.cache_clear()
    built = _backends.cpp_module() is not None  # back to this installation's state
    assert (_backends.cpp_import_error() is None) == built
    assert ("compiled CPU (_C)   yes" in info()) == built


def test_version(capsys):
    import rast_kernels

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"rast_kernels {rast_kernels.__version__}"


def test_info_rejects_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        main(["info", "--bogus"])
    assert e.value.code == 2 and "--bogus" in capsys.readouterr().err


@pytest.mark.parametrize("argv,option", [(["eval", "--n", "0"], "--n"), (["serve", "--port", "-1"], "--port"),
                                         (["serve", "--toy", "--speculative-tokens", "x"], "--speculative-tokens"),
                                         (["eval", "--toy", "--speculative-tokens", "99"], "--speculative-tokens"),
                                         (["serve", "--toy", "--block-size", "0"], "--block-size")])
def test_entry_point_forwards_eval_and_serve(argv, option, capsys):
    # their options are their modules' own (rast_kernels.eval.cli, rast_kernels.serve.cli)
    _assert_user_error(lambda: main(argv), option, capsys)


def _load_script(path: Path):
    spec = importlib.util.spec_from_file_location(f"_cli_test_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def bench(monkeypatch):
    """Import a benchmark script by name (they import each other as scripts run from benchmarks/ do)."""
    monkeypatch.syspath_prepend(str(BENCH))
    yield importlib.import_module
    for name in [n for n, m in sys.modules.items() if Path(getattr(m, "__file__", None) or "/").parent == BENCH]:
        del sys.modules[name]


def _assert_user_error(run, option, capsys):
    try:
        code = run()  # some mains return the status instead of raising SystemExit
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert option in err, (option, err)


def _under_a_file(tmp_path):
    (tmp_path / "plain_file").write_text("")
    return str(tmp_path / "plain_file" / "sub")  # cannot be created: its parent is a file


DEMO_CASES = [
    (["--problems", "100000"], "--problems"), (["--problems", "0"], "--problems"),
    (["--device", "nonsense"], "--device"), (["--trio", "/nonexistent"], "--trio"),
    (["--trio", str(ROOT)], "--trio"),  # a folder, but without base/ expert/ expert_base/
    (["--threads", "-1"], "--threads"), (["--threads", "0"], "--threads"), (["--samples", "-1"], "--samples"),
    (["--temperature", "-1"], "--temperature"), (["--top-p", "0"], "--top-p"), (["--top-p", "1.5"], "--top-p"),
    (["--alpha", "nan"], "--alpha"), (["--seed", "-1"], "--seed"), (["--problems", "ten"], "--problems"),
] + ([(["--device", "cuda"], "--device")] if NO_CUDA else [])


@pytest.mark.parametrize("argv,option", DEMO_CASES, ids=[" ".join(a) for a, _ in DEMO_CASES])
def test_demo_user_errors(argv, option, capsys):
    _assert_user_error(lambda: main(["demo", *argv]), option, capsys)


GENERATE_CASES = [
    (["--temperature", "-1"], "--temperature"), (["--top-p", "0"], "--top-p"), (["--top-k", "-1"], "--top-k"),
    (["--min-p", "2"], "--min-p"), (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--max-batch-size", "0"], "--max-batch-size"), (["--max-seq-len", "1"], "--max-seq-len"),
    (["--max-new-tokens", "100", "--max-seq-len", "50"], "--max-new-tokens"),
    (["--prompt-file", "/nonexistent"], "--prompt-file"), (["--device", "nonsense"], "--device"),
    (["--expert-device", "nonsense"], "--expert-device"), (["--seed", "-1"], "--seed"), (["--alpha", "inf"], "--alpha"),
    (["--stream", "--prompt", "y"], "--stream"), (["--stop", ""], "--stop"),
    (["--expert", "b", "d"], "--expert-base"), (["--alpha", "1", "2"], "--alpha"),
    (["--base-plausibility", "2"], "--base-plausibility"), (["--tensor-parallel-size", "0"], "--tensor-parallel-size"),
    (["--speculative-tokens", "-1"], "--speculative-tokens"), (["--speculative-tokens", "16"], "--speculative-tokens"),
    (["--speculative-draft", "base"], "--speculative-draft"), (["--fused-decode", "maybe"], "--fused-decode"),
    (["--gpu-memory-utilization", "0"], "--gpu-memory-utilization"),
] + ([(["--device", "cuda"], "--device")] if NO_CUDA else [])


@pytest.mark.parametrize("argv,option", GENERATE_CASES, ids=[" ".join(a) for a, _ in GENERATE_CASES])
def test_generate_user_errors(argv, option, capsys):
    mod = _load_script(ROOT / "python" / "generate.py")
    _assert_user_error(lambda: mod.main(MODELS + argv), option, capsys)


def test_generate_needs_models_and_prompts(capsys):
    mod = _load_script(ROOT / "python" / "generate.py")
    _assert_user_error(lambda: mod.main(["--prompt", "x"]), "--base", capsys)
    _assert_user_error(lambda: mod.main(MODELS[:6]), "--prompt", capsys)


def test_sample_step_and_trainer_user_errors(tmp_path, capsys):
    step = _load_script(ROOT / "python" / "sample_step.py")
    for argv, option in ([["--batch", "0"], "--batch"], [["--steps", "0"], "--steps"],
                         [["--device", "nonsense"], "--device"]):
        _assert_user_error(lambda: step.main(argv), option, capsys)
    from rast_kernels.toy import train

    for argv, option in ([["--threads", "0"], "--threads"], [["--eval-problems", "100000"], "--eval-problems"],
                         [["--worked-fraction", "2"], "--worked-fraction"], [["--rl-steps", "-1"], "--rl-steps"],
                         [["--seed", "-1"], "--seed"], [["--out", _under_a_file(tmp_path)], "--out"],
                         [[], "--out"]):  # --smoke without --out would overwrite the shipped trio
        _assert_user_error(lambda: train.main(["--smoke", *argv]), option, capsys)


def test_benchmark_user_errors(tmp_path, bench, capsys):
    bad_out = _under_a_file(tmp_path)
    cases = {
        "bench_sampler": [(["--batch", "0"], "--batch"), (["--vocab", "1"], "--vocab"), (["--budget-s", "0"], "--budget-s"),
                          (["--repeats", "0"], "--repeats"), (["--device", "nonsense"], "--device"),
                          (["--copy-mib", "0"], "--copy-mib"), (["--pairs", "0"], "--pairs"),
                          (["--out", bad_out], "--out")],
        "bench_decode": [(["--batch", "0"], "--batch"), (["--new-tokens", "13"], "--new-tokens"),
                         (["--repeats", "0"], "--repeats"), (["--top-p", "0"], "--top-p"),
                         (["--temperature", "-1"], "--temperature"), (["--device", "nonsense"], "--device"),
                         (["--tiny", "--max-seq-len", "5"], "--max-seq-len"),
                         (["--tensor-parallel-size", "0"], "--tensor-parallel-size"),
                         (["--tensor-parallel-size", "2"], "--tensor-parallel-size"),  # not under torchrun
                         (["--shard-experts"], "--shard-experts")],  # no tensor parallelism
        "bench_serving": [(["--requests", "0"], "--requests"), (["--sigma", "-1"], "--sigma"),
                          (["--top-p", "0"], "--top-p"), (["--device", "nonsense"], "--device"),
                          (["--block-size", "8", "--kv-tokens", "4"], "--kv-tokens"), (["--out", bad_out], "--out")],
        "bench_decode_attention": [(["--batch", "0"], "--batch"), (["--num-splits", "65"], "--num-splits"),
                                   (["--pad", "-1"], "--pad"), (["--block-size", "0"], "--block-size"),
                                   (["--out", bad_out], "--out")],
        "bench_bandwidth": [(["--shapes", "8x"], "--shapes"), (["--shapes", "0x4"], "--shapes"),
                            (["--batch", "0"], "--batch"), (["--stream-mib", "1"], "--stream-mib"),
                            (["--out", bad_out], "--out")],
        "bench_eval": [(["--problems", "0"], "--problems"), (["--n", "0"], "--n"), (["--systems", "fifo"], "--systems"),
                       (["--out", bad_out], "--out")],
        "profile_decode_step": [(["--out", str(tmp_path), "--steps", "0"], "--steps"),
                                (["--out", str(tmp_path), "--batch", "0"], "--batch"), (["--out", bad_out], "--out")],
        "bench_speculative": [(["--k", "0"], "--k"), (["--parts", "nope"], "--parts"), (["--batch", "0"], "--batch"),
                              (["--problems", "0"], "--problems"), (["--round-batch", "0"], "--round-batch"),
                              (["--out", bad_out], "--out")],
        "bench_revision": [(["--pairs", "1"], "--pairs"), (["--batch", "0"], "--batch"),
                           (["--rounds", "-1"], "--rounds"), (["--out", bad_out], "--out")],
        "gpu_engine_checks": [(["--requests", "0"], "--requests"), (["--trio", "bogus"], "--trio"),
                              (["--max-seq-len", "100"], "--prompt-lens"),  # the default prompts do not fit
                              (["--gpu-memory-utilization", "0"], "--gpu-memory-utilization"),
                              (["--device", "nonsense"], "--device"), (["--out", bad_out], "--out")],
    }
    for module, module_cases in cases.items():
        mod = bench(module)
        for argv, option in module_cases:
            _assert_user_error(lambda: mod.main(argv), option, capsys)
    (tmp_path / "not.json").write_text("{")
    (tmp_path / "other.json").write_text('{"meta": {"benchmark": "other"}, "rows": []}')
    for module, option in (("results_table", "files"), ("plot_sampler", "json")):
        mod = bench(module)
        for path in ("/nonexistent.json", tmp_path / "not.json", tmp_path / "other.json"):
            _assert_user_error(lambda: mod.main([str(path)]), option, capsys)


def test_bench_decode_tensor_parallel_user_errors(bench, monkeypatch, capsys):
    """Under torchrun (its environment, no process group started: parsing fails first): one TP group of all ranks,
    no single-process baseline, no device index shared by every rank."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    mod = bench("bench_decode")
    for argv, option in ((["--tensor-parallel-size", "4"], "--tensor-parallel-size"),
                         (["--systems", "engine", "peer_loop"], "--systems"), (["--device", "cpu:0"], "--device")):
        _assert_user_error(lambda: mod.main(argv), option, capsys)


def test_each_cli_as_a_subprocess(tmp_path):
    """One bad option per CLI, run as a user runs it; all started together (each imports torch)."""
    py = sys.executable
    cases = [
        ([py, "-m", "rast_kernels", "demo", "--problems", "100000"], "--problems"),
        ([py, "python/generate.py", *MODELS, "--prompt-file", "/nonexistent"], "--prompt-file"),
        ([py, "python/sample_step.py", "--batch", "0"], "--batch"),
        # the message names the trainer's parser: the script forwards to rast_kernels.toy.train
        ([py, "python/train_toy_trio.py", "--threads", "0"], "rast_kernels.toy.train: error: argument --threads"),
        ([py, "benchmarks/bench_sampler.py", "--budget-s", "0"], "--budget-s"),
        ([py, "benchmarks/bench_decode.py", "--batch", "0"], "--batch"),
        ([py, "benchmarks/profile_decode_step.py", "--out", str(tmp_path), "--steps", "0"], "--steps"),
        ([py, "benchmarks/bench_serving.py", "--requests", "0"], "--requests"),
        ([py, "benchmarks/bench_decode_attention.py", "--batch", "0"], "--batch"),
        ([py, "benchmarks/results_table.py", "/nonexistent.json"], "files"),
        ([py, "benchmarks/plot_sampler.py", "/nonexistent.json"], "json"),
    ]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    start = lambda cmd: subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True)
    info_proc = start([py, "-m", "rast_kernels", "info"])  # and the entry point's good path
    procs = [(start(cmd), cmd, option) for cmd, option in cases]
    out, err = info_proc.communicate(timeout=180)
    assert info_proc.returncode == 0 and "backends:" in out, err
    for proc, cmd, option in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 2, (cmd, proc.returncode, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and option in err, (cmd, err)


def test_every_entry_point_takes_every_engine_setting():
    """One EngineConfig, one flag per setting, on every command line that builds an engine (issue 19)."""
    from rast_kernels.engine.config import FIELDS
    from rast_kernels.eval.cli import build_parser as eval_parser
    from rast_kernels.serve.cli import build_parser as serve_parser

    generate = _load_script(ROOT / "python" / "generate.py")
    for name, parser in (("eval", eval_parser()), ("serve", serve_parser()), ("generate.py", generate.build_parser())):
        words = set(parser.format_help().replace(",", " ").replace("[", " ").replace("]", " ").split())
        special = {"devices": "--device", "use_cuda_graph": "--no-cuda-graph"}
        for field in FIELDS:
            flag = special.get(field, "--" + field.replace("_", "-"))
            assert flag in words, (name, flag)
