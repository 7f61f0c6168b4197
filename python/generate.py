#!/usr/bin/env python
"""Generate with RAST from three causal LMs: ``z = z_base + alpha * (z_expert - z_expert_base)``.

Examples::

    # three models by id or local path (they must share one tokenizer)
    python python/generate.py --base Qwen/Qwen2.5-7B --expert ./my-rl-1.5b --expert-base Qwen/Qwen2.5-1.5B \\
        --prompt "Solve: 12 * 13 =" --max-new-tokens 64 --temperature 0.7 --top-p 0.9

    # several expert pairs (one --alpha for all, or one per pair), e.g. the deltas of a 1.5B and a 0.5B RL model
    python python/generate.py --base Qwen/Qwen2.5-7B --expert ./rl-1.5b ./rl-0.5b \
        --expert-base Qwen/Qwen2.5-1.5B Qwen/Qwen2.5-0.5B --alpha 0.4 0.1 --prompt "Solve: 12 * 13 ="

    # contrastive decoding: z = (1 + beta) z_expert - beta z_amateur over the expert's plausible tokens
    python python/generate.py --base Qwen/Qwen2.5-7B --expert Qwen/Qwen2.5-7B --expert-base Qwen/Qwen2.5-0.5B \
        --alpha 0.5 --base-plausibility 0.1 --temperature 0 --prompt "Solve: 12 * 13 ="

    # tensor parallel: the base sharded over 4 GPUs (the experts replicated), rank 0 prints
    torchrun --standalone --nproc-per-node=4 python/generate.py --base meta-llama/Llama-3.1-70B \
        --expert ./rl-8b --expert-base meta-llama/Llama-3.1-8B --prompt "Solve: 12 * 13 ="

    # no weights at hand: build three tiny UNTRAINED random models (+ a small tokenizer) and use them;
    # the output is gibberish by construction, this only shows the pipeline working
    python python/generate.py --make-untrained /tmp/rast_tiny --prompt "hello" --max-new-tokens 16

Prints one block per prompt (or JSON lines with ``--json``); ``--stream`` prints text as it is generated.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a stitch in time saves nine; the early bird gets the worm",
    "numbers 0123456789 and symbols !?.,;:()[]{}",
]


def make_untrained(root: str, seed: int = 0) -> dict:
    """Save a byte-level BPE tokenizer and three tiny random-init Qwen2 models (base wider than the
    experts, different padded LM-head widths) under ``root``; return {role: path}. UNTRAINED."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_CORPUS * 4, trainer=trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    paths = {}
    for i, (role, hidden, width) in enumerate([("base", 128, 384), ("expert", 64, 336), ("expert_base", 64, 352)]):
        torch.manual_seed(seed + i)
        cfg = Qwen2Config(vocab_size=width, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                          tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id, initializer_range=0.1)
        path = os.path.join(root, role)
        Qwen2ForCausalLM(cfg).save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[role] = path
    return paths


def build_parser():
    from rast_kernels import _cli
    from rast_kernels.engine import add_engine_arguments

    ap = _cli.ArgumentParser(prog="generate.py", description=__doc__.replace("``", ""),
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_argument_group("models")
    src.add_argument("--base", help="base model id or path (the big one)")
    src.add_argument("--expert", nargs="+", help="expert model id(s) or path(s) (small, RL-tuned); several: one per "
                     "expert pair")
    src.add_argument("--expert-base", nargs="+",
                     help="the expert's base model id or path (what the expert was tuned from); one per --expert")
    src.add_argument("--make-untrained", metavar="DIR", type=_cli.output_dir,
                     help="build three tiny UNTRAINED random models in DIR and use them (gibberish output)")
    # every engine setting, under the engine's names (rast_kernels.engine.config): --max-batch-size,
    # --speculative-tokens, --no-cuda-graph, --fused-decode, --tensor-parallel-size (rank 0 prints), ...
    add_engine_arguments(ap, max_seq_len=2048)
    ap.add_argument("--expert-device", type=_cli.device, default=None,
                    help="device of the experts and expert bases (default: --device)")
    gen = ap.add_argument_group("generation")
    gen.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    gen.add_argument("--prompt-file", type=_cli.existing_file, help="a UTF-8 file with one prompt per line")
    gen.add_argument("--alpha", type=_cli.finite_float, nargs="+", default=[1.0],
                     help="weight of the expert's delta: one for every pair, or one per pair (default 1)")
    gen.add_argument("--base-plausibility", type=_cli.float_range(0.0, 1.0), default=0.0,
                     help="keep only tokens with p_base >= this times the base's top probability, in [0, 1] "
                          "(contrastive decoding's plausibility mask; 0 = off, default)")
    gen.add_argument("--temperature", type=_cli.float_range(0.0), default=1.0,
                     help="sampling temperature, >= 0; 0 = greedy (default 1)")
    gen.add_argument("--top-k", type=_cli.int_range(0), default=0, help="keep the k most likely tokens, 0 = off (default)")
    gen.add_argument("--top-p", type=_cli.float_range(0.0, 1.0, lo_open=True), default=1.0,
                     help="nucleus threshold in (0, 1], 1 = off (default)")
    gen.add_argument("--min-p", type=_cli.float_range(0.0, 1.0), default=0.0,
                     help="drop tokens below min-p times the top probability, in [0, 1], 0 = off (default)")
    gen.add_argument("--max-new-tokens", type=_cli.int_range(1), default=128,
                     help="most tokens generated per prompt, >= 1 (default 128)")
    gen.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    gen.add_argument("--seed", type=_cli.int_range(0, 2**63 - 1), default=0, help="sampling seed, >= 0 (default 0)")
    gen.add_argument("--stream", action="store_true", help="print text as it is generated (single prompt)")
    gen.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    return ap


def parse_args(argv=None):
    """Parse and check every option, and read the prompts, before anything is loaded or built."""
    from rast_kernels import _cli

    ap = build_parser()
    args = ap.parse_args(argv)
    if not args.make_untrained and not (args.base and args.expert and args.expert_base):
        ap.error("give --base, --expert and --expert-base (or --make-untrained DIR)")
    if args.expert and args.expert_base and len(args.expert) != len(args.expert_base):
        _cli.fail(ap, "--expert-base", f"give one per --expert ({len(args.expert)}), got {len(args.expert_base)}")
    pairs = len(args.expert) if args.expert else 1
    if len(args.alpha) not in (1, pairs):
        _cli.fail(ap, "--alpha", f"give one weight or one per expert pair ({pairs}), got {len(args.alpha)}")
    if args.max_new_tokens >= args.max_seq_len:
        _cli.fail(ap, "--max-new-tokens", f"{args.max_new_tokens} leaves no room for a prompt in "
                  f"--max-seq-len {args.max_seq_len}")
    if args.stop is not None and any(s == "" for s in args.stop):
        _cli.fail(ap, "--stop", "an empty stop string would stop at once")
    args.prompts = list(args.prompt or [])
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                args.prompts += [line.rstrip("\n") for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            _cli.fail(ap, "--prompt-file", f"cannot read {args.prompt_file!r}: {exc}")
    if not args.prompts:
        ap.error("give at least one --prompt or --prompt-file (with a non-empty line)")
    if args.stream and len(args.prompts) != 1:
        _cli.fail(ap, "--stream", f"takes exactly one prompt, got {len(args.prompts)}")
    return ap, args


def main(argv=None) -> int:
    ap, args = parse_args(argv)
    prompts = args.prompts

    from rast_kernels import RastEngine

    if args.make_untrained:
        paths = make_untrained(args.make_untrained)
        print(f"[untrained random models built in {args.make_untrained}: output is meaningless]", file=sys.stderr)
        args.base, args.expert, args.expert_base = paths["base"], [paths["expert"]], [paths["expert_base"]]

    from rast_kernels.engine import EngineConfig

    devices = None
    if args.device or args.expert_device:
        from rast_kernels.engine.loading import default_device
        main_dev = args.device or str(default_device())
        exp_dev = args.expert_device or main_dev
        devices = {"base": main_dev, "expert": exp_dev, "expert_base": exp_dev}
    t0 = time.perf_counter()
    try:
        expert, expert_base = (args.expert, args.expert_base) if len(args.expert) > 1 else \
            (args.expert[0], args.expert_base[0])
        engine = RastEngine(args.base, expert, expert_base, config=EngineConfig.from_args(args, devices=devices))
    except (OSError, ValueError) as exc:
        # a model id or path that does not load, or three models that do not fit together: the user's
        # input, so one line (transformers' messages run over several lines; the first says what failed)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        ap.exit(2, f"{ap.prog}: error: loading the models failed: {first}\n")
    # under torchrun every rank of the TP group runs the same calls and gets the same outputs: rank 0 prints
    say = print if engine.parallel is None or engine.parallel.rank == 0 else (lambda *a, **k: None)
    say(f"[{engine!r} ready in {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    kw = dict(alpha=args.alpha[0] if len(args.alpha) == 1 else args.alpha, base_plausibility=args.base_plausibility,
              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
              min_p=args.min_p, max_new_tokens=args.max_new_tokens, stop=args.stop, seed=args.seed)
    try:
        if args.stream:
            for piece in engine.stream(prompts[0], **kw):
                say(piece, end="", flush=True)
            say()
            return 0
        t0 = time.perf_counter()
        outs = engine.generate(prompts, **kw)
    except ValueError as exc:  # e.g. a prompt longer than --max-seq-len allows: a user error, one line
        ap.exit(2, f"{ap.prog}: error: {str(exc).strip().splitlines()[0]}\n")
    dt = time.perf_counter() - t0
    n_tok = sum(len(o.token_ids) for o in outs)
    for p, o in zip(prompts, outs):
        if args.json:
            say(json.dumps(dict(prompt=p, text=o.text, token_ids=o.token_ids, finish_reason=o.finish_reason,
                                  stop_reason=o.stop_reason, error=o.error, num_prompt_tokens=o.num_prompt_tokens)))
        else:
            say(f"=== prompt: {p!r}\n{o.text}\n--- {len(o.token_ids)} tokens, finish: {o.finish_reason}"
                  + (f" ({o.stop_reason!r})" if o.stop_reason is not None else "")
                  + (f", error: {o.error}" if o.error else ""))
    say(f"[{n_tok} tokens in {dt:.2f} s, including the first call's setup]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
