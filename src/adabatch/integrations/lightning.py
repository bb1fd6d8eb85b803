"""Adaptive batch sizes in PyTorch Lightning: a Callback and one call in ``training_step``.

Lightning's own gradient accumulation (``accumulate_grad_batches``) is a counter of loader
batches fixed per epoch; changed mid-run it ends optimizer steps off the global-batch
boundaries, and a sampler that yields whole global batches lags one step behind every change
(the loader prefetches). Here instead the LightningModule uses manual optimization, the
train loader yields fixed-size *micro-batches* (``AdaptiveBatchSize.dataloader``), and each
``training_step`` hands its micro-batch loss to :func:`adaptive_backward`, which runs the
backward pass and, after the step's ``B / (processes · micro_batch)``-th micro-batch, the
optimizer step and the batch-size decision. So the global batch changes exactly at optimizer
steps, and the loader never needs to know B::

    import lightning as L
    from adabatch.integrations.lightning import AdaptiveBatchSize, adaptive_backward

    class Model(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False       # adaptive_backward steps the optimizer
            self.net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 3))

        def training_step(self, batch, batch_idx):    # one micro-batch
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)     # the micro-batch's mean loss
            adaptive_backward(self, loss)
            return loss

        def train_dataloader(self):
            return AdaptiveBatchSize.find(self.trainer).dataloader(dataset)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    controller = BatchSizeController(NormTest(0.5), initial=32, maximum=512, granularity=32)
    trainer = L.Trainer(max_steps=100, callbacks=[AdaptiveBatchSize(controller, micro_batch=8)])
    trainer.fit(Model())

``trainer.global_step`` counts global steps; the loader is endless (stop with ``max_steps``,
or ``max_samples=``/``max_epochs=`` of the callback, in samples of the adaptive stream).
With DDP each process gets ``B / (processes · micro_batch)`` micro-batches of the same global
batch (the loader is not re-sharded by Lightning: it is not a DataLoader instance), every
micro-batch but the last runs under ``strategy.block_backward_sync()``, and the statistics are
reduced across processes, so 2 processes take the decisions of 1. The callback's
``state_dict`` (controller and sampler) goes into Lightning checkpoints, and
``Trainer.fit(ckpt_path=...)`` continues with the same batches and decisions. After every
optimizer step it logs ``adabatch/batch_size`` (the next step's) and, on test steps,
``adabatch/required``, ``adabatch/statistic`` and ``adabatch/passed`` to every logger of the
Trainer (``logger.log_metrics(row, step=trainer.global_step)``, from global rank 0).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from adabatch._validation import check_int, check_real
from adabatch.batching.sampler import AdaptiveBatchSampler
from adabatch.integrations._core import GlobalStep, build_estimator, step_log

__all__ = ["AdaptiveBatchSize", "adaptive_backward"]


class _MicroBatchLoader:
    """This rank's micro-batches from the sampler's position at ``iter()``, forever.

    Not a DataLoader instance, so Lightning does not replace its sampler with a
    DistributedSampler (the adaptive sampler shards by itself)."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader

    def __iter__(self) -> Iterator[Any]:
        return iter(self.loader)


class AdaptiveBatchSize(pl.Callback):
    """Adaptive global batches for a LightningModule with manual optimization.

    Args:
        controller: a batch-size policy (:class:`~adabatch.batching.BatchSizeController`, a
            fixed schedule); its sizes must be multiples of ``processes · micro_batch``.
        micro_batch: samples per micro-batch (one ``training_step``) on each process.
        seed, shuffle: the sampler's index stream.
        estimator: ``"per-sample"`` (default), ``"micro-batch"`` or an estimator object built
            on the LightningModule; unused by policies without statistics.
        max_samples: stop (``trainer.should_stop``) once this many samples were trained on.
        max_epochs: the same in epochs of the stream (``samples / len(dataset)``).
        log: log the batch size and the test's results to the Trainer's loggers.
        gradient_clip_val: clip the step's gradient to this norm before the optimizer step
            (after the statistics; ``Trainer(gradient_clip_val=...)`` does not apply to manual
            optimization).
    """

    def __init__(self, controller: Any, *, micro_batch: int, seed: int = 0,
                 shuffle: bool = True, estimator: Any = "per-sample",
                 max_samples: int | None = None, max_epochs: float | None = None,
                 log: bool = True, gradient_clip_val: float | None = None) -> None:
        self.controller = controller
        self.micro_batch = check_int("micro_batch", micro_batch)
        self.seed = check_int("seed", seed, 0)
        self.shuffle = bool(shuffle)
        self.estimator_spec = estimator
        self.max_samples = None if max_samples is None else check_int("max_samples",
                                                                      max_samples)
        self.max_epochs = None if max_epochs is None else check_real(
            "max_epochs", max_epochs, minimum=0.0)
        self.log_metrics = bool(log)
        self.gradient_clip_val = None if gradient_clip_val is None else check_real(
            "gradient_clip_val", gradient_clip_val, minimum=0.0, strict=True)
        self.engine: GlobalStep | None = None
        self.sampler: AdaptiveBatchSampler | None = None
        self._estimator: Any = None
        self._params: list[Tensor] = []
        self._rank, self._world = 0, 1
        self._pending: dict[str, Any] | None = None
        self._sync: contextlib.ExitStack | None = None
        self.stats: Any = None

    @staticmethod
    def find(trainer: pl.Trainer) -> AdaptiveBatchSize:
        """The trainer's :class:`AdaptiveBatchSize` callback."""
        found = [c for c in trainer.callbacks if isinstance(c, AdaptiveBatchSize)]
        if len(found) != 1:
            raise RuntimeError(f"the Trainer needs exactly one AdaptiveBatchSize callback, "
                               f"it has {len(found)}")
        return found[0]

    # -- setup ------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if pl_module.automatic_optimization:
            raise RuntimeError(
                "AdaptiveBatchSize runs the optimizer steps: set "
                "`self.automatic_optimization = False` in the LightningModule and call "
                "adaptive_backward(self, loss) in training_step")
        if trainer.accumulate_grad_batches != 1:
            raise ValueError("AdaptiveBatchSize accumulates gradients itself: leave "
                             "Trainer(accumulate_grad_batches=1)")
        self._rank, self._world = trainer.global_rank, trainer.world_size
        self._estimator = build_estimator(self.estimator_spec, pl_module,
                                          frozenset(self.controller.needs))
        self._params = [p for p in pl_module.parameters() if p.requires_grad]

    def dataloader(self, dataset: Dataset, **loader_kwargs: Any) -> _MicroBatchLoader:
        """The train loader for ``train_dataloader()``: this process's micro-batches of
        ``dataset`` (DataLoader arguments such as ``num_workers`` and ``collate_fn`` pass
        through)."""
        for key in ("batch_size", "batch_sampler", "sampler", "shuffle", "drop_last"):
            if key in loader_kwargs:
                raise ValueError(f"AdaptiveBatchSize chooses the batches: do not pass {key}=")
        if self.sampler is None or self.sampler.num_samples != len(dataset):  # type: ignore[arg-type]
            self.sampler = AdaptiveBatchSampler(
                len(dataset), self.micro_batch, seed=self.seed,  # type: ignore[arg-type]
                shuffle=self.shuffle, rank=self._rank, world_size=self._world)
            self.engine = GlobalStep(self.controller, self.sampler, self._estimator,
                                     self._params)
            if self._pending is not None:
                pending, self._pending = self._pending, None
                self.engine.load_state_dict(pending)
        return _MicroBatchLoader(DataLoader(dataset, batch_sampler=self.sampler,
                                            **loader_kwargs))

    def _engine(self) -> GlobalStep:
        if self.engine is None:
            raise RuntimeError("AdaptiveBatchSize: train_dataloader() must return "
                               "AdaptiveBatchSize.find(self.trainer).dataloader(dataset)")
        return self.engine

    # -- one micro-batch --------------------------------------------------------------------

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        engine = self._engine()
        sync = engine.begin_micro_batch()
        self._sync = contextlib.ExitStack()
        block = getattr(trainer.strategy, "block_backward_sync", None)  # parallel strategies
        if not sync and block is not None:
            self._sync.enter_context(block())

    def backward(self, pl_module: pl.LightningModule, loss: Tensor) -> bool:
        """See :func:`adaptive_backward`."""
        engine = self._engine()
        if self._sync is None:
            raise RuntimeError("adaptive_backward() outside a training_step, or twice in one")
        try:
            pl_module.manual_backward(loss * engine.loss_scale)
        except BaseException:
            self._close_sync()
            engine.abort_micro_batch()
            raise
        self._close_sync()
        if not engine.end_micro_batch():
            return False
        self.stats = engine.finish_gradients()
        optimizers = pl_module.optimizers()
        for opt in optimizers if isinstance(optimizers, list) else [optimizers]:
            if self.gradient_clip_val is not None:
                pl_module.clip_gradients(opt, gradient_clip_val=self.gradient_clip_val,
                                         gradient_clip_algorithm="norm")
            opt.step()
            opt.zero_grad()
        step = self.controller.step
        engine.end_step(self.stats)
        trainer = pl_module.trainer
        if self.log_metrics and trainer.is_global_zero:
            row = {f"adabatch/{k}": v for k, v in step_log(self.controller, step).items()}
            for logger in trainer.loggers:  # one row per optimizer step, at its index
                logger.log_metrics(row, step=trainer.global_step)
        self._check_budget(trainer)
        return True

    def _close_sync(self) -> None:
        sync, self._sync = self._sync, None
        if sync is not None:
            sync.close()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._sync is not None:
            self._close_sync()
            self._engine().abort_micro_batch()
            raise RuntimeError("training_step did not call adaptive_backward(self, loss)")

    def _check_budget(self, trainer: pl.Trainer) -> None:
        assert self.sampler is not None
        if self.max_samples is not None and self.sampler.samples_consumed >= self.max_samples:
            trainer.should_stop = True
        if self.max_epochs is not None and self.sampler.epoch >= self.max_epochs:
            trainer.should_stop = True

    # -- checkpoints ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self.engine is None:
            return {"controller": self.controller.state_dict()}
        return self.engine.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.engine is not None and "sampler" in state_dict:
            self.engine.load_state_dict(state_dict)
        elif "sampler" in state_dict:
            self.controller.load_state_dict(state_dict["controller"])
            self._pending = state_dict  # the sampler is built with the train loader
        else:
            self.controller.load_state_dict(state_dict["controller"])


def adaptive_backward(pl_module: pl.LightningModule, loss: Tensor) -> bool:
    """Backward of one micro-batch's mean ``loss`` in ``training_step`` (manual optimization).

    Scales the loss so that the step's gradient is the mean over its B samples, and after the
    step's last micro-batch reads the statistics, steps and zeroes every optimizer of the
    module and lets the controller decide the next batch size. Returns True when the
    optimizer stepped (step a learning-rate scheduler then, if you have one).
    """
    return AdaptiveBatchSize.find(pl_module.trainer).backward(pl_module, loss)
