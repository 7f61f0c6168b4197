"""rast_kernels: fused kernels and a decoding engine for RAST (arXiv 2506.15710)."""
__version__ = "0.1.0"

from .engine import GenerationOutput, RastEngine, rast_generate
from .ops import SamplingParams, decode_attention, decode_attention_reference, rast_sample, rast_sample_reference

__all__ = ["GenerationOutput", "RastEngine", "SamplingParams", "decode_attention", "decode_attention_reference",
           "rast_generate", "rast_sample", "rast_sample_reference", "__version__"]
