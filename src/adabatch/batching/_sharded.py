"""FSDP2 (``torch.distributed.fsdp.fully_shard``) support shared by both estimators.

Under FSDP2 every parameter is a DTensor sharded on dim 0 and p.grad is this rank's shard of
the mean gradient over the ranks. Both estimators measure each rank's own samples or
micro-batches on whole layers (the hooks run while the layer is unsharded), so their partial
sums combine as under DDP, except for what reads ḡ:

- G = ‖ḡ‖² = Σ_r ‖ḡ|shard_r‖²: each rank's shard norms travel in the one all-reduce of
  the scalar sums, ``[N, K, S, s1, s2, G]`` (48 bytes);
- the coordinate sums C_j (whole layers, this rank's samples) are reduce-scattered, so each
  rank gets its own shard of Σ_r C_j and computes v_j there (:func:`reduce_scatter`);
- the inner products ⟨g_u, ḡ⟩ need ḡ across a layer: it is gathered one parameter tensor at
  a time, once per measured step (:func:`all_gather`).

``coord_variance`` and ``mean_grad`` come back as DTensors placed like the parameters. The
two collectives are module-level functions so that tests/distributed/_fsdp2_stats_worker.py
can count their bytes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import Tensor, nn

from adabatch.batching.stats import (
    GradientStats,
    Reduce,
    finish_stats,
    sq_norm_parts,
    stack_f64,
)


def is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (without importing torch.distributed.tensor)."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # no DTensor before its import
    return dtensor is not None and isinstance(t, dtensor.DTensor)


def sharded_params(params: list[Tensor], where: str) -> bool:
    """True when the parameters are DTensors sharded by FSDP2 (one Shard placement on a 1-D
    mesh), False when none is a DTensor; a mix, or another placement, raises: with HSDP's
    replicated mesh dimension the sums over all ranks would count each shard several times,
    and tensor parallelism splits a layer's computation, not its samples."""
    flags = [is_dtensor(p) for p in params]
    if any(flags) and not all(flags):
        raise ValueError(f"{where}: some parameters are DTensors and some are not; pass the "
                         f"module that fully_shard wrapped")
    if not (flags and all(flags)):
        return False
    from torch.distributed.tensor import Shard

    for p in params:
        placements = tuple(p.placements)  # type: ignore[attr-defined]
        if len(placements) != 1 or not isinstance(placements[0], Shard):
            raise ValueError(f"{where}: a parameter is placed {placements} on a "
                             f"{len(placements)}-D mesh; only fully_shard on a 1-D mesh "
                             f"(a Shard placement) is supported (not HSDP's 2-D mesh, not "
                             f"tensor parallelism)")
    return True


def unsharded_params(model: nn.Module, params: list[Tensor], where: str) -> list[Tensor]:
    """The unsharded Parameter objects (aligned with the sharded ``params``) that FSDP2 swaps
    into the modules for forward and backward (persistent: FSDP2 reuses them)."""
    from torch.distributed.fsdp import FSDPModule

    names = {id(p): name for name, p in model.named_parameters()}
    if any(id(p) not in names for p in params):
        raise ValueError(f"{where}: a parameter is not one of the module's")
    fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not fsdp:
        raise ValueError(f"{where}: the module has DTensor parameters but no FSDP module")
    for m in fsdp:  # FSDP2 swaps its (persistent) unsharded parameters in
        m.unshard()
    try:
        out = [model.get_parameter(names[id(p)]) for p in params]
    finally:
        for m in fsdp:
            m.reshard()
    if any(q is p or is_dtensor(q) for q, p in zip(out, params)):
        raise ValueError(f"{where}: a DTensor parameter is not sharded by fully_shard alone "
                         f"(tensor parallelism is not supported)")
    return out


def local_shard(p: Tensor) -> Tensor:
    """This rank's shard of p.grad (zeros shaped like the parameter's shard without one)."""
    g = p.grad
    if g is None:
        return torch.zeros_like(p.to_local())  # type: ignore[attr-defined]
    return g.detach().to_local()  # type: ignore[attr-defined]


def whole_grad(p: Tensor) -> Tensor:
    """The whole ḡ of one parameter, gathered from the shards of p.grad (one all-gather;
    every rank must call it for the same parameters in the same order)."""
    g = p.grad
    if g is None:
        return torch.zeros(p.shape, dtype=p.dtype, device=p.device)
    return all_gather(g.detach())


def reduce_scatter(full: Tensor, like: Tensor) -> Tensor:
    """This rank's shard (placed as ``like``) of the sum over ranks of ``full``."""
    from torch.distributed.tensor import DTensor, Partial

    mesh = like.device_mesh  # type: ignore[attr-defined]
    partial = DTensor.from_local(full, mesh, [Partial()] * mesh.ndim, run_check=False)
    return partial.redistribute(mesh, like.placements).to_local()  # type: ignore[attr-defined]


def all_gather(shard: Tensor) -> Tensor:
    """The whole tensor of a DTensor sharded by FSDP2 (one all-gather)."""
    return shard.full_tensor()  # type: ignore[attr-defined]


def like_dtensor(local: Tensor, like: Tensor) -> Tensor:
    """``local`` (this rank's shard) as a DTensor placed like the parameter ``like``."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, like.device_mesh, like.placements,  # type: ignore[attr-defined]
                              run_check=False, shape=like.shape, stride=like.stride())


def finish_sharded(needs: frozenset[str], params: list[Tensor], gbar: list[Tensor], *,
                   n: int, units: int, S: Tensor, s1: Tensor | None, s2: Tensor | None,
                   coords: list[Tensor] | None, reduce: Reduce,
                   check: Callable[[float, float], None] | None = None) -> GradientStats:
    """The end of ``stats()`` under FSDP2: this rank's partial sums (``n`` samples in
    ``units`` units, S = Σ_u w_u‖g_u‖², s1, s2; ``coords`` = Σ_u w_u g_u²/n² over whole
    parameters, scaled here by n² in place) and shards ``gbar`` of ḡ -> the statistics.
    One all-reduce of [N, K, S, s1, s2, G]; ``check(N, K)`` then runs on the reduced counts
    (the same on every rank); one reduce-scatter per coordinate tensor."""
    parts = sq_norm_parts(gbar)
    stacked = stack_f64([*parts, S.reshape(()), *(x.reshape(()) for x in (s1, s2)
                                                 if x is not None)])
    k = len(parts)
    f64 = {"dtype": torch.float64, "device": stacked.device}
    zero = stacked.new_zeros(())
    flat = torch.stack([torch.tensor(float(n), **f64), torch.tensor(float(units), **f64),
                        stacked[k], stacked[k + 1] if s1 is not None else zero,
                        stacked[k + 2] if s2 is not None else zero, stacked[:k].sum()])
    out = reduce(flat)
    N, K, S_all, s1_all, s2_all, G = (flat if out is None else out).tolist()
    if check is not None:
        check(N, K)
    scattered = None
    if coords is not None:
        scattered = [reduce_scatter(c.mul_(float(n * n)), p) for c, p in zip(coords, params)]
    stats = finish_stats(needs, N, K, S_all, s1_all, s2_all, G, scattered, gbar,
                         in_place=True)
    if stats.coord_variance is not None:
        stats.coord_variance = [like_dtensor(v, p)
                                for v, p in zip(stats.coord_variance, params)]
    if stats.mean_grad is not None:
        stats.mean_grad = [like_dtensor(g, p) for g, p in zip(gbar, params)]
    return stats
