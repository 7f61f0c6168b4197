"""The engine's own decode forward (fused_decode) on CPU: same logits as transformers' forward."""
from __future__ import annotations

import pytest
import torch

import rast_kernels.engine.attention as attention
from rast_kernels import RastEngine, _backends
from rast_kernels.engine.fused_decode import FusedDecoder, concat_linears, unsupported_reason

from conftest import WIDTHS, make_model

CPU = "cpu"
PROMPTS = ["the quick brown fox", "a stitch in time saves nine; the early bird", "héllo"]


def _trio(family, dtype):
    return [make_model(family, w, s).to(dtype) for w, s in zip(WIDTHS.values(), (1, 2, 3))]


@pytest.mark.parametrize("family", ["qwen2", "llama", "mistral"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_equal_to_transformers_forward(family, dtype, tokenizer, monkeypatch):
    """With PyTorch ops (the CPU path) the fused decoder is transformers' math op for op: sampled tokens and
    their logprobs are identical to transformers' forward with the same decode-attention function, for
    left-padded rows of different lengths. The two engines share the model objects (each engine re-selects
    its attention implementation per call, so neither sees the other's)."""
    monkeypatch.setattr(attention, "_default_backend", lambda device: "torch")  # the reference attention
    models = _trio(family, dtype)
    kw = dict(alpha=0.7, temperature=1.0, top_p=0.95, max_new_tokens=12, eos_token_id=[], seed=[1, 2, 3],
              return_logprobs=True)
    hf = RastEngine(*models, tokenizer=tokenizer, max_seq_len=48, devices=CPU, attn_implementation="rast_decode",
                    fused_decode=False)
    fused = RastEngine(*models, tokenizer=tokenizer, max_seq_len=48, devices=CPU, fused_decode=True)
    assert hf.lanes[0].decoder is None and all(lane.decoder is not None for lane in fused.lanes)
    for lane in fused.lanes:  # the modules' own GEMMs (a concatenated or oneDNN GEMM may round differently)
        lane.decoder = FusedDecoder(lane.model, fuse_projections=False, onednn=False)
    a, b = hf.generate(PROMPTS, **kw), fused.generate(PROMPTS, **kw)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.logprobs for o in a] == [o.logprobs for o in b]


def test_greedy_matches_full_forward_oracle(tokenizer):
    """The independent oracle (full-sequence forwards, no cache) through the fused path."""
    from test_engine import _oracle_greedy

    models = _trio("llama", torch.float32)
    outs = RastEngine(*models, tokenizer=tokenizer, max_seq_len=64, devices=CPU, fused_decode=True).generate(
        PROMPTS, alpha=0.7, temperature=0.0, max_new_tokens=8, eos_token_id=[])
    for p, o in zip(PROMPTS, outs):
        assert o.token_ids == _oracle_greedy(models, tokenizer, p, 0.7, 8)


def test_triton_kernels_inside_the_decoder(tokenizer):
    """The decoder with the Triton kernels (on CPU: the interpreter, hence a short run) gives the tokens of the
    PyTorch-op decoder; logprobs agree to fp32 summation-order noise."""
    if not (_backends.has_triton() and _backends.triton_interpreting()):
        pytest.skip("needs Triton under TRITON_INTERPRET=1 (tests/conftest.py sets it on machines without CUDA)")
    models = _trio("qwen2", torch.float32)
    kw = dict(alpha=0.7, temperature=1.0, max_new_tokens=3, eos_token_id=[], seed=[5, 6], return_logprobs=True)
    ref = RastEngine(*models, tokenizer=tokenizer, max_seq_len=32, devices=CPU, fused_decode=True)
    got = RastEngine(*models, tokenizer=tokenizer, max_seq_len=32, devices=CPU, fused_decode=True)
    for lane in got.lanes:
        lane.decoder.backend = "triton"
    a, b = ref.generate(PROMPTS[:2], **kw), got.generate(PROMPTS[:2], **kw)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    for x, y in zip(a, b):
        assert x.logprobs == pytest.approx(y.logprobs, abs=1e-4)


def test_default_switch_and_unsupported_models(tokenizer, monkeypatch):
    import rast_kernels.engine.build as engine_module
    from rast_kernels.engine.fused_decode import onednn_linear_available

    models = _trio("qwen2", torch.float32)
    engine = RastEngine(*models, tokenizer=tokenizer, max_seq_len=32, devices=CPU)
    assert engine.fused_decode is False  # CPU default for small models: transformers' forward (per-op overhead)
    monkeypatch.setattr(engine_module, "CPU_FUSED_MIN_BYTES", 1)  # as if the models weighed 256 MB or more
    engine = RastEngine(*models, tokenizer=tokenizer, max_seq_len=32, devices=CPU)
    assert engine.fused_decode is onednn_linear_available() and all(l.decoder.onednn for l in engine.lanes)
    bf16 = RastEngine(*[m.to(torch.bfloat16) for m in _trio("qwen2", torch.float32)], tokenizer=tokenizer,
                      max_seq_len=32, devices=CPU)
    assert bf16.fused_decode is False  # oneDNN linears are the fp32 path
    monkeypatch.undo()
    gelu = make_model("llama", WIDTHS["expert"], 7, hidden_act="gelu")
    assert "hidden_act" in unsupported_reason(gelu)
    with pytest.raises(ValueError, match=r"^expert: fused_decode=True does not support this model: hidden_act"):
        RastEngine(models[0], gelu, models[2], tokenizer=tokenizer, max_seq_len=32, devices=CPU, fused_decode=True)
    with pytest.raises(ValueError, match="hidden_act"):
        FusedDecoder(gelu)
    # not requested: the unsupported model simply keeps transformers' forward
    mixed = RastEngine(models[0], gelu, models[2], tokenizer=tokenizer, max_seq_len=32, devices=CPU)
    assert mixed.fused_decode is False
    with pytest.raises(TypeError, match=r"^fused_decode: expected a bool or None"):
        RastEngine(*models, tokenizer=tokenizer, devices=CPU, fused_decode="yes")
    with pytest.raises(TypeError, match=r"^overlap_models: expected a bool"):
        RastEngine(*models, tokenizer=tokenizer, devices=CPU, overlap_models=None)
    assert RastEngine(*models, tokenizer=tokenizer, devices=CPU, overlap_models=True).overlap_models is False  # CUDA only


def test_concatenated_projections_share_the_weights():
    """fuse_projections re-points q/k/v and gate/up to row views of one tensor each: same values, no copy
    left behind, a second decoder over the same model reuses the tensors, transformers' forward unchanged."""
    model = make_model("qwen2", WIDTHS["base"], 1)
    before = {n: p.clone() for n, p in model.named_parameters()}
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        first = FusedDecoder(model)
        attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
        w, b = first.qkv[1]
        nq = attn.q_proj.out_features
        assert w.shape == (nq + attn.k_proj.out_features + attn.v_proj.out_features, attn.q_proj.in_features)
        assert attn.k_proj.weight.data_ptr() == w[nq:].data_ptr() and attn.v_proj.bias.data_ptr() > b.data_ptr()
        assert mlp.up_proj.weight.data_ptr() == first.gate_up[1][0][mlp.gate_proj.out_features:].data_ptr()
        assert first.gate_up[1][1] is None  # no MLP bias in Qwen2
        second = FusedDecoder(model)
        assert second.qkv[1][0].data_ptr() == w.data_ptr() and second.gate_up[0][0].data_ptr() == \
            first.gate_up[0][0].data_ptr()
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]), n
        assert torch.equal(model(input_ids=ids).logits, logits)
    # only some with a bias, or not plain nn.Linear: left alone
    odd = make_model("qwen2", WIDTHS["base"], 1).model.layers[0].self_attn
    odd.k_proj.bias = None
    assert concat_linears([odd.q_proj, odd.k_proj, odd.v_proj]) is None
    assert concat_linears([odd.q_proj, torch.nn.Identity()]) is None


def test_concatenated_projections_give_the_same_tokens(tokenizer):
    """One GEMM over concatenated q/k/v (gate/up) weights computes the same dot products as the separate
    ones; the library may block the wider GEMM differently, so fp32: same tokens, logprobs to 1e-5."""
    models = _trio("llama", torch.float32)
    kw = dict(alpha=1.5, temperature=1.0, max_new_tokens=10, eos_token_id=[], seed=[7, 8], return_logprobs=True)
    fused = RastEngine(*models, tokenizer=tokenizer, max_seq_len=48, devices=CPU, fused_decode=True)
    assert all(x is not None for lane in fused.lanes for x in lane.decoder.qkv + lane.decoder.gate_up)
    a = fused.generate(PROMPTS[:2], **kw)
    for lane in fused.lanes:
        lane.decoder = FusedDecoder(lane.model, fuse_projections=False)
        assert all(x is None for x in lane.decoder.qkv + lane.decoder.gate_up)
    b = fused.generate(PROMPTS[:2], **kw)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    for x, y in zip(a, b):
        assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5)


def test_projection_biases(tokenizer, monkeypatch):
    """Llama with biases on every projection (attention_bias, mlp_bias): the concatenated q/k/v and gate/up
    GEMMs carry the concatenated biases; same tokens as transformers' forward (fp32)."""
    monkeypatch.setattr(attention, "_default_backend", lambda device: "torch")
    models = [make_model("llama", w, s, attention_bias=True, mlp_bias=True) for w, s in zip(WIDTHS.values(), (1, 2, 3))]
    kw = dict(alpha=0.7, temperature=1.0, max_new_tokens=10, eos_token_id=[], seed=[1, 2], return_logprobs=True)
    hf = RastEngine(*models, tokenizer=tokenizer, max_seq_len=48, devices=CPU, attn_implementation="rast_decode",
                    fused_decode=False).generate(PROMPTS[:2], **kw)
    engine = RastEngine(*models, tokenizer=tokenizer, max_seq_len=48, devices=CPU, fused_decode=True)
    assert all(lane.decoder.qkv[0][1] is not None and lane.decoder.gate_up[0][1] is not None for lane in engine.lanes)
    fused = engine.generate(PROMPTS[:2], **kw)
    assert [o.token_ids for o in fused] == [o.token_ids for o in hf]
    for a, b in zip(fused, hf):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_padding_rows_stay_inert(tokenizer):
    """Batches padded to a graph bucket (inert copies of row 0, as on CUDA) give the real rows' tokens unchanged."""
    models = _trio("qwen2", torch.float32)
    kw = dict(temperature=1.0, max_new_tokens=8, eos_token_id=[], seed=[4, 5, 6], return_logprobs=True)
    plain = RastEngine(*models, tokenizer=tokenizer, max_seq_len=48, devices=CPU, fused_decode=True)
    padded = RastEngine(*models, tokenizer=tokenizer, max_seq_len=48, devices=CPU, fused_decode=True)
    padded.pad_to_buckets = True  # 3 rows -> bucket 4
    a, b = plain.generate(PROMPTS, **kw), padded.generate(PROMPTS, **kw)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    for x, y in zip(a, b):  # a GEMM over 4 rows may block differently from one over 3: last-bit differences
        assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5)


def test_onednn_linear_matches_torch_linear():
    """The decoder's CPU linear (oneDNN on the plain weight): the same products as nn.functional.linear up to fp32
    summation order, with and without bias, odd shapes, 1..9 rows; the decoder uses it by default on CPU fp32."""
    from rast_kernels.engine.fused_decode import onednn_linear, onednn_linear_available

    if not onednn_linear_available():
        pytest.skip("this PyTorch build has no oneDNN linear")
    gen = torch.Generator().manual_seed(0)
    for m, n, k in ((1, 7, 5), (4, 300, 129), (9, 64, 1000)):
        x, w, b = (torch.randn(*s, generator=gen) for s in ((m, k), (n, k), (n,)))
        for bias in (None, b):
            torch.testing.assert_close(onednn_linear(x, w, bias), torch.nn.functional.linear(x, w, bias),
                                       rtol=1e-5, atol=1e-5 * k ** 0.5)
    model = _trio("qwen2", torch.float32)[0]
    assert FusedDecoder(model).onednn and not FusedDecoder(model.to(torch.bfloat16)).onednn
