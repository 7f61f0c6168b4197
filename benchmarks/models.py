"""Random-init causal LMs built from the real model configs in ``benchmarks/configs/`` (no download).

``build_model("Qwen2.5-7B", device="cuda")`` builds the module on the ``meta`` device (no memory, no
init work), materialises it with ``to_empty`` on the target device and fills every weight with a cheap
random init there, so a 7B model is ready in seconds on a GPU instead of minutes of CPU init.
Random weights give the real shapes, bytes and kernels, not real text.

Trios (base, expert, expert base) used by the decode benchmarks: :data:`TRIOS`, built by :func:`build_trio`;
the second expert pair of their two-pair runs: :data:`SECOND_PAIRS`, built by :func:`build_second_pair`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# name -> (base, expert, expert_base); the expert is an RL-tuned copy of the expert base, same architecture
TRIOS = {
    "qwen": ("Qwen2.5-7B", "Qwen2.5-1.5B", "Qwen2.5-1.5B"),
    "qwen-small": ("Qwen2.5-1.5B", "Qwen2.5-0.5B", "Qwen2.5-0.5B"),
    "llama": ("Llama-3.1-8B", "Llama-3.2-1B", "Llama-3.2-1B"),
    # the official fork's tensor-parallel example (a 70B base at TP 8 + an 8B pair); on one GPU it does not fit
    "llama-70b": ("Llama-3.1-70B", "Llama-3.1-8B", "Llama-3.1-8B"),
}

# trio -> (expert, expert_base) of a second, smaller pair: RAST's official code combines up to three pairs of
# different sizes (for a 32B base, deltas of 14B, 7B and 1.5B models), so "qwen" with its second pair is
# Qwen2.5-7B + the deltas of Qwen2.5-1.5B and Qwen2.5-0.5B. Llama 3 has no stored config under 1B
SECOND_PAIRS = {
    "qwen": ("Qwen2.5-0.5B", "Qwen2.5-0.5B"),
    "qwen-small": ("Qwen2.5-0.5B", "Qwen2.5-0.5B"),
    "llama": ("Llama-3.2-1B", "Llama-3.2-1B"),
    "llama-70b": ("Llama-3.2-1B", "Llama-3.2-1B"),
}


# real token count of each family's tokenizer (the LM heads are padded wider): Qwen2.5 151643 regular + 22
# special tokens; Llama 3 128000 regular + 256 reserved/special
TOKENIZER_LEN = {"qwen2": 151665, "llama": 128256}


def available_configs() -> list[str]:
    """Names of the stored configs (file stems in ``benchmarks/configs``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def load_config(name: str) -> PretrainedConfig:
    """The transformers config of a stored model, e.g. ``"Qwen2.5-7B"``."""
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"name: no config {name!r} in {CONFIG_DIR}; known: {available_configs()}")
    fields = json.loads(path.read_text())
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields)


def tiny_config(model_type: str = "qwen2", vocab_size: int = 512, *, hidden_size: int = 64,
                num_hidden_layers: int = 2, num_attention_heads: int = 4, num_key_value_heads: int = 2,
                intermediate_size: int = 128, tie_word_embeddings: bool = False) -> PretrainedConfig:
    """A tiny config of a real family (``"qwen2"`` or ``"llama"``) for CPU smoke runs."""
    if model_type not in ("qwen2", "llama"):
        raise ValueError(f"model_type: expected 'qwen2' or 'llama', got {model_type!r}")
    return AutoConfig.for_model(
        model_type, vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size, max_position_embeddings=4096, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=0, eos_token_id=1, pad_token_id=0)


def _reset_rotary_buffers(model: torch.nn.Module) -> None:
    """Recompute the rotary embeddings' non-persistent buffers (``inv_freq``...), which ``to_empty`` leaves
    uninitialised: build a fresh instance of each such module on the CPU (cheap) and copy its buffers."""
    for module in model.modules():
        own = dict(module.named_buffers(recurse=False))
        if not own:
            continue
        if not hasattr(module, "config"):
            raise RuntimeError(f"{type(module).__name__} holds buffers {sorted(own)} that models.py cannot rebuild")
        with torch.device("cpu"):
            fresh = type(module)(config=module.config)
        for name, buf in fresh.named_buffers(recurse=False):
            own[name].copy_(buf)


def _materialise(model: PreTrainedModel, device, share_layers: bool) -> None:
    """Allocate a meta-device model's tensors on ``device`` (uninitialised); with ``share_layers``, the first
    decoder layer's only, which every other layer then holds (``to_empty`` would give each its own)."""
    if not share_layers:
        model.to_empty(device=device)
        return
    layers = model.model.layers
    layers[0].to_empty(device=device)
    first = dict(layers[0].named_parameters())
    for layer in layers[1:]:
        for name, param in first.items():
            owner, _, attr = name.rpartition(".")
            setattr(layer.get_submodule(owner), attr, param)
    in_layers = {id(m) for m in layers.modules()}
    for module in model.modules():
        if id(module) not in in_layers:
            module.to_empty(device=device, recurse=False)


def build_model(config: str | PretrainedConfig, *, device="cpu", dtype=torch.bfloat16, seed: int = 0,
                std: float | None = None, share_layers: bool = False) -> PreTrainedModel:
    """A random-init causal LM in eval mode on ``device`` with weights in ``dtype``.

    ``config``: a stored config name (:func:`available_configs`) or a transformers config. Weights are
    drawn from N(0, std) (default: the config's ``initializer_range``), norm weights are 1, biases 0;
    this is not the model's own init (which is slow on CPU for billions of parameters) but gives logits of
    a sane scale. ``seed`` makes the weights reproducible on a given device.

    ``share_layers``: every decoder layer holds the first layer's weight tensors, so the model takes one layer's
    memory. Only for a model an engine shards for tensor parallelism, which copies each layer's shard into its
    own storage: a rank then never holds the whole model (a 70B base does not fit one GPU before sharding).
    """
    if isinstance(config, str):
        config = load_config(config)
    std = float(getattr(config, "initializer_range", 0.02) if std is None else std)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _materialise(model, device, share_layers)
    model.tie_weights()  # to_empty gives each parameter its own storage; tied embeddings must share again
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied weight appears once here
            if name.endswith("bias"):
                param.zero_()
            elif param.dim() == 1:  # RMSNorm weights
                param.fill_(1.0)
            else:
                param.normal_(0.0, std, generator=gen)
    _reset_rotary_buffers(model)
    return model.eval()


# the tiny trio of CPU smoke runs: (vocab width, name) of base, expert, expert base. Different padded widths,
# as Qwen2.5-7B (152064) vs 1.5B (151936): the sampler sees the narrower vocab_size = 480
TINY_TRIO = ((512, "tiny-qwen2-v512"), (480, "tiny-qwen2-v480"), (480, "tiny-qwen2-v480"))
# the tiny trio's second pair: another width again, still above the vocabulary of 470
TINY_SECOND_PAIR = ((488, "tiny-qwen2-v488"), (488, "tiny-qwen2-v488"))


def build_trio(trio: str | None, device="cpu", dtype=torch.bfloat16,
               share_layers=(False, False, False)) -> tuple[list[PreTrainedModel], list[str]]:
    """``(models, names)``: the base, expert and expert base of :data:`TRIOS` ``[trio]`` on ``device`` in
    ``dtype`` (seeds 0, 1, 2), or with ``trio=None`` the tiny Qwen2-family trio :data:`TINY_TRIO` (std 0.1).
    ``share_layers``: :func:`build_model`'s flag for each of the three."""
    if trio is not None and trio not in TRIOS:
        raise ValueError(f"trio: expected None or one of {sorted(TRIOS)}, got {trio!r}")
    return _build(TINY_TRIO if trio is None else TRIOS[trio], device, dtype, first_seed=0, share_layers=share_layers)


def build_second_pair(trio: str | None, device="cpu", dtype=torch.bfloat16,
                      share_layers=(False, False)) -> tuple[list[PreTrainedModel], list[str]]:
    """``(models, names)``: the expert and expert base of :data:`SECOND_PAIRS` ``[trio]`` (seeds 3, 4: after the
    trio's), or with ``trio=None`` the tiny trio's :data:`TINY_SECOND_PAIR`."""
    if trio is not None and trio not in SECOND_PAIRS:
        raise ValueError(f"trio: expected None or one of {sorted(SECOND_PAIRS)}, got {trio!r}")
    return _build(TINY_SECOND_PAIR if trio is None else SECOND_PAIRS[trio], device, dtype, first_seed=3,
                  share_layers=share_layers)


def _build(specs, device, dtype, first_seed: int, share_layers) -> tuple[list[PreTrainedModel], list[str]]:
    """Models of stored config names, or of tiny ``(vocab width, name)`` specs (std 0.1), seeds counting up."""
    if isinstance(specs[0], str):
        configs, names, std = list(specs), list(specs), None
    else:
        configs, names, std = [tiny_config("qwen2", width) for width, _ in specs], [n for _, n in specs], 0.1
    return [build_model(c, device=device, dtype=dtype, seed=first_seed + i, std=std, share_layers=share)
            for i, (c, share) in enumerate(zip(configs, share_layers))], names


_LAYER = re.compile(r"\.layers\.(\d+)\.")


def weight_bytes(*models: torch.nn.Module) -> int:
    """Bytes of all distinct parameter storages of the models (tied weights counted once): what one
    decode step must read at least once. A decoder layer's weights count in every layer (``share_layers``
    builds hold one copy for all of them only until an engine shards them)."""
    seen, total = set(), 0
    for model in models:
        for name, p in model.named_parameters(remove_duplicate=False):
            layer = _LAYER.search(f".{name}")
            key = (p.device, p.data_ptr(), layer and layer.group(1))
            if key not in seen:
                seen.add(key)
                total += p.numel() * p.element_size()
    return total


def placeholder_tokenizer(n_tokens: int, eos_token_id: int | None = None):
    """A stand-in tokenizer of ``n_tokens`` ids (token ``i`` is the word ``<t{i}>``) for random-init
    models, whose real tokenizers cannot be downloaded here; ``len()`` gives the real vocabulary size,
    which is what the engine and the sampler use. ``eos_token_id`` (default: the last id) is its EOS."""
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if n_tokens < 2:
        raise ValueError(f"n_tokens: must be >= 2, got {n_tokens}")
    eos = n_tokens - 1 if eos_token_id is None else eos_token_id
    if not 0 <= eos < n_tokens:
        raise ValueError(f"eos_token_id: must be in [0, {n_tokens}), got {eos}")
    tok = Tokenizer(tok_models.WordLevel({f"<t{i}>": i for i in range(n_tokens)}, unk_token="<t0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"<t{eos}>", pad_token=f"<t{eos}>")
