"""The framework-independent part of the integrations: one *global step* at a time.

A global step of B samples is ``B / (world_size · micro_batch)`` fixed-shape micro-batches
on each rank, drawn from an :class:`~adabatch.batching.AdaptiveBatchSampler` (so every
rank's micro-batches, and the global batch, depend only on the seed and the batch sizes;
prefetching cannot lag behind a batch-size change, since micro-batches do not depend on B).
:class:`GlobalStep` is the bookkeeping of such a step, driven one call at a time by a
framework's hooks or by a user's loop:

    begin_micro_batch()   -> whether this micro-batch's backward may synchronise gradients
    (forward, backward of loss * loss_scale)
    end_micro_batch()     -> True after the step's last micro-batch
    finish_gradients(avg) -> the statistics (None unless measured); p.grad is the mean
                             gradient over the B samples of all ranks
    (optimizer step)
    end_step(stats)       -> controller.update(stats); sampler.advance(B)

It follows the estimator protocol (:mod:`adabatch.batching.protocol`): the step is one
``est.step(measure)`` context, each micro-batch one ``step.micro_batch(n)`` context, entered
and left by these calls. Gradient synchronisation follows the trainer's rule
(:mod:`adabatch.train.steps`): gradients are synchronised by the framework on the last
micro-batch only, except on a measured step of an estimator that needs each rank's local
gradients (``est.needs_local_grads``, :class:`~adabatch.batching.MicroBatchStats`): then no
backward synchronises and the gradients are averaged by hand before the statistics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from adabatch import _dist
from adabatch.batching.sampler import AdaptiveBatchSampler

__all__ = ["GlobalStep", "all_reduce_sum", "average_gradients", "build_estimator"]

ESTIMATORS = ("per-sample", "micro-batch")


def all_reduce_sum(flat: Tensor) -> Tensor:
    """The estimators' ``reduce``: a SUM all-reduce across the processes of
    torch.distributed (identity in one process)."""
    if _dist.world_size() > 1:
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    return flat


def average_gradients(params: Iterable[Tensor]) -> None:
    """Average p.grad across the processes with one flat all-reduce (no-op in one)."""
    _dist.average_gradients(params)


def build_estimator(estimator: Any, model: nn.Module, needs: frozenset[str]) -> Any:
    """An estimator for ``model``: the object itself, or ``"per-sample"``
    (:class:`~adabatch.batching.PerSampleStats`) / ``"micro-batch"``
    (:class:`~adabatch.batching.MicroBatchStats`) built with ``needs`` and, under
    torch.distributed, :func:`all_reduce_sum`; None when ``needs`` is empty."""
    if not isinstance(estimator, str):
        return estimator
    if estimator not in ESTIMATORS:
        raise ValueError(f"Invalid estimator: {estimator!r} (choose from {list(ESTIMATORS)} "
                         "or pass an estimator object)")
    if not needs:
        return None
    reduce = all_reduce_sum if _dist.initialized() else None
    from adabatch.batching import MicroBatchStats, PerSampleStats

    if estimator == "per-sample":
        return PerSampleStats(model, needs=needs, reduce=reduce)
    return MicroBatchStats(model, needs=needs, reduce=reduce)


def check_setup(controller: Any, sampler: AdaptiveBatchSampler, estimator: Any) -> None:
    """Refuse a policy the sampler cannot serve, and MicroBatchStats on one micro-batch."""
    from adabatch.batching import MicroBatchStats

    if not isinstance(sampler, AdaptiveBatchSampler):
        raise TypeError(f"sampler must be an AdaptiveBatchSampler, got {type(sampler).__name__}")
    for name in ("batch_size", "initial", "maximum", "granularity", "needs"):
        if not hasattr(controller, name):
            raise TypeError(f"controller must be a batch-size policy (BatchSizeController, "
                            f"ConstantSchedule, ...); {type(controller).__name__} has no "
                            f"{name!r}")
    size = sampler.round_size
    for name in ("initial", "maximum", "granularity", "batch_size"):
        value = getattr(controller, name)
        if value % size != 0:
            raise ValueError(
                f"controller {name} ({value}) must be a multiple of world_size * micro_batch "
                f"({sampler.world_size} * {sampler.micro_batch} = {size}); set "
                f"granularity={size} (or a multiple)")
    if controller.needs and estimator is None:
        raise ValueError(f"the controller needs statistics {sorted(controller.needs)}: pass "
                         "an estimator ('per-sample', 'micro-batch' or an object)")
    if isinstance(estimator, MicroBatchStats) and controller.batch_size < 2 * sampler.micro_batch:
        raise ValueError(
            f"MicroBatchStats needs at least 2 micro-batches per step, but a step of "
            f"{controller.batch_size} samples is {controller.batch_size // sampler.micro_batch}"
            f" micro-batch of {sampler.micro_batch}: use a smaller micro_batch, a larger "
            f"initial batch size, or PerSampleStats")


class GlobalStep:
    """The bookkeeping of one global step at a time (see the module docstring).

    Args:
        controller: the batch-size policy (:class:`~adabatch.batching.BatchSizeController`
            or a fixed schedule); its sizes must be multiples of ``sampler.round_size``.
        sampler: the :class:`~adabatch.batching.AdaptiveBatchSampler` of this rank.
        estimator: an estimator object (the protocol of :mod:`adabatch.batching.protocol`),
            or None for a policy that needs no statistics.
        params: the parameters whose gradients a step without synchronisation averages by
            hand (default: the estimator's); give all the model's trainable parameters when
            the estimator covers only some.
    """

    def __init__(self, controller: Any, sampler: AdaptiveBatchSampler,
                 estimator: Any = None, params: Iterable[Tensor] | None = None) -> None:
        check_setup(controller, sampler, estimator)
        self.params = list(params) if params is not None else None
        self.controller = controller
        self.sampler = sampler
        self.estimator = estimator
        self.batch_size = 0          # B of the step in progress (0 between steps)
        self.measuring = False
        self.micro_batch_index = 0   # micro-batches of this rank done in the step
        self._step_stack: contextlib.ExitStack | None = None
        self._micro_stack: contextlib.ExitStack | None = None
        self._scope: Any = None

    # -- the step ---------------------------------------------------------------------------

    @property
    def in_step(self) -> bool:
        return self._step_stack is not None

    @property
    def local_micro_batches(self) -> int:
        """Micro-batches of this rank in the current (or next) step."""
        B = self.batch_size or self.controller.batch_size
        return B // self.sampler.round_size

    @property
    def loss_scale(self) -> float:
        """Factor of a micro-batch's mean loss so that the step's gradients are the mean."""
        return 1.0 / self.local_micro_batches

    @property
    def manual_sync(self) -> bool:
        """True when no backward of the step synchronises and :meth:`finish_gradients`
        averages by hand (a measured step of an estimator that needs local gradients)."""
        return (self.sampler.world_size > 1 and self.measuring
                and bool(getattr(self.estimator, "needs_local_grads", False)))

    def begin_micro_batch(self) -> bool:
        """Enter the next micro-batch (starting a step first when none is in progress);
        returns whether its backward may synchronise gradients across processes."""
        if self._micro_stack is not None:
            raise RuntimeError("begin_micro_batch(): the previous micro-batch has not ended")
        if self._step_stack is None:
            if self.batch_size:
                raise RuntimeError("the previous step is finished but not ended: call "
                                   "end_step() after the optimizer step")
            self._begin_step()
        stack = contextlib.ExitStack()
        if self._scope is not None:
            stack.enter_context(self._scope.micro_batch(self.sampler.micro_batch))
        self._micro_stack = stack
        last = self.micro_batch_index == self.local_micro_batches - 1
        return last and not self.manual_sync

    def end_micro_batch(self) -> bool:
        """Leave the micro-batch whose backward ran; True when it was the step's last."""
        if self._micro_stack is None:
            raise RuntimeError("end_micro_batch() without begin_micro_batch()")
        stack, self._micro_stack = self._micro_stack, None
        stack.close()
        self.micro_batch_index += 1
        return self.micro_batch_index == self.local_micro_batches

    def abort_micro_batch(self) -> None:
        """Leave a micro-batch whose forward or backward raised (the step is abandoned)."""
        stack, self._micro_stack = self._micro_stack, None
        if stack is not None:
            stack.__exit__(RuntimeError, RuntimeError("abandoned"), None)
        self.abort_step()

    def abort_step(self) -> None:
        stack, self._step_stack = self._step_stack, None
        self._scope = None
        self.batch_size, self.micro_batch_index, self.measuring = 0, 0, False
        if stack is not None:
            stack.close()

    def finish_gradients(self, average: Callable[[list[Tensor]], None] | None = None) -> Any:
        """After the last micro-batch: average the gradients by hand when the step did not
        synchronise (``average(params)``, default :func:`average_gradients`), close the
        estimator's step and return its statistics (None when the step was not measured)."""
        if self._step_stack is None or self.micro_batch_index != self.local_micro_batches:
            raise RuntimeError("finish_gradients() before the step's last micro-batch")
        if self.manual_sync:
            params = self.params if self.params is not None else list(self.estimator.params)
            (average or average_gradients)(params)
        stack, self._step_stack = self._step_stack, None
        stack.close()
        self._scope = None
        return self.estimator.stats() if self.measuring else None

    def end_step(self, stats: Any) -> int:
        """After the optimizer step: ``controller.update(stats)`` and ``sampler.advance(B)``;
        returns the next batch size."""
        if self._step_stack is not None or not self.batch_size:
            raise RuntimeError("end_step() before finish_gradients()")
        B = self.batch_size
        self.controller.update(stats)
        self.sampler.advance(B)
        self.batch_size, self.micro_batch_index, self.measuring = 0, 0, False
        return self.controller.batch_size

    def _begin_step(self) -> None:
        self.batch_size = self.controller.batch_size
        self.micro_batch_index = 0
        self.measuring = bool(self.estimator is not None and self.controller.wants_stats())
        stack = contextlib.ExitStack()
        self._scope = None
        if self.estimator is not None:
            self._scope = stack.enter_context(self.estimator.step(self.measuring))
        self._step_stack = stack

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The controller's and the sampler's state. Both change only in :meth:`end_step`,
        so in the middle of a step this is the state at the step's start: a run resumed from
        it redoes the whole step."""
        return {"controller": self.controller.state_dict(),
                "sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.abort_step()
        self.controller.load_state_dict(state["controller"])
        self.sampler.load_state_dict(state["sampler"])


def step_log(controller: Any, step: int) -> dict[str, float]:
    """What a step logs: the batch size of the next step and, when step ``step`` was a
    test step, the test's row (required batch size, statistic, passed)."""
    row: dict[str, float] = {"batch_size": float(controller.batch_size)}
    history = getattr(controller, "history", [])
    if history and history[-1].get("step") == step:
        last = history[-1]
        for key in ("required", "statistic", "passed"):
            value = last.get(key)
            if value is not None:
                row[key] = float(value)
    return row
