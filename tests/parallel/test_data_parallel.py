"""generate_data_parallel under torchrun on the toy trio: DP = 2 (and TP 2 x DP 2 with a replicated engine, which
tests the split and the leader-only reporting) gives exactly DP = 1's outputs, greedy and sampled; a rank that
raises ends the launch with its error, not a hang."""
import json
import subprocess
import sys
import time

import pytest

from parallel_launch import TIMEOUT_S, env, needs_dist, torchrun, worker

pytestmark = needs_dist


@pytest.fixture(scope="module")
def dp1(tmp_path_factory):
    out = tmp_path_factory.mktemp("dp1") / "out.json"
    r = subprocess.run([sys.executable, worker("dp_worker.py"), str(out)], capture_output=True, text=True,
                       timeout=TIMEOUT_S, env=env())
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


def test_dp1_reference_is_complete_and_varied(dp1):
    assert [(o["prompt_index"], o["sample_index"]) for o in dp1["greedy"]] == [(i, 0) for i in range(5)]
    assert [(o["prompt_index"], o["sample_index"]) for o in dp1["sampled"]] == \
        [(i, j) for i in range(5) for j in range(2)]
    # the sampled call really samples: otherwise equal outputs would not show that seeds follow the requests
    assert len({o["text"] for o in dp1["sampled"]}) > 5


@pytest.mark.parametrize("nproc,tp", [(2, 1), (4, 2)], ids=["dp2", "tp2xdp2"])
def test_data_parallel_equals_one_process(dp1, tmp_path, nproc, tp):
    out = tmp_path / "out.json"
    r = torchrun(nproc, worker("dp_worker.py"), str(out), "--tp", str(tp))
    assert r.returncode == 0, r.stderr[-3000:]
    # every (prompt, sample) exactly once, in order, with DP = 1's tokens and text
    assert json.loads(out.read_text()) == dp1


def test_a_rank_that_raises_ends_every_rank(tmp_path):
    t0 = time.monotonic()
    r = torchrun(2, worker("dp_worker.py"), str(tmp_path / "out.json"), "--fail-rank", "1")
    assert r.returncode != 0
    assert "RuntimeError: boom on rank 1" in r.stderr
    assert time.monotonic() - t0 < TIMEOUT_S and not (tmp_path / "out.json").exists()
