"""Train the toy trio and write its evaluation table (python -m rast_kernels.toy.train).

Pipeline, deterministic from ``--seed`` (same machine, same thread count):

1. Pretrain a larger *base* and a smaller *expert base* (``LlamaForCausalLM``) on one corpus of
   training-split problems where the direct style is common and the worked style rare
   (:func:`rast_kernels.toy.task.corpus_example`); loss on the completion tokens only.
2. RL: the *expert* is the expert base tuned with GRPO-style policy gradient (group-relative
   REINFORCE, no critic, no KL) on the exact-answer reward of its own samples. No supervised targets.
3. Save all three (safetensors + the shared tokenizer) and evaluate on held-out problems: each model
   alone and ``base + alpha * (expert - expert_base)`` for several ``alpha``, greedy and sampled.
   The table goes to ``eval.json`` and ``TRAINING.md`` beside the models.

``--smoke`` is the smallest setting (a few steps each, tiny eval) for CI.
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import torch

from ..engine.loading import cache_kwarg
from ..ops.philox import mix_seed
from . import task
from .common import DEFAULT_OUT, MAX_NEW_TOKENS, format_table, load_trio  # noqa: F401 (re-exported)
from .tokenizer import EOS_ID, PAD_ID, VOCAB, build_tokenizer, decode, encode



@dataclass
class TrainConfig:
    seed: int = 0
    worked_fraction: float = 0.15     # share of worked-style documents in the pretraining corpus
    base_dims: tuple = (4, 128, 384, 4)   # layers, hidden, intermediate, heads
    small_dims: tuple = (2, 64, 192, 4)
    pretrain_steps_base: int = 1000
    pretrain_steps_small: int = 400
    batch_size: int = 128
    lr_base: float = 2e-3
    lr_small: float = 3e-3
    rl_steps: int = 100
    rl_prompts: int = 32              # distinct prompts per RL step
    rl_group: int = 8                 # samples per prompt (the GRPO group)
    rl_lr: float = 3e-4
    rl_temperature: float = 1.0
    eval_problems: int = 500
    eval_seed: int = 1234
    sample_seed: int = 7
    alphas: tuple = (0.25, 0.5, 1.0, 2.0)
    threads: int = 2

    @classmethod
    def smoke(cls, **kw):
        base = dict(base_dims=(2, 32, 64, 2), small_dims=(1, 32, 64, 2), pretrain_steps_base=20,
                    pretrain_steps_small=20, batch_size=32, rl_steps=3, rl_prompts=4, rl_group=4,
                    eval_problems=10, alphas=(1.0,))
        base.update(kw)
        return cls(**base)


def make_model(dims, seed: int):
    """A fresh ``LlamaForCausalLM`` with ``dims = (layers, hidden, intermediate, heads)`` over the toy vocab."""
    from transformers import LlamaConfig, LlamaForCausalLM

    layers, hidden, inter, heads = dims
    cfg = LlamaConfig(vocab_size=len(VOCAB), hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=64, tie_word_embeddings=True, rms_norm_eps=1e-5,
                      bos_token_id=None, eos_token_id=EOS_ID, pad_token_id=PAD_ID, rope_theta=10000.0)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def _batch(pairs):
    """Right-padded ``input_ids``, ``labels`` (-100 outside completions) for ``[(prompt, completion)]``."""
    rows = [(encode(p), encode(c)) for p, c in pairs]
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        labels[i, len(p):len(p) + len(c)] = torch.tensor(c)
    return ids, labels


def _completion_logprobs(model, ids, labels):
    """Sum over completion tokens of log p(token), per row ``[B]``, and the completion lengths."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    tgt = labels[:, 1:]
    mask = tgt != -100
    lp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (lp * mask).sum(1), mask.sum(1)


def _lr_at(step, steps, lr, warmup=50):
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))


def pretrain(model, cfg: TrainConfig, steps: int, lr: float, data_seed: int, log=print, name="model"):
    """Next-token training on the mixed-style corpus (completion tokens only)."""
    rng = random.Random(data_seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    t0 = time.time()
    for step in range(steps):
        docs = [task.corpus_example(rng, cfg.worked_fraction) for _ in range(cfg.batch_size)]
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr)
        opt.zero_grad(set_to_none=True)
        # NOTE: the first part is always empty (completions start with E, O or S, never "A"), so every
        # batch runs as one forward padded to its longest document. Splitting direct from worked
        # documents (on "S") would be cheaper, but it changes the float summation and so the shipped
        # trio, which was trained with this code; the weighting by token counts is the plain token mean
        # either way.
        parts = [[d for d in docs if d[1][0] == "A"], [d for d in docs if d[1][0] != "A"]]
        n_total = sum(len(encode(c)) for _, c in docs)
        loss = 0.0
        for part in parts:
            if not part:
                continue
            ids, labels = _batch(part)
            n_part = int((labels != -100).sum())  # completion tokens: all are targets after the shift
            part_loss = model(input_ids=ids, labels=labels).loss * (n_part / n_total)
            part_loss.backward()
            loss += part_loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"[pretrain {name}] step {step}/{steps} loss {float(loss):.4f} ({time.time() - t0:.0f}s)")
    model.eval()
    return model


@torch.no_grad()
def generate(models, prompts, *, alpha=1.0, temperature=0.0, top_p=1.0, seed=0, row_ids=None,
             max_new_tokens=MAX_NEW_TOKENS):
    """Batched decoding with the RAST combination, the training-time stand-in for ``rast_generate``.

    ``models``: one model, or ``(base, expert, expert_base)`` sharing the vocab. Each step's token is
    drawn by :func:`rast_kernels.rast_sample` (backend ``"torch"``, the reference) from
    ``base + alpha * (expert - expert_base)``; a single model uses alpha 0. Prompts are grouped by length
    (no padding); each row's random stream is keyed by ``seed`` and its ``row_ids`` entry (default its
    index), offset by the decode step. Returns completions ``[list[int]]`` ending at EOS (included)
    or at ``max_new_tokens``.
    """
    from ..ops import rast_sample

    trio = tuple(models) if isinstance(models, (tuple, list)) else (models,)
    a = float(alpha) if len(trio) == 3 else 0.0
    if row_ids is None:
        row_ids = list(range(len(prompts)))
    groups = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    out = [None] * len(prompts)
    for _, idx in sorted(groups.items()):
        ids = torch.tensor([prompts[i] for i in idx], dtype=torch.long)
        seeds = torch.tensor([mix_seed(seed, row_ids[i]) for i in idx], dtype=torch.long)
        caches = [None] * len(trio)
        step_in = ids
        done = torch.zeros(len(idx), dtype=torch.bool)
        gen = []
        for t in range(max_new_tokens):
            logits = []
            for j, m in enumerate(trio):
                o = m(input_ids=step_in, use_cache=True, **{cache_kwarg(m): caches[j]})
                cache = getattr(o, "cache", None)
                caches[j] = cache if cache is not None else o.past_key_values
                logits.append(o.logits[:, -1].float())
            if len(trio) == 1:
                logits = logits * 3
            tok = rast_sample(logits[0], logits[1], logits[2], alpha=a, temperature=float(temperature),
                              top_p=float(top_p), seed=seeds, offset=t, backend="torch")
            tok = torch.where(done, torch.full_like(tok, PAD_ID), tok)
            gen.append(tok)
            done |= tok == EOS_ID
            if bool(done.all()):
                break
            step_in = tok.unsqueeze(1)
        gen = torch.stack(gen, 1).tolist()
        for r, i in enumerate(idx):
            seq = gen[r]
            out[i] = seq[:seq.index(EOS_ID) + 1] if EOS_ID in seq else seq
    return out


def grpo(model, cfg: TrainConfig, data_seed: int, log=print):
    """Group-relative policy gradient on the exact-answer reward (the expert's RL stage).

    Each step: ``rl_prompts`` training-split problems, ``rl_group`` samples each at ``rl_temperature``;
    advantage = reward - group mean reward; loss = -sum(advantage * log p(completion)) / number of
    completion tokens in the batch. Returns the per-step mean reward and worked-style share."""
    rng = random.Random(data_seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.rl_lr, betas=(0.9, 0.98), weight_decay=0.0)
    history, t0 = [], time.time()
    for step in range(cfg.rl_steps):
        probs = [task.sample_problem(rng) for _ in range(cfg.rl_prompts)]
        flat = [p for p in probs for _ in range(cfg.rl_group)]
        model.eval()
        comps = generate(model, [encode(p.prompt) for p in flat], temperature=cfg.rl_temperature,
                         seed=data_seed * 7919 + step, max_new_tokens=MAX_NEW_TOKENS)
        texts = [decode(c) for c in comps]
        reward = torch.tensor([float(task.check_answer(p, t) and c[-1:] == [EOS_ID])
                               for p, t, c in zip(flat, texts, comps)])
        adv = (reward.view(cfg.rl_prompts, cfg.rl_group)
               - reward.view(cfg.rl_prompts, cfg.rl_group).mean(1, keepdim=True)).reshape(-1)
        worked = sum(task.style_of(t) == "worked" for t in texts) / len(texts)
        history.append({"step": step, "reward": reward.mean().item(), "worked": worked})
        if adv.abs().sum() > 0:
            model.train()
            rows = [(encode(p.prompt), c) for p, c in zip(flat, comps)]
            width = max(len(a) + len(b) for a, b in rows)
            ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
            labels = torch.full_like(ids, -100)
            for i, (a, b) in enumerate(rows):
                ids[i, :len(a) + len(b)] = torch.tensor(a + b)
                labels[i, len(a):len(a) + len(b)] = torch.tensor(b)
            lp, n_tok = _completion_logprobs(model, ids, labels)
            loss = -(adv * lp).sum() / n_tok.sum().clamp_min(1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        if step % 10 == 0 or step == cfg.rl_steps - 1:
            log(f"[rl] step {step}/{cfg.rl_steps} reward {reward.mean().item():.3f} "
                f"worked {worked:.2f} ({time.time() - t0:.0f}s)")
    model.eval()
    return history


FORCED_ROW = "base, worked style forced (diagnostic)"


def eval_rows(alphas):
    """The table's rows: ``(name, mode, alpha)`` with mode ``single:<model>``, ``rast`` or ``forced:<model>``
    (the prompt is followed by ``S``, so the model must answer in the worked style: what it can do)."""
    rows = [("base", "single:base", None), ("expert_base", "single:expert_base", None),
            ("expert", "single:expert", None)]
    rows += [(f"base + delta (alpha={a:g})", "rast", float(a)) for a in alphas]
    rows.append((FORCED_ROW, "forced:base", None))
    return rows


def summarize(problems, completions):
    """Accuracy, its binomial standard error, worked-style share, accuracy within each style, and the
    per-problem 0/1 results (``correct``) for paired comparisons and the recompute test."""
    texts = [decode(c) for c in completions]
    ok = [task.check_answer(p, t) for p, t in zip(problems, texts)]
    styles = [task.style_of(t) for t in texts]
    n = len(ok)
    acc = sum(ok) / n
    by_style = {}
    for st, o in zip(styles, ok):
        by_style.setdefault(st, []).append(o)
    return {
        "accuracy": acc, "stderr": math.sqrt(max(acc * (1 - acc), 1e-12) / n), "n": n,
        "worked_share": styles.count("worked") / n,
        "accuracy_by_style": {k: {"count": len(v), "accuracy": sum(v) / len(v)} for k, v in sorted(by_style.items())},
        "correct": [int(o) for o in ok],
    }


def evaluate(models: dict, problems, alphas, *, temperature_sample=1.0, sample_seed=7):
    """The evaluation table (list of dicts) for ``models = {'base','expert','expert_base'}``."""
    prompts = [encode(p.prompt) for p in problems]
    table = []
    for name, mode, alpha in eval_rows(alphas):
        for decoding, temp in (("greedy", 0.0), ("sample", temperature_sample)):
            if mode == "rast":
                trio = (models["base"], models["expert"], models["expert_base"])
                comps = generate(trio, prompts, alpha=alpha, temperature=temp, seed=sample_seed)
            elif mode.startswith("forced:"):
                s_id = encode("S")
                comps = [s_id + c for c in generate(models[mode.split(":")[1]], [p + s_id for p in prompts],
                                                    temperature=temp, seed=sample_seed)]
            else:
                comps = generate(models[mode.split(":")[1]], prompts, temperature=temp, seed=sample_seed)
            row = {"row": name, "decoding": decoding, "temperature": temp, "alpha": alpha}
            row.update(summarize(problems, comps))
            table.append(row)
    return table


def paired_gain(table, row_a, row_b, decoding):
    """Mean per-problem accuracy gain of ``row_a`` over ``row_b`` and its paired standard error."""
    a = next(r for r in table if r["row"] == row_a and r["decoding"] == decoding)["correct"]
    b = next(r for r in table if r["row"] == row_b and r["decoding"] == decoding)["correct"]
    d = [x - y for x, y in zip(a, b)]
    m = sum(d) / len(d)
    var = sum((x - m) ** 2 for x in d) / max(1, len(d) - 1)
    return m, math.sqrt(var / len(d))


def write_training_md(out: str, result: dict) -> str:
    """``TRAINING.md`` beside the models: how they were made and the measured table (from ``eval.json``)."""
    c, t, e = result["config"], result["timings_s"], result["eval"]
    lines = [
        "# The embedded RAST toy trio", "",
        "Generated by `rast_kernels.toy.train` (do not edit by hand; `eval.json` holds the raw numbers).", "",
        f"- command: `{result['command']}`",
        f"- seed: {result['seed']}; torch {result['torch']}; {result['threads']} CPU threads; finished {result['date_utc']} UTC",
        f"- task: parity of {task.N_BITS}-bit strings (`rast_kernels/toy/task.py`); "
        f"pretraining corpus: worked-style share {c['worked_fraction']}, the rest direct answers",
        f"- base: LlamaForCausalLM layers/hidden/intermediate/heads = {tuple(c['base_dims'])}, "
        f"{c['pretrain_steps_base']} steps x {c['batch_size']} documents",
        f"- expert_base: {tuple(c['small_dims'])}, {c['pretrain_steps_small']} steps x {c['batch_size']} documents "
        "(same corpus distribution)",
        f"- expert: expert_base + {c['rl_steps']} GRPO steps ({c['rl_prompts']} prompts x {c['rl_group']} samples, "
        f"lr {c['rl_lr']}, exact-answer reward, no supervised targets)",
        "- timings (s, measured, CPU): " + ", ".join(f"{k} {v:.0f}" for k, v in t.items()),
        f"- evaluation: {e['problems']} held-out problems (`heldout_problems({e['problems']}, {e['eval_seed']})`), "
        f"max {e['max_new_tokens']} new tokens; sampled rows at temperature {e['sample_temperature']:g}, "
        f"seed {e['sample_seed']}; ± is the binomial standard error", "",
        format_table(result["table"]), "",
        "Gain of base + delta over base alone (paired standard error over the same problems):", "",
    ]
    lines += [f"- {k}: {v['gain']:+.3f} ± {v['paired_stderr']:.3f}" for k, v in result["gain_over_base"].items()]
    lines += ["", "Accuracy within each answer style (count of completions in that style):", "",
              "| row | decoding | worked | direct | other |", "|---|---|---|---|---|"]
    for r in result["table"]:
        cell = lambda st: (f"{r['accuracy_by_style'][st]['accuracy']:.3f} ({r['accuracy_by_style'][st]['count']})"
                           if st in r["accuracy_by_style"] else "-")
        lines.append(f"| {r['row']} | {r['decoding']} | {cell('worked')} | {cell('direct')} | {cell('other')} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "TRAINING.md"), "w") as f:
        f.write(text)
    return text


def main(argv=None) -> int:
    from .. import _cli

    ap = _cli.ArgumentParser(prog="python -m rast_kernels.toy.train",
                             description=__doc__.split("\n")[0].replace("``", ""))
    ap.add_argument("--out", type=_cli.output_dir, default=None,
                    help="output folder, created if missing (default: the package's trio/; required with --smoke)")
    ap.add_argument("--seed", type=_cli.int_range(0), default=0, help="run seed, >= 0 (default 0)")
    ap.add_argument("--smoke", action="store_true", help="smallest setting, for CI (seconds)")
    ap.add_argument("--threads", type=_cli.int_range(1), default=None, help="torch threads, >= 1 (default 2; smoke 1)")
    ap.add_argument("--eval-problems", type=_cli.int_range(1, task.HELDOUT_SIZE), default=None,
                    help=f"held-out problems in the evaluation, 1..{task.HELDOUT_SIZE} (default 500; smoke 10)")
    ap.add_argument("--worked-fraction", type=_cli.float_range(0.0, 1.0), default=None,
                    help="share of worked-style documents in the pretraining corpus, in [0, 1] (default 0.15)")
    ap.add_argument("--rl-steps", type=_cli.int_range(0), default=None,
                    help="GRPO steps for the expert, >= 0 (default 100; smoke 3)")
    args = ap.parse_args(argv)
    if args.out is None:
        if args.smoke:  # a smoke trio is useless as the shipped one: never overwrite it by default
            _cli.fail(ap, "--out", "--smoke needs --out DIR (the default folder is the shipped trio)")
        args.out = DEFAULT_OUT

    over = {k: v for k, v in dict(seed=args.seed, eval_problems=args.eval_problems,
                                  worked_fraction=args.worked_fraction, rl_steps=args.rl_steps).items()
            if v is not None}
    cfg = TrainConfig.smoke(threads=1, **over) if args.smoke else TrainConfig(**over)
    if args.threads is not None:
        cfg.threads = args.threads
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, args, argv)
    finally:
        torch.set_num_threads(previous_threads)  # main() may run inside a test process


def _run(cfg: TrainConfig, args, argv) -> int:
    os.makedirs(args.out, exist_ok=True)
    logf = open(os.path.join(args.out, "train_log.txt"), "w")

    def log(msg):
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    log(f"config: {json.dumps(asdict(cfg))}")
    t_start, timings = time.time(), {}
    base = make_model(cfg.base_dims, cfg.seed)
    small = make_model(cfg.small_dims, cfg.seed + 1)
    log(f"params: base {sum(p.numel() for p in base.parameters())}, small {sum(p.numel() for p in small.parameters())}")

    t = time.time()
    pretrain(base, cfg, cfg.pretrain_steps_base, cfg.lr_base, data_seed=cfg.seed * 1000 + 1, log=log, name="base")
    timings["pretrain_base_s"] = time.time() - t
    t = time.time()
    # same corpus distribution, an independent stream of it (the two bases need not see identical batches)
    pretrain(small, cfg, cfg.pretrain_steps_small, cfg.lr_small, data_seed=cfg.seed * 1000 + 2, log=log, name="small")
    timings["pretrain_small_s"] = time.time() - t

    tok = build_tokenizer()
    def save(model, role):
        path = os.path.join(args.out, role)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        for name in os.listdir(path):  # safetensors are written 0600; installed package data must be readable
            os.chmod(os.path.join(path, name), 0o644)

    save(base, "base")
    save(small, "expert_base")
    t = time.time()
    history = grpo(small, cfg, data_seed=cfg.seed * 1000 + 3, log=log)
    timings["rl_s"] = time.time() - t
    save(small, "expert")

    t = time.time()
    models = load_trio(args.out)  # evaluate exactly what is shipped
    problems = task.heldout_problems(cfg.eval_problems, cfg.eval_seed)
    table = evaluate(models, problems, cfg.alphas, sample_seed=cfg.sample_seed)
    timings["eval_s"] = time.time() - t
    timings["total_s"] = time.time() - t_start

    gains = {}
    for a in cfg.alphas:
        for dec in ("greedy", "sample"):
            m, se = paired_gain(table, f"base + delta (alpha={a:g})", "base", dec)
            gains[f"alpha={a:g} {dec}"] = {"gain": m, "paired_stderr": se}
    cmd = "python -m rast_kernels.toy.train " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"seed": cfg.seed, "command": cmd.strip(), "config": asdict(cfg), "timings_s": timings,
              "threads": cfg.threads, "torch": torch.__version__, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
              "eval": {"problems": cfg.eval_problems, "eval_seed": cfg.eval_seed, "sample_seed": cfg.sample_seed,
                       "sample_temperature": 1.0, "max_new_tokens": MAX_NEW_TOKENS},
              "table": table, "gain_over_base": gains, "rl_history": history}
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump(result, f, indent=1)
    write_training_md(args.out, result)
    log(format_table(table))
    for k, v in gains.items():
        log(f"gain over base, {k}: {v['gain']:+.3f} ± {v['paired_stderr']:.3f} (paired s.e.)")
    log(f"timings: {json.dumps({k: round(v, 1) for k, v in timings.items()})}")
    logf.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
