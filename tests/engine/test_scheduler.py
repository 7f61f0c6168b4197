"""The host scheduler and the block allocator alone (no models): accounting, admission, preemption, compaction."""
from __future__ import annotations

import random

import pytest

from rast_kernels.engine.block_manager import BlockAllocator
from rast_kernels.engine.sampling_params import SamplingParams
from rast_kernels.engine.scheduler import WAITING, Request, Scheduler, Sequence


def _request(number, prompt_len, max_new, n=1):
    req = Request(request_id=f"r{number}", prompt=[1] * prompt_len,
                  params=SamplingParams(max_new_tokens=max_new, n=n, seed=number), eos=(), arrival=number)
    req.sequences = [Sequence(request=req, sample_index=j, seed=j) for j in range(n)]
    return req


def _held(sched):
    return sorted(b for s in sched.running for b in s.blocks)


def test_allocator_counts_and_refs():
    a = BlockAllocator(5, 4)
    assert a.blocks_for(0) == 0 and a.blocks_for(1) == 1 and a.blocks_for(4) == 1 and a.blocks_for(5) == 2
    x = a.allocate(3)
    assert x == [0, 1, 2] and a.num_free == 2
    assert a.allocate(3) is None and a.num_free == 2  # all or nothing
    a.share(x[:2])
    a.release(x)
    assert a.num_free == 3  # blocks 0, 1 still held once
    a.release(x[:2])
    assert a.num_free == 5
    with pytest.raises(AssertionError):
        a.release([0])


def test_admission_shares_full_prompt_blocks_and_copies_the_partial_one():
    sched = Scheduler(4, BlockAllocator(20, 4), 64)
    sched.add(_request(0, prompt_len=10, max_new=5, n=3))  # 2 full blocks + a partial one
    (group,) = sched.admit(max_prefill_tokens=1000)
    owner, a, b = group.sequences
    assert owner.blocks[:2] == a.blocks[:2] == b.blocks[:2]
    assert len({owner.blocks[2], a.blocks[2], b.blocks[2]}) == 3
    assert group.copies == [(owner.blocks[2], a.blocks[2]), (owner.blocks[2], b.blocks[2])]
    assert sched.alloc.num_used == 2 + 3
    assert [s.slot for s in group.sequences] == [0, 1, 2] and all(s.kv_upper == 10 for s in group.sequences)
    for s in group.sequences:
        sched.finish(s)
    assert sched.alloc.num_used == 0 and sched.num_running == 0


def test_slots_and_blocks_limit_admission():
    sched = Scheduler(2, BlockAllocator(6, 4), 64)
    for i in range(4):
        sched.add(_request(i, prompt_len=4, max_new=4))
    groups = sched.admit(max_prefill_tokens=1000)
    assert sum(len(g.sequences) for g in groups) == 2 and len(sched.waiting) == 2  # two slots
    sched.finish(groups[0].sequences[0])
    (g,) = sched.admit(max_prefill_tokens=1000)
    assert g.sequences[0].request.request_id == "r2" and g.sequences[0].slot == 0  # lowest free slot


def test_reserve_decode_preempts_the_newest_and_requeues_it_in_arrival_order():
    sched = Scheduler(3, BlockAllocator(4, 4), 64)
    for i in range(3):
        sched.add(_request(i, prompt_len=4, max_new=20))
    sched.admit(max_prefill_tokens=1000, reserve_per_running=0)
    assert sched.num_running == 3 and sched.alloc.num_free == 1
    preempted = sched.reserve_decode(steps=4)  # each needs a second block: one is free, r2 gives one back
    assert [s.request.request_id for s in preempted] == ["r2"]
    assert preempted[0].status == WAITING and preempted[0].blocks == [] and preempted[0].preemptions == 1
    assert sorted(len(s.blocks) for s in sched.running) == [2, 2]
    preempted = sched.reserve_decode(steps=8)  # r0 wants a third block: the newest running (r1) goes
    assert [s.request.request_id for s in preempted] == ["r1"]
    assert [s.request.request_id for s in sched.waiting] == ["r1", "r2"]  # back in arrival order
    (oldest,) = sched.running
    assert oldest.request.request_id == "r0" and len(oldest.blocks) == 3 and sched.alloc.num_free == 1


def test_compaction_moves_running_rows_down():
    sched = Scheduler(4, BlockAllocator(40, 4), 64)
    for i in range(4):
        sched.add(_request(i, prompt_len=3, max_new=3))
    seqs = [g.sequences[0] for g in sched.admit(max_prefill_tokens=1000)]
    sched.finish(seqs[0])
    sched.finish(seqs[2])
    moves = sched.compact()
    assert moves == [(3, 0)] and seqs[3].slot == 0 and seqs[1].slot == 1 and sched.active_rows() == 2


def test_static_policy_holds_full_slabs_until_the_batch_ends():
    sched = Scheduler(2, BlockAllocator(8, 4), 16, policy="static")
    for i in range(3):
        sched.add(_request(i, prompt_len=3, max_new=2))
    seqs = [g.sequences[0] for g in sched.admit(max_prefill_tokens=1000)]
    assert len(seqs) == 2 and all(len(s.blocks) == 4 for s in seqs)  # max_seq_len 16 = 4 blocks each
    assert sched.admit(max_prefill_tokens=1000) == []  # nothing joins a running batch
    assert sched.finish(seqs[0]) == [] and seqs[0].slot == 0  # idles in place
    assert sched.compact() == []
    assert set(sched.finish(seqs[1])) == set(seqs) and sched.alloc.num_used == 0
    assert len(sched.admit(max_prefill_tokens=1000)) == 1


def test_prefill_token_budget_splits_admissions():
    sched = Scheduler(8, BlockAllocator(100, 4), 64)
    for i in range(4):
        sched.add(_request(i, prompt_len=10, max_new=2))
    assert len(sched.admit(max_prefill_tokens=25)) == 2  # 2 x 10 padded tokens fit, 3 x 10 do not
    assert len(sched.admit(max_prefill_tokens=5)) == 1   # one group always goes (if the pool has room)


def test_random_workload_keeps_the_invariants():
    """Random admissions, growth, preemptions, finishes: blocks are never double-held, slots never shared, and
    everything returns to the pool at the end."""
    rng = random.Random(0)
    alloc = BlockAllocator(12, 4)
    sched = Scheduler(4, alloc, 48)
    for i in range(40):
        sched.add(_request(i, prompt_len=rng.randint(1, 12), max_new=rng.randint(1, 20), n=rng.choice([1, 1, 2])))
    for _ in range(2000):
        if not sched.has_work():
            break
        steps = rng.randint(1, 4)
        sched.reserve_decode(steps=steps)
        for s in sched.running:
            s.kv_upper = min(s.kv_upper + steps, s.max_kv)
            assert alloc.blocks_for(s.kv_upper) <= len(s.blocks)
            if rng.random() < 0.2 or s.kv_upper >= s.max_kv:
                sched.finish(s)
        sched.compact()
        sched.admit(max_prefill_tokens=64)
        slots = [s.slot for s in sched.running]
        assert len(slots) == len(set(slots)) and all(sched.slots[i].slot == i for i in slots)
        assert sched.active_rows() == sched.num_running
        held = {}
        for s in sched.running:
            for b in s.blocks:
                held[b] = held.get(b, 0) + 1
        assert alloc.num_used == len(held)
    assert not sched.has_work() and alloc.num_free == alloc.num_blocks
