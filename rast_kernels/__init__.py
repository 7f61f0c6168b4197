"""rast_kernels: fused kernels and a decoding engine for RAST (arXiv 2506.15710)."""
__version__ = "0.1.0"

from .ops import SamplingParams, rast_sample, rast_sample_reference

__all__ = ["SamplingParams", "rast_sample", "rast_sample_reference", "__version__"]
