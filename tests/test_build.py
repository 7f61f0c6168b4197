"""The compiled extension rast_kernels._C is built, imports, and describes its build."""
import os
import shutil
from pathlib import Path

import pytest
import torch

from rast_kernels import _backends


def test_extension_imports_and_reports_build():
    from rast_kernels import _C  # fails when the package was installed without building the extension

    assert _backends.has_cpp_cpu()
    assert isinstance(_C.WITH_CUDA, bool)
    info = _C.__build_info__
    assert isinstance(info, str)
    assert torch.__version__.split("+")[0] in info
    assert ("CUDA on" in info) == _C.WITH_CUDA and ("CUDA off" in info) != _C.WITH_CUDA
    assert "parallel" in info
    for name in ("rast_sample_cpu", "philox_words_cpu"):
        assert callable(getattr(_C, name))


def test_cuda_matches_torch_build():
    from rast_kernels import _C

    if torch.version.cuda is None:
        # a CPU-only torch can only give the CPU kernels
        assert _C.WITH_CUDA is False
        assert not _backends.has_cpp_cuda()
        assert not hasattr(_C, "philox_words_cuda")
    else:
        assert _backends.has_cpp_cuda() == _C.WITH_CUDA
        assert hasattr(_C, "philox_words_cuda") == _C.WITH_CUDA


def _nvcc_present() -> bool:
    # the rule setup.py builds by: CUDA sources when torch is a CUDA build and nvcc is found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    return bool((home and (Path(home) / "bin" / "nvcc").is_file()) or shutil.which("nvcc")
                or Path("/usr/local/cuda/bin/nvcc").is_file())


@pytest.mark.skipif(os.environ.get("RAST_KERNELS_NO_CUDA", "0") not in ("", "0"), reason="CUDA build disabled")
def test_cuda_built_when_toolkit_present():
    from rast_kernels import _C

    expected = bool(torch.version.cuda) and _nvcc_present()
    assert _C.WITH_CUDA == expected, f"WITH_CUDA={_C.WITH_CUDA}, expected {expected}: {_C.__build_info__}"


def test_cuda_philox_words_match_reference():
    from rast_kernels import _C
    from rast_kernels.ops.philox import random_words

    if not (_C.WITH_CUDA and torch.cuda.is_available()):
        pytest.skip("needs the CUDA build and a GPU")
    seeds = torch.tensor([0, 1, -1, 2**63 - 1, -(2**63), 123456789012345], dtype=torch.int64)
    offsets = torch.tensor([0, 2**32 - 1, 2**32, -1, 7, -(2**40) + 3], dtype=torch.int64)
    for n in (1, 5, 131, 152064):
        got = _C.philox_words_cuda(seeds.cuda(), offsets.cuda(), n)
        assert got.is_cuda and got.dtype == torch.int64 and got.shape == (6, n)
        assert torch.equal(got.cpu(), _C.philox_words_cpu(seeds, offsets, n))
        if n <= 131:
            assert torch.equal(got.cpu(), random_words(seeds, offsets, torch.arange(n)))
    with pytest.raises(ValueError, match="seed"):
        _C.philox_words_cuda(seeds, offsets.cuda(), 3)  # seed on the CPU
