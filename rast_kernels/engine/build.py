"""Building an engine: models, tokenizer, sharding, the fast-path policy, the KV pool, lanes and runner.

Owns :func:`build_engine`, which turns the model specs and an :class:`~.config.EngineConfig` into a
:class:`Parts` value (everything :class:`~.engine.RastEngine` serves requests with). Every check that can fail
runs before anything large is allocated: role and device agreement, one tokenizer (the same token-id mapping
everywhere), embedding widths, supported families for the fused decode forward. A model given in several roles
(the same object, or the same path, e.g. ``expert=base`` for contrastive decoding) is loaded once and becomes one
lane that runs once per step.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from .. import _backends
from ..params import ParamError
from ..parallel.tensor_parallel import agree, engine_context, full_width, is_model_sharded, shard_model
from .block_manager import BlockAllocator
from .config import EngineConfig
from .fused_decode import onednn_linear_available, unsupported_reason
from .lanes import kv_geometry, make_lane
from .loading import (check_sliding_window, check_tokenizers, find_model_tokenizer, load_model, load_tokenizer,
                      model_identity, model_vocab_widths, resolve_devices, resolve_dtype, role_names)
from .memory import PoolSizing, measure_peaks, pool_tokens, probe
from .runner import PREFILL_CHUNK_TOKENS, StepRunner
from .sampling_params import MAX_EOS_IDS
from .speculative import Speculation

CPU_FUSED_MIN_BYTES = 256 << 20  # weights from which the fused decode forward is the CPU default (cpu_fused_pays_off)


@dataclass
class Parts:
    """What :func:`build_engine` made (attribute names as :class:`~.engine.RastEngine` exposes them)."""

    config: EngineConfig
    roles: tuple
    num_pairs: int
    devices: Dict[str, torch.device]
    device: torch.device
    models: dict
    shared: dict
    lane_roles: tuple
    attn: dict
    tokenizer: object
    vocab_size: int
    default_eos: List[int]
    parallel: object
    fused_decode: bool
    use_cuda_graph: bool
    overlap_models: bool
    allocator: BlockAllocator = None
    runner: StepRunner = None
    pool_sizing: Optional[PoolSizing] = None
    speculation: Optional[Speculation] = None


def pair_specs(expert, expert_base) -> tuple:
    """``(experts, expert_bases)``: two lists of K model specs (K = 0: the base alone)."""
    if (expert is None) != (expert_base is None):
        raise ValueError("expert, expert_base: give both (RAST) or neither (the base model alone)")
    if expert is None:
        return [], []
    many = [isinstance(x, (list, tuple)) for x in (expert, expert_base)]
    if many[0] != many[1]:
        raise ValueError("expert, expert_base: give two lists of the same length (one entry per pair) or two models")
    if not many[0]:
        return [expert], [expert_base]
    if len(expert) != len(expert_base):
        raise ValueError(f"expert, expert_base: the lists must pair up, got {len(expert)} experts and "
                         f"{len(expert_base)} expert bases")
    if not expert:
        raise ValueError("expert, expert_base: empty lists; give at least one pair, or None for the base alone")
    return list(expert), list(expert_base)


def build_engine(base, expert, expert_base, cfg: EngineConfig) -> Parts:
    """Load, check and assemble an engine's parts (module docstring)."""
    parallel = engine_context(cfg.tensor_parallel_size)  # None: one process, nothing sharded
    if cfg.shard_experts and parallel is None:
        raise ParamError("shard_experts", "needs tensor parallelism (tensor_parallel_size > 1 under torchrun, or "
                                          "RAST_FORCE_PG=1); nothing would be sharded")
    devices_spec = parallel.device if parallel is not None and cfg.devices is None else cfg.devices
    experts, expert_bases = pair_specs(expert, expert_base)
    roles = role_names(len(experts))
    devices = resolve_devices(devices_spec, roles)
    if parallel is not None and devices["base"] != parallel.device:
        raise ValueError(f"devices: under tensor parallelism the base model lives on this rank's device "
                         f"{parallel.device}, got {devices['base']}")
    specs = dict(zip(roles, [base] + [m for pair in zip(experts, expert_bases) for m in pair]))
    models, shared, lane_roles = _load_models(specs, roles, devices, cfg)
    tokenizer = _shared_tokenizer(cfg.tokenizer, specs, models, lane_roles)
    vocab_size = len(tokenizer)
    _check_widths(models, lane_roles, vocab_size, parallel)
    if parallel is not None:  # before the lanes: their KV pools and fused decoders see the shards
        for role in lane_roles:
            if role == "base" or cfg.shard_experts:
                shard_model(models[role], parallel, role)
    device = devices["base"]
    one_device = len({devices[r] for r in roles}) == 1
    parts = Parts(config=cfg, roles=roles, num_pairs=len(experts), devices=devices, device=device, models=models,
                  shared=shared, lane_roles=lane_roles,
                  attn={r: models[r].config._attn_implementation for r in roles}, tokenizer=tokenizer,
                  vocab_size=vocab_size, default_eos=_model_eos_ids(tokenizer, models["base"], vocab_size),
                  parallel=parallel, fused_decode=_fused_policy(cfg.fused_decode, models, lane_roles, device),
                  use_cuda_graph=bool(cfg.use_cuda_graph and device.type == "cuda" and one_device),
                  # (sharded experts' collectives on side streams could interleave differently on other ranks)
                  overlap_models=bool(cfg.overlap_models and device.type == "cuda" and one_device
                                      and len(lane_roles) > 1 and not (parallel is not None and cfg.shard_experts)
                                      and not cfg.speculative_tokens))  # a round orders its lanes itself
    lane_of = {role: lane_roles.index(shared.get(role, role)) for role in roles}
    # (expert lane, expert-base lane) per pair; the base alone samples base + alpha * (base - base) == base
    pairs = [(lane_of[e], lane_of[eb]) for e, eb in zip(roles[1::2], roles[2::2])] or [(0, 0)]
    if cfg.speculative_tokens:
        parts.speculation = Speculation.for_pairs(cfg.speculative_tokens, cfg.speculative_draft, pairs)
    _size_pool(parts, pairs)
    parts.runner = _make_runner(parts, parts.allocator.num_blocks, pairs, cfg)
    parts.runner.warm_up()
    return parts


def _load_models(specs, roles, devices, cfg: EngineConfig):
    models, shared, first_of = {}, {}, {}
    for role in roles:
        key = model_identity(specs[role])
        if key in first_of:
            first = first_of[key]
            if devices[role] != devices[first]:
                raise ValueError(f"devices: {role} is the same model as {first} but is placed on "
                                 f"{devices[role]}, not {devices[first]}")
            models[role], shared[role] = models[first], first
            continue
        first_of[key] = role
        dev = devices[role]
        models[role] = load_model(specs[role], role, dev, resolve_dtype(cfg.dtype, dev), cfg.attn_implementation)
        check_sliding_window(models[role], role, cfg.max_seq_len)
    return models, shared, tuple(first_of.values())


def _shared_tokenizer(given, specs, models, lane_roles):
    found = {}
    if given is not None:
        found["the given"] = load_tokenizer(given, "tokenizer")
    for role in lane_roles:
        found[role] = find_model_tokenizer(specs[role], models[role])
    check_tokenizers(found)
    tokenizer = next((t for t in found.values() if t is not None), None)
    if tokenizer is None:
        raise ValueError("tokenizer: none given and none found with the models; pass tokenizer=...")
    return tokenizer


def _check_widths(models, lane_roles, vocab_size: int, parallel) -> None:
    for role in lane_roles:
        model = models[role]
        if parallel is None and is_model_sharded(model):
            raise ValueError(f"{role}: this model object was sharded in place by a tensor-parallel engine; "
                             "give a fresh copy")
        n_in, n_out = model_vocab_widths(model)
        n_out = full_width(model.get_output_embeddings(), n_out)  # a sharded head gathers the whole vocabulary
        if min(n_in, n_out) < vocab_size:
            raise ValueError(f"{role}: embedding / LM-head widths ({n_in}, {n_out}) are smaller than the "
                             f"tokenizer's {vocab_size} tokens")


def _model_eos_ids(tokenizer, base_model, vocab_size: int) -> list:
    ids = []
    cands = [getattr(tokenizer, "eos_token_id", None),
             getattr(getattr(base_model, "generation_config", None), "eos_token_id", None)]
    for c in cands:
        for i in (c if isinstance(c, (list, tuple)) else [c]):
            if i is not None and 0 <= int(i) < vocab_size and int(i) not in ids:
                ids.append(int(i))
    return ids[:MAX_EOS_IDS]


def _fused_policy(fused_decode, models, lane_roles, device) -> bool:
    reasons = {role: unsupported_reason(models[role]) for role in lane_roles}
    if fused_decode is None:
        return not any(reasons.values()) and (
            _backends.has_triton() if device.type == "cuda" else cpu_fused_pays_off(models, lane_roles))
    if fused_decode:
        for role, why in reasons.items():
            if why is not None:
                raise ValueError(f"{role}: fused_decode=True does not support this model: {why}")
    return fused_decode


def cpu_fused_pays_off(models, lane_roles) -> bool:
    """On CPU the fused forward (with oneDNN linears) wins where reading the weights dominates a step: float32
    models of at least :data:`CPU_FUSED_MIN_BYTES` in all. Measured on the 2-core development VM
    (``benchmarks/RESULTS.md``): Qwen2.5-1.5B + 2 x 0.5B 463 vs 752 ms per step at B=1; the 4 MB toy trio
    5.1 vs 3.4 ms (per-op overhead dominates there)."""
    params = [p for r in lane_roles for p in models[r].parameters()]
    return all(p.dtype == torch.float32 for p in params) and onednn_linear_available() and \
        sum(p.numel() * p.element_size() for p in params) >= CPU_FUSED_MIN_BYTES


def _make_runner(parts: Parts, num_blocks: int, pairs, cfg: EngineConfig, use_cuda_graph=None) -> StepRunner:
    lanes = [make_lane(role, parts.models[role], parts.devices[role], parts.attn[role], num_blocks, cfg.block_size,
                       cfg.max_seq_len, parts.fused_decode) for role in parts.lane_roles]
    max_blocks = -(-cfg.max_seq_len // cfg.block_size)
    sync = None if parts.parallel is None else functools.partial(agree, parts.parallel)
    return StepRunner(lanes, cfg.max_batch_size, max_blocks, cfg.block_size, cfg.max_seq_len, parts.vocab_size,
                      parts.use_cuda_graph if use_cuda_graph is None else use_cuda_graph, parts.overlap_models,
                      cfg.diagnostics, pairs=pairs, token_sync=sync, speculation=parts.speculation)


def _size_pool(parts: Parts, pairs) -> None:
    """Set ``parts.allocator`` and ``parts.pool_sizing`` (the :mod:`.memory` rules)."""
    cfg = parts.config
    per_token = sum(2 * layers * kv * dim * next(parts.models[r].parameters()).element_size()
                    for r in parts.lane_roles for layers, kv, dim in [kv_geometry(parts.models[r])])
    cap = cfg.max_batch_size * cfg.max_seq_len
    mem = None if cfg.kv_cache_tokens is not None else probe(parts.device)
    if cfg.kv_cache_tokens is not None:
        sizing = PoolSizing("given", cfg.kv_cache_tokens, per_token)
    elif mem is None:
        sizing = PoolSizing("cap", cap, per_token)
    else:
        sizing = _measure(parts, pairs, mem, per_token, cap)
    sizing.local_tokens = sizing.tokens
    if parts.parallel is not None and parts.parallel.tp_size > 1:
        sizing.tokens = _group_min(sizing.tokens, parts.parallel, parts.device)
    if sizing.tokens < cfg.block_size:
        raise ParamError("kv_cache_tokens", f"no room for a KV pool on {parts.device}: {sizing.as_dict()}; pass "
                                            "kv_cache_tokens or lower max_batch_size / max_seq_len")
    parts.pool_sizing = sizing
    parts.allocator = BlockAllocator(sizing.tokens // cfg.block_size, cfg.block_size)


def _measure(parts: Parts, pairs, mem, per_token: int, cap: int) -> PoolSizing:
    cfg = parts.config
    runner = _make_runner(parts, 1, pairs, cfg, use_cuda_graph=False)  # tiny pools: the peak is the activations
    prefill_peak, decode_peak = measure_peaks(runner, mem, min(PREFILL_CHUNK_TOKENS, cfg.max_seq_len))
    del runner
    if parts.device.type == "cuda":
        torch.cuda.empty_cache()
    free, total = mem.mem_get_info()
    graphs = decode_peak if parts.use_cuda_graph else 0
    peak = max(prefill_peak, decode_peak)
    tokens, budget = pool_tokens(total, free, cfg.gpu_memory_utilization, peak, graphs, per_token, cfg.block_size,
                                 cap)
    return PoolSizing("measured", tokens, per_token, total=total, free=free, utilization=cfg.gpu_memory_utilization,
                      prefill_peak=prefill_peak, decode_peak=decode_peak, graph_reserve=graphs, budget=budget)


def _group_min(tokens: int, parallel, device) -> int:
    """The smallest ``tokens`` over the TP group (every rank must size its pool alike)."""
    import torch.distributed as dist

    t = torch.tensor([tokens], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=parallel.tp_group)
    return int(t.item())
