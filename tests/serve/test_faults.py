"""Faults and limits: hostile or malformed bodies get 400/404 JSON errors naming the field and nothing runs; a
client that disconnects frees its slot and KV blocks (read back from /metrics); back-pressure answers 429 with
Retry-After; an engine step that raises ends the requests in flight with an error (never a 500) and the server
goes on; SIGTERM under load ends every request cleanly and exits 0; CLI option errors are one line, exit 2."""
import concurrent.futures
import json
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from rast_kernels import SamplingParams  # noqa: E402
from serve_helpers import HOST, free_port, running_server, sse_events  # noqa: E402

P = "Q0110100101101011="
DEEP = 100_000

BAD_BODIES = [
    (b"{not json", "body"),
    (b"[1, 2]", "body"),
    (b"\xff\xfe", "body"),
    (b'{"prompt": "Q01=", "temperature": NaN}', "body"),
    (b'{"prompt": "Q01=", "max_tokens": 1' + b"0" * 5000 + b"}", "body"),  # beyond Python's int conversion limit
    (b'{"prompt": ' + b"[" * DEEP + b"]" * DEEP + b"}", "body"),
    (dict(prompt=5), "prompt"),
    (dict(), "prompt"),
    (dict(prompt=[]), "prompt"),
    (dict(prompt=""), "prompt"),
    (dict(prompt=[[1, "a"]]), "prompt.0.1"),  # a field path is dotted: prompt 0, its token 1
    (dict(prompt=[[]]), "prompt"),
    (dict(prompt=["Q01=", ""]), "prompt"),
    (dict(prompt=[1, "a"]), "prompt"),  # token ids mixed with a prompt
    (dict(prompt=[1, 2, 99999]), "prompt"),  # outside the vocabulary (the engine's check)
    (dict(prompt="0" * 600), "prompt"),  # beyond max_seq_len
    (dict(prompt="0" * 500, max_tokens=24), "prompt"),  # prompt + max_tokens beyond max_seq_len
    (dict(prompt=P, max_tokens="10"), "max_tokens"),
    (dict(prompt=P, max_tokens=10**12), "max_tokens"),
    (dict(prompt=P, max_tokens=0), "max_tokens"),
    (dict(prompt=P, n=-1), "n"),
    (dict(prompt=P, n=10**9), "n"),
    (dict(prompt=P, n=1.5), "n"),
    (dict(prompt=P, stop=5), "stop"),
    (dict(prompt=P, stop=["a", 1]), "stop.1"),
    (dict(prompt=P, stop=[""]), "stop.0"),
    (dict(prompt=P, temperature=-1), "temperature"),
    (dict(prompt=P, temperature="hot"), "temperature"),
    (dict(prompt=P, top_p=0), "top_p"),
    (dict(prompt=P, top_p=1.5), "top_p"),
    (dict(prompt=P, min_p=2), "min_p"),
    (dict(prompt=P, top_k=-1), "top_k"),
    (dict(prompt=P, top_k=1.5), "top_k"),
    (dict(prompt=P, top_k=2**63), "top_k"),  # beyond int64 (RANGES["top_k"]; 2**63 - 1 is served)
    (dict(prompt=P, alpha="a"), "alpha"),
    (dict(prompt=P, alpha=10**400), "alpha"),  # an integer no float can hold
    (dict(prompt=P, alpha=[]), "alpha"),
    (dict(prompt=P, alpha=[1.0, "a"]), "alpha.1"),
    (dict(prompt=P, alpha={"a": 1}), "alpha"),
    (dict(prompt=P, alpha=[1.0, 2.0]), "alpha"),  # two weights for the toy trio's one pair (the engine's check)
    (dict(prompt=P, base_plausibility=1.5), "base_plausibility"),
    (dict(prompt=P, base_plausibility="x"), "base_plausibility"),
    (dict(prompt=P, seed=2**70), "seed"),
    (dict(prompt=P, seed=1.5), "seed"),
    (dict(prompt=P, logprobs=5), "logprobs"),
    (dict(prompt=P, stream="yes"), "stream"),
    (dict(prompt=P, stream_options={"include_usage": True}), "stream_options"),
    (dict(prompt=P, tempreture=1.0), "tempreture"),
    (dict(prompt=P, echo=True, stream=True), "echo"),
    (dict(prompt=P, max_tokens=0), "max_tokens"),  # 0 only with echo
    (dict(prompt=P, echo=True, logprobs=21), "logprobs"),
    (dict(prompt=P, frequency_penalty=0.5), "frequency_penalty"),
    (dict(prompt=P, ignore_eos=1), "ignore_eos"),
]
BAD_CHAT = [
    (dict(), "messages"),
    (dict(messages="hi"), "messages"),
    (dict(messages=[]), "messages"),
    (dict(messages=[{"role": "user", "content": 5}]), "messages.0.content"),
    (dict(messages=[{"content": "x"}]), "messages.0.role"),
    (dict(messages=[{"role": "user", "content": [{"type": "image", "text": "x"}]}]), "messages.0.content.0.type"),
    (dict(messages=[{"role": "user", "content": P, "tool_calls": []}]), "messages.0.tool_calls"),
    (dict(messages=[{"role": "user", "content": P}], top_logprobs=3), "top_logprobs"),
    (dict(messages=[{"role": "user", "content": P}], prompt=P), "prompt"),
]


def _check_error(status, headers, data, param, expect=400):
    assert status == expect, data[:300]
    assert headers["content-type"].startswith("application/json")
    err = json.loads(data)["error"]
    assert err["param"] == param
    assert err["message"].startswith(param + ":"), err["message"]
    return err


def test_bad_requests_are_400_naming_the_field(server):
    before = server.metrics()
    for body, param in BAD_BODIES:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        status, headers, data = server.request("POST", "/v1/completions", raw=raw)
        _check_error(status, headers, data, param)
    for body, param in BAD_CHAT:
        status, headers, data = server.request("POST", "/v1/chat/completions", body)
        _check_error(status, headers, data, param)
    status, headers, data = server.request("POST", "/v1/completions", dict(prompt=P, model="gpt-4"))
    _check_error(status, headers, data, "model", 404)
    after = server.wait_idle()
    assert after["rast_generation_tokens_total"] == before["rast_generation_tokens_total"]  # nothing ran
    assert after['rast_http_requests_total{endpoint="/v1/completions",status="400"}'] - before.get(
        'rast_http_requests_total{endpoint="/v1/completions",status="400"}', 0) == len(BAD_BODIES)
    assert server.post("/v1/completions", dict(prompt=P, max_tokens=4))[0] == 200  # and it still serves


def _refused_upload(port, head: bytes, chunks) -> tuple:
    """Send ``head`` then ``chunks`` until the server answers (it may answer and close before the upload ends, as
    it should for a body over the limit); returns (status, headers, body) of its answer."""
    import select

    sock = socket.create_connection((HOST, port), timeout=30)
    try:
        sock.sendall(head)
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:
                break
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        select.select([sock], [], [], 30)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + int(
                dict(line.split(": ", 1) for line in data.split(b"\r\n\r\n")[0].decode().split("\r\n")[1:]
                     ).get("content-length", "0")):
            more = sock.recv(65536)
            if not more:
                break
            data += more
    finally:
        sock.close()
    head_part, _, body = data.partition(b"\r\n\r\n")
    lines = head_part.decode().split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def test_body_size_limit(server):
    raw = json.dumps(dict(prompt="0" * (10 << 20))).encode()  # a 10 MB prompt
    pieces = [raw[i:i + (1 << 16)] for i in range(0, len(raw), 1 << 16)]
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(raw)).encode() + b"\r\n\r\n")
    err = _check_error(*_refused_upload(server.port, head, pieces), "body")  # refused from Content-Length
    assert err["code"] == "body_too_large"
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunked = [b"%x\r\n" % len(p) + p + b"\r\n" for p in pieces]
    err = _check_error(*_refused_upload(server.port, head, chunked), "body")  # refused as it arrives
    assert err["code"] == "body_too_large"
    assert server.get_json("/health")[0] == 200


def _raw_post(port, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection((HOST, port), timeout=30)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return sock


def _wait(cond, what, timeout=20):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_disconnect_mid_stream_frees_slots_and_blocks(server):
    start = server.wait_idle()
    aborted0 = start.get('rast_samples_finished_total{reason="abort"}', 0)
    sock = _raw_post(server.port, dict(prompt=P, max_tokens=480, ignore_eos=True, n=2, stream=True, seed=1))
    got = b""
    while got.count(b"data: ") < 6:  # a few chunks: the request is running
        chunk = sock.recv(65536)
        assert chunk, "server closed the stream early"
        got += chunk
    m = server.metrics()
    assert m["rast_requests_running"] == 2 and m["rast_kv_blocks_used"] > 0
    sock.close()
    m = server.wait_idle()
    assert m['rast_samples_finished_total{reason="abort"}'] - aborted0 == 2  # ended by the disconnect
    assert m["rast_generation_tokens_total"] - start["rast_generation_tokens_total"] < 2 * 480


def test_disconnect_while_waiting_for_a_full_response(server):
    start = server.wait_idle()
    aborted0 = start.get('rast_samples_finished_total{reason="abort"}', 0)
    sock = _raw_post(server.port, dict(prompt=P, max_tokens=480, ignore_eos=True, seed=2))
    _wait(lambda: server.metrics()["rast_generation_tokens_total"] > start["rast_generation_tokens_total"],
          "the request to start")
    sock.close()
    m = server.wait_idle()
    assert m['rast_samples_finished_total{reason="abort"}'] - aborted0 == 1
    assert m["rast_generation_tokens_total"] - start["rast_generation_tokens_total"] < 480


# ---------------------------------------------------------------- a small server: back-pressure, then SIGTERM
@pytest.fixture(scope="module")
def small_server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("small"), "--max-batch-size", "2", "--max-waiting", "2",
                        "--max-seq-len", "512", "--drain-timeout", "1") as srv:
        yield srv


def test_back_pressure_429_with_retry_after(small_server):
    body = dict(prompt=P, max_tokens=150, ignore_eos=True, seed=3)
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda _: small_server.request("POST", "/v1/completions", body), range(10)))
    codes = sorted(r[0] for r in results)
    assert set(codes) <= {200, 429} and 429 in codes and 200 in codes, codes
    for status, headers, data in results:
        if status == 429:
            assert int(headers["retry-after"]) >= 1
            assert json.loads(data)["error"]["type"] == "rate_limit_error"
        else:
            assert json.loads(data)["choices"][0]["finish_reason"] == "length"
    small_server.wait_idle()


def test_sigterm_under_load_ends_requests_cleanly_and_exits_0(small_server):
    body = dict(prompt=P, max_tokens=480, ignore_eos=True, seed=4)
    results = [None] * 4

    def client(i):
        stream = i % 2 == 0
        status, _, data = small_server.request("POST", "/v1/completions", dict(body, stream=stream), timeout=60)
        assert status == 200, data
        if stream:
            events = sse_events(data.decode().split("\n"))
            reasons = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]]
            results[i] = (status, events[-1], reasons[-1])
        else:
            results[i] = (status, "[DONE]", json.loads(data)["choices"][0]["finish_reason"])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for i, t in enumerate(threads):  # one by one, so that none meets the back-pressure limit: 2 run, 2 wait
        t.start()
        _wait(lambda: (lambda m: m["rast_requests_running"] + m["rast_requests_waiting"])(small_server.metrics())
              == i + 1, f"request {i} in the engine")
    rc = small_server.terminate(timeout=60)
    for t in threads:
        t.join(60)
    assert rc == 0, small_server.log()
    for r in results:  # every request got a whole response: a final finish_reason and, streamed, [DONE]
        assert r is not None and r[0] == 200 and r[1] == "[DONE]" and r[2] in ("length", "abort"), results
    assert "Traceback" not in small_server.log()


# ---------------------------------------------------------------- an engine whose step raises
def test_engine_exception_does_not_kill_the_server(ref_engine):
    uvicorn = pytest.importorskip("uvicorn")
    from serve_helpers import Server

    from rast_kernels.serve import create_app

    (ref,) = ref_engine.generate(P, SamplingParams(max_new_tokens=20, seed=6))
    real_step, fail = ref_engine.step, threading.Event()

    def flaky_step():
        outs = real_step()  # the engine did run: state moved on, and then something broke
        if fail.is_set():
            raise RuntimeError("injected fault")
        return outs

    ref_engine.step = flaky_step
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(ref_engine), host=HOST, port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        _wait(lambda: server.started, "the in-process server")
        client = Server.__new__(Server)  # only its HTTP helpers
        client.url = f"http://{HOST}:{port}"
        fail.set()
        status, body = client.post("/v1/completions", dict(prompt=P, max_tokens=20, seed=6, n=2))
        assert status == 200
        for c in body["choices"]:
            assert c["finish_reason"] == "error" and "injected fault" in c["error"]["message"]
        status, _, data = client.request("POST", "/v1/completions", dict(prompt=P, max_tokens=20, stream=True))
        events = sse_events(data.decode().split("\n"))
        assert status == 200 and events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "error"
        fail.clear()
        status, body = client.post("/v1/completions", dict(prompt=P, max_tokens=20, seed=6))
        assert status == 200 and body["choices"][0]["text"] == ref.text
        assert client.get_json("/health") == (200, {"status": "ok"})
        m = client.metrics()
        assert m["rast_kv_blocks_used"] == 0 and m["rast_requests_running"] == 0
    finally:
        server.should_exit = True
        thread.join(30)
        ref_engine.step = real_step
    assert not ref_engine.has_unfinished_requests()


# ---------------------------------------------------------------- the command line
@pytest.mark.parametrize("args, option", [
    (["--port", "70000", "--toy"], "--port"),
    (["--port", "abc", "--toy"], "--port"),
    (["--max-batch-size", "0", "--toy"], "--max-batch-size"),
    (["--toy", "--base", "x"], "--toy"),
    ([], "--base"),
    (["--base", "/no/such/dir"], "--base"),
    (["--base", "org/model", "--expert", "org/e"], "--expert-base"),
    (["--toy", "--chat-template", "/no/such/file"], "--chat-template"),
    (["--toy", "--kv-cache-tokens", "4"], "--kv-cache-tokens"),
    (["--toy", "--alpha", "nan"], "--alpha"),
    (["--toy", "--drain-timeout", "-1"], "--drain-timeout"),
    (["--toy", "--max-waiting", "0"], "--max-waiting"),
])
def test_cli_errors_are_one_line_exit_2(args, option, capsys):
    from rast_kernels.serve.cli import parse_args

    with pytest.raises(SystemExit) as info:
        parse_args(args + ["--port", str(free_port())] if "--port" not in args else args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and option in err and "Traceback" not in err, err


def test_cli_without_the_serve_extra_is_one_line(monkeypatch, capsys):
    import importlib.util

    from rast_kernels.serve import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    with pytest.raises(SystemExit) as info:
        cli.parse_args(["--toy", "--port", "0"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "pip install" in err and "fastapi" in err, err


def test_cli_port_in_use_fails_before_loading():
    with socket.socket() as s:
        s.bind((HOST, 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "rast_kernels.serve.cli", "--toy", "--port", str(port)],
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--port" in r.stderr, r.stderr
    assert "Loading weights" not in r.stderr


# ---------------------------------------------------------------- random hostile bodies
FUZZ_VALUES = [None, True, False, 0, 1, -1, 2, 3.5, -0.0, 1e308, -1e308, 10**20, -(10**20), "", "x", "Q01=", [], [1],
               [[1]], [[]], ["a", 1], {}, {"a": 1}, [None], "\u0000", [25], [24], [-1], 0.5, 64, 4]
FUZZ_FIELDS = ["prompt", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "logprobs", "stream",
               "stream_options", "alpha", "base_plausibility", "top_k", "min_p", "ignore_eos", "return_token_ids", "echo", "best_of", "user",
               "model", "messages", "max_completion_tokens", "top_logprobs", "logit_bias", "suffix",
               "presence_penalty"]


def test_random_hostile_bodies_never_break_the_server(ref_engine):
    """Valid bodies with 1-3 fields replaced by values of every JSON type: each answer is 200 or a JSON 400/404
    naming its field, and no engine step fails (a value that passes validation but breaks the engine would)."""
    pytest.importorskip("httpx")
    import random

    from fastapi.testclient import TestClient

    from rast_kernels.serve import create_app

    rng = random.Random(14)
    app = create_app(ref_engine, chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    codes = {}
    # every field x every value once on a completion body, then random 1-3 field changes on both kinds
    cases = [(False, [(f, v)]) for f in FUZZ_FIELDS for v in FUZZ_VALUES]
    for _ in range(150):
        cases.append((rng.random() < 0.5, [(rng.choice(FUZZ_FIELDS), rng.choice(FUZZ_VALUES))
                                           for _ in range(rng.randint(1, 3))]))
    with TestClient(app) as client:  # runs the lifespan: the engine loop thread serves the valid ones
        for chat, changes in cases:
            body = (dict(messages=[{"role": "user", "content": P}], max_tokens=3) if chat
                    else dict(prompt=P, max_tokens=3))
            for f, v in changes:
                body[f] = v
                if f in ("max_tokens", "max_completion_tokens", "n") and type(v) is int and v > 8:
                    body[f] = 8  # keep the valid ones short
            r = client.post("/v1/chat/completions" if chat else "/v1/completions", content=json.dumps(body))
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
            assert r.status_code in (200, 400, 404), (body, r.text[:300])
            if r.status_code != 200:
                err = r.json()["error"]
                assert err["param"] and err["message"].startswith(err["param"] + ":"), (body, err)
        assert app.state.loop.steps_failed == 0
        assert ref_engine.stats()["kv_blocks_used"] == 0
        assert not ref_engine._requests  # every finished request's entry released: a long-lived server stays flat
    assert codes.get(200, 0) >= 5 and codes.get(400, 0) >= 100, codes  # both kinds really exercised
