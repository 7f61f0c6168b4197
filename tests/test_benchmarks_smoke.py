"""Smoke tests of the benchmark scripts in ``benchmarks/`` (CPU, seconds): they run, write the JSON
they promise, and their baselines compute what they claim (the peer loop's greedy tokens equal an
independent full-forward oracle; the HF-style chain only draws tokens the reference keeps)."""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from parallel.parallel_launch import TIMEOUT_S, env as launch_env, needs_dist, torchrun

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench_modules(monkeypatch):
    """Import the benchmark modules (they import each other by name, as scripts run from benchmarks/ do)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import baselines
    import models
    import peer_loop
    yield baselines, models, peer_loop
    # generic names (models, baselines): do not leave them importable as top-level modules for other tests
    for name in [n for n, m in sys.modules.items() if Path(getattr(m, "__file__", None) or "/").parent == BENCH]:
        del sys.modules[name]


def _main(module: str, argv: list, capsys) -> None:
    """Run a benchmark script's ``main(argv)`` in this process (no second torch import); check its exit code."""
    rc = importlib.import_module(module).main(argv)
    assert rc == 0, f"{module} exited {rc}:\n{capsys.readouterr().out[-3000:]}"


@pytest.mark.parametrize("plot", [False, True], ids=["without-matplotlib", "with-matplotlib"])
def test_bench_sampler_quickest(tmp_path, bench_modules, capsys, monkeypatch, plot):
    out = tmp_path / "out"
    have_mpl = importlib.util.find_spec("matplotlib") is not None
    if plot and not have_mpl:
        pytest.skip("matplotlib (the [bench] extra) is not installed")
    if not plot:
        # what a test-only install sees: no matplotlib; the JSON must still be written, the plot skipped
        monkeypatch.setitem(sys.modules, "matplotlib", None)
        monkeypatch.delitem(sys.modules, "plot_sampler", raising=False)
    _main("bench_sampler", ["--device", "cpu", "--batch", "1", "3", "--vocab", "1000", "--dtypes", "bf16", "fp32",
                            "--pairs", "1", "2", "--warmup", "1", "--repeats", "2", "--min-repeats", "1", "--budget-s", "0.01",
                            "--copy-mib", "8", "--reference-max-elems", "2000", "--out", str(out)], capsys)
    printed = capsys.readouterr().out
    result = json.loads((out / "sampler.json").read_text())
    if plot:
        assert (out / "sampler.png").stat().st_size > 0
    else:
        assert not (out / "sampler.png").exists()
        assert "plot skipped: matplotlib is not installed" in printed and ".[bench]" in printed
    assert {"device", "versions", "date", "copy_bandwidth_GBps"} <= set(result["meta"])
    rows = result["rows"]
    keys = {"op", "backend", "B", "V", "dtype", "setting", "pairs", "median_us", "p10", "p90", "speedup_vs_reference",
            "speedup_vs_hf_chain", "floor_us", "device", "torch", "triton", "date"}
    # 2 B x 1 V x 2 dtypes x 2 settings x 2 K for each of the four ops (FlashInfer listed as skipped on CPU)
    assert len(rows) == 4 * 16 and result["meta"]["grid"]["pairs"] == [1, 2]
    for row in rows:
        assert keys <= set(row), keys - set(row)
        assert "error" not in row and "invalid_output" not in row, row
        if row.get("skipped"):
            # the reference above --reference-max-elems (B*V = 3000 > 2000), FlashInfer off CUDA: each says why
            if row["op"] == "rast_sample_reference":
                assert row["B"] == 3 and "--reference-max-elems" in row["skipped"]
            else:
                assert row["op"] == "flashinfer_top_k_top_p_from_logits" and "CUDA" in row["skipped"]
            assert row["median_us"] is None and f"skipped: {row['skipped']}" in printed
            continue
        assert 0 < row["p10"] <= row["median_us"] <= row["p90"]
        assert row["cpu_median_us"] > 0
    assert {r["op"] for r in rows} == {"rast_sample", "rast_sample_reference", "hf_chain",
                                       "flashinfer_top_k_top_p_from_logits"}
    assert len([r for r in rows if r.get("skipped")]) == 8 + 16
    for r in rows:
        if r["op"] == "rast_sample_reference" and r["B"] == 1:
            assert r["speedup_vs_reference"] == pytest.approx(1.0)
        if r["op"] == "rast_sample" and r["B"] == 3:
            assert r["speedup_vs_reference"] is None and r["speedup_vs_hf_chain"] > 0
    # floor: the 2K + 1 [B, 1000] inputs read once over the measured copy bandwidth (K = 2: five inputs)
    for K in (1, 2):
        r = next(r for r in rows if r["B"] == 3 and r["dtype"] == "fp32" and r["pairs"] == K)
        inputs_bytes = (2 * K + 1) * 3 * 1000 * 4
        assert r["floor_us"] == pytest.approx(inputs_bytes / (result["meta"]["copy_bandwidth_GBps"] * 1e9) * 1e6)
    assert {(r["pairs"], r["op"]) for r in rows if not r.get("skipped")} == \
        {(K, op) for K in (1, 2) for op in ("rast_sample", "rast_sample_reference", "hf_chain")}


def test_bench_decode_tiny(tmp_path, bench_modules, capsys):
    out = tmp_path / "out"
    # 16 tokens: the engine is timed by its steady-state step() calls (4 decode steps each), so it needs a few
    _main("bench_decode", ["--tiny", "--batch", "2", "--prompt-len", "5", "--new-tokens", "16", "--repeats", "2",
                           "--peer-new-tokens", "3", "--copy-mib", "8", "--out", str(out)], capsys)
    result = json.loads((out / "decode.json").read_text())
    assert {"device", "versions", "weight_GB", "copy_bandwidth_GBps", "models", "second_pair"} <= set(result["meta"])
    rows = {r["system"]: r for r in result["rows"]}
    assert set(rows) == {"engine", "engine_hf_forward", "engine_sdpa", "engine_overlap", "engine_2pairs", "peer_loop",
                         "base_alone_engine", "base_alone_eager", "floor", "floor_base_alone", "floor_2pairs"}
    assert rows["engine_hf_forward"]["fused_decode"] is False and rows["engine_sdpa"]["attn_implementation"] == "sdpa"
    assert rows["engine"]["x_base_alone_engine"] > 0
    # the two-pair engine (five models, one sampling call): its own floor, no comparison with the one-pair peer loop
    assert {name: row["pairs"] for name, row in rows.items() if row["pairs"] != 1} == {
        "engine_2pairs": 2, "floor_2pairs": 2, "base_alone_engine": 0, "base_alone_eager": 0, "floor_base_alone": 0}
    assert rows["engine_2pairs"]["speedup_vs_peer"] is None and rows["engine_2pairs"]["x_engine_1pair"] > 0
    assert rows["floor_2pairs"]["ms_per_token"] > rows["floor"]["ms_per_token"]
    assert result["meta"]["weight_GB_2pairs"] > result["meta"]["weight_GB"]
    for name, row in rows.items():
        assert row.get("error") is None, (name, row.get("error"))
        assert row["ms_per_token"] > 0 and row["tokens_per_s"] > 0
        assert {"B", "pairs", "prompt_len", "speedup_vs_peer", "pct_of_floor", "device", "date"} <= set(row)
    assert rows["peer_loop"]["speedup_vs_peer"] == pytest.approx(1.0)


# the tiny trio through the tensor-parallel code path: few tokens (4 decode steps per timed step() call)
TP_ARGS = ["--tiny", "--batch", "2", "--prompt-len", "4", "--new-tokens", "14", "--copy-mib", "8",
           "--systems", "engine", "base_alone", "floor"]


def _tp_result(out: Path, stdout: str, tp: int) -> dict:
    """decode.json of a tensor-parallel run, checked: every row carries the TP size, every engine ran the TP path
    with it, the floors are per rank (the base's bytes / tp + the replicated experts'), nothing failed."""
    assert stdout.count("# summary") == 1 and stdout.count("wrote ") == 1, stdout  # rank 0 alone reports
    result = json.loads((out / "decode.json").read_text())
    meta, rows = result["meta"], {(r["system"], r["B"]): r for r in result["rows"]}
    assert meta["tensor_parallel_size"] == tp and meta["tp_code_path"] and meta["world_size"] == tp
    assert meta["weight_GB_per_rank"] == pytest.approx(meta["base_weight_GB"] / tp + meta["weight_GB"]
                                                       - meta["base_weight_GB"])
    assert rows["floor", 2]["ms_per_token"] == pytest.approx(meta["weight_GB_per_rank"] / meta["copy_bandwidth_GBps"]
                                                             * 1e3)
    for (system, _), row in rows.items():
        assert row.get("error") is None and row["tensor_parallel_size"] == tp, row
        if system in ("engine", "base_alone_engine"):
            assert row["engine_tensor_parallel_size"] == tp and row["ms_per_token"] > 0, row
    return rows


@needs_dist
def test_bench_decode_tensor_parallel_two_ranks(tmp_path):
    """torchrun, 2 ranks (gloo): the tiny trio's base sharded 2 ways (its 4 heads, 2 KV heads and MLP width 128
    divide by 2); the single-process eager half of base_alone is skipped, and says so."""
    out = tmp_path / "out"
    r = torchrun(2, str(BENCH / "bench_decode.py"), *TP_ARGS, "--tensor-parallel-size", "2", "--out", str(out))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = _tp_result(out, r.stdout, 2)
    assert {s for s, _ in rows} == {"engine", "base_alone_engine", "floor", "floor_base_alone"}
    assert "base_alone_eager skipped" in r.stdout


@needs_dist
def test_bench_decode_one_rank_process_group(tmp_path):
    """RAST_FORCE_PG=1 --tensor-parallel-size 1: the engines run the TP path as a one-rank group (what gpu_check.sh
    times on one GPU), the eager baseline still runs on freshly built (unsharded) models."""
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(BENCH / "bench_decode.py"), *TP_ARGS, "--tensor-parallel-size", "1",
                        "--out", str(out)], capture_output=True, text=True, timeout=TIMEOUT_S,
                       env={**launch_env(), "RAST_FORCE_PG": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = _tp_result(out, r.stdout, 1)
    assert rows["base_alone_eager", 2]["ms_per_token"] > 0
    assert json.loads((out / "decode.json").read_text())["meta"]["command"].startswith("RAST_FORCE_PG=1 ")


def test_peer_loop_greedy_matches_oracle(bench_modules):
    """At temperature 0 the peer loop (left padding, DynamicCache) picks argmax of
    z_base + alpha * (z_expert - z_expert_base) from full forwards without a cache."""
    _, models, peer_loop = bench_modules
    cfgs = [models.tiny_config("llama", 300), models.tiny_config("llama", 280), models.tiny_config("llama", 280)]
    trio = [models.build_model(c, dtype=torch.float32, seed=i, std=0.2) for i, c in enumerate(cfgs)]
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    res = peer_loop.peer_generate(*trio, prompts, max_new_tokens=5, alpha=0.5, temperature=0.0, vocab_size=280)
    assert len(res.step_s) == 4
    with torch.no_grad():
        for prompt, got in zip(prompts, res.tokens):
            seq = list(prompt)
            for _ in range(5):
                z_b, z_e, z_eb = (m(torch.tensor([seq])).logits[0, -1, :280] for m in trio)
                seq.append(int((z_b + 0.5 * (z_e - z_eb)).argmax()))
            assert got == seq[len(prompt):]


def test_peer_loop_stops_rows_at_eos(bench_modules):
    _, models, peer_loop = bench_modules
    trio = [models.build_model(models.tiny_config("qwen2", 64), dtype=torch.float32, seed=i, std=0.3) for i in range(3)]
    greedy = peer_loop.peer_generate(*trio, [[3, 4, 5]], max_new_tokens=6, temperature=0.0)
    eos = greedy.tokens[0][2]
    res = peer_loop.peer_generate(*trio, [[3, 4, 5]], max_new_tokens=6, temperature=0.0, eos_token_id=eos)
    assert res.tokens[0] == greedy.tokens[0][:greedy.tokens[0].index(eos) + 1]


@pytest.mark.parametrize("pairs", [1, 2])
def test_hf_chain_draws_only_kept_tokens(bench_modules, pairs):
    """The HF-style chain (one pair, or K pairs with one weight each) draws only tokens the reference keeps."""
    baselines, _, _ = bench_modules
    from rast_kernels.ops.rast_sample_reference import combined_logits, kept_mask

    gen = torch.Generator().manual_seed(0)
    B, V = 4, 500
    logits = [torch.randn(B, V + 7 * i, generator=gen) * 3 for i in range(1 + 2 * pairs)]  # mismatched widths
    if pairs == 1:
        call, alpha = logits, 0.7
    else:
        call, alpha = (logits[0], logits[1:1 + pairs], logits[1 + pairs:]), [0.7, -0.4]
    z = combined_logits(*call, alpha, V)
    keep = kept_mask(z, torch.zeros(B, dtype=torch.long), torch.full((B,), 0.8), torch.zeros(B))
    drawn = torch.zeros(B, V, dtype=torch.bool)
    g = torch.Generator().manual_seed(1)
    for _ in range(300):
        tok = baselines.hf_chain_sample(*call, alpha=alpha, top_p=0.8, generator=g)
        drawn[torch.arange(B), tok] = True
    assert not (drawn & ~keep).any()
    assert drawn.sum() > B  # it does sample, not just argmax
    assert torch.equal(baselines.hf_chain_sample(*call, alpha=alpha, temperature=0.0), z.argmax(1))


def test_models_build_real_shapes_and_rotary(bench_modules):
    """A stored real config builds on the meta device with the published parameter count, and the
    random-init path recomputes the rotary buffers that ``to_empty`` leaves uninitialised."""
    _, models, _ = bench_modules
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        big = AutoModelForCausalLM.from_config(models.load_config("Qwen2.5-7B"))
    assert sum(p.numel() for p in big.parameters()) == 7_615_616_512
    with torch.device("meta"):
        big = AutoModelForCausalLM.from_config(models.load_config("Llama-3.1-70B"))  # the llama-70b trio's base
    assert sum(p.numel() for p in big.parameters()) == 70_553_706_496
    cfg = models.load_config("Llama-3.2-1B")  # llama3 rope scaling
    cfg.num_hidden_layers, cfg.vocab_size = 1, 256
    built = models.build_model(cfg, dtype=torch.float32)
    fresh = AutoModelForCausalLM.from_config(cfg)
    assert torch.equal(built.model.rotary_emb.inv_freq, fresh.model.rotary_emb.inv_freq)
    assert built.lm_head.weight.data_ptr() == built.model.embed_tokens.weight.data_ptr()  # tied again
    assert models.weight_bytes(built) == sum(p.numel() * 4 for p in fresh.parameters())
    # one copy of the layers (for a model a TP engine shards), counted as the model it stands for
    cfg.num_hidden_layers = 2
    shared = models.build_model(cfg, dtype=torch.float32, share_layers=True)
    assert shared.model.layers[1].mlp.up_proj.weight is shared.model.layers[0].mlp.up_proj.weight
    assert models.weight_bytes(shared) == models.weight_bytes(models.build_model(cfg, dtype=torch.float32))
    tok = models.placeholder_tokenizer(300)
    assert len(tok) == 300 and tok.eos_token_id == 299
    assert set(models.SECOND_PAIRS) == set(models.TRIOS)  # every trio has its two-pair run (bench_decode)
    for names in (*models.TRIOS.values(), *models.SECOND_PAIRS.values()):
        assert set(names) <= set(models.available_configs())


def test_bench_serving_tiny(tmp_path, bench_modules, capsys):
    """The serving benchmark end to end on the tiny trio: every system does the same work; the continuous engine
    holds more rows than the static one at equal KV memory (timings are not asserted)."""
    out = tmp_path / "out"
    _main("bench_serving", ["--requests", "12", "--prompt-len", "6", "--mean-new", "6", "--max-new", "40",
                            "--max-batch", "8", "--step-batch", "2", "--step-tokens", "8", "--baseline-rev", "",
                            "--out", str(out)], capsys)
    result = json.loads((out / "serving.json").read_text())
    rows = {r["system"]: r for r in result["rows"]}
    assert set(rows) == {"decode_step_paged", "decode_step_static_baseline", "continuous", "static", "peer_loop"}
    assert "skipped" in rows["decode_step_static_baseline"]
    useful = sum(result["lengths"])
    for name in ("continuous", "static", "peer_loop"):
        assert rows[name]["useful_tokens"] == useful and rows[name]["tokens_per_s"] > 0
    assert result["static_rows"] == 4 and rows["static"]["peak_kv_held_tokens"] <= result["kv_cache_tokens"]
    assert rows["continuous"]["peak_kv_held_tokens"] <= result["kv_cache_tokens"]
    assert rows["continuous"]["mean_occupancy"] > rows["static"]["mean_occupancy"]
    assert math.isfinite(rows["decode_step_paged"]["ms_per_step"])  # a difference of two timings: no sign asserted


def test_bench_bandwidth_tiny(tmp_path, bench_modules, capsys):
    """The bandwidth probe writes its copy / read figures and one row per (shape, batch) with every backend."""
    out = tmp_path / "out"
    _main("bench_bandwidth", ["--shapes", "64x32", "33x17", "--batch", "1", "3", "--stream-mib", "64", "--repeats", "3",
                              "--out", str(out)], capsys)
    result = json.loads((out / "bandwidth.json").read_text())
    assert result["copy_gb_s"] > 0 and result["read_gb_s"] > 0
    assert [(r["n"], r["k"], r["m"]) for r in result["rows"]] == [(64, 32, 1), (64, 32, 3), (33, 17, 1), (33, 17, 3)]
    assert all(math.isfinite(r["torch_linear_gb_s"]) and r["weight_mb"] >= 0 for r in result["rows"])  # no timing asserted


def test_bench_speculative_toy(tmp_path, bench_modules, capsys):
    """The speculative benchmark on the toy trio and the tiny qwen-small-shaped path: acceptance rows whose tokens
    equal plain decoding's, e2e rows for every system, round costs, and MODEL rows computed from them."""
    out = tmp_path / "out"
    _main("bench_speculative", ["--parts", "acceptance", "e2e", "round_cost", "model", "--k", "2", "--alpha", "1",
                                "--temperature", "0", "--problems", "4", "--batch", "2", "--round-batch", "2",
                                "--repeats", "1",
                                "--threads", "1", "--trio", "tiny", "--prompt-len", "8", "--out", str(out)], capsys)
    rows = json.loads((out / "speculative.json").read_text())["rows"]
    acc = [r for r in rows if r["part"] == "acceptance"]
    assert {r["draft"] for r in acc} == {"expert", "combination"} and all(r["identical"] for r in acc)
    assert all(r["drafted"] == 2 * r["rounds"] and r["accepted"] <= r["checked"] <= r["drafted"] for r in acc)
    assert all(1 <= r["tokens_per_round"] <= 3 and 0 <= r["acceptance"] <= 1 for r in acc)
    e2e = {r["system"]: r for r in rows if r["part"] == "e2e"}
    assert set(e2e) == {"rast", "rast_speculative", "base_alone", "base_alone_24"}
    assert e2e["rast_speculative"]["identical_to_rast"]
    assert e2e["base_alone_24"]["tokens"] == 24 * e2e["rast"]["prompts"]
    costs = [r for r in rows if r["part"] == "round_cost"]
    assert [r["k"] for r in costs] == [2] and costs[0]["round_ms"] > 0 and costs[0]["verify_ratio"] > 0
    model = [r for r in rows if r["part"] == "model"]
    assert model and all(r["label"] == "MODEL" for r in model)  # predictions, never presented as measured


def test_tokens_per_round_and_break_even(bench_modules):
    import bench_speculative as bs

    assert bs.tokens_per_round(0.0, 4) == 1 and bs.tokens_per_round(1.0, 4) == 5
    assert bs.tokens_per_round(0.5, 2) == pytest.approx(1.75)
    p = bs._break_even(plain=10.0, rnd=17.5, k=2)  # a round costing 1.75 steps breaks even at p = 0.5
    assert p == pytest.approx(0.5, abs=1e-6) and math.isnan(bs._break_even(plain=1.0, rnd=5.0, k=2))


def test_bench_revision_against_the_last_commit(tmp_path, bench_modules, capsys):
    if subprocess.run(["git", "-C", str(BENCH), "rev-parse", "HEAD"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    out = tmp_path / "out"
    _main("bench_revision", ["--rev", "HEAD", "--batch", "1", "--pairs", "2", "--rounds", "1", "--requests", "3",
                             "--out", str(out)], capsys)
    rows = {r["measure"]: r for r in json.loads((out / "revision.json").read_text())["rows"]}
    assert set(rows) == {"step_ms_B1", "serving_tokens_per_s"} and rows["serving_tokens_per_s"]["identical"]
    assert all(r["new_over_old"] > 0 for r in rows.values())
    assert importlib.import_module("bench_revision").parse_args(["--rounds", "0"]).rounds == 0  # 0 skips serving
