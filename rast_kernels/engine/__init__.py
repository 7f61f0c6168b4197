"""The three-model lockstep decoding engine and ``rast_generate``."""
from .api import clear_engine_cache, get_engine, rast_generate
from .engine import RastEngine, row_seed
from .outputs import GenerationOutput

__all__ = ["GenerationOutput", "RastEngine", "clear_engine_cache", "get_engine", "rast_generate", "row_seed"]
