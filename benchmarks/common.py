"""Helpers shared by the benchmark scripts: run metadata (versions, device, date), atomic JSON output,
device sync, interleaved A/B timing and the copy-bandwidth probe that sets the scripts' memory-bandwidth floors."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import rast_kernels

VERSIONED_PACKAGES = ("triton", "transformers", "flashinfer-python")


def versions() -> dict:
    """Versions of torch, Python, rast_kernels and :data:`VERSIONED_PACKAGES` (None where not installed)."""
    out = {"torch": torch.__version__, "python": platform.python_version(), "rast_kernels": rast_kernels.__version__}
    for pkg in VERSIONED_PACKAGES:
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def device_name(device: torch.device) -> str:
    """The GPU's name on CUDA; on CPU the processor model and the thread count torch uses."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} (CPU, {torch.get_num_threads()} threads)"


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_json(result: dict, path: Path) -> None:
    """Write via a temporary file so that a run killed mid-write leaves the previous complete JSON."""
    path = Path(path)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)


def run_to_json(run, args, filename: str):
    """``(run(args, checkpoint), path)``: with ``args.out`` set, the result so far is written to
    ``args.out / filename`` at every checkpoint and the final result at the end; else ``path`` is None."""
    if args.out is None:
        return run(args, checkpoint=None), None
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / filename
    result = run(args, checkpoint=lambda r: write_json(r, path))
    write_json(result, path)
    print(f"wrote {path}")
    return result, path


def sync(device) -> None:
    """Wait for the device's queued work (a no-op on CPU). ``device``: a torch.device or a string."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_s(fn, device) -> float:
    """Seconds of one call of ``fn``, the device's queued work included."""
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def interleaved(fa, fb, pairs: int, device, warmup: bool = True) -> tuple:
    """``(median s of fa, median s of fb, median of the per-pair ratios fb / fa)`` over ``pairs`` alternations
    (a then b, b then a, ...), after one untimed call of each with ``warmup`` (graph capture on CUDA): the per-pair
    ratio cancels the drift of a shared machine, where single timings vary by +-30 %."""
    if warmup:
        fa(), fb()
    ta, tb = [], []
    for i in range(pairs):
        if i % 2 == 0:
            ta.append(timed_s(fa, device))
            tb.append(timed_s(fb, device))
        else:
            tb.append(timed_s(fb, device))
            ta.append(timed_s(fa, device))
    return statistics.median(ta), statistics.median(tb), statistics.median(b / a for a, b in zip(ta, tb))


def copy_bandwidth(device, mib: int = 1024, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s of a ``mib`` MiB fp32 tensor, counting bytes read plus
    bytes written; median of ``repeats`` copies after 3 warm-up copies. CUDA: CUDA events around each copy;
    CPU: ``time.perf_counter``."""
    if mib < 1:
        raise ValueError(f"mib: must be >= 1, got {mib}")
    if repeats < 1:
        raise ValueError(f"repeats: must be >= 1, got {repeats}")
    device = torch.device(device)
    src = torch.randn(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):  # allocator, caches, clocks
        dst.copy_(src)
    sync(device)
    seconds = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) * 1e-3)
        else:
            t = time.perf_counter()
            dst.copy_(src)
            seconds.append(time.perf_counter() - t)
    return 2 * src.numel() * src.element_size() / statistics.median(seconds)
