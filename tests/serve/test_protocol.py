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
