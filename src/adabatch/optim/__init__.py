"""Adaptive optimizers: one algorithm per module, and a registry of names.

- :class:`AdaBelief` (Zhuang et al., NeurIPS 2020), numerics of ``adabelief-pytorch`` 0.2.1
- :class:`AdaGradNorm` (Ward, Wu, Bottou), the scalar AdaGrad step size
- :func:`adagrad`: the coordinate-wise AdaGrad of the AdAdaGrad paper
- :func:`create` / :func:`list_optimizers`: the registry the training program uses

Names are imported lazily (PEP 562).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "AdaBelief": "adabelief",
    "AdaGradNorm": "adagradnorm",
    "adagrad": "adagrad",
    "create": "registry",
    "list_optimizers": "registry",
    "get_spec": "registry",
    "OptimizerSpec": "registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'adabatch.optim' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"adabatch.optim.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
