"""Run by tests/parallel/test_tensor_parallel.py (under torchrun for TP = 2, alone for TP = 1): RastEngine with a
sharded base on tiny random Qwen2 and Llama trios (built identically on every rank from seeded configs).

``python tp_worker.py OUT.json [--tp T] [--fail-rank R]``: every rank generates (greedy and sampled, with the
fused decode forward off and on), the ranks' outputs are compared with rank 0's, and rank 0 writes them with each
engine's per-rank KV-head count to ``OUT.json``; ``--fail-rank`` makes that rank raise mid-run instead."""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "engine"))

from conftest import WIDTHS, make_model, make_tokenizer  # noqa: E402  (the engine tests' tiny models)

from rast_kernels.engine import RastEngine, SamplingParams  # noqa: E402
from rast_kernels.parallel import gather_objects  # noqa: E402

PROMPTS = ["the quick brown fox", "héllo", "a stitch in time saves nine; the early bird gets the worm"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--fail-rank", type=int)
    args = ap.parse_args()
    tok = make_tokenizer()
    # the engine refuses shard_experts where nothing is sharded: the TP = 1 reference runs that case unsharded
    sharding = args.tp > 1 or os.environ.get("RAST_FORCE_PG") == "1"
    result = {}
    for family, seeds in (("qwen2", (1, 2, 3)), ("llama", (4, 5, 6))):
        trio = [make_model(family, w, s) for w, s in zip(WIDTHS.values(), seeds)]
        for fused, shard_experts in ((False, False), (True, False), (False, True)):
            if shard_experts and family == "llama":
                continue
            engine = RastEngine(*trio, tokenizer=tok, tensor_parallel_size=args.tp, max_batch_size=4, max_seq_len=64,
                                fused_decode=fused, shard_experts=shard_experts and sharding)
            ctx = engine.parallel
            if args.fail_rank is not None and ctx is not None and ctx.rank == args.fail_rank:
                raise RuntimeError(f"boom on rank {ctx.rank}")
            greedy = engine.generate(PROMPTS, temperature=0.0, alpha=0.7, max_new_tokens=8, eos_token_id=[])
            sampled = engine.generate(PROMPTS, SamplingParams(temperature=1.0, top_p=0.9, alpha=1.2, n=2, seed=9,
                                                              max_new_tokens=8, eos_token_id=[],
                                                              return_logprobs=True))
            result[f"{family}/{'fused' if fused else 'hf'}{'/shard_experts' if shard_experts else ''}"] = dict(
                greedy=[o.token_ids for o in greedy], sampled=[o.token_ids for o in sampled],
                logprobs=[o.logprobs for o in sampled], kv_heads=engine.lanes[0].cache.layers[0].keys.shape[2],
                expert_kv_heads=engine.lanes[1].cache.layers[0].keys.shape[2],
                tp=engine.tensor_parallel_size, sharded=ctx is not None)
            if ctx is not None and not fused and not shard_experts:
                # a second engine over the same (already sharded) objects: the shards and hooks are reused, once
                again = RastEngine(*trio, tokenizer=tok, tensor_parallel_size=args.tp, max_batch_size=4,
                                   max_seq_len=64, fused_decode=False)
                out = again.generate(PROMPTS, temperature=0.0, alpha=0.7, max_new_tokens=8, eos_token_id=[])
                hooks = len(trio[0].model.layers[0].self_attn.o_proj._forward_hooks)
                result[f"{family}/reused"] = dict(same=[o.token_ids for o in out] == [o.token_ids for o in greedy],
                                                  hooks=hooks)
            # the engine shards its models in place: fresh ones for the next engine
            trio = [make_model(family, w, s) for w, s in zip(WIDTHS.values(), seeds)]
    parts = gather_objects(result, dst=0)
    rank = int(os.environ.get("RANK", 0))
    if rank == 0:
        assert all(p == result for p in parts), "ranks disagree"
        with open(args.out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
