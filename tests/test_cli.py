import subprocess
import sys

import pytest

from rast_kernels.__main__ import info, main


def test_info_lists_versions_backends_and_gpu(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    for needle in ("rast_kernels", "torch", "triton", "transformers", "compiled CPU (_C)", "compiled CUDA (_C)", "gpu"):
        assert needle in text
    assert text.strip() == info()


def test_info_rejects_arguments():
    with pytest.raises(SystemExit):
        main(["info", "--bogus"])


def test_module_entry_point_runs():
    res = subprocess.run([sys.executable, "-m", "rast_kernels", "info"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "backends:" in res.stdout
