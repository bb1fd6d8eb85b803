r"""Fused AdaBelief step: one hand-written C++ pass per parameter on CPU.

This is the ``fused=True`` path of :class:`adabatch.optim.AdaBelief`. For every parameter the
kernel reads :math:`p, g, m, s` (and :math:`s^{max}` under amsgrad) once and writes
:math:`p, m, s` (and :math:`s^{max}`) once, the same memory traffic as torch's
``Adam(fused=True)``. Per parameter, with step :math:`t` (incremented here):

.. math::

    g &\leftarrow \pm g / \text{grad\_scale}
        \quad(-\text{ under maximize; the tensor } p.\text{grad is never written})\\
    g &\leftarrow g + \lambda p \quad\text{(L2 decay)}\quad\text{or}\quad
    p \leftarrow (1 - \gamma\lambda)\,p \text{ (decoupled) or } (1-\lambda)\,p
        \text{ (fixed decay)}\\
    m &\leftarrow \beta_1 m + (1-\beta_1) g, \qquad
    s \leftarrow \beta_2 s + (1-\beta_2)(g-m)^2 + \epsilon\\
    v &= s, \text{ or under amsgrad } v = s^{max} \leftarrow \max(s^{max}, s)\\
    p &\leftarrow p - \frac{\gamma}{1-\beta_1^t}\,
        \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon} \qquad\text{(not rectified)}

Rectified: :math:`\rho_\infty = 2/(1-\beta_2) - 1`,
:math:`\rho_t = \rho_\infty - 2t\beta_2^t/(1-\beta_2^t)`; if :math:`\rho_t \ge 5`,
:math:`p \leftarrow p - \gamma r_t\, m / (\sqrt{v} + \epsilon)` with
:math:`r_t = \sqrt{(1-\beta_2^t)\frac{(\rho_t-4)(\rho_t-2)\rho_\infty}
{(\rho_\infty-4)\rho_t(\rho_\infty-2)}}\,/(1-\beta_1^t)`; otherwise
:math:`p \leftarrow p - \gamma m/(1-\beta_1^t)` when ``degenerated_to_sgd``, else :math:`p`
is unchanged (the state is still updated). This is the arithmetic of ``adabelief-pytorch``
0.2.1 with amsgrad also applied in the rectified branch.

Precision: float32 and float64 parameters keep state of their own dtype; float16 and
bfloat16 parameters keep float32 state, the math runs in float32 and the parameter is
rounded to nearest-even once per step. The scalars of a step are computed in double.
The grad scale is applied as a multiplication by its reciprocal (exact for
``GradScaler``'s powers of two). When ``found_inf`` is nonzero nothing changes at all
(not even the step counters), like torch's fused Adam.

The kernel has a plain C ABI (no torch or Python headers), so it builds with any C++17
compiler in a few seconds and is loaded with :mod:`ctypes`; OpenMP spreads chunks of 32768
elements over ``torch.get_num_threads()`` threads. The loop is compiled for the baseline ISA
and (on x86-64) for AVX2, picked at run time; ``-ffp-contract=off`` keeps the two
bit-identical, so results do not depend on the machine's vector width. (An AVX-512 variant
measured within 2% of AVX2 on this memory-bound loop and more than doubled the build time.)

Build and cache
---------------
The shared library is built on first use by ``AdaBelief(fused=True)`` (or by
:func:`build`, or ``python -m adabatch.optim.adabelief_fused``) into
``$TORCH_EXTENSIONS_DIR/adabatch_adabelief_fused/`` (default ``~/.cache/torch_extensions``),
under a name keyed by the hash of the source and the compiler flags, so it is built once per
machine and source version and reused by every later process. :func:`fused_available`
never compiles: it reports whether the kernel is loaded or its cached build is present.
``fused=None`` therefore uses the fused kernel only once it has been built (explicitly, or by
an earlier ``fused=True``); otherwise it silently uses foreach. A user who never asks for
``fused`` never pays for a build. Without a compiler, ``fused=True`` raises a
:class:`RuntimeError` that says so. The compiler is ``$CXX`` or the first of ``c++``, ``g++``,
``clang++`` on the ``PATH``.

CUDA: :func:`_fused_adabelief` hands CUDA tensors to the Triton kernel of
:mod:`adabatch.optim.adabelief_fused_cuda` (same arithmetic, one launch per dtype), after the
same checks. :func:`fused_available` and :func:`build` take the device and answer for it.
Other devices raise a :class:`RuntimeError`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["build", "fused_available", "is_built", "kernel_path"]

_SOURCE = Path(__file__).resolve().parent / "csrc" / "adabelief_fused.cpp"
_ABI = 1
_FLAGS = (
    "-O3",
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fno-exceptions",
    "-fno-rtti",
)
_OPENMP_FLAG = "-fopenmp"

_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_STATE_DTYPE = {
    torch.float32: torch.float32,
    torch.float64: torch.float64,
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
}
_FLAG_BITS = {
    "amsgrad": 1,
    "weight_decouple": 2,
    "fixed_decay": 4,
    "rectify": 8,
    "degenerated_to_sgd": 16,
    "maximize": 32,
}
_ISA_NAMES = {0: "baseline", 1: "avx2"}


def _default_cache_root() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        return Path(root)
    try:  # what torch.utils.cpp_extension.get_default_build_root() returns, without its import
        return Path(os.path.realpath(torch._appdirs.user_cache_dir(appname="torch_extensions")))
    except Exception:  # pragma: no cover - private helper moved
        from torch.utils.cpp_extension import get_default_build_root

        return Path(get_default_build_root())


class _Loader:
    """Finds, builds and loads the shared library; one instance per process (``_loader``)."""

    def __init__(self, cache_root: Path | None = None, cxx: str | None = None) -> None:
        self._cache_root = cache_root
        self._cxx = cxx
        self._lib: ctypes.CDLL | None = None
        self._path: Path | None = None
        self._lock = threading.Lock()
        self.build_seconds: float | None = None

    # -- where the build lives -------------------------------------------------------------
    def path(self) -> Path:
        if self._path is None:
            key = hashlib.sha256()
            key.update(_SOURCE.read_bytes())
            key.update(" ".join((*_FLAGS, _OPENMP_FLAG, platform.machine(), str(_ABI))).encode())
            root = self._cache_root if self._cache_root is not None else _default_cache_root()
            self._path = root / "adabatch_adabelief_fused" / f"adabelief_{key.hexdigest()[:16]}.so"
        return self._path

    def compiler(self) -> str | None:
        if self._cxx is not None:
            return shutil.which(self._cxx)
        env = os.environ.get("CXX")
        if env:
            return shutil.which(env)
        for name in ("c++", "g++", "clang++"):
            found = shutil.which(name)
            if found:
                return found
        return None

    # -- loading -----------------------------------------------------------------------------
    def _open(self, path: Path) -> ctypes.CDLL:
        lib = ctypes.CDLL(str(path))
        if lib.adabatch_fused_abi() != _ABI:
            raise OSError(f"{path} has ABI {lib.adabatch_fused_abi()}, expected {_ABI}")
        fn = lib.adabatch_adabelief_step
        fn.restype = ctypes.c_int
        fn.argtypes = [
            ctypes.c_int64,  # n
            ctypes.c_int,  # dtype
            *(ctypes.c_void_p,) * 7,  # params, grads, m, s, smax, steps, numels
            *(ctypes.c_double,) * 5,  # beta1, beta2, lr, eps, wd
            ctypes.c_int,  # flags
            ctypes.c_void_p,  # grad_scale
            ctypes.c_void_p,  # found_inf
            ctypes.c_int,  # nthreads
            ctypes.c_int,  # isa
        ]
        return lib

    def get(self, build: bool) -> ctypes.CDLL | None:
        """The loaded library; from the cache if present; compiled only when ``build``."""
        if self._lib is not None:
            return self._lib
        with self._lock:
            if self._lib is not None:
                return self._lib
            path = self.path()
            if path.is_file():
                try:
                    self._lib = self._open(path)
                    return self._lib
                except OSError:
                    if not build:
                        return None
            if not build:
                return None
            self._compile(path)
            self._lib = self._open(path)
            return self._lib

    def _compile(self, path: Path) -> None:
        cxx = self.compiler()
        if cxx is None:
            raise RuntimeError(
                "AdaBelief(fused=True) needs a C++ compiler to build its CPU kernel once, and "
                "none was found (set $CXX or install g++ or clang++); use fused=False or "
                "fused=None (foreach) instead"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        errors = []
        # With OpenMP first; a compiler without OpenMP still gets a (single-threaded) kernel.
        for extra in ((_OPENMP_FLAG,), ()):
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
            os.close(fd)
            cmd = [cxx, *_FLAGS, *extra, str(_SOURCE), "-o", tmp]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            except (OSError, subprocess.TimeoutExpired) as exc:
                errors.append(f"$ {' '.join(cmd)}\n{exc}")
                os.unlink(tmp)
                continue
            if proc.returncode == 0:
                os.replace(tmp, path)  # atomic: concurrent builders never see a partial file
                self.build_seconds = time.perf_counter() - start
                return
            os.unlink(tmp)
            errors.append(f"$ {' '.join(cmd)}\n{proc.stderr[-2000:]}")
        raise RuntimeError(
            "AdaBelief(fused=True) could not build its CPU kernel with the C++ compiler "
            f"{cxx}; use fused=False or fused=None (foreach) instead. Compiler output:\n"
            + "\n".join(errors)
        )


_loader = _Loader()


def kernel_path() -> Path:
    """Where the cached build of the kernel lives (it may not exist yet)."""
    return _loader.path()


def is_built() -> bool:
    """True when the kernel is loaded in this process or its cached build can be loaded."""
    return _loader.get(build=False) is not None


def build(device: torch.device | str = "cpu") -> Path:
    """Build the kernel for ``device`` now (or load the cached build); return its path.

    CPU: the C++ library (raises :class:`RuntimeError` when no C++ compiler is available or
    the build fails). CUDA: compiles the Triton kernel and returns its marker file (see
    :func:`adabatch.optim.adabelief_fused_cuda.build`).
    """
    device = torch.device(device)
    if device.type == "cuda":
        from adabatch.optim import adabelief_fused_cuda

        return adabelief_fused_cuda.build(device)
    if device.type != "cpu":
        raise RuntimeError(f"the fused AdaBelief has no kernel for device {device}")
    _loader.get(build=True)
    return _loader.path()


def fused_available(device: torch.device | str) -> bool:
    """Whether the fused kernel can run on ``device`` right now without compiling anything.

    CPU: once the kernel is loaded or its cached build exists (see :func:`build`). CUDA: once
    Triton imports and the kernel was compiled on this machine (``build("cuda")`` or an
    earlier ``fused=True`` step). False for other devices. This is what
    ``AdaBelief(fused=None)`` consults.
    """
    device = torch.device(device)
    if device.type == "cuda":
        from adabatch.optim import adabelief_fused_cuda

        return adabelief_fused_cuda.available(device)
    if device.type != "cpu":
        return False
    return is_built()


def _ptrs(tensors: list[Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def _prepare(
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
    copies: list[tuple[Tensor, Tensor]] = []  # (original, contiguous working copy)
    work: list[list[Tensor]] = []
    for i in range(len(params)):
        p, g, m, s = params[i], grads[i], exp_avgs[i], exp_avg_vars[i]
        step = state_steps[i]
        tensors = [p, g, m, s, max_exp_avg_vars[i]] if amsgrad else [p, g, m, s]
        dtype = p.dtype
        state_dtype = _STATE_DTYPE.get(dtype)
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
            raise RuntimeError(
                f"fused AdaBelief: state_steps must be float32 scalars on {device}"
            )
        if not all(t.is_contiguous() for t in tensors):
            contiguous = []
            for j, t in enumerate(tensors):
                if t.is_contiguous():
                    contiguous.append(t)
                else:
                    c = t.contiguous()
                    contiguous.append(c)
                    if j != 1:  # the grad is only read
                        copies.append((t, c))
            tensors = contiguous
        groups.setdefault(dtype, []).append(i)
        work.append(tensors)
    return work, copies, groups


_data_ptr = Tensor.data_ptr
_PLANS: dict[tuple[Any, ...], _Plan] = {}
_PLANS_MAX = 16


class _Plan:
    """What a checked step learned about its tensors, reused while nothing has changed.

    On small models (and on CUDA, where the kernel is fast) the checks of :func:`_prepare`
    cost more host time than the kernel. A plan is found by the parameters' device and
    addresses; it holds while the states and step counters keep their addresses, the
    parameters their shapes, and the gradients have the parameters' shapes and dtypes, are
    contiguous and on the same device (checked at every step, a few attribute reads per
    tensor). ``backend`` keeps what the kernels derive from the addresses (pointer arrays,
    device tables) between steps.
    """

    __slots__ = ("backend", "device_index", "dtypes", "groups", "shapes", "state_ptrs")

    def __init__(
        self,
        state_ptrs: tuple[tuple[int, ...], ...],
        params: list[Tensor],
        groups: dict[torch.dtype, list[int]],
    ) -> None:
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


def _state_ptrs(
    exp_avgs: list[Tensor],
    exp_avg_vars: list[Tensor],
    max_exp_avg_vars: list[Tensor],
    state_steps: list[Tensor],
    amsgrad: bool,
) -> tuple[tuple[int, ...], ...]:
    return (
        tuple(map(_data_ptr, exp_avgs)),
        tuple(map(_data_ptr, exp_avg_vars)),
        tuple(map(_data_ptr, max_exp_avg_vars)) if amsgrad else (),
        tuple(map(_data_ptr, state_steps)),
    )


def _cached_plan(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_vars: list[Tensor],
    max_exp_avg_vars: list[Tensor],
    state_steps: list[Tensor],
    amsgrad: bool,
) -> tuple[
    _Plan | None,
    list[list[Tensor]] | None,
    list[tuple[Tensor, Tensor]],
    dict[torch.dtype, list[int]],
]:
    """``(plan, None, [], groups)`` when the step can run on the original tensors with a
    (cached or new) plan; ``(None, work, copies, groups)`` from :func:`_prepare` when some
    tensor is not contiguous. Bad input raises before anything changes, as in
    :func:`_prepare`."""
    key = (params[0].device, amsgrad, tuple(map(_data_ptr, params)))
    state = _state_ptrs(exp_avgs, exp_avg_vars, max_exp_avg_vars, state_steps, amsgrad)
    plan = _PLANS.get(key)
    if plan is not None and plan.state_ptrs == state and plan.holds_for(params, grads):
        return plan, None, [], plan.groups
    work, copies, groups = _prepare(
        params, grads, exp_avgs, exp_avg_vars, max_exp_avg_vars, state_steps, amsgrad
    )
    if copies or any(w[1] is not g for w, g in zip(work, grads)):
        return None, work, copies, groups  # working copies: nothing to keep
    plan = _Plan(state, params, groups)
    if key not in _PLANS and len(_PLANS) >= _PLANS_MAX:
        _PLANS.pop(next(iter(_PLANS)))
    _PLANS[key] = plan
    return plan, None, [], groups


def _fused_cuda(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_vars: list[Tensor],
    max_exp_avg_vars: list[Tensor],
    state_steps: list[Tensor],
    *,
    amsgrad: bool,
    **kwargs: Any,
) -> None:
    """The CUDA path of :func:`_fused_adabelief`: same checks, then the Triton kernel."""
    from adabatch.optim.adabelief_fused_cuda import fused_adabelief_cuda

    plan, work, copies, groups = _cached_plan(
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


def _fused_adabelief(
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
    _isa: int = -1,
) -> None:
    """One fused AdaBelief step over parallel lists (see the module docstring).

    ``state_steps`` are float32 scalar tensors, incremented here. ``capturable`` has no
    meaning on CPU and is accepted; ``differentiable=True`` is not supported. ``_isa``
    (tests and benchmarks): -1 best available, 0 baseline, 1 AVX2.
    """
    if differentiable:
        raise RuntimeError("AdaBelief(fused=True) does not support differentiable=True")
    n = len(params)
    lengths = {len(grads), len(exp_avgs), len(exp_avg_vars), len(state_steps)}
    if lengths != {n} or (amsgrad and len(max_exp_avg_vars) != n):
        raise ValueError("fused AdaBelief: the parameter, grad and state lists differ in length")
    if n == 0:
        return
    device = params[0].device
    if device.type == "cuda":
        _fused_cuda(
            params, grads, exp_avgs, exp_avg_vars, max_exp_avg_vars, state_steps,
            beta1=beta1, beta2=beta2, lr=lr, eps=eps, weight_decay=weight_decay,
            amsgrad=amsgrad, weight_decouple=weight_decouple, fixed_decay=fixed_decay,
            rectify=rectify, degenerated_to_sgd=degenerated_to_sgd, maximize=maximize,
            grad_scale=grad_scale, found_inf=found_inf,
        )  # fmt: skip
        return
    lib = _loader.get(build=True)
    assert lib is not None

    scale_ptr = found_ptr = None
    keep: list[Tensor] = []  # keeps temporary float32 copies alive during the call
    for name, t in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if t is None:
            continue
        if t.device.type != "cpu" or t.numel() != 1:
            raise RuntimeError(f"fused AdaBelief: {name} must be a one-element CPU tensor")
        t32 = t.detach().to(torch.float32).contiguous()
        keep.append(t32)
        if name == "grad_scale":
            scale_ptr = t32.data_ptr()
        else:
            found_ptr = t32.data_ptr()
    if found_ptr is not None and keep[-1].item() != 0.0:
        return  # skipped step: nothing changes, like torch's fused optimizers

    flags = 0
    for name, value in (
        ("amsgrad", amsgrad),
        ("weight_decouple", weight_decouple),
        ("fixed_decay", fixed_decay),
        ("rectify", rectify),
        ("degenerated_to_sgd", degenerated_to_sgd),
        ("maximize", maximize),
    ):
        if value:
            flags |= _FLAG_BITS[name]
    lr_f = float(lr)
    nthreads = torch.get_num_threads()

    plan, work, copies, groups = _cached_plan(
        params, grads, exp_avgs, exp_avg_vars, max_exp_avg_vars, state_steps, amsgrad
    )
    if plan is not None:
        arrays, step_grads = plan.backend, grads
    else:
        assert work is not None
        arrays, step_grads = {}, [w[1] for w in work]
    for dtype, idx in groups.items():
        fixed = arrays.get(dtype)
        if fixed is None:  # pointer arrays of p, m, s, smax and the counters, and the sizes
            if plan is None:
                cols = [[work[i][k] for i in idx] for k in ((0, 2, 3, 4) if amsgrad else (0, 2, 3))]
            else:
                lists = (params, exp_avgs, exp_avg_vars, max_exp_avg_vars)
                cols = [[t[i] for i in idx] for t in lists[: 4 if amsgrad else 3]]
            fixed = arrays[dtype] = (
                _ptrs(cols[0]),
                _ptrs(cols[1]),
                _ptrs(cols[2]),
                _ptrs(cols[3]) if amsgrad else None,
                _ptrs([state_steps[i] for i in idx]),
                torch.tensor([t.numel() for t in cols[0]], dtype=torch.int64),
            )
        rc = lib.adabatch_adabelief_step(
            len(idx),
            _DTYPE_CODES[dtype],
            fixed[0],
            _ptrs([step_grads[i] for i in idx]),
            fixed[1],
            fixed[2],
            fixed[3],
            fixed[4],
            fixed[5].data_ptr(),
            float(beta1),
            float(beta2),
            lr_f,
            float(eps),
            float(weight_decay),
            flags,
            scale_ptr,
            found_ptr,
            nthreads,
            _isa,
        )
        if rc != 0:
            reason = {1: "unsupported dtype", 2: "ISA not supported by this CPU", 3: "no memory"}
            raise RuntimeError(f"fused AdaBelief kernel failed: {reason.get(rc, rc)}")
    for original, c in copies:
        original.copy_(c)


def _supported_isas() -> list[str]:
    lib = _loader.get(build=True)
    assert lib is not None
    return [_ISA_NAMES[i] for i in range(lib.adabatch_fused_isa() + 1)]


def _main() -> None:
    start = time.perf_counter()
    path = build()
    took = time.perf_counter() - start
    how = (
        f"built in {_loader.build_seconds:.1f} s"
        if _loader.build_seconds
        else f"loaded from cache in {took * 1000:.1f} ms"
    )
    lib = _loader.get(build=False)
    assert lib is not None
    print(
        f"{path}: {how}; ISAs: {', '.join(_supported_isas())}; "
        f"OpenMP: {'yes' if lib.adabatch_fused_openmp() else 'no'}"
    )


if __name__ == "__main__":
    _main()
