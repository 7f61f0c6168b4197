#!/usr/bin/env python
"""Train the embedded RAST toy trio (base, expert base, RL expert) and write its evaluation table.

    python python/train_toy_trio.py                 # full run into rast_kernels/toy/trio (about 7 min on one CPU thread)
    python python/train_toy_trio.py --smoke --out /tmp/trio   # seconds, for CI

All options: ``--help`` (this forwards to :func:`rast_kernels.toy.train.main`).
"""
import sys

from rast_kernels.toy.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
