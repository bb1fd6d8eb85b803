r"""Fused AdaBelief step on CUDA: one Triton kernel launch for all parameters of a dtype.

This is the CUDA side of ``AdaBelief(fused=True)``; :mod:`adabatch.optim.fused` dispatches
CUDA tensors here and CPU tensors to the C++ kernel of :mod:`adabatch.optim.fused.cpu`. The
arithmetic is the same, element by element and in the same order (see that module's
docstring for the math): each
element reads :math:`p, g, m, s` (and :math:`s^{max}` under amsgrad) once and writes
:math:`p, m, s` (and :math:`s^{max}`) once, the memory traffic of torch's
``Adam(fused=True)``.

How one step runs
-----------------
- The step counters (float32 scalars on the parameters' device) are incremented by one
  ``torch._foreach_add_``; with a ``found_inf`` the increment is taken back by a
  ``torch._foreach_sub_`` of ``found_inf``, as torch's fused Adam does. Nothing is read back
  to the host: the step never synchronises with the device.
- Three int64 tables on the device describe the launch. The static table holds, per tensor,
  the addresses of :math:`p, m, s, s^{max}` and of the step counter and the element count;
  the block table maps each program to (tensor, first element). Both are built once and
  reused while the tensors keep their addresses (in the caller's
  :class:`adabatch.optim.fused.common.PlanCache`, one per parameter group). The per-step
  table holds the hyperparameters (the bits of float64 values) and the gradients' addresses;
  it is copied to the device only when it differs from the previous step's (a learning-rate
  schedule, or new gradient tensors).
- One launch per (device, dtype): each program handles ``BLOCK`` elements of one tensor. It
  computes the step's scalars from its tensor's counter in float64 (the bias corrections
  :math:`1-\beta^t` as :math:`1 - 2^{t \log_2 \beta}`, :math:`\log_2\beta` from the host;
  the RAdam rectification term; the grad scale), rounds them to the state dtype and runs the
  element-wise update. Division and square root are IEEE round-to-nearest (``div_rn``,
  ``sqrt_rn``) for float32, as in torch's CUDA kernels.

Precision is the CPU kernel's: float32 and float64 parameters keep state of their own dtype;
float16 and bfloat16 parameters keep float32 state, the math runs in float32 and the parameter
is rounded to nearest-even once (bfloat16 by hand on the bits, as the CPU kernel does, since
Triton's interpreter would truncate). The CUDA compiler may contract a multiply and an add into one
fused multiply-add, so results agree with the CPU kernel to rounding, not bit for bit.

Compilation and cache
---------------------
Triton compiles the kernel on its first launch for each combination of dtype and flags (about
a second each; Triton caches the result on disk, under ``~/.triton/cache``, so later
processes load it). :func:`build` compiles the default float32 variant and leaves a marker
file beside the CPU kernel's cache; :func:`available` (what ``AdaBelief(fused=None)`` asks)
is True only once that marker exists, so a user who never asks for ``fused`` never pays a
compilation. Without Triton (``pip install triton``), ``fused=True`` on CUDA raises a
:class:`RuntimeError` and ``fused=None`` uses foreach.

Limits: the step does not work inside CUDA graph capture (the tables are copied from the
host at every step; use ``capturable=True`` with foreach there), a learning rate given as a
CUDA tensor is read back once per step, and ``differentiable=True`` is not supported.

Tests run this kernel on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``, set
by ``tests/conftest.py`` when no GPU is present), so its logic is checked on every CI run.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from adabatch.optim.fused.common import (
    CACHE_FOLDER,
    STATE_DTYPE,
    PlanCache,
    check_lengths,
    default_cache_root,
)

try:  # Triton is optional: it comes with torch's CUDA wheels on Linux
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None

__all__ = [
    "BLOCK",
    "NUM_WARPS",
    "available",
    "build",
    "compile_seconds",
    "fused_adabelief_cuda",
    "step",
    "triton_available",
]

BLOCK = 1024
"""Elements per program (and per block of the launch)."""

NUM_WARPS = 4
"""Warps per program."""
_HEADER = 10  # float64 hyperparameters at the head of the per-step table, then the grads
_ROW = 6  # int64s per tensor in the static table: p, m, s, smax, step, numel

_NO_TRITON = (
    "AdaBelief(fused=True) on CUDA needs Triton (pip install triton); use fused=None "
    "(foreach) instead"
)


def triton_available() -> bool:
    """Whether Triton imports in this environment."""
    return triton is not None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if triton is not None:
    _TL_DTYPE: dict[torch.dtype, Any] = {
        torch.float32: tl.float32,
        torch.float64: tl.float64,
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
    }

    @triton.jit
    def _hyper(meta, k):
        return tl.load(meta + k).to(tl.float64, bitcast=True)

    @triton.jit
    def _div(a, b, F64: tl.constexpr):
        if F64:
            return a / b
        else:
            return tl.div_rn(a, b)

    @triton.jit
    def _sqrt(a, F64: tl.constexpr):
        if F64:
            return tl.sqrt(a)
        else:
            return tl.sqrt_rn(a)

    @triton.jit
    def _round_to(x, P: tl.constexpr):
        """float32/float64 ``x`` to the parameter dtype ``P``, rounding to nearest even.

        bfloat16 is rounded by hand on the float32 bits (as the CPU kernel does): the
        hardware conversion rounds to nearest even too, but Triton's interpreter truncates.
        """
        if P == tl.bfloat16:
            u = x.to(tl.uint32, bitcast=True)
            rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
            nan = (u >> 16) | 0x40
            bits = tl.where((u & 0x7FFFFFFF) > 0x7F800000, nan, rounded)
            return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(P)

    @triton.jit
    def _adabelief_kernel(
        table,
        meta,
        blocks,
        scale_ptr,
        found_ptr,
        P: tl.constexpr,
        S: tl.constexpr,
        AMSGRAD: tl.constexpr,
        RECTIFY: tl.constexpr,
        SGD: tl.constexpr,
        L2: tl.constexpr,
        HAS_SCALE: tl.constexpr,
        HAS_FOUND: tl.constexpr,
        F64: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        ti = tl.load(blocks + 2 * pid)
        start = tl.load(blocks + 2 * pid + 1)
        row = table + 6 * ti  # _ROW
        p_ptr = tl.load(row).to(tl.pointer_type(P))
        m_ptr = tl.load(row + 1).to(tl.pointer_type(S))
        s_ptr = tl.load(row + 2).to(tl.pointer_type(S))
        step_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
        numel = tl.load(row + 5)
        g_ptr = tl.load(meta + 10 + ti).to(tl.pointer_type(P))  # after the _HEADER

        # the step's scalars, in float64 (as the CPU kernel computes them)
        beta1 = _hyper(meta, 0)
        beta2 = _hyper(meta, 1)
        lr = _hyper(meta, 2)
        eps = _hyper(meta, 3)
        wd = _hyper(meta, 4)
        decay = _hyper(meta, 5)
        gmul = _hyper(meta, 6)  # -1 under maximize, else 1
        log2_beta1 = _hyper(meta, 7)
        log2_beta2 = _hyper(meta, 8)
        rho_inf = _hyper(meta, 9)
        if HAS_SCALE:
            gmul = gmul / tl.load(scale_ptr).to(tl.float64)
        t = tl.load(step_ptr).to(tl.float64)
        bc1 = 1.0 - tl.exp2(t * log2_beta1)
        beta2_t = tl.exp2(t * log2_beta2)
        bc2 = 1.0 - beta2_t
        if RECTIFY:
            rho_t = rho_inf - 2.0 * t * beta2_t / bc2
            adaptive = rho_t >= 5.0
            ratio = bc2 * (rho_t - 4.0) / (rho_inf - 4.0) * (rho_t - 2.0) / rho_t
            ratio = ratio * rho_inf / (rho_inf - 2.0)
            rect = tl.sqrt(tl.where(adaptive, ratio, 1.0)) / bc1 * lr
            if SGD:
                step = tl.where(adaptive, rect, 1.0 / bc1 * lr)
            else:
                step = tl.where(adaptive, rect, 0.0)
            dmul = tl.full((), 1.0, tl.float64)
        else:
            step = lr / bc1
            dmul = 1.0 / tl.sqrt(bc2)

        c_gmul = gmul.to(S)
        c_wd = wd.to(S)
        c_decay = decay.to(S)
        c_b1 = beta1.to(S)
        c_omb1 = (1.0 - beta1).to(S)
        c_b2 = beta2.to(S)
        c_omb2 = (1.0 - beta2).to(S)
        c_eps = eps.to(S)
        c_dmul = dmul.to(S)
        c_step = step.to(S)

        if HAS_FOUND:  # a non-finite gradient somewhere: write nothing
            numel = tl.where(tl.load(found_ptr) == 0.0, numel, 0)
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < numel
        x = tl.load(p_ptr + offs, mask=mask, other=0.0).to(S)
        gr = tl.load(g_ptr + offs, mask=mask, other=0.0).to(S) * c_gmul
        if L2:
            gr = gr + c_wd * x
        x = x * c_decay
        mi = c_b1 * tl.load(m_ptr + offs, mask=mask, other=0.0) + c_omb1 * gr
        r = gr - mi
        si = (c_b2 * tl.load(s_ptr + offs, mask=mask, other=0.0) + c_omb2 * (r * r)) + c_eps
        tl.store(m_ptr + offs, mi, mask=mask)
        tl.store(s_ptr + offs, si, mask=mask)
        vi = si
        if AMSGRAD:
            v_ptr = tl.load(row + 3).to(tl.pointer_type(S))
            old = tl.load(v_ptr + offs, mask=mask, other=0.0)
            vi = tl.where(old >= si, old, si)  # a NaN in s propagates
            tl.store(v_ptr + offs, vi, mask=mask)
        upd = _div(mi, _sqrt(vi, F64) * c_dmul + c_eps, F64)
        if RECTIFY:
            if SGD:
                upd = tl.where(adaptive, upd, mi)
                x = x - c_step * upd
            else:
                x = tl.where(adaptive, x - c_step * upd, x)
        else:
            x = x - c_step * upd
        tl.store(p_ptr + offs, _round_to(x, P), mask=mask)


# ---------------------------------------------------------------------------- tables
def _block_map(numels: list[int], device: torch.device, block: int) -> Tensor:
    """[programs, 2] int64 on ``device``: (tensor index, first element) per program."""
    counts = torch.tensor([(n + block - 1) // block for n in numels], dtype=torch.int64)
    total = int(counts.sum())
    tensor_idx = torch.repeat_interleave(torch.arange(len(numels)), counts)
    first_block = torch.cumsum(counts, 0) - counts
    within = torch.arange(total, dtype=torch.int64) - first_block[tensor_idx]
    return torch.stack([tensor_idx, within * block], dim=1).contiguous().to(device)


def _log2(beta: float) -> float:
    return math.log2(beta) if beta > 0 else -math.inf


def _header(
    beta1: float,
    beta2: float,
    lr: float,
    eps: float,
    weight_decay: float,
    weight_decouple: bool,
    fixed_decay: bool,
    maximize: bool,
) -> list[float]:
    decay = 1.0
    if weight_decouple:
        decay = 1.0 - weight_decay if fixed_decay else 1.0 - lr * weight_decay
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    return [
        beta1,
        beta2,
        lr,
        eps,
        weight_decay,
        decay,
        -1.0 if maximize else 1.0,
        _log2(beta1),
        _log2(beta2),
        rho_inf,
    ]


# ---------------------------------------------------------------------------- compile marker
_lock = threading.Lock()
# Seconds of the first launch of each kernel variant in this process. Process-wide, like
# Triton's in-memory cache of compiled kernels that it describes; keyed by the variant tuple
# of fused_adabelief_cuda (dtype, then flags and launch shape).
_compile_seconds: dict[tuple[Any, ...], float] = {}


def _marker() -> Path:
    key = hashlib.sha256(Path(__file__).read_bytes())
    key.update(str(getattr(triton, "__version__", "none")).encode())
    return default_cache_root() / CACHE_FOLDER / f"triton_{key.hexdigest()[:16]}.ok"


def available(device: torch.device | str) -> bool:
    """True on a CUDA device when Triton imports and :func:`build` (or an earlier
    ``fused=True`` step) has compiled the kernel on this machine; never compiles."""
    device = torch.device(device)
    if device.type != "cuda" or triton is None or not torch.cuda.is_available():
        return False
    return _marker().is_file()


def compile_seconds() -> dict[str, float]:
    """Seconds the first launch of each variant took in this process (compile included)."""
    names = ("amsgrad", "rectify", "sgd", "l2", "no_scale", "no_found_inf", "block", "warps")
    return {
        f"{str(key[0]).removeprefix('torch.')} "
        + " ".join(f"{n}={v}" for n, v in zip(names, key[1:])): seconds
        for key, seconds in _compile_seconds.items()
    }


def build(device: torch.device | str = "cuda") -> Path:
    """Compile (or load from Triton's cache) the default float32 variant on ``device``.

    Leaves the marker that :func:`available` looks for and returns its path. Raises
    :class:`RuntimeError` without Triton or without a CUDA device.
    """
    device = torch.device(device)
    if triton is None:
        raise RuntimeError(_NO_TRITON)
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RuntimeError(f"the CUDA fused AdaBelief needs a CUDA device, not {device}")
    p = torch.zeros(1, device=device)
    state = [torch.zeros(1, device=device) for _ in range(2)]
    step = torch.zeros((), device=device)
    fused_adabelief_cuda(
        [p], [torch.ones_like(p)], [state[0]], [state[1]], [], [step],
        beta1=0.9, beta2=0.999, lr=1e-3, eps=1e-16, weight_decay=0.0, amsgrad=False,
        weight_decouple=True, fixed_decay=False, rectify=True, degenerated_to_sgd=True,
        maximize=False,
    )  # fmt: skip
    torch.cuda.synchronize(device)
    marker = _marker()
    with _lock:
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(f"triton {triton.__version__}\n")
        os.replace(tmp, marker)
    return marker


# ---------------------------------------------------------------------------- the step
def _scaler_scalars(
    grad_scale: Tensor | None, found_inf: Tensor | None, device: torch.device
) -> tuple[Tensor | None, Tensor | None]:
    """float32 0-dim copies of ``grad_scale`` and ``found_inf`` (checked: one element each,
    on ``device``)."""
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is not None and (t.device != device or t.numel() != 1):
            raise RuntimeError(f"fused AdaBelief: {name} must be a one-element tensor on {device}")
    scale32 = grad_scale.detach().reshape(()).to(torch.float32) if grad_scale is not None else None
    found32 = found_inf.detach().reshape(()).to(torch.float32) if found_inf is not None else None
    return scale32, found32


def _check_launch_device(device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "the CUDA fused AdaBelief cannot be captured in a CUDA graph (its tables are "
            "copied from the host at each step); use foreach=True with capturable=True"
        )
    if device.type != "cuda" and not _interpreting():
        raise RuntimeError(f"the CUDA fused AdaBelief got tensors on {device}")


def _meta_table(
    last: list[Any], header: list[float], grads: list[Tensor], idx: list[int], device: torch.device
) -> Tensor:
    """The per-step table (hyperparameters, then the grads' addresses) on ``device``; copied
    only when it differs from the previous step's (kept in ``last``: [bytes, tensor])."""
    packed = struct.pack(f"<{_HEADER}d{len(idx)}q", *header, *[grads[i].data_ptr() for i in idx])
    if last[0] != packed:
        last[0], last[1] = packed, torch.frombuffer(bytearray(packed), dtype=torch.int64).to(device)
    return last[1]


def _launch(
    tables: tuple[Tensor, Tensor, Tensor],
    dtype: torch.dtype,
    scale32: Tensor | None,
    found32: Tensor | None,
    flags: tuple[bool, bool, bool, bool],
    block: int,
) -> None:
    """One kernel launch over ``tables`` (static, block map, per-step); the first launch of a
    variant is timed (compilation included) into ``_compile_seconds``."""
    table, blocks, meta = tables
    amsgrad, rectify, sgd, l2 = flags
    device = table.device
    on_cuda = device.type == "cuda"
    variant = (dtype, amsgrad, rectify, sgd, l2, scale32 is None, found32 is None, block,
               NUM_WARPS)  # fmt: skip
    first = variant not in _compile_seconds
    start = time.perf_counter() if first else 0.0
    switch = on_cuda and torch.cuda.current_device() != device.index
    with torch.cuda.device(device) if switch else _nullcontext():
        _adabelief_kernel[(blocks.shape[0],)](
            table,
            meta,
            blocks,
            scale32 if scale32 is not None else meta,
            found32 if found32 is not None else meta,
            P=_TL_DTYPE[dtype],
            S=_TL_DTYPE[STATE_DTYPE[dtype]],
            AMSGRAD=amsgrad,
            RECTIFY=rectify,
            SGD=sgd,
            L2=l2,
            HAS_SCALE=scale32 is not None,
            HAS_FOUND=found32 is not None,
            F64=dtype == torch.float64,
            BLOCK=block,
            num_warps=NUM_WARPS,
        )
    if first:
        if on_cuda:
            torch.cuda.synchronize(device)
        _compile_seconds[variant] = time.perf_counter() - start


def fused_adabelief_cuda(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_vars: list[Tensor],
    max_exp_avg_vars: list[Tensor],
    state_steps: list[Tensor],
    *,
    beta1: float, beta2: float, lr: float | Tensor, eps: float, weight_decay: float,
    amsgrad: bool, weight_decouple: bool, fixed_decay: bool, rectify: bool,
    degenerated_to_sgd: bool, maximize: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    block: int | None = None,
    groups: dict[torch.dtype, list[int]] | None = None,
    cache: dict[Any, Any] | None = None,
) -> None:  # fmt: skip
    """One fused step over parallel lists of same-device, contiguous tensors, checked by the
    caller (:func:`step`). CUDA tensors normally; CPU tensors only under Triton's interpreter
    (the tests).

    ``groups`` (dtype -> indices) saves the grouping; ``cache`` is a dict that keeps the
    static tables between calls, valid only while the parameters, states and counters keep
    their addresses (the caller's plan makes sure of that). ``block``: elements per program
    (default :data:`BLOCK`).
    """
    if triton is None:
        raise RuntimeError(_NO_TRITON)
    if not params:
        return
    block = BLOCK if block is None else block
    device = params[0].device
    _check_launch_device(device)
    scale32, found32 = _scaler_scalars(grad_scale, found_inf, device)
    torch._foreach_add_(state_steps, 1.0)
    header = _header(
        beta1, beta2, float(lr), eps, weight_decay, weight_decouple, fixed_decay, maximize
    )
    if groups is None:
        groups = {}
        for i, p in enumerate(params):
            groups.setdefault(p.dtype, []).append(i)
    cache = {} if cache is None else cache
    flags = (amsgrad, rectify, degenerated_to_sgd, not weight_decouple and weight_decay != 0)
    for dtype, idx in groups.items():
        static = cache.get((dtype, block))
        if static is None:
            static = cache[(dtype, block)] = _static_tables(
                params, exp_avgs, exp_avg_vars, max_exp_avg_vars, state_steps, idx, amsgrad,
                device, block,
            )  # fmt: skip
        table, blocks, last = static
        if blocks.shape[0] == 0:
            continue
        meta = _meta_table(last, header, grads, idx, device)
        _launch((table, blocks, meta), dtype, scale32, found32, flags, block)
    if found32 is not None:
        torch._foreach_sub_(state_steps, [found32] * len(params))


def step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_vars: list[Tensor],
    max_exp_avg_vars: list[Tensor],
    state_steps: list[Tensor],
    *,
    amsgrad: bool,
    plans: PlanCache | None = None,
    **kwargs: Any,
) -> None:
    """One checked fused step (the checks of :mod:`adabatch.optim.fused.common`, kept in
    ``plans`` between steps), then :func:`fused_adabelief_cuda`. ``kwargs``: the
    hyperparameters and flags of :func:`fused_adabelief_cuda`."""
    check_lengths(params, grads, exp_avgs, exp_avg_vars, max_exp_avg_vars, state_steps, amsgrad)
    if not params:
        return
    plan, work, copies, groups = (plans if plans is not None else PlanCache()).lookup(
        params, grads, exp_avgs, exp_avg_vars, max_exp_avg_vars, state_steps, amsgrad
    )
    if plan is not None:
        fused_adabelief_cuda(
            params, grads, exp_avgs, exp_avg_vars, max_exp_avg_vars, state_steps,
            amsgrad=amsgrad, groups=groups, cache=plan.backend, **kwargs,
        )  # fmt: skip
        return
    assert work is not None
    cols = [[w[k] for w in work] for k in range(5 if amsgrad else 4)]
    fused_adabelief_cuda(
        cols[0], cols[1], cols[2], cols[3], cols[4] if amsgrad else [], state_steps,
        amsgrad=amsgrad, groups=groups, **kwargs,
    )  # fmt: skip
    for original, c in copies:
        original.copy_(c)


def _static_tables(
    params: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_vars: list[Tensor],
    max_exp_avg_vars: list[Tensor],
    state_steps: list[Tensor],
    idx: list[int],
    amsgrad: bool,
    device: torch.device,
    block: int,
) -> tuple[Tensor, Tensor, list[Any]]:
    """(static table, block table, [bytes, tensor] of the last per-step table) for ``idx``."""
    rows: list[int] = []
    numels: list[int] = []
    for i in idx:
        numel = params[i].numel()
        numels.append(numel)
        rows += (
            params[i].data_ptr(),
            exp_avgs[i].data_ptr(),
            exp_avg_vars[i].data_ptr(),
            max_exp_avg_vars[i].data_ptr() if amsgrad else 0,
            state_steps[i].data_ptr(),
            numel,
        )
    table = torch.tensor(rows, dtype=torch.int64).to(device)
    return table, _block_map(numels, device, block), [None, None]


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
