"""Adaptive batch sizes inside training frameworks.

- :mod:`adabatch.integrations.lightning`: :class:`AdaptiveBatchSize`, a Lightning Callback,
  and :func:`~adabatch.integrations.lightning.adaptive_backward` for ``training_step``.
- :mod:`adabatch.integrations.accelerate`: :class:`AdaptiveBatch` for ``Accelerator`` loops.
- :mod:`adabatch.integrations.transformers`: :class:`AdaptiveBatchTrainer`, a Hugging Face
  ``Trainer`` subclass.

Each framework is an optional extra (``pip install adabatch[lightning]``, ``[accelerate]``,
``[hf]``); importing this package imports none of them. All three run a global step as
``B / (processes · micro_batch)`` fixed-shape micro-batches drawn from an
:class:`~adabatch.batching.AdaptiveBatchSampler` (:class:`~adabatch.integrations._core.
GlobalStep`): no framework-level accumulation counter, no second sharding, no prefetch lag.
"""

from adabatch.integrations._core import GlobalStep, all_reduce_sum, average_gradients

__all__ = ["GlobalStep", "all_reduce_sum", "average_gradients"]
