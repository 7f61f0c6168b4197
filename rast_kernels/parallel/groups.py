"""Process groups for scale-out: one :class:`ParallelContext` per process, made by :func:`init_parallel`.

Layout: ``world_size`` ranks form ``dp_size = world_size // tp_size`` tensor-parallel (TP) groups of consecutive
ranks, ``[g * tp_size, (g + 1) * tp_size)`` for group ``g = dp_rank``. Consecutive, because torchrun numbers the
ranks of a node consecutively: a TP group then sits inside one node (NVLink) whenever ``tp_size`` divides the
GPUs per node, and only the data-parallel traffic (a few gathers of outputs) crosses nodes.

We do not write a runtime: the groups are ``torch.distributed`` ones (NCCL on CUDA, gloo on CPU), launched by
``torchrun``, whose environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) is the
only input. Every group gets a timeout (``timeout_s``, else ``RAST_DIST_TIMEOUT_S``, else 300 s) so that a dead
peer turns a collective into an error rather than a hang.

One more group, ``host_group`` (gloo, every rank), carries the object collectives of data parallelism
(:func:`broadcast_object`, :func:`gather_objects`). Those wait for the slowest data-parallel group, so their bound
is the imbalance a long run may have, not the dead-peer timeout: ``RAST_DIST_WAIT_TIMEOUT_S``, default 24 h. A rank
that fails does not leave the others waiting that long: torchrun's agent stops every worker when one exits
non-zero. Gloo also keeps pickled outputs on the host instead of bouncing them through GPU memory (NCCL).
"""
from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any, List, Optional

import torch

DEFAULT_TIMEOUT_S = 300.0
DEFAULT_WAIT_TIMEOUT_S = 24 * 3600.0
_LAUNCH_VARS = ("WORLD_SIZE", "RANK")

_context: Optional["ParallelContext"] = None
_owns_group = False  # whether init_parallel created the default process group (then shutdown() destroys it)


@dataclass(frozen=True)
class ParallelContext:
    """Where this process sits: global ``rank`` of ``world_size``; ``tp_rank`` of ``tp_size`` inside TP group
    ``dp_rank`` of ``dp_size``; ``tp_group`` is that group's ``ProcessGroup`` (None only when ``tp_size == 1`` and
    no process group exists, i.e. ``backend == "none"``); ``device`` is where this rank's models live."""

    world_size: int
    rank: int
    tp_size: int
    tp_rank: int
    tp_group: Any
    dp_size: int
    dp_rank: int
    backend: str
    device: torch.device
    timeout_s: float = DEFAULT_TIMEOUT_S
    host_group: Any = None  # gloo over all ranks, for the object collectives (module docstring); None: no group

    @property
    def is_leader(self) -> bool:
        """True on the rank that reports for its TP group (``tp_rank == 0``)."""
        return self.tp_rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group exists (collectives are real, not no-ops)."""
        return self.backend != "none"


def launched() -> bool:
    """True when this process was started by ``torchrun`` (or a launcher that sets the same environment)."""
    return all(v in os.environ for v in _LAUNCH_VARS)


def group_forced() -> bool:
    """True when env ``RAST_FORCE_PG`` asks for a one-rank process group outside torchrun (:func:`init_parallel`)."""
    return os.environ.get("RAST_FORCE_PG", "") not in ("", "0")


def current() -> Optional[ParallelContext]:
    """The context :func:`init_parallel` made in this process, or None."""
    return _context


def _timeout(timeout_s: Optional[float], env: str = "RAST_DIST_TIMEOUT_S",
             default: float = DEFAULT_TIMEOUT_S) -> float:
    if timeout_s is None:
        text = os.environ.get(env)
        if text is None:
            return default
        try:
            timeout_s = float(text)
        except ValueError:
            raise ValueError(f"{env}: expected seconds, got {text!r}") from None
    if not timeout_s > 0:
        raise ValueError(f"timeout_s: must be > 0, got {timeout_s}")
    return float(timeout_s)


def _check_tp(tensor_parallel_size) -> int:
    if tensor_parallel_size is None:
        return 1
    if isinstance(tensor_parallel_size, bool) or not isinstance(tensor_parallel_size, int):
        raise TypeError(f"tensor_parallel_size: expected an int, got {type(tensor_parallel_size).__name__}")
    if tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size: must be >= 1, got {tensor_parallel_size}")
    return tensor_parallel_size


def _device(device, local_rank: int, is_launched: bool, force: bool) -> torch.device:
    if device is not None:
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank if is_launched else torch.cuda.current_device())
        return dev
    if (is_launched or force) and torch.cuda.is_available():  # a forced one-rank group on a GPU: NCCL there
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_parallel(tensor_parallel_size: Optional[int] = None, *, device=None, timeout_s: Optional[float] = None,
                  force_group: bool = False) -> ParallelContext:
    """Create (once per process) the process groups and return this rank's :class:`ParallelContext`.

    Under torchrun: initialises the default group (NCCL when ``device`` is CUDA, else gloo; unless one is already
    initialised, which is then used as is) and every TP group of ``tensor_parallel_size`` consecutive ranks
    (None: 1), which must divide the world size. Not launched: a single-rank context with no process group
    (``backend="none"``); with ``force_group=True`` or env ``RAST_FORCE_PG=1`` (size 1 only) a real one-rank group
    on a free local TCP port, so that the collective code path runs on one GPU. ``tensor_parallel_size > 1`` not
    launched is a ValueError (use torchrun).

    ``device``: default ``cuda:LOCAL_RANK`` under torchrun (or forced) with CUDA (made the current device), else
    cpu.
    Idempotent: a later call with the same size (or None) returns the same context; another size is a ValueError.
    """
    global _context, _owns_group
    force = force_group or group_forced()
    if _context is not None and not (force and not _context.distributed):  # forcing upgrades a group-less one
        if tensor_parallel_size is not None and _check_tp(tensor_parallel_size) != _context.tp_size:
            raise ValueError(f"tensor_parallel_size: this process is already set up with tensor_parallel_size = "
                             f"{_context.tp_size}, got {tensor_parallel_size}")
        return _context
    tp = _check_tp(tensor_parallel_size)
    timeout = _timeout(timeout_s)
    is_launched = launched()
    if not is_launched and tp > 1:
        raise ValueError(f"tensor_parallel_size: {tp} needs {tp} processes: launch with "
                         f"torchrun --nproc-per-node={tp} ... (this process was not started by torchrun)")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = _device(device, local_rank, is_launched, force)
    if not is_launched and not force:
        _context = ParallelContext(world_size=1, rank=0, tp_size=1, tp_rank=0, tp_group=None, dp_size=1,
                                   dp_rank=0, backend="none", device=dev, timeout_s=timeout)
        return _context

    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this torch build "
                           f"({torch.__version__}); multi-process runs need it")
    if is_launched and not dist.is_initialized() and int(os.environ["WORLD_SIZE"]) % tp:
        raise ValueError(f"tensor_parallel_size: {tp} does not divide the world size {os.environ['WORLD_SIZE']}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # NCCL and the object collectives use the current device
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs = {} if is_launched else dict(init_method=f"tcp://127.0.0.1:{_free_port()}", world_size=1, rank=0)
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout), **kwargs)
        _owns_group = True
    world, rank = dist.get_world_size(), dist.get_rank()
    if world % tp:
        raise ValueError(f"tensor_parallel_size: {tp} does not divide the world size {world}")
    if tp == world:
        tp_group = dist.group.WORLD  # no second communicator for the common one-group case
    else:
        # every rank must create every group, in the same order (torch.distributed.new_group's contract)
        tp_group, _ = dist.new_subgroups_by_enumeration(
            [list(range(g * tp, (g + 1) * tp)) for g in range(world // tp)],
            timeout=datetime.timedelta(seconds=timeout))
    wait = datetime.timedelta(seconds=_timeout(None, "RAST_DIST_WAIT_TIMEOUT_S", DEFAULT_WAIT_TIMEOUT_S))
    host_group = dist.new_group(backend="gloo", timeout=wait)
    _context = ParallelContext(world_size=world, rank=rank, tp_size=tp, tp_rank=rank % tp, tp_group=tp_group,
                               dp_size=world // tp, dp_rank=rank // tp, backend=str(dist.get_backend()),
                               device=dev, timeout_s=timeout, host_group=host_group)
    return _context


def shutdown() -> None:
    """Forget the context and destroy the process groups :func:`init_parallel` created (not one it found)."""
    global _context, _owns_group
    if _owns_group:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        _owns_group = False
    _context = None


def _ctx(context: Optional[ParallelContext]) -> Optional[ParallelContext]:
    return context if context is not None else _context


def broadcast_object(obj, src: int = 0, *, group=None, context: Optional[ParallelContext] = None):
    """``obj`` from global rank ``src`` on every rank of ``group`` (default: the context's ``host_group``, every
    rank); picklable objects only. Without a process group it returns ``obj``. Bounded by the group's timeout."""
    ctx = _ctx(context)
    if ctx is None or not ctx.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src, group=ctx.host_group if group is None else group)
    return box[0]


def gather_objects(obj, dst: int = 0, *, group=None, context: Optional[ParallelContext] = None) -> Optional[List]:
    """Every rank's ``obj`` as a list indexed by rank of ``group`` (default: the context's ``host_group``, every
    rank) on global rank ``dst``, None on the others. Without a process group: ``[obj]``. Bounded by the group's
    timeout."""
    ctx = _ctx(context)
    if ctx is None or not ctx.distributed:
        return [obj]
    import torch.distributed as dist

    group = ctx.host_group if group is None else group
    size = dist.get_world_size(group)
    out = [None] * size if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst, group=group)
    return out


def barrier(*, group=None, context: Optional[ParallelContext] = None) -> None:
    """Wait for every rank of ``group`` (default: the context's ``host_group``); a no-op without a process
    group."""
    ctx = _ctx(context)
    if ctx is not None and ctx.distributed:
        import torch.distributed as dist

        dist.barrier(group=ctx.host_group if group is None else group)
