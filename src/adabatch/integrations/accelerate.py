"""Adaptive batch sizes in a Hugging Face ``accelerate`` loop.

:class:`AdaptiveBatch` serves each global step as ``B / (processes · micro_batch)``
micro-batches per process from an :class:`~adabatch.batching.AdaptiveBatchSampler` whose
rank and world size are the accelerator's, so:

- the DataLoader is **not** passed to ``accelerator.prepare`` (that would shard the sampler's
  micro-batches a second time): :meth:`AdaptiveBatch.micro_batches` iterates it and moves the
  batches to ``accelerator.device`` itself;
- gradient accumulation follows the batch size: every micro-batch but the step's last runs
  under ``accelerator.no_sync(model)`` (all of them, and one average by hand, on a measured
  step of :class:`~adabatch.batching.MicroBatchStats`); the Accelerator's own
  ``gradient_accumulation_steps`` must stay 1;
- ``accelerator.save_state`` / ``load_state`` carry the controller and the sampler (the
  object registers itself with ``register_for_checkpointing``); after ``load_state`` the
  next step continues the saved stream.

Usage::

    accelerator = Accelerator(cpu=True)
    controller = BatchSizeController(NormTest(0.5), initial=32, maximum=512, granularity=32)
    model, optimizer = accelerator.prepare(model, optimizer)
    adaptive = AdaptiveBatch(accelerator, model, controller, dataset, micro_batch=8, seed=0)
    while adaptive.sampler.epoch < 3:
        for x, y in adaptive.micro_batches():          # this step's micro-batches
            adaptive.backward(F.cross_entropy(model(x), y))
        optimizer.step()                               # p.grad: the mean over B samples
        optimizer.zero_grad()
        adaptive.end_step()                            # controller.update, sampler.advance
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from adabatch._validation import check_int
from adabatch.batching.sampler import AdaptiveBatchSampler
from adabatch.integrations._core import GlobalStep, build_estimator

__all__ = ["AdaptiveBatch"]


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return type(batch)({k: _to_device(v, device) for k, v in batch.items()})
    return batch


class AdaptiveBatch:
    """Adaptive global batches for an ``accelerate`` training loop (see the module
    docstring).

    Args:
        accelerator: the :class:`accelerate.Accelerator` (``gradient_accumulation_steps=1``).
        model: the model as returned by ``accelerator.prepare`` (DDP-wrapped or not).
        controller: a batch-size policy (:class:`~adabatch.batching.BatchSizeController`, a
            fixed schedule); its sizes must be multiples of ``processes · micro_batch``.
        dataset: a map-style dataset; batches are built by a DataLoader with the sampler as
            ``batch_sampler``.
        micro_batch: samples per micro-batch on each process.
        seed, shuffle: the sampler's stream (the same on every process).
        estimator: ``"per-sample"`` (default), ``"micro-batch"`` or an estimator object
            built on the unwrapped model; unused by policies without statistics.
        loader_kwargs: more DataLoader arguments (``num_workers``, ``collate_fn``, ...).
    """

    def __init__(self, accelerator: Any, model: nn.Module, controller: Any, dataset: Dataset,
                 *, micro_batch: int, seed: int = 0, shuffle: bool = True,
                 estimator: Any = "per-sample", **loader_kwargs: Any) -> None:
        check_int("micro_batch", micro_batch)
        if accelerator.gradient_accumulation_steps != 1:
            raise ValueError(
                f"AdaptiveBatch accumulates gradients itself (B / (processes * micro_batch) "
                f"micro-batches per step); create the Accelerator with "
                f"gradient_accumulation_steps=1, not {accelerator.gradient_accumulation_steps}")
        for key in ("batch_size", "batch_sampler", "sampler", "shuffle", "drop_last"):
            if key in loader_kwargs:
                raise ValueError(f"AdaptiveBatch chooses the batches: do not pass {key}=")
        self.accelerator = accelerator
        self.model = model
        self.sampler = AdaptiveBatchSampler(
            len(dataset), micro_batch, seed=seed, shuffle=shuffle,  # type: ignore[arg-type]
            rank=accelerator.process_index, world_size=accelerator.num_processes)
        inner = accelerator.unwrap_model(model)
        est = build_estimator(estimator, inner, frozenset(controller.needs))
        self.engine = GlobalStep(controller, self.sampler, est,
                                 [p for p in inner.parameters() if p.requires_grad])
        self.controller = controller
        self.loader = DataLoader(dataset, batch_sampler=self.sampler, **loader_kwargs)
        self._batches: Iterator[Any] | None = None
        self._position = -1  # sampler position the iterator stands at
        self.stats: Any = None
        accelerator.register_for_checkpointing(self)

    def _next_batch(self) -> Any:
        if self._batches is None or self._position != self.sampler.samples_consumed:
            self._batches = iter(self.loader)  # (re)start at the sampler's position
            self._position = self.sampler.samples_consumed
        return next(self._batches)

    def micro_batches(self) -> Iterator[Any]:
        """This process's micro-batches of the next global step, on the accelerator's device.

        Each is yielded inside the estimator's micro-batch context and, except where the step
        must synchronise, inside ``accelerator.no_sync(model)``: run the forward pass and
        :meth:`backward` in the loop body, once per micro-batch. When the loop ends, p.grad is
        the mean gradient over the step's B samples of all processes and :attr:`stats` holds
        the step's statistics (None when it was not measured).
        """
        step = self.engine
        if step.in_step:
            step.abort_step()
        for _ in range(self.engine.local_micro_batches):
            sync = step.begin_micro_batch()  # (refuses before a micro-batch is taken)
            try:
                batch = _to_device(self._next_batch(), self.accelerator.device)
                with (contextlib.nullcontext() if sync else self.accelerator.no_sync(self.model)):
                    yield batch
            except BaseException:
                step.abort_micro_batch()
                raise
            step.end_micro_batch()
        self._position += step.batch_size
        self.stats = step.finish_gradients()

    def backward(self, loss: Tensor) -> None:
        """``accelerator.backward`` of a micro-batch's mean loss, scaled so that the step's
        gradient is the mean over its B samples."""
        self.accelerator.backward(loss * self.engine.loss_scale)

    def end_step(self) -> int:
        """After ``optimizer.step()``: the controller's decision and the sampler's advance;
        returns the next global batch size."""
        stats, self.stats = self.stats, None
        return self.engine.end_step(stats)

    @property
    def batch_size(self) -> int:
        """The global batch size of the next step."""
        return int(self.controller.batch_size)

    def state_dict(self) -> dict[str, Any]:
        return self.engine.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.load_state_dict(state)
        self._batches, self._position, self.stats = None, -1, None
