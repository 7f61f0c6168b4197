"""Profile one three-model RAST decode step on CUDA, with transformers' SDPA attention and with ours.

The step is what the engine runs per token: the base, expert and expert-base models (random-init real
configs from ``benchmarks/configs``, via ``models.py``) each take the last token through their own
transformers ``StaticCache`` (``--max-cache-len`` positions, a realistic preallocation, as in
``../shared/anchors/h200-2026-11-26-step-profile.json``), then ``rast_sample`` draws the next token.
For each attention implementation in ``--attn``:

1. prefill a ``--prompt-len`` prompt (batch ``--batch``, no padding);
2. time the eager step and the step captured in one CUDA graph (CUDA events, median);
3. run ``--steps`` eager steps under ``torch.profiler`` and summarise the GPU activity per step: total
   GPU time, kernel launches, the top kernels by GPU time and coarse name-based categories;
   with ``--profile-graph`` also the replays of the captured step (kernels inside a graph are traced by
   CUPTI; the launch count then is the graph's node count).

Implementations: ``sdpa`` (transformers' SDPA with the 4-D mask over the whole cache, K/V expanded),
``rast_decode_maskless`` (our Triton decode kernel, no decode mask; start/end passed as device tensors,
advanced inside the captured step), ``rast_decode`` (ours, mask still built; bounds passed), ``fused``
(the engine's own decode step, ``RastEngine(fused_decode=True).runner._decode_step``: the fused decode forward
:class:`rast_kernels.engine.fused_decode.FusedDecoder` (fused residual-add + RMSNorm, rotary + KV slot write,
SiLU-mul and the paged decode kernel around the models' own linear layers) over the engine's paged cache, plus
its sampler and bookkeeping).

Examples::

    python benchmarks/profile_decode_step.py --out out/profile/
    python benchmarks/profile_decode_step.py --trio llama --batch 8 --attn sdpa rast_decode_maskless --out out/
    python benchmarks/profile_decode_step.py --smoke-cpu --out /tmp/p/   # tiny models on CPU: logic check only

Writes ``profile_<trio>_b<B>.json`` (and with ``--trace`` one Chrome trace per implementation) under ``--out``.
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import torch

import models  # benchmarks/models.py: random-init models from benchmarks/configs
from common import copy_bandwidth, device_name, sync, utc_now, versions, write_json
from rast_kernels import _cli, rast_sample
from rast_kernels.engine.attention import RAST_DECODE, RAST_DECODE_MASKLESS, register_rast_attention

FUSED = "fused"
ATTN_CHOICES = ("sdpa", RAST_DECODE_MASKLESS, RAST_DECODE, FUSED)
# coarse kernel categories by name (first match wins); a heuristic to read the profile, not a measurement
CATEGORIES = (
    ("rast_decode_attention", r"_split_kernel|_combine_kernel"),
    ("rast_fused_elementwise", r"_add_rms_norm_kernel|_rope_cache_kernel|_silu_mul_kernel"),
    ("rast_sample", r"rast_sample|_rast_"),
    ("gemm", r"gemm|gemv|cutlass|nvjet|cublas|sm\d+_xmma|splitKreduce"),
    ("sdpa_attention", r"flash|fmha|attention|cudnn|sdpa|softmax"),
    ("copy_cat_index", r"copy|Memcpy|cat|index|gather|scatter|Memset"),
    ("reduce", r"reduce"),
    ("elementwise", r"elementwise|vectorized|unrolled|triton_"),
)


def parse_args(argv=None) -> argparse.Namespace:
    p = _cli.ArgumentParser(prog="profile_decode_step.py", description=__doc__.split("\n\n")[0].replace("``", ""),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trio", default="qwen", choices=sorted(models.TRIOS), help="which real configs to build")
    p.add_argument("--batch", type=_cli.int_range(1, 4096), default=1, help="rows per step, 1..4096 (default 1)")
    p.add_argument("--prompt-len", type=_cli.int_range(1), default=256, help="prompt tokens, >= 1 (default 256)")
    p.add_argument("--max-cache-len", type=_cli.int_range(8), default=4352,
                   help="StaticCache positions per row, >= 8 (default 4352)")
    p.add_argument("--attn", nargs="+", default=["sdpa", RAST_DECODE_MASKLESS, FUSED], choices=ATTN_CHOICES,
                   help="implementations to profile, in this order")
    p.add_argument("--steps", type=_cli.int_range(1), default=5, help="profiled eager steps, >= 1 (default 5)")
    p.add_argument("--timed-steps", type=_cli.int_range(1), default=20,
                   help="steps timed with CUDA events, eager and graph, >= 1 (default 20)")
    p.add_argument("--top", type=_cli.int_range(1), default=25, help="kernels listed in the summary (default 25)")
    p.add_argument("--profile-graph", action="store_true", help="also profile replays of the captured step")
    p.add_argument("--trace", action="store_true", help="also write a Chrome trace per implementation")
    p.add_argument("--smoke-cpu", action="store_true",
                   help="tiny models on CPU, profiling CPU ops: checks the script's logic, measures nothing")
    p.add_argument("--out", type=_cli.output_dir, required=True, help="directory for the JSON summary (and traces)")
    args = p.parse_args(argv)
    args.out = Path(args.out)
    return args


class DecodeState:
    """Static buffers of the step (same tensors at capture and replay; advanced in place by the step)."""

    def __init__(self, batch: int, prompt_len: int, device: torch.device):
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.pos = torch.full((batch, 1), prompt_len, dtype=torch.long, device=device)
        self.start = torch.zeros(batch, dtype=torch.int32, device=device)  # no left padding here
        self.end = torch.full((batch,), prompt_len, dtype=torch.int64, device=device)
        self.col = torch.full((1,), prompt_len - 1, dtype=torch.int64, device=device)  # fused: column written
        self.offset = torch.zeros(batch, dtype=torch.int64, device=device)


def prefill(trio, caches, prompt: torch.Tensor) -> list[torch.Tensor]:
    batch, length = prompt.shape
    pos = torch.arange(length, device=prompt.device).expand(batch, length)
    with torch.no_grad():
        return [m(input_ids=prompt, position_ids=pos, past_key_values=c, use_cache=True, logits_to_keep=1).logits[:, -1]
                for m, c in zip(trio, caches)]


def make_step(trio, caches, state: DecodeState, attn: str):
    """One decode step through transformers' forward: three forwards on the last token, then rast_sample;
    host-sync free."""
    extra = {} if attn == "sdpa" else dict(rast_start=state.start, rast_end=state.end)

    def step():
        with torch.no_grad():
            state.end.add_(1)  # the new token's slot, written by this step's forwards
            logits = [m(input_ids=state.tok, position_ids=state.pos, past_key_values=c, use_cache=True,
                        **extra).logits[:, -1] for m, c in zip(trio, caches)]
            tok = rast_sample(*logits, alpha=1.0, temperature=1.0, top_p=0.95, seed=0, offset=state.offset)
            state.tok.copy_(tok[:, None])
            state.pos.add_(1)
            state.offset.add_(1)
    return step


def engine_step(trio, prompt: torch.Tensor, args, device):
    """The engine's own decode step with the fused decode forward over its paged cache (what its CUDA graphs
    capture): ``(step, last tokens, KV positions used)`` after admitting ``prompt``'s rows."""
    from rast_kernels import RastEngine, SamplingParams

    engine = RastEngine(*trio, tokenizer=models.placeholder_tokenizer(min(m.config.vocab_size for m in trio)),
                        devices=device, max_batch_size=args.batch, max_seq_len=args.max_cache_len,
                        use_cuda_graph=False, fused_decode=True)
    for row in prompt.tolist():
        engine.add_request(row, SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=args.max_cache_len - len(row),
                                               eos_token_id=[], seed=0))
    engine.step()  # admission and prefill
    runner = engine.runner

    def step():
        with torch.no_grad():
            runner._decode_step(args.batch, 0)
    return step, (lambda: runner.state.tok[:args.batch].clone()), (lambda: int(runner.state.pos.max()) + 1)


def time_ms(fn, n: int, device: torch.device) -> float:
    """Median ms of ``fn()`` over ``n`` calls (CUDA events on CUDA, wall clock on CPU)."""
    import time
    times = []
    for _ in range(n):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def capture(step, warmup: int = 3) -> torch.cuda.CUDAGraph:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return label
    return "other"


def summarise(prof, steps: int, top: int, on_gpu: bool) -> dict:
    """Per-step GPU activity (or CPU op self time with ``on_gpu=False``) from a finished profiler."""
    kind = torch.autograd.DeviceType.CUDA if on_gpu else torch.autograd.DeviceType.CPU
    per_name = defaultdict(lambda: [0, 0.0])
    launches = memops = 0
    for evt in prof.events():
        if evt.device_type != kind:
            continue
        us = evt.device_time if on_gpu else evt.self_cpu_time_total
        per_name[evt.name][0] += 1
        per_name[evt.name][1] += us
        if on_gpu and re.match(r"Memcpy|Memset", evt.name):
            memops += 1
        else:
            launches += 1
    total_us = sum(us for _, us in per_name.values())
    cats = defaultdict(lambda: [0, 0.0])
    for name, (count, us) in per_name.items():
        cats[category(name)][0] += count
        cats[category(name)][1] += us
    ranked = sorted(per_name.items(), key=lambda item: -item[1][1])
    return dict(
        what="GPU kernels, memcpy and memset" if on_gpu else "CPU ops, self time",
        steps=steps,
        time_ms_per_step=total_us / steps / 1e3,
        launches_per_step=launches / steps,
        memcpy_memset_per_step=memops / steps,
        categories={c: dict(calls_per_step=n / steps, ms_per_step=us / steps / 1e3,
                            share=us / total_us if total_us else 0)
                    for c, (n, us) in sorted(cats.items(), key=lambda item: -item[1][1])},
        top=[dict(name=name[:200], category=category(name), calls_per_step=n / steps, us_per_step=us / steps,
                  share=us / total_us if total_us else 0) for name, (n, us) in ranked[:top]],
    )


def profile(fn, steps: int, top: int, on_gpu: bool, trace_path: Path | None, device) -> dict:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if on_gpu:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        sync(device)
    if trace_path is not None:
        prof.export_chrome_trace(str(trace_path))
    return summarise(prof, steps, top, on_gpu)


def run_variant(attn, trio, args, device, trace_dir) -> dict:
    import transformers

    vocab = min(m.config.vocab_size for m in trio)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(2, vocab, (args.batch, args.prompt_len), generator=gen).to(device)
    if attn == FUSED:
        step, last_tokens, positions_used = engine_step(trio, prompt, args, device)
        caches = None
    else:
        for m in trio:
            m.set_attn_implementation(attn)
        caches = [transformers.StaticCache(config=m.config, max_cache_len=args.max_cache_len) for m in trio]
        state = DecodeState(args.batch, args.prompt_len, device)
        prefill(trio, caches, prompt)
        step = make_step(trio, caches, state, attn)
        last_tokens, positions_used = (lambda: state.tok[:, 0].clone()), (lambda: int(state.end[0]))
    on_gpu = device.type == "cuda"
    first_tokens = []
    for _ in range(3):  # compile the Triton kernels, settle the allocator; keep the tokens as a sanity check
        step()
        first_tokens.append(last_tokens())
    sync(device)
    row = dict(attn=attn, first_tokens=torch.stack(first_tokens, 1).tolist())
    row["eager_step_ms"] = time_ms(step, args.timed_steps, device)
    trace = (lambda tag: trace_dir / f"trace_{attn}_{tag}.json") if trace_dir is not None else (lambda tag: None)
    row["profile_eager"] = profile(step, args.steps, args.top, on_gpu, trace("eager"), device)
    if on_gpu:
        graph = capture(step)
        graph.replay()
        sync(device)
        row["graph_step_ms"] = time_ms(graph.replay, args.timed_steps, device)
        if args.profile_graph:
            row["profile_graph"] = profile(graph.replay, args.steps, args.top, on_gpu, trace("graph"), device)
        del graph
    used = positions_used()  # host read after all timing: how far the caches were filled
    if used > args.max_cache_len:
        raise RuntimeError(f"the run wrote {used} positions into a cache of {args.max_cache_len}")
    row["cache_positions_used"] = used
    del caches
    if on_gpu:
        torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke_cpu:
        device, dtype = torch.device("cpu"), torch.float32
        args.max_cache_len, args.prompt_len = min(args.max_cache_len, 64), min(args.prompt_len, 8)
        args.timed_steps, args.steps = min(args.timed_steps, 3), min(args.steps, 2)
    elif not torch.cuda.is_available():
        print("profile_decode_step.py profiles CUDA kernels and needs a CUDA GPU (none is visible here). "
              "Run it on the GPU machine, or pass --smoke-cpu to check the script's logic on tiny CPU models.",
              file=sys.stderr)
        return 2
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
    steps_needed = args.prompt_len + 4 + (3 + 2 * args.timed_steps + 2 * args.steps + 5)
    if steps_needed > args.max_cache_len:
        print(f"--max-cache-len {args.max_cache_len} is too small for this run ({steps_needed} positions)",
              file=sys.stderr)
        return 2
    register_rast_attention()
    trio, names = models.build_trio(None if args.smoke_cpu else args.trio, device, dtype)
    summary = dict(
        benchmark="profile_decode_step",
        date_utc=utc_now(),
        device=device_name(device) if device.type == "cuda" else "cpu (smoke run: not a measurement)",
        versions=versions(), models=names, batch=args.batch, prompt_len=args.prompt_len,
        max_cache_len=args.max_cache_len, dtype=str(dtype), weight_bytes=models.weight_bytes(*trio), variants=[],
    )
    if device.type == "cuda":
        bandwidth = copy_bandwidth(device, 1024, repeats=20)
        summary["copy_bandwidth_bytes_per_s"] = bandwidth
        summary["weight_floor_ms"] = summary["weight_bytes"] / bandwidth * 1e3
        print(f"{summary['device']}: copy bandwidth {bandwidth / 1e12:.2f} TB/s, weight floor "
              f"{summary['weight_floor_ms']:.2f} ms per step")
    args.out.mkdir(parents=True, exist_ok=True)
    trace_dir = args.out if args.trace else None
    path = args.out / f"profile_{'smoke' if args.smoke_cpu else args.trio}_b{args.batch}.json"
    for attn in args.attn:
        row = run_variant(attn, trio, args, device, trace_dir)
        summary["variants"].append(row)
        # after every implementation, not only at the end: a run cut by a time limit keeps what it measured
        write_json(summary, path)
        prof = row["profile_eager"]
        graph = f", graph {row['graph_step_ms']:.2f} ms" if "graph_step_ms" in row else ""
        print(f"{attn:<22} eager {row['eager_step_ms']:.2f} ms{graph}; profiled {prof['time_ms_per_step']:.2f} ms "
              f"and {prof['launches_per_step']:.0f} launches per step")
        for c, v in list(prof["categories"].items())[:6]:
            print(f"    {c:<24}{v['ms_per_step']:8.3f} ms  {v['calls_per_step']:7.1f} calls")
    # the transformers-forward variants feed the same inputs with the same Philox offsets; the engine's step
    # (fused) feeds its own prefill's token with its per-request seed, so it is not compared
    hf = [v for v in summary["variants"] if v["attn"] != FUSED]
    same = all(v["first_tokens"] == hf[0]["first_tokens"] for v in hf)
    summary["first_tokens_agree"] = same
    print("first 3 sampled tokens per row agree across implementations" if same else
          "WARNING: the implementations sampled different first tokens (bf16 near-ties can do this; fp32 should not)")
    write_json(summary, path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
