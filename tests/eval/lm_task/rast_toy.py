"""Loader of the local lm-eval test tasks (no download): the JSONL beside this file as a ``test`` split.

The rows are held-out toy parity problems (``rast_kernels.toy.task.heldout_problems(8)``): the prompt, the
worked completion (``target``) and two choices that differ only in the final parity letter."""
import json
import os


def load(**_):
    import datasets

    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "rast_toy.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}
