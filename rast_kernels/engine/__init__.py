"""The lockstep decoding engine (paged KV, continuous batching, speculative rounds) and ``rast_generate``."""
from ..ops.philox import mix_seed
from .api import clear_engine_cache, get_engine, rast_generate
from .config import EngineConfig, add_engine_arguments
from .engine import RastEngine
from .outputs import GenerationOutput
from .sampling_params import SamplingParams, sample_seed

__all__ = ["EngineConfig", "GenerationOutput", "RastEngine", "SamplingParams", "add_engine_arguments",
           "clear_engine_cache", "get_engine", "mix_seed", "rast_generate", "sample_seed"]
