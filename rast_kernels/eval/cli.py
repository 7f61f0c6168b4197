"""``python -m rast_kernels eval``: evaluate base, expert and base + delta at several alphas on local datasets.

Every option is checked before a model is loaded (a bad one is one line on stderr naming it, exit status 2):
model paths, dataset kinds, files and their fields, the template, ``--k`` against ``--n``, and whether ``--out``
holds samples made with other settings. Then the tokenizer renders the prompts, one engine per model set
generates what ``--out`` lacks (:mod:`rast_kernels.eval.run`), and the table is printed. Re-running the same
command resumes; Ctrl-C loses nothing written (exit status 130).

Under ``torchrun --nproc-per-node=N`` the units are split over the ``N / --tensor-parallel-size`` data-parallel
groups (:mod:`rast_kernels.parallel`); each group writes its own part file, global rank 0 merges them into
``samples.jsonl`` and alone prints the progress bar, the table and any option error (every rank exits with it).
For several nodes, ``--out`` must be a directory that every node sees (a shared filesystem).

Examples::

    python -m rast_kernels eval --toy --alpha 0 1 --base-only --expert-only --n 4 --k 1 4 --out runs/toy
    python -m rast_kernels eval --base Qwen/Qwen2.5-32B --expert my/rl-14b --expert-base Qwen/Qwen2.5-14B \\
        --dataset math500 --data math500.jsonl --alpha 0.5 1.0 --n 8 --k 1 8 --max-new-tokens 8192 --out runs/m
    torchrun --nproc-per-node=8 -m rast_kernels eval --toy --alpha 1 --n 32 --k 1 32 --out runs/toy8
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from typing import List, Optional

from .. import _cli
from .datasets import DATASETS, load_dataset
from .templates import check_chat, resolve_template

PROG = "python -m rast_kernels eval"


class _Fail(Exception):
    """A user error found after parsing: (option, why)."""


def build_parser() -> argparse.ArgumentParser:
    p = _cli.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("models")
    m.add_argument("--toy", action="store_true", help="the shipped toy trio (rast_kernels/toy/trio) and, "
                   "unless --dataset says otherwise, the toy parity task")
    m.add_argument("--base", help="base model: local path or hub id")
    m.add_argument("--expert", help="RL expert: local path or hub id")
    m.add_argument("--expert-base", help="the expert's own base model: local path or hub id")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", nargs="+", choices=list(DATASETS), metavar="KIND",
                   help=f"dataset kinds, the table's columns ({', '.join(DATASETS)}); default toy with --toy")
    d.add_argument("--data", nargs="+", metavar="FILE", default=[],
                   help="one .jsonl/.json/.parquet file per non-toy --dataset, in order")
    d.add_argument("--field-problem", help="record field holding the problem (overrides the dataset kind's)")
    d.add_argument("--field-answer", help="record field holding the gold answer (overrides the dataset kind's)")
    d.add_argument("--template", help="rast (the paper's prompt), boxed, chat, raw, or a file containing "
                   "{input}; default raw for toy, rast otherwise")
    d.add_argument("--max-problems", type=_cli.int_range(1), help="first N problems per dataset (toy: N "
                   "held-out problems, default 100)")
    r = p.add_argument_group("rows and sampling")
    r.add_argument("--alpha", nargs="+", type=_cli.finite_float, metavar="A",
                   help="base + alpha * delta rows (default 1.0 when no row is chosen)")
    r.add_argument("--base-only", action="store_true", help="add the base model alone")
    r.add_argument("--expert-only", action="store_true", help="add the expert alone (the RL row)")
    r.add_argument("--temperature", type=_cli.float_range(0.0), default=1.0, help="0 = greedy (default 1.0)")
    r.add_argument("--top-p", type=_cli.float_range(0.0, 1.0, lo_open=True), default=1.0)
    r.add_argument("--n", type=_cli.int_range(1), default=1, help="samples per problem (default 1)")
    r.add_argument("--k", nargs="+", type=_cli.int_range(1), default=[1], metavar="K",
                   help="pass@k / maj@k to report (each <= --n; default 1)")
    r.add_argument("--max-new-tokens", type=_cli.int_range(1),
                   help="default 24 for the toy task, 1024 otherwise")
    r.add_argument("--seed", type=_cli.int_range(-(1 << 63), (1 << 63) - 1), default=0)
    o = p.add_argument_group("run")
    o.add_argument("--out", default="eval_out", help="output directory (samples.jsonl, summary.json, table.md, "
                   "alpha.png); re-running resumes it (default eval_out)")
    o.add_argument("--diagnostics", action="store_true",
                   help="record the delta's per-token effect (argmax flips, KL, raised tokens) on base + delta rows")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_engine_options(p)
    return p


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    """Every engine setting (:func:`rast_kernels.engine.add_engine_arguments`, read back by
    :func:`_engine_factory`). ``--diagnostics`` is the run option of the same name (it also changes what a record
    holds); ``--max-seq-len`` defaults to the longest prompt + ``--max-new-tokens`` of each model set; the
    tokenizer renders the templates too. ``--tensor-parallel-size``: under torchrun, ranks per base-model shard
    group; the world size / TP groups split the work (default 1: every rank is its own data-parallel group)."""
    from ..engine import add_engine_arguments

    add_engine_arguments(p, exclude=("diagnostics",), max_batch_size=32, tensor_parallel_size=1, max_seq_len=None)


def _looks_like_path(text: str) -> bool:
    # hub ids are "name" or "org/name"; anything else with a separator is meant as a local path
    return text.startswith(("/", ".", "~")) or "\\" in text or text.count("/") > 1


def _model(option: str, value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    path = os.path.expanduser(value)
    if os.path.exists(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise _Fail(option, f"{value!r} is not a model directory (no config.json)")
        return path
    if _looks_like_path(value):
        raise _Fail(option, f"no such directory: {value!r}")
    return value  # a hub id, resolved when loading (HF_HUB_OFFLINE is honoured)


def _plan(args):
    """Everything checkable without models: -> (datasets, configs, settings, tokenizer source)."""
    from .run import Settings, make_configs

    if args.toy:
        for opt in ("base", "expert", "expert_base"):
            if getattr(args, opt) is not None:
                raise _Fail("--" + opt.replace("_", "-"), "--toy loads the shipped trio; give one or the other")
        from ..toy.common import DEFAULT_OUT

        models = {r: os.path.join(DEFAULT_OUT, r) for r in ("base", "expert", "expert_base")}
    else:
        models = dict(base=_model("--base", args.base), expert=_model("--expert", args.expert),
                      expert_base=_model("--expert-base", args.expert_base))
    alphas = args.alpha if args.alpha is not None else ([] if (args.base_only or args.expert_only) else [1.0])
    configs = make_configs(alphas, args.base_only, args.expert_only)
    if alphas and (models["expert"] is None or models["expert_base"] is None):
        raise _Fail("--expert" if models["expert"] is None else "--expert-base",
                    "base + delta rows (--alpha) need --expert and --expert-base")
    if (alphas or args.base_only) and models["base"] is None:
        raise _Fail("--base", "required (or --toy)")
    if args.expert_only and models["expert"] is None:
        raise _Fail("--expert", "--expert-only needs --expert")
    for k in args.k:
        if k > args.n:
            raise _Fail("--k", f"k = {k} is more than --n {args.n} samples per problem")

    kinds = args.dataset or (["toy"] if args.toy else None)
    if not kinds:
        raise _Fail("--dataset", "required (one of " + ", ".join(DATASETS) + ")")
    if len(set(kinds)) != len(kinds):
        raise _Fail("--dataset", "a kind is given twice")
    files = [k for k in kinds if k != "toy"]
    if len(args.data) != len(files):
        raise _Fail("--data", f"expected {len(files)} file(s), one per non-toy --dataset "
                              f"({', '.join(files) or 'none'}), got {len(args.data)}")
    datasets, it = [], iter(args.data)
    for kind in kinds:
        path = None if kind == "toy" else next(it)
        try:
            datasets.append(load_dataset(kind, path, field_problem=args.field_problem,
                                         field_answer=args.field_answer, max_problems=args.max_problems))
        except (ValueError, FileNotFoundError, ImportError) as exc:
            msg = str(exc)
            option = "--" + msg.split(":", 1)[0].replace("_", "-") if msg.startswith(("field_", "data:")) \
                else "--data"
            raise _Fail(option, msg.split(": ", 1)[1] if ": " in msg else msg)

    if any(d.grader == "math" for d in datasets):
        import importlib.util

        if importlib.util.find_spec("math_verify") is None:
            raise _Fail("--dataset", f"{next(d.name for d in datasets if d.grader == 'math')} is graded with "
                                     "math-verify, which is not installed: pip install math-verify")
    if args.template is None:
        toy = {d.name == "toy" for d in datasets}
        if len(toy) > 1:
            raise _Fail("--template", "the toy task (raw prompts) and other datasets need different templates; "
                                      "give --template or run them separately")
        args.template = "raw" if toy == {True} else "rast"
    try:
        template = resolve_template(args.template)
    except ValueError as exc:
        raise _Fail("--template", str(exc).split(": ", 1)[1])
    max_new = args.max_new_tokens or (24 if all(d.name == "toy" for d in datasets) else 1024)
    settings = Settings(models=models, template=template, temperature=args.temperature, top_p=args.top_p,
                        max_new_tokens=max_new, seed=args.seed, n=args.n, ks=sorted(set(args.k)),
                        diagnostics=args.diagnostics, max_batch_size=args.max_batch_size)
    return datasets, configs, settings


def _parallel(args):
    """The :class:`~rast_kernels.parallel.ParallelContext` under torchrun (None in one plain process)."""
    from ..parallel import init_parallel, launched

    if not launched() and args.tensor_parallel_size == 1:
        return None
    try:
        return init_parallel(args.tensor_parallel_size)
    except ValueError as exc:
        raise _Fail("--tensor-parallel-size", str(exc).split(": ", 1)[1])


def _quiet():
    """Under torchrun every rank checks the same options and finds the same errors: only rank 0 reports them."""
    from ..parallel import launched

    if not launched() or os.environ["RANK"] == "0":
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    return stack


def _main(argv: Optional[List[str]]) -> int:
    parser = build_parser()
    with _quiet():
        args = parser.parse_args(argv)
        ctx, setup = _setup(parser, args)
    datasets, configs, settings, out, tokenizer = setup
    rank0 = ctx is None or ctx.rank == 0
    from .run import run_eval
    from .store import SAMPLES

    try:
        run_eval(datasets, configs, settings, out, tokenizer=tokenizer,
                 engine_factory=_engine_factory(parser, args, settings.models, tokenizer, ctx),
                 progress=not args.no_progress, context=ctx)
    except KeyboardInterrupt:
        if rank0:
            where = os.path.join(out, SAMPLES) if ctx is None or ctx.dp_size == 1 else f"{out} (samples*.jsonl)"
            print(f"\n{PROG}: interrupted; the samples so far are in {where}: re-run the same command to resume",
                  file=sys.stderr)
        return 130
    return 0


def _engine_factory(parser, args, models: dict, tokenizer, ctx):
    """``run_eval``'s ``engine_factory``: the :class:`~rast_kernels.RastEngine` of a model set (``"trio"``,
    ``"base"`` or ``"expert"``; ``models``: the paths by role) built from the engine options
    (:func:`_add_engine_options`); an engine that refuses its arguments is ``parser``'s one-line exit 2."""

    def engine_factory(which: str, max_seq_len: int, diagnostics: bool):
        from ..engine import EngineConfig, RastEngine

        trio = ((models["base"], models["expert"], models["expert_base"]) if which == "trio"
                else (models[which], None, None))
        # under torchrun each rank's models go on its own device; the TP size only when sharding
        sharded = ctx is not None and ctx.tp_size > 1
        if args.max_seq_len is not None and args.max_seq_len < max_seq_len:
            _cli.fail(parser, "--max-seq-len", f"{args.max_seq_len} is less than the {which} prompts need: the "
                                               f"longest + --max-new-tokens = {max_seq_len}")
        config = EngineConfig.from_args(args, tokenizer=tokenizer, max_seq_len=max(2, args.max_seq_len or max_seq_len),
                                        diagnostics=diagnostics, tensor_parallel_size=ctx.tp_size if sharded else None,
                                        **({} if ctx is None else dict(devices=ctx.device)))
        if which != "trio":  # a model alone has no small model to draft with
            config = config.replace(speculative_tokens=0)
        try:
            return RastEngine(*trio, config=config)
        except (ValueError, OSError) as exc:  # e.g. tokenizers that disagree, a hub id that does not exist
            _cli.fail(parser, "--" + ("base" if which == "trio" else which), str(exc).splitlines()[0])

    return engine_factory


def _setup(parser, args):
    """Every check before the models load -> (parallel context, (datasets, configs, settings, out, tokenizer));
    a user error is ``parser``'s one-line exit 2."""
    ctx = None
    try:
        datasets, configs, settings = _plan(args)
        try:
            out = _cli.output_dir(args.out)
        except argparse.ArgumentTypeError as exc:
            raise _Fail("--out", str(exc))
        ctx = _parallel(args)
        from ..parallel import broadcast_object
        from .store import check_resume, read_samples

        why = None
        if ctx is None or ctx.rank == 0:  # one rank reads and writes run.json; every rank gets its verdict
            try:
                check_resume(out, settings)
                read_samples(out, parts=True)  # a damaged samples file is found now, not after the models load
            except ValueError as exc:
                why = str(exc).split(": ", 1)[1]
        why = broadcast_object(why, context=ctx)
        if why is not None:
            raise _Fail("--out", why)
        src = args.tokenizer or settings.models["base"] or settings.models["expert"]
        try:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(src)
        except (OSError, ValueError) as exc:
            raise _Fail("--tokenizer" if args.tokenizer else "--base" if settings.models["base"] else "--expert",
                        f"cannot load a tokenizer from {src!r}: {str(exc).splitlines()[0]}")
        if settings.template.chat:
            try:
                check_chat(tokenizer)
            except ValueError as exc:
                raise _Fail("--template", str(exc).split(": ", 1)[1])
    except _Fail as exc:
        _cli.fail(parser, *exc.args)
    return ctx, (datasets, configs, settings, out, tokenizer)


def main(argv: Optional[List[str]] = None) -> int:
    """The ``eval`` command: ``argv`` without the program name (and without ``eval``); returns the exit status
    (2 for a bad option, after its one-line message on stderr; 130 when interrupted)."""
    try:
        return _main(argv)
    except SystemExit as exc:  # argparse's --help and errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)


if __name__ == "__main__":
    sys.exit(main())
