"""Evaluation datasets from local files (nothing is downloaded) and the shipped toy task.

A dataset is a list of :class:`Item` (``id``, ``input`` = the problem text put into the template, ``answer`` = the
gold answer text) plus the grading kind its answers need. Files: ``.jsonl`` (one JSON object per line; blank
lines skipped), ``.json`` (a list of objects, or an object holding that list under ``"data"``), ``.parquet``
(needs pyarrow). Named adapters (``DATASETS``) say which fields hold the problem and the answer (the first
present of the listed names) and how answers are graded:

=========== ========================= ========== ========
kind        problem field             answer     grading
=========== ========================= ========== ========
math500     problem                   answer     math
gsm8k       question                  answer     gsm8k   (the gold's ``#### N`` line)
aime, amc   problem or question       answer     math
toy         (no file: :func:`rast_kernels.toy.task.heldout_problems`)  toy
=========== ========================= ========== ========

``field_problem`` / ``field_answer`` override the adapter's field names; the id is the record's ``id`` /
``unique_id`` / ``problem_id`` field when present, else its index in the file. Every record is checked when the
file is read, so a missing field is an error before any model is loaded.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import List, Optional

# kind -> (problem fields, answer fields, grading kind)
DATASETS = {
    "math500": (("problem",), ("answer",), "math"),
    "gsm8k": (("question",), ("answer",), "gsm8k"),
    "aime": (("problem", "question"), ("answer",), "math"),
    "amc": (("problem", "question"), ("answer",), "math"),
    "toy": ((), (), "toy"),
}
ID_FIELDS = ("id", "unique_id", "problem_id")
DEFAULT_TOY_PROBLEMS = 100
SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class Item:
    id: str
    input: str
    answer: str


@dataclass
class Dataset:
    name: str  # the adapter kind (the table's column)
    grader: str  # the grading kind (rast_kernels.eval.grading.KINDS)
    items: List[Item]
    path: Optional[str] = None


def read_records(path: str) -> list:
    """The records (dicts) of a ``.jsonl``, ``.json`` or ``.parquet`` file; ``ValueError`` naming the file (and the
    line) for anything else, ``FileNotFoundError`` for a missing file, ``ImportError`` for Parquet without pyarrow."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data: no such file: {path!r}")
    lower = path.lower()
    if lower.endswith(".jsonl"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"data: {path}:{lineno}: not JSON ({exc.msg})") from None
    elif lower.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            try:
                obj = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"data: {path}: not JSON ({exc.msg} at line {exc.lineno})") from None
        rows = obj.get("data") if isinstance(obj, dict) else obj
        if not isinstance(rows, list):
            raise ValueError(f"data: {path}: expected a list of records (or {{'data': [...]}})")
    elif lower.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"data: reading {path!r} needs pyarrow: pip install pyarrow") from None
        rows = pq.read_table(path).to_pylist()
    else:
        raise ValueError(f"data: {path!r}: unknown file type (expected {', '.join(SUFFIXES)})")
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise ValueError(f"data: {path}: record {i} is a {type(r).__name__}, not an object")
    return rows


def _pick(record: dict, names, what: str, path: str, index: int, option: str):
    for name in names:
        if name in record and record[name] is not None:
            value = record[name]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value)  # AIME answers are often stored as numbers
            if not isinstance(value, str):
                raise ValueError(f"{option}: {path}: record {index} field {name!r} is a {type(value).__name__}, "
                                 "not text")
            return value
    raise ValueError(f"{option}: {path}: record {index} has no {what} field {' or '.join(map(repr, names))} "
                     f"(it has: {', '.join(sorted(record)) or 'none'})")


def load_dataset(kind: str, path: Optional[str] = None, *, field_problem: Optional[str] = None,
                 field_answer: Optional[str] = None, max_problems: Optional[int] = None) -> Dataset:
    """The dataset ``kind`` (``DATASETS``) from ``path`` (toy: no path; ``max_problems`` held-out problems, default
    ``DEFAULT_TOY_PROBLEMS``), keeping the first ``max_problems`` items when given. Errors name the argument
    (``kind``, ``data``, ``field_problem`` / ``field_answer`` for missing fields, ``max_problems``)."""
    if kind not in DATASETS:
        raise ValueError(f"kind: unknown dataset {kind!r} (expected one of {', '.join(DATASETS)})")
    if max_problems is not None and (isinstance(max_problems, bool) or not isinstance(max_problems, int)
                                     or max_problems < 1):
        raise ValueError(f"max_problems: expected an int >= 1, got {max_problems!r}")
    problem_fields, answer_fields, grader = DATASETS[kind]
    if kind == "toy":
        if path is not None:
            raise ValueError("data: the toy dataset is generated (held-out parity problems); give no file")
        from ..toy import task

        count = max_problems or DEFAULT_TOY_PROBLEMS
        items = [Item(f"toy-{i}", p.prompt, task.ANSWER_CHARS[p.answer])
                 for i, p in enumerate(task.heldout_problems(count))]
        return Dataset(kind, grader, items)
    if path is None:
        raise ValueError(f"data: dataset {kind!r} needs a file (.jsonl, .json or .parquet)")
    rows = read_records(path)
    if not rows:
        raise ValueError(f"data: {path}: no records")
    if max_problems is not None:
        rows = rows[:max_problems]
    pf = (field_problem,) if field_problem else problem_fields
    af = (field_answer,) if field_answer else answer_fields
    items = []
    for i, r in enumerate(rows):
        text = _pick(r, pf, "problem", path, i, "field_problem" if field_problem else "data")
        answer = _pick(r, af, "answer", path, i, "field_answer" if field_answer else "data")
        rid = next((str(r[f]) for f in ID_FIELDS if r.get(f) is not None), str(i))
        items.append(Item(rid, text, answer))
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):  # resuming keys on ids: two records with one id would overwrite each other
        dup = next(x for x in ids if ids.count(x) > 1)
        raise ValueError(f"data: {path}: the id {dup!r} appears more than once")
    return Dataset(kind, grader, items, path)
