"""Both all-gather branches of tensor_parallel.finish_projection on CPU (gloo, 2 ranks): torch 2.11's
``all_gather_into_tensor`` (what the GPU machine runs, forced here) and 2.13's ``all_gather_single`` (CI's torch)
give the same vocabulary-parallel logits, equal to the unsharded head's."""
import json

import torch

from parallel_launch import needs_dist, torchrun, worker

pytestmark = needs_dist


def test_both_all_gather_branches_give_the_full_logits(tmp_path):
    out = tmp_path / "out.json"
    r = torchrun(2, worker("gather_worker.py"), str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = json.loads(out.read_text())
    assert [rec["rank"] for rec in ranks] == [0, 1]
    newer = hasattr(torch.distributed, "all_gather_single")
    for rec in ranks:
        assert rec["shard_rows"] == 153  # each rank really holds half the head (305 rows, padded)
        # each forced name is the one called, once; the default is the newest name this torch has
        assert rec["calls"]["all_gather_into_tensor"] == {"all_gather_into_tensor": 1}
        assert rec["calls"]["default"] == {("all_gather_single" if newer else "all_gather_into_tensor"): 1}
        if newer:
            assert rec["calls"]["all_gather_single"] == {"all_gather_single": 1}
        assert set(rec["shapes"]) == {"all_gather_into_tensor", "default"} | ({"all_gather_single"} if newer else set())
        assert all(shape == [2, 3, 305] for shape in rec["shapes"].values())
        assert rec["branches_equal"]
        assert all(d < 1e-5 for d in rec["max_diff_from_full"].values()), rec["max_diff_from_full"]
