"""GradientStats: what an adaptive batch-size test needs, measured once per step.

At step k, with per-sample gradients g_1..g_b at the same parameters x_k and their mean
ḡ = (1/b) Σ_i g_i (the gradient the optimizer steps with):

- ``grad_sq_norm``     G = ‖ḡ‖²
- ``variance_trace``   V = (1/(b-1)) Σ_i ‖g_i − ḡ‖² = (Σ_i ‖g_i‖² − b·G)/(b−1)
- ``coord_variance``   v_j = (1/(b-1)) Σ_i (g_ij − ḡ_j)², one tensor per parameter
- ``ip_variance``      W = (1/(b-1)) Σ_i (⟨g_i, ḡ⟩ − G)², the inner product taken over the
  whole parameter vector (all tensors together), not per tensor
- ``orth_variance``    O = (1/(b-1)) Σ_i ‖g_i − (⟨g_i,ḡ⟩/G)·ḡ‖²
- ``mean_grad``        ḡ, one tensor per parameter

Every variance is on the scale of *one sample's* gradient. An estimator that measures the
variance of means of m samples (the micro-batch estimator) multiplies by m, so the tests can
always compare V/b with η²G, whatever the estimator.

Fields that were not requested (see :data:`STAT_NAMES` and the tests' ``needs``) are None.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

#: An in-place SUM all-reduce across processes (it may also return the reduced tensor).
Reduce = Callable[[Tensor], "Tensor | None"]

#: The float dtypes that the estimators reduce in their own type, a squared norm being one
#: dot product; lower precisions are reduced in float32.
WIDE_FLOATS = (torch.float32, torch.float64)

#: Names of the statistics a test can ask for.
STAT_NAMES: frozenset[str] = frozenset(
    {"grad_sq_norm", "variance_trace", "coord_variance", "ip_variance", "orth_variance",
     "mean_grad"}
)


def check_needs(needs: frozenset[str] | set[str] | tuple[str, ...] | list[str]) -> frozenset[str]:
    """Validate a set of statistic names and return it as a frozenset."""
    needs = frozenset(needs)
    unknown = needs - STAT_NAMES
    if unknown:
        raise ValueError(
            f"unknown statistics {sorted(unknown)}; choose from {sorted(STAT_NAMES)}"
        )
    return needs


@dataclass
class GradientStats:
    """Gradient statistics of one step's batch (see the module docstring for definitions).

    Attributes:
        batch_size: b, the number of samples the mean gradient is over.
        grad_sq_norm: G = ‖ḡ‖².
        variance_trace: V, trace of the per-sample gradient covariance.
        coord_variance: v_j per coordinate, one tensor per parameter (same shapes).
        ip_variance: W, variance of ⟨g_i, ḡ⟩.
        orth_variance: O, variance of the part of g_i orthogonal to ḡ.
        mean_grad: ḡ, one tensor per parameter.
    """

    batch_size: int
    grad_sq_norm: float | None = None
    variance_trace: float | None = None
    coord_variance: list[Tensor] | None = None
    ip_variance: float | None = None
    orth_variance: float | None = None
    mean_grad: list[Tensor] | None = field(default=None, repr=False)

    def is_finite(self) -> bool:
        """True when every present statistic is finite (tensors: every element)."""
        for name in ("grad_sq_norm", "variance_trace", "ip_variance", "orth_variance"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                return False
        for name in ("coord_variance", "mean_grad"):
            tensors = getattr(self, name)
            if tensors is not None and not all(bool(torch.isfinite(t).all()) for t in tensors):
                return False
        return True


def stats_from_sums(
    needs: frozenset[str],
    flat: Tensor,
    grad_sq_norm: Tensor,
    coord_sums: list[Tensor] | None,
    mean_grad: list[Tensor],
    reduce: Reduce | None = None,
) -> GradientStats:
    """Finish an estimator's step: partial sums -> :class:`GradientStats`.

    Both estimators reduce their measurements to sums over K independent units u (samples for
    the per-sample estimator, micro-batches for the micro-batch one), each unit's gradient
    g_u rescaled to one sample's variance and weighted by its size w_u (1 for samples):

    ``flat = [N, K, S, s1, s2]`` (float64, one device) with N the samples, S = Σ_u w_u‖g_u‖²,
    s1 = Σ_u w_u⟨g_u, ḡ⟩, s2 = Σ_u w_u⟨g_u, ḡ⟩², and ``coord_sums`` = Σ_u w_u g_u² per
    parameter. Then, with G = ‖ḡ‖² and K - 1 in the denominators (unbiased):
    V = (S − N·G)/(K−1), W = (s2 − 2G·s1 + N·G²)/(K−1), O = (S − s2/G)/(K−1),
    v_j = (coord_j − N·ḡ_j²)/(K−1), each clamped at 0 against rounding.

    With ``reduce`` (torch.distributed), ``flat`` is summed across processes in one small
    reduction and ``coord_sums`` in one model-sized reduction; ḡ (and so G) is already the
    global mean. K < 2 or a non-finite sample count gives NaN variances, which the tests read
    as "cannot decide". The only device-to-host transfer is one ``tolist()``.
    """
    if reduce is not None:
        flat = _reduced(reduce, flat)
        if coord_sums is not None:
            cat = _reduced(reduce, torch.cat([c.reshape(-1).double() for c in coord_sums]))
            coord_sums = [t.view_as(c).to(c.dtype) for t, c in
                          zip(cat.split([c.numel() for c in coord_sums]), coord_sums)]
    N, K, S, s1, s2, G = torch.cat(
        [flat.reshape(-1), grad_sq_norm.reshape(1).to(flat)]).tolist()
    return finish_stats(needs, N, K, S, s1, s2, G, coord_sums, mean_grad)


def finish_stats(needs: frozenset[str], N: float, K: float, S: float, s1: float, s2: float,
                 G: float, coord_sums: list[Tensor] | None,
                 mean_grad: list[Tensor], coord_scale: float = 1.0,
                 in_place: bool = False) -> GradientStats:
    """The formulas of :func:`stats_from_sums` on sums already reduced to Python floats;
    the coordinate sums are ``coord_scale * coord_sums``, not modified unless ``in_place``
    (then they become the coordinate variances: no model-sized allocation)."""
    finite = math.isfinite(N) and math.isfinite(K)
    stats = GradientStats(batch_size=round(N) if finite else 0, grad_sq_norm=G)
    ok = finite and K >= 2
    denom = K - 1.0
    nan = math.nan
    if "variance_trace" in needs:
        stats.variance_trace = max((S - N * G) / denom, 0.0) if ok else nan
    if "ip_variance" in needs:
        stats.ip_variance = max((s2 - 2.0 * G * s1 + N * G * G) / denom, 0.0) if ok else nan
    if "orth_variance" in needs:
        stats.orth_variance = max((S - s2 / G) / denom, 0.0) if ok and G > 0 else nan
    if coord_sums is not None:
        if not ok:
            stats.coord_variance = [torch.full_like(c, nan) for c in coord_sums]
        elif all(c.dtype == g.dtype and c.device == g.device
                 for c, g in zip(coord_sums, mean_grad)):
            # (scale·C_j − N·ḡ_j²)/(K − 1), clamped at 0: three multi-tensor passes
            if in_place:
                out = coord_sums
                torch._foreach_mul_(out, coord_scale / denom)
            else:
                out = torch._foreach_mul(coord_sums, coord_scale / denom)
            torch._foreach_addcmul_(out, mean_grad, mean_grad, value=-N / denom)
            torch._foreach_clamp_min_(out, 0.0)
            stats.coord_variance = list(out)
        else:
            stats.coord_variance = [
                ((c * coord_scale - N * g.to(c.dtype).square()) / denom).clamp_min_(0)
                for c, g in zip(coord_sums, mean_grad)]
    if "mean_grad" in needs:
        stats.mean_grad = mean_grad
    return stats


def stats_from_parts(needs: frozenset[str], mean_grad: list[Tensor], *, n: int, units: int,
                     sq_groups: list[tuple[int, list[Tensor]]], squared: bool,
                     ip_sums: tuple[Tensor, Tensor] | None, coord_sums: list[Tensor] | None,
                     reduce: Reduce | None, in_place: bool = False) -> GradientStats:
    """The end of both estimators' ``stats()``: their partial sums (0-dim tensors on the
    gradients' device) -> :class:`GradientStats`, with one read-back (or one reduction).

    ``n`` samples in ``units`` units (K of :func:`stats_from_sums`); ḡ = ``mean_grad``.
    S = n² Σ_g (Σ_{t ∈ g} t)/w_g over the groups ``(w_g, parts_g)`` of ``sq_groups`` (each
    part t squared first unless ``squared``); ``ip_sums`` = (s1, s2) or None (no inner
    products: 0); ``coord_sums`` are scaled by n² (in place with ``in_place``, see
    :func:`finish_stats`). Without ``reduce`` the sums are read back at once and reduced on
    the host (``math.fsum``); with it they stay on the device until :func:`stats_from_sums`.
    """
    vals = sq_norm_parts(mean_grad)
    k = len(vals)
    for _, parts in sq_groups:
        vals.extend(parts)
    if ip_sums is not None:
        vals += list(ip_sums)
    if reduce is None:
        v = read_f64(vals)
        G = math.fsum(v[:k])
        S, pos = 0.0, k
        for w, parts in sq_groups:
            part = v[pos:pos + len(parts)]
            S += (math.fsum(part) if squared else math.fsum(x * x for x in part)) / w
            pos += len(parts)
        s1, s2 = (v[-2], v[-1]) if ip_sums is not None else (0.0, 0.0)
        return finish_stats(needs, float(n), float(units), S * n**2, s1, s2, G, coord_sums,
                            mean_grad, coord_scale=float(n**2), in_place=in_place)
    # distributed: the partial sums stay on the device until the one reduced read-back
    stacked = stack_f64(vals)
    dev = stacked.device
    parts = stacked[k:k + sum(len(ps) for _, ps in sq_groups)]
    if not squared:
        parts = parts.square()
    if any(w != 1 for w, _ in sq_groups):
        parts = parts * torch.tensor([1.0 / w for w, ps in sq_groups for _ in ps],
                                     dtype=torch.float64, device=dev)
    zero = stacked.new_zeros(())
    flat = torch.stack([
        torch.tensor(float(n), dtype=torch.float64, device=dev),
        torch.tensor(float(units), dtype=torch.float64, device=dev),
        parts.sum() * n**2,
        stacked[-2] if ip_sums is not None else zero,
        stacked[-1] if ip_sums is not None else zero])
    if coord_sums is not None:  # each process scales by its own N before the sum
        coord_sums = torch._foreach_mul(coord_sums, float(n**2))
    return stats_from_sums(needs, flat, stacked[:k].sum(), coord_sums, mean_grad, reduce)


def sq_norm(t: Tensor) -> Tensor:
    """‖t‖² as a 0-dim tensor (float32 or wider, on t's device), without temporaries: one dot
    product for a float32/float64 tensor (a BLAS dot, the fastest on CPU), else the norm in
    float32."""
    if t.dtype in WIDE_FLOATS:
        flat = t if t.dim() == 1 else t.reshape(-1)
        return torch.dot(flat, flat)
    return torch.linalg.vector_norm(t, dtype=torch.float32).square()


def sq_norm_parts(tensors: list[Tensor]) -> list[Tensor]:
    """:func:`sq_norm` of each tensor."""
    return [sq_norm(t) for t in tensors]


def _reduced(reduce: Reduce, flat: Tensor) -> Tensor:
    out = reduce(flat)
    return flat if out is None else out


def stack_f64(parts: list[Tensor]) -> Tensor:
    """0-dim tensors of float dtypes (on one device) as one float64 vector, in order.

    ``torch.stack`` of mixed dtypes promotes element by element, about 4x slower than a
    stack per dtype on CPU (40 us against 10 us for 14 scalars), so runs of one dtype are
    stacked and converted together."""
    runs: list[list[Tensor]] = [[parts[0]]]
    for t in parts[1:]:
        if t.dtype == runs[-1][-1].dtype:
            runs[-1].append(t)
        else:
            runs.append([t])
    out = [torch.stack(r).to(torch.float64) for r in runs]
    return out[0] if len(out) == 1 else torch.cat(out)


def plain_grad(g: Tensor) -> Tensor:
    """A gradient as the estimators read it: dense (a sparse one densified) and without
    autograd history (one of ``backward(create_graph=True)`` detached); any other gradient
    is returned itself, without a new tensor object (this runs in the hooks, per tensor)."""
    if g.layout is not torch.strided:
        return g.to_dense()
    return g.detach() if g.requires_grad else g


def mean_grads(params: list[Tensor]) -> list[Tensor]:
    """ḡ of each parameter, read from p.grad (:func:`plain_grad`; zeros where it is None)."""
    return [torch.zeros_like(p) if p.grad is None else plain_grad(p.grad) for p in params]


def read_f64(parts: list[Tensor]) -> list[float]:
    """The values of 0-dim float tensors (on one device) as Python floats, in order: one
    device-to-host copy (:func:`stack_f64`), or on CPU ``item()`` each, which skips the stack
    (2.5 us against 19 us for 9 scalars)."""
    if parts[0].is_cpu:
        return [t.item() for t in parts]
    return stack_f64(parts).tolist()


def shard_groups(tensors: list[Tensor] | None) -> list[Any] | None:
    """None for plain tensors; for DTensors sharded by FSDP2 (the statistics of
    :class:`~adabatch.batching.MicroBatchStats` under ``fully_shard``), the process groups
    of the mesh dimensions they are sharded over (a sum over these groups counts every
    coordinate once)."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # no DTensor before its import
    if not tensors or dtensor is None or not isinstance(tensors[0], dtensor.DTensor):
        return None
    from torch.distributed.tensor import Shard

    first = tensors[0]
    mesh = first.device_mesh
    return [mesh.get_group(d) for d, p in enumerate(first.placements) if isinstance(p, Shard)]


def reduce_over_shards(local: list[Tensor] | None, groups: list[Any], how: str,
                       device: torch.device | str = "cpu") -> float | None:
    """The max (``how="max"``) or the mean (``"mean"``) of the values of all ranks, each rank
    holding ``local`` (None: a non-finite statistic on this rank), without gathering them:
    one SUM all-reduce of [non-finite ranks, count, sum] and one MAX all-reduce of the local
    maximum per group (on ``device``: the one the groups' backend needs). The same float (or
    None: some rank non-finite, or no value at all) on every rank; every rank must call it."""
    import torch.distributed as dist

    f64 = {"dtype": torch.float64, "device": device}
    flat = torch.cat([t.reshape(-1) for t in local]).to(**f64) if local else torch.zeros(0, **f64)
    zero = flat.new_zeros(())
    sums = torch.stack([zero + float(local is None), zero + flat.numel(),
                        flat.sum() if flat.numel() else zero])
    top = (flat.max() if flat.numel() else zero - math.inf).reshape(1)
    for group in groups:
        dist.all_reduce(sums, group=group)
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    bad, count, total = sums.tolist()
    if bad > 0 or count == 0:
        return None
    return float(top) if how == "max" else total / count
