"""Scale-out on ``torch.distributed`` (launched by ``torchrun``): process groups (:mod:`.groups`) and data
parallelism over them (:mod:`.data_parallel`)."""
from .groups import (ParallelContext, barrier, broadcast_object, current, gather_objects, init_parallel, launched,
                     shutdown)

__all__ = ["ParallelContext", "barrier", "broadcast_object", "current", "gather_objects", "init_parallel",
           "launched", "shutdown"]
