"""adabatch: adaptive optimizers and adaptive batch sizes for PyTorch.

The public names of :mod:`adabatch.optim` and :mod:`adabatch.batching` are available here
too (imported lazily), for example ``adabatch.AdaBelief`` and ``adabatch.NormTest``.
"""

from __future__ import annotations

from typing import Any

from adabatch import batching as _batching
from adabatch import optim as _optim

__version__ = "0.1.0"

__all__ = sorted({*_optim.__all__, *_batching.__all__, "__version__", "keep_freed_memory"})


def __getattr__(name: str) -> Any:
    if name == "keep_freed_memory":
        from adabatch.allocator import keep_freed_memory

        return keep_freed_memory
    for module in (_optim, _batching):
        if name in module.__all__:
            return getattr(module, name)
    raise AttributeError(f"module 'adabatch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
