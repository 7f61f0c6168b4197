"""The engine's checks in ``gpu_check.sh``: the KV pool it sizes for itself, and no host sync inside ``step()``.

Builds a real-size trio (default Qwen2.5-7B + 2 x Qwen2.5-1.5B, random init: ``benchmarks/models.py``) into a
``RastEngine`` through its public API with the default pool sizing (``kv_cache_tokens=None``: what fits in
``gpu_memory_utilization`` of the GPU) and 32K contexts, and records ``engine.kv_cache_tokens``, the engine's
``pool_sizing`` (its measured peak, where the engine reports one; None otherwise) and the CUDA memory counters.
Then it runs one small serving workload (requests of mixed prompt lengths and output lengths fed through
``add_request``, stepped to the end) three times on the same engine:

1. ``warmup``: graph captures, the allocator's first growth, Triton compiles: host syncs are allowed here;
2. ``warn``: every ``step()`` under ``torch.cuda.set_sync_debug_mode("warn")``: each distinct synchronising call
   site is counted, so one GPU run lists all of them, not only the first;
3. ``error``: every ``step()`` under ``"error"`` (the issue's check): the first synchronising CUDA call inside a
   step raises, and its message and innermost ``rast_kernels`` frames are recorded. It comes last because the
   error leaves that step half done.

Writes ``engine_checks.json`` under ``--out`` after each phase. Exit status 0 when the workload finished in every
pass and no step synchronised, else 1. On CPU (``--trio tiny --device cpu``, the CI smoke run) the sync debug mode
does not exist: the passes run without it and say so.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

import models
from common import device_name, utc_now, versions, write_json
from rast_kernels import _cli


def parse_args(argv=None) -> argparse.Namespace:
    p = _cli.ArgumentParser(prog="gpu_engine_checks.py", description=__doc__.split("\n")[0].replace("``", ""))
    p.add_argument("--trio", default="qwen", choices=sorted(models.TRIOS) + ["tiny"],
                   help="models (default qwen: Qwen2.5-7B + 2 x Qwen2.5-1.5B; tiny: the CPU smoke trio)")
    p.add_argument("--device", type=_cli.device, default=None, help="default: cuda if available, else cpu")
    p.add_argument("--max-batch", type=_cli.int_range(1), default=16, help="decode slots (default 16)")
    p.add_argument("--max-seq-len", type=_cli.int_range(2), default=32768,
                   help="per-sequence limit; with --max-batch it bounds the default pool (default 32768)")
    p.add_argument("--gpu-memory-utilization", type=_cli.float_range(0.0, 1.0, lo_open=True), default=0.9,
                   help="the engine's share of the GPU (default 0.9)")
    p.add_argument("--requests", type=_cli.int_range(1), default=24, help="requests per pass (default 24)")
    p.add_argument("--prompt-lens", type=_cli.int_range(1), nargs="+", default=[16, 200, 1000, 3000],
                   help="prompt lengths, cycled over the requests (default 16 200 1000 3000)")
    p.add_argument("--max-new", type=_cli.int_range(1), default=48,
                   help="longest output; the requests' vary up to it (default 48)")
    p.add_argument("--out", type=_cli.output_dir, default=None, help="directory for engine_checks.json")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if max(args.prompt_lens) + args.max_new > args.max_seq_len:
        _cli.fail(p, "--prompt-lens", f"the longest prompt plus --max-new ({args.max_new}) exceeds --max-seq-len "
                                      f"({args.max_seq_len})")
    return args


def memory(device) -> dict:
    """The CUDA memory counters in GiB (empty on CPU)."""
    if torch.device(device).type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info(device)
    gib = 2 ** 30
    return dict(free=free / gib, total=total / gib, allocated=torch.cuda.memory_allocated(device) / gib,
                reserved=torch.cuda.memory_reserved(device) / gib,
                peak_allocated=torch.cuda.max_memory_allocated(device) / gib)


def as_record(value):
    """``engine.pool_sizing`` as JSON: a dict as is, a dataclass (``as_dict()`` when it has one) as its fields."""
    if value is None or isinstance(value, dict):
        return value
    if hasattr(value, "as_dict"):
        return value.as_dict()
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else repr(value)


def sync_mode(device, mode: str):
    """``torch.cuda.set_sync_debug_mode(mode)`` for the block (a null context on CPU, where it does not exist)."""
    if torch.device(device).type != "cuda" or mode == "warmup":
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def scoped():
        torch.cuda.set_sync_debug_mode(mode)
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return scoped()


def sync_site(exc: BaseException) -> dict:
    """The message and the innermost frames inside rast_kernels of ``exc`` (the error a synchronising call raised
    under sync debug mode ``"error"``, or whatever ended a pass)."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "rast_kernels" in f.filename]
    return dict(error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}",
                frames=[f"{Path(f.filename).name}:{f.lineno} {f.name}: {f.line}" for f in frames[-4:]])


def one_pass(engine, args, vocab: int, mode: str) -> dict:
    """Feed the workload, step to the end with ``step()`` under sync debug ``mode``; the pass's record."""
    from rast_kernels import SamplingParams

    gen = torch.Generator().manual_seed(0)  # the same workload every pass: the same graph buckets, no new capture
    for i in range(args.requests):
        prompt = torch.randint(2, vocab, (args.prompt_lens[i % len(args.prompt_lens)],), generator=gen).tolist()
        engine.add_request(prompt, SamplingParams(temperature=1.0, top_p=0.95, eos_token_id=[], seed=i,
                                                  max_new_tokens=1 + (7 * i) % args.max_new))
    rec = dict(mode=mode, steps=0, finished=0, sync=None, sites={})
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        while engine.has_unfinished_requests():
            try:
                with sync_mode(args.device, mode):
                    outs = engine.step()
            except RuntimeError as exc:
                if mode != "error":
                    raise
                rec["sync"] = sync_site(exc)
                break
            rec["steps"] += 1
            rec["finished"] += sum(o.finished for o in outs)
    for w in caught:
        if "synchroniz" in str(w.message):
            site = f"{Path(w.filename).name}:{w.lineno}"
            rec["sites"][site] = rec["sites"].get(site, 0) + 1
    rec["seconds"] = time.perf_counter() - t0
    return rec


def build(args):
    from rast_kernels import RastEngine

    trio, names = models.build_trio(None if args.trio == "tiny" else args.trio, device=args.device,
                                    dtype=torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32)
    vocab = 480 if args.trio == "tiny" else models.TOKENIZER_LEN[trio[0].config.model_type]
    t0 = time.perf_counter()
    engine = RastEngine(*trio, tokenizer=models.placeholder_tokenizer(vocab), devices=args.device,
                        max_batch_size=args.max_batch, max_seq_len=args.max_seq_len,
                        gpu_memory_utilization=args.gpu_memory_utilization)
    return engine, names, vocab, time.perf_counter() - t0


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out) / "engine_checks.json" if args.out else None
    command = " ".join([Path(__file__).name, *(sys.argv[1:] if argv is None else argv)])
    result = dict(benchmark="engine_checks", date=utc_now(), device=device_name(torch.device(args.device)),
                  versions=versions(), command=command, passes=[])

    def save():
        if out is not None:
            write_json(result, out)
        print(result["passes"][-1] if result["passes"] else result.get("engine"), flush=True)

    try:
        engine, names, vocab, build_s = build(args)
    except Exception as exc:  # noqa: BLE001 - e.g. no room for a pool: recorded
        result.update(engine=dict(failed=sync_site(exc), memory=memory(args.device)), ok=False)
        save()
        return 1
    result.update(models=names, engine=dict(
        build_seconds=build_s, kv_cache_tokens=engine.kv_cache_tokens,
        pool_sizing=as_record(getattr(engine, "pool_sizing", None)), max_batch_size=engine.max_batch_size,
        max_seq_len=engine.max_seq_len, stats=engine.stats(), memory=memory(args.device)))
    save()
    for mode in ("warmup", "warn", "error"):
        try:
            rec = one_pass(engine, args, vocab, mode)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory in a prefill: recorded, the later passes skipped
            result["passes"].append(dict(mode=mode, failed=sync_site(exc), memory=memory(args.device)))
            save()
            break
        rec["memory"] = memory(args.device)
        result["passes"].append(rec)
        save()
    passes = result["passes"]
    result["ok"] = len(passes) == 3 and all(
        "failed" not in p and p["sync"] is None and p["finished"] == args.requests
        and (p["mode"] == "warmup" or not p["sites"]) for p in passes)
    save()
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
