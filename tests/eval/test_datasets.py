import os

import pytest

from rast_kernels.eval.datasets import DATASETS, load_dataset, read_records
from rast_kernels.eval.templates import RAST, default_template, resolve_template

DATA = os.path.join(os.path.dirname(__file__), "data")


def path(name):
    return os.path.join(DATA, name)


def test_math500_jsonl():
    ds = load_dataset("math500", path("math500.jsonl"))
    assert ds.grader == "math" and len(ds.items) == 3  # the blank line is skipped
    assert ds.items[0].id == "test/algebra/1.json"
    assert ds.items[1].input == "Solve $2x = 6$." and ds.items[1].answer == "3"


def test_gsm8k_keeps_the_full_answer_for_the_grader():
    ds = load_dataset("gsm8k", path("gsm8k.jsonl"))
    assert ds.grader == "gsm8k" and [it.id for it in ds.items] == ["0", "1"]
    assert ds.items[0].answer.endswith("#### 72")


def test_aime_json_question_field_and_numeric_answers():
    ds = load_dataset("aime", path("aime.json"), max_problems=1)
    assert [(it.id, it.answer) for it in ds.items] == [("1", "24")]
    assert ds.items[0].input.startswith("Find the remainder")


def test_field_overrides():
    ds = load_dataset("math500", path("custom_fields.jsonl"), field_problem="q", field_answer="gold")
    assert [(it.input, it.answer) for it in ds.items] == [("What is 2 + 2?", "4"), ("What is 3 * 3?", "9")]
    with pytest.raises(ValueError, match="field_answer.*record 0 has no answer field 'nope'"):
        load_dataset("math500", path("custom_fields.jsonl"), field_problem="q", field_answer="nope")


def test_toy_is_generated():
    from rast_kernels.toy import task

    ds = load_dataset("toy", max_problems=5)
    assert ds.grader == "toy" and len(ds.items) == 5
    for it, p in zip(ds.items, task.heldout_problems(5)):
        assert it.input == p.prompt and it.answer == task.ANSWER_CHARS[p.answer]
    with pytest.raises(ValueError, match="data"):
        load_dataset("toy", path("math500.jsonl"))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    f = tmp_path / "d.parquet"
    pq.write_table(pa.table({"problem": ["p0", "p1"], "answer": ["1", "2"]}), str(f))
    ds = load_dataset("math500", str(f))
    assert [(it.input, it.answer) for it in ds.items] == [("p0", "1"), ("p1", "2")]


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        load_dataset("mmlu", path("math500.jsonl"))
    with pytest.raises(FileNotFoundError, match="data"):
        load_dataset("math500", path("nope.jsonl"))
    with pytest.raises(ValueError,
                       match=r"data: .*record 1 has no answer field 'answer' \(it has: problem, solution\)"):
        load_dataset("math500", path("missing_answer.jsonl"))
    with pytest.raises(ValueError, match="data.*needs a file"):
        load_dataset("gsm8k")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "a", "answer": "1"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not JSON"):
        read_records(str(bad))
    txt = tmp_path / "d.csv"
    txt.write_text("problem,answer\n")
    with pytest.raises(ValueError, match="unknown file type"):
        read_records(str(txt))
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"id": 1, "problem": "a", "answer": "1"}\n{"id": 1, "problem": "b", "answer": "2"}\n')
    with pytest.raises(ValueError, match="id '1' appears more than once"):
        load_dataset("math500", str(dup))
    with pytest.raises(ValueError, match="max_problems"):
        load_dataset("toy", max_problems=0)
    assert set(DATASETS) == {"math500", "gsm8k", "aime", "amc", "toy"}


def test_templates():
    t = resolve_template("rast")
    assert t.render("1+1?") == "Question:\n1+1?\nAnswer:\nLet's think step by step.\n"
    assert RAST == "Question:\n{input}\nAnswer:\nLet's think step by step.\n"
    assert resolve_template("boxed").render(r"x^{2}").endswith("within \\boxed{}.")
    assert resolve_template("raw").render("Q0101=") == "Q0101="
    custom = resolve_template(path("template.txt"))
    assert custom.render("2+2") == "Problem: 2+2\nShow your work; end with \\boxed{answer}.\n"
    with pytest.raises(ValueError, match=r"template: .* does not contain \{input\}"):
        resolve_template(path("template_no_input.txt"))
    with pytest.raises(ValueError, match="template: 'nope' is neither"):
        resolve_template("nope")
    assert default_template("toy") == "raw" and default_template("math500") == "rast"


def test_chat_template():
    # a real transformers tokenizer (the toy trio's, which has no chat template) with one set here
    from transformers import AutoTokenizer

    from rast_kernels.toy.common import DEFAULT_OUT

    tok = AutoTokenizer.from_pretrained(os.path.join(DEFAULT_OUT, "base"))
    t = resolve_template("chat")
    with pytest.raises(ValueError, match="template: 'chat' needs a tokenizer with a chat template"):
        t.render("1+1?", tok)
    tok.chat_template = ("{% for m in messages %}<u>{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}<a>{% endif %}")
    assert t.render("1+1?", tok) == "<u>1+1?\nPlease reason step by step, and put your final answer within " \
                                    "\\boxed{}.<a>"
