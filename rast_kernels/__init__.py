"""rast_kernels: fused kernels and a decoding engine for RAST (arXiv 2506.15710)."""
__version__ = "0.1.0"

from .engine import EngineConfig, GenerationOutput, RastEngine, SamplingParams, rast_generate
from .parallel import ParallelContext, generate_data_parallel, init_parallel
from .ops import (add_rms_norm, decode_attention, decode_attention_reference, rast_sample,
                  rast_sample_reference, rope_cache_write, silu_mul)

__all__ = ["EngineConfig", "GenerationOutput", "ParallelContext", "RastEngine", "SamplingParams", "add_rms_norm",
           "decode_attention", "decode_attention_reference", "generate_data_parallel", "init_parallel", "rast_generate",
           "rast_sample", "rast_sample_reference", "rope_cache_write", "silu_mul", "__version__"]
