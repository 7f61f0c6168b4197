"""The step contract without models: scripted workloads through the real scheduler and output processor against a
fake device that carries out each StepPlan and checks what the plan promises.

The fake device keeps, per slot, what the runner's slot state would (sequence, block table, position, count) and
fails if a plan writes a KV position outside the blocks it gave the row, loads a slot that is in use, or moves a
row onto another. Every step the host side is checked too: blocks conserved (each held block's holders counted, the
free list exactly the rest), no slot double-booked, a preempted sequence always the newest admitted.
"""
from __future__ import annotations

import random

import pytest

from rast_kernels.engine.block_manager import BlockAllocator
from rast_kernels.engine.detokenize import IncrementalText
from rast_kernels.engine.output_processor import OutputProcessor
from rast_kernels.engine.plan import StepPlan
from rast_kernels.engine.request import FINISHED, RUNNING, Request, RowSettings, Sequence
from rast_kernels.engine.sampling_params import SamplingParams
from rast_kernels.engine.scheduler import Scheduler
from rast_kernels.engine.slot_state import EOS, LENGTH


def _decode(ids):
    return "".join(chr(97 + i % 26) for i in ids)


class FakeSnapshot:
    def __init__(self, rows, window, ring):
        self.rows, self.window, self.ring = rows, window, ring

    def ready(self):
        return True

    def read(self):
        return [r[0] for r in self.rows], [r[1] for r in self.rows], None, None


class FakeDevice:
    """Carries out plans on per-slot records; tokens are ``(seed + index) % 50 + 2`` and token 1 is EOS."""

    def __init__(self, num_slots, block_size, rng, speculative_tokens=0, ring=64):
        self.slots = [None] * num_slots
        self.bs, self.rng, self.k, self.ring = block_size, rng, speculative_tokens, ring

    def execute(self, plan: StepPlan):
        for s in plan.deactivate:
            if self.slots[s] is not None:
                self.slots[s]["done"] = True
        for src, dst in plan.moves:
            assert self.slots[dst] is None or self.slots[dst]["done"], f"move {src}->{dst} onto a live row"
            self.slots[dst], self.slots[src] = self.slots[src], None
        for slot, j, block in plan.block_updates:
            row = self.slots[slot]
            row["blocks"] += [None] * (j + 1 - len(row["blocks"]))
            row["blocks"][j] = block
        for init in plan.inits:
            old = self.slots[init.slot]
            assert old is None or old["done"], f"slot {init.slot} loaded while in use"
            self.slots[init.slot] = dict(blocks=list(init.blocks), pos=init.pos, n_gen=init.n_gen, seed=init.seed,
                                         max_new=init.settings.max_new, done=False, finish=0, ring={})
            self._emit(self.slots[init.slot], 1, write=False)  # the prefill's token
        if plan.decode is None:
            return None
        for _ in range(plan.decode.steps):
            for row in self.slots[:plan.decode.rows]:
                if row is not None and not row["done"]:
                    self._emit(row, self.rng.randint(1, self.k + 1), write=True)
        rows = []
        for row in self.slots[:plan.decode.rows]:
            if row is None:
                rows.append(([0, 1, 0, -1] + [0] * self.ring, [0.0] * self.ring))
                continue
            ring = [row["ring"].get(c, 0) for c in range(self.ring)]
            rows.append(([row["n_gen"], int(row["done"]), row["finish"], -1] + ring, [0.0] * self.ring))
        return FakeSnapshot(rows, (plan.window, plan.decode), self.ring)

    def _emit(self, row, count, write):
        """``count`` tokens; a speculative round writes ``k + 1`` positions (those past the row's end: scratch)."""
        if write:
            for j in range(self.k + 1):
                p = row["pos"] + j
                if j < row["max_new"] - row["n_gen"]:  # a position the row may keep: must be in its blocks
                    assert p // self.bs < len(row["blocks"]) and row["blocks"][p // self.bs] is not None, \
                        f"position {p} written outside the row's {len(row['blocks'])} blocks"
        for _ in range(count):
            tok = (row["seed"] + row["n_gen"]) % 50 + 2
            if row["seed"] % 7 == 0 and row["n_gen"] == 3:
                tok = 1  # some rows end with EOS
            row["ring"][row["n_gen"] % self.ring] = tok
            row["n_gen"] += 1
            if write:
                row["pos"] += 1
            if tok == 1 or row["n_gen"] >= row["max_new"]:
                row["done"], row["finish"] = True, EOS if tok == 1 else LENGTH
                return


def _request(number, prompt_len, max_new, n):
    params = SamplingParams(max_new_tokens=max_new, n=n, seed=number)
    req = Request(request_id=f"r{number}", prompt=list(range(2, 2 + prompt_len)), params=params, eos=(1,),
                  arrival=number, settings=RowSettings.from_params(params, (1,), 1))
    req.sequences = [Sequence(request=req, sample_index=j, seed=number * 10 + j) for j in range(n)]
    for s in req.sequences:
        s.detok = IncrementalText(_decode, ())
    return req


def _check_host(sched: Scheduler, alloc: BlockAllocator):
    holders = {}
    for s in sched.running:
        for b in s.blocks:
            holders[b] = holders.get(b, 0) + 1
    assert alloc.num_used == len(holders), "a block is held by nobody or freed while held"
    assert all(alloc.holders(b) == n for b, n in holders.items()), "reference counts differ from holders"
    slots = [s.slot for s in sched.running]
    assert len(slots) == len(set(slots)) and all(sched.slots[i].slot == i for i in slots), "a slot double-booked"
    for s in sched.running:
        assert alloc.blocks_for(s.kv_upper) <= len(s.blocks), "kv_upper past the blocks held"


@pytest.mark.parametrize("policy,k", [("continuous", 0), ("continuous", 3), ("static", 0)])
def test_scripted_plans_keep_the_invariants(policy, k):
    rng = random.Random(7 + k)
    alloc = BlockAllocator(14, 4)
    sched = Scheduler(4, alloc, 48, policy, max_prefill_tokens=64, speculative_tokens=k)
    device = FakeDevice(4, 4, rng, speculative_tokens=k)
    processor = OutputProcessor(sched, _decode)
    reqs = [_request(i, rng.randint(1, 10), rng.randint(1, 16), rng.choice([1, 1, 2])) for i in range(40)]
    preempted_seen = 0
    for step in range(3000):
        if step < 40:
            sched.add(reqs[step])
        if not sched.has_work():
            break
        before = {s: (s.admitted_at, s.preemptions, s.slot) for s in sched.running}
        plan = sched.schedule(2)
        victims = [s for s, (_, n, _) in before.items() if s.preemptions > n]
        survivors = [s for s in before if s not in victims]
        # the newest admitted go first, and their device rows are made inert by the same plan
        assert all(before[v][0] > before[s][0] for v in victims for s in survivors)
        assert {before[v][2] for v in victims} <= set(plan.deactivate)
        preempted_seen += len(victims)
        snap = device.execute(plan)
        if snap is not None:
            processor.process(snap, {})
        _check_host(sched, alloc)
    if policy == "continuous" and k == 0:  # (speculative admission leaves room for whole rounds)
        assert preempted_seen > 0, "the pool was meant to force preemptions"
    assert not sched.has_work(), "the workload did not finish"
    assert alloc.num_free == alloc.num_blocks
    for r in reqs:
        for s in r.sequences:
            assert s.status == FINISHED
            want = [(s.seed + i) % 50 + 2 for i in range(len(s.tokens))]
            if s.seed % 7 == 0 and len(s.tokens) >= 3:
                want = want[:3]  # ended by the EOS at index 3 (not part of the output)
            assert s.tokens == want, "a preemption or a plan lost or repeated tokens"
            assert len(s.tokens) <= r.params.max_new_tokens


def test_preemption_takes_the_newest_and_the_plan_deactivates_its_slot():
    alloc = BlockAllocator(4, 4)
    sched = Scheduler(3, alloc, 64, max_prefill_tokens=64)
    reqs = [_request(i, 4, 20, 1) for i in range(3)]
    for r in reqs:
        sched.add(r)
    first = sched.schedule(4)
    assert [i.slot for i in first.inits] == [0, 1] and first.decode.rows == 2  # the third waits for blocks
    second = sched.schedule(4)  # r0 and r1 each need a second block: one is free; r1 (newer) gives one back
    (victim,) = [s for r in reqs for s in r.sequences if s.preemptions]
    assert victim.request.request_id == "r1" and second.deactivate == (1,)
    assert second.decode.rows == 1 and second.decode.owners[0][0].request.request_id == "r0"
    assert str(second).startswith("StepPlan(window=2, deactivate=(1,)")  # a value: printable, comparable
