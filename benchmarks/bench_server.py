"""HTTP server benchmark: requests/s, time to first token and per-token latency at 1, 8 and 32 concurrent clients
against ``python -m rast_kernels serve``, beside the same workload through the Python API (the server's overhead).

Workload per case: ``--requests`` toy prompts (the shipped trio, ``rast_kernels/toy/trio``), each with its own
fixed seed, ``--max-tokens`` tokens (EOS ignored, so every request asks for the same work), temperature 1. Each of
``C`` clients keeps one request in flight (closed loop) until all are done.

* ``server``: the server runs in a subprocess on 127.0.0.1 (a free port); clients are threads that stream
  (``"stream": true``) over plain HTTP/1.1 (``http.client``); TTFT is request sent -> first chunk with text,
  per-token latency is (last chunk - first chunk) / (tokens - 1) per request.
* ``python_api``: one in-process ``RastEngine`` with the same settings, driven by ``add_request`` / ``step``
  keeping ``C`` requests in flight; TTFT is ``add_request`` -> the first ``step`` output with tokens, per-token
  latency as above from the step outputs.

Both measure wall time on the same machine, one after the other (the server idles while the API case runs). The
client threads share the CPU with the server: on a small CPU part of the "overhead" is the clients' own.

Example::

    python benchmarks/bench_server.py --out out/                 # 1, 8, 32 clients on CPU with the toy trio
    python benchmarks/bench_server.py --clients 4 --requests 16

Writes ``server.json`` under ``--out`` after each case. Options are checked before anything starts (one line on
stderr, exit 2).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rast_kernels import _cli  # noqa: E402  (light: no torch)

HOST = "127.0.0.1"


def parse_args(argv=None):
    p = _cli.ArgumentParser(prog="bench_server.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="1,8,32",
                   help="comma-separated concurrent client counts, each >= 1 (default 1,8,32)")
    p.add_argument("--requests", type=_cli.int_range(1, 100000), default=None,
                   help="requests per case (default: max(32, 4 x clients))")
    p.add_argument("--max-tokens", type=_cli.int_range(1, 40), default=24,
                   help="tokens per request, 1..40 (the toy trio's max_seq_len is 64; default 24)")
    p.add_argument("--max-batch-size", type=_cli.int_range(1, 256), default=32,
                   help="engine decode slots, server and API alike (default 32)")
    p.add_argument("--startup-timeout", type=_cli.float_range(1.0), default=180.0,
                   help="seconds to wait for the server to listen (default 180)")
    p.add_argument("--out", type=_cli.output_dir, default=None, help="folder for server.json")
    args = p.parse_args(argv)
    try:
        args.client_counts = [int(c) for c in args.clients.split(",")]
    except ValueError:
        _cli.fail(p, "--clients", f"expected comma-separated integers, got {args.clients!r}")
    if not args.client_counts or min(args.client_counts) < 1 or max(args.client_counts) > 1024:
        _cli.fail(p, "--clients", f"each count must be between 1 and 1024, got {args.clients!r}")
    for mod in ("fastapi", "uvicorn"):
        import importlib.util

        if importlib.util.find_spec(mod) is None:
            p.exit(2, f"{p.prog}: error: the serve extra is not installed (missing {mod}): "
                      "pip install 'rast_kernels[serve]'\n")
    return args


def _pcts(xs):
    if not xs:
        return None
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=100) if len(xs) > 1 else [xs[0]] * 99
    return {"p50": q[49] * 1e3, "p90": q[89] * 1e3, "p99": q[98] * 1e3, "mean": statistics.fmean(xs) * 1e3}


def _prompts(n):
    import random

    rng = random.Random(0)
    return ["Q" + "".join(rng.choice("01") for _ in range(16)) + "=" for _ in range(n)]


def _summary(system, clients, n, tokens, wall, ttft, tpot):
    return {"system": system, "clients": clients, "requests": n, "tokens": tokens, "wall_s": wall,
            "requests_per_s": n / wall, "tokens_per_s": tokens / wall, "ttft_ms": _pcts(ttft), "tpot_ms": _pcts(tpot)}


def run_server_case(port, clients, prompts, max_tokens):
    import http.client

    todo = list(enumerate(prompts))
    lock = threading.Lock()
    ttft, tpot, tokens, errors = [], [], [0], []

    def worker():
        conn = http.client.HTTPConnection(HOST, port, timeout=120)
        while True:
            with lock:
                if not todo:
                    break
                i, prompt = todo.pop()
            body = json.dumps(dict(prompt=prompt, max_tokens=max_tokens, seed=i, temperature=1.0, ignore_eos=True,
                                   stream=True, return_token_ids=True))
            t0 = time.perf_counter()
            conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            if r.status != 200:
                errors.append(r.read()[:200])
                continue
            first = last = None
            ntok = 0
            for line in r:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                c = json.loads(line[6:])["choices"][0]
                now = time.perf_counter()
                if c["text"] and first is None:
                    first = now
                if c["text"]:
                    last = now
                if c["finish_reason"] is not None:
                    ntok = len(c["token_ids"])
            with lock:
                tokens[0] += ntok
                if first is not None:
                    ttft.append(first - t0)
                    if ntok >= 2:
                        tpot.append((last - first) / (ntok - 1))
        conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]!r}")
    return _summary("server", clients, len(prompts), tokens[0], wall, ttft, tpot)


def run_api_case(engine, clients, prompts, max_tokens):
    from rast_kernels import SamplingParams

    todo = list(enumerate(prompts))
    inflight = {}  # rid -> [t_added, t_first, t_last, ntok]
    ttft, tpot, tokens = [], [], 0
    t0 = time.perf_counter()
    while todo or inflight:
        while todo and len(inflight) < clients:
            i, prompt = todo.pop()
            rid = engine.add_request(prompt, SamplingParams(max_new_tokens=max_tokens, seed=i, temperature=1.0,
                                                            eos_token_id=[]))
            inflight[rid] = [time.perf_counter(), None, None, 0]
        for out in engine.step():
            st = inflight.get(out.request_id)
            now = time.perf_counter()
            if len(out.token_ids) > st[3]:
                st[1] = st[1] or now
                st[2], st[3] = now, len(out.token_ids)
            if out.finished:
                engine.abort_request(out.request_id)  # releases the engine's entry, as the server does
                del inflight[out.request_id]
                tokens += st[3]
                if st[1] is not None:
                    ttft.append(st[1] - st[0])
                    if st[3] >= 2:
                        tpot.append((st[2] - st[1]) / (st[3] - 1))
    return _summary("python_api", clients, len(prompts), tokens, time.perf_counter() - t0, ttft, tpot)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from common import device_name, utc_now, versions, write_json
    from rast_kernels import RastEngine
    from rast_kernels.toy.common import DEFAULT_OUT, ROLES

    max_seq_len = 64
    result = {"benchmark": "bench_server", "date": utc_now(), "device": device_name(torch.device("cpu")),
              "torch_threads": torch.get_num_threads(), "versions": versions(),
              "config": {"trio": "toy", "max_tokens": args.max_tokens, "max_batch_size": args.max_batch_size,
                         "max_seq_len": max_seq_len, "clients": args.client_counts}, "cases": []}
    path = Path(args.out) / "server.json" if args.out else None
    port = _free_port()
    tmp = tempfile.mkdtemp(prefix="bench_server_")
    ready = os.path.join(tmp, "ready")
    log = open(os.path.join(tmp, "server.log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "rast_kernels.serve.cli", "--toy", "--host", HOST, "--port",
                             str(port), "--max-batch-size", str(args.max_batch_size), "--max-seq-len",
                             str(max_seq_len), "--max-waiting", "100000", "--log-level", "warning", "--ready-file",
                             ready], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + args.startup_timeout
        while not (os.path.exists(ready) and open(ready).read().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                raise RuntimeError("server did not start:\n" + open(log.name).read()[-2000:])
            time.sleep(0.1)
        engine = RastEngine(*[os.path.join(DEFAULT_OUT, r) for r in ROLES], max_batch_size=args.max_batch_size,
                            max_seq_len=max_seq_len)
        for clients in args.client_counts:
            n = args.requests or max(32, 4 * clients)
            prompts = _prompts(n)
            run_server_case(port, clients, prompts[:min(n, clients)], args.max_tokens)  # warm-up
            run_api_case(engine, clients, prompts[:min(n, clients)], args.max_tokens)
            for case in (run_server_case(port, clients, prompts, args.max_tokens),
                         run_api_case(engine, clients, prompts, args.max_tokens)):
                result["cases"].append(case)
                print(f"{case['system']:>10} clients={clients:<3} {case['requests_per_s']:7.1f} req/s "
                      f"{case['tokens_per_s']:8.1f} tok/s  TTFT p50 {case['ttft_ms']['p50']:7.1f} ms "
                      f"p99 {case['ttft_ms']['p99']:7.1f} ms  per-token p50 {case['tpot_ms']['p50']:6.2f} ms",
                      flush=True)
                if path is not None:
                    write_json(result, path)
    finally:
        proc.terminate()
        try:
            rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait(10)
        log.close()
    result["server_exit_status"] = rc
    if path is not None:
        write_json(result, path)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
