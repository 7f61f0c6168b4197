"""rast_kernels: fused kernels and a decoding engine for RAST (arXiv 2506.15710)."""
__version__ = "0.1.0"

from .ops import SamplingParams, rast_sample, rast_sample_reference
from .engine import GenerationOutput, RastEngine, rast_generate

__all__ = ["GenerationOutput", "RastEngine", "SamplingParams", "rast_generate", "rast_sample",
           "rast_sample_reference", "__version__"]
