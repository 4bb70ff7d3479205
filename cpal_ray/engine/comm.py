"""The two collective calls the training loop needs, as no-ops in a single process.

``torch.distributed`` is initialised by Ray Train (gloo on CPU, nccl on GPU) and not at all by
``fit_local``; the loop calls these either way and gets the same answers for one process.
"""
from __future__ import annotations

import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if is_distributed():
        dist.barrier()


def all_gather_object(obj) -> list:
    """[obj of rank 0, obj of rank 1, …]; ``[obj]`` in one process."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
