"""``RastEngine``: the base, the expert and the expert base decoded in lockstep, serving requests continuously.

Every decode step the three models read the same token per row, :func:`rast_kernels.rast_sample` turns their three
logit rows into one token per row (``z = z_base + alpha * (z_expert - z_expert_base)``, then temperature / top-k /
top-p / min-p, each row with its own request's settings), and that token is fed back to all three.

How the pieces fit (one module per job):

* :mod:`.sampling_params` — :class:`SamplingParams`, a request's validated settings, and how a sample's seed derives
  from its request's;
* :mod:`.scheduler` — the host: waiting queue, decode slots, block accounting, admission, preemption, compaction;
* :mod:`.cache` — the paged KV cache: one block pool per model, one block table per sequence serving all three;
* :mod:`.device_step` — the device: per-slot state, prefill, the decode step and its CUDA graphs, host snapshots;
* :mod:`.detokenize` — incremental text and stop strings;
* this module — construction (models, tokenizer, pool size) and the public API: :meth:`RastEngine.add_request`,
  :meth:`~RastEngine.step`, :meth:`~RastEngine.run`, :meth:`~RastEngine.abort_request`, and
  :meth:`~RastEngine.generate` / :meth:`~RastEngine.stream` built on them.

A request's tokens depend only on its prompt, its settings and its seed (the sampler's random numbers are keyed by
``(seed, offset = token index, column)``; each row's attention reads only its own blocks): not on the arrival
order, the other requests, the slot it got, the block size, the pool size, or preemption (a preempted sequence is
recomputed from its prompt plus the tokens it had, and continues with the tokens it would have produced), up to
floating-point differences between batch shapes, which change a token only where two candidates tie to within
rounding.

The host loop (:meth:`RastEngine.step`): reserve blocks for the next ``poll_interval`` decode steps (preempting the
newest sequence when the pool runs out), launch them (graph replays on CUDA, no host synchronisation), take a
non-blocking snapshot of the rows' counts and last tokens, read the previous snapshot (on CUDA one window late, so
the GPU queue never drains), finish sequences (EOS, length, sampler error, stop string) and free their slots and
blocks at once, move the running rows to the lowest slots, and admit waiting requests (batched prefill).
"""
from __future__ import annotations

import functools
import numbers
import sys
import time
import warnings
from typing import Iterator, List, Optional

import torch

from .. import _backends
from ..ops.philox import mix_seed
from ..parallel.tensor_parallel import agree, engine_context, full_width, is_model_sharded, shard_model
from .cache import BlockAllocator
from .detokenize import IncrementalText, final_text
from .device_step import DIAGNOSTICS, EOS, ERROR, LENGTH, RING, StepRunner, kv_bucket, kv_geometry, make_lane
from .fused_decode import onednn_linear_available, unsupported_reason
from .loading import (check_sliding_window, check_tokenizers, find_model_tokenizer, load_model, load_tokenizer,
                      model_identity, model_vocab_widths, resolve_devices, resolve_dtype, role_names)
from .outputs import GenerationOutput
from .sampling_params import FIELDS as PARAM_FIELDS
from .sampling_params import MAX_EOS_IDS, SamplingParams, sample_seed
from .scheduler import FINISHED, RUNNING, Request, Scheduler, Sequence

_GPU_RESERVE_BYTES = 1 << 30  # kept free beyond the KV pool on CUDA: activations, graphs, the sampler workspace
CPU_FUSED_MIN_BYTES = 256 << 20  # weights from which the fused decode forward is the CPU default (_cpu_fused_pays_off)


def _int_arg(name, value, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name}: must be >= {low}, got {value}")
    return int(value)


def _pair_specs(expert, expert_base) -> tuple:
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


class RastEngine:
    """Three causal LMs decoded in lockstep with the fused RAST sampler, from a paged KV cache.

    Parameters
    ----------
    base, expert, expert_base : str, os.PathLike or transformers.PreTrainedModel
        Model id / local path (``AutoModelForCausalLM``; ``HF_HUB_OFFLINE`` is honoured) or a loaded model, which
        is moved/cast **in place**, put in eval mode and switched to its attention implementation (with
        ``fused_decode``, its q/k/v and gate/up weights also become row views of one concatenated tensor each:
        same values, no extra memory). ``expert=None, expert_base=None`` decodes the base model alone with the
        same machinery (the baseline RAST is measured against). ``expert`` and ``expert_base`` may also be two
        lists of K models (K expert pairs: ``z = z_base + sum_i alpha_i * (z_expert_i - z_expert_base_i)``; roles
        ``expert[i]`` / ``expert_base[i]``). A model given in several roles (the same object, or the same path,
        e.g. ``expert=base`` for contrastive decoding) is loaded once and run once per step. Models of different
        families are fine as long as they share the tokenizer's token-id mapping and their embedding / LM-head
        widths are ``>= len(tokenizer)``.
    tokenizer : tokenizer, str or None
        The shared tokenizer (object, id or path). Default: the one saved with the models; every tokenizer found
        must map the same tokens to the same ids, else ``ValueError`` naming the first difference.
    dtype : torch.dtype, str or None
        None: bfloat16 on CUDA; on CPU a loaded model keeps its dtype and a path loads in float32.
    devices : None, device or dict
        ``{"base": ..., "expert": ..., "expert_base": ...}`` (with several pairs also ``"expert[i]"`` keys;
        ``"expert"`` / ``"expert_base"`` then apply to every pair); default: all on the first GPU, else CPU. Logit rows
        are moved to the base model's device for sampling; models on different devices run eagerly.
    max_batch_size : int
        Decode slots: sequences decoded at once (more requests wait in the queue).
    max_seq_len : int
        Per-sequence limit: prompt + ``max_new_tokens`` must fit (equal is fine). At least 2.
    kv_cache_tokens : int or None
        Token slots of each model's KV block pool. Default on CUDA: what fits in
        ``gpu_memory_utilization * total memory`` after the weights and 1 GiB of headroom, at most
        ``max_batch_size * max_seq_len``; on CPU: ``max_batch_size * max_seq_len``.
    block_size : int
        Token slots per KV block (default 16).
    gpu_memory_utilization : float
        In ``(0, 1]``: the share of the GPU's memory the engine may fill (CUDA pool default only).
    scheduling : {"continuous", "static"}
        ``"continuous"`` (default): requests join and leave the running batch at every poll; ``"static"``: the
        fixed-batch behaviour (a batch runs to its end, each sequence holds ``max_seq_len`` slots), kept as the
        baseline of ``benchmarks/bench_serving.py``.
    max_prefill_tokens : int or None
        Padded prompt tokens per batched prefill (default ``max(2048, max_seq_len)``).
    use_cuda_graph : bool
        Capture the decode step in CUDA graphs (CUDA only, all models on one device).
    attn_implementation : {None, "rast_decode", "sdpa", "eager"}
        The attention transformers' forward uses (prompts always; decode steps without ``fused_decode``). None:
        per model, the best its class supports (:func:`~.loading.choose_attn_implementation`); a name the class
        refuses is a ``ValueError`` naming the role.
    fused_decode : bool or None
        Decode steps through :class:`~rast_kernels.engine.fused_decode.FusedDecoder` (the models' own weights,
        fused residual-add + RMSNorm, rotary + cache write, SiLU-mul and the paged decode-attention kernel). None
        (default): on when every model is a supported family (Llama, Qwen2, Mistral) and, on CUDA, Triton is
        importable; on CPU, when the models are float32 and weigh at least 256 MB together (there the decoder runs
        its linear layers through oneDNN, which reads the weights about 1.7x faster than PyTorch's MKL ``linear``
        on the development VM; for smaller models per-op overhead dominates and transformers' forward is faster).
        True requires it (``ValueError`` naming an unsupported model; on CPU the other ops are PyTorch's);
        False: transformers' forward over a gathered view of the blocks.
    overlap_models : bool
        Run the expert's and the expert base's decode forwards on their own CUDA streams (joined before the
        sampler). CUDA with all models on one device only; ignored otherwise. Default off until measured.
    tensor_parallel_size : int or None
        Shard the base model over this many ranks (a torchrun launch with a multiple of it as the world size;
        :mod:`rast_kernels.parallel.tensor_parallel`: heads and MLP columns split, two all-reduces per layer, a
        vocabulary-parallel LM head). None: the size :func:`rast_kernels.parallel.init_parallel` set up, else the
        world size under torchrun, else 1 (no sharding). Every rank of a TP group makes the same engine calls and
        gets the same outputs. Llama, Qwen2 and Mistral models; ``RAST_FORCE_PG=1`` runs the path as a one-rank
        group (a check on one GPU).
    shard_experts : bool
        Under tensor parallelism, shard the experts and expert bases too (default: replicated on every rank; the
        modelled trade-off is in ``benchmarks/RESULTS.md``: replication wins for small experts, sharding for an
        8B pair at TP 8).
    diagnostics : bool
        Record per generated token, on the device inside the step (no host synchronisation), whether the delta
        moved the argmax relative to the base alone, ``KL(p_base || p_rast)`` at the row's temperature (1 for
        greedy rows; no filters), and the chosen token's probability under the base alone and under RAST:
        :attr:`GenerationOutput.diagnostics`. Costs two extra softmaxes over the vocabulary per row and step.
    """

    def __init__(self, base, expert, expert_base, *, tokenizer=None, dtype=None, devices=None,
                 max_batch_size: int = 8, max_seq_len: int = 4096, kv_cache_tokens: Optional[int] = None,
                 block_size: int = 16, gpu_memory_utilization: float = 0.9, scheduling: str = "continuous",
                 max_prefill_tokens: Optional[int] = None, use_cuda_graph: bool = True,
                 attn_implementation: Optional[str] = None, fused_decode: Optional[bool] = None,
                 overlap_models: bool = False, diagnostics: bool = False,
                 tensor_parallel_size: Optional[int] = None, shard_experts: bool = False):
        self.max_batch_size = _int_arg("max_batch_size", max_batch_size, 1)
        self.max_seq_len = _int_arg("max_seq_len", max_seq_len, 1)
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len: must be >= 2 (one prompt token and one new token), got {max_seq_len}")
        self.block_size = _int_arg("block_size", block_size, 1)
        if kv_cache_tokens is not None:
            kv_cache_tokens = _int_arg("kv_cache_tokens", kv_cache_tokens, self.block_size)
        self.max_prefill_tokens = max(2048, self.max_seq_len) if max_prefill_tokens is None else \
            _int_arg("max_prefill_tokens", max_prefill_tokens, 1)
        if isinstance(gpu_memory_utilization, bool) or not isinstance(gpu_memory_utilization, numbers.Real) \
                or not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization: must be a number in (0, 1], got {gpu_memory_utilization!r}")
        for name, v, none_ok in (("use_cuda_graph", use_cuda_graph, False), ("fused_decode", fused_decode, True),
                                 ("overlap_models", overlap_models, False), ("diagnostics", diagnostics, False),
                                 ("shard_experts", shard_experts, False)):
            if not isinstance(v, bool) and not (none_ok and v is None):
                raise TypeError(f"{name}: expected a bool{' or None' if none_ok else ''}, got {type(v).__name__}")
        self.parallel = engine_context(tensor_parallel_size)  # None: one process, nothing sharded
        if shard_experts and self.parallel is None:
            raise ValueError("shard_experts: needs tensor parallelism (tensor_parallel_size > 1 under torchrun, or "
                             "RAST_FORCE_PG=1); nothing would be sharded")
        if self.parallel is not None and devices is None:
            devices = self.parallel.device
        experts, expert_bases = _pair_specs(expert, expert_base)
        self.num_pairs = len(experts)  # 0: the base alone
        self.roles = role_names(self.num_pairs)
        self.devices = resolve_devices(devices, self.roles)
        self.device = self.devices["base"]  # where sampling and bookkeeping run
        if self.parallel is not None and self.device != self.parallel.device:
            raise ValueError(f"devices: under tensor parallelism the base model lives on this rank's device "
                             f"{self.parallel.device}, got {self.device}")
        specs = dict(zip(self.roles, [base] + [m for pair in zip(experts, expert_bases) for m in pair]))
        # a model given in several roles (the same object or path, e.g. expert=base for contrastive decoding)
        # is loaded once and run once per step: `self.lane_roles` holds the first role of each distinct model
        self.models, self.shared, first_of = {}, {}, {}
        for role in self.roles:
            key = model_identity(specs[role])
            if key in first_of:
                first = first_of[key]
                if self.devices[role] != self.devices[first]:
                    raise ValueError(f"devices: {role} is the same model as {first} but is placed on "
                                     f"{self.devices[role]}, not {self.devices[first]}")
                self.models[role], self.shared[role] = self.models[first], first
                continue
            first_of[key] = role
            dev = self.devices[role]
            self.models[role] = load_model(specs[role], role, dev, resolve_dtype(dtype, dev), attn_implementation)
            check_sliding_window(self.models[role], role, self.max_seq_len)
        self.lane_roles = tuple(first_of.values())
        self.attn = {role: self.models[role].config._attn_implementation for role in self.roles}

        found = {}
        if tokenizer is not None:
            found["the given"] = load_tokenizer(tokenizer, "tokenizer")
        for role in self.lane_roles:
            found[role] = find_model_tokenizer(specs[role], self.models[role])
        check_tokenizers(found)
        self.tokenizer = next((t for t in found.values() if t is not None), None)
        if self.tokenizer is None:
            raise ValueError("tokenizer: none given and none found with the models; pass tokenizer=...")
        self.vocab_size = len(self.tokenizer)
        for role in self.lane_roles:
            model = self.models[role]
            if self.parallel is None and is_model_sharded(model):
                raise ValueError(f"{role}: this model object was sharded in place by a tensor-parallel engine; "
                                 "give a fresh copy")
            n_in, n_out = model_vocab_widths(model)
            n_out = full_width(model.get_output_embeddings(), n_out)  # a sharded head gathers the whole vocabulary
            if min(n_in, n_out) < self.vocab_size:
                raise ValueError(f"{role}: embedding / LM-head widths ({n_in}, {n_out}) are smaller than the "
                                 f"tokenizer's {self.vocab_size} tokens")
        self._default_eos = self._model_eos_ids()

        self.tensor_parallel_size = self.parallel.tp_size if self.parallel is not None else 1
        if self.parallel is not None:  # before the lanes: their KV pools and fused decoders see the shards
            for role in self.lane_roles:
                if role == "base" or shard_experts:
                    shard_model(self.models[role], self.parallel, role)
        reasons = {role: unsupported_reason(self.models[role]) for role in self.lane_roles}
        if fused_decode is None:
            fused_decode = not any(reasons.values()) and (
                _backends.has_triton() if self.device.type == "cuda" else self._cpu_fused_pays_off())
        elif fused_decode:
            for role, why in reasons.items():
                if why is not None:
                    raise ValueError(f"{role}: fused_decode=True does not support this model: {why}")
        self.fused_decode = fused_decode

        one_device = len({self.devices[r] for r in self.roles}) == 1
        self.use_cuda_graph = bool(use_cuda_graph and self.device.type == "cuda" and one_device)
        # (sharded experts' collectives on side streams could interleave differently on different ranks)
        overlap = bool(overlap_models and self.device.type == "cuda" and one_device and len(self.lane_roles) > 1
                       and not (self.parallel is not None and shard_experts))
        self.overlap_models = overlap

        self.kv_cache_tokens = kv_cache_tokens or self._default_pool_tokens(gpu_memory_utilization)
        num_blocks = self.kv_cache_tokens // self.block_size
        self.allocator = BlockAllocator(num_blocks, self.block_size)
        lanes = [make_lane(role, self.models[role], self.devices[role], self.attn[role], num_blocks, self.block_size,
                           self.max_seq_len, fused_decode) for role in self.lane_roles]
        lane_of = {role: self.lane_roles.index(self.shared.get(role, role)) for role in self.roles}
        # (expert lane, expert-base lane) per pair; the base alone samples base + alpha * (base - base) == base
        pairs = [(lane_of[e], lane_of[eb]) for e, eb in zip(self.roles[1::2], self.roles[2::2])] or [(0, 0)]
        max_blocks = -(-self.max_seq_len // self.block_size)
        self.runner = StepRunner(lanes, self.max_batch_size, max_blocks, self.block_size, self.max_seq_len,
                                 self.vocab_size, self.use_cuda_graph, overlap, diagnostics, pairs=pairs,
                                 token_sync=None if self.parallel is None else functools.partial(agree, self.parallel))
        self.diagnostics = diagnostics
        self.scheduler = Scheduler(self.max_batch_size, self.allocator, self.max_seq_len, scheduling)
        # host polls: every `poll_interval` decode steps; with `defer_polls` a snapshot is read one window later
        # (CUDA: the queue never drains). On CPU a snapshot is read at once; the 4-step window there keeps the
        # host's per-poll work off the per-token time (measured on the tiny trio: 3.59 ms per step polling every
        # step, 3.19 every 4, the static engine 3.11).
        on_cuda = self.device.type == "cuda"
        self.poll_interval = 4
        self.defer_polls = on_cuda
        self._pending = None
        self._requests: dict = {}
        self._num_requests = 0  # requests made so far (ids, arrival order, default seeds)
        self.tokens_generated = 0

    # ------------------------------------------------------------------ setup
    @property
    def lanes(self):
        return self.runner.lanes

    @property
    def pad_to_buckets(self) -> bool:
        """Pad the decode batch to the graph buckets (always with CUDA graphs; tests set it to exercise inert
        padding rows eagerly)."""
        return self.runner.pad_to_buckets

    @pad_to_buckets.setter
    def pad_to_buckets(self, value: bool) -> None:
        self.runner.pad_to_buckets = bool(value)

    def _cpu_fused_pays_off(self) -> bool:
        """On CPU the fused forward (with oneDNN linears) wins where reading the weights dominates a step: float32
        models of at least :data:`CPU_FUSED_MIN_BYTES` in all. Measured on the 2-core development VM
        (``benchmarks/RESULTS.md``): Qwen2.5-1.5B + 2 x 0.5B 463 vs 752 ms per step at B=1; the 4 MB toy trio
        5.1 vs 3.4 ms (per-op overhead dominates there)."""
        params = [p for r in self.lane_roles for p in self.models[r].parameters()]
        return all(p.dtype == torch.float32 for p in params) and onednn_linear_available() and \
            sum(p.numel() * p.element_size() for p in params) >= CPU_FUSED_MIN_BYTES

    def _default_pool_tokens(self, utilization: float) -> int:
        cap = self.max_batch_size * self.max_seq_len
        if self.device.type != "cuda":
            return cap
        per_token = 0
        for role in self.lane_roles:
            layers, kv, head_dim = kv_geometry(self.models[role])
            per_token += 2 * layers * kv * head_dim * next(self.models[role].parameters()).element_size()
        free, total = torch.cuda.mem_get_info(self.device)
        budget = total * utilization - (total - free) - _GPU_RESERVE_BYTES
        tokens = int(budget // per_token) // self.block_size * self.block_size
        if tokens < self.block_size:
            raise ValueError(f"kv_cache_tokens: no room for a KV pool on {self.device} ({free / 2**30:.1f} GiB free "
                             f"of {total / 2**30:.1f}, gpu_memory_utilization={utilization}); pass kv_cache_tokens")
        return min(tokens, cap)

    def _model_eos_ids(self) -> list:
        ids = []
        cands = [getattr(self.tokenizer, "eos_token_id", None)]
        gen_cfg = getattr(self.models["base"], "generation_config", None)
        cands.append(getattr(gen_cfg, "eos_token_id", None))
        for c in cands:
            for i in (c if isinstance(c, (list, tuple)) else [c]):
                if i is not None and 0 <= int(i) < self.vocab_size and int(i) not in ids:
                    ids.append(int(i))
        return ids[:MAX_EOS_IDS]

    # ------------------------------------------------------------------ input handling
    def _normalize_prompts(self, prompts) -> list:
        """str | list[str] | list[int] | list[list[int]] -> list of token-id lists (validated)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        elif isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts: expected a str, a list of str or a list of token-id lists, "
                            f"got {type(prompts).__name__}")
        if len(prompts) and all(isinstance(p, numbers.Integral) and not isinstance(p, bool) for p in prompts):
            prompts = [list(prompts)]  # one prompt given as token ids
        rows = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                ids = list(self.tokenizer(p, add_special_tokens=True)["input_ids"])
            elif isinstance(p, (list, tuple)):
                for t in p:
                    if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                        raise TypeError(f"prompts[{i}]: token ids must be ints, got {type(t).__name__}")
                    if not 0 <= t < self.vocab_size:
                        raise ValueError(f"prompts[{i}]: token id {t} outside [0, {self.vocab_size})")
                ids = [int(t) for t in p]
            else:
                raise TypeError(f"prompts[{i}]: expected a str or a list of token ids, got {type(p).__name__}")
            if not ids:
                raise ValueError(f"prompts[{i}]: empty prompt (it has no tokens); give at least one token")
            rows.append(ids)
        return rows

    def _check_request(self, ids: List[int], params: SamplingParams, name: str) -> list:
        """Raise naming ``name`` (or the field) unless the request fits this engine; returns its EOS ids."""
        if len(ids) + params.max_new_tokens > self.max_seq_len:
            raise ValueError(f"{name}: {len(ids)} prompt tokens + max_new_tokens={params.max_new_tokens} exceed "
                             f"max_seq_len={self.max_seq_len}")
        need = self.scheduler.blocks_to_fit(len(ids) + params.max_new_tokens - 1)
        if need > self.allocator.num_blocks:
            raise ValueError(f"{name}: {len(ids)} prompt tokens + max_new_tokens={params.max_new_tokens} need {need} "
                             f"KV blocks of {self.block_size}, the pool has {self.allocator.num_blocks} "
                             f"(kv_cache_tokens={self.kv_cache_tokens})")
        if isinstance(params.alpha, tuple):
            if self.num_pairs == 0:
                raise ValueError("alpha: a list of weights needs expert pairs; this engine decodes the base alone")
            params.pair_alphas(self.num_pairs)  # raises on a length mismatch
        eos = self._default_eos if params.eos_token_id is None else list(params.eos_token_id)
        for e in eos:
            if e >= self.vocab_size:
                raise ValueError(f"eos_token_id: {e} outside [0, {self.vocab_size})")
        return eos

    def _make_request(self, ids: List[int], params: SamplingParams, seed: int, name: str, index: int) -> Request:
        """A validated :class:`Request` (``name``: how errors call the prompt, e.g. ``prompts[3]``)."""
        eos = self._check_request(ids, params, name)
        number, self._num_requests = self._num_requests, self._num_requests + 1
        req = Request(request_id=f"req-{number}", prompt=ids, params=params.with_seed(seed), eos=tuple(eos),
                      prompt_index=index, arrival=number)
        req.sequences = [Sequence(request=req, sample_index=j, seed=sample_seed(seed, j)) for j in range(params.n)]
        for seq in req.sequences:
            seq.detok = IncrementalText(self._decode, params.stop)
        return req

    def _params_list(self, count: int, sampling_params, seed, kwargs) -> List[tuple]:
        """``[(params, seed)]`` for ``count`` prompts from ``sampling_params`` (one, a list, or None: built from
        ``kwargs``) and the ``seed`` keyword (an int: prompt ``i`` gets ``mix_seed(seed, i)`` unless its params
        carry a seed; a list: one seed per prompt)."""
        if sampling_params is None:
            unknown = set(kwargs) - set(PARAM_FIELDS)
            if unknown:
                raise TypeError(f"unexpected keyword(s) {sorted(unknown)}")
            sampling_params = SamplingParams(**kwargs)
        elif kwargs:
            raise TypeError(f"{sorted(kwargs)}: give either sampling_params or these keywords, not both")
        if isinstance(sampling_params, SamplingParams):
            plist = [sampling_params] * count
        elif isinstance(sampling_params, (list, tuple)):
            if len(sampling_params) != count:
                raise ValueError(f"sampling_params: a list needs one SamplingParams per prompt ({count}), "
                                 f"got {len(sampling_params)}")
            plist = list(sampling_params)
            for i, p in enumerate(plist):
                if not isinstance(p, SamplingParams):
                    raise TypeError(f"sampling_params[{i}]: expected a SamplingParams, got {type(p).__name__}")
        else:
            raise TypeError(f"sampling_params: expected a SamplingParams or a list of them, got "
                            f"{type(sampling_params).__name__}")
        if isinstance(seed, (list, tuple)):
            if len(seed) != count:
                raise ValueError(f"seed: a list needs one seed per prompt ({count}), got {len(seed)}")
            seeds = [SamplingParams(seed=s).seed for s in seed]  # validated as SamplingParams.seed
        else:
            base = SamplingParams(seed=seed).seed
            seeds = [mix_seed(base, i) for i in range(count)]
        return [(p, p.seed if p.seed is not None else s) for p, s in zip(plist, seeds)]

    # ------------------------------------------------------------------ public API: requests
    def resolve_requests(self, prompts, sampling_params=None, *, seed=0, **kwargs) -> List[tuple]:
        """``[(token ids, SamplingParams with its seed set)]`` per prompt: what :meth:`generate` with these
        arguments would queue, checked the same way (every error before anything runs) and with the same seed
        rules, queuing nothing. :meth:`generate` of any subset of them, each with its own params, gives those
        prompts' outputs of the whole call (data parallelism splits a call this way)."""
        rows = self._normalize_prompts(prompts)
        out = []
        for i, (ids, (p, s)) in enumerate(zip(rows, self._params_list(len(rows), sampling_params, seed, kwargs))):
            self._check_request(ids, p, f"prompts[{i}]")
            out.append((ids, p.with_seed(s)))
        return out

    def add_request(self, prompt, sampling_params: Optional[SamplingParams] = None, **kwargs) -> str:
        """Queue one prompt (a string or a flat list of token ids) with its settings (a :class:`SamplingParams`, or
        its fields as keywords); returns the request id. Everything is validated here, before anything runs.
        ``seed=None`` (the default) gives the ``r``-th request of this engine ``mix_seed(0, r)``."""
        rows = self._normalize_prompts(prompt)
        if len(rows) != 1:
            raise ValueError(f"prompt: add_request takes one prompt, got {len(rows)}")
        if sampling_params is None:
            sampling_params = SamplingParams(**kwargs)
        elif kwargs:
            raise TypeError(f"{sorted(kwargs)}: give either sampling_params or these keywords, not both")
        elif not isinstance(sampling_params, SamplingParams):
            raise TypeError(f"sampling_params: expected a SamplingParams, got {type(sampling_params).__name__}")
        seed = sampling_params.seed if sampling_params.seed is not None else mix_seed(0, self._num_requests)
        req = self._make_request(rows[0], sampling_params, seed, "prompt", 0)
        self._enqueue([req])
        return req.request_id

    def _enqueue(self, requests: List[Request]) -> None:
        for req in requests:
            self._requests[req.request_id] = req
            self.scheduler.add(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)  # a request leaves the table when its last sample finishes

    def abort_request(self, request_id: str) -> None:
        """Stop a request now: its sequences finish with ``finish_reason="abort"``, their slots and blocks are free
        at once (unknown or finished ids are ignored)."""
        req = self._requests.get(request_id)
        if req is None:
            return
        for seq in req.sequences:
            if seq.status == FINISHED:
                continue
            if seq.status == RUNNING:
                self.runner.mark_done([seq.slot])
            else:
                self.scheduler.remove_waiting(seq)
            seq.finish_reason = "abort"
            self._finish(seq)

    def stats(self) -> dict:
        """Counts for monitoring: requests running / waiting, KV blocks used / total, tokens generated."""
        return dict(running=self.scheduler.num_running, waiting=len(self.scheduler.waiting),
                    kv_blocks_used=self.allocator.num_used, kv_blocks_total=self.allocator.num_blocks,
                    block_size=self.block_size, tokens_generated=self.tokens_generated)

    def step(self) -> List[GenerationOutput]:
        """One scheduling iteration (module docstring). Returns one :class:`GenerationOutput` per sequence that got
        new tokens or finished since the last call (``finished`` tells which; a running one holds its tokens so far
        and the text that can no longer change)."""
        updates: dict = {}
        with torch.no_grad():
            sched, runner = self.scheduler, self.runner
            if self._pending is not None and self._pending.ready():
                self._process(self._pending, updates)
                self._pending = None
            launched = None
            if sched.num_running and any(s.status == RUNNING for s in sched.running):
                k = self.poll_interval
                grown = {s: len(s.blocks) for s in sched.running}
                slots_before = {s: s.slot for s in sched.running}
                preempted = sched.reserve_decode(k)
                runner.mark_done([slots_before[s] for s in preempted])
                runner.set_blocks([(s.slot, j, s.blocks[j]) for s, n in grown.items() if s.slot is not None
                                   for j in range(n, len(s.blocks))])
                b = sched.active_rows()
                need = max(min(s.kv_upper + k, s.max_kv + 1) for s in sched.running)
                plausibility = any(s.request.params.base_plausibility > 0 for s in sched.running)
                runner.decode(b, kv_bucket(need, self.max_seq_len), k, plausibility)
                for s in sched.running:
                    s.kv_upper = min(s.kv_upper + k, s.max_kv)
                owners = [(s, s.epoch) if s is not None else (None, 0) for s in sched.slots[:b]]
                launched = runner.snapshot(b, owners)
            if self._pending is not None:
                self._process(self._pending, updates)
                self._pending = None
            if launched is not None:
                if self.defer_polls:
                    self._pending = launched
                else:
                    self._process(launched, updates)
            runner.move_slots(sched.compact())
            groups = sched.admit(self.max_prefill_tokens)
            if groups:
                self._prefill(groups)
        return [self._output(s) for s in updates]

    def run(self) -> Iterator[GenerationOutput]:
        """Step until every queued request is finished, yielding each finished sequence's output as it finishes."""
        while self.scheduler.has_work() or self._pending is not None:
            for out in self.step():
                if out.finished:
                    yield out

    # ------------------------------------------------------------------ host side of a step
    def _prefill(self, groups) -> None:
        slots, blocks, fields = [], [], {}
        pairs = max(1, self.num_pairs)  # the base alone: one (base, base) pair
        for g in groups:
            for seq in g.sequences:
                p = seq.request.params
                slots.append(seq.slot)
                blocks.append(seq.blocks)
                for name, value in (("alpha", p.pair_alphas(pairs)), ("base_plausibility", p.base_plausibility),
                                    ("temperature", p.temperature), ("top_k", p.top_k), ("top_p", p.top_p),
                                    ("min_p", p.min_p), ("seed", seq.seed), ("n_gen", len(seq.tokens)),
                                    ("max_new", p.max_new_tokens), ("tok", 0), ("pos", len(g.context)),
                                    ("finish", 0), ("err_step", -1), ("done", False), ("eos", seq.request.eos)):
                    fields.setdefault(name, []).append(value)
        self.runner.load_slots(slots, fields, blocks)
        self.runner.prefill([g.context for g in groups], [g.sequences[0].blocks for g in groups],
                            [[s.slot for s in g.sequences] for g in groups], [c for g in groups for c in g.copies],
                            plausibility=any(v > 0 for v in fields["base_plausibility"]))

    def _process(self, snap, updates: dict) -> None:
        """Read a snapshot: new tokens, finished rows, stop strings."""
        ints, lps, diag = snap.read()
        for i, (seq, epoch) in enumerate(snap.owners):
            if seq is None or seq.epoch != epoch or seq.status != RUNNING:
                continue  # an empty slot, or the sequence left it since (preempted, aborted, stopped)
            n_gen, done, finish, err_step = ints[i][:4]
            ring = ints[i][4:]
            start = len(seq.tokens)
            if n_gen - start > RING:
                raise RuntimeError(f"engine: {n_gen - start} tokens between two reads exceed the ring of {RING}")
            new = [ring[t % RING] for t in range(start, n_gen)]
            new_lp = [lps[i][t % RING] for t in range(start, n_gen)]
            new_diag = [diag[i][t % RING] for t in range(start, n_gen)] if diag is not None else []
            if done and finish == EOS:  # the ending EOS id is not part of the output
                seq.stop_reason = new.pop()
                new_lp.pop()
                new_diag = new_diag[:-1]
            if new:
                seq.tokens.extend(new)
                seq.logprobs.extend(new_lp)
                seq.diagnostics.extend(new_diag)
                self.tokens_generated += len(new)
                updates[seq] = True
            stopped = seq.detok.extend(new)
            if done:
                if finish == EOS:
                    seq.finish_reason = "stop"
                elif finish == LENGTH:
                    seq.finish_reason = "length"
                elif finish == ERROR:
                    seq.finish_reason = "error"
                    seq.error = (f"rast_sample returned -1 at decode step {err_step} (generated token {err_step}): the "
                                 "combined logits held "
                                 "NaN/+inf, every token was masked, or a sampling parameter was out of range")
                else:
                    raise RuntimeError(f"engine: slot {i} is done with finish code {finish}")
            elif stopped:
                seq.finish_reason = "stop"
                self.runner.mark_done([seq.slot])  # it may still run in a queued window: its extra tokens are cut
            else:
                continue
            self._finish(seq)
            updates[seq] = True

    def _finish(self, seq: Sequence) -> None:
        stops = seq.request.params.stop
        text, toks, stop = final_text(self._decode, seq.tokens, stops)
        if stop is not None:  # a stop string: the text and the tokens end there, whatever ended the row
            seq.finish_reason, seq.stop_reason, seq.error = "stop", stop, None
            seq.logprobs = seq.logprobs[:len(toks)]
            seq.diagnostics = seq.diagnostics[:len(toks)]
            seq.tokens = toks
        seq.final_text = text
        self.scheduler.finish(seq)
        if seq.request.finished:
            self._requests.pop(seq.request.request_id, None)

    def _output(self, seq: Sequence) -> GenerationOutput:
        req = seq.request
        finished = seq.status == FINISHED
        return GenerationOutput(
            text=seq.final_text if finished else seq.detok.stable(), token_ids=list(seq.tokens),
            num_prompt_tokens=len(req.prompt), finish_reason=seq.finish_reason if finished else None,
            stop_reason=seq.stop_reason if finished else None, error=seq.error,
            logprobs=list(seq.logprobs) if req.params.return_logprobs else None, request_id=req.request_id,
            prompt_index=req.prompt_index, sample_index=seq.sample_index, finished=finished,
            diagnostics=self._diagnostics(seq) if self.diagnostics else None)

    @staticmethod
    def _diagnostics(seq: Sequence) -> dict:
        cols = list(zip(*seq.diagnostics)) if seq.diagnostics else [()] * len(DIAGNOSTICS)
        out = {name: list(col) for name, col in zip(DIAGNOSTICS, cols)}
        out["argmax_flip"] = [bool(x) for x in out["argmax_flip"]]
        return out

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    # ------------------------------------------------------------------ public API: batch helpers
    def generate(self, prompts, sampling_params=None, *, seed=0, progress: Optional[bool] = None,
                 **kwargs) -> List[GenerationOutput]:
        """Generate for each prompt, all requests fed to the engine at once (continuous batching).

        Parameters
        ----------
        prompts : str, list[str], list[int] or list[list[int]]
            One prompt (a string or a flat list of token ids) or several. Strings are tokenized with the
            tokenizer's special tokens (e.g. BOS). An empty list returns ``[]``.
        sampling_params : SamplingParams or list[SamplingParams], optional
            One for all prompts or one per prompt; or leave it None and pass its fields as keywords (``alpha``,
            ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``max_new_tokens``, ``stop``, ``eos_token_id``, ``n``,
            ``return_logprobs``).
        seed : int or list[int]
            An int: prompt ``i`` (whose params have no seed) uses ``mix_seed(seed, i)``; a list: one int64 seed per
            prompt, as is. Sample ``j`` of a prompt with seed ``s`` uses ``sample_seed(s, j)``.
        progress : bool, optional
            tqdm progress bar over finished samples; default: on when stderr is a terminal and the call asks for at
            least 1024 tokens.

        Returns
        -------
        list[GenerationOutput]
            One per (prompt, sample), prompt-major (``prompt_index``, ``sample_index``); a single prompt with
            ``n=1`` gives a list of one. Every argument is checked before anything runs.
        """
        if self.has_unfinished_requests():
            raise ValueError("generate: the engine has requests in flight from add_request; finish them with "
                             "step()/run() first")
        rows = self._normalize_prompts(prompts)
        plist = self._params_list(len(rows), sampling_params, seed, kwargs)
        reqs = [self._make_request(ids, p, s, f"prompts[{i}]", i) for i, (ids, (p, s)) in enumerate(zip(rows, plist))]
        if not reqs:
            return []
        total = sum(r.params.n for r in reqs)
        if progress is None:
            progress = sys.stderr.isatty() and sum(r.params.n * r.params.max_new_tokens for r in reqs) >= 1024
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, desc="rast_generate", unit="sample")
        self._enqueue(reqs)
        outs, t0, tok0 = [], time.perf_counter(), self.tokens_generated
        try:
            for out in self.run():
                outs.append(out)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(tok_s=f"{(self.tokens_generated - tok0) / (time.perf_counter() - t0):.1f}")
        except BaseException:
            for r in reqs:  # free what this call holds; the engine stays usable
                self.abort_request(r.request_id)
            raise
        finally:
            if bar is not None:
                bar.close()
        outs.sort(key=lambda o: (o.prompt_index, o.sample_index))
        return outs

    def stream(self, prompt, sampling_params: Optional[SamplingParams] = None, *, seed=0,
               **kwargs) -> Iterator[str]:
        """Generate for one prompt (a string or a flat list of token ids; ``n`` must be 1), yielding text increments
        as they become final: an incomplete multi-byte character and a tail that could still start a stop string
        are held back. The concatenation equals ``generate(prompt, ...)[0].text`` for the same arguments
        (``progress`` is ignored)."""
        kwargs.pop("progress", None)
        if self.has_unfinished_requests():
            raise ValueError("stream: the engine has requests in flight from add_request; finish them first")
        rows = self._normalize_prompts(prompt)
        if len(rows) != 1:
            raise ValueError(f"prompt: stream takes one prompt, got {len(rows)}")
        (params, s), = self._params_list(1, sampling_params, seed, kwargs)
        if params.n != 1:
            raise ValueError(f"n: stream takes one sample, got {params.n}")
        req = self._make_request(rows[0], params, s, "prompt", 0)
        self._enqueue([req])
        rid = req.request_id
        emitted, final = "", None
        try:
            while final is None:
                for out in self.step():
                    if out.finished:
                        final = out.text
                    elif out.text.startswith(emitted) and len(out.text) > len(emitted):
                        yield out.text[len(emitted):]
                        emitted = out.text
        except BaseException:
            self.abort_request(rid)
            raise
        if final.startswith(emitted):
            if len(final) > len(emitted):
                yield final[len(emitted):]
        else:  # the tokenizer's decode of a prefix was not a prefix of the final decode
            warnings.warn("stream: streamed text diverged from the final decode; the tail is not exact")

    def __repr__(self) -> str:
        names = {r: type(m).__name__ for r, m in self.models.items()}
        return (f"RastEngine({names}, attn={self.attn}, devices={ {r: str(self.devices[r]) for r in self.roles} }, "
                f"max_batch_size={self.max_batch_size}, max_seq_len={self.max_seq_len}, "
                f"kv_cache_tokens={self.kv_cache_tokens}, block_size={self.block_size}, "
                f"scheduling={self.scheduler.policy!r}, use_cuda_graph={self.use_cuda_graph}, "
                f"fused_decode={self.fused_decode}, overlap_models={self.overlap_models}, "
                f"tensor_parallel_size={self.tensor_parallel_size})")
