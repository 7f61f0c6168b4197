"""``RastEngine``: the base, the expert and the expert base decoded in lockstep.

Every step the three models read the same token, :func:`rast_kernels.rast_sample` turns their three
logit rows into one token per row (``z = z_base + alpha * (z_expert - z_expert_base)``, then
temperature / top-k / top-p / min-p), and that token is fed back to all three.

Layout and state (all preallocated, all updated in place on the device):

* each model has an :class:`~rast_kernels.engine.cache.EngineKVCache` of ``max_batch_size x max_seq_len``;
  prompts are left padded to the batch's longest prompt ``P`` (prompt block in columns ``[0, P)``), the
  ``t``-th decode step writes column ``P + t`` of every row; a row's position ids count its real tokens
  only and a 4-D additive mask hides padding and unwritten columns, so a row's tokens do not depend on
  the other prompts;
* the decode step (three forwards, ``rast_sample``, bookkeeping: write the token into the output buffer,
  feed it to the three input buffers, advance positions / cache columns / sampler offsets, set per-row
  ``done`` on EOS, ``max_new_tokens`` or a sampler error, keep finished rows inert) reads no value back
  to the host. On CUDA with ``use_cuda_graph=True`` it is captured once per batch-size bucket
  (1, 2, 4, ... up to ``max_batch_size``; batches are padded with inert copies of their first row) and
  attended-length bucket (decode attends to the first ``kv`` cache columns, ``kv`` = the next power of
  two >= 64 covering prompt + new tokens, capped at ``max_seq_len``) and replayed; the host polls
  ``done`` every :attr:`RastEngine.poll_interval` steps with a non-blocking copy to pinned memory (read
  one poll later, so the GPU queue never drains) and checks stop strings then. On CPU, with
  ``use_cuda_graph=False``, or when the models sit on different devices, the very same step function
  runs eagerly;
* a decode forward is either the model's own ``forward`` (with ``attn_implementation``) or, with
  ``fused_decode`` (the CUDA default for Llama/Qwen2/Mistral), :class:`~.fused_decode.FusedDecoder`: the
  same math with about a quarter of the kernel launches. Prompts always use the model's ``forward``.

Seeds: row ``i`` of ``prompts`` draws with seed ``mix(seed, i)`` (a SplitMix64 hash; or ``seed[i]`` as
given when ``seed`` is a list) and Philox offset = the index of the generated token, so a prompt's
output depends only on its text, its seed and the sampling settings, never on the rest of the batch.
"""
from __future__ import annotations

import inspect
import numbers
import sys
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch

from .. import _backends
from ..ops.rast_sample import _check_param, rast_sample
from .cache import EngineKVCache
from .fused_decode import FusedDecoder, unsupported_reason
from .loading import (ROLES, cache_kwarg, check_sliding_window, check_tokenizers, find_model_tokenizer, load_model,
                      load_tokenizer, model_vocab_widths, resolve_devices, resolve_dtype,
                      set_attn_implementation)
from .outputs import GenerationOutput

# per-row finish codes held on the device
_RUNNING, _EOS, _LENGTH, _ERROR = 0, 1, 2, 3
_MAX_EOS_IDS = 16
_MASK64 = (1 << 64) - 1


def row_seed(seed: int, index: int) -> int:
    """The int64 Philox seed of prompt ``index`` for a call with ``seed`` (SplitMix64 finaliser of
    ``seed + index * golden``): distinct rows get unrelated streams, and the same (seed, index) always
    gets the same one."""
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    z ^= z >> 31
    return z - (1 << 64) if z >= (1 << 63) else z


@dataclass
class _Lane:
    """One model with its cache and its static input buffers (on the model's device)."""

    role: str
    model: torch.nn.Module
    device: torch.device
    cache: EngineKVCache
    ids: torch.Tensor     # [max_batch, 1] int64: the token each row reads next
    pos: torch.Tensor     # [max_batch, 1] int64: its position id
    mask: torch.Tensor    # [max_batch, 1, 1, max_seq_len] additive mask (model dtype) for decode
    cache_arg: str        # "cache" (transformers >= 5.2x) or "past_key_values"
    logits_to_keep: bool  # forward accepts logits_to_keep
    start: Optional[torch.Tensor] = None  # [max_batch] int64 first valid cache column (bounds mode only)
    end: Optional[torch.Tensor] = None    # [max_batch] int64 one past the last valid column
    decoder: Optional[FusedDecoder] = None  # the engine's own decode forward (fused_decode), else transformers'


class _State:
    """The sampler's and the bookkeeping's device buffers, ``[max_batch]`` unless noted."""

    def __init__(self, max_batch: int, max_seq_len: int, device):
        f32, i64 = dict(dtype=torch.float32, device=device), dict(dtype=torch.int64, device=device)
        self.alpha = torch.zeros(max_batch, **f32)
        self.temperature = torch.zeros(max_batch, **f32)
        self.top_p = torch.ones(max_batch, **f32)
        self.min_p = torch.zeros(max_batch, **f32)
        self.top_k = torch.zeros(max_batch, **i64)
        self.seed = torch.zeros(max_batch, **i64)
        self.offset = torch.zeros(max_batch, **i64)
        self.tok = torch.zeros(max_batch, **i64)
        self.max_new = torch.ones(max_batch, **i64)
        self.n_gen = torch.zeros(max_batch, **i64)
        self.finish = torch.zeros(max_batch, **i64)
        self.err_step = torch.full((max_batch,), -1, **i64)
        self.done = torch.zeros(max_batch, dtype=torch.bool, device=device)
        self.eos_ids = torch.full((_MAX_EOS_IDS,), -2, **i64)  # -2 never matches a token
        self.step = torch.zeros(1, **i64)  # index of the token the next sample produces
        self.out_tokens = torch.full((max_batch, max_seq_len), -1, **i64)  # [max_batch, max_seq_len]
        self.out_lp = torch.zeros((max_batch, max_seq_len), **f32)


class RastEngine:
    """Three causal LMs decoded in lockstep with the fused RAST sampler.

    Parameters
    ----------
    base, expert, expert_base : str, os.PathLike or transformers.PreTrainedModel
        Model id / local path (``AutoModelForCausalLM``; ``HF_HUB_OFFLINE`` is honoured) or a loaded
        model, which is moved/cast **in place**, put in eval mode and switched to ``attn_implementation``
        (with ``fused_decode``, its q/k/v and gate/up weights also become row views of one concatenated
        tensor each: same values, no extra memory).
        ``expert=None, expert_base=None`` decodes the base model alone with the same machinery (static
        cache, CUDA graph, fused sampler; ``alpha`` is then irrelevant): the baseline RAST is measured
        against. Models of different families are fine as long as they share the
        tokenizer's token-id mapping and their embedding / LM-head widths are ``>= len(tokenizer)``
        (wider, padded heads are normal: columns past ``len(tokenizer)`` are never sampled).
    tokenizer : tokenizer, str or None
        The shared tokenizer (object, id or path). Default: the one saved with the models. Every
        tokenizer found (given and saved with the models) must map the same tokens to the same ids,
        else ``ValueError`` naming the first difference.
    dtype : torch.dtype, str or None
        None: bfloat16 on CUDA; on CPU a loaded model keeps its dtype and a path loads in float32.
    devices : None, device or dict
        ``{"base": ..., "expert": ..., "expert_base": ...}``; default: all on the first GPU, else CPU.
        Logit rows are moved to the base model's device for sampling. Models on different devices
        run eagerly (their forwards still overlap: no host synchronisation per step).
    max_batch_size, max_seq_len : int
        Preallocated KV-cache rows and columns per model (prompt + ``max_new_tokens`` must fit).
        Larger batches are processed in chunks of ``max_batch_size``.
    use_cuda_graph : bool
        Capture the decode step in CUDA graphs (CUDA only, all models on one device).
    attn_implementation : {None, "sdpa", "eager", "rast_decode"}
        The attention the engine's models use (the one place it is chosen). ``None`` (default):
        ``"rast_decode"`` when the base model is on CUDA and Triton is importable, else ``"sdpa"``;
        pass ``"sdpa"`` to turn the decode-attention kernel off. The engine passes 4-D
        additive masks; with ``"rast_decode"`` decode steps run :mod:`rast_kernels.engine.attention`'s
        kernel over each row's valid cache range (prompts still use SDPA).
    fused_decode : bool or None
        Decode steps through :class:`~rast_kernels.engine.fused_decode.FusedDecoder` (the models' own
        weights, fused residual-add + RMSNorm, rotary + cache write, SiLU-mul and the decode-attention kernel:
        about a quarter of transformers' kernel launches) instead of the models' ``forward``. ``None``
        (default): on when the base model is on CUDA, Triton is importable and every model is a supported
        family (Llama, Qwen2, Mistral); ``True`` requires it (``ValueError`` naming an unsupported model; on
        CPU it runs the same math with PyTorch ops); ``False``: transformers' forward with
        ``attn_implementation``. Prompts always go through transformers' forward.
    overlap_models : bool
        Run the expert's and the expert base's decode forwards on their own CUDA streams, concurrently with
        the base model's (the small models' many short kernels can then hide under the base model's
        weight reads); the graph captures the three branches and joins them before the sampler. Same
        kernels, same tokens. CUDA with all models on one device only; ignored otherwise. Default off
        until measured (``benchmarks/bench_decode.py`` times it as ``engine_overlap``).
    """


    def __init__(self, base, expert, expert_base, *, tokenizer=None, dtype=None, devices=None,
                 max_batch_size: int = 8, max_seq_len: int = 4096, use_cuda_graph: bool = True,
                 attn_implementation: Optional[str] = None, fused_decode: Optional[bool] = None,
                 overlap_models: bool = False):
        for name, v in (("max_batch_size", max_batch_size), ("max_seq_len", max_seq_len)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
            if v < 1:
                raise ValueError(f"{name}: must be >= 1, got {v}")
        if max_seq_len < 2:
            raise ValueError(f"max_seq_len: must be >= 2 (one prompt token and one new token), got {max_seq_len}")
        for name, v, none_ok in (("use_cuda_graph", use_cuda_graph, False), ("fused_decode", fused_decode, True),
                                 ("overlap_models", overlap_models, False)):
            if not isinstance(v, bool) and not (none_ok and v is None):
                raise TypeError(f"{name}: expected a bool{' or None' if none_ok else ''}, got {type(v).__name__}")
        self.max_batch_size = int(max_batch_size)
        self.max_seq_len = int(max_seq_len)
        self.devices = resolve_devices(devices)
        if attn_implementation is None:
            on_cuda = self.devices["base"].type == "cuda"
            attn_implementation = "rast_decode" if on_cuda and _backends.has_triton() else "sdpa"
        self.attn_implementation = attn_implementation
        self.device = self.devices["base"]  # where sampling and bookkeeping run

        if (expert is None) != (expert_base is None):
            raise ValueError("expert, expert_base: give both (RAST) or neither (the base model alone)")
        self.roles = ROLES if expert is not None else ("base",)
        specs = dict(base=base, expert=expert, expert_base=expert_base)
        self.models = {}
        for role in self.roles:
            dev = self.devices[role]
            self.models[role] = load_model(specs[role], role, dev, resolve_dtype(dtype, dev), attn_implementation)
        for role in self.roles:
            check_sliding_window(self.models[role], role, self.max_seq_len)

        # tokenizers: the given one and any saved with the models must agree
        found = {}
        if tokenizer is not None:
            found["the given"] = load_tokenizer(tokenizer, "tokenizer")
        for role in self.roles:
            found[role] = find_model_tokenizer(specs[role], self.models[role])
        check_tokenizers(found)
        self.tokenizer = next((t for t in found.values() if t is not None), None)
        if self.tokenizer is None:
            raise ValueError("tokenizer: none given and none found with the models; pass tokenizer=...")
        self.vocab_size = len(self.tokenizer)
        for role in self.roles:
            n_in, n_out = model_vocab_widths(self.models[role])
            if min(n_in, n_out) < self.vocab_size:
                raise ValueError(f"{role}: embedding / LM-head widths ({n_in}, {n_out}) are smaller than the "
                                 f"tokenizer's {self.vocab_size} tokens")
        self._default_eos = self._model_eos_ids()

        reasons = {role: unsupported_reason(self.models[role]) for role in self.roles}
        if fused_decode is None:
            fused_decode = self.device.type == "cuda" and _backends.has_triton() and \
                not any(reasons.values())
        elif fused_decode:
            for role, why in reasons.items():
                if why is not None:
                    raise ValueError(f"{role}: fused_decode=True does not support this model: {why}")
        self.fused_decode = fused_decode
        # the decode-attention kernel reads each row's valid cache range instead of the mask
        self._bounds = attn_implementation == "rast_decode" or fused_decode
        self.lanes = [self._make_lane(role) for role in self.roles]
        self.state = _State(self.max_batch_size, self.max_seq_len, self.device)
        one_device = len({lane.device for lane in self.lanes}) == 1
        self.use_cuda_graph = bool(use_cuda_graph and self.device.type == "cuda" and one_device)
        # lane i > 0 runs on its own stream (None: the current stream)
        overlap = overlap_models and self.device.type == "cuda" and one_device and len(self.lanes) > 1
        self.overlap_models = overlap
        self._streams = [None] + [torch.cuda.Stream(self.device) if overlap else None for _ in self.lanes[1:]]
        # pad batches to graph buckets only when graphs are used (eager runs exactly the rows it has);
        # tests may set it to exercise inert padding rows on CPU
        self.pad_to_buckets = self.use_cuda_graph
        # host polls of `done`/tokens: every `poll_interval` steps; with `defer_polls` a poll's copy is
        # read one poll later (CUDA: the queue never drains). On CPU every step, read at once.
        on_cuda = self.device.type == "cuda"
        self.poll_interval = 4 if on_cuda else 1
        self.defer_polls = on_cuda
        self._graphs: dict = {}
        self._keepalive: list = []  # buffers captured graphs point into (see _reserve_sampler_workspace)
        self._graph_pool = None
        self.buckets = sorted({min(1 << i, self.max_batch_size) for i in range(self.max_batch_size.bit_length() + 1)})

    # ------------------------------------------------------------------ setup
    def _make_lane(self, role: str) -> _Lane:
        model, dev = self.models[role], self.devices[role]
        cfg = model.config
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        n_layers = getattr(text_cfg, "num_hidden_layers", None)
        if n_layers is None:
            raise ValueError(f"{role}: config has no num_hidden_layers")
        params = inspect.signature(model.forward).parameters
        try:
            cache_arg = cache_kwarg(model)
        except ValueError as exc:
            raise ValueError(f"{role}: {exc}") from None
        mdtype = next(model.parameters()).dtype
        B, S = self.max_batch_size, self.max_seq_len
        return _Lane(
            role=role, model=model, device=dev,
            cache=EngineKVCache(n_layers, B, S, dev),
            ids=torch.zeros(B, 1, dtype=torch.int64, device=dev),
            pos=torch.zeros(B, 1, dtype=torch.int64, device=dev),
            mask=torch.zeros(B, 1, 1, S, dtype=mdtype, device=dev),
            cache_arg=cache_arg, logits_to_keep="logits_to_keep" in params,
            start=torch.zeros(B, dtype=torch.int64, device=dev) if self._bounds else None,
            end=torch.zeros(B, dtype=torch.int64, device=dev) if self._bounds else None,
            decoder=FusedDecoder(model) if self.fused_decode else None)

    def _model_eos_ids(self) -> list:
        ids = []
        cands = [getattr(self.tokenizer, "eos_token_id", None)]
        gen_cfg = getattr(self.models["base"], "generation_config", None)
        cands.append(getattr(gen_cfg, "eos_token_id", None))
        for c in cands:
            for i in (c if isinstance(c, (list, tuple)) else [c]):
                if i is not None and 0 <= int(i) < self.vocab_size and int(i) not in ids:
                    ids.append(int(i))
        return ids[:_MAX_EOS_IDS]

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

    def _sampling_settings(self, n_prompts, alpha, temperature, top_k, top_p, min_p, max_new_tokens, stop,
                           eos_token_id, seed, return_logprobs) -> dict:
        cpu = torch.device("cpu")
        s = {name: _check_param(name, value, 1, cpu) for name, value in
             dict(alpha=alpha, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p).items()}
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral):
            raise TypeError(f"max_new_tokens: expected an int, got {type(max_new_tokens).__name__}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
        s["max_new_tokens"] = int(max_new_tokens)
        if stop is None:
            stop = []
        elif isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, (list, tuple)) or not all(isinstance(x, str) for x in stop):
            raise TypeError("stop: expected None, a str or a list of str")
        if any(x == "" for x in stop):
            raise ValueError("stop: stop strings must be non-empty")
        s["stop"] = list(stop)
        if eos_token_id is None:
            eos = list(self._default_eos)
        else:
            eos = [eos_token_id] if isinstance(eos_token_id, numbers.Integral) and not isinstance(eos_token_id, bool) \
                else eos_token_id
            if not isinstance(eos, (list, tuple)) or not all(
                    isinstance(e, numbers.Integral) and not isinstance(e, bool) for e in eos):
                raise TypeError("eos_token_id: expected None, an int or a list of ints ([] disables EOS)")
            if len(eos) > _MAX_EOS_IDS:
                raise ValueError(f"eos_token_id: at most {_MAX_EOS_IDS} ids, got {len(eos)}")
            for e in eos:
                if not 0 <= e < self.vocab_size:
                    raise ValueError(f"eos_token_id: {e} outside [0, {self.vocab_size})")
        s["eos"] = [int(e) for e in eos]
        if isinstance(seed, (list, tuple)):
            if len(seed) != n_prompts:
                raise ValueError(f"seed: a list needs one seed per prompt ({n_prompts}), got {len(seed)}")
            seeds = [_check_param("seed", x, 1, cpu) for x in seed]
        else:
            seeds = [row_seed(_check_param("seed", seed, 1, cpu), i) for i in range(n_prompts)]
        s["seeds"] = seeds
        if not isinstance(return_logprobs, bool):
            raise TypeError(f"return_logprobs: expected a bool, got {type(return_logprobs).__name__}")
        s["return_logprobs"] = return_logprobs
        return s

    def _check_lengths(self, rows, max_new_tokens: int) -> None:
        for i, ids in enumerate(rows):
            if len(ids) + max_new_tokens > self.max_seq_len:
                raise ValueError(f"prompts[{i}]: {len(ids)} prompt tokens + max_new_tokens={max_new_tokens} "
                                 f"exceed max_seq_len={self.max_seq_len}")

    # ------------------------------------------------------------------ device work
    def _forward(self, lane: _Lane, **kwargs):
        kwargs[lane.cache_arg] = lane.cache
        out = lane.model(use_cache=True, **kwargs)
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits[:, -1, :]

    def _prefill(self, b: int, rows: list, settings: dict, seeds: list) -> None:
        """Reset the state for a batch of ``b`` rows (``rows`` real ones, the rest inert copies of row 0),
        run the three prompt forwards, and sample token 0."""
        n = len(rows)
        rows = rows + [rows[0]] * (b - n)
        lens = torch.tensor([len(r) for r in rows], dtype=torch.int64)
        P = int(lens.max())
        ids_host = torch.zeros(b, P, dtype=torch.int64)
        for i, r in enumerate(rows):
            ids_host[i, P - len(r):] = torch.tensor(r, dtype=torch.int64)
        pad = P - lens
        logits = []
        for lane in self.lanes:
            dev, mdtype = lane.device, lane.mask.dtype
            neg = torch.finfo(mdtype).min
            k = torch.arange(P, device=dev)
            padd = pad.to(dev)
            real = k.unsqueeze(0) >= padd.unsqueeze(1)                        # [b, P] real (non-pad) columns
            pos = (real.long().cumsum(1) - 1).clamp(min=0)
            # query q sees key k <= q among its row's real tokens; a pad query sees itself only, so no
            # softmax row is empty (NaN-free cache even in pad columns)
            allowed = (k.view(1, 1, P) <= k.view(1, P, 1)) & real.unsqueeze(1)
            allowed |= torch.eye(P, dtype=torch.bool, device=dev).unsqueeze(0)
            mask4 = torch.zeros(b, 1, P, P, dtype=mdtype, device=dev).masked_fill_(~allowed.unsqueeze(1), neg)
            lane.cache.zero_()
            lane.cache.prefill, lane.cache.seq_length = True, 0
            extra = {"logits_to_keep": 1} if lane.logits_to_keep else {}
            try:
                lg = self._forward(lane, input_ids=ids_host.to(dev), attention_mask=mask4, position_ids=pos, **extra)
            finally:
                lane.cache.prefill = False
            lane.cache.seq_length = P
            logits.append(lg.to(self.device))
            # decode mask: the row's real prompt columns; each decode step unmasks its own column
            kk = torch.arange(self.max_seq_len, device=dev)
            valid = (kk.unsqueeze(0) >= padd.unsqueeze(1)) & (kk.unsqueeze(0) < P)
            lane.mask[:b].copy_(torch.where(valid, 0.0, neg).to(mdtype).view(b, 1, 1, -1))
            # the bookkeeping advances these by one: position of token 0 = prompt length, column P
            lane.pos[:b, 0].copy_((lens - 1).to(dev))
            lane.cache.write_pos.fill_(P - 1)
            if lane.start is not None:
                lane.start[:b].copy_(padd)

        st = self.state
        for name in ("alpha", "temperature", "top_k", "top_p", "min_p"):
            getattr(st, name)[:b].fill_(settings[name])
        st.seed[:b].copy_(torch.tensor(seeds + [seeds[0]] * (b - n), dtype=torch.int64))
        st.offset[:b].zero_()
        st.max_new[:b].fill_(settings["max_new_tokens"])
        st.n_gen[:b].zero_()
        st.finish[:b].fill_(_RUNNING)
        st.err_step[:b].fill_(-1)
        st.done[:b].copy_(torch.arange(b) >= n)  # padding rows are inert from the start
        eos = settings["eos"]
        st.eos_ids.fill_(-2)
        if eos:
            st.eos_ids[:len(eos)].copy_(torch.tensor(eos, dtype=torch.int64))
        st.step.zero_()
        self._sample_and_update(b, *_three(logits))

    def _sample_and_update(self, b: int, base_logits, expert_logits, expert_base_logits) -> None:
        """Sample one token per row and do the bookkeeping; device-only (graph-capturable)."""
        st = self.state
        tok, lp = rast_sample(
            base_logits, expert_logits, expert_base_logits,
            alpha=st.alpha[:b], temperature=st.temperature[:b], top_k=st.top_k[:b], top_p=st.top_p[:b],
            min_p=st.min_p[:b], vocab_size=self.vocab_size, seed=st.seed[:b], offset=st.offset[:b],
            out=st.tok[:b], return_logprobs=True)
        done = st.done[:b]
        active = ~done
        ok = tok >= 0
        good = active & ok
        st.out_tokens[:b].index_copy_(1, st.step, torch.where(active, tok, -1).unsqueeze(1))
        st.out_lp[:b].index_copy_(1, st.step, lp.unsqueeze(1))
        n_gen = st.n_gen[:b]
        n_gen.add_(good.long())
        eos = good & (tok.unsqueeze(1) == st.eos_ids.unsqueeze(0)).any(1)
        length = good & ~eos & (n_gen >= st.max_new[:b])
        err = active & ~ok
        finish = st.finish[:b]
        finish.copy_(torch.where(err, _ERROR, torch.where(eos, _EOS, torch.where(length, _LENGTH, finish))))
        st.err_step[:b].copy_(torch.where(err, st.step.expand(b), st.err_step[:b]))
        done.logical_or_(err | eos | length)
        feed = torch.where(ok, tok, 0)  # a -1 row is finished; feed it any valid id
        for lane in self.lanes:
            lane.ids[:b, 0].copy_(feed, non_blocking=True)
            lane.pos[:b].add_(1)
            lane.cache.write_pos.add_(1).clamp_(max=self.max_seq_len - 1)
        st.step.add_(1)
        st.offset[:b].add_(1)

    def _decode_step(self, b: int, kv: int) -> None:
        """One lockstep decode step for the first ``b`` rows attending to cache columns ``[0, kv)``
        (the function the CUDA graphs capture, one per ``(b, kv)``)."""
        logits = []
        main = torch.cuda.current_stream(self.device) if self.overlap_models else None
        for lane, stream in zip(self.lanes, self._streams):
            if stream is None:
                logits.append(self._lane_step(lane, b, kv))
            else:  # fork: the side stream sees this step's inputs (written on the main stream) first
                stream.wait_stream(main)
                with torch.cuda.stream(stream):
                    logits.append(self._lane_step(lane, b, kv))
        for stream in self._streams:
            if stream is not None:
                main.wait_stream(stream)  # join before the sampler reads the logits
        self._sample_and_update(b, *_three(logits))

    def _lane_step(self, lane: _Lane, b: int, kv: int) -> torch.Tensor:
        """One model's decode forward for the first ``b`` rows: ``[b, V]`` logits on the sampling device."""
        lane.cache.kv_len = kv
        if lane.start is None:
            lane.mask[:b].index_fill_(3, lane.cache.write_pos, 0.0)  # unmask the new token's column
        else:  # the decode-attention kernel reads these bounds, not the mask
            lane.end[:b].copy_(lane.cache.write_pos.expand(b)).add_(1)  # the new token's column included
        if lane.decoder is not None:
            lg = lane.decoder(lane.ids[:b], lane.pos[:b], lane.cache, lane.start[:b], lane.end[:b], kv)
        else:
            extra = {} if lane.start is None else dict(rast_start=lane.start[:b], rast_end=lane.end[:b])
            lg = self._forward(lane, input_ids=lane.ids[:b], attention_mask=lane.mask[:b, :, :, :kv],
                               position_ids=lane.pos[:b], **extra)
        return lg.to(self.device, non_blocking=True)

    def _ensure_graph(self, b: int, kv: int):
        """Capture the decode step for batch bucket ``b`` and attended length ``kv`` (once): a throw-away
        prefill allocates the caches and sets valid indices, warm-up steps run on a side stream, then one
        step is captured. The real prefill that follows resets every buffer the warm-up touched."""
        if (b, kv) in self._graphs:
            return self._graphs[b, kv]
        self._reserve_sampler_workspace()
        dummy = dict(alpha=1.0, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_new_tokens=1, eos=[])
        self._prefill(b, [[0]] * b, dummy, [0] * b)
        self.state.done[:b].zero_()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self._decode_step(b, kv)
        torch.cuda.current_stream(self.device).wait_stream(side)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # one memory pool for all of this engine's graphs: a step keeps nothing alive in it between
        # replays (all state lives in the static buffers allocated outside), and replays never overlap
        with torch.cuda.graph(graph, pool=self._graph_pool):
            self._decode_step(b, kv)
        torch.cuda.synchronize(self.device)
        self._graphs[b, kv] = graph
        return graph

    def _reserve_sampler_workspace(self) -> None:
        """The Triton sampler keeps one cached workspace per device and grows it when a call needs more.
        A captured graph holds its raw pointer, so: size it for every bucket before the first capture (no
        growth between our captures), and keep a reference to the buffer each graph uses (if some other
        caller grows it later, the old buffer stays alive for our replays instead of being reused)."""
        try:
            from ..ops import rast_sample_triton as rst
        except ImportError:  # no Triton: the sampler has no shared workspace
            return
        for bucket in self.buckets:
            rst.reserve_workspace(bucket, self.vocab_size, self.device, True)
        self._keepalive.append(rst._WORKSPACE.get(self.device))

    def _kv_bucket(self, need: int) -> int:
        """Attended cache length for a call needing ``need`` columns: the next power of two (>= 64),
        capped at ``max_seq_len``. Graph and eager paths use the same value, so they do the same math."""
        return min(self.max_seq_len, max(64, 1 << (need - 1).bit_length()))

    def _bucket(self, n: int) -> int:
        if not self.pad_to_buckets:
            return n
        return next(x for x in self.buckets if x >= n)

    # ------------------------------------------------------------------ host loop
    def _snapshot(self, b: int, lo: int, hi: int):
        """Start copying ``n_gen``, ``done`` and output columns ``[lo, hi)`` to the host; returns a
        (host tensor [b, 2 + hi - lo], event or None)."""
        st = self.state
        stage = torch.cat([st.n_gen[:b].unsqueeze(1), st.done[:b].long().unsqueeze(1), st.out_tokens[:b, lo:hi]], 1)
        if self.device.type != "cuda":
            return stage, None
        host = torch.empty(stage.shape, dtype=stage.dtype, pin_memory=True)
        host.copy_(stage, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return host, event

    def _run_batch(self, rows: list, seeds: list, settings: dict, poll_every: int, defer: bool):
        """Generator: decode one batch (<= max_batch_size rows). Yields the host's token lists after each
        poll; returns the list of :class:`GenerationOutput`."""
        n = len(rows)
        b = self._bucket(n)
        max_steps = settings["max_new_tokens"]
        stops = settings["stop"]
        eos_ids = set(settings["eos"])
        kv = self._kv_bucket(max(len(r) for r in rows) + max_steps)
        for lane in self.lanes:  # another engine sharing a model object may have switched its attention
            set_attn_implementation(lane.model, self.attn_implementation)
        graph = self._ensure_graph(b, kv) if self.use_cuda_graph else None
        self._prefill(b, rows, settings, seeds)
        host_tokens = [[] for _ in range(n)]
        host_done = [False] * n
        stopped = [False] * n
        steps, polled, pending = 1, 0, None

        def process(snap, lo):
            data, event = snap
            if event is not None:
                event.synchronize()
            data = data.tolist()
            for i in range(n):
                if host_done[i]:
                    continue
                for t in data[i][2:]:
                    if t < 0 or t in eos_ids:  # -1: nothing sampled; an EOS id ends the row, excluded
                        break
                    host_tokens[i].append(t)
                if data[i][1]:
                    host_done[i] = True
                elif stops and not stopped[i] and _find_stop(self._decode(host_tokens[i]), stops)[0] >= 0:
                    # stop string seen: finish the row on the device (a tiny fill, no host sync)
                    stopped[i] = True
                    self.state.done[i:i + 1].fill_(True)

        while True:
            if steps % poll_every == 0 or steps >= max_steps:
                snap = self._snapshot(b, polled, steps)
                lo, polled = polled, steps
                if defer and steps < max_steps:
                    if pending is not None:
                        process(*pending)
                    pending = (snap, lo)
                else:
                    if pending is not None:
                        process(*pending)
                        pending = None
                    process(snap, lo)
                yield steps, host_tokens
                if all(host_done[i] or stopped[i] for i in range(n)) or steps >= max_steps:
                    break
            if graph is not None:
                graph.replay()
            else:
                self._decode_step(b, kv)
            steps += 1
        return self._finalize(n, steps, settings)

    def _finalize(self, n: int, steps: int, settings: dict) -> list:
        st = self.state
        tokens = st.out_tokens[:n, :steps].cpu().tolist()
        lps = st.out_lp[:n, :steps].cpu().tolist()
        n_gen = st.n_gen[:n].cpu().tolist()
        finish = st.finish[:n].cpu().tolist()
        err_step = st.err_step[:n].cpu().tolist()
        outs = []
        for i in range(n):
            toks, lp = tokens[i][:n_gen[i]], lps[i][:n_gen[i]]
            reason, stop_reason, error = "length", None, None
            if finish[i] == _EOS:
                stop_reason = toks[-1]
                toks, lp = toks[:-1], lp[:-1]
                reason = "stop"
            elif finish[i] == _ERROR:
                reason = "error"
                error = (f"rast_sample returned -1 at decode step {err_step[i]} (generated token {err_step[i]}): "
                         "the combined logits held NaN/+inf, every token was masked, or a sampling parameter "
                         "was out of range")
            text = None
            if settings["stop"]:
                k, s = _stop_prefix(self._decode, toks, settings["stop"])
                if k is not None:
                    full = self._decode(toks[:k])
                    text = full[:_find_stop(full, settings["stop"])[0]]
                    toks, lp = toks[:k], lp[:k]
                    reason, stop_reason, error = "stop", s, None
            if text is None:
                text = self._decode(toks)
            outs.append(GenerationOutput(
                text=text, token_ids=toks, num_prompt_tokens=0, finish_reason=reason, stop_reason=stop_reason,
                error=error, logprobs=lp if settings["return_logprobs"] else None))
        return outs

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    # ------------------------------------------------------------------ public API
    def generate(self, prompts, *, alpha=1.0, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                 max_new_tokens: int = 256, stop=None, eos_token_id=None, seed=0, return_logprobs: bool = False,
                 progress: Optional[bool] = None) -> list:
        """Generate for each prompt.

        Parameters
        ----------
        prompts : str, list[str], list[int] or list[list[int]]
            One prompt (a string or a flat list of token ids) or several. Strings are tokenized with
            the tokenizer's special tokens (e.g. BOS). A prompt with no tokens raises ``ValueError``
            (``""`` does unless the tokenizer adds a BOS token). An empty list returns ``[]``.
        alpha, temperature, top_k, top_p, min_p : number
            The RAST combination and sampling filters (:func:`rast_kernels.rast_sample`);
            ``temperature=0`` is greedy.
        max_new_tokens : int
            Tokens to generate at most per prompt; prompt + max_new_tokens must fit ``max_seq_len``.
        stop : str or list[str], optional
            Stop strings: the row ends once its text contains one; the text is cut before it.
        eos_token_id : int or list[int], optional
            Ids that end a row (not included in the output). Default: the tokenizer's EOS and the base
            model's ``generation_config.eos_token_id``; ``[]`` disables EOS stopping.
        seed : int or list[int]
            An int: prompt ``i`` uses ``row_seed(seed, i)``; a list: one int64 seed per prompt, as is.
        return_logprobs : bool
            Fill :attr:`GenerationOutput.logprobs`.
        progress : bool, optional
            tqdm progress bar over decode steps; default: on when stderr is a terminal and
            ``len(prompts) * max_new_tokens >= 1024``.

        Returns
        -------
        list[GenerationOutput]
            One per prompt, in order (a single prompt gives a list of one).
        """
        rows = self._normalize_prompts(prompts)
        settings = self._sampling_settings(len(rows), alpha, temperature, top_k, top_p, min_p, max_new_tokens,
                                           stop, eos_token_id, seed, return_logprobs)
        self._check_lengths(rows, settings["max_new_tokens"])
        if not rows:
            return []
        if progress is None:
            progress = sys.stderr.isatty() and len(rows) * settings["max_new_tokens"] >= 1024
        chunks = [range(i, min(i + self.max_batch_size, len(rows))) for i in range(0, len(rows), self.max_batch_size)]
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(chunks) * settings["max_new_tokens"], desc="rast_generate", unit="step")
        outs = []
        try:
            with torch.no_grad():
                for ch in chunks:
                    gen = self._run_batch([rows[i] for i in ch], [settings["seeds"][i] for i in ch], settings,
                                          poll_every=self.poll_interval, defer=self.defer_polls)
                    last = 0
                    while True:
                        try:
                            steps, _ = next(gen)
                        except StopIteration as fin:
                            batch_outs = fin.value
                            break
                        if bar is not None:
                            bar.update(steps - last)
                            last = steps
                    if bar is not None:
                        bar.update(settings["max_new_tokens"] - last)
                    for i, o in zip(ch, batch_outs):
                        o.num_prompt_tokens = len(rows[i])
                    outs.extend(batch_outs)
        finally:
            if bar is not None:
                bar.close()
        return outs

    def stream(self, prompt, **kwargs) -> Iterator[str]:
        """Generate for one prompt (a string or a flat list of token ids), yielding text increments as
        they become final: an incomplete multi-byte character (a trailing U+FFFD) and a tail that could
        still start a stop string are held back. The concatenation equals ``generate(...)[0].text``.
        Keywords: as :meth:`generate` (``progress`` is ignored)."""
        kwargs.pop("progress", None)
        rows = self._normalize_prompts(prompt)
        if len(rows) != 1:
            raise ValueError(f"prompt: stream takes one prompt, got {len(rows)}")
        settings = self._sampling_settings(1, **{k: kwargs.get(k, v) for k, v in _GEN_DEFAULTS.items()})
        unknown = set(kwargs) - set(_GEN_DEFAULTS)
        if unknown:
            raise TypeError(f"stream: unexpected keyword(s) {sorted(unknown)}")
        self._check_lengths(rows, settings["max_new_tokens"])
        stops = settings["stop"]
        hold = max((len(s) for s in stops), default=1) - 1
        emitted = ""
        with torch.no_grad():
            gen = self._run_batch(rows, settings["seeds"], settings, poll_every=1, defer=False)
            while True:
                try:
                    _, host_tokens = next(gen)
                except StopIteration as fin:
                    final = fin.value[0].text
                    break
                text = self._decode(host_tokens[0])
                at, _ = _find_stop(text, stops)
                if at >= 0:
                    safe = text[:at]
                else:
                    safe = text.rstrip("\ufffd")
                    if hold:
                        safe = safe[:max(len(emitted), len(safe) - hold)]
                if len(safe) > len(emitted) and safe.startswith(emitted):
                    yield safe[len(emitted):]
                    emitted = safe
        if final.startswith(emitted):
            if len(final) > len(emitted):
                yield final[len(emitted):]
        else:  # the tokenizer's decode of a prefix was not a prefix of the final decode
            warnings.warn("stream: streamed text diverged from the final decode; the tail is not exact")

    def __repr__(self) -> str:
        names = {r: type(m).__name__ for r, m in self.models.items()}
        return (f"RastEngine({names}, devices={ {r: str(d) for r, d in self.devices.items()} }, "
                f"max_batch_size={self.max_batch_size}, max_seq_len={self.max_seq_len}, "
                f"use_cuda_graph={self.use_cuda_graph}, fused_decode={self.fused_decode}, "
                f"overlap_models={self.overlap_models})")


_GEN_DEFAULTS = dict(alpha=1.0, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, max_new_tokens=256, stop=None,
                     eos_token_id=None, seed=0, return_logprobs=False)


def _three(logits: list) -> list:
    """The sampler's three logit rows: the base model alone gives ``z = base + alpha * (base - base)``,
    which is exactly ``base`` (``x - x == 0`` for finite x; a ``-inf`` column stays masked)."""
    return logits if len(logits) == 3 else logits * 3


def _find_stop(text: str, stops: Sequence[str]):
    """(index of the earliest stop-string occurrence in ``text`` or -1, that stop string or None)."""
    best, which = -1, None
    for s in stops:
        j = text.find(s)
        if j >= 0 and (best < 0 or j < best):
            best, which = j, s
    return best, which


def _stop_prefix(decode, toks: list, stops: Sequence[str]):
    """The fewest leading tokens whose decoded text contains a stop string, and that string; (None, None)
    if the full text has none. Binary search: containing a stop string is monotone in the prefix."""
    if not toks or _find_stop(decode(toks), stops)[0] < 0:
        return None, None
    lo, hi = 1, len(toks)
    while lo < hi:
        mid = (lo + hi) // 2
        if _find_stop(decode(toks[:mid]), stops)[0] >= 0:
            hi = mid
        else:
            lo = mid + 1
    return lo, _find_stop(decode(toks[:lo]), stops)[1]
