"""Helpers for the HTTP server tests: servers in subprocesses on 127.0.0.1 (free ports, the toy trio), plain HTTP,
SSE parsing, toy prompts. Every wait is bounded."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request


HOST = "127.0.0.1"
STARTUP_S = 90  # model load + uvicorn start on a busy 2-core machine
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # the toy task has no chat format


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """A ``python -m rast_kernels.serve.cli --toy`` subprocess."""

    def __init__(self, tmp_path, *args):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.ready = tmp_path / f"ready-{self.port}"
        self.log_path = tmp_path / f"server-{self.port}.log"
        template = tmp_path / "chat.jinja"
        template.write_text(CHAT_TEMPLATE)
        cmd = [sys.executable, "-m", "rast_kernels.serve.cli", "--toy", "--host", HOST, "--port", str(self.port),
               "--log-level", "warning", "--ready-file", str(self.ready), "--chat-template", str(template), *args]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + STARTUP_S
        while not (self.ready.exists() and self.ready.read_text().strip()):
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"server not ready after {STARTUP_S} s:\n{self.log()}")
            time.sleep(0.1)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def terminate(self, timeout=60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()

    # plain HTTP (urllib: no extra dependency)
    def request(self, method, path, body=None, *, raw=None, headers=None, timeout=60):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def post(self, path, body=None, **kw):
        status, headers, data = self.request("POST", path, body, **kw)
        return status, json.loads(data) if data else None

    def get_json(self, path):
        status, _, data = self.request("GET", path)
        return status, json.loads(data)

    def metrics(self) -> dict:
        from rast_kernels.serve.metrics import parse_text

        status, _, data = self.request("GET", "/metrics")
        assert status == 200
        return parse_text(data.decode())

    def wait_idle(self, timeout=20) -> dict:
        """Metrics once nothing runs, waits or holds KV blocks (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m["rast_requests_running"] == 0 and m["rast_requests_waiting"] == 0 and m["rast_kv_blocks_used"] == 0 \
                    and m["rast_requests_queued"] == 0:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"server not idle after {timeout} s: {m}")
            time.sleep(0.05)


@contextlib.contextmanager
def running_server(tmp_path, *args):
    srv = Server(tmp_path, *args)
    try:
        yield srv
    finally:
        if srv.proc.poll() is None:
            try:
                srv.terminate(30)
            except subprocess.TimeoutExpired:
                pass
        srv.kill()


def toy_prompts(count, seed=0, bits=16):
    import random

    rng = random.Random(seed)
    return ["Q" + "".join(rng.choice("01") for _ in range(bits)) + "=" for _ in range(count)]


def sse_events(lines):
    """``data:`` payloads of a server-sent-event stream (iterable of text lines), [DONE] included."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            out.append(line[len("data: "):])
        elif line.strip():
            raise AssertionError(f"unexpected SSE line {line!r}")
    return out
