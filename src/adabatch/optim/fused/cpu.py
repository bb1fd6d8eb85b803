r"""Fused AdaBelief step: one hand-written C++ pass per parameter on CPU.

This is the CPU side of ``AdaBelief(fused=True)`` (:mod:`adabatch.optim.fused` dispatches by
device). For every parameter the
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
:func:`adabatch.optim.fused.build`, or ``python -m adabatch.optim.fused``) into
``$TORCH_EXTENSIONS_DIR/adabatch_adabelief_fused/`` (default ``~/.cache/torch_extensions``),
under a name keyed by the hash of the source and the compiler flags, so it is built once per
machine and source version and reused by every later process.
:func:`adabatch.optim.fused.fused_available` never compiles: it reports whether the kernel is
loaded or its cached build is present. ``fused=None`` therefore uses the fused kernel only
once it has been built (explicitly, or by an earlier ``fused=True``); otherwise it silently
uses foreach. A user who never asks for
``fused`` never pays for a build. Without a compiler, ``fused=True`` raises a
:class:`RuntimeError` that says so. The compiler is ``$CXX`` or the first of ``c++``, ``g++``,
``clang++`` on the ``PATH``.

The loaded library is process-wide (one :class:`Loader`, ``_loader``): it is a shared object
mapped into the process, not per-optimizer state. The per-step checks and pointer arrays live
in the caller's :class:`adabatch.optim.fused.common.PlanCache` (one per parameter group of an
optimizer).
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

import torch
from torch import Tensor

from adabatch.optim.fused.common import CACHE_FOLDER, PlanCache, default_cache_root

__all__ = ["Loader", "build", "is_built", "kernel_path", "step", "supported_isas"]

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
_FLAG_BITS = {
    "amsgrad": 1,
    "weight_decouple": 2,
    "fixed_decay": 4,
    "rectify": 8,
    "degenerated_to_sgd": 16,
    "maximize": 32,
}
_ISA_NAMES = {0: "baseline", 1: "avx2"}
_ERRORS = {1: "unsupported dtype", 2: "ISA not supported by this CPU", 3: "no memory"}


class Loader:
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
            root = self._cache_root if self._cache_root is not None else default_cache_root()
            self._path = root / CACHE_FOLDER / f"adabelief_{key.hexdigest()[:16]}.so"
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


_loader = Loader()


def kernel_path() -> Path:
    """Where the cached build of the kernel lives (it may not exist yet)."""
    return _loader.path()


def is_built() -> bool:
    """True when the kernel is loaded in this process or its cached build can be loaded."""
    return _loader.get(build=False) is not None


def build() -> Path:
    """Build the CPU kernel now (or load the cached build); return its path.

    Raises :class:`RuntimeError` when no C++ compiler is available or the build fails.
    """
    _loader.get(build=True)
    return _loader.path()


def _ptrs(tensors: list[Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def _scaler_pointers(
    grad_scale: Tensor | None, found_inf: Tensor | None
) -> tuple[int | None, int | None, list[Tensor], bool]:
    """``(scale pointer, found_inf pointer, float32 copies to keep alive, skip the step)``."""
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
    skip = found_ptr is not None and keep[-1].item() != 0.0
    return scale_ptr, found_ptr, keep, skip


def _flags(**flags: bool) -> int:
    return sum(_FLAG_BITS[name] for name, value in flags.items() if value)


def _static_arrays(
    cols: list[list[Tensor]], steps: list[Tensor], amsgrad: bool
) -> tuple[ctypes.Array, ctypes.Array, ctypes.Array, ctypes.Array | None, ctypes.Array, Tensor]:
    """Pointer arrays of p, m, s, smax (``cols``) and the counters, and the sizes."""
    return (
        _ptrs(cols[0]),
        _ptrs(cols[1]),
        _ptrs(cols[2]),
        _ptrs(cols[3]) if amsgrad else None,
        _ptrs(steps),
        torch.tensor([t.numel() for t in cols[0]], dtype=torch.int64),
    )


def step(
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
    plans: PlanCache | None = None,
    isa: int = -1,
) -> None:  # fmt: skip
    """One checked fused step on CPU tensors (non-empty lists of equal length).

    ``plans`` keeps the checks and pointer arrays between steps (see
    :class:`~adabatch.optim.fused.common.PlanCache`); ``isa``: -1 best available, 0 baseline,
    1 AVX2 (tests and benchmarks).
    """
    lib = _loader.get(build=True)
    assert lib is not None
    scale_ptr, found_ptr, keep, skip = _scaler_pointers(grad_scale, found_inf)
    if skip:
        return  # skipped step: nothing changes, like torch's fused optimizers
    flags = _flags(
        amsgrad=amsgrad, weight_decouple=weight_decouple, fixed_decay=fixed_decay,
        rectify=rectify, degenerated_to_sgd=degenerated_to_sgd, maximize=maximize,
    )  # fmt: skip
    scalars = (float(beta1), float(beta2), float(lr), float(eps), float(weight_decay))
    nthreads = torch.get_num_threads()
    plan, work, copies, groups = (plans if plans is not None else PlanCache()).lookup(
        params, grads, exp_avgs, exp_avg_vars, max_exp_avg_vars, state_steps, amsgrad
    )
    if plan is not None:
        arrays, step_grads = plan.backend, grads
        lists = [params, exp_avgs, exp_avg_vars, max_exp_avg_vars][: 4 if amsgrad else 3]
    else:
        assert work is not None
        arrays, step_grads = {}, [w[1] for w in work]
        lists = [[w[k] for w in work] for k in ((0, 2, 3, 4) if amsgrad else (0, 2, 3))]
    for dtype, idx in groups.items():
        fixed = arrays.get(dtype)
        if fixed is None:
            cols = [[t[i] for i in idx] for t in lists]
            fixed = arrays[dtype] = _static_arrays(cols, [state_steps[i] for i in idx], amsgrad)
        rc = lib.adabatch_adabelief_step(
            len(idx), _DTYPE_CODES[dtype], fixed[0], _ptrs([step_grads[i] for i in idx]),
            fixed[1], fixed[2], fixed[3], fixed[4], fixed[5].data_ptr(), *scalars, flags,
            scale_ptr, found_ptr, nthreads, isa,
        )  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"fused AdaBelief kernel failed: {_ERRORS.get(rc, rc)}")
    del keep
    for original, c in copies:
        original.copy_(c)


def supported_isas() -> list[str]:
    """The instruction sets the kernel has variants for on this CPU (builds it if needed)."""
    lib = _loader.get(build=True)
    assert lib is not None
    return [_ISA_NAMES[i] for i in range(lib.adabatch_fused_isa() + 1)]


def main() -> None:
    """``python -m adabatch.optim.fused``: build (or load) the CPU kernel and say how long."""
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
        f"{path}: {how}; ISAs: {', '.join(supported_isas())}; "
        f"OpenMP: {'yes' if lib.adabatch_fused_openmp() else 'no'}"
    )
