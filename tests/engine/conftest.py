"""Tiny random-init models and a small byte-level BPE tokenizer for the engine tests (CPU, fp32)."""
from __future__ import annotations

import pytest
import torch

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine; the early bird gets the worm",
    "héllo wörld, naïve café — déjà vu",
    "日本語のテキスト と 中文 文本 混合",
    "numbers 0123456789 and symbols !?.,;:()[]{}",
] * 4


def make_tokenizer(extra_corpus=()):
    """A byte-level BPE tokenizer (~300 tokens, ids stable for a given corpus) with an ``<|endoftext|>``
    EOS token (what Qwen2Tokenizer expects, so AutoTokenizer adds nothing when it picks that class);
    it adds no BOS, so ``""`` has no tokens. Multi-byte characters can span several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(CORPUS) + list(extra_corpus), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")


def make_model(family: str, vocab: int, seed: int, **over):
    from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                              Qwen2ForCausalLM)

    torch.manual_seed(seed)
    kw = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
              eos_token_id=0, bos_token_id=None, pad_token_id=1,
              # weights 10x the default scale: attention (hence positions, masks, the KV cache) then moves
              # the logits by O(1), so cache/position bugs change tokens instead of hiding under the
              # residual stream; logits keep std ~1, so sampling stays diverse
              initializer_range=0.2)
    kw.update(over)
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**kw))
    elif family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kw))
    elif family == "mistral":  # head_dim 16 != hidden / heads: the head width is the config's, not derived
        model = MistralForCausalLM(MistralConfig(**{"sliding_window": None, "head_dim": 16, **kw}))
    else:
        raise ValueError(family)
    return model.eval()


# different padded LM-head widths, all >= len(tokenizer)
WIDTHS = {"base": 320, "expert": 304, "expert_base": 312}

# prompts of mixed lengths and scripts: the whole-engine workloads (test_serving.py, test_speculative.py)
PROMPTS = ["the quick brown fox", "héllo", "a stitch in time saves nine; the early bird gets the worm", "日本語",
           "numbers 0123", "the lazy dog", "symbols !?", "a"]


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


def _save_trio(root, family, tokenizer, seeds=(1, 2, 3)):
    paths = {}
    for (role, width), seed in zip(WIDTHS.items(), seeds):
        model = make_model(family, width, seed)
        path = root / f"{family}_{role}"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[role] = str(path)
    return paths


@pytest.fixture(scope="session")
def qwen_paths(tmp_path_factory, tokenizer):
    return _save_trio(tmp_path_factory.mktemp("qwen"), "qwen2", tokenizer)


@pytest.fixture(scope="session")
def llama_paths(tmp_path_factory, tokenizer):
    return _save_trio(tmp_path_factory.mktemp("llama"), "llama", tokenizer, seeds=(4, 5, 6))
