#!/usr/bin/env python
"""One RAST sampling step with ``rast_kernels.rast_sample``, and the same step replayed in a CUDA graph.

    python python/sample_step.py                       # CPU: compiled C++ kernel
    python python/sample_step.py --device cuda         # GPU: Triton kernel, then a captured graph

Random logits stand in for the three models' last-position rows (Qwen2.5 widths: the 7B base emits
152064 columns, the 1.5B expert and expert base 151936; the tokenizer has 151665 real tokens).
"""
from __future__ import annotations

import sys

import torch

from rast_kernels import _cli, rast_sample


def main(argv=None) -> int:
    ap = _cli.ArgumentParser(prog="sample_step.py", description=__doc__.split("\n")[0].replace("``", ""))
    ap.add_argument("--device", type=_cli.device, default="cpu", help="cpu (default), cuda or cuda:N")
    ap.add_argument("--batch", type=_cli.int_range(1, 4096), default=4, help="rows, 1..4096 (default 4)")
    ap.add_argument("--steps", type=_cli.int_range(1), default=3,
                    help="graph replays with an advancing offset, >= 1 (CUDA; default 3)")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    B, vocab = args.batch, 151665
    base = torch.randn(B, 152064, device=dev).to(torch.bfloat16)
    expert = torch.randn(B, 151936, device=dev).to(torch.bfloat16)
    expert_base = torch.randn(B, 151936, device=dev).to(torch.bfloat16)

    # per-row settings as [B] tensors; seeds per row, offset = decode step
    temperature = torch.tensor([0.0] + [1.0] * (B - 1), device=dev)  # row 0 greedy
    seed = torch.arange(B, dtype=torch.int64, device=dev)
    offset = torch.zeros(B, dtype=torch.int64, device=dev)
    tokens = torch.empty(B, dtype=torch.int64, device=dev)
    kw = dict(alpha=0.5, temperature=temperature, top_p=0.95, vocab_size=vocab, seed=seed, offset=offset, out=tokens)

    ids, logprobs = rast_sample(base, expert, expert_base, return_logprobs=True, **kw)
    print("eager :", ids.tolist(), [round(x, 3) for x in logprobs.tolist()])

    if dev.type == "cuda":
        # warm up with exactly the call that is captured: the logprobs call above is another kernel
        # variant, and compiling (or sizing a workspace for) this one inside the capture would fail it
        rast_sample(base, expert, expert_base, **kw)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            rast_sample(base, expert, expert_base, **kw)
        for step in range(args.steps):
            offset.fill_(step + 1)  # fresh random numbers per replay, no host read inside the step
            graph.replay()
            print(f"replay {step + 1}:", tokens.tolist())
    return 0


if __name__ == "__main__":
    sys.exit(main())
