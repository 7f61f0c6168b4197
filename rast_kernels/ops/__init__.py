"""Kernels: one module per op (paged attention: its one-token and multi-token forms), each with its PyTorch
reference beside it."""
from .decode_attention import decode_attention, decode_attention_reference
from .linear_rows import linear_rows, linear_rows_reference
from .paged_attention import (paged_decode_attention, paged_decode_attention_reference, paged_multi_token_attention,
                              paged_multi_token_attention_reference)
from .rast_sample import rast_sample
from .rast_sample_reference import rast_sample_reference
from .rms_norm import add_rms_norm, add_rms_norm_reference
from .rope_cache import rope_cache_write, rope_cache_write_reference
from .silu_mul import silu_mul, silu_mul_reference

__all__ = ["add_rms_norm", "add_rms_norm_reference", "decode_attention", "decode_attention_reference",
           "linear_rows", "linear_rows_reference",
           "paged_decode_attention", "paged_decode_attention_reference", "paged_multi_token_attention",
           "paged_multi_token_attention_reference",
           "rast_sample", "rast_sample_reference", "rope_cache_write", "rope_cache_write_reference", "silu_mul",
           "silu_mul_reference"]
