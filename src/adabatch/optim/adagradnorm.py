r"""AdaGrad-Norm: AdaGrad with one scalar step size (Ward, Wu, Bottou).

The algorithm of R. Ward, X. Wu, L. Bottou, "AdaGrad stepsizes: sharp convergence over
nonconvex landscapes" (ICML 2019; JMLR 21(219), 2020; arXiv:1806.01811), the form that the
AdAdaGrad paper (Lau, Liu, Kolar, arXiv:2402.11215) analyses as "AdaGrad-Norm"::

    input: x_0 (params), lr η > 0, b_0 > 0, weight decay λ >= 0
    for k = 1, 2, ...
        g_k   = ∇f(x_{k-1})                       (-∇f under maximize)
        g_k   = g_k + λ x_{k-1}                   (L2 weight decay; p.grad is not modified)
        b_k^2 = b_{k-1}^2 + ||g_k||^2             (ONE scalar; norm over all parameters)
        x_k   = x_{k-1} - η g_k / b_k

``b_k`` is updated *before* the step: the step of iteration k already divides by a ``b_k``
that includes ``||g_k||^2``, as in Ward et al.'s AdaGrad-Norm (in their notation
``b_{j+1}^2 = b_j^2 + ||G(x_j)||^2`` and then ``x_{j+1} = x_j - η G(x_j) / b_{j+1}``). Hence
``b_k >= b_0 > 0`` and the step length ``η ||g_k|| / b_k`` is always below ``η``.

Scalar, not per-row. The norm is over ALL parameters of the optimizer (every param group),
which is the method of the paper and of the AdAdaGrad analysis. ``per_group=True`` keeps one
accumulator per param group instead (the norm is then over that group's parameters). Note:
the class ``Adagradnorm`` released with the AdAdaGrad paper (github.com/timlautk/AdAdaGrad,
``adagradnorm.py``) keeps one accumulator per *output row/channel* of each weight (and per
element for biases), adds ``1e-10`` to ``b`` and treats weight decay differently; that is a
different method, and it is not this one.

Default ``b0 = 0.1``: Ward et al.'s guarantees hold for any ``b_0 > 0`` (a too small ``b_0``
is corrected automatically, since ``b_k`` grows with every step until ``η / b_k`` suits the
smoothness of the loss, which is the point of the method), and the AdAdaGrad release
initialises its accumulator to ``initial_accumulator_value = 1e-2 = b_0^2`` with
``lr = 1.0``; we take the same ``b_0 = 0.1`` and ``lr = 1.0``.

Where the accumulator lives: in ``optimizer.state[p]["sum_sq"]`` (a 0-dim tensor holding
``b_k^2``) of the *holder* parameter ``p``: the first parameter of the first param group that
shares the global accumulator (``per_group=False``), and the first parameter of each group with
``per_group=True``. It is therefore in ``state_dict()`` like any other state and created
eagerly (also before the first step). Other parameters have no state.

Precision: the accumulator and the update are computed in float32 for float16/bfloat16
parameters (the parameter is written back in place, never reallocated) and in the parameter's
own precision otherwise; the global accumulator uses the widest of those (float64 if any
parameter is float64). Complex parameters behave exactly like their ``torch.view_as_real``
(``||g||^2 = Σ |g_j|^2``). A gradient that is ``None`` counts as absent: that parameter does
not move and adds nothing to ``||g_k||^2``; a step where no parameter of a pool has a gradient
leaves that pool's ``b`` unchanged.

Non-finite gradients poison ``b`` for good (``b = inf`` or ``nan``); under mixed precision use
``torch.amp.GradScaler``, which skips such steps before they reach the optimizer.

``per_group`` is meant to be fixed for the life of the optimizer: changing it later makes
pools start from a fresh ``b0`` (or reuse an accumulator held by the same parameter).

Sharded parameters (FSDP2's ``fully_shard``: DTensors sharded on dim 0): every rank updates
its own shards in place and ``||g_k||^2`` is the sum of the ranks' local sums (one scalar
all-reduce per pool per step), so ``b`` is the same on every rank and the step equals the
unsharded one (tests/distributed/test_fsdp_train.py). A DTensor that is replicated or partial
on some mesh dimension is refused (its local sums would not add up to the norm).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer, ParamsT, _default_to_fused_or_foreach

from adabatch._validation import LOW_PRECISION

__all__ = ["AdaGradNorm", "adagradnorm"]


def _compute_dtype(p: Tensor) -> torch.dtype:
    """The real dtype in which the math for ``p`` is done."""
    if p.dtype in LOW_PRECISION:
        return torch.float32
    if p.is_complex():
        return p.real.dtype
    return p.dtype


def _pool_dtype(params: Iterable[Tensor]) -> torch.dtype:
    dtype = torch.float32
    for p in params:
        dtype = torch.promote_types(dtype, _compute_dtype(p))
    return dtype


def _check_b0(b0: float, dtype: torch.dtype) -> None:
    if float(torch.tensor(float(b0) ** 2, dtype=dtype)) <= 0.0:
        raise ValueError(f"Invalid b0 value: {b0} (b0**2 underflows to 0 in {dtype})")


def _validate(lr: Any, b0: Any, weight_decay: Any) -> None:
    if isinstance(lr, Tensor):
        raise TypeError("AdaGradNorm takes a float lr, not a Tensor")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr} (must be >= 0)")
    if not (0.0 < b0 < math.inf):
        raise ValueError(f"Invalid b0 value: {b0} (must be > 0 and finite)")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay} (must be >= 0)")


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _directions(
    params: list[Tensor], grads: list[Tensor], *, weight_decay: float, maximize: bool
) -> tuple[list[Tensor], list[Tensor], float]:
    """Real views of the params and the directions ``d`` to step along, and the sign.

    The update is ``p <- p + sign * (η / b) * d``. Without weight decay ``d`` is the gradient
    itself (no copy for float32/float64 parameters) and ``sign = +1`` under ``maximize``;
    with weight decay ``d = ±g + λ p`` (a new tensor) and ``sign = -1``.
    """
    reals = [_real(p) for p in params]
    dirs: list[Tensor] = []
    for p, g in zip(reals, grads):
        g = _real(g)
        dtype = _compute_dtype(p)
        if g.dtype != dtype:
            g = g.to(dtype)
        if weight_decay != 0:
            pd = p if p.dtype == dtype else p.to(dtype)
            g = (g.neg() if maximize else g).add(pd, alpha=weight_decay)
        dirs.append(g)
    sign = 1.0 if (maximize and weight_decay == 0) else -1.0
    return reals, dirs, sign


def _directions_foreach(
    params: list[Tensor], grads: list[Tensor], *, weight_decay: float, maximize: bool
) -> tuple[list[Tensor], list[Tensor], float]:
    """``_directions`` with ``torch._foreach_*`` ops, per (device, dtype) bucket."""
    reals: list[Tensor] = [torch.empty(0)] * len(params)
    dirs: list[Tensor] = [torch.empty(0)] * len(params)
    buckets = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads],  # type: ignore[list-item]
        with_indices=True,
    )
    for (b_params, b_grads), indices in buckets.values():
        b_params = [_real(p) for p in b_params]
        b_grads = [_real(g) for g in b_grads]
        dtype = _compute_dtype(b_params[0])
        if b_grads[0].dtype != dtype:
            b_grads = [g.to(dtype) for g in b_grads]
        if weight_decay != 0:
            pd = b_params if b_params[0].dtype == dtype else [p.to(dtype) for p in b_params]
            if maximize:
                b_grads = torch._foreach_neg(b_grads)
                torch._foreach_add_(b_grads, pd, alpha=weight_decay)
            else:
                b_grads = torch._foreach_add(b_grads, pd, alpha=weight_decay)
        for i, p, d in zip(indices, b_params, b_grads):
            reals[i] = p
            dirs[i] = d
    sign = 1.0 if (maximize and weight_decay == 0) else -1.0
    return reals, dirs, sign


def _sq_norm(
    dirs: list[Tensor], *, foreach: bool, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """``Σ_i ||d_i||^2`` as a 0-dim tensor of ``dtype`` on ``device``."""
    if foreach:
        # norms in the original order, so that the sum is the same as the for-loop's
        norms: list[Tensor] = [torch.empty(0)] * len(dirs)
        buckets = Optimizer._group_tensors_by_device_and_dtype(
            [dirs],  # type: ignore[list-item]
            with_indices=True,
        )
        for (b_dirs,), indices in buckets.values():
            for i, n in zip(indices, torch._foreach_norm(b_dirs, 2)):
                norms[i] = n
    else:
        norms = [torch.linalg.vector_norm(d) for d in dirs]
    norms = [n.to(device=device, dtype=dtype) for n in norms]
    return torch.stack(norms).square().sum()


def _apply(reals: list[Tensor], dirs: list[Tensor], scale: Tensor, *, foreach: bool) -> None:
    """``p <- p + scale * d`` in the compute dtype, written back into ``p`` in place."""
    if foreach:
        buckets = Optimizer._group_tensors_by_device_and_dtype([reals, dirs])  # type: ignore[list-item]
        for (b_params, b_dirs), _ in buckets.values():
            s = scale.to(device=b_dirs[0].device, dtype=b_dirs[0].dtype)
            if b_params[0].dtype == b_dirs[0].dtype:
                torch._foreach_addcmul_(b_params, b_dirs, [s] * len(b_params))
            else:
                work = [p.to(b_dirs[0].dtype) for p in b_params]
                torch._foreach_addcmul_(work, b_dirs, [s] * len(work))
                torch._foreach_copy_(b_params, work)
        return
    for p, d in zip(reals, dirs):
        s = scale.to(device=d.device, dtype=d.dtype)
        if p.dtype == d.dtype:
            p.addcmul_(d, s)
        else:
            p.copy_(p.to(d.dtype).addcmul_(d, s))


def _gather(group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
    params, grads = [], []
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError("AdaGradNorm does not support sparse gradients")
        params.append(p)
        grads.append(p.grad)
    return params, grads


def _local_shards(params: list[Tensor], grads: list[Tensor]
                  ) -> tuple[list[Tensor], list[Tensor], Any]:
    """The local shards of DTensor parameters and gradients (in-place views) and the process
    group whose ranks hold the other shards; the inputs and None when nothing is a DTensor."""
    dtensor = sys.modules.get("torch.distributed.tensor")  # no DTensor before its import
    if dtensor is None or not any(isinstance(p, dtensor.DTensor) for p in params):
        return params, grads, None
    mesh = None
    for p in params:
        placements = getattr(p, "placements", ())
        if not placements or not all(pl.is_shard() for pl in placements):
            raise ValueError(f"AdaGradNorm: DTensor parameters must be sharded on every mesh "
                             f"dimension (FSDP2 fully_shard); got placements {placements}")
        if mesh is None:
            mesh = p.device_mesh  # type: ignore[attr-defined]
        elif p.device_mesh != mesh:  # type: ignore[attr-defined]
            raise ValueError("AdaGradNorm: the DTensor parameters of a pool must share one "
                             "device mesh")
    assert mesh is not None and mesh.ndim == 1  # invariant: FSDP2 shards on a 1-D mesh
    return ([p.to_local() for p in params],  # type: ignore[attr-defined]
            [g.to_local() for g in grads], mesh.get_group())  # type: ignore[attr-defined]


def _use_foreach(foreach: bool | None, params: list[Tensor]) -> bool:
    if foreach is None:
        return _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)[1]
    return foreach


def adagradnorm(
    params: list[Tensor],
    grads: list[Tensor],
    sum_sq: Tensor,
    *,
    lr: float,
    weight_decay: float = 0.0,
    maximize: bool = False,
    foreach: bool | None = None,
) -> None:
    r"""Functional AdaGrad-Norm step for one pool of parameters sharing ``sum_sq`` (= b^2).

    ``sum_sq`` (a 0-dim floating tensor) is updated in place to ``b_k^2``, then every ``p``
    moves by ``-lr * g / b_k``. See the module docstring for the math.
    """
    if not params:
        return
    use_foreach = _use_foreach(foreach, params)
    direction_fn = _directions_foreach if use_foreach else _directions
    reals, dirs, sign = direction_fn(params, grads, weight_decay=weight_decay, maximize=maximize)
    sum_sq.add_(_sq_norm(dirs, foreach=use_foreach, dtype=sum_sq.dtype, device=sum_sq.device))
    scale = (sign * lr) / sum_sq.sqrt()
    _apply(reals, dirs, scale, foreach=use_foreach)


class AdaGradNorm(Optimizer):
    r"""AdaGrad-Norm (Ward, Wu, Bottou 2019/2020): one scalar adaptive step size.

    .. math::
        b_k^2 = b_{k-1}^2 + \|g_k\|^2, \qquad x_{k} = x_{k-1} - \eta\, g_k / b_k

    with the norm over all parameters of the optimizer (or per param group with
    ``per_group=True``), ``g_k`` including the L2 term ``λ x_{k-1}``. Details, the choice
    ``b0 = 0.1`` and where the accumulator is stored: see the module docstring.

    Args:
        params: parameters or param groups.
        lr: η (default 1.0, the step size of the analysis).
        b0: initial accumulator value b_0 > 0 (default 0.1); the state holds b^2.
        weight_decay: L2 penalty λ, added to the gradient before the norm (default 0).
        per_group: one accumulator per param group instead of one for all (default False).
        maximize: maximize the objective instead of minimizing it.
        foreach: use the ``torch._foreach_*`` path (None: torch's default for the device).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1.0,
        b0: float = 0.1,
        weight_decay: float = 0.0,
        *,
        per_group: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
    ) -> None:
        _validate(lr, b0, weight_decay)
        defaults = {
            "lr": lr,
            "b0": b0,
            "weight_decay": weight_decay,
            "per_group": per_group,
            "maximize": maximize,
            "foreach": foreach,
        }
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("b0", self.defaults.get("b0", 0.1))
            group.setdefault("weight_decay", 0.0)
            group.setdefault("per_group", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)

    # ---- pools: which groups share an accumulator, and which parameter holds it ----

    @staticmethod
    def _pools_of(groups: list[dict[str, Any]]) -> list[list[int]]:
        """Group indices per pool: first the shared pool (if any), then one per per-group group."""
        shared = [i for i, g in enumerate(groups) if not g.get("per_group", False)]
        pools = [shared] if shared else []
        pools += [[i] for i, g in enumerate(groups) if g.get("per_group", False)]
        return pools

    def _pools(self) -> list[tuple[Tensor, list[dict[str, Any]]]]:
        """(holder parameter, groups) per pool; pools without any parameter are skipped."""
        out = []
        for idx in self._pools_of(self.param_groups):
            groups = [self.param_groups[i] for i in idx]
            holder = next((p for g in groups for p in g["params"]), None)
            if holder is not None:
                out.append((holder, groups))
        return out

    def _accumulator(self, holder: Tensor, groups: list[dict[str, Any]]) -> Tensor:
        """The pool's b^2 tensor, created (b0^2) or promoted to the pool's dtype if needed."""
        dtype = _pool_dtype(p for g in groups for p in g["params"])
        state = self.state[holder]
        acc = state.get("sum_sq")
        if acc is None:
            b0 = groups[0]["b0"]
            _check_b0(b0, dtype)
            acc = torch.full((), float(b0) ** 2, dtype=dtype, device=holder.device)
            state["sum_sq"] = acc
        elif acc.dtype != dtype or acc.device != holder.device:
            acc = acc.to(device=holder.device, dtype=dtype)
            state["sum_sq"] = acc
        return acc

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict):  # a group's own values are checked like the defaults
            _validate(*(param_group.get(k, self.defaults[k]) for k in ("lr", "b0", "weight_decay")))
        super().add_param_group(param_group)
        # Create accumulators eagerly so that state_dict() holds them before the first step.
        for holder, groups in self._pools():
            self._accumulator(holder, groups)

    # ---- the step ----

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """Perform one optimization step (optionally re-evaluating the loss with ``closure``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for holder, groups in self._pools():
            acc = self._accumulator(holder, groups)
            work = []
            total: Tensor | None = None
            shard_group = None
            for group in groups:
                params, grads = _gather(group)
                if not params:
                    continue
                params, grads, shard_group = _local_shards(params, grads)
                use_foreach = _use_foreach(group["foreach"], params)
                direction_fn = _directions_foreach if use_foreach else _directions
                reals, dirs, sign = direction_fn(
                    params, grads, weight_decay=group["weight_decay"], maximize=group["maximize"]
                )
                sq = _sq_norm(dirs, foreach=use_foreach, dtype=acc.dtype, device=acc.device)
                total = sq if total is None else total + sq
                work.append((group, reals, dirs, sign, use_foreach))
            if total is None:
                continue  # no gradient in this pool: b stays as it is
            if shard_group is not None:  # the ranks' sums over their shards
                import torch.distributed as dist

                dist.all_reduce(total, group=shard_group)
            acc.add_(total)
            b = acc.sqrt()
            for group, reals, dirs, sign, use_foreach in work:
                scale = (sign * group["lr"]) / b
                _apply(reals, dirs, scale, foreach=use_foreach)
        return loss

    # ---- state_dict ----

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict; the b^2 accumulators keep their precision (float32 for bf16 params).

        Raises ``ValueError`` (before changing anything) when the state_dict has state but no
        AdaGrad-Norm accumulator, e.g. one saved by another optimizer.
        """
        saved_groups = state_dict.get("param_groups")
        saved_state = state_dict.get("state")
        if not isinstance(saved_groups, list) or not isinstance(saved_state, dict):
            raise ValueError("AdaGradNorm state_dict must have 'state' and 'param_groups'")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                "loaded state dict has a different number of parameter groups "
                f"({len(saved_groups)}) than this optimizer ({len(self.param_groups)})"
            )
        holders: list[Any] = []  # saved index of each pool's holder
        for idx in self._pools_of(saved_groups):
            ids = [pid for i in idx for pid in saved_groups[i]["params"]]
            if ids:
                holders.append(ids[0])
        if saved_state:
            missing = [h for h in holders if "sum_sq" not in saved_state.get(h, {})]
            if missing:
                raise ValueError(
                    "state_dict is not an AdaGradNorm state_dict: no accumulator 'sum_sq' "
                    f"(b^2) in the state of parameter(s) {missing}; it has state keys "
                    f"{sorted({k for s in saved_state.values() for k in s})}"
                )
        saved_acc = {h: saved_state[h]["sum_sq"] for h in holders if h in saved_state}
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter's dtype; restore the accumulators' own
        # precision (float32 for float16/bfloat16 parameters), and never alias the caller's dict.
        id_to_param = {
            pid: p
            for saved, group in zip(saved_groups, self.param_groups)
            for pid, p in zip(saved["params"], group["params"])
        }
        for h, value in saved_acc.items():
            p = id_to_param[h]
            self.state[p]["sum_sq"] = torch.as_tensor(value).detach().to(p.device, copy=True)
        for holder, groups in self._pools():
            self._accumulator(holder, groups)
