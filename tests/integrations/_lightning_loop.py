"""The Lightning run of the tests (also run as a script for DDP: ``OUT STEPS ESTIMATOR
DEVICES``; Lightning's ddp strategy starts the other process by running it again)."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from adabatch.integrations.lightning import AdaptiveBatchSize, adaptive_backward

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.integrations import _common as c


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.net = c.model()
        self.batches: list[list[int]] = []
        self._current: list[int] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, idx = batch
        self._current += idx.tolist()
        loss = F.cross_entropy(self.net(x), y)
        if adaptive_backward(self, loss):
            self.batches.append(self._current)
            self._current = []
        return loss

    def on_train_start(self) -> None:
        ddp = self.trainer.strategy.model
        if isinstance(ddp, torch.nn.parallel.DistributedDataParallel):  # count all-reduces
            ddp.register_comm_hook(None, c.counting_hook)  # (Lightning's own: CUDA only)

    def train_dataloader(self) -> Any:
        return AdaptiveBatchSize.find(self.trainer).dataloader(c.Indexed())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def run(steps: int, estimator: str = "per-sample", *, root: str, devices: int = 1,
        every: int = 0, resume: str | None = None) -> dict[str, Any]:
    """Fit for ``steps`` global steps; ``every``: checkpoint every that many steps under
    ``root``; ``resume``: ``fit(ckpt_path=resume)``."""
    callback = AdaptiveBatchSize(c.controller(), micro_batch=c.MICRO, seed=c.SEED,
                                 estimator=estimator)
    callbacks: list[Any] = [callback]
    if every:
        callbacks.append(pl.callbacks.ModelCheckpoint(
            dirpath=f"{root}/ckpt", every_n_train_steps=every, save_top_k=-1,
            filename="{step}"))
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=devices,
        strategy="ddp" if devices > 1 else "auto", callbacks=callbacks,
        logger=pl.loggers.CSVLogger(root, name="logs"), log_every_n_steps=1,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=bool(every),
        default_root_dir=root)
    module = Module()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and endless loaders
        trainer.fit(module, ckpt_path=resume)
    return {"rank": trainer.global_rank, "batches": module.batches,
            "history": callback.controller.history, "params": c.flat_params(module.net),
            "global_step": trainer.global_step, "log_dir": trainer.logger.log_dir,
            "allreduces": c.ALLREDUCES[0]}


if __name__ == "__main__":
    out, steps, est, devices = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    result = run(steps, est, root=str(Path(out).parent / "root"), devices=devices)
    Path(f"{out}.{result['rank']}.json").write_text(json.dumps(result))
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # Lightning leaves the process group up; tearing it down before exit keeps gloo's
        # threads from being destroyed while running (an occasional SIGABRT at exit)
        dist.destroy_process_group()
