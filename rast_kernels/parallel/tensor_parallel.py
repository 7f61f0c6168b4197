"""Tensor parallelism for the engine's models: Megatron-style sharding of a Llama-family decoder across a TP group.

Layout (per decoder layer; the pattern of gpt-fast's ``tp.py``, Megatron-LM's column/row-parallel pairs):

==========================================  =========================================================
``q_proj``, ``k_proj``, ``v_proj``          column-parallel by heads: rank r keeps heads
                                            ``[r H/N, (r+1) H/N)`` and KV heads ``[r H_kv/N, ...)``
``o_proj``                                  row-parallel (its input features by the same heads), then
                                            an all-reduce (sum) of the ``[b, hidden]`` output
``gate_proj``, ``up_proj``                  column-parallel: ``I/N`` rows each
``down_proj``                               row-parallel, then an all-reduce
``lm_head``                                 vocabulary-parallel: ``ceil(V/N)`` rows each (zero rows pad
                                            the last shard), then an all-gather and a cut back to ``V``
embedding, norms, rotary tables             replicated
==========================================  =========================================================

so a step costs two all-reduces of ``[b, hidden]`` per layer and one all-gather of the logits. The config's
``num_attention_heads``, ``num_key_value_heads`` and ``intermediate_size`` become the per-rank counts
(``head_dim`` is pinned first), so the KV pools (:func:`rast_kernels.engine.lanes.kv_geometry`) hold this
rank's KV heads only, and transformers' attention (which reshapes with ``-1`` heads) runs on the shard as is.

Why sharding here rather than transformers' ``tp_plan``: one code path and a capturable step. The shards are
plain ``nn.Linear`` weights, so the same tensors serve transformers' forward (prefill, and decode where the fused
forward is off) and the engine's :class:`~rast_kernels.engine.fused_decode.FusedDecoder` (which feeds raw weights
to oneDNN / Triton kernels and concatenates q/k/v into one tensor: DTensor parameters fit neither), and the
collectives are one function, :func:`finish_projection`, called by a forward hook on the module (transformers'
path) or by the fused forward after its own GEMM. They are plain ``torch.distributed`` calls on the TP group, which
NCCL lets a CUDA graph capture (``tp_plan``'s DTensor dispatch adds host work per op). ``tp_plan`` also shards
only at ``from_pretrained`` time; the engine takes loaded models too.

Every rank samples from the same gathered logits, and the TP leader's tokens (and log-probabilities) are then
broadcast to its group (:func:`agree`), so every rank's state stays identical even where replicated experts'
kernels are not bit-reproducible across devices: one ``int64`` and one ``float32`` per row and step.
"""
from __future__ import annotations

import os
import weakref
from typing import Optional

import torch
from torch import nn

from . import groups
from .groups import ParallelContext

_FAMILIES = ("llama", "qwen2", "mistral")
# module -> ("reduce", group) or ("gather", group, size, vocab): what finish_projection does after its GEMM
_SHARDED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
# model -> (tp_size, tp_rank, group) it was sharded for (sharding is in place: a second engine finds it so)
_MODELS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
# The torch.distributed function of the vocabulary all-gather: torch >= 2.13 names it all_gather_single, the GPU
# machine's 2.11 has only all_gather_into_tensor (same arguments). None: all_gather_single where this torch has it;
# a name forces that one (tests/parallel/test_all_gather.py runs both on one torch).
ALL_GATHER: Optional[str] = None


def shard_reason(model, tp_size: int) -> Optional[str]:
    """Why ``model`` cannot be sharded ``tp_size`` ways (None when it can): a Llama, Qwen2 or Mistral causal LM of
    plain ``nn.Linear`` layers whose attention heads, KV heads and MLP width divide by ``tp_size``."""
    cfg = model.config
    if getattr(cfg, "model_type", None) not in _FAMILIES:
        return f"{type(model).__name__} (model_type {getattr(cfg, 'model_type', None)!r}) is not one of {_FAMILIES}"
    heads, kv = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    for name, n in (("num_attention_heads", heads), ("num_key_value_heads", kv),
                    ("intermediate_size", cfg.intermediate_size)):
        if n % tp_size:
            return f"{name}={n} does not divide by {tp_size}"
    for layer in model.model.layers:
        for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                  layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            if type(m) is not nn.Linear:
                return f"{type(m).__name__} layers (quantized or adapter-wrapped) cannot be sharded"
    if type(model.lm_head) is not nn.Linear:
        return f"its LM head is a {type(model.lm_head).__name__}, not an nn.Linear"
    return None


def _keep_rows(linear: nn.Linear, start: int, stop: int, pad_to: Optional[int] = None) -> None:
    w = linear.weight.detach()[start:stop]
    b = linear.bias.detach()[start:stop] if linear.bias is not None else None
    if pad_to is not None and w.shape[0] < pad_to:  # the last vocabulary shard: zero rows (cut after the gather)
        w = torch.cat([w, w.new_zeros(pad_to - w.shape[0], w.shape[1])])
        b = torch.cat([b, b.new_zeros(pad_to - b.shape[0])]) if b is not None else None
    linear.weight = nn.Parameter(w.clone(), requires_grad=False)  # clone: the full weight's storage is freed
    linear.out_features = w.shape[0]
    if b is not None:
        linear.bias = nn.Parameter(b.clone(), requires_grad=False)


def _keep_cols(linear: nn.Linear, start: int, stop: int, rank: int) -> None:
    linear.weight = nn.Parameter(linear.weight.detach()[:, start:stop].clone(), requires_grad=False)
    linear.in_features = stop - start
    if linear.bias is not None and rank != 0:  # a row-parallel bias is added once: by rank 0 before the sum
        linear.bias = nn.Parameter(torch.zeros_like(linear.bias), requires_grad=False)


def _hook(module, args, out):
    return finish_projection(module, out)


def shard_model(model, ctx: ParallelContext, role: str = "base") -> None:
    """Shard ``model`` in place across ``ctx.tp_group`` (module docstring); ``ValueError`` naming
    ``tensor_parallel_size`` and ``role`` when :func:`shard_reason` refuses it. Call it once, before the engine
    builds its lanes (KV pools, fused decoder)."""
    n, r, group = ctx.tp_size, ctx.tp_rank, ctx.tp_group
    prior = _MODELS.get(model)
    if prior is not None:  # an earlier engine sharded this very object
        if prior[0] == n and prior[1] == r and prior[2] is group:
            return  # already this rank's shard, hooks in place
        raise ValueError(f"tensor_parallel_size: {role} was already sharded {prior[0]} ways by another engine; "
                         "give a fresh copy of the model")
    why = shard_reason(model, n)
    if why is not None:
        raise ValueError(f"tensor_parallel_size: {role} cannot be sharded {n} ways: {why}")
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    inter = cfg.intermediate_size
    hq, hk, ni = heads // n, kv // n, inter // n
    with torch.no_grad():
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            _keep_rows(attn.q_proj, r * hq * d, (r + 1) * hq * d)
            _keep_rows(attn.k_proj, r * hk * d, (r + 1) * hk * d)
            _keep_rows(attn.v_proj, r * hk * d, (r + 1) * hk * d)
            _keep_cols(attn.o_proj, r * hq * d, (r + 1) * hq * d, r)
            _keep_rows(mlp.gate_proj, r * ni, (r + 1) * ni)
            _keep_rows(mlp.up_proj, r * ni, (r + 1) * ni)
            _keep_cols(mlp.down_proj, r * ni, (r + 1) * ni, r)
            for m in (attn.o_proj, mlp.down_proj):
                _SHARDED[m] = ("reduce", group)
                m.register_forward_hook(_hook)
            for name, value in (("num_heads", hq), ("num_key_value_heads", hk)):
                if hasattr(attn, name):  # older transformers keep the counts on the module too
                    setattr(attn, name, value)
        head = model.lm_head
        vocab = head.out_features
        size = -(-vocab // n)
        model.config.tie_word_embeddings = False  # the head's shard is its own tensor now; the embedding stays whole
        _keep_rows(head, r * size, min((r + 1) * size, vocab), pad_to=size)
        _SHARDED[head] = ("gather", group, n, vocab)
        head.register_forward_hook(_hook)
    cfg.head_dim = d
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size = hq, hk, ni
    _MODELS[model] = (n, r, group)


def is_model_sharded(model) -> bool:
    """Whether :func:`shard_model` sharded ``model`` (in place) in this process."""
    return model in _MODELS


def full_width(module, width: int) -> int:
    """The output width a layer's collective gives (a vocabulary shard's: the whole vocabulary), else ``width``."""
    spec = _SHARDED.get(module)
    return spec[3] if spec is not None and spec[0] == "gather" else width


def is_sharded(module) -> bool:
    """Whether :func:`shard_model` made ``module`` a row-parallel or vocabulary-parallel layer."""
    return module in _SHARDED


def finish_projection(module, out: torch.Tensor) -> torch.Tensor:
    """The collective that completes a sharded layer's output ``out`` (``[..., features]``): the all-reduce of a
    row-parallel layer's partial sums (in place), the all-gather of a vocabulary shard into ``[..., V]``;
    ``out`` itself for any other module. Device ops only (graph-capturable on NCCL)."""
    spec = _SHARDED.get(module)
    if spec is None:
        return out
    import torch.distributed as dist

    if spec[0] == "reduce":
        dist.all_reduce(out, group=spec[1])
        return out
    _, group, n, vocab = spec
    lead, width = out.shape[:-1], out.shape[-1]
    shard = out.reshape(-1, width).contiguous()                    # [rows, V/N]
    parts = shard.new_empty((n * shard.shape[0], width))           # the ranks' shards one after another
    gather = getattr(dist, ALL_GATHER or ("all_gather_single" if hasattr(dist, "all_gather_single")
                                          else "all_gather_into_tensor"))
    gather(parts, shard, group=group)
    full = parts.view(n, -1, width).transpose(0, 1).reshape(-1, n * width)[:, :vocab]
    return full.reshape(*lead, vocab)


def agree(ctx: ParallelContext, *tensors: torch.Tensor) -> None:
    """Overwrite ``tensors`` on every rank of the TP group with the TP leader's (in place; a broadcast each)."""
    import torch.distributed as dist

    leader = ctx.dp_rank * ctx.tp_size  # global rank of this group's tp_rank 0
    for t in tensors:
        dist.broadcast(t, src=leader, group=ctx.tp_group)


def engine_context(tensor_parallel_size: Optional[int]) -> Optional[ParallelContext]:
    """The context a :class:`~rast_kernels.engine.RastEngine` shards its base model with, or None for no tensor
    parallelism. ``tensor_parallel_size`` None: the context :func:`~.groups.init_parallel` already made, else, under
    torchrun, the world size; an int: :func:`~.groups.init_parallel` of that size. Tensor parallelism runs when the
    TP group has more than one rank, or as a real one-rank group (``RAST_FORCE_PG=1``: the code path on one GPU)."""
    ctx = groups.current()
    if ctx is None:
        if not (groups.launched() or groups.group_forced()) and tensor_parallel_size in (None, 1):
            return None  # one plain process: leave the process-group state alone
        if tensor_parallel_size is None and groups.launched():
            tensor_parallel_size = int(os.environ["WORLD_SIZE"])
    ctx = groups.init_parallel(tensor_parallel_size)
    return ctx if ctx.distributed and (ctx.tp_size > 1 or ctx.world_size == 1) else None
