"""Kernels: one op per module, each with its PyTorch reference beside it."""
from .decode_attention import decode_attention, decode_attention_reference
from .rast_sample import SamplingParams, rast_sample
from .rast_sample_reference import rast_sample_reference

__all__ = ["SamplingParams", "decode_attention", "decode_attention_reference", "rast_sample", "rast_sample_reference"]
