"""Request validation, metrics text and the benchmark's options, without a server (fast)."""
import importlib.util
import math
from pathlib import Path

import pytest

from rast_kernels.serve.metrics import Histogram, Metrics, parse_text
from rast_kernels.serve.protocol import APIError, Limits, parse_json, parse_request

LIM = Limits(max_seq_len=64, default_alpha=0.25)


def test_fields_map_to_sampling_params():
    job = parse_request(dict(prompt="Q01=", max_tokens=7, temperature=0.5, top_p=0.9, n=3, stop="E", seed=-4,
                             top_k=2, min_p=0.1, ignore_eos=True, logprobs=0), "completion", LIM)
    p = job.params
    assert (p.max_new_tokens, p.temperature, p.top_p, p.n, p.stop, p.seed, p.top_k, p.min_p, p.eos_token_id,
            p.return_logprobs) == (7, 0.5, 0.9, 3, ("E",), -4, 2, 0.1, (), True)
    assert p.alpha == 0.25  # the server's default alpha
    assert parse_request(dict(prompt="x", alpha=-2), "completion", LIM).params.alpha == -2
    assert parse_request(dict(prompt="x", alpha=[0.4, 0.1]), "completion", LIM).params.alpha == (0.4, 0.1)
    assert parse_request(dict(prompt="x", base_plausibility=0.1), "completion", LIM).params.base_plausibility == 0.1
    d = parse_request(dict(prompt="x"), "completion", LIM)
    assert (d.params.max_new_tokens, d.params.eos_token_id, d.stream) == (16, None, False)  # OpenAI's default 16
    assert parse_request(dict(prompt=[[1, 2], "ab"]), "completion", LIM).prompts == [[1, 2], "ab"]
    assert parse_request(dict(prompt=[1, 2]), "completion", LIM).prompts == [[1, 2]]


def test_chat_fields():
    job = parse_request(dict(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                    {"type": "text", "text": "b"}]}],
                             max_completion_tokens=5, logprobs=True), "chat", LIM)
    assert job.prompts == [[{"role": "user", "content": "ab"}]]
    assert job.params.max_new_tokens == 5 and job.logprobs and not job.max_tokens_auto
    assert parse_request(dict(messages=[{"role": "user", "content": "x"}]), "chat", LIM).max_tokens_auto
    with pytest.raises(APIError) as e:
        parse_request(dict(messages=[{"role": "user", "content": "x"}], max_tokens=3, max_completion_tokens=4),
                      "chat", LIM)
    assert e.value.param == "max_completion_tokens"


@pytest.mark.parametrize("raw", [b"", b"{", b"nul", b"\"str\"", b'{"a": Infinity}', b"[" * 50000])
def test_parse_json_errors_name_the_body(raw):
    with pytest.raises(APIError) as e:
        parse_json(raw)
    assert e.value.status == 400 and e.value.param == "body" and e.value.message.startswith("body: ")


def test_limits():
    small = Limits(max_seq_len=64, max_n=4, max_prompts=2, max_choices=6)
    for body, param in ((dict(prompt="x", n=5), "n"), (dict(prompt=["a", "b", "c"]), "prompt"),
                        (dict(prompt=["a", "b"], n=4), "n"), (dict(prompt="x", max_tokens=64), "max_tokens"),
                        (dict(prompt="x", stop=["s"] * 17), "stop")):
        with pytest.raises(APIError) as e:
            parse_request(body, "completion", small)
        assert e.value.param == param and e.value.status == 400, body
    with pytest.raises(APIError) as e:
        parse_request(dict(prompt="x", model="other"), "completion", LIM)
    assert e.value.status == 404 and e.value.param == "model"


def test_histogram_and_metrics_text():
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 3.0):
        h.observe(v)
    lines = dict(line.rsplit(" ", 1) for line in h.lines("x"))
    assert (lines['x_bucket{le="0.1"}'], lines['x_bucket{le="1"}'], lines['x_bucket{le="+Inf"}']) == ("2", "3", "4")
    assert math.isclose(float(lines["x_sum"]), 3.65) and lines["x_count"] == "4"
    m = Metrics()
    m.set_engine_stats(dict(running=3, waiting=1, kv_blocks_used=7, kv_blocks_total=32, block_size=16,
                            tokens_generated=99), queued=2)
    m.count_http("/v1/completions", 200)
    m.observe_ttft(0.02)
    m.observe_finish("stop", 0.004)
    text = m.render()
    parsed = parse_text(text)
    assert parsed["rast_requests_running"] == 3 and parsed["rast_kv_blocks_used"] == 7
    assert parsed["rast_requests_queued"] == 2 and parsed["rast_generation_tokens_total"] == 99
    assert parsed['rast_http_requests_total{endpoint="/v1/completions",status="200"}'] == 1
    assert parsed['rast_samples_finished_total{reason="stop"}'] == 1
    assert parsed['rast_time_to_first_token_seconds_bucket{le="0.025"}'] == 1
    assert parsed['rast_time_to_first_token_seconds_bucket{le="0.01"}'] == 0
    for line in text.splitlines():  # every sample line is `name{labels} value`, every family typed
        assert line.startswith("# ") or len(line.rsplit(" ", 1)) == 2


def test_chat_without_a_template_is_400_naming_messages(ref_engine):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from rast_kernels.serve import create_app

    assert getattr(ref_engine.tokenizer, "chat_template", None) is None
    client = TestClient(create_app(ref_engine))  # no lifespan: the engine loop is not even started
    r = client.post("/v1/chat/completions", json=dict(messages=[{"role": "user", "content": "Q01="}]))
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert r.json()["error"]["code"] == "no_chat_template"
    r = client.post("/v1/chat/completions", content=b"{bad")
    assert r.status_code == 400 and r.json()["error"]["param"] == "body"
    r = client.get("/no/such/path")
    assert r.status_code == 404 and "error" in r.json()


def _bench_module():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_server.py"
    spec = importlib.util.spec_from_file_location("bench_server", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("args, option", [(["--clients", "0"], "--clients"), (["--clients", "a,b"], "--clients"),
                                          (["--max-tokens", "99"], "--max-tokens"),
                                          (["--requests", "-1"], "--requests"),
                                          (["--out", "/proc/nope"], "--out")])
def test_bench_server_options_are_checked(args, option, capsys):
    with pytest.raises(SystemExit) as e:
        _bench_module().parse_args(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and option in err, err


# ---------------------------------------------------------------- typed request models
def _err(body, kind="completion", limits=LIM) -> APIError:
    with pytest.raises(APIError) as e:
        parse_request(body, kind, limits)
    assert e.value.status == 400 and e.value.message.startswith(e.value.param + ": "), e.value.message
    return e.value


def test_schema_ranges_are_the_declared_ones():
    """The published bounds are RANGES' own (a range changed there changes the schema and the validation)."""
    from rast_kernels.params import RANGES
    from rast_kernels.serve.protocol import CompletionRequest, request_schemas

    props = request_schemas()["CompletionRequest"]["properties"]
    keys = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}
    for name in ("temperature", "top_p", "top_k", "min_p", "base_plausibility", "n", "seed"):
        (schema,) = [s for s in props[name]["anyOf"] if s.get("type") != "null"]
        want = {keys[k]: v for k, v in RANGES[name].pydantic_bounds().items()}
        assert {k: schema[k] for k in want} == want and len(want) > 0, name
    assert props["top_k"]["anyOf"][0]["exclusiveMaximum"] == 2**63  # int64 slot rows: no 2**31 cap
    assert CompletionRequest.model_validate(dict(prompt="x", top_k=2**63 - 1)).top_k == 2**63 - 1
    for name, bad_value in (("top_p", 0), ("min_p", 1.5), ("temperature", -0.5), ("top_k", 2**63), ("n", 0)):
        assert not RANGES[name].contains(bad_value)
        assert _err(dict(prompt="x", **{name: bad_value})).param == name


def test_field_paths_from_the_validation_error_loc():
    # union members' tags in loc (e.g. "array") are not fields; nested fields and indices are dotted
    assert _err(dict(prompt=["a", [1, "b"]])).param == "prompt.1.1"
    assert _err(dict(prompt="x", stop=["ok", ""])).param == "stop.1"
    assert _err(dict(prompt="x", alpha=[1.0, True])).param == "alpha.1"
    assert _err(dict(prompt="x", stream=True, stream_options={"include_usage": 1})).param \
        == "stream_options.include_usage"
    assert _err(dict(prompt="x", stream=True, stream_options={"nope": True})).param == "stream_options.nope"
    e = _err(dict(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": [{"text": "b"}]}]), "chat")
    assert e.param == "messages.1.content.0.type" and "required" in e.message
    assert _err(dict(messages=[{"role": "", "content": "a"}]), "chat").param == "messages.0.role"
    # a key that looks like a tag, in a dict the model does not expect: still the path the body has
    assert _err(dict(messages=[{"role": "user", "content": {"array": 1}}]), "chat").param == "messages.0.content"
    e = _err(dict(prompt="x", messages=[]))  # the unknown field is named first, with where it belongs
    assert e.param == "messages" and "/v1/chat/completions" in e.message
    assert _err(dict(max_tokens=3)).param == "prompt"  # missing
    assert _err(dict(prompt="x", temperature="hot")).message == \
        "temperature: Input should be a valid number, got a string"


def test_param_errors_map_through_param_not_text():
    from rast_kernels.params import ParamError
    from rast_kernels.serve.protocol import from_param_error, public_param

    assert public_param("max_new_tokens") == "max_tokens" and public_param("eos_token_id") == "ignore_eos"
    assert public_param("alpha[1]") == "alpha.1" and public_param("prompts[3]", "prompt.3") == "prompt.3"
    err = from_param_error(ParamError("max_new_tokens", "a message: with a colon"))
    assert (err.param, err.message) == ("max_tokens", "max_tokens: a message: with a colon")
    # no module of the server reads a field name out of an exception's text
    src = Path(__file__).resolve().parents[2] / "rast_kernels" / "serve"
    for f in src.glob("*.py"):
        assert 'split(":"' not in f.read_text(), f


@pytest.mark.parametrize("prompt", ["", [[]], [], ["ok", ""]])
def test_an_empty_prompt_is_400_naming_prompt(prompt):
    e = _err(dict(prompt=prompt))
    assert e.param == "prompt" and "empty" in e.message
    assert "add_request" not in e.message and "prompts[" not in e.message


def test_echo_fields():
    job = parse_request(dict(prompt="Q01=", echo=True, max_tokens=0, logprobs=3), "completion", LIM)
    assert job.echo and job.scored and not job.generate and job.top_logprobs == 3
    assert not job.params.return_logprobs  # echo scores every token itself
    job = parse_request(dict(prompt="Q01=", echo=True, max_tokens=2), "completion", LIM)
    assert job.echo and not job.scored and job.generate and job.params.max_new_tokens == 2
    for body, param in ((dict(prompt="x", max_tokens=0), "max_tokens"), (dict(prompt="x", logprobs=2), "logprobs"),
                        (dict(prompt="x", echo=True, stream=True), "echo"),
                        (dict(prompt="x", echo=True, logprobs=21), "logprobs")):
        assert _err(body).param == param, body


def test_lone_surrogates_are_400_naming_where():
    import json

    for raw, param in ((b'{"prompt": "x", "\\ud800": 1}', "\\ud800"),
                       (b'{"prompt": "x", "stream_options": {"\\udfff": true}}', "stream_options.\\udfff"),
                       (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages.0.content"),
                       (b'{"prompt": ["ok", "a\\udc00b"]}', "prompt.1")):
        with pytest.raises(APIError) as e:
            parse_json(raw)
        assert e.value.param == param and e.value.status == 400 and e.value.code == "invalid_unicode"
        from rast_kernels.serve.responses import error_json

        assert json.loads(error_json(e.value).encode("ascii"))["error"]["param"] == param  # encodes, as ASCII
    assert parse_json(b'{"prompt": "\\ud83d\\ude00 \\u00e9"}')["prompt"] == "\U0001F600 \u00e9"  # a pair is fine


# ---------------------------------------------------------------- response builders (pure)
class _Out:
    def __init__(self, text, ids, lps, finished, reason=None):
        self.text, self.token_ids, self.logprobs, self.finished = text, ids, lps, finished
        self.finish_reason, self.error = reason, None


def _reply(**job_fields):
    from rast_kernels.serve.responses import Reply

    job = parse_request(dict(prompt="p", **job_fields), "completion", LIM)
    return Reply(job=job, rid="cmpl-x", created=0, model="rast", token_text=lambda t: "ab"[t % 2] * (1 + t % 3),
                 prompt_ids=[[1, 2]], prompt_texts=["p"])


@pytest.mark.parametrize("held_back", [0, 2, 5])
def test_streamed_text_offset_equals_the_full_response(held_back):
    """Text is streamed behind the tokens (a stop string's tail is held back): the logprobs' text_offset must
    still continue from the tokens already sent, not from the text."""
    import json

    from rast_kernels.serve.responses import StreamBuilder, full_response

    reply = _reply(logprobs=0, max_tokens=8)
    ids = [3, 4, 5, 6, 7, 8, 9, 10]
    full_text = "".join(reply.token_text(t) for t in ids)
    lps = [-0.1 * i for i in range(len(ids))]
    builder = StreamBuilder(reply, 1, 0)
    chunks = []
    for k in range(1, len(ids) + 1):
        done = k == len(ids)
        text = full_text if done else full_text[:max(0, len("".join(reply.token_text(t) for t in ids[:k])) - held_back)]
        chunks += builder.on_event(("output", _Out(text, ids[:k], lps[:k], done, "length" if done else None), 0,
                                    None))
    assert builder.done and builder.finish()[-1] == "data: [DONE]\n\n"
    offsets, text = [], ""
    for c in chunks:
        choice = json.loads(c[len("data: "):])["choices"][0]
        text += choice["text"]
        if choice["logprobs"]:
            offsets += choice["logprobs"]["text_offset"]
    full = full_response(reply, {0: {"out": _Out(full_text, ids, lps, True, "length"), "scored": None}}, 0)
    assert text == full["choices"][0]["text"]
    assert offsets == full["choices"][0]["logprobs"]["text_offset"] == \
        [sum(len(reply.token_text(t)) for t in ids[:i]) for i in range(len(ids))]


def test_echo_choice_layout():
    from rast_kernels.serve.responses import Scored, full_response

    reply = _reply(echo=True, logprobs=1, max_tokens=1)
    scored = Scored([None, -1.5, -0.25], [None, [(4, -0.5)], [(5, -0.25)]])
    body = full_response(reply, {0: {"out": _Out("q", [5], None, True, "length"), "scored": scored}}, 0)
    (c,) = body["choices"]
    assert c["text"] == "pq"  # the prompt's text, then the completion
    lp = c["logprobs"]
    assert lp["tokens"] == ["bb", "aaa", "bbb"] and lp["token_logprobs"] == [None, -1.5, -0.25]
    # the token itself, then the most likely ones (the argmax is the token itself at the last position)
    assert lp["top_logprobs"] == [None, {"aaa": -1.5, "aa": -0.5}, {"bbb": -0.25}]
    assert lp["text_offset"] == [0, 2, 5]
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}
    failed = full_response(reply, {0: {"out": _Out("q", [5], None, True, "length"),
                                       "scored": Scored([], [], "scoring failed: boom")}}, 0)
    assert failed["choices"][0]["error"] == {"message": "scoring failed: boom", "type": "scoring_error"}


def test_integer_fields_take_integral_json_numbers_only():
    job = parse_request(dict(prompt=[3.0, 4], n=2.0, seed=-1.0, max_tokens=5.0, top_k=7.0), "completion", LIM)
    assert job.prompts == [[3, 4]] and (job.params.n, job.params.seed, job.params.max_new_tokens,
                                        job.params.top_k) == (2, -1, 5, 7)
    assert all(type(v) is int for v in (job.params.n, job.params.seed, job.params.top_k, *job.prompts[0]))
    for body, param in ((dict(prompt="x", n=1.5), "n"), (dict(prompt=[3.5]), "prompt.0"),
                        (dict(prompt="x", n=True), "n"), (dict(prompt="x", max_tokens="5"), "max_tokens")):
        assert _err(body).param == param, body
