r"""glibc's malloc and the page faults of CPU training steps.

PyTorch's CPU tensors come from ``malloc``. By default glibc serves large blocks from fresh
``mmap`` pages and returns the top of its heap to the operating system when it is freed, so a
training step that allocates and frees the same tens of megabytes every step takes a page
fault for every 4 KiB page it touches again, every step. On this project's development machine
(a virtual machine, 2 cores) a fault costs about 2.5 us: the AdAdaGrad authors' MNIST CNN at
batch 32 took about 1,550 faults per step with :class:`~adabatch.batching.PerSampleStats`
measuring the norm test's statistics (223 without), which was most of the estimator's cost.

:func:`keep_freed_memory` asks malloc to keep freed memory for reuse instead: blocks up to
32 MiB come from the heap, and the heap is trimmed only when more than 1 GiB at its top is
free. After the first steps a training loop then touches no new pages. The price is that the
process keeps the memory of its largest step resident (the usual behaviour of a caching
allocator, like PyTorch's on CUDA). It changes the whole process, so it is the program's
decision: ``adabatch train`` calls it for CPU runs; call it yourself at the start of a CPU
training script. The same effect, set before the process starts::

    MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 \
    MALLOC_TOP_PAD_=67108864 python train.py

Elsewhere (macOS, Windows, musl) it does nothing and returns False.
"""

from __future__ import annotations

import ctypes
import sys

__all__ = ["keep_freed_memory"]

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc's largest mmap threshold on 64-bit systems
_INT_MAX = 2**31 - 1


def keep_freed_memory(
    *,
    trim_threshold: int = 1 << 30,
    top_pad: int = 64 << 20,
    mmap_threshold: int = _MMAP_THRESHOLD_MAX,
) -> bool:
    """Make glibc's malloc keep freed memory for reuse (see the module docstring).

    Args:
        trim_threshold: free bytes at the top of the heap before malloc returns them to the
            operating system (``M_TRIM_THRESHOLD``; glibc's default starts at 128 KiB).
        top_pad: extra bytes taken each time the heap grows (``M_TOP_PAD``).
        mmap_threshold: blocks at least this large come from their own ``mmap`` pages
            (``M_MMAP_THRESHOLD``; at most 32 MiB). Setting it also stops glibc's dynamic
            adjustment of both thresholds.

    Returns:
        True when all three settings were applied (Linux with glibc), False where there is no
        glibc ``mallopt`` (nothing is changed then).

    Raises:
        ValueError: for a negative value, a value above 2**31 - 1, or an ``mmap_threshold``
            above 32 MiB.
    """
    for name, value in (
        ("trim_threshold", trim_threshold),
        ("top_pad", top_pad),
        ("mmap_threshold", mmap_threshold),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _INT_MAX:
            raise ValueError(f"{name} must be an int in [0, 2**31 - 1]; got {value!r}")
    if mmap_threshold > _MMAP_THRESHOLD_MAX:
        raise ValueError(
            f"mmap_threshold must be at most {_MMAP_THRESHOLD_MAX} (32 MiB, glibc's maximum); "
            f"got {mmap_threshold}"
        )
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = True
    for param, value in (
        (_M_MMAP_THRESHOLD, mmap_threshold),
        (_M_TRIM_THRESHOLD, trim_threshold),
        (_M_TOP_PAD, top_pad),
    ):
        ok = mallopt(param, value) == 1 and ok
    return ok
