"""Launching the parallel tests' workers: ``torchrun --standalone`` in a subprocess, on CPU (gloo)."""
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TIMEOUT_S = 120  # a launch that hangs fails the test instead of the suite

needs_dist = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def env():
    # one thread per rank (2 cores), a short collective timeout, and no GPU even where one exists
    return dict(os.environ, OMP_NUM_THREADS="1", RAST_DIST_TIMEOUT_S="30", CUDA_VISIBLE_DEVICES="",
                TOKENIZERS_PARALLELISM="false")


def torchrun(nproc: int, *args, cwd=None) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node=nproc args...``; ``args`` start with a script or ``-m module``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env(), cwd=cwd)


def worker(name: str) -> str:
    return os.path.join(HERE, name)
