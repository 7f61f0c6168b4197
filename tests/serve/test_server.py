"""The server's answers equal the engine's: completions token for token against a fresh engine's generate with
the same prompt, settings and seed; streamed chunks concatenate to the non-streamed text; n choices; chat through
the template; the openai client; /v1/models, /health, /metrics."""
import json
import math

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from rast_kernels import SamplingParams  # noqa: E402
from rast_kernels.engine import sample_seed  # noqa: E402

from serve_helpers import sse_events, toy_prompts  # noqa: E402


def _ref(engine, prompt, **kw):
    return engine.generate(prompt, SamplingParams(**kw))


@pytest.mark.parametrize("settings", [
    dict(temperature=1.0, seed=11),
    dict(temperature=0.0, seed=3),
    dict(temperature=0.8, top_p=0.9, top_k=5, min_p=0.05, alpha=0.5, seed=-7),
    dict(temperature=1.0, seed=5, stop=["5"]),
])
def test_completion_equals_engine_generate(server, ref_engine, settings):
    prompt = toy_prompts(1, seed=len(json.dumps(settings)))[0]
    status, body = server.post("/v1/completions", dict(prompt=prompt, max_tokens=24, return_token_ids=True,
                                                      **settings))
    assert status == 200, body
    (choice,) = body["choices"]
    (ref,) = _ref(ref_engine, prompt, max_new_tokens=24, **settings)
    assert choice["text"] == ref.text
    assert choice["token_ids"] == ref.token_ids
    assert choice["finish_reason"] == ref.finish_reason
    assert body["usage"] == {"prompt_tokens": ref.num_prompt_tokens, "completion_tokens": len(ref.token_ids),
                             "total_tokens": ref.num_prompt_tokens + len(ref.token_ids)}
    if "stop" in settings and ref.finish_reason == "stop" and ref.stop_reason == "5":
        assert "5" not in choice["text"]


def test_token_id_prompts_and_several_prompts(server, ref_engine):
    prompts = toy_prompts(3, seed=42)
    ids = [ref_engine.tokenizer(p)["input_ids"] for p in prompts]
    status, body = server.post("/v1/completions", dict(prompt=[ids[0], prompts[1], ids[2]], max_tokens=20, seed=9,
                                                      n=2, return_token_ids=True))
    assert status == 200, body
    assert [c["index"] for c in body["choices"]] == list(range(6))
    for i, p in enumerate(prompts):
        refs = _ref(ref_engine, p, max_new_tokens=20, seed=9, n=2)  # each prompt with the request's seed
        for j in range(2):
            c = body["choices"][i * 2 + j]
            assert (c["text"], c["token_ids"]) == (refs[j].text, refs[j].token_ids)
    assert body["usage"]["prompt_tokens"] == sum(len(x) for x in ids)


def test_n_choices_are_the_engines_samples(server, ref_engine):
    prompt = toy_prompts(1, seed=5)[0]
    status, body = server.post("/v1/completions", dict(prompt=prompt, max_tokens=24, seed=123, n=4,
                                                      temperature=1.5, return_token_ids=True))
    assert status == 200, body
    assert len(body["choices"]) == 4
    for j, c in enumerate(body["choices"]):
        (solo,) = _ref(ref_engine, prompt, max_new_tokens=24, temperature=1.5, seed=sample_seed(123, j))
        assert c["token_ids"] == solo.token_ids  # sample j alone, with its derived seed
    assert body["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in body["choices"])


def _stream(server, path, body):
    status, headers, data = server.request("POST", path, dict(body, stream=True))
    assert status == 200, data
    assert headers["content-type"].startswith("text/event-stream")
    events = sse_events(data.decode().split("\n"))
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


@pytest.mark.parametrize("n, stop", [(1, None), (3, None), (3, ["4", "66"])])
def test_stream_concatenates_to_the_full_text(server, n, stop):
    body = dict(prompt=toy_prompts(1, seed=77)[0], max_tokens=24, seed=4, n=n, temperature=1.2, stop=stop)
    status, full = server.post("/v1/completions", body)
    assert status == 200
    chunks = _stream(server, "/v1/completions", dict(body, stream_options={"include_usage": True}))
    texts, reasons = [""] * n, [None] * n
    for ch in chunks[:-1]:
        assert ch["object"] == "text_completion" and ch["id"] == chunks[0]["id"]
        (c,) = ch["choices"]
        assert reasons[c["index"]] is None  # nothing after a choice's finish
        texts[c["index"]] += c["text"]
        reasons[c["index"]] = c["finish_reason"]
    assert texts == [c["text"] for c in full["choices"]]
    assert reasons == [c["finish_reason"] for c in full["choices"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]
    assert len(chunks) > n + 2  # it really streamed (more than one chunk per choice)


def test_chat_completion_and_stream(server, ref_engine):
    prompt = toy_prompts(1, seed=8)[0]
    body = dict(messages=[{"role": "user", "content": prompt}], max_tokens=24, seed=21, return_token_ids=True)
    status, full = server.post("/v1/chat/completions", body)
    assert status == 200, full
    (c,) = full["choices"]
    assert full["object"] == "chat.completion" and c["message"]["role"] == "assistant"
    (ref,) = _ref(ref_engine, prompt, max_new_tokens=24, seed=21)  # the toy template renders the content alone
    assert (c["message"]["content"], c["token_ids"]) == (ref.text, ref.token_ids)
    chunks = _stream(server, "/v1/chat/completions", body)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks)
    assert text == ref.text and chunks[-1]["choices"][0]["finish_reason"] == ref.finish_reason
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)


def test_chat_without_max_tokens_fills_the_context(server, ref_engine):
    prompt = toy_prompts(1, seed=9, bits=470)[0]  # one token per character: 472 prompt tokens
    status, body = server.post("/v1/chat/completions", dict(messages=[{"role": "user", "content": prompt}],
                                                           seed=2, ignore_eos=True, temperature=0))
    assert status == 200, body
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == 472
    assert body["usage"]["total_tokens"] == 512  # max_seq_len of the fixture server


def test_logprobs(server, ref_engine):
    prompt = toy_prompts(1, seed=10)[0]
    status, body = server.post("/v1/completions", dict(prompt=prompt, max_tokens=12, seed=1, logprobs=0))
    assert status == 200, body
    lp = body["choices"][0]["logprobs"]
    (ref,) = _ref(ref_engine, prompt, max_new_tokens=12, seed=1, return_logprobs=True)
    assert "".join(lp["tokens"]) == ref.text
    assert all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6) for a, b in zip(lp["token_logprobs"], ref.logprobs))
    status, body = server.post("/v1/chat/completions", dict(messages=[{"role": "user", "content": prompt}],
                                                           max_tokens=12, seed=1, logprobs=True))
    assert status == 200
    content = body["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in content] == lp["tokens"]


def test_models_health_metrics(server):
    status, models = server.get_json("/v1/models")
    assert status == 200 and models["data"][0]["id"] == "rast" and models["data"][0]["max_model_len"] == 512
    assert server.get_json("/health") == (200, {"status": "ok"})
    status, headers, data = server.request("GET", "/metrics")
    text = data.decode()
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for name, kind in (("rast_requests_running", "gauge"), ("rast_requests_waiting", "gauge"),
                       ("rast_kv_blocks_used", "gauge"), ("rast_kv_blocks_total", "gauge"),
                       ("rast_generation_tokens_total", "counter"),
                       ("rast_time_to_first_token_seconds", "histogram"),
                       ("rast_time_per_output_token_seconds", "histogram")):
        assert f"# TYPE {name} {kind}" in text
    m = server.metrics()
    assert m["rast_kv_blocks_total"] == 16 * 512 // 16
    before = m["rast_generation_tokens_total"]
    status, body = server.post("/v1/completions", dict(prompt=toy_prompts(1)[0], max_tokens=8, seed=0,
                                                      ignore_eos=True))
    m = server.wait_idle()
    assert m["rast_generation_tokens_total"] - before >= body["usage"]["completion_tokens"] == 8
    assert m['rast_time_to_first_token_seconds_bucket{le="+Inf"}'] == m["rast_time_to_first_token_seconds_count"] > 0


def test_openai_client(server, ref_engine):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == ["rast"]
    prompt = toy_prompts(1, seed=31)[0]
    (ref,) = _ref(ref_engine, prompt, max_new_tokens=24, seed=17, alpha=0.7)
    r = client.completions.create(model="rast", prompt=prompt, max_tokens=24, seed=17, extra_body={"alpha": 0.7})
    assert r.choices[0].text == ref.text and r.usage.completion_tokens == len(ref.token_ids)
    text = "".join(ch.choices[0].text for ch in client.completions.create(
        model="rast", prompt=prompt, max_tokens=24, seed=17, stream=True, extra_body={"alpha": 0.7})
        if ch.choices)
    assert text == ref.text
    r = client.chat.completions.create(model="rast", messages=[{"role": "user", "content": prompt}], max_tokens=24,
                                       seed=17, n=2, extra_body={"alpha": 0.7})
    assert r.choices[0].message.content == ref.text and len(r.choices) == 2
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="rast", prompt=prompt, max_tokens=24, temperature=-1)
    assert "temperature" in str(info.value)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt=prompt, max_tokens=4)


def test_a_row_the_sampler_rejects_is_an_error_choice(server, ref_engine):
    # alpha = 1e308 is a valid (finite) setting whose combined logits overflow: the sampler rejects the row
    body = dict(prompt=toy_prompts(1, seed=12)[0], max_tokens=8, seed=1, alpha=1e308)
    (ref,) = _ref(ref_engine, body["prompt"], max_new_tokens=8, seed=1, alpha=1e308)
    assert ref.finish_reason == "error"
    status, full = server.post("/v1/completions", body)
    assert status == 200, full
    (c,) = full["choices"]
    assert c["finish_reason"] == "error" and c["error"] == {"message": ref.error, "type": "sampler_error"}
    chunks = _stream(server, "/v1/completions", body)
    assert chunks[-1]["choices"][0]["finish_reason"] == "error"
    assert chunks[-1]["choices"][0]["error"]["type"] == "sampler_error"
    assert server.post("/v1/completions", dict(body, alpha=1.0))[1]["choices"][0]["finish_reason"] != "error"


def test_streamed_logprobs_match_the_full_response(server):
    body = dict(prompt=toy_prompts(1, seed=13)[0], max_tokens=16, seed=8, logprobs=0, temperature=1.0)
    status, full = server.post("/v1/completions", body)
    assert status == 200
    chunks = _stream(server, "/v1/completions", body)
    toks, lps = [], []
    for ch in chunks:
        lp = ch["choices"][0]["logprobs"]
        if lp is not None:
            toks += lp["tokens"]
            lps += lp["token_logprobs"]
    assert toks == full["choices"][0]["logprobs"]["tokens"]
    assert lps == full["choices"][0]["logprobs"]["token_logprobs"]
