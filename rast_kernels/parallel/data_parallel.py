"""Data parallelism: requests split over the data-parallel (DP) groups, outputs gathered on global rank 0.

Each DP group is one tensor-parallel group (:mod:`.groups`) with its own engine; every rank of a group makes the
same engine calls (SPMD), so a group's ranks all run its share, and only the group's leader (``tp_rank == 0``)
reports it.

The split is round-robin by index (:func:`share`): item ``i`` goes to group ``i % dp_size``. Datasets and prompt
lists are often ordered (by source, difficulty, length), and contiguous chunks would hand one group all the long
ones, so it would finish last while the others idle; interleaving gives each group a sample of the whole mix.

A request's output does not depend on the number of groups: its seed is the one the whole list would give it
(``mix_seed(seed, global index)``, or its ``SamplingParams.seed``), and a sequence's tokens depend only on its
prompt, settings and seed (:mod:`rast_kernels.engine.engine`), up to floating-point ties between batch shapes.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, TypeVar

from .groups import ParallelContext, current, gather_objects, init_parallel

T = TypeVar("T")


def share(items: Sequence[T], context: Optional[ParallelContext]) -> List[T]:
    """The items DP group ``context.dp_rank`` serves: ``items[dp_rank::dp_size]`` (all of them without a
    context)."""
    if context is None:
        return list(items)
    return list(items[context.dp_rank::context.dp_size])


def generate_data_parallel(engine, prompts, sampling_params=None, *, seed=0, context: Optional[ParallelContext] = None,
                           progress: Optional[bool] = None, **kwargs):
    """:meth:`RastEngine.generate` over every DP group: the same arguments, called on **every rank** (SPMD).

    Each group generates its round-robin share of ``prompts`` with the seeds the whole list would give (so the
    result does not depend on the number of groups), and global rank 0 gathers every group's outputs.

    Parameters
    ----------
    engine : RastEngine
        This rank's engine (place it on ``context.device``); every rank of a TP group must hold the same one.
    prompts, sampling_params, seed, kwargs
        As :meth:`RastEngine.generate`, for the whole list (checked on every rank before anything runs).
    context : ParallelContext, optional
        Default: :func:`~.groups.current`, else :func:`~.groups.init_parallel` ``()``.
    progress : bool, optional
        The progress bar, on global rank 0 only (its group's share).

    Returns
    -------
    list[GenerationOutput] or None
        On global rank 0: one output per (prompt, sample) in ``generate``'s order (prompt-major), ``prompt_index``
        the index in ``prompts``. None on every other rank.
    """
    ctx = context or current() or init_parallel()
    # the engine's own checks and seed rules, on the whole list: identical on every rank
    reqs = engine.resolve_requests(prompts, sampling_params, seed=seed, **kwargs)
    mine = share(range(len(reqs)), ctx)
    outs = engine.generate([reqs[i][0] for i in mine], [reqs[i][1] for i in mine],
                           progress=bool(progress) and ctx.rank == 0)
    for out in outs:
        out.prompt_index = mine[out.prompt_index]
    parts = gather_objects(outs if ctx.is_leader else None, dst=0, context=ctx)
    if parts is None:
        return None
    merged = sorted((o for part in parts if part is not None for o in part),
                    key=lambda o: (o.prompt_index, o.sample_index))
    want = [(i, j) for i, (_, p) in enumerate(reqs) for j in range(p.n)]
    got = [(o.prompt_index, o.sample_index) for o in merged]
    if got != want:  # a group lost or doubled outputs: a bug, never silently returned
        raise RuntimeError(f"generate_data_parallel: gathered {len(got)} outputs, expected {len(want)} "
                           f"(one per prompt and sample); first difference at "
                           f"{next((a, b) for a, b in zip(got + [None], want + [None]) if a != b)}")
    return merged
