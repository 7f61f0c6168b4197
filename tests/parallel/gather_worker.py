"""Run by tests/parallel/test_all_gather.py under torchrun (2 ranks, gloo): ``python gather_worker.py OUT.json``.

A tiny Qwen2 model's LM head is sharded over the two ranks (an odd vocabulary: the last shard is padded) and run
once with each all-gather function :data:`rast_kernels.parallel.tensor_parallel.ALL_GATHER` can name (the 2.11
``all_gather_into_tensor`` forced here on any torch, and 2.13's ``all_gather_single`` where this torch has it) and
once with the default choice. Each call is counted through a wrapper on ``torch.distributed`` (proof that the
forced branch ran). Rank 0 writes every rank's record: the calls, whether the branches' logits are equal, and
their largest difference from the unsharded head's."""
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "engine"))

from conftest import make_model  # noqa: E402  (the engine tests' tiny models)

from rast_kernels.parallel import gather_objects, init_parallel, shutdown  # noqa: E402
from rast_kernels.parallel import tensor_parallel as tp  # noqa: E402

NAMES = ("all_gather_into_tensor", "all_gather_single")
VOCAB = 305  # odd: 153 rows per rank, one zero row padding the second shard


def _run_head(head, h, name, calls):
    """The sharded head's output with ``tp.ALL_GATHER = name``, each call of a gather function counted."""
    originals = {n: getattr(dist, n) for n in NAMES if hasattr(dist, n)}

    def counted(n):
        def call(*args, **kwargs):
            calls[n] = calls.get(n, 0) + 1
            return originals[n](*args, **kwargs)
        return call

    tp.ALL_GATHER = name
    try:
        for n in originals:
            setattr(dist, n, counted(n))
        with torch.no_grad():
            return head(h)
    finally:
        tp.ALL_GATHER = None
        for n, f in originals.items():
            setattr(dist, n, f)


def main():
    ctx = init_parallel(2, timeout_s=30)
    full = make_model("qwen2", VOCAB, 1)
    model = make_model("qwen2", VOCAB, 1)
    tp.shard_model(model, ctx)
    h = torch.randn(2, 3, full.config.hidden_size, generator=torch.Generator().manual_seed(0))  # [.., rows, H]
    with torch.no_grad():
        want = full.lm_head(h)
    outs, calls = {}, {}
    for name in [n for n in NAMES if hasattr(dist, n)] + [None]:
        key = name or "default"
        calls[key] = {}
        outs[key] = _run_head(model.lm_head, h, name, calls[key])
    rec = dict(rank=ctx.rank, calls=calls, shard_rows=model.lm_head.out_features,
               shapes={k: list(v.shape) for k, v in outs.items()},
               branches_equal=all(torch.equal(v, outs["all_gather_into_tensor"]) for v in outs.values()),
               max_diff_from_full={k: (v - want).abs().max().item() for k, v in outs.items()})
    parts = gather_objects(rec, dst=0)
    if ctx.rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(parts, f)
    shutdown()


if __name__ == "__main__":
    main()
