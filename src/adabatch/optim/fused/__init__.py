"""The fused AdaBelief: one pass over memory per parameter, on CPU (C++) and on CUDA (Triton).

This is the ``fused=True`` path of :class:`adabatch.optim.AdaBelief`. The modules:

- :mod:`~adabatch.optim.fused.common`: what both devices share (state dtypes, the cache
  folder, the input checks and the :class:`~adabatch.optim.fused.common.PlanCache` that keeps
  a checked step's plan between steps; the optimizer owns one per parameter group);
- :mod:`~adabatch.optim.fused.cpu`: the C++ kernel (``csrc/adabelief_fused.cpp``), its build
  and loader, and the CPU step; the module docstring has the math;
- :mod:`~adabatch.optim.fused.cuda`: the Triton kernel and the CUDA step.

Both kernel modules import only :mod:`~adabatch.optim.fused.common`; this module dispatches by
device and imports the CUDA module (and Triton) only when a CUDA device asks.
``python -m adabatch.optim.fused`` builds the CPU kernel ahead of time.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from adabatch.optim.fused import cpu
from adabatch.optim.fused.common import PlanCache, check_lengths

__all__ = ["PlanCache", "build", "fused_adabelief", "fused_available", "is_built", "kernel_path"]


def kernel_path() -> Path:
    """Where the cached build of the CPU kernel lives (it may not exist yet)."""
    return cpu.kernel_path()


def is_built() -> bool:
    """True when the CPU kernel is loaded in this process or its cached build can be loaded."""
    return cpu.is_built()


def build(device: torch.device | str = "cpu") -> Path:
    """Build the kernel for ``device`` now (or load the cached build); return its path.

    CPU: the C++ library (raises :class:`RuntimeError` when no C++ compiler is available or
    the build fails). CUDA: compiles the Triton kernel and returns its marker file (see
    :func:`adabatch.optim.fused.cuda.build`).
    """
    device = torch.device(device)
    if device.type == "cuda":
        from adabatch.optim.fused import cuda

        return cuda.build(device)
    if device.type != "cpu":
        raise RuntimeError(f"the fused AdaBelief has no kernel for device {device}")
    return cpu.build()


def fused_available(device: torch.device | str) -> bool:
    """Whether the fused kernel can run on ``device`` right now without compiling anything.

    CPU: once the kernel is loaded or its cached build exists (see :func:`build`). CUDA: once
    Triton imports and the kernel was compiled on this machine (``build("cuda")`` or an
    earlier ``fused=True`` step). False for other devices. This is what
    ``AdaBelief(fused=None)`` consults.
    """
    device = torch.device(device)
    if device.type == "cuda":
        from adabatch.optim.fused import cuda

        return cuda.available(device)
    if device.type != "cpu":
        return False
    return cpu.is_built()


def fused_adabelief(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_vars: list[Tensor],
    max_exp_avg_vars: list[Tensor],
    state_steps: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    weight_decouple: bool,
    fixed_decay: bool,
    rectify: bool,
    degenerated_to_sgd: bool,
    maximize: bool,
    capturable: bool,
    differentiable: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    plans: PlanCache | None = None,
    isa: int = -1,
) -> None:
    """One fused AdaBelief step over parallel lists (the core signature of
    :func:`adabatch.optim.adabelief.adabelief`), dispatched by the device of ``params[0]``.

    ``state_steps`` are float32 scalar tensors, incremented here. ``capturable`` has no
    meaning on CPU and is accepted; ``differentiable=True`` is not supported. ``plans``: the
    caller's :class:`PlanCache` (checks run once while nothing changes; without one, every
    step checks). ``isa`` (CPU; tests and benchmarks): -1 best available, 0 baseline, 1 AVX2.
    """
    if differentiable:
        raise RuntimeError("AdaBelief(fused=True) does not support differentiable=True")
    check_lengths(params, grads, exp_avgs, exp_avg_vars, max_exp_avg_vars, state_steps, amsgrad)
    if not params:
        return
    hyper = dict(
        beta1=beta1, beta2=beta2, lr=lr, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
        weight_decouple=weight_decouple, fixed_decay=fixed_decay, rectify=rectify,
        degenerated_to_sgd=degenerated_to_sgd, maximize=maximize, grad_scale=grad_scale,
        found_inf=found_inf, plans=plans,
    )  # fmt: skip
    lists = (params, grads, exp_avgs, exp_avg_vars, max_exp_avg_vars, state_steps)
    if params[0].device.type == "cuda":
        from adabatch.optim.fused import cuda

        cuda.step(*lists, **hyper)  # type: ignore[arg-type]
        return
    cpu.step(*lists, **hyper, isa=isa)  # type: ignore[arg-type]
