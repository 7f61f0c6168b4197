"""Run by tests/parallel/test_tensor_parallel.py under torchrun (TP = 2): each rank fakes a different amount of
free GPU memory (rast_kernels.engine.build.probe); the ranks must agree on one KV pool, the smallest, and finish a
generation together. ``python pool_worker.py OUT.json``: rank 0 writes every rank's result."""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "engine"))

from conftest import WIDTHS, make_model, make_tokenizer  # noqa: E402  (the engine tests' tiny models)
from test_memory import GIB, FakeProbe  # noqa: E402

from rast_kernels.engine import RastEngine, build, memory  # noqa: E402
from rast_kernels.parallel import gather_objects  # noqa: E402


def main():
    rank = int(os.environ["RANK"])
    # budget = free - (1 - utilization) * total - margin - peaks: 40 KiB on rank 0, 80 KiB on rank 1
    free = int(0.1 * GIB) + memory.GPU_MARGIN_BYTES + (rank + 1) * (40 << 10)
    build.probe = lambda device: FakeProbe(total=GIB, free=free, peaks=[0, 0])
    trio = [make_model("qwen2", w, s) for w, s in zip(WIDTHS.values(), (1, 2, 3))]
    engine = RastEngine(*trio, tokenizer=make_tokenizer(), tensor_parallel_size=2, max_batch_size=4, max_seq_len=64)
    outs = engine.generate(["the quick brown fox", "héllo", "a stitch in time"] * 3, temperature=0.0,
                           max_new_tokens=12, eos_token_id=[])
    result = dict(local=engine.pool_sizing.local_tokens, tokens=engine.kv_cache_tokens,
                  blocks=engine.allocator.num_blocks, tokens_out=[o.token_ids for o in outs])
    parts = gather_objects(result, dst=0)
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(parts, f)


if __name__ == "__main__":
    main()
