r"""AdaGrad as in the AdAdaGrad paper: ``torch.optim.Adagrad`` configured, not rewritten.

The coordinate-wise AdaGrad of Duchi, Hazan, Singer (JMLR 2011) in the form of Lau, Liu,
Kolar, "AdAdaGrad: Adaptive Batch Size Schemes for Adaptive Gradient Methods"
(arXiv:2402.11215)::

    input: x_0, lr η > 0, b_0 > 0, weight decay λ >= 0
    for k = 1, 2, ...
        g_k        = ∇f(x_{k-1}) + λ x_{k-1}        (-∇f under maximize; p.grad not modified)
        b_{k,j}^2  = b_{k-1,j}^2 + g_{k,j}^2        (every coordinate j; b_k includes g_k)
        x_{k,j}    = x_{k-1,j} - η g_{k,j} / b_{k,j}

``torch.optim.Adagrad(lr=η, lr_decay=0, eps=0, initial_accumulator_value=b_0**2)`` is exactly
this. Reading ``torch/optim/adagrad.py`` (torch 2.13): its state ``sum`` starts at
``initial_accumulator_value`` (complex parameters: ``complex(v, v)``, i.e. ``v`` in both real
parts of ``view_as_real``); each step adds ``g*g`` to ``sum`` *before* the update, and the
update is ``p.addcdiv_(g, sqrt(sum) + eps, value=-lr / (1 + (step-1) * lr_decay))``; with
``eps = 0`` and ``lr_decay = 0`` that is ``p - lr * g / b`` with ``b = sqrt(sum)``. The foreach
path computes the same thing (as ``p + (-lr * g) / b``, so it can differ in the last bit),
the fused path too. The tests prove the equivalence against a float64 reference loop for
the for-loop, foreach and fused paths.

Why ``b0 > 0`` is required: with ``eps = 0`` the denominator is ``sqrt(sum)`` alone, so a
coordinate whose gradients have all been exactly 0 so far (a dead ReLU unit, an unused
embedding row, a zero-initialised bias of an unused output) computes ``0 / 0 = nan`` and
destroys the parameter. ``b0 > 0`` keeps ``sum >= b0^2 > 0``. ``b0^2`` must also be
representable in the parameter dtype (torch keeps ``sum`` in the parameter's dtype), which is
checked.

Default ``b0 = 1e-10``: the AdAdaGrad experiments run ``torch.optim.Adagrad`` with its
defaults (``initial_accumulator_value = 0``, ``eps = 1e-10``), whose first step is
``lr * sign(g)``; ``b0 = 1e-10`` reproduces that behaviour (``sqrt(sum + 1e-20)`` instead of
``sqrt(sum) + 1e-10``) in the exact form of the analysis. For float16 parameters
``b0**2 = 1e-20`` underflows: pass ``b0 >= 3e-4`` there (the factory says so).

Known limitation of torch's class: for float16/bfloat16 parameters the accumulator ``sum`` is
kept in the parameter's dtype (no float32 state). Use float32 master weights (autocast) for
coordinate-wise AdaGrad.
"""

from __future__ import annotations

import math

import torch
from torch.optim.optimizer import ParamsT

__all__ = ["adagrad"]


def _as_list(params: object) -> list:
    return [params] if isinstance(params, torch.Tensor) else list(params)  # type: ignore[call-overload]


def _unname(items: list) -> list[torch.Tensor]:
    """Tensors of a list of parameters or of (name, parameter) pairs."""
    return [x[1] if isinstance(x, tuple) else x for x in items]


def adagrad(
    params: ParamsT,
    lr: float = 1e-2,
    b0: float = 1e-10,
    weight_decay: float = 0.0,
    *,
    maximize: bool = False,
    foreach: bool | None = None,
    fused: bool | None = None,
) -> torch.optim.Adagrad:
    """The AdAdaGrad paper's AdaGrad: ``torch.optim.Adagrad`` with ``eps=0``, ``lr_decay=0``.

    Args:
        params: parameters or param groups.
        lr: η (default 1e-2, torch's default).
        b0: initial per-coordinate accumulator b_0 > 0 (default 1e-10); torch's
            ``initial_accumulator_value`` is ``b0**2``.
        weight_decay: L2 penalty λ added to the gradient (default 0).
        maximize: maximize the objective.
        foreach, fused: passed to ``torch.optim.Adagrad``.

    Returns:
        a ``torch.optim.Adagrad`` (so checkpoints, schedulers and ``GradScaler`` treat it as
        torch's class).
    """
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr} (must be >= 0)")
    if not (0.0 < b0 < math.inf):
        raise ValueError(
            f"Invalid b0 value: {b0} (must be > 0 and finite: with eps=0 a coordinate "
            "whose gradients are all 0 would compute 0/0)"
        )
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay} (must be >= 0)")
    # torch.optim.Adagrad consumes ``params`` once; materialise it to check the dtypes first.
    groups = [{**g, "params": _as_list(g["params"])} if isinstance(g, dict) else g for g in params]
    tensors = [
        t for g in groups for t in (_unname(g["params"]) if isinstance(g, dict) else _unname([g]))
    ]
    init = float(b0) ** 2
    for dtype in {p.dtype for p in tensors}:
        real = dtype.to_real() if dtype.is_complex else dtype
        if real.is_floating_point and float(torch.tensor(init, dtype=real)) <= 0.0:
            raise ValueError(f"Invalid b0 value: {b0} (b0**2 underflows to 0 in {real})")
    return torch.optim.Adagrad(
        groups,
        lr=lr,
        lr_decay=0.0,
        weight_decay=weight_decay,
        initial_accumulator_value=init,
        eps=0.0,
        foreach=foreach,
        maximize=maximize,
        fused=fused,
    )
