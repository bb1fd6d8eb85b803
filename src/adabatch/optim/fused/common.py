"""What the CPU and the CUDA fused AdaBelief share: dtypes, the cache folder, the checks and
the plan that lets a step skip them while nothing has changed.

This module imports neither kernel module; both import it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["STATE_DTYPE", "Plan", "PlanCache", "check_lengths", "default_cache_root", "prepare"]

STATE_DTYPE = {
    torch.float32: torch.float32,
    torch.float64: torch.float64,
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
}
"""Parameter dtype -> dtype of its state (and of the arithmetic)."""

CACHE_FOLDER = "adabatch_adabelief_fused"
"""The folder under the torch extensions directory that holds the builds and markers."""


def default_cache_root() -> Path:
    """``$TORCH_EXTENSIONS_DIR``, else torch's default extensions directory."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    try:  # what torch.utils.cpp_extension.get_default_build_root() returns, without its import
        return Path(os.path.realpath(torch._appdirs.user_cache_dir(appname="torch_extensions")))
    except Exception:  # pragma: no cover - private helper moved
        from torch.utils.cpp_extension import get_default_build_root

        return Path(get_default_build_root())


def check_lengths(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_vars: list[Tensor],
    max_exp_avg_vars: list[Tensor],
    state_steps: list[Tensor],
    amsgrad: bool,
) -> None:
    """Raise ValueError when the parallel lists differ in length."""
    n = len(params)
    lengths = {len(grads), len(exp_avgs), len(exp_avg_vars), len(state_steps)}
    if lengths != {n} or (amsgrad and len(max_exp_avg_vars) != n):
        raise ValueError("fused AdaBelief: the parameter, grad and state lists differ in length")


def _check_parameter(tensors: list[Tensor], step: Tensor, device: torch.device) -> None:
    """The checks of one parameter's ``[p, g, m, s(, smax)]`` and its step counter."""
    p, g = tensors[0], tensors[1]
    dtype = p.dtype
    state_dtype = STATE_DTYPE.get(dtype)
    if state_dtype is None:
        raise RuntimeError(f"fused AdaBelief does not support parameters of dtype {dtype}")
    for t in tensors:
        if t.device.type not in ("cpu", "cuda"):
            raise RuntimeError(
                "fused AdaBelief runs on CPU and CUDA tensors only; got a tensor on "
                f"{t.device} (use fused=False or fused=None there)"
            )
        if t.device != device:
            raise RuntimeError(
                f"fused AdaBelief: all tensors of a step must be on one device; got "
                f"{t.device} and {device} (make one parameter group per device)"
            )
    if g.dtype != dtype or g.shape != p.shape:
        raise RuntimeError("fused AdaBelief: a grad differs from its parameter in dtype/shape")
    for t in tensors[2:]:
        if t.dtype != state_dtype or t.shape != p.shape:
            raise RuntimeError(
                f"fused AdaBelief: state of a {dtype} parameter must be {state_dtype} "
                f"with the parameter's shape; got {t.dtype} {tuple(t.shape)}"
            )
    if step.dtype != torch.float32 or step.device != device or step.numel() != 1:
        raise RuntimeError(f"fused AdaBelief: state_steps must be float32 scalars on {device}")


def _contiguous(tensors: list[Tensor], copies: list[tuple[Tensor, Tensor]]) -> list[Tensor]:
    """``tensors`` with contiguous working copies where needed; the copies of written tensors
    (all but the grad, index 1) are appended to ``copies`` as ``(original, copy)``."""
    out = []
    for j, t in enumerate(tensors):
        if t.is_contiguous():
            out.append(t)
        else:
            c = t.contiguous()
            out.append(c)
            if j != 1:  # the grad is only read
                copies.append((t, c))
    return out


def prepare(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_vars: list[Tensor],
    max_exp_avg_vars: list[Tensor],
    state_steps: list[Tensor],
    amsgrad: bool,
) -> tuple[list[list[Tensor]], list[tuple[Tensor, Tensor]], dict[torch.dtype, list[int]]]:
    """Check devices, dtypes, shapes and layouts before anything changes.

    Every tensor (the step counters too) must be on the device of ``params[0]``, a CPU or
    CUDA device. Returns, per parameter, its tensors ``[p, g, m, s(, smax)]`` (contiguous
    working copies where the originals are not), the ``(original, copy)`` pairs to write back
    after the step, and the parameter indices grouped by dtype.
    """
    device = params[0].device
    groups: dict[torch.dtype, list[int]] = {}
    copies: list[tuple[Tensor, Tensor]] = []
    work: list[list[Tensor]] = []
    for i, p in enumerate(params):
        tensors = [p, grads[i], exp_avgs[i], exp_avg_vars[i]]
        if amsgrad:
            tensors.append(max_exp_avg_vars[i])
        _check_parameter(tensors, state_steps[i], device)
        if not all(t.is_contiguous() for t in tensors):
            tensors = _contiguous(tensors, copies)
        groups.setdefault(p.dtype, []).append(i)
        work.append(tensors)
    return work, copies, groups


_data_ptr = Tensor.data_ptr


class Plan:
    """What a checked step learned about its tensors, reused while nothing has changed.

    On small models (and on CUDA, where the kernel is fast) the checks of :func:`prepare`
    cost more host time than the kernel. A plan holds while the parameters keep their device,
    addresses, shapes and dtypes, the states and step counters their addresses, and the
    gradients have the parameters' shapes and dtypes, are contiguous and on the same device
    (checked at every step, a few attribute reads per tensor). ``backend`` keeps what the
    kernels derive from the addresses (pointer arrays, device tables) between steps.
    """

    __slots__ = ("backend", "device_index", "dtypes", "groups", "key", "shapes", "state_ptrs")

    def __init__(
        self,
        key: tuple[torch.device, bool, tuple[int, ...]],
        state_ptrs: tuple[tuple[int, ...], ...],
        params: list[Tensor],
        groups: dict[torch.dtype, list[int]],
    ) -> None:
        self.key = key
        self.state_ptrs = state_ptrs
        self.shapes = [p.shape for p in params]
        self.dtypes = [p.dtype for p in params]
        self.device_index = params[0].get_device()
        self.groups = groups
        self.backend: dict[Any, Any] = {}

    def holds_for(self, params: list[Tensor], grads: list[Tensor]) -> bool:
        dev = self.device_index
        for p, g, shape, dtype in zip(params, grads, self.shapes, self.dtypes):
            if (
                p.shape != shape
                or p.dtype != dtype
                or g.shape != shape
                or g.dtype != dtype
                or not g.is_contiguous()
                or g.get_device() != dev
            ):
                return False
        return True


class PlanCache:
    """The plan of one parameter group's fused steps; owned by the optimizer (one per group).

    :meth:`lookup` returns the kept plan while it holds, else checks the tensors and keeps a
    new plan. A fresh ``PlanCache()`` per call (the functional API without one) checks every
    step.
    """

    __slots__ = ("plan",)

    def __init__(self) -> None:
        self.plan: Plan | None = None

    def lookup(
        self,
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_vars: list[Tensor],
        max_exp_avg_vars: list[Tensor],
        state_steps: list[Tensor],
        amsgrad: bool,
    ) -> tuple[
        Plan | None,
        list[list[Tensor]] | None,
        list[tuple[Tensor, Tensor]],
        dict[torch.dtype, list[int]],
    ]:
        """``(plan, None, [], groups)`` when the step can run on the original tensors;
        ``(None, work, copies, groups)`` from :func:`prepare` when some tensor is not
        contiguous. Bad input raises before anything changes, as in :func:`prepare`."""
        key = (params[0].device, amsgrad, tuple(map(_data_ptr, params)))
        state = (
            tuple(map(_data_ptr, exp_avgs)),
            tuple(map(_data_ptr, exp_avg_vars)),
            tuple(map(_data_ptr, max_exp_avg_vars)) if amsgrad else (),
            tuple(map(_data_ptr, state_steps)),
        )
        plan = self.plan
        if (
            plan is not None
            and plan.key == key
            and plan.state_ptrs == state
            and plan.holds_for(params, grads)
        ):
            return plan, None, [], plan.groups
        work, copies, groups = prepare(
            params, grads, exp_avgs, exp_avg_vars, max_exp_avg_vars, state_steps, amsgrad
        )
        if copies or any(w[1] is not g for w, g in zip(work, grads)):
            return None, work, copies, groups  # working copies: nothing to keep
        self.plan = Plan(key, state, params, groups)
        return self.plan, None, [], groups
