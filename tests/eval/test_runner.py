"""The runner's bookkeeping with a stand-in engine (no model): several datasets as columns, math and GSM8K
grading of what the engine returns, seeds shared by rows, maj@k from extracted answers, continuous feeding."""
import os

import pytest

from rast_kernels.engine import GenerationOutput
from rast_kernels.eval import run, store
from rast_kernels.eval.datasets import load_dataset
from rast_kernels.eval.templates import resolve_template

DATA = os.path.join(os.path.dirname(__file__), "data")

# what a "good" model answers per problem text (equivalent forms, not the gold strings), and a wrong answer
GOOD = {"What is $\\frac{1}{2} + \\frac{1}{4}$?": "so it is \\boxed{0.75}",
        "Solve $2x = 6$.": "we get \\boxed{x = 3}",
        "Write the interval where $x^2 < 1$.": "\\boxed{(-1, 1)}"}
BAD = "\\boxed{17}"


class CharTokenizer:
    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids):
        return "".join(map(chr, ids))


class StandInEngine:
    """add_request / step / stats / has_unfinished_requests like RastEngine; answers by prompt and alpha: the
    'trio' at alpha >= 0.5 answers well on sample 0 and 1, badly on sample 2+; the base always badly."""

    def __init__(self, models, log):
        self.models, self.log, self.queue, self.count = models, log, [], 0

    def add_request(self, ids, params):
        rid = f"r{self.count}"
        self.count += 1
        self.log.append((self.models, len(self.queue), params))
        self.queue.append((rid, "".join(map(chr, ids)), params))
        return rid

    def stats(self):
        return {"waiting": len(self.queue)}

    def has_unfinished_requests(self):
        return bool(self.queue)

    def step(self):
        outs = []
        if self.queue:  # one request per step: the runner has to keep feeding
            rid, prompt, p = self.queue.pop(0)
            problem = prompt.split("\n")[1] if prompt.startswith("Question:") else prompt
            for j in range(p.n):
                good = self.models == "trio" and p.alpha >= 0.5 and j < 2  # a fresh run: whole requests only
                text = GOOD.get(problem, "#### 72" if "Natalia" in problem else "The answer is 10.") if good else BAD
                outs.append(GenerationOutput(text=text, token_ids=list(range(len(text))), request_id=rid,
                                             sample_index=j, finish_reason="stop", finished=True))
        return outs


def test_runner_columns_grading_seeds_and_feeding(tmp_path, capsys):
    datasets = [load_dataset("math500", os.path.join(DATA, "math500.jsonl")),
                load_dataset("gsm8k", os.path.join(DATA, "gsm8k.jsonl"))]
    configs = run.make_configs([0.0, 1.0, 1.0], base_only=True, expert_only=False)
    assert [c.name for c in configs] == ["base", "rast@0", "rast@1"]  # duplicates dropped, paper order
    settings = run.Settings(models=dict(base="b", expert="e", expert_base="eb"),
                               template=resolve_template("rast"), n=4, ks=[1, 2, 4], max_batch_size=1)
    log = []
    pytest.importorskip("math_verify")
    s = run.run_eval(datasets, configs, settings, str(tmp_path), tokenizer=CharTokenizer(),
                        engine_factory=lambda m, L, d: StandInEngine(m, log), progress=False, log=print)
    res = s["results"]
    # trio at alpha 1: samples 0 and 1 right on every problem of both datasets, 2 and 3 wrong
    for d in ("math500", "gsm8k"):
        assert res["rast@1"][d]["pass@1"] == [0.5, 0.0]
        assert res["rast@1"][d]["pass@2"][0] == pytest.approx(1 - 1 / 6)  # 1 - C(2,2)/C(4,2)
        assert res["rast@1"][d]["maj@2"][0] == 1.0 and res["rast@1"][d]["maj@1"][0] == 1.0
        assert res["rast@1"][d]["maj@4"][0] == 0.5  # a 2-2 tie between the right answer and 17
        assert res["base"][d]["pass@1"][0] == 0.0 and res["rast@0"][d]["pass@4"][0] == 0.0
    assert res["rast@1"]["math500"]["problems"] == 3 and res["rast@1"]["gsm8k"]["problems"] == 2
    # the waiting queue is kept at <= 2 * max_batch_size, so requests are fed while the engine runs
    assert max(q for _, q, _ in log) <= 2 and len(log) == 2 * 5 + 5
    # every row of a problem uses one request seed; the records carry sample_seed(that, j)
    recs = store.read_samples(str(tmp_path))
    by_problem = {}
    for r in recs:
        by_problem.setdefault((r["dataset"], r["problem_id"], r["sample_index"]), set()).add(r["seed"])
    assert all(len(v) == 1 for v in by_problem.values())
    assert len({p.seed for _, _, p in log}) == 5  # five problems, one seed each, shared by the three rows
    table = capsys.readouterr().out
    assert "| model (pass@1 ± s.e., pass@2, pass@4; n = 4) | math500 (3) | gsm8k (2) |" in table
    assert "| base + delta (alpha=1) | 50.0 ± 0.0 · 83.3 · 100.0 | 50.0 ± 0.0 · 83.3 · 100.0 |" in table
