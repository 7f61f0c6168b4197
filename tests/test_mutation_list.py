"""The mutation tool's list (tests/mutation.py) stays valid: every mutant's original snippet occurs exactly once
in its file and every test it names exists. (Running the mutants is a development step: docs/development.md.)"""
from __future__ import annotations

import pathlib

import mutation


def test_every_mutant_still_applies():
    assert mutation.check_snippets() == []
    root = pathlib.Path(mutation.ROOT)
    for name, path, orig, new, tests in mutation.MUTANTS:
        assert orig != new, name
        for t in tests:
            assert (root / t.split("::")[0]).exists(), (name, t)
    assert len({m[0] for m in mutation.MUTANTS}) == len(mutation.MUTANTS)
