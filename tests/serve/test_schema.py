"""The published OpenAPI document (/openapi.json, /docs), a schemathesis run over it that fails on any 5xx, and
the request-handling cases real clients found: lone surrogates, an empty prompt, a huge top_k, streamed
text_offset with a stop string."""
import json
import os
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_helpers import HOST, free_port, sse_events, toy_prompts  # noqa: E402


def test_openapi_describes_both_posts_with_typed_bodies(server):
    status, doc = server.get_json("/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    schemas = doc["components"]["schemas"]
    for path, model in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest")):
        body = doc["paths"][path]["post"]["requestBody"]
        assert body["required"] and body["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{model}"}
        props = schemas[model]["properties"]
        assert schemas[model]["additionalProperties"] is False  # unknown fields are refused
        for field in ("alpha", "top_k", "min_p", "base_plausibility", "ignore_eos", "return_token_ids", "stop",
                      "seed", "stream_options"):
            assert field in props, (model, field)
        assert set(doc["paths"][path]["post"]["responses"]) >= {"200", "400", "404", "429", "503"}
    assert "echo" in schemas["CompletionRequest"]["properties"] and "prompt" in schemas["CompletionRequest"]["required"]
    assert schemas["ChatCompletionRequest"]["required"] == ["messages"]
    refs = {m for m in json.dumps(doc).split('"#/components/schemas/')[1:]}
    assert {r.split('"')[0] for r in refs} <= set(schemas)  # every reference resolves
    status, _, page = server.request("GET", "/docs")
    assert status == 200 and b"/openapi.json" in page and b"swagger" in page.lower()


@pytest.mark.parametrize("raw, param", [
    (b'{"prompt": "Q01=", "\\ud800": 1}', "\\ud800"),
    (b'{"prompt": "Q01=", "stream": true, "stream_options": {"\\ud800": true}}', "stream_options.\\ud800"),
    (b'{"prompt": "Q01=\\udfff"}', "prompt"),
])
def test_lone_surrogates_are_400_never_500(server, raw, param):
    status, headers, data = server.request("POST", "/v1/completions", raw=raw)
    assert status == 400 and headers["content-type"].startswith("application/json"), data
    data.decode("ascii")  # the error is ASCII JSON whatever it quotes
    err = json.loads(data)["error"]
    assert err["param"] == param and err["message"].startswith(param + ":")
    chat = b'{"messages": [{"role": "user", "content": "Q01=", "\\udc00": 1}]}'
    status, _, data = server.request("POST", "/v1/chat/completions", raw=chat)
    assert status == 400 and json.loads(data)["error"]["param"] == "messages.0.\\udc00"


@pytest.mark.parametrize("prompt", ["", [[]], []])
def test_an_empty_prompt_is_400_about_the_field(server, prompt):
    status, body = server.post("/v1/completions", dict(prompt=prompt, max_tokens=4))
    assert status == 400 and body["error"]["param"] == "prompt"
    msg = body["error"]["message"]
    assert msg.startswith("prompt: ") and "empty" in msg and "add_request" not in msg and "prompts[" not in msg


def test_a_huge_top_k_is_served_as_off(server, ref_engine):
    from rast_kernels import SamplingParams

    prompt = toy_prompts(1, seed=30)[0]
    (ref,) = ref_engine.generate(prompt, SamplingParams(max_new_tokens=16, temperature=1.0, seed=5, top_k=0))
    for k in (2**31, 2**63 - 1):  # beyond the old 2**31 - 1 cap: an int64 slot row holds it; >= vocab keeps all
        status, body = server.post("/v1/completions", dict(prompt=prompt, max_tokens=16, temperature=1.0, seed=5,
                                                          top_k=k, return_token_ids=True))
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == ref.token_ids


@pytest.mark.parametrize("stop", [None, ["zzzzz"]])
def test_streamed_text_offset_equals_the_full_response(server, stop):
    body = dict(prompt=toy_prompts(1, seed=31)[0], max_tokens=18, seed=3, temperature=1.0, logprobs=0, stop=stop,
                ignore_eos=True)
    status, full = server.post("/v1/completions", body)
    assert status == 200, full
    status, _, data = server.request("POST", "/v1/completions", dict(body, stream=True))
    events = sse_events(data.decode().split("\n"))
    offsets, tokens = [], []
    for e in events[:-1]:
        lp = json.loads(e)["choices"][0]["logprobs"]
        if lp is not None:
            offsets += lp["text_offset"]
            tokens += lp["tokens"]
    want = full["choices"][0]["logprobs"]
    assert tokens == want["tokens"] and len(tokens) == 18
    assert offsets == want["text_offset"] == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


# ---------------------------------------------------------------- schemathesis over the published schema
@pytest.fixture(scope="module")
def small_app_url():
    """An in-process server on loopback over a small engine (max_seq_len 40: every valid request is short)."""
    import uvicorn

    from rast_kernels import RastEngine
    from rast_kernels.serve import create_app
    from rast_kernels.toy.common import DEFAULT_OUT, ROLES

    engine = RastEngine(*[os.path.join(DEFAULT_OUT, r) for r in ROLES], max_batch_size=8, max_seq_len=40)
    app = create_app(engine, max_n=2, chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the in-process server did not start"
        time.sleep(0.05)
    try:
        yield f"http://{HOST}:{port}", app
    finally:
        server.should_exit = True
        thread.join(30)


def test_schemathesis_finds_no_server_error(small_app_url):
    """Bodies generated from /openapi.json, valid (positive) and invalid (negative), for every operation: no 5xx,
    and the engine loop never fails a step. Bounded: a fixed number of examples per operation and mode."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode

    url, app = small_app_url
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    seen = {}
    for result in schema.get_all_operations():
        op = result.ok()
        post = op.method.upper() == "POST"  # the GETs take nothing: no invalid input to generate
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if post else (GenerationMode.POSITIVE,):
            examples = 30 if post else 2

            @settings(max_examples=examples, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case):
                response = case.call(base_url=url, timeout=60)
                key = (op.label, mode.value)
                seen.setdefault(key, set()).add(response.status_code)
                assert response.status_code < 500, (case.body, response.text[:500])

            check()
    assert app.state.loop.steps_failed == 0 and app.state.loop.dead is None
    posts = {k: v for k, v in seen.items() if k[0].startswith("POST")}
    assert len(posts) == 4  # both endpoints, both modes
    assert any(200 in codes for codes in posts.values()) and all(codes & {400, 404} or 200 in codes
                                                                 for codes in posts.values()), seen
