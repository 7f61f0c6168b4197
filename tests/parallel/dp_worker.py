"""Run by tests/parallel (under torchrun, or alone for DP = 1): generate_data_parallel on the toy trio.

``python dp_worker.py OUT.json [--tp T] [--fail-rank R]``: rank 0 writes the outputs of a greedy and a sampled call to
``OUT.json``; with ``--fail-rank`` that rank raises instead of generating."""
import argparse
import dataclasses
import json

from rast_kernels.engine import RastEngine, SamplingParams
from rast_kernels.parallel import generate_data_parallel, init_parallel
from rast_kernels.toy.common import DEFAULT_OUT

# the toy task's prompts (16 bits); the sampled call (T = 3, alpha = 0.5) gives varied completions
PROMPTS = ["Q1011001110100101=", "Q0110111010001011=", "Q1111000011110000=", "Q0000000000000001=",
           "Q1010101010101010="]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--fail-rank", type=int)
    ap.add_argument("--tp", type=int, default=1, help="TP group size (the engine is replicated: the split is tested)")
    args = ap.parse_args()
    ctx = init_parallel(args.tp, timeout_s=30)
    engine = RastEngine(*(f"{DEFAULT_OUT}/{r}" for r in ("base", "expert", "expert_base")), devices=ctx.device,
                        max_batch_size=4, max_seq_len=64)
    if ctx.rank == args.fail_rank:
        raise RuntimeError(f"boom on rank {ctx.rank}")
    greedy = generate_data_parallel(engine, PROMPTS, temperature=0.0, max_new_tokens=20)
    # per-prompt params, one with its own seed (it must win over the list's), n = 2 samples each
    params = [SamplingParams(temperature=3.0, max_new_tokens=20, n=2, alpha=0.5,
                             seed=1234 if i == 3 else None) for i in range(len(PROMPTS))]
    sampled = generate_data_parallel(engine, PROMPTS, params, seed=7)
    if ctx.rank == 0:
        keep = ("text", "token_ids", "finish_reason", "prompt_index", "sample_index")
        with open(args.out, "w") as f:
            json.dump({name: [{k: dataclasses.asdict(o)[k] for k in keep} for o in outs]
                       for name, outs in (("greedy", greedy), ("sampled", sampled))}, f)
    else:
        assert greedy is None and sampled is None


if __name__ == "__main__":
    main()
