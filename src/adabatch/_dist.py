"""Whether torch.distributed is running, and this process's place in it: the one check that
the estimators, the integrations and the trainer share.

A build of torch without distributed support (``torch.distributed.is_available()`` False)
counts as one process: rank 0 of a world of 1.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor

_AVAILABLE = dist.is_available()


def initialized() -> bool:
    """Whether a torch.distributed process group is up (False in a build without it)."""
    return _AVAILABLE and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default group; 0 when none is up."""
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    """The number of processes in the default group; 1 when none is up."""
    return dist.get_world_size() if initialized() else 1


@torch.no_grad()
def average_gradients(params: Iterable[Tensor]) -> None:
    """Average p.grad over the processes of the default group with one flat all-reduce (what
    DDP does in buckets); nothing in one process. Parameters without a gradient are skipped
    (every process must have the same ones)."""
    world = world_size()
    if world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat.div_(world)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n
