"""Adaptive batch sizes in the Hugging Face ``Trainer``: :class:`AdaptiveBatchTrainer`.

The Trainer's loop draws ``gradient_accumulation_steps`` loader batches per optimizer step (a
fixed count, prefetched ahead of the step). Here the Trainer's train loader yields one small
*ticket* per optimizer step, and :meth:`AdaptiveBatchTrainer.training_step` runs the whole
global step: ``B / (processes · micro_batch)`` micro-batches of the train dataset, drawn from
an :class:`~adabatch.batching.AdaptiveBatchSampler` only when the step asks for them (so
nothing is prefetched for a batch size that has since changed), each forward through
``compute_loss`` and backward through ``accelerator.backward`` (every micro-batch but the
last under ``accelerator.no_sync``), then the statistics and the batch-size decision. The
Trainer then clips, steps the optimizer and the scheduler, logs and saves as usual::

    from adabatch.integrations.transformers import AdaptiveBatchTrainer

    controller = BatchSizeController(NormTest(0.5), initial=32, maximum=512, granularity=32)
    args = TrainingArguments("out", max_steps=1000, per_device_train_batch_size=8,
                             report_to=[])
    trainer = AdaptiveBatchTrainer(model=model, args=args, train_dataset=train,
                                   data_collator=collator, batch_controller=controller)
    trainer.train()                    # or train(resume_from_checkpoint=True)

``per_device_train_batch_size`` is the micro-batch; ``max_steps`` counts global steps (it is
required: epochs of a changing batch size have no fixed number of steps);
``gradient_accumulation_steps`` must stay 1. Checkpoints (``save_steps``) hold the
controller and the sampler (``adabatch_state.pt`` in each ``checkpoint-N`` folder), so
``train(resume_from_checkpoint=...)`` continues with the same batches and decisions. The
training logs gain ``adabatch/batch_size`` (the next step's), ``adabatch/epoch`` (epochs of
the sample stream; the Trainer's own ``epoch`` counts steps of ``max_steps``) and, on a test
step, ``adabatch/required``, ``adabatch/statistic`` and ``adabatch/passed``. The loss
reported is the step's mean loss.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from adabatch._validation import check_int
from adabatch.batching.sampler import AdaptiveBatchSampler
from adabatch.integrations._core import GlobalStep, build_estimator, step_log

__all__ = ["STATE_FILE", "AdaptiveBatchTrainer"]

STATE_FILE = "adabatch_state.pt"


class _Tickets(Dataset):
    """One item per optimizer step: the Trainer's loop runs one training_step per ticket."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> int:
        return i


def _collate_tickets(items: list[int]) -> dict[str, Tensor]:
    return {"adabatch_step": torch.tensor(items)}


class _SaveState(TrainerCallback):
    """Writes the controller and the sampler into every checkpoint folder."""

    def __init__(self, trainer: AdaptiveBatchTrainer) -> None:
        self.trainer = trainer

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        engine = self.trainer.engine
        if engine is None or not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            torch.save(engine.state_dict(), os.path.join(folder, STATE_FILE))


class AdaptiveBatchTrainer(Trainer):
    """A :class:`transformers.Trainer` whose global batch follows ``batch_controller``.

    Args (besides the Trainer's):
        batch_controller: a batch-size policy (:class:`~adabatch.batching.
            BatchSizeController`, a fixed schedule); its sizes must be multiples of
            ``processes · per_device_train_batch_size``.
        estimator: ``"micro-batch"`` (default: :class:`~adabatch.batching.MicroBatchStats`,
            which needs nothing from the model's layers but at least 2 micro-batches per
            step), ``"per-sample"`` (:class:`~adabatch.batching.PerSampleStats`: every layer
            must see batch-first inputs (position embeddings shared by the samples, as in
            GPT-2 and BERT, are measured), and the loss must be a mean of per-sample losses)
            or an estimator object built on the model.
        sampler_seed: the seed of the sampler's permutations (default ``args.seed``).
    """

    def __init__(self, *args: Any, batch_controller: Any, estimator: Any = "micro-batch",
                 sampler_seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.args.gradient_accumulation_steps != 1:
            raise ValueError("AdaptiveBatchTrainer accumulates gradients itself: leave "
                             "gradient_accumulation_steps=1 (the micro-batch is "
                             "per_device_train_batch_size)")
        if self.args.max_steps is None or self.args.max_steps <= 0:
            raise ValueError("AdaptiveBatchTrainer needs max_steps > 0 (global steps; epochs "
                             "of a changing batch size have no fixed number of steps)")
        self.batch_controller = batch_controller
        self.estimator_spec = estimator
        self.sampler_seed = check_int("sampler_seed",
                                      self.args.seed if sampler_seed is None else sampler_seed,
                                      0)
        self.engine: GlobalStep | None = None
        self.sampler: AdaptiveBatchSampler | None = None
        self._micro_loader: DataLoader | None = None
        self._batches: Iterator[Any] | None = None
        self._position = -1
        self._resume_state: dict[str, Any] | None = None
        self.add_callback(_SaveState(self))

    # -- data -------------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any,
              **kwargs: Any) -> Any:
        path = resume_from_checkpoint
        if path is True:
            path = get_last_checkpoint(self.args.output_dir)
        if isinstance(path, str):
            state_path = os.path.join(path, STATE_FILE)
            if not os.path.isfile(state_path):
                raise FileNotFoundError(f"{state_path} is missing: the checkpoint was not "
                                        "written by an AdaptiveBatchTrainer")
            self._resume_state = torch.load(state_path, weights_only=True)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def get_train_dataloader(self) -> DataLoader:
        """The tickets loader (one item per optimizer step); builds the sampler."""
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        acc = self.accelerator
        self.sampler = AdaptiveBatchSampler(
            len(self.train_dataset), self.args.per_device_train_batch_size,  # type: ignore[arg-type]
            seed=self.sampler_seed, rank=acc.process_index, world_size=acc.num_processes)
        model = self.model
        assert isinstance(model, nn.Module)
        est = build_estimator(self.estimator_spec, model,
                              frozenset(self.batch_controller.needs))
        self.engine = GlobalStep(self.batch_controller, self.sampler, est,
                                 [p for p in model.parameters() if p.requires_grad])
        if self._resume_state is not None:
            state, self._resume_state = self._resume_state, None
            self.engine.load_state_dict(state)
        self._micro_loader = DataLoader(
            self.train_dataset, batch_sampler=self.sampler,  # type: ignore[arg-type]
            collate_fn=self.data_collator, num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory)
        self._batches, self._position = None, -1
        return DataLoader(_Tickets(self.args.max_steps), batch_size=1,
                          collate_fn=_collate_tickets)

    def _next_micro_batch(self) -> Any:
        assert self.sampler is not None and self._micro_loader is not None
        if self._batches is None or self._position != self.sampler.samples_consumed:
            self._batches = iter(self._micro_loader)
            self._position = self.sampler.samples_consumed
        return next(self._batches)

    # -- the step ---------------------------------------------------------------------------

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> Tensor:
        """One global step (``inputs`` is the ticket): every micro-batch's forward and
        backward, the statistics and the decision; returns the step's mean loss."""
        engine = self.engine
        if engine is None:
            raise RuntimeError("AdaptiveBatchTrainer.training_step before get_train_dataloader")
        model.train()
        total = torch.zeros((), device=self.args.device)
        for _ in range(engine.local_micro_batches):
            sync = engine.begin_micro_batch()
            try:
                batch = self._prepare_inputs(self._next_micro_batch())
                with (contextlib.nullcontext() if sync else self.accelerator.no_sync(model)):
                    with self.compute_loss_context_manager():
                        loss = self.compute_loss(model, batch)
                    loss = loss * engine.loss_scale
                    self.accelerator.backward(loss)
            except BaseException:
                engine.abort_micro_batch()
                raise
            engine.end_micro_batch()
            total += loss.detach()
        self._position += engine.batch_size
        stats = engine.finish_gradients()
        step = self.batch_controller.step
        # the decision needs only this step's statistics: taking it before the Trainer's
        # optimizer step changes nothing, and leaves the state complete for its checkpoint
        engine.end_step(stats)
        self._log_row = step_log(self.batch_controller, step)
        return total

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        row = getattr(self, "_log_row", None)
        if row is not None and "loss" in logs:
            logs = {**logs, **{f"adabatch/{k}": v for k, v in row.items()}}
            if self.sampler is not None:  # the Trainer's "epoch" counts tickets
                logs["adabatch/epoch"] = self.sampler.epoch
        super().log(logs, *args, **kwargs)

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """0 for the tickets (the micro-batches are not seen by the Trainer's loop)."""
        return 0
