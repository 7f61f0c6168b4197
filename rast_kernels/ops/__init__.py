"""Kernels: one op per module, each with its PyTorch reference beside it."""
from .rast_sample import SamplingParams, rast_sample
from .rast_sample_reference import rast_sample_reference

__all__ = ["SamplingParams", "rast_sample", "rast_sample_reference"]
