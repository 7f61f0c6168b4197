"""init_parallel: argument errors and the single-process contexts in this process; the TP/DP layout, group sums
and object collectives with 4 ranks (TP 2 x DP 2) under torchrun."""
import json

import pytest

from parallel_launch import needs_dist, torchrun, worker
from rast_kernels import parallel
from rast_kernels.parallel import groups


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "RAST_FORCE_PG", "RAST_DIST_TIMEOUT_S"):
        monkeypatch.delenv(var, raising=False)
    parallel.shutdown()
    yield
    parallel.shutdown()


def test_single_process_context_and_idempotence():
    assert not parallel.launched() and parallel.current() is None
    ctx = parallel.init_parallel()
    assert (ctx.world_size, ctx.rank, ctx.tp_size, ctx.dp_size, ctx.backend, ctx.tp_group) == (1, 0, 1, 1, "none", None)
    assert ctx.is_leader and ctx.device.type == "cpu" and parallel.current() is ctx
    assert parallel.init_parallel(1) is ctx and parallel.init_parallel() is ctx
    with pytest.raises(ValueError, match="tensor_parallel_size: this process is already set up"):
        parallel.init_parallel(2)
    # without a group the collectives are identities
    assert parallel.gather_objects("x") == ["x"] and parallel.broadcast_object("y") == "y"


@pytest.mark.parametrize("value,exc,match", [(0, ValueError, "must be >= 1"), (2.0, TypeError, "expected an int"),
                                             (True, TypeError, "expected an int"),
                                             (2, ValueError, "torchrun --nproc-per-node=2")])
def test_argument_errors_name_tensor_parallel_size(value, exc, match):
    with pytest.raises(exc, match=match) as info:
        parallel.init_parallel(value)
    assert str(info.value).startswith("tensor_parallel_size")
    assert parallel.current() is None


def test_bad_timeouts(monkeypatch):
    with pytest.raises(ValueError, match="timeout_s: must be > 0"):
        parallel.init_parallel(timeout_s=0)
    monkeypatch.setenv("RAST_DIST_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="RAST_DIST_TIMEOUT_S: expected seconds"):
        parallel.init_parallel()


@needs_dist
@pytest.mark.parametrize("how", ["keyword", "env"])
def test_forced_one_rank_group(how, monkeypatch):
    import torch.distributed as dist

    if how == "env":
        monkeypatch.setenv("RAST_FORCE_PG", "1")
    ctx = parallel.init_parallel(1, force_group=how == "keyword", timeout_s=30)
    assert ctx.backend == "gloo" and ctx.tp_group is not None and dist.get_world_size(ctx.tp_group) == 1
    assert parallel.gather_objects({"a": 1}) == [{"a": 1}] and parallel.broadcast_object(3) == 3
    parallel.shutdown()
    assert not dist.is_initialized() and parallel.current() is None


@needs_dist
def test_groups_under_torchrun(tmp_path):
    r = torchrun(4, worker("groups_worker.py"), "2", str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    recs = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(4)]
    for i, rec in enumerate(recs):
        assert rec["bad"].startswith("tensor_parallel_size: 3 does not divide the world size 4")
        assert (rec["world"], rec["tp_rank"], rec["dp_rank"], rec["dp_size"]) == (4, i % 2, i // 2, 2)
        assert rec["leader"] == (i % 2 == 0) and rec["backend"] == "gloo"
        assert rec["tp_sum"] == {0: 1.0, 1: 1.0, 2: 5.0, 3: 5.0}[i]  # consecutive ranks: {0, 1} and {2, 3}
        assert rec["gathered"] == ([0, 10, 20, 30] if i == 0 else None) and rec["bcast"] == "from0"


def test_share_is_a_disjoint_round_robin_cover():
    ctxs = [groups.ParallelContext(world_size=6, rank=r, tp_size=2, tp_rank=r % 2, tp_group=None, dp_size=3,
                                   dp_rank=r // 2, backend="gloo", device=None) for r in range(6)]
    items = list(range(10))
    shares = {c.dp_rank: parallel.share(items, c) for c in ctxs}
    assert shares == {0: [0, 3, 6, 9], 1: [1, 4, 7], 2: [2, 5, 8]}
    assert parallel.share(items, None) == items
