#!/usr/bin/env python
"""Train the embedded RAST toy trio (base, expert base, RL expert) and write its evaluation table.

    python python/train_toy_trio.py                 # full run into rast_kernels/toy/trio (~20-30 min, 2 CPU cores)
    python python/train_toy_trio.py --smoke --out /tmp/trio   # seconds, for CI

All options: ``--help`` (this forwards to :func:`rast_kernels.toy.train.main`).
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from rast_kernels.toy.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
