"""adabatch.integrations.lightning with the real Lightning: the batches, decisions and
weights of the hand-written adabatch loop, logs, exact fit(ckpt_path=...), DDP = 1 process."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path

import pytest

pytest.importorskip("lightning")

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.exceptions import MisconfigurationException

from adabatch.batching import BatchSizeController, NormTest
from adabatch.integrations.lightning import AdaptiveBatchSize
from tests.integrations import _common as c
from tests.integrations._lightning_loop import Module, run
from tests.integrations.test_accelerate import ROOT, torchrun


@pytest.mark.parametrize("estimator", ["per-sample", "micro-batch"])
def test_steps_equal_the_handwritten_loop_and_are_logged(tmp_path, estimator):
    """(a) every optimizer step trains on exactly the sampler's global batch of the
    controller's size at that step: the size changes at step boundaries with no lag (the
    loader prefetches micro-batches, which do not depend on B), every sample once per epoch;
    (b) the decisions and weights are those of the plain adabatch loop, bit for bit; the
    batch size and the test's answers reach the Trainer's logger once per step."""
    got, want = run(8, estimator, root=str(tmp_path)), c.reference(8, estimator)
    assert got["global_step"] == 8
    assert got["batches"] == want["batches"]
    assert len({len(b) for b in got["batches"]}) > 1
    c.assert_epoch_covered(got["batches"])
    assert got["history"] == want["history"]
    assert got["params"] == want["params"]
    with open(Path(got["log_dir"]) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    assert [float(r["adabatch/batch_size"]) for r in rows] == \
        [h["new_batch_size"] for h in want["history"]]
    assert [float(r["adabatch/required"]) for r in rows] == [h["required"] for h in want["history"]]


def test_fit_ckpt_path_resumes_exactly(tmp_path):
    """(c) ModelCheckpoint every 3 steps during an 8-step run; fit(ckpt_path=step 3) in a new
    Trainer and module gives the uninterrupted run's remaining batches, decisions, weights."""
    want = c.reference(8)
    full = run(8, root=str(tmp_path / "a"), every=3)
    assert full["batches"] == want["batches"]
    resumed = run(8, root=str(tmp_path / "b"), resume=str(tmp_path / "a/ckpt/step=3.ckpt"))
    assert resumed["batches"] == want["batches"][3:]
    assert resumed["history"] == want["history"]
    assert resumed["params"] == want["params"]


def _fit(module: pl.LightningModule, controller, *, estimator="per-sample", **trainer_kw):
    callback = AdaptiveBatchSize(controller, micro_batch=c.MICRO, estimator=estimator)
    trainer = pl.Trainer(max_steps=2, accelerator="cpu", callbacks=[callback], logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, **trainer_kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)
    return callback


class _Automatic(Module):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = True


class _NoBackward(Module):
    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.net(batch[0]), batch[1])


def test_refuses_what_would_silently_go_wrong():
    """MicroBatchStats on one micro-batch per step (it could never decide), automatic
    optimization, Lightning's own accumulation and a training_step without
    adaptive_backward are errors, not silent no-ops."""
    one_micro = BatchSizeController(NormTest(0.5), initial=8, maximum=64, granularity=8)
    with pytest.raises(ValueError, match="at least 2 micro-batches"):
        _fit(Module(), one_micro, estimator="micro-batch")
    with pytest.raises(RuntimeError, match="automatic_optimization = False"):
        _fit(_Automatic(), c.controller())
    # Lightning refuses this itself with manual optimization (the callback would too)
    with pytest.raises((ValueError, MisconfigurationException), match="accumulate_grad_batches"):
        _fit(Module(), c.controller(), accumulate_grad_batches=2)
    with pytest.raises(RuntimeError, match="did not call adaptive_backward"):
        _fit(_NoBackward(), c.controller())


def test_max_epochs_stops_in_samples_of_the_stream():
    callback = AdaptiveBatchSize(c.controller(), micro_batch=c.MICRO, max_epochs=1.0)
    trainer = pl.Trainer(max_steps=100, accelerator="cpu", callbacks=[callback], logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Module())
    assert callback.sampler is not None
    assert 1.0 <= callback.sampler.epoch < 1.0 + 96 / c.N  # stopped after the crossing step
    assert trainer.global_step == callback.controller.step
    assert torch.isfinite(torch.tensor(c.flat_params(trainer.lightning_module.net))).all()


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["per-sample", "micro-batch"])
def test_ddp_two_processes_take_the_decisions_of_one(tmp_path, estimator):
    """(d) Trainer(strategy="ddp", devices=2) on CPU (gloo): each rank trains on its half of
    the same global batches, and the decisions and weights are those of 1 process."""
    ranks = torchrun_lightning(tmp_path, estimator)
    c.assert_two_ranks_match_one(ranks, c.reference(8, estimator), estimator)


def torchrun_lightning(tmp_path: Path, estimator: str) -> list[dict]:
    """Lightning's ddp strategy under torchrun (it then uses torchrun's processes)."""
    return torchrun(ROOT / "tests/integrations/_lightning_loop.py", tmp_path / "r", "8",
                    estimator, "2")


def test_gradient_clip_val_clips_the_step():
    """gradient_clip_val clips each global step's gradient (after the statistics, which
    stay those of the unclipped gradient): SGD then moves the weights by at most lr·clip."""
    callback = AdaptiveBatchSize(c.controller(), micro_batch=c.MICRO, seed=c.SEED,
                                 gradient_clip_val=1e-3)
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", callbacks=[callback], logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    module = Module()
    before = torch.tensor(c.flat_params(module.net))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)
    moved = torch.tensor(c.flat_params(module.net)) - before
    assert 0 < moved.norm() <= 3 * 0.1 * 1e-3 * (1 + 1e-5)
    # the first test saw the unclipped gradient of the same weights
    assert callback.controller.history[0] == c.reference(1)["history"][0]
