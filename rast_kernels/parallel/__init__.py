"""Scale-out on ``torch.distributed`` (launched by ``torchrun``): process groups (:mod:`.groups`) and data
parallelism over them (:mod:`.data_parallel`)."""
from .data_parallel import generate_data_parallel, share
from .groups import (ParallelContext, barrier, broadcast_object, current, gather_objects, init_parallel, launched,
                     shutdown)

__all__ = ["ParallelContext", "barrier", "broadcast_object", "current", "gather_objects", "generate_data_parallel",
           "init_parallel", "launched", "share", "shutdown"]
