"""The lm-eval "rast" model on the shipped toy trio, with local tasks (tests/eval/lm_task: YAML + JSONL)."""
import os

import pytest

lm_eval = pytest.importorskip("lm_eval")

from rast_kernels.engine import SamplingParams  # noqa: E402
from rast_kernels.toy import task  # noqa: E402
from rast_kernels.toy.common import DEFAULT_OUT  # noqa: E402

TASKS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lm_task")
TRIO = {r: os.path.join(DEFAULT_OUT, r) for r in ("base", "expert", "expert_base")}


class Req:
    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def rast_lm():
    from rast_kernels.eval.lm_eval_adapter import RastLM

    return RastLM(**TRIO, alpha=1.0)


def test_loglikelihood_is_the_engines_sampling_distribution(rast_lm):
    # the engine samples at T = 1 from the same combined distribution, decoding incrementally from its KV cache;
    # its per-token logprobs must add up to the full-forward score of the text it produced
    engine = rast_lm._engine_for()
    prompts = [p.prompt for p in task.heldout_problems(4)]
    outs = engine.generate(prompts, SamplingParams(alpha=1.0, temperature=1.0, max_new_tokens=24,
                                                   return_logprobs=True), seed=3)
    scores = rast_lm.loglikelihood([Req(p, o.text) for p, o in zip(prompts, outs)])
    for o, (lp, _) in zip(outs, scores):
        assert lp == pytest.approx(sum(o.logprobs), abs=1e-3)
    greedy = engine.generate(prompts, SamplingParams(alpha=1.0, temperature=0.0, max_new_tokens=24))
    for p, o in zip(prompts, greedy):
        lp, is_greedy = rast_lm.loglikelihood([Req(p, o.text)])[0]
        assert is_greedy and lp < 0
        wrong = o.text[:-1] + ("E" if o.text[-1] == "O" else "O")
        assert rast_lm.loglikelihood([Req(p, wrong)])[0][1] is False


def test_rolling_equals_loglikelihood_from_the_prefix_token(rast_lm):
    text = task.heldout_problems(1)[0].prompt + "S"
    (rolling,) = rast_lm.loglikelihood_rolling([Req(text)])
    (lp, _), = rast_lm.loglikelihood([Req("", text)])
    assert rolling == pytest.approx(lp, abs=1e-4)
    # short windows: less context for later tokens, so a different (and finite) total
    rast_lm.max_length, keep = 4, rast_lm.max_length
    try:
        (windowed,) = rast_lm.loglikelihood_rolling([Req(text)])
    finally:
        rast_lm.max_length = keep
    assert windowed != pytest.approx(rolling) and windowed < 0


def test_local_tasks_delta_beats_base(rast_lm):
    from lm_eval.tasks import TaskManager

    from rast_kernels.eval.lm_eval_adapter import RastLM

    tm = TaskManager(include_path=TASKS, include_defaults=False)  # not lm-eval's own tasks: a ~20 s index
    tasks = ["rast_toy_gen", "rast_toy_mc"]
    rast = lm_eval.simple_evaluate(model=rast_lm, tasks=tasks, task_manager=tm)["results"]
    base = lm_eval.simple_evaluate(model=RastLM(base=TRIO["base"]), tasks=tasks, task_manager=tm)["results"]
    # generation: the delta switches the base's direct guess (~chance) to the worked answer
    assert rast["rast_toy_gen"]["exact_match,none"] >= 0.75 > base["rast_toy_gen"]["exact_match,none"]
    # multiple choice between worked answers that differ in the parity letter
    assert rast["rast_toy_mc"]["acc,none"] >= 0.75


def test_command_line_model_rast(tmp_path):
    from rast_kernels.eval.lm_eval_adapter import main

    args = ",".join(f"{k}={v}" for k, v in TRIO.items()) + ",alpha=1.0"
    assert main(["--model", "rast", "--model_args", args, "--tasks", "rast_toy_gen", "--include_path", TASKS,
                 "--limit", "2", "--output_path", str(tmp_path)]) == 0
    assert any(p.name.endswith(".json") for p in tmp_path.rglob("*"))


def test_bad_model_args():
    from rast_kernels.eval.lm_eval_adapter import RastLM

    with pytest.raises(ValueError, match="base"):
        RastLM()
    with pytest.raises(ValueError, match="expert, expert_base"):
        RastLM(base=TRIO["base"], expert=TRIO["expert"])
    with pytest.raises(ValueError, match="alpha"):
        RastLM(base=TRIO["base"], alpha="strong")
    with pytest.raises(ValueError, match="alhpa: unknown model_args"):
        RastLM(base=TRIO["base"], alhpa=0.5)
    with pytest.raises(ValueError, match="dtype"):
        RastLM(base=TRIO["base"], dtype="fp8")


def test_entry_point_resolves_through_lm_evals_registry():
    """The installed package's ``lm_eval.models`` entry point names RastLM, and lm-eval's own Registry (the
    mechanism its plugin discovery feeds, after 0.4.13) materialises it from the entry point."""
    import importlib.metadata as md

    from lm_eval.api.model import LM
    from lm_eval.api.registry import Registry

    from rast_kernels.eval.lm_eval_adapter import RastLM

    (ep,) = [e for e in md.entry_points(group="lm_eval.models") if e.name == "rast"]
    assert ep.value == "rast_kernels.eval.lm_eval_adapter:RastLM" and ep.load() is RastLM
    registry = Registry("models", base_cls=LM)
    registry.register("rast", target=ep)
    assert registry.get("rast") is RastLM
