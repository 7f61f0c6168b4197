"""Run by tests/parallel/test_groups.py under torchrun: ``python groups_worker.py TP OUT_DIR``; each rank writes
``OUT_DIR/rank{R}.json`` with its context, a sum over its TP group and the object collectives' results."""
import json
import sys

import torch
import torch.distributed as dist

from rast_kernels.parallel import broadcast_object, gather_objects, init_parallel, shutdown


def main():
    tp, out = int(sys.argv[1]), sys.argv[2]
    try:
        init_parallel(tp + 1, timeout_s=30)  # world 4: 3 does not divide it
        raise AssertionError("no error for a size that does not divide the world")
    except ValueError as exc:
        bad = str(exc)
    ctx = init_parallel(tp, timeout_s=30)
    assert init_parallel(tp) is ctx and init_parallel() is ctx
    t = torch.tensor([float(ctx.rank)])
    dist.all_reduce(t, group=ctx.tp_group)
    rec = dict(bad=bad, rank=ctx.rank, world=ctx.world_size, tp_rank=ctx.tp_rank, dp_rank=ctx.dp_rank,
               dp_size=ctx.dp_size, leader=ctx.is_leader, backend=ctx.backend, tp_sum=t.item(),
               gathered=gather_objects(ctx.rank * 10), bcast=broadcast_object("from0" if ctx.rank == 0 else None))
    with open(f"{out}/rank{ctx.rank}.json", "w") as f:
        json.dump(rec, f)
    shutdown()


if __name__ == "__main__":
    main()
