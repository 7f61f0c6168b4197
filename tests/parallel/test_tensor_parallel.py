"""Tensor parallelism on CPU (gloo): a base model sharded over 2 ranks gives TP = 1's tokens, greedy and sampled
with the same seeds, and its log-probabilities within fp32 rounding; every rank gets the same outputs; a one-rank
process group (what gpu_check.sh runs on one GPU) gives TP = 1's outputs exactly; a failing rank ends the launch."""
import json
import subprocess
import sys
import time

import pytest

from parallel_launch import TIMEOUT_S, env, needs_dist, torchrun, worker

pytestmark = needs_dist


def _alone(out, **extra_env):
    r = subprocess.run([sys.executable, worker("tp_worker.py"), str(out)], capture_output=True, text=True,
                       timeout=TIMEOUT_S, env={**env(), **extra_env})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def tp1(tmp_path_factory):
    return _alone(tmp_path_factory.mktemp("tp1") / "out.json")


def test_tp1_is_unsharded_and_varied(tp1):
    assert set(tp1) == {"qwen2/hf", "qwen2/fused", "qwen2/hf/shard_experts", "llama/hf", "llama/fused"}
    for rec in tp1.values():
        assert rec["tp"] == 1 and not rec["sharded"] and rec["kv_heads"] == 2
        assert len({tuple(t) for t in rec["sampled"]}) == len(rec["sampled"])  # the samples really differ


def test_tp2_equals_tp1(tp1, tmp_path):
    out = tmp_path / "out.json"
    r = torchrun(2, worker("tp_worker.py"), str(out), "--tp", "2")
    assert r.returncode == 0, r.stderr[-3000:]  # (the worker also checks that both ranks got the same outputs)
    tp2 = json.loads(out.read_text())
    for family in ("qwen2", "llama"):  # a second engine over the same sharded objects reuses them as they are
        assert tp2.pop(f"{family}/reused") == dict(same=True, hooks=1)
    for key, rec in tp2.items():
        want = tp1[key]
        assert rec["tp"] == 2 and rec["sharded"], key
        assert rec["kv_heads"] == 1, key  # each rank's KV pool holds its half of the base's KV heads
        assert rec["expert_kv_heads"] == (1 if key.endswith("shard_experts") else 2), key
        assert rec["greedy"] == want["greedy"], key
        assert rec["sampled"] == want["sampled"], key
        for a, b in zip(rec["logprobs"], want["logprobs"]):
            assert a == pytest.approx(b, abs=1e-4), key


def test_one_rank_process_group_equals_tp1_exactly(tp1, tmp_path):
    forced = _alone(tmp_path / "out.json", RAST_FORCE_PG="1")
    for family in ("qwen2", "llama"):
        assert forced.pop(f"{family}/reused") == dict(same=True, hooks=1)
    for key, rec in forced.items():
        assert rec["sharded"] and rec["tp"] == 1, key  # the collective code path ran, on one rank
        assert {k: rec[k] for k in ("greedy", "sampled", "logprobs")} == \
            {k: tp1[key][k] for k in ("greedy", "sampled", "logprobs")}, key


def test_a_failing_rank_ends_the_tensor_parallel_launch(tmp_path):
    """Rank 1 raises after building its engine, while rank 0 waits in the step's collectives: the launch ends
    with rank 1's error, within the collective timeout, not a hang."""
    t0 = time.monotonic()
    r = torchrun(2, worker("tp_worker.py"), str(tmp_path / "out.json"), "--tp", "2", "--fail-rank", "1")
    assert r.returncode != 0 and "RuntimeError: boom on rank 1" in r.stderr
    assert time.monotonic() - t0 < TIMEOUT_S and not (tmp_path / "out.json").exists()


def test_argument_errors_without_a_launch():
    import importlib.util
    import os

    # the engine tests' tiny models (their conftest, loaded under its own name: `conftest` is the root one here)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "engine", "conftest.py")
    spec = importlib.util.spec_from_file_location("engine_test_models", path)
    models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(models)
    make_model, make_tokenizer = models.make_model, models.make_tokenizer

    from rast_kernels.engine import RastEngine
    from rast_kernels.parallel import current
    from rast_kernels.parallel.tensor_parallel import shard_reason

    tok = make_tokenizer()
    model = make_model("qwen2", 320, 1)
    with pytest.raises(ValueError, match="tensor_parallel_size: 2 needs 2 processes"):
        RastEngine(model, None, None, tokenizer=tok, devices="cpu", max_seq_len=32, tensor_parallel_size=2)
    with pytest.raises(TypeError, match="shard_experts: expected a bool"):
        RastEngine(model, None, None, tokenizer=tok, devices="cpu", max_seq_len=32, shard_experts="yes")
    with pytest.raises(ValueError, match="shard_experts: needs tensor parallelism"):
        RastEngine(model, None, None, tokenizer=tok, devices="cpu", max_seq_len=32, shard_experts=True)
    engine = RastEngine(model, None, None, tokenizer=tok, devices="cpu", max_seq_len=32, tensor_parallel_size=1)
    assert engine.parallel is None and engine.tensor_parallel_size == 1 and current() is None  # nothing set up
    assert shard_reason(model, 2) is None
    assert shard_reason(model, 4) == "num_key_value_heads=2 does not divide by 4"
    assert "is not one of" in shard_reason(_gpt2(), 2)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64))


def test_tp_ranks_agree_on_the_kv_pool(tmp_path):
    """Ranks that see different free memory take the group's smallest pool (else their schedulers would admit and
    preempt differently and the collectives would stop matching) and finish the same generation."""
    out = tmp_path / "out.json"
    r = torchrun(2, worker("pool_worker.py"), str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = json.loads(out.read_text())
    locals_ = [p["local"] for p in ranks]
    assert locals_[0] < locals_[1]  # the fakes differ
    assert all(p["tokens"] == locals_[0] and p["blocks"] == ranks[0]["blocks"] for p in ranks)
    assert ranks[0]["tokens_out"] == ranks[1]["tokens_out"] and all(ranks[0]["tokens_out"])
