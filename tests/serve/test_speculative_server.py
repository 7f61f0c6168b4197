"""The server over an engine with speculative decoding: the same completions as a plain engine, and /metrics
reports the rounds (in-process app, loopback only)."""
import os

import pytest

from rast_kernels import RastEngine, SamplingParams
from rast_kernels.serve.metrics import parse_text
from rast_kernels.toy.common import DEFAULT_OUT, ROLES

PATHS = [os.path.join(DEFAULT_OUT, r) for r in ROLES]


def test_speculative_server_equals_plain_and_reports_its_rounds():
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from rast_kernels.serve import create_app

    engine = RastEngine(*PATHS, max_batch_size=4, max_seq_len=64, speculative_tokens=3)
    plain = RastEngine(*PATHS, max_batch_size=4, max_seq_len=64)
    prompts = ["Q0110100101101011=", "Q1101101101101011="]
    body = dict(model="rast", prompt=prompts, max_tokens=24, temperature=1.0, top_p=0.95, seed=5, alpha=0.5)
    with TestClient(create_app(engine)) as client:
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        got = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
        metrics = parse_text(client.get("/metrics").text)
    want = [o.text for o in plain.generate(prompts, SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.95,
                                                                   seed=5, alpha=0.5))]
    assert got == want
    rounds, drafted = metrics["rast_speculative_rounds_total"], metrics["rast_speculative_drafted_total"]
    assert drafted == 3 * rounds > 0 and metrics["rast_speculative_emitted_total"] >= rounds
    assert 1.0 <= metrics["rast_speculative_tokens_per_round"] <= 4.0
