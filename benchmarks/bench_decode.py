"""Benchmark three-model RAST decoding: this engine against the peer loop and the weight-bandwidth floor.

For a trio (base, expert, expert base) of random-init models built from the real configs in
``benchmarks/configs`` and each batch size, it reports ms per decode token (all rows advance together)
and tokens/s for

* ``engine``: ``rast_kernels.RastEngine(...).generate`` with its defaults (on CUDA: CUDA graph, the fused
  decode forward with the paged decode-attention kernel). Its per-token time is the median duration of the
  engine's steady-state ``step()`` calls divided by the decode steps each runs (its ``poll_interval``), the same
  statistic as the peer loop's per-step median;
* ``engine_hf_forward``: the same engine with ``fused_decode=False``: transformers' forward at decode, with the
  decode-attention kernel (``attn_implementation="rast_decode"``);
* ``engine_sdpa``: ``fused_decode=False, attn_implementation="sdpa"``: transformers' forward with SDPA and a
  mask over the cache, captured in the same graph (what graph capture alone gives);
* ``engine_overlap``: the defaults plus ``overlap_models=True`` (the two small models on their own streams);
* ``engine_2pairs``: the defaults with two expert pairs, ``RastEngine(base, [expert, expert_2],
  [expert_base, expert_base_2])``: the trio plus the smaller pair of ``models.SECOND_PAIRS`` (for ``qwen``:
  Qwen2.5-7B + the deltas of Qwen2.5-1.5B and Qwen2.5-0.5B), five models in lockstep, one sampling call;
* ``peer_loop``: the peer baseline (``peer_loop.py``: eager HF forwards with ``DynamicCache``, the
  HF-style sampler chain, a host sync per token), timed per step;
* ``base_alone``: the base model alone, (1) through the same engine (``RastEngine(base, None, None)``:
  same cache, graph and sampler, one forward per step) and (2) in the same eager HF loop as the peer
  baseline;
* ``floor``: bytes of all weights of the three models read once per step over the device's copy
  bandwidth (measured here), and the same for the base alone and for the five models of two pairs.

Every row carries ``pairs``: the expert pairs it combines (0 for the base alone), and ``tensor_parallel_size``.

Tensor parallelism (``--tensor-parallel-size N`` under ``torchrun --nproc-per-node=N``, one TP group): every
engine shards the base over the N ranks (``--shard-experts``: the experts too, else replicated), every rank makes
the same calls, global rank 0 prints and writes the JSON with its own step times. The floors are per rank: the
base's bytes / N plus the replicated experts' (all / N with ``--shard-experts``). The eager single-process
baselines (``peer_loop``, the eager half of ``base_alone``) do not run. The engine shards its models in place, so
each engine gets freshly built ones, and a model to be sharded is built with one copy of its layers
(``models.build_model(share_layers=True)``): no rank ever holds a whole 70B base. ``RAST_FORCE_PG=1`` with
``--tensor-parallel-size 1`` runs the same code path as a one-rank process group (NCCL on one GPU, gloo on CPU).

Examples::

    python benchmarks/bench_decode.py --out out/                        # Qwen2.5-7B + 2 x Qwen2.5-1.5B, B=1 and 8
    python benchmarks/bench_decode.py --trio llama --batch 1 --out out/ # Llama-3.1-8B + 2 x Llama-3.2-1B
    python benchmarks/bench_decode.py --tiny --out out/                 # tiny random models on CPU (smoke)
    python benchmarks/bench_decode.py --trio qwen-small --device cpu --dtype fp32 --systems engine engine_2pairs \
        --batch 1 --out out/                                            # one vs two pairs on CPU
    torchrun --standalone --nproc-per-node=8 benchmarks/bench_decode.py --trio llama-70b --tensor-parallel-size 8 \
        --batch 1 32 --prompt-len 2048 --new-tokens 128 --systems engine floor --out runs/tp8  # 70B over 8 GPUs

Writes ``decode.json`` under ``--out``. Random weights: the numbers are about speed, not text.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

import models
from rast_kernels import _cli
from rast_kernels.parallel import groups
from common import copy_bandwidth, device_name, run_to_json, sync, utc_now, versions
from peer_loop import peer_generate, peer_generate_single

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# engine variants: system -> RastEngine keywords
ENGINE_VARIANTS = {
    "engine": {},
    "engine_hf_forward": dict(fused_decode=False, attn_implementation="rast_decode"),
    "engine_sdpa": dict(fused_decode=False, attn_implementation="sdpa"),
    "engine_overlap": dict(overlap_models=True),
}
SYSTEMS = (*ENGINE_VARIANTS, "engine_2pairs", "peer_loop", "base_alone", "floor")
# time_engine times steady-state step() calls: 2 + 3 poll windows of the engine's 4 decode steps at least
MIN_NEW_TOKENS = 2 + 3 * 4
# the floor row of each number of pairs (0: the base alone)
FLOORS = {0: "floor_base_alone", 1: "floor", 2: "floor_2pairs"}
# single-process eager loops: not under tensor parallelism (base_alone's engine half still runs)
SINGLE_PROCESS = ("peer_loop",)


def parse_args(argv=None) -> argparse.Namespace:
    p = _cli.ArgumentParser(prog="bench_decode.py", description=__doc__.split("\n\n")[0].replace("``", ""),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trio", default="qwen", choices=sorted(models.TRIOS),
                   help="base/expert/expert-base configs: "
                   + "; ".join(f"{k}={'+'.join(v)}" for k, v in models.TRIOS.items()))
    p.add_argument("--tiny", action="store_true",
                   help="tiny random Qwen2-family models (different vocab widths) on CPU in fp32: a smoke run")
    p.add_argument("--device", type=_cli.device, default=None,
                   help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="weights (default bf16; fp32 with --tiny)")
    p.add_argument("--batch", type=_cli.int_range(1, 4096), nargs="+", default=None,
                   help="batch sizes, 1..4096 (default 1 8; 1 2 with --tiny)")
    p.add_argument("--prompt-len", type=_cli.int_range(1), default=None,
                   help="prompt tokens per row, >= 1 (default 256; 16 with --tiny)")
    p.add_argument("--new-tokens", type=_cli.int_range(MIN_NEW_TOKENS), default=None,
                   help=f"tokens generated per row, >= {MIN_NEW_TOKENS} (steady-state engine steps need three poll "
                        "windows past the first token; default 128; 16 with --tiny)")
    p.add_argument("--peer-new-tokens", type=_cli.int_range(2), default=None,
                   help="tokens for the peer loop, >= 2 (default: --new-tokens)")
    p.add_argument("--repeats", type=_cli.int_range(1), default=None,
                   help="timed runs per system, median taken, >= 1 (default 3; 1 with --tiny)")
    p.add_argument("--systems", nargs="+", default=None, choices=SYSTEMS,
                   help="what to time (default: all; without peer_loop under tensor parallelism)")
    p.add_argument("--alpha", type=_cli.finite_float, default=1.0, help="weight of each expert pair's delta (default 1)")
    p.add_argument("--temperature", type=_cli.float_range(0.0), default=1.0, help="sampling temperature, >= 0 (default 1)")
    p.add_argument("--top-p", type=_cli.float_range(0.0, 1.0, lo_open=True), default=0.95,
                   help="nucleus threshold in (0, 1] (default 0.95, as RAST's runs)")
    p.add_argument("--no-cuda-graph", action="store_true", help="engine: use_cuda_graph=False")
    p.add_argument("--max-seq-len", type=_cli.int_range(2), default=None,
                   help="engine cache length (default: prompt + new tokens + 16)")
    p.add_argument("--copy-mib", type=_cli.int_range(1), default=None,
                   help="copy-bandwidth probe size, >= 1 (default 1024 CUDA, 64 CPU)")
    p.add_argument("--tensor-parallel-size", type=_cli.int_range(1), default=None,
                   help="shard the base over this many ranks: all of a torchrun --nproc-per-node=N launch "
                   "(default: its world size, else 1); global rank 0 prints and writes decode.json. "
                   "1 with env RAST_FORCE_PG=1: the same code path as a one-rank process group")
    p.add_argument("--shard-experts", action="store_true",
                   help="with tensor parallelism, shard the experts too (default: replicated on every rank)")
    p.add_argument("--out", type=_cli.output_dir, default=None, help="directory for decode.json")
    args = p.parse_args(argv)
    args.out = Path(args.out) if args.out is not None else None
    _parallel_args(p, args)
    launch = (f"torchrun --nproc-per-node={args.world_size} " if groups.launched() else
              "RAST_FORCE_PG=1 " if args.tp_path else "")
    args.command = launch + " ".join([Path(__file__).name, *(sys.argv[1:] if argv is None else argv)])
    tiny = args.tiny
    args.device = args.device or ("cpu" if tiny or not torch.cuda.is_available() else "cuda")
    args.dtype = args.dtype or ("fp32" if tiny else "bf16")
    args.batch = args.batch or ([1, 2] if tiny else [1, 8])
    args.prompt_len = args.prompt_len or (16 if tiny else 256)
    args.new_tokens = args.new_tokens or (16 if tiny else 128)
    args.peer_new_tokens = args.peer_new_tokens or args.new_tokens
    args.repeats = args.repeats or (1 if tiny else 3)
    if args.max_seq_len is not None and args.max_seq_len < args.prompt_len + args.new_tokens:
        _cli.fail(p, "--max-seq-len", f"{args.max_seq_len} is shorter than --prompt-len + --new-tokens "
                  f"({args.prompt_len + args.new_tokens})")
    return args


def _parallel_args(p, args) -> None:
    """Resolve and check the tensor-parallel options (one TP group of every rank of the launch) and
    ``--systems``; sets ``world_size``, ``rank``, ``tp_path`` (the engines shard: a TP group exists)."""
    launched = groups.launched()
    args.world_size = int(os.environ["WORLD_SIZE"]) if launched else 1
    args.rank = int(os.environ["RANK"]) if launched else 0
    tp = args.tensor_parallel_size = args.tensor_parallel_size or args.world_size
    if tp != args.world_size:
        _cli.fail(p, "--tensor-parallel-size", f"{tp} needs all ranks of torchrun --standalone --nproc-per-node={tp} "
                  f"benchmarks/bench_decode.py ... (this launch has {args.world_size} process(es))")
    args.tp_path = launched or groups.group_forced()
    if args.shard_experts and not args.tp_path:
        _cli.fail(p, "--shard-experts", "needs tensor parallelism: torchrun with --tensor-parallel-size, "
                  "or env RAST_FORCE_PG=1")
    if launched and args.world_size > 1 and args.device not in (None, "cpu", "cuda"):
        _cli.fail(p, "--device", f"{args.device}: under torchrun each rank uses cuda:LOCAL_RANK; give cuda or cpu")
    if args.systems is None:
        args.systems = [s for s in SYSTEMS if tp == 1 or s not in SINGLE_PROCESS]
    elif tp > 1 and set(args.systems) & set(SINGLE_PROCESS):
        _cli.fail(p, "--systems", f"{', '.join(SINGLE_PROCESS)}: one process, not with --tensor-parallel-size {tp}")


def make_prompts(B: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """``B`` random prompts of ``length`` ids in ``[2, vocab)`` (ids 0/1 are pad/eos in the tiny configs)."""
    gen = torch.Generator().manual_seed(seed + B)
    return torch.randint(2, vocab, (B, length), generator=gen).tolist()


class EngineRunner:
    """Adapter over ``rast_kernels.RastEngine``: builds it once and times ``generate``."""

    def __init__(self, trio, args, max_batch: int, tokenizer, **engine_kwargs):
        from rast_kernels import RastEngine

        self.args = args
        max_seq_len = args.max_seq_len or args.prompt_len + args.new_tokens + 16
        self.engine = RastEngine(*trio, tokenizer=tokenizer, dtype=DTYPES[args.dtype], max_batch_size=max_batch,
                                 max_seq_len=max_seq_len, use_cuda_graph=not args.no_cuda_graph, **engine_kwargs)

    def time_generate(self, prompts, n: int) -> tuple:
        """``(wall seconds, [seconds of each engine.step()])`` of generating ``n`` tokens for every prompt."""
        from rast_kernels import SamplingParams

        engine = self.engine
        # random models can draw an EOS id by chance (about 1 in V per token): eos_token_id=[] disables
        # EOS stopping, so every row runs exactly n steps
        params = SamplingParams(max_new_tokens=n, alpha=self.args.alpha, temperature=self.args.temperature,
                                top_p=self.args.top_p, eos_token_id=[])
        sync(self.args.device)
        t = time.perf_counter()
        for i, p in enumerate(prompts):
            engine.add_request(p, params.with_seed(i))
        steps, lengths = [], set()
        while engine.has_unfinished_requests():
            t_step = time.perf_counter()
            outs = engine.step()
            steps.append(time.perf_counter() - t_step)
            lengths |= {len(o.token_ids) for o in outs if o.finished}
        sync(self.args.device)
        elapsed = time.perf_counter() - t
        if lengths != {n}:
            raise RuntimeError(f"engine produced {sorted(lengths)} tokens per row, not {n}")
        return elapsed, steps


def time_engine(runner: EngineRunner, prompts, n: int, repeats: int) -> dict:
    """ms per decode step: the median duration of the engine's steady-state ``step()`` calls (each runs
    ``poll_interval`` decode steps; the first call admits and prefills, the last ones drain), the same statistic
    as the peer loop's per-step median; and the first-token latency from a 1-token run."""
    runner.time_generate(prompts, min(n, 4))  # warm-up: graph capture for this batch size, allocator
    k = runner.engine.poll_interval
    if n < 2 + 3 * k:
        raise RuntimeError(f"--new-tokens {n}: need at least {2 + 3 * k} to time steady-state steps")
    t1s, tns, per_step = [], [], []
    for _ in range(repeats):
        t1s.append(runner.time_generate(prompts, 1)[0])
        tn, steps = runner.time_generate(prompts, n)
        tns.append(tn)
        per_step += [s / k for s in steps[1:-2]]
    return {"ms_per_token": statistics.median(per_step) * 1e3, "first_token_ms": statistics.median(t1s) * 1e3,
            "e2e_s": statistics.median(tns), "runs_e2e_s": tns, "runs_first_token_s": t1s,
            "steps_timed": len(per_step)}


def time_peer(trio, prompts, n: int, repeats: int, args, vocab_size: int) -> dict:
    kw = dict(alpha=args.alpha, temperature=args.temperature, top_p=args.top_p, vocab_size=vocab_size)
    peer_generate(*trio, prompts[:1], max_new_tokens=2, **kw)  # warm-up (kernels, allocator)
    steps, prefills, e2e = [], [], []
    for r in range(repeats):
        res = peer_generate(*trio, prompts, max_new_tokens=n, seed=r, **kw)
        steps.append(statistics.median(res.step_s))
        prefills.append(res.prefill_s)
        e2e.append(res.prefill_s + sum(res.step_s))
    return {"ms_per_token": statistics.median(steps) * 1e3, "first_token_ms": statistics.median(prefills) * 1e3,
            "e2e_s": statistics.median(e2e), "runs_e2e_s": e2e}


def time_base_alone_eager(base, prompts, n: int, repeats: int, args) -> dict:
    """The base model alone in the same eager loop (its own logits through the HF-style sampler)."""
    kw = dict(temperature=args.temperature, top_p=args.top_p)
    peer_generate_single(base, prompts[:1], max_new_tokens=2, **kw)
    steps, e2e = [], []
    for r in range(repeats):
        res = peer_generate_single(base, prompts, max_new_tokens=n, seed=r, **kw)
        steps.append(statistics.median(res.step_s))
        e2e.append(res.prefill_s + sum(res.step_s))
    return {"ms_per_token": statistics.median(steps) * 1e3, "e2e_s": statistics.median(e2e), "runs_e2e_s": e2e}


def _attempt(system: str, fn, multi_rank: bool = False, **extra) -> dict:
    """``{"system": ..., **extra, **fn()}``, or the error if ``fn`` raises (one broken system must not
    lose the others' numbers). With several ranks it raises: a rank that carried on alone would wait in a
    collective its peers never join (torchrun's agent stops them all; the JSON keeps the rows so far)."""
    row = {"system": system, **extra}
    try:
        row.update(fn())
    except Exception as exc:
        if multi_rank:
            raise
        traceback.print_exc()
        row.update(ms_per_token=None, error=f"{type(exc).__name__}: {exc}")
    return row


def _engine_attn(engine):
    """The base model's attention implementation in ``engine`` (``engine.attn`` maps role -> name)."""
    name = getattr(engine, "attn_implementation", None)
    return name if name is not None else (getattr(engine, "attn", None) or {}).get("base")


def _use_sdpa(trio) -> None:
    for m in trio:
        if hasattr(m, "set_attn_implementation"):
            m.set_attn_implementation("sdpa")
        else:
            m.config._attn_implementation = "sdpa"


class Models:
    """The trio (and the second pair when timed), built again for every engine that shards them: the engine
    shards the base (and with ``--shard-experts`` the experts) in place, so no model serves two engines then.
    Under TP > 1 the models to be sharded are built with one copy of their layers (``share_layers``)."""

    def __init__(self, args, device):
        self.args, self.device, self.trio, self.second = args, device, None, None
        self.build_s, self.second_names = 0.0, []
        tp = args.tensor_parallel_size > 1
        self.share = (tp, tp and args.shard_experts, tp and args.shard_experts)

    def get(self):
        """``(trio, second pair or [])``, building them if they are not built or an engine sharded them."""
        if self.trio is None:
            if self.device.type == "cuda":  # what the previous engine and its sharded models held
                torch.cuda.empty_cache()
            args, t, name = self.args, time.perf_counter(), None if self.args.tiny else self.args.trio
            self.trio, self.names = models.build_trio(name, self.device, DTYPES[args.dtype], self.share)
            # the second pair only when it is timed (on a GPU its two models cost memory and build time)
            self.second, self.second_names = models.build_second_pair(name, self.device, DTYPES[args.dtype],
                                                                      self.share[1:]) \
                if "engine_2pairs" in args.systems else ([], [])
            self.build_s += time.perf_counter() - t
            _use_sdpa(self.trio)  # the peer loop runs Hugging Face's default attention; the engine picks its own
        return self.trio, self.second

    def release(self) -> None:
        """After an engine (built or failed): forget the models if it sharded them, as every engine does on the TP
        code path, so that the next one gets fresh ones."""
        if self.args.tp_path:
            self.trio = self.second = None


def _init_parallel(args) -> torch.device:
    """The device of this rank: under torchrun (or ``RAST_FORCE_PG=1``) the process group comes up first, on
    every rank, so the engines find it and the models are built on this rank's device (``cuda:LOCAL_RANK``)."""
    if not args.tp_path:
        return torch.device(args.device)
    from rast_kernels.parallel import init_parallel

    return init_parallel(args.tensor_parallel_size, device=args.device).device


def run(args, checkpoint=None) -> dict:
    """Time every system; ``checkpoint(result)`` (optional) gets the result so far after each row."""
    device = _init_parallel(args)
    tp, multi_rank = args.tensor_parallel_size, args.world_size > 1
    bw = copy_bandwidth(device, args.copy_mib or (1024 if device.type == "cuda" else 64))
    built = Models(args, device)
    trio, second = built.get()
    names, second_names = built.names, built.second_names
    family = trio[0].config.model_type
    vocab_size = 470 if args.tiny else models.TOKENIZER_LEN[family]
    all_bytes, base_bytes = models.weight_bytes(*trio), models.weight_bytes(trio[0])
    floor_bytes = {0: base_bytes, 1: all_bytes}
    if second:
        floor_bytes[2] = models.weight_bytes(*trio, *second)
    # per rank under tensor parallelism: the base's share, the experts' replicas (or their shares)
    rank_bytes = {k: b / tp if args.shard_experts else base_bytes / tp + b - base_bytes
                  for k, b in floor_bytes.items()}
    meta = {
        "benchmark": "decode", "device": device_name(device), "device_type": device.type, "versions": versions(),
        "date": utc_now(), "trio": "tiny" if args.tiny else args.trio, "models": names, "dtype": args.dtype,
        "weight_GB": all_bytes / 1e9, "base_weight_GB": base_bytes / 1e9, "copy_bandwidth_GBps": bw / 1e9,
        "second_pair": second_names, "weight_GB_2pairs": floor_bytes[2] / 1e9 if second else None,
        "model_build_s": built.build_s, "vocab_size": vocab_size,
        "lm_head_widths": [m.get_output_embeddings().weight.shape[0] for m in trio],
        "sampling": {"alpha": args.alpha, "temperature": args.temperature, "top_p": args.top_p},
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "peer_new_tokens": args.peer_new_tokens,
        "repeats": args.repeats, "use_cuda_graph": not args.no_cuda_graph, "command": args.command,
        "peer_attn_implementation": "sdpa", "tensor_parallel_size": tp, "shard_experts": args.shard_experts,
        "world_size": args.world_size, "tp_code_path": args.tp_path, "weight_GB_per_rank": rank_bytes[1] / 1e9,
    }
    print(f"# {meta['device']}; {'+'.join(names)} {args.dtype}, {all_bytes / 1e9:.2f} GB of weights "
          + (f"(second pair {'+'.join(second_names)}: {floor_bytes[2] / 1e9:.2f} GB in all) " if second else "")
          + f"(built in {built.build_s:.1f} s); copy bandwidth {bw / 1e9:.1f} GB/s", flush=True)
    if args.tp_path:
        print(f"# tensor parallel size {tp} ({'experts sharded' if args.shard_experts else 'experts replicated'}): "
              f"{rank_bytes[1] / 1e9:.2f} GB of weights per rank; global rank 0 reports its own step times",
              flush=True)
    if tp > 1 and "base_alone" in args.systems:
        print("# base_alone_eager skipped: the eager loop runs one process, not under tensor parallelism", flush=True)
    prompts = {B: make_prompts(B, args.prompt_len, vocab_size) for B in args.batch}
    rows = []

    def finish():
        _add_derived(rows)
        for row in rows:
            row.update(trio=meta["trio"], models=names, dtype=args.dtype, device=meta["device"],
                       torch=torch.__version__, transformers=meta["versions"]["transformers"], date=meta["date"],
                       tensor_parallel_size=tp, shard_experts=args.shard_experts)
        if checkpoint is not None:
            checkpoint({"meta": meta, "rows": rows})

    def common(B, n=None, pairs=1):
        extra = {"B": B, "pairs": pairs, "prompt_len": args.prompt_len}
        if n is not None:
            extra["new_tokens"] = n
        return extra

    # the floors cost nothing to compute; then the engine variants (the newest measurements, which a run
    # cut short must still have: the eager peer loop was already measured by the pre-project anchors),
    # then the eager baselines
    floor_notes = {0: "weight bytes of the base model / copy bandwidth",
                   1: "weight bytes of the three models / copy bandwidth (KV-cache reads not counted)",
                   2: "weight bytes of the five models of two pairs / copy bandwidth (KV-cache reads not counted)"}
    if args.tp_path:
        share = f"all / {tp}" if args.shard_experts else f"the base's / {tp} + the replicated experts'"
        floor_notes = {k: f"{v}; per rank: {share}" for k, v in floor_notes.items()}
    for B in args.batch:
        if "floor" in args.systems:
            for pairs in (1, 0, 2):
                if pairs in floor_bytes:
                    rows.append({"system": FLOORS[pairs], **common(B, pairs=pairs),
                                 "ms_per_token": rank_bytes[pairs] / bw * 1e3, "note": floor_notes[pairs]})
    finish()
    # (system, (trio, second pair) -> RastEngine's three model arguments, its keywords, note, pairs)
    engine_runs = []
    for system, kwargs in ENGINE_VARIANTS.items():
        if system in args.systems:
            engine_runs.append((system, lambda t, s: t, kwargs, f"RastEngine.generate {kwargs or '(defaults)'} "
                                f"(use_cuda_graph={not args.no_cuda_graph} requested); (T(N) - T(1)) / (N - 1)", 1))
    if second:
        engine_runs.append(("engine_2pairs", lambda t, s: [t[0], [t[1], s[0]], [t[2], s[1]]], {},
                            f"RastEngine(base, [expert, expert_2], [expert_base, expert_base_2]) with defaults, "
                            f"second pair {'+'.join(second_names)}", 2))
    if "base_alone" in args.systems:
        engine_runs.append(("base_alone_engine", lambda t, s: [t[0], None, None], {},
                            "RastEngine(base, None, None): the base model alone through the same engine", 0))
    del trio, second  # from here on through `built`, which rebuilds what an engine sharded
    tokenizer = models.placeholder_tokenizer(vocab_size)
    parallel_kwargs = dict(tensor_parallel_size=tp, shard_experts=args.shard_experts) if args.tp_path else {}
    for system, pick_models, engine_kwargs, note, pairs in engine_runs:
        runner, runner_error = None, None
        try:
            runner = EngineRunner(pick_models(*built.get()), args, max(args.batch), tokenizer, **engine_kwargs,
                                  **parallel_kwargs)
        except Exception as exc:
            if multi_rank:
                raise
            traceback.print_exc()
            runner_error = f"{type(exc).__name__}: {exc}"
        finally:
            built.release()
        for B in args.batch:
            if runner is None:
                rows.append({"system": system, **common(B, args.new_tokens, pairs), "ms_per_token": None,
                             "error": runner_error})
            else:
                rows.append(_attempt(system, lambda: time_engine(runner, prompts[B], args.new_tokens, args.repeats),
                                     multi_rank, **common(B, args.new_tokens, pairs), note=note,
                                     attn_implementation=_engine_attn(runner.engine),
                                     fused_decode=getattr(runner.engine, "fused_decode", None),
                                     overlap_models=getattr(runner.engine, "overlap_models", None),
                                     cuda_graph=getattr(runner.engine, "use_cuda_graph", None),
                                     engine_tensor_parallel_size=getattr(runner.engine, "tensor_parallel_size", None)))
            _print_rows([rows[-1]])
            finish()
        del runner
        if device.type == "cuda":
            torch.cuda.empty_cache()
    # the engine may have switched the models to its own attention implementation: the eager baselines
    # run Hugging Face's default (SDPA) as public code does
    base_alone_eager = "base_alone" in args.systems and tp == 1  # (peer_loop is refused under TP > 1)
    eager = "peer_loop" in args.systems or base_alone_eager
    if eager:
        trio = built.get()[0]
        _use_sdpa(trio)
    for B in args.batch if eager else ():
        first_new = len(rows)
        if "peer_loop" in args.systems:
            rows.append(_attempt("peer_loop", lambda: time_peer(trio, prompts[B], args.peer_new_tokens, args.repeats,
                                                                args, vocab_size),
                                 **common(B, args.peer_new_tokens),
                                 note="eager HF forwards + DynamicCache + HF-style sampler chain, host sync per token"))
        if base_alone_eager:
            rows.append(_attempt("base_alone_eager",
                                 lambda: time_base_alone_eager(trio[0], prompts[B], args.peer_new_tokens, args.repeats,
                                                               args),
                                 **common(B, args.peer_new_tokens, pairs=0),
                                 note="base model alone in the same eager HF loop"))
        _print_rows(rows[first_new:])
        finish()
    finish()
    print("# summary")
    _print_rows(sorted(rows, key=lambda r: r["B"]))
    return {"meta": meta, "rows": rows}


def _print_rows(rows) -> None:
    for r in rows:
        print(_format_row(r), flush=True)


def _add_derived(rows: list[dict]) -> None:
    """Per batch size: decode tokens/s (all rows), speedup over the peer loop (which runs one pair: not for the
    two-pair rows), % of the floor of the row's number of pairs; engine rows: time over the base alone's, and
    the two-pair engine's over the one-pair engine's (what the second pair costs)."""
    ms = {(r["system"], r["B"]): r.get("ms_per_token") for r in rows}
    for r in rows:
        t, B = r.get("ms_per_token"), r["B"]
        peer = ms.get(("peer_loop", B)) if r["pairs"] < 2 else None
        floor = ms.get((FLOORS[r["pairs"]], B))
        r["tokens_per_s"] = B * 1e3 / t if t else None
        if r.get("e2e_s") and r.get("new_tokens"):  # prompt + first token + decode, all rows
            r["e2e_tokens_per_s"] = B * r["new_tokens"] / r["e2e_s"]
        r["speedup_vs_peer"] = peer / t if t and peer else None
        alone = ms.get(("base_alone_engine", B))
        if r["system"].startswith("engine"):  # issue target: RAST within 1.6x of the base alone, same engine
            r["x_base_alone_engine"] = t / alone if t and alone else None
        if r["system"] == "engine_2pairs":
            one_pair = ms.get(("engine", B))
            r["x_engine_1pair"] = t / one_pair if t and one_pair else None
        r["pct_of_floor"] = 100 * floor / t if t and floor else None


def _format_row(r: dict) -> str:
    def f(x, fmt):
        return format(x, fmt) if x is not None else "-"
    return (f"{r['system']:<18} B={r['B']:<3} {f(r.get('ms_per_token'), '9.2f')} ms/token"
            + (f"  {f(r.get('tokens_per_s'), '9.1f')} tok/s  x_peer {f(r.get('speedup_vs_peer'), '6.2f')}  "
               f"floor% {f(r.get('pct_of_floor'), '5.1f')}" if "tokens_per_s" in r else "")
            + (f"  ERROR {r['error']}" if r.get("error") else ""))


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.rank == 0:
            result, _ = run_to_json(run, args, "decode.json")
        else:  # the same calls as rank 0 (the collectives need them), silent and without the JSON
            args.out = None
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
                result = run(args)
    finally:
        if args.tp_path:
            groups.shutdown()
    return 1 if any(r.get("error") for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
