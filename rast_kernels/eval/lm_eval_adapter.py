"""An lm-evaluation-harness model for RAST, registered as ``"rast"`` (needs ``pip install lm-eval``).

``import rast_kernels.eval.lm_eval_adapter`` registers it. The package also declares it as an ``lm_eval.models``
entry point, which lm-eval's plugin discovery (merged upstream after the 0.4.13 release) reads, so there
``lm_eval --model rast ...`` works as it is. lm-eval 0.4.13's own CLI imports no third-party model, so with it the
command line goes through this module, which registers the model and then runs lm-eval's CLI with the same
arguments::

    python -m rast_kernels.eval.lm_eval_adapter --model rast \\
        --model_args base=Qwen/Qwen2.5-32B,expert=my/rl-14b,expert_base=Qwen/Qwen2.5-14B,alpha=0.5 --tasks gsm8k

Model args: ``base`` (required), ``expert`` and ``expert_base`` (both or neither: neither scores the base
alone), ``alpha`` (default 1.0), ``dtype`` (default bfloat16 on CUDA, float32 on CPU), ``device`` (all three models; default the GPU if any),
``max_length`` (context limit, default the base config's ``max_position_embeddings`` capped at 4096),
``max_gen_toks`` (default 256), ``max_batch_size`` (the engine's decode slots, default 8). An unknown model arg
is a ``ValueError`` naming it (a misspelt ``alpha`` would otherwise run alpha = 1).

* ``generate_until`` goes through :class:`~rast_kernels.RastEngine` (all requests fed at once): greedy unless the
  task asks for ``do_sample`` / a ``temperature > 0``; ``until`` strings are the engine's stop strings. Prompts
  longer than ``max_length - max_gen_toks`` tokens keep their last tokens.
* ``loglikelihood`` / ``loglikelihood_rolling`` score with the combined distribution
  ``log_softmax(z_base + alpha * (z_expert - z_expert_base))`` over the real vocabulary (``len(tokenizer)``
  columns; :func:`rast_kernels.engine.scoring.combined_logprobs`, which the server's ``echo`` also uses), from one
  full-sequence forward per model and request (inputs longer than ``max_length`` keep their last tokens);
  ``is_greedy`` is whether every continuation token is that distribution's argmax. Rolling windows are lm-eval's
  (``get_rolling_token_windows`` with the BOS, else EOS, token as prefix). lm-eval's own ``local-completions``
  model against ``python -m rast_kernels serve`` gives the same loglikelihoods (the server's ``echo``).
"""
from __future__ import annotations

import sys
from typing import List, Optional

try:
    import lm_eval.models  # noqa: F401 - fills the registry first: an empty registry would skip lm-eval's own models
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as exc:  # the rest of rast_kernels never imports this module
    raise ImportError("rast_kernels.eval.lm_eval_adapter needs lm-eval: pip install lm-eval "
                      "(or pip install 'rast_kernels[eval]')") from exc

import torch

from ..engine.scoring import combined_logprobs

ROLES = ("base", "expert", "expert_base")


def _load(spec, dtype, device):
    from transformers import AutoModelForCausalLM

    if not isinstance(spec, str):
        return spec  # a loaded model (Python API)
    kw = {} if dtype is None else {"dtype": getattr(torch, dtype) if isinstance(dtype, str) else dtype}
    model = AutoModelForCausalLM.from_pretrained(spec, **kw)
    return model.to(device) if device is not None else model


@register_model("rast")
class RastLM(LM):
    """lm-eval's ``LM`` over a RAST trio (module docstring)."""

    def __init__(self, base=None, expert=None, expert_base=None, alpha=1.0, dtype=None, device=None,
                 max_length=None, max_gen_toks=256, max_batch_size=8, tokenizer=None, batch_size=None, **unknown):
        super().__init__()
        if unknown:  # a misspelt model arg (alhpa=0.5) must not silently run the default
            raise ValueError(f"{', '.join(sorted(unknown))}: unknown model_args for 'rast' (known: base, expert, "
                             "expert_base, alpha, dtype, device, max_length, max_gen_toks, max_batch_size)")
        del batch_size  # lm-eval's batching knob: the engine batches continuously, full-sequence scores go one by one
        if base is None:
            raise ValueError("base: required (model_args base=PATH_OR_ID)")
        if (expert is None) != (expert_base is None):
            raise ValueError("expert, expert_base: give both (RAST) or neither (the base alone)")
        try:
            self.alpha = float(alpha)
        except (TypeError, ValueError):
            raise ValueError(f"alpha: expected a number, got {alpha!r}") from None
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            # lm-eval may hand down its default "cuda" on a machine without one
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device_ = torch.device(device)
        if dtype is None and self.device_.type == "cuda":
            dtype = "bfloat16"  # the engine's CUDA default; on CPU a path loads in float32
        if dtype is not None and not isinstance(dtype, torch.dtype) and dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype: expected float32, bfloat16 or float16, got {dtype!r}")
        self.specs = dict(base=base, expert=expert, expert_base=expert_base)
        self.models = {r: _load(s, dtype, device) for r, s in self.specs.items() if s is not None}
        for m in self.models.values():
            m.eval()
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(base if isinstance(base, str) else base.name_or_path)
        self.tok = tokenizer
        self.vocab = len(tokenizer)
        cfg_len = getattr(self.models["base"].config, "max_position_embeddings", None) or 4096
        self.max_length = int(max_length) if max_length is not None else min(int(cfg_len), 4096)
        self.max_gen_toks = int(max_gen_toks)
        self.max_batch_size = int(max_batch_size)
        self.dtype = dtype
        self._engine = None

    # ------------------------------------------------------------------ scoring
    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id

    def _score(self, context: List[int], continuation: List[int]) -> tuple:
        """``(sum of log p(continuation | context), all greedy)``, left-truncated to ``max_length`` inputs."""
        ids = (context + continuation)[-(self.max_length + 1):]
        inp = ids[:-1]
        alphas = (self.alpha,) if "expert" in self.models else ()
        lp = combined_logprobs(self.models, inp, alphas, self.vocab)[-len(continuation):]
        target = torch.tensor(continuation, device=lp.device)
        chosen = lp.gather(1, target.unsqueeze(1)).squeeze(1)
        return float(chosen.sum()), bool((lp.argmax(1) == target).all())

    def _encode_pair(self, context: str, continuation: str):
        # lm-eval's convention: a trailing space of the context belongs to the continuation, and the
        # continuation's tokens are those of the whole text past the context's (BPE merges across the boundary)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
        if not context:
            return [self.prefix_token_id], list(self.tok(continuation, add_special_tokens=False)["input_ids"])
        whole = list(self.tok(context + continuation, add_special_tokens=True)["input_ids"])
        ctx = list(self.tok(context, add_special_tokens=True)["input_ids"])
        return ctx, whole[len(ctx):]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> List[tuple]:
        out = []
        for req in requests:
            context, continuation = req.args
            ctx, cont = self._encode_pair(context, continuation)
            if not cont:
                out.append((0.0, True))
                continue
            out.append(self._score(ctx, cont))
            self.cache_hook.add_partial("loglikelihood", req.args, out[-1])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for req in requests:
            (text,) = req.args
            ids = list(self.tok(text, add_special_tokens=False)["input_ids"])
            total = 0.0
            for window in get_rolling_token_windows(ids, self.prefix_token_id, self.max_length, 1):
                ctx, pred = make_disjoint_window(window)
                total += self._score(ctx, pred)[0]
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    # ------------------------------------------------------------------ generation
    def _engine_for(self):
        if self._engine is None:
            from ..engine import RastEngine

            m = self.models
            self._engine = RastEngine(m["base"], m.get("expert"), m.get("expert_base"), tokenizer=self.tok,
                                      devices=self.device_, max_batch_size=self.max_batch_size,
                                      max_seq_len=self.max_length)
        return self._engine

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        from ..engine import SamplingParams

        if not requests:
            return []
        engine = self._engine_for()
        prompts, params = [], []
        for req in requests:
            context, kw = req.args
            kw = dict(kw or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            max_new = max(1, min(max_new, self.max_length - 1))
            temperature = float(kw.pop("temperature", 0.0))
            if not kw.pop("do_sample", temperature > 0):
                temperature = 0.0
            ids = list(self.tok(context, add_special_tokens=True)["input_ids"])[-(self.max_length - max_new):]
            prompts.append(ids)
            params.append(SamplingParams(alpha=self.alpha, temperature=temperature, max_new_tokens=max_new,
                                         top_p=float(kw.pop("top_p", 1.0)), stop=until or None))
        outs = engine.generate(prompts, params, progress=False if disable_tqdm else None)
        texts = [o.text for o in outs]
        for req, t in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", req.args, t)
        return texts

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tok, "name_or_path", "rast").replace("/", "__")


def main(argv: Optional[List[str]] = None) -> int:
    """lm-eval's command line with the ``rast`` model registered (``argv`` without the program name)."""
    from lm_eval.__main__ import cli_evaluate

    old = sys.argv
    sys.argv = ["lm_eval"] + (sys.argv[1:] if argv is None else list(argv))
    try:
        cli_evaluate()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old
    return 0


if __name__ == "__main__":
    sys.exit(main())
