"""Adaptive batch sizes, usable in any training loop.

- :mod:`~adabatch.batching.stats`: :class:`GradientStats`, what a test needs.
- :mod:`~adabatch.batching.estimators`: how the statistics are measured
  (:class:`PerSampleStats`, :class:`MicroBatchStats`).
- :mod:`~adabatch.batching.protocol`: the one interface of every estimator (a context per
  step, one per micro-batch, ``stats()``).
- :mod:`~adabatch.batching.batch_tests`: pure functions GradientStats -> required batch size, and
  the classes that carry their hyperparameters.
- :mod:`~adabatch.batching.controller`: :class:`BatchSizeController`, the fixed schedules
  and :func:`apply_lr` (the one place a loop sets the learning rate).
- :mod:`~adabatch.batching.policies`: policies beyond the paper (:class:`CriticalBatchSize`,
  :class:`Goodput`) from the gradient noise scale, and the learning-rate gain rules.
- :mod:`~adabatch.batching.sampler`: a resumable sampler that yields batches of the current
  size.
- :mod:`~adabatch.batching.schedule`: learning-rate schedules counted in samples
  (:class:`WarmupCosine`, :class:`LinearWarmup`), right whatever the batch size.

Names are imported lazily (PEP 562), so ``import adabatch`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "STAT_NAMES": "stats",
    "GradientStats": "stats",
    "PerSampleStats": "estimators",
    "MicroBatchStats": "estimators",
    "Estimator": "protocol",
    "StepScope": "protocol",
    "norm_test": "batch_tests",
    "inner_product_test": "batch_tests",
    "augmented_inner_product_test": "batch_tests",
    "orthogonality_test": "batch_tests",
    "coordinate_norm_test": "batch_tests",
    "BatchTest": "batch_tests",
    "NormTest": "batch_tests",
    "InnerProductTest": "batch_tests",
    "AugmentedInnerProductTest": "batch_tests",
    "OrthogonalityTest": "batch_tests",
    "CoordinateNormTest": "batch_tests",
    "BatchSizeController": "controller",
    "ConstantSchedule": "controller",
    "LinearSchedule": "controller",
    "StagewiseSchedule": "controller",
    "apply_lr": "controller",
    "CriticalBatchSize": "policies",
    "Goodput": "policies",
    "LR_GAINS": "policies",
    "noise_scale": "policies",
    "raw_statistics": "policies",
    "AdaptiveBatchSampler": "sampler",
    "LinearWarmup": "schedule",
    "WarmupCosine": "schedule",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'adabatch.batching' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"adabatch.batching.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
