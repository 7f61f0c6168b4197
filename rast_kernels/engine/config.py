"""``EngineConfig``: every engine setting under one name, checked once, shared by every entry point.

:class:`~.engine.RastEngine`, :func:`~.api.rast_generate`, ``python -m rast_kernels serve`` / ``eval`` and
``python/generate.py`` all take these settings, under the same names (``max_batch_size`` in Python is
``--max-batch-size`` on a command line): :func:`add_engine_arguments` adds them to an argparse parser and
:meth:`EngineConfig.from_args` reads them back. A bad value raises :class:`~rast_kernels.params.ParamError` (or
``ParamTypeError``) naming the setting. The models themselves (base, experts) are not settings.
"""
from __future__ import annotations

import argparse
import dataclasses
import numbers
from dataclasses import dataclass, fields
from typing import Any, Optional

from ..params import ParamError, ParamTypeError

SCHEDULING = ("continuous", "static")
ATTENTION = (None, "rast_decode", "sdpa", "eager")
DRAFTS = ("expert", "combination")
MAX_SPECULATIVE_TOKENS = 15  # drafted tokens per round (the ring and the graphs are sized for it)


@dataclass(frozen=True)
class EngineConfig:
    """The engine's settings (the parameters of :class:`~rast_kernels.engine.RastEngine` after the models; each
    is documented there)."""

    tokenizer: Any = None
    dtype: Any = None
    devices: Any = None
    max_batch_size: int = 8
    max_seq_len: int = 4096
    kv_cache_tokens: Optional[int] = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    scheduling: str = "continuous"
    max_prefill_tokens: Optional[int] = None
    use_cuda_graph: bool = True
    attn_implementation: Optional[str] = None
    fused_decode: Optional[bool] = None
    overlap_models: bool = False
    diagnostics: bool = False
    tensor_parallel_size: Optional[int] = None
    shard_experts: bool = False
    speculative_tokens: int = 0
    speculative_draft: str = "expert"

    def __post_init__(self):
        _int(self, "max_batch_size", 1)
        _int(self, "max_seq_len", 2)
        _int(self, "block_size", 1)
        _int(self, "kv_cache_tokens", self.block_size, none_ok=True)
        _int(self, "max_prefill_tokens", 1, none_ok=True)
        _int(self, "tensor_parallel_size", 1, none_ok=True)
        _int(self, "speculative_tokens", 0)
        if self.speculative_tokens > MAX_SPECULATIVE_TOKENS:
            raise ParamError("speculative_tokens",
                             f"must be <= {MAX_SPECULATIVE_TOKENS}, got {self.speculative_tokens}")
        u = self.gpu_memory_utilization
        if isinstance(u, bool) or not isinstance(u, numbers.Real) or not 0 < u <= 1:
            raise ParamError("gpu_memory_utilization", f"must be a number in (0, 1], got {u!r}")
        for name in ("use_cuda_graph", "overlap_models", "diagnostics", "shard_experts", "fused_decode"):
            v = getattr(self, name)
            if not isinstance(v, bool) and not (name == "fused_decode" and v is None):
                raise ParamTypeError(name, f"expected a bool{' or None' if name == 'fused_decode' else ''}, "
                                           f"got {type(v).__name__}")
        for name, allowed in (("scheduling", SCHEDULING), ("attn_implementation", ATTENTION),
                              ("speculative_draft", DRAFTS)):
            if getattr(self, name) not in allowed:
                raise ParamError(name, f"must be one of {allowed}, got {getattr(self, name)!r}")

    @property
    def prefill_tokens(self) -> int:
        """Padded prompt tokens admitted per step (``max_prefill_tokens``, default ``max(2048, max_seq_len)``)."""
        return self.max_prefill_tokens or max(2048, self.max_seq_len)

    def replace(self, **changes) -> "EngineConfig":
        """A copy with ``changes`` (checked again); an unknown name is a ``TypeError`` naming it."""
        unknown = sorted(set(changes) - set(FIELDS))
        if unknown:
            raise TypeError(f"{', '.join(unknown)}: unknown engine setting(s) (known: {', '.join(FIELDS)})")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides) -> "EngineConfig":
        """The settings :func:`add_engine_arguments` put on ``args`` (plus ``overrides``)."""
        values = {name: getattr(args, name) for name in FIELDS if hasattr(args, name)}
        if getattr(args, "device", None) is not None and "devices" not in overrides:
            values["devices"] = args.device
        if "no_cuda_graph" in vars(args):
            values["use_cuda_graph"] = not args.no_cuda_graph
        if "fused_decode" in vars(args):
            values["fused_decode"] = {"auto": None, "on": True, "off": False}[args.fused_decode]
        values.update(overrides)
        return cls(**values)


FIELDS = tuple(f.name for f in fields(EngineConfig))


def _int(cfg, name: str, low: int, none_ok: bool = False) -> None:
    v = getattr(cfg, name)
    if v is None and none_ok:
        return
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ParamTypeError(name, f"expected an int{' or None' if none_ok else ''}, got {type(v).__name__}")
    if v < low:
        raise ParamError(name, f"must be >= {low}, got {v}")


def add_engine_arguments(parser: argparse.ArgumentParser, *, exclude=(), **defaults) -> None:
    """Add the engine settings to ``parser`` as an ``engine`` option group (``--max-batch-size`` ...);
    ``defaults`` override :class:`EngineConfig`'s defaults, ``exclude`` names settings the command sets itself
    (e.g. ``tokenizer``). Every option is range-checked at parse time (one line, exit status 2)."""
    from .. import _cli

    d = {f.name: f.default for f in fields(EngineConfig)}
    d.update(defaults)
    g = parser.add_argument_group("engine")
    add = lambda name, *a, **kw: None if name in exclude else g.add_argument(*a, **kw)  # noqa: E731
    add("tokenizer", "--tokenizer", default=d["tokenizer"],
        help="tokenizer folder or hub id (default: the one saved with the models)")
    add("dtype", "--dtype", choices=("float32", "bfloat16", "float16"), default=d["dtype"],
        help="model dtype (default: bfloat16 on CUDA; on CPU float32)")
    add("devices", "--device", type=_cli.device, default=None, help="device of every model (default: cuda:0, else cpu)")
    add("max_batch_size", "--max-batch-size", type=_cli.int_range(1), default=d["max_batch_size"],
        help=f"decode slots: sequences decoded at once (default {d['max_batch_size']})")
    add("max_seq_len", "--max-seq-len", type=_cli.int_range(2), default=d["max_seq_len"],
        help=f"prompt + new tokens per sequence (default {d['max_seq_len']})")
    add("kv_cache_tokens", "--kv-cache-tokens", type=_cli.int_range(1), default=d["kv_cache_tokens"],
        help="token slots of each model's KV pool (default: from free GPU memory; CPU: batch x seq len)")
    add("block_size", "--block-size", type=_cli.int_range(1), default=d["block_size"],
        help=f"tokens per KV block (default {d['block_size']})")
    add("gpu_memory_utilization", "--gpu-memory-utilization", type=_cli.float_range(0.0, 1.0, lo_open=True),
        default=d["gpu_memory_utilization"], help="share of GPU memory the engine may fill (default 0.9)")
    add("scheduling", "--scheduling", choices=SCHEDULING, default=d["scheduling"],
        help="continuous batching (default) or static batches (a baseline)")
    add("max_prefill_tokens", "--max-prefill-tokens", type=_cli.int_range(1), default=d["max_prefill_tokens"],
        help="padded prompt tokens admitted per step (default max(2048, max seq len))")
    add("use_cuda_graph", "--no-cuda-graph", action="store_true", help="run decode steps eagerly (CUDA)")
    add("attn_implementation", "--attn-implementation", choices=[a for a in ATTENTION if a],
        default=d["attn_implementation"], help="transformers' attention (default: the best each model supports)")
    add("fused_decode", "--fused-decode", choices=("auto", "on", "off"), default="auto",
        help="the engine's own decode forward (default auto: CUDA with Triton, large fp32 models on CPU)")
    add("overlap_models", "--overlap-models", action="store_true", default=d["overlap_models"],
        help="run the small models' forwards on side CUDA streams")
    add("diagnostics", "--diagnostics", action="store_true", default=d["diagnostics"],
        help="record per-token delta diagnostics (argmax flips, KL(base || rast))")
    add("tensor_parallel_size", "--tensor-parallel-size", type=_cli.int_range(1), metavar="TP",
        default=d["tensor_parallel_size"], help="shard the base over TP ranks of a torchrun launch")
    add("shard_experts", "--shard-experts", action="store_true", default=d["shard_experts"],
        help="under tensor parallelism, shard the experts too (default: replicated)")
    add("speculative_tokens", "--speculative-tokens", type=_cli.int_range(0, MAX_SPECULATIVE_TOKENS), metavar="K",
        default=d["speculative_tokens"], help="tokens the small models draft per round, verified by the base in "
                                              "one forward; the same tokens as K = 0 (default %(default)s)")
    add("speculative_draft", "--speculative-draft", choices=DRAFTS, default=d["speculative_draft"],
        help="the draft: the expert alone, or the small models' own combination (default %(default)s)")
