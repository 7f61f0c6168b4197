"""The samples store: what an evaluation has generated so far, on disk, so that re-running it resumes.

It owns these files in the output directory, and the sample record they hold:

* ``samples.jsonl`` (:data:`SAMPLES`) — one JSON record per sample, one line each (:data:`RECORD_FIELDS`, plus
  ``diag`` with diagnostics). A record is identified by :func:`record_key` ``(dataset, problem_id, config,
  sample_index)``.
* ``samples.part-G.jsonl`` (:func:`part_path`) — under data parallelism, what group ``G`` has written so far, in
  the same format: each group appends to its own file, so nothing is shared while running and an interruption
  loses nothing. :func:`merge_parts` moves the parts' records into ``samples.jsonl``.
* ``run.json`` (:data:`RUN`) — the settings' fingerprint (what decides the samples); :func:`check_resume`
  refuses a directory made with other settings.

Invariants: a writer appends whole lines and flushes after each, so a hard kill leaves at most one torn last line,
which reading cuts from its file (appending then goes on from a whole line); ``samples.jsonl`` holds each key at
most once, and merging is idempotent (a record already there is not appended again), so a merge interrupted
midway can simply be repeated; a resumed run (any number of groups, or one process) counts the parts as done.
"""
from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, List

if TYPE_CHECKING:
    from .run import Settings

RECORD_FIELDS = ("dataset", "problem_id", "config", "sample_index", "seed", "completion", "extracted", "correct",
                 "tokens", "finish_reason")
SAMPLES, RUN = "samples.jsonl", "run.json"
PART_PREFIX, PART_SUFFIX = "samples.part-", ".jsonl"  # + the DP group's index: one file per group


def record_key(rec: dict) -> tuple:
    """A sample record's identity: ``(dataset, problem_id, config, sample_index)``."""
    return rec["dataset"], rec["problem_id"], rec["config"], rec["sample_index"]


def check_resume(out_dir: str, settings: Settings) -> None:
    """``ValueError`` naming ``out`` when ``out_dir`` holds samples made with other settings (their
    :meth:`~rast_kernels.eval.run.Settings.fingerprint` differs); writes ``run.json`` on a fresh directory."""
    path = os.path.join(out_dir, RUN)
    mine = settings.fingerprint()
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            try:
                theirs = json.load(f)
            except json.JSONDecodeError:
                raise ValueError(f"out: {path} is not JSON; delete it or use another --out") from None
        diff = [k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
        if diff:
            k = diff[0]
            raise ValueError(f"out: {out_dir!r} holds samples made with other settings ({k}: {theirs.get(k)!r} "
                             f"there, {mine.get(k)!r} now); use another --out to keep both")
    else:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(mine, f, indent=1)


def part_path(out_dir: str, dp_rank: int) -> str:
    """Where data-parallel group ``dp_rank`` writes its samples while it runs."""
    return os.path.join(out_dir, f"{PART_PREFIX}{dp_rank}{PART_SUFFIX}")


def part_files(out_dir: str) -> List[str]:
    """The part files in ``out_dir`` (left by a data-parallel run not merged yet), in group order."""
    names = [n for n in os.listdir(out_dir) if n.startswith(PART_PREFIX) and n.endswith(PART_SUFFIX)
             and n[len(PART_PREFIX):-len(PART_SUFFIX)].isdigit()]
    return [os.path.join(out_dir, n) for n in sorted(names, key=lambda n: int(n[len(PART_PREFIX):-len(PART_SUFFIX)]))]


def read_records(path: str) -> list:
    """The records of one samples file (``[]`` when it does not exist), in file order. A torn last line (a run
    killed mid-write) is cut from the file; ``ValueError`` naming ``out`` for any other line that is not JSON."""
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    out = []
    for lineno, line in enumerate(data[:end].decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"out: {path}:{lineno} is not a sample record (not JSON); fix or delete that "
                                 "line, or use another --out") from None
    return out


def read_samples(out_dir: str, parts: bool = False) -> list:
    """The records of ``samples.jsonl`` (and, with ``parts``, then of every part file), as :func:`read_records`
    reads them."""
    paths = [os.path.join(out_dir, SAMPLES)] + (part_files(out_dir) if parts else [])
    return [r for path in paths for r in read_records(path)]


def merge_parts(out_dir: str) -> int:
    """Append the records of every part file that ``samples.jsonl`` lacks to it, then delete the parts; returns
    how many were appended. Safe to repeat after a crash midway (a record already there is not appended twice)."""
    path = os.path.join(out_dir, SAMPLES)
    have = {record_key(r) for r in read_records(path)}
    added = 0
    for part in part_files(out_dir):
        with open(path, "a", encoding="utf-8") as sink:
            for rec in read_records(part):
                if record_key(rec) not in have:
                    have.add(record_key(rec))
                    sink.write(json.dumps(rec) + "\n")
                    added += 1
            sink.flush()
            os.fsync(sink.fileno())  # on disk before its part goes
        os.remove(part)
    return added
