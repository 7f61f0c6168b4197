"""The "rast_decode" attention implementations against transformers' "sdpa" and "eager" on tiny random models
with a StaticCache: left-padded batch, prefill then a few decode steps (Triton under the interpreter on CPU)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

transformers = pytest.importorskip("transformers")

from rast_kernels.engine import attention as adapter  # noqa: E402
from rast_kernels.engine.attention import (  # noqa: E402
    RAST_DECODE,
    RAST_DECODE_MASKLESS,
    bounds_from_mask,
    register_rast_attention,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# `past_key_values=` works on transformers 5.17 (the GPU machine) and 5.24; 5.24 prefers `cache=` and warns
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
# fp32 models: the implementations differ only in summation order (and the kernel's exp2 softmax), so the
# logits agree to ~1e-6; 1e-4 leaves room for 2 layers of accumulation without hiding a wrong mask.
ATOL, RTOL = 1e-4, 1e-4
PROMPT_LENS = (5, 2, 1)  # left padding 0, 3 and 4 in a batch padded to 5; the last row starts == end - 1
STEPS = 3
MAX_CACHE = 12


def tiny_model(kind: str):
    common = dict(vocab_size=97, hidden_size=96, intermediate_size=64, num_hidden_layers=2,
                  max_position_embeddings=64, rms_norm_eps=1e-6)
    if kind == "qwen2":
        # GQA 3 (6 query heads over 2 kv heads), head dim 16
        config = transformers.Qwen2Config(num_attention_heads=6, num_key_value_heads=2, **common)
        model_cls = transformers.Qwen2ForCausalLM
    else:
        # GQA 2, odd head dim 24
        config = transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **common)
        model_cls = transformers.LlamaForCausalLM
    torch.manual_seed(0)
    return model_cls(config).to(DEVICE).eval()


def run(model, implementation, bounds="kwargs"):
    """Prefill a left-padded batch into a fresh StaticCache, then STEPS teacher-forced decode steps.
    ``bounds``: "kwargs" passes rast_start/rast_end, "mask" lets the adapter read them off the mask.
    Returns the logits of the last prompt position and of each decode step, [STEPS + 1, B, V]."""
    model.set_attn_implementation(implementation)
    batch, width = len(PROMPT_LENS), max(PROMPT_LENS)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(1, 97, (batch, width), generator=g).to(DEVICE)
    new_tokens = torch.randint(1, 97, (batch, STEPS), generator=g).to(DEVICE)
    mask = torch.zeros(batch, width, dtype=torch.long, device=DEVICE)
    for b, n in enumerate(PROMPT_LENS):
        mask[b, width - n:] = 1
    cache = transformers.StaticCache(config=model.config, max_cache_len=MAX_CACHE)
    start = (mask == 0).sum(1).to(torch.int32)
    end = torch.full((batch,), width, dtype=torch.int64, device=DEVICE)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    outs = []
    with torch.no_grad():
        out = model(input_ids=prompt, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True)
        outs.append(out.logits[:, -1].float())
        next_pos = positions[:, -1:] + 1
        for step in range(STEPS):
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=DEVICE)], 1)
            end += 1
            extra = dict(rast_start=start, rast_end=end) if bounds == "kwargs" else {}
            out = model(input_ids=new_tokens[:, step:step + 1], attention_mask=mask, position_ids=next_pos,
                        past_key_values=cache, use_cache=True, **extra)
            outs.append(out.logits[:, -1].float())
            next_pos = next_pos + 1
    return torch.stack(outs)


@pytest.fixture(autouse=True)
def _register():
    register_rast_attention()


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts calls of the decode kernel from the adapter, so a silent SDPA fallback fails the test."""
    calls = []
    real = adapter.decode_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(adapter, "decode_attention", counting)
    return calls


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_matches_sdpa_and_eager(kind, kernel_calls):
    model = tiny_model(kind)
    want_sdpa = run(model, "sdpa")
    want_eager = run(model, "eager")
    torch.testing.assert_close(want_sdpa, want_eager, atol=ATOL, rtol=RTOL)  # the baselines agree
    expected_backend = "triton" if DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else "torch"
    n_layers = model.config.num_hidden_layers
    for implementation, bounds in ((RAST_DECODE, "kwargs"), (RAST_DECODE, "mask"), (RAST_DECODE_MASKLESS, "kwargs")):
        kernel_calls.clear()
        got = run(model, implementation, bounds)
        torch.testing.assert_close(got, want_sdpa, atol=ATOL, rtol=RTOL,
                                   msg=lambda m: f"{implementation} with bounds from {bounds}: {m}")
        assert kernel_calls == [expected_backend] * (STEPS * n_layers)  # every decode layer, no prefill


def test_bfloat16_qwen2(kernel_calls):
    model = tiny_model("qwen2").to(torch.bfloat16)
    want = run(model, "sdpa")
    got = run(model, RAST_DECODE_MASKLESS)
    # bf16 activations: each implementation rounds its attention output to bf16 (and the kernel rounds the
    # softmax weights to bf16 before P @ V), which moves these logits (|z| < 1) by a few bf16 ulps after 2
    # layers: 4e-3 measured on CPU, about what "eager" differs from "sdpa" by; a wrong range moves them ~0.3
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
    assert len(kernel_calls) == STEPS * model.config.num_hidden_layers


def test_dynamic_cache_without_padding(kernel_calls):
    # DynamicCache, one unpadded row: transformers skips the decode mask, so every cached key is valid
    model = tiny_model("llama")
    ids = torch.randint(1, 97, (1, 6), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    logits = {}
    for implementation in ("sdpa", RAST_DECODE):
        model.set_attn_implementation(implementation)
        cache = transformers.DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=ids[:, :4], past_key_values=cache, use_cache=True)
            step1 = model(input_ids=ids[:, 4:5], past_key_values=cache, use_cache=True).logits
            step2 = model(input_ids=ids[:, 5:6], past_key_values=cache, use_cache=True).logits
        logits[implementation] = torch.cat([step1, step2], 1)
    torch.testing.assert_close(logits[RAST_DECODE], logits["sdpa"], atol=ATOL, rtol=RTOL)
    assert len(kernel_calls) == 2 * model.config.num_hidden_layers


def run_with_4d_masks(model, implementation, pass_bounds):
    """Like an engine with its own masking: 4-D additive float masks over the whole StaticCache (transformers
    passes a 4-D mask through as is), left-padded rows, optional rast_start/rast_end. Returns [STEPS, B, V]."""
    model.set_attn_implementation(implementation)
    batch, width = len(PROMPT_LENS), max(PROMPT_LENS)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(1, 97, (batch, width), generator=g).to(DEVICE)
    new_tokens = torch.randint(1, 97, (batch, STEPS), generator=g).to(DEVICE)
    pad = torch.tensor([width - n for n in PROMPT_LENS], device=DEVICE)
    cols = torch.arange(MAX_CACHE, device=DEVICE)
    neg = torch.finfo(torch.float32).min

    def mask_for(query_positions):  # [q] absolute cache positions -> [B, 1, q, MAX_CACHE] additive mask
        allowed = (cols[None, None, :] >= pad[:, None, None]) & (cols[None, None, :] <= query_positions[None, :, None])
        return torch.where(allowed, 0.0, neg)[:, None]

    cache = transformers.StaticCache(config=model.config, max_cache_len=MAX_CACHE)
    start, end = pad.to(torch.int32), torch.full((batch,), width, device=DEVICE)
    positions = (torch.arange(width, device=DEVICE)[None, :] - pad[:, None]).clamp(min=0)
    outs = []
    with torch.no_grad():
        model(input_ids=prompt, attention_mask=mask_for(torch.arange(width, device=DEVICE)), position_ids=positions,
              past_key_values=cache, use_cache=True)
        for step in range(STEPS):
            end += 1
            extra = dict(rast_start=start, rast_end=end) if pass_bounds else {}
            out = model(input_ids=new_tokens[:, step:step + 1], attention_mask=mask_for(end[:1] - 1),
                        position_ids=(end - 1 - pad)[:, None], past_key_values=cache, use_cache=True, **extra)
            outs.append(out.logits[:, -1].float())
    return torch.stack(outs)


def test_engine_style_additive_masks(kernel_calls):
    model = tiny_model("qwen2")
    want = run_with_4d_masks(model, "sdpa", pass_bounds=False)
    got = run_with_4d_masks(model, RAST_DECODE, pass_bounds=True)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    assert len(kernel_calls) == STEPS * model.config.num_hidden_layers
    # without bounds a float mask is not interpreted: exact SDPA fallback, the kernel is not called
    kernel_calls.clear()
    got = run_with_4d_masks(model, RAST_DECODE, pass_bounds=False)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    assert kernel_calls == []


def test_maskless_requires_bounds():
    model = tiny_model("qwen2")
    model.set_attn_implementation(RAST_DECODE_MASKLESS)
    cache = transformers.StaticCache(config=model.config, max_cache_len=8)
    ids = torch.ones(1, 3, dtype=torch.long, device=DEVICE)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="rast_start"):
            model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)


def test_bounds_must_come_in_pairs():
    model = tiny_model("llama")
    model.set_attn_implementation(RAST_DECODE)
    cache = transformers.StaticCache(config=model.config, max_cache_len=8)
    ids = torch.ones(1, 3, dtype=torch.long, device=DEVICE)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        with pytest.raises(ValueError, match="rast_end"):
            model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True,
                  rast_start=torch.zeros(1, dtype=torch.int32, device=DEVICE))


def test_bounds_from_mask():
    allowed = torch.tensor([[0, 0, 1, 1, 1, 0],
                            [1, 1, 1, 1, 1, 1],
                            [0, 0, 0, 0, 0, 0],
                            [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    start, end = bounds_from_mask(allowed[:, None, None, :], 4)
    assert start.tolist() == [2, 0, 0, 5]
    assert end.tolist() == [5, 6, 0, 6]
    # a mask shared by the batch ([1, 1, 1, S]) is broadcast
    start, end = bounds_from_mask(allowed[:1, None, None, :], 3)
    assert start.tolist() == [2, 2, 2] and end.tolist() == [5, 5, 5]


def test_register_is_idempotent_and_local():
    assert register_rast_attention() == (RAST_DECODE, RAST_DECODE_MASKLESS)
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    assert AttentionInterface._global_mapping[RAST_DECODE] is adapter.rast_decode_attention
    assert RAST_DECODE_MASKLESS in AttentionMaskInterface._global_mapping
    # registering ours leaves the other implementations as they were
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    assert AttentionInterface._global_mapping["sdpa"] is sdpa_attention_forward
