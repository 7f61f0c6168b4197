"""``RastEngine``: the base and K expert pairs decoded in lockstep, serving requests continuously.

Every decode step the models read the same token per row, :func:`rast_kernels.rast_sample` turns their logit rows
into one token per row (``z = z_base + sum_i alpha_i * (z_expert_i - z_expert_base_i)``, then temperature / top-k /
top-p / min-p, each row with its own request's settings), and that token is fed back to all of them.

One step of the engine (:meth:`RastEngine.step`) is a value passed down the layers::

    plan = scheduler.schedule(window)      # StepPlan: preemptions, slot moves, new blocks, admissions, decode rows
    snapshot = runner.execute(plan)        # the device: prefill, a window of decode steps, a host copy of the rows
    outputs = processor.process(snapshot)  # new tokens, finished sequences, stop strings -> GenerationOutput

How the pieces fit (one module per job): :mod:`.config` (:class:`EngineConfig`, every setting), :mod:`.build`
(models, tokenizer, sharding, pool size, lanes), :mod:`.inputs` (prompts, settings and seeds checked),
:mod:`.request` (requests and sequences), :mod:`.block_manager` and :mod:`.scheduler` (the host), :mod:`.plan`
(the step contract), :mod:`.runner`, :mod:`.lanes`, :mod:`.slot_state`, :mod:`.cache`, :mod:`.speculative`
(the device), :mod:`.output_processor` and :mod:`.detokenize` (outputs), and this module: the public API
(:meth:`RastEngine.add_request`, :meth:`~RastEngine.step`, :meth:`~RastEngine.run`,
:meth:`~RastEngine.abort_request`, and :meth:`~RastEngine.generate` / :meth:`~RastEngine.stream` built on them).

A request's tokens depend only on its prompt, its settings and its seed (the sampler's random numbers are keyed by
``(seed, offset = token index, column)``; each row's attention reads only its own blocks): not on the arrival
order, the other requests, the slot it got, the block size, the pool size, preemption (a preempted sequence is
recomputed from its prompt plus the tokens it had, and continues with the tokens it would have produced) or
speculation, up to floating-point differences between batch shapes, which change a token only where two
candidates tie to within rounding. On CUDA a window's snapshot is read one window late, so the GPU queue never
drains and ``step()`` never waits for a host-to-device copy.
"""
from __future__ import annotations

import sys
import time
import warnings
from typing import Iterator, List, Optional

import torch

from ..ops.philox import mix_seed
from .build import build_engine
from .config import EngineConfig
from .detokenize import IncrementalText
from .inputs import check_request, normalize_prompts, one_params, params_list
from .output_processor import OutputProcessor
from .outputs import GenerationOutput
from .request import FINISHED, Request, RowSettings, Sequence
from .sampling_params import SamplingParams, sample_seed
from .scheduler import Scheduler

POLL_INTERVAL = 4  # decode steps (rounds) per host poll: on CPU the 4-step window keeps the host's per-poll work
# off the per-token time (measured on the tiny trio: 3.59 ms per step polling every step, 3.19 every 4)


class RastEngine:
    """Three causal LMs decoded in lockstep with the fused RAST sampler, from a paged KV cache.

    ``RastEngine(base, expert, expert_base, **settings)`` or ``RastEngine(base, expert, expert_base,
    config=EngineConfig(...))`` (keywords override the config's fields): the settings below are the fields of
    :class:`~.config.EngineConfig`, shared with every entry point. A bad one raises naming it
    (:class:`~rast_kernels.params.ParamError`), an unknown one is a ``TypeError``.

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
    config : EngineConfig, optional
        The settings below as one value (:class:`~rast_kernels.engine.EngineConfig`); keywords override its fields.
    **settings
        Any of the settings below, by name.

    Other Parameters
    ----------------
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
        ``gpu_memory_utilization * total memory`` after what is in use, the peak of the largest prefill chunk and
        decode step (measured once at construction) and the CUDA graphs' pool (:mod:`.memory`;
        :attr:`pool_sizing` says how), at most ``max_batch_size * max_seq_len``; on CPU:
        ``max_batch_size * max_seq_len``. Under tensor parallelism the ranks of a group agree on their minimum.
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
    speculative_tokens : int
        ``k`` in ``[0, 15]``: tokens the small models draft per round, which the base (and the models not
        drafting) verify in one forward over ``k + 1`` positions (:mod:`.speculative`). The tokens are plain
        decoding's (``k = 0``, the default), up to the usual floating-point ties; it pays when the drafts agree
        with the target often and the base's ``k + 1``-token forward costs little more than a one-token one
        (``benchmarks/RESULTS.md``). Needs at least one expert pair whose models are not the base.
    speculative_draft : {"expert", "combination"}
        The draft: the first pair's expert alone (default), or the small models' own combination
        ``z_eb + sum_i alpha_i (z_e_i - z_eb_i)`` with the first expert base standing in for the base.
    diagnostics : bool
        Record per generated token, on the device inside the step (no host synchronisation), whether the delta
        moved the argmax relative to the base alone, ``KL(p_base || p_rast)`` at the row's temperature (1 for
        greedy rows; no filters), and the chosen token's probability under the base alone and under RAST:
        :attr:`GenerationOutput.diagnostics`. Costs two extra softmaxes over the vocabulary per row and step.
    """


    def __init__(self, base, expert=None, expert_base=None, config: Optional[EngineConfig] = None, **settings):
        if config is not None and not isinstance(config, EngineConfig):
            raise TypeError(f"config: expected an EngineConfig, got {type(config).__name__}")
        cfg = (config or EngineConfig()).replace(**settings)
        parts = build_engine(base, expert, expert_base, cfg)
        self.config = cfg
        for name in ("roles", "num_pairs", "devices", "device", "models", "shared", "lane_roles", "attn",
                     "tokenizer", "vocab_size", "parallel", "fused_decode", "use_cuda_graph", "overlap_models",
                     "allocator", "runner", "pool_sizing", "speculation", "default_eos"):
            setattr(self, name, getattr(parts, name))
        self.max_batch_size, self.max_seq_len, self.block_size = cfg.max_batch_size, cfg.max_seq_len, cfg.block_size
        self.max_prefill_tokens, self.diagnostics = cfg.prefill_tokens, cfg.diagnostics
        self.kv_cache_tokens = self.pool_sizing.tokens
        self.tensor_parallel_size = self.parallel.tp_size if self.parallel is not None else 1
        self.scheduler = Scheduler(self.max_batch_size, self.allocator, self.max_seq_len, cfg.scheduling,
                                   max_prefill_tokens=self.max_prefill_tokens,
                                   speculative_tokens=cfg.speculative_tokens)
        self.processor = OutputProcessor(self.scheduler, self._decode, self.diagnostics)
        self.poll_interval = POLL_INTERVAL
        self.defer_polls = self.device.type == "cuda"  # read a window's snapshot one window late
        self._pending = None
        self._requests: dict = {}
        self._num_requests = 0  # requests made so far (ids, arrival order, default seeds)

    # ------------------------------------------------------------------ properties
    @property
    def lanes(self):
        return self.runner.lanes

    @property
    def tokens_generated(self) -> int:
        return self.processor.tokens_generated

    @property
    def pad_to_buckets(self) -> bool:
        """Pad the decode batch to the graph buckets (always with CUDA graphs; tests set it to exercise inert
        padding rows eagerly)."""
        return self.runner.pad_to_buckets

    @pad_to_buckets.setter
    def pad_to_buckets(self, value: bool) -> None:
        self.runner.pad_to_buckets = bool(value)

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    # ------------------------------------------------------------------ public API: requests
    def resolve_requests(self, prompts, sampling_params=None, *, seed=0, **kwargs) -> List[tuple]:
        """``[(token ids, SamplingParams with its seed set)]`` per prompt: what :meth:`generate` with these
        arguments would queue, checked the same way (every error before anything runs) and with the same seed
        rules, queuing nothing. :meth:`generate` of any subset of them, each with its own params, gives those
        prompts' outputs of the whole call (data parallelism splits a call this way)."""
        rows = normalize_prompts(prompts, self.tokenizer, self.vocab_size)
        out = []
        for i, (ids, (p, s)) in enumerate(zip(rows, params_list(len(rows), sampling_params, seed, kwargs))):
            check_request(self, ids, p, f"prompts[{i}]")
            out.append((ids, p.with_seed(s)))
        return out

    def add_request(self, prompt, sampling_params: Optional[SamplingParams] = None, **kwargs) -> str:
        """Queue one prompt (a string or a flat list of token ids) with its settings (a :class:`SamplingParams`, or
        its fields as keywords); returns the request id. Everything is validated here, before anything runs.
        ``seed=None`` (the default) gives the ``r``-th request of this engine ``mix_seed(0, r)``."""
        rows = normalize_prompts(prompt, self.tokenizer, self.vocab_size)
        if len(rows) != 1:
            raise ValueError(f"prompt: add_request takes one prompt, got {len(rows)}")
        params = one_params(sampling_params, kwargs)
        seed = params.seed if params.seed is not None else mix_seed(0, self._num_requests)
        req = self._make_request(rows[0], params, seed, "prompt", 0)
        self._enqueue([req])
        return req.request_id

    def _make_request(self, ids: List[int], params: SamplingParams, seed: int, name: str, index: int) -> Request:
        """A validated :class:`Request` (``name``: how errors call the prompt, e.g. ``prompts[3]``)."""
        eos = check_request(self, ids, params, name)
        number, self._num_requests = self._num_requests, self._num_requests + 1
        req = Request(request_id=f"req-{number}", prompt=ids, params=params.with_seed(seed), eos=tuple(eos),
                      prompt_index=index, arrival=number,
                      settings=RowSettings.from_params(params, eos, self.num_pairs))
        req.sequences = [Sequence(request=req, sample_index=j, seed=sample_seed(seed, j)) for j in range(params.n)]
        for seq in req.sequences:
            seq.detok = IncrementalText(self._decode, params.stop)
        return req

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
            if seq.status != FINISHED:
                seq.finish_reason = "abort"
                self.processor.finish(seq, deactivate=True)
        self._requests.pop(request_id, None)

    def stats(self) -> dict:
        """Counts for monitoring: requests running / waiting, KV blocks used / total, tokens generated; with
        speculation also (``speculative_*``, since construction, as of the last window read; no device
        synchronisation) row-rounds, drafted tokens, drafts checked against the target, accepted drafts, tokens
        kept, the mean tokens per round and the acceptance rate (accepted / checked)."""
        out = dict(running=self.scheduler.num_running, waiting=len(self.scheduler.waiting),
                   kv_blocks_used=self.allocator.num_used, kv_blocks_total=self.allocator.num_blocks,
                   block_size=self.block_size, tokens_generated=self.tokens_generated)
        if self.speculation is not None:  # as of the last snapshot read (no device read here)
            spec = self.speculation.stats(self.processor.device_counters)
            out.update({f"speculative_{k}": v for k, v in spec.items()})
            out["speculative_tokens_per_round"] = spec["emitted"] / spec["rounds"] if spec["rounds"] else 0.0
            out["speculative_acceptance"] = spec["accepted"] / spec["checked"] if spec["checked"] else 0.0
        return out

    # ------------------------------------------------------------------ the step
    def step(self) -> List[GenerationOutput]:
        """One engine step: plan -> execute -> process (module docstring). Returns one :class:`GenerationOutput`
        per sequence that got new tokens or finished since the last call (``finished`` tells which; a running one
        holds its tokens so far and the text that can no longer change)."""
        updates: dict = {}
        with torch.no_grad():
            if self._pending is not None and self._pending.ready():
                self._read(updates)
            snapshot = self.runner.execute(self.scheduler.schedule(self.poll_interval))
            if self._pending is not None:
                self._read(updates)  # the previous window's, one window late (CUDA)
            self._pending = snapshot
            if not self.defer_polls and snapshot is not None:
                self._read(updates)
        return [self.processor.output(s) for s in updates]

    def _read(self, updates: dict) -> None:
        snapshot, self._pending = self._pending, None
        self.processor.process(snapshot, updates)
        for seq in updates:
            if seq.status == FINISHED and seq.request.finished:
                self._requests.pop(seq.request.request_id, None)

    def run(self) -> Iterator[GenerationOutput]:
        """Step until every queued request is finished, yielding each finished sequence's output as it finishes."""
        while self.scheduler.has_work() or self._pending is not None:
            for out in self.step():
                if out.finished:
                    yield out

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
        rows = normalize_prompts(prompts, self.tokenizer, self.vocab_size)
        plist = params_list(len(rows), sampling_params, seed, kwargs)
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
        rows = normalize_prompts(prompt, self.tokenizer, self.vocab_size)
        if len(rows) != 1:
            raise ValueError(f"prompt: stream takes one prompt, got {len(rows)}")
        (params, s), = params_list(1, sampling_params, seed, kwargs)
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
                f"tensor_parallel_size={self.tensor_parallel_size}, "
                f"speculative_tokens={self.config.speculative_tokens})")
