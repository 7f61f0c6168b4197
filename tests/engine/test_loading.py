"""loading.choose_attn_implementation: the attention each model gets, per family and device, and the refusals."""
from __future__ import annotations

import pytest
import torch

from rast_kernels import RastEngine, _backends
from rast_kernels.engine import loading
from rast_kernels.engine.loading import choose_attn_implementation, load_model

from conftest import make_model

_TINY = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, pad_token_id=1)


def _model(family: str, **over):
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {"gemma2": dict(head_dim=8, query_pre_attn_scalar=8),
             "gpt_oss": dict(head_dim=8, num_local_experts=2, num_experts_per_tok=1, sliding_window=64),
             "falcon": dict(num_key_value_heads=4, new_decoder_architecture=False, multi_query=False)}
    cfg = AutoConfig.for_model(family, **{**_TINY, **extra.get(family, {}), **over})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


@pytest.fixture(scope="module")
def models():
    return {f: _model(f) for f in ("llama", "gemma2", "gpt_oss", "falcon")}


# family -> (choice on CPU, on CUDA with Triton): rast_decode only on CUDA; Gemma2 soft-caps its attention logits
# and GPT-OSS (attention sinks) refuses SDPA: eager; Falcon cannot switch after construction and does not call
# transformers' attention interface: it keeps the SDPA it was built with
EXPECTED = {"llama": ("sdpa", "rast_decode"), "gemma2": ("eager", "eager"), "gpt_oss": ("eager", "eager"),
            "falcon": ("sdpa", "sdpa")}


@pytest.mark.parametrize("family", list(EXPECTED))
def test_default_choice_per_family_and_device(family, models, monkeypatch):
    m = models[family]
    cpu, cuda = EXPECTED[family]
    assert choose_attn_implementation(m, None, torch.device("cpu"), "base") == cpu
    # the chooser only reads the device's type: the CUDA rule is checked here without a GPU
    monkeypatch.setattr(_backends, "has_triton", lambda: True)
    assert choose_attn_implementation(m, None, torch.device("cuda", 0), "base") == cuda
    assert choose_attn_implementation(m, None, "cuda:1", "base") == cuda
    monkeypatch.setattr(_backends, "has_triton", lambda: False)
    assert choose_attn_implementation(m, None, "cuda", "base") == ("sdpa" if cuda == "rast_decode" else cuda)


def test_softcapping_decides_not_the_family(models):
    """Gemma2 without soft-capping follows its class's _supports_sdpa; the soft-capping rule applies to any class
    whose config sets it (a Llama with the attribute set is sent to eager)."""
    uncapped = _model("gemma2", attn_logit_softcapping=None)
    # transformers 5.24 sets Gemma2's _supports_sdpa to False; earlier 5.x versions may not
    assert choose_attn_implementation(uncapped, None, "cpu", "x") == ("sdpa" if uncapped._supports_sdpa else "eager")
    capped = _model("llama")
    capped.config.attn_logit_softcapping = 30.0
    assert choose_attn_implementation(capped, None, "cuda", "x") == "eager"
    with pytest.raises(ValueError, match=r"^expert_base: attn_implementation='sdpa' .*soft-capped"):
        choose_attn_implementation(capped, "sdpa", "cpu", "expert_base")


@pytest.mark.parametrize("family, name, why", [
    ("gemma2", "sdpa", "soft-capped"), ("gemma2", "rast_decode", "soft-capped"),
    ("gpt_oss", "sdpa", "does not support SDPA"), ("gpt_oss", "rast_decode", "does not support SDPA"),
    ("falcon", "rast_decode", "(attention interface|keyword arguments)"),
])
def test_explicit_refused_choice_names_the_role(family, name, why, models):
    for role in ("base", "expert", "expert_base"):
        with pytest.raises(ValueError, match=rf"^{role}: attn_implementation='{name}' is not possible: .*{why}"):
            choose_attn_implementation(models[family], name, "cpu", role)


def test_explicit_possible_choice_is_kept(models):
    assert choose_attn_implementation(models["llama"], "eager", "cuda", "base") == "eager"
    assert choose_attn_implementation(models["llama"], "rast_decode", "cpu", "base") == "rast_decode"
    assert choose_attn_implementation(models["gemma2"], "eager", "cpu", "base") == "eager"


def test_unknown_name(models):
    for bad in ("flash", "flash_attention_2", "SDPA", ""):
        with pytest.raises(ValueError, match=r"^attn_implementation: must be one of"):
            choose_attn_implementation(models["llama"], bad, "cpu", "base")


def test_load_model_sets_the_choice(tokenizer, tmp_path):
    """load_model switches a given model (and one loaded from a path) to the per-model choice."""
    g = _model("gemma2")
    assert load_model(g, "expert", torch.device("cpu"), None, None).config._attn_implementation == "eager"
    llama = make_model("llama", 300, 1)
    llama.set_attn_implementation("eager")
    assert load_model(llama, "base", torch.device("cpu"), None, None).config._attn_implementation == "sdpa"
    _model("gemma2").save_pretrained(tmp_path / "g")
    loaded = load_model(str(tmp_path / "g"), "expert", torch.device("cpu"), None, None)
    assert loaded.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match=r"^expert: attn_implementation='sdpa' is not possible"):
        load_model(str(tmp_path / "g"), "expert", torch.device("cpu"), None, "sdpa")


def test_class_that_cannot_switch(models):
    """Falcon fixes its attention at construction: the default keeps it; switching it is a ValueError naming the
    role (transformers itself would only log a warning and keep the old one)."""
    eager = _model("falcon", attn_implementation="eager")
    if eager._can_set_attn_implementation():  # pragma: no cover - depends on the installed transformers
        pytest.skip("this transformers' Falcon can switch its attention")
    assert choose_attn_implementation(eager, None, "cuda", "expert") == "eager"
    with pytest.raises(ValueError, match=r"^expert: FalconForCausalLM stays on attention 'eager'"):
        loading.set_attn_implementation(eager, "sdpa", "expert")


def test_engine_refusal_names_the_role_and_reports_the_choice(tokenizer):
    """Mixed families: a Llama base with Gemma2 experts gets sdpa / eager / eager by default (repr says so); an
    explicit "sdpa" is refused naming the first model that cannot run it."""
    base = make_model("llama", 320, 1)
    experts = [_model("gemma2", vocab_size=304), _model("gemma2", vocab_size=312)]
    with pytest.raises(ValueError, match=r"^expert: attn_implementation='sdpa' is not possible: .*soft-capped"):
        RastEngine(base, *experts, tokenizer=tokenizer, max_seq_len=32, devices="cpu", attn_implementation="sdpa")
    engine = RastEngine(base, *experts, tokenizer=tokenizer, max_seq_len=32, devices="cpu")
    assert engine.attn == {"base": "sdpa", "expert": "eager", "expert_base": "eager"}
    assert "'base': 'sdpa', 'expert': 'eager', 'expert_base': 'eager'" in repr(engine)


@pytest.mark.parametrize("family", ["gemma2", "gpt_oss"])
def test_rast_decode_refuses_softcap_and_sinks_when_forced(family):
    """Set on such a model behind the chooser's back, "rast_decode" raises instead of falling back to SDPA
    (which would ignore the soft-capping / the sinks); eager runs."""
    from rast_kernels.engine.attention import register_rast_attention

    register_rast_attention()
    m = _model(family).eval()
    x = torch.tensor([[3, 4, 5]])
    m(input_ids=x)  # eager
    m.set_attn_implementation("rast_decode")
    with pytest.raises(ValueError, match=r"^attn_implementation: 'rast_decode' cannot compute soft-capped"):
        m(input_ids=x)
