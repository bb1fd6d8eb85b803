"""adabatch.integrations.transformers with the real Trainer and a tiny BERT built from a
config: the batches, decisions and weights of the hand-written adabatch loop, logs, exact
train(resume_from_checkpoint=...), 2 processes = 1."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import torch
from transformers import TrainingArguments

from adabatch.batching import BatchSizeController, NormTest
from adabatch.integrations.transformers import AdaptiveBatchTrainer
from tests.integrations import _common as c
from tests.integrations._hf_loop import Tokens, collate, model, reference, run
from tests.integrations.test_accelerate import ROOT, torchrun


def test_steps_equal_the_handwritten_loop_and_are_logged(tmp_path):
    """(a) every Trainer step trains on exactly the sampler's global batch of the
    controller's size at that step (every sample once per epoch); (b) the decisions and
    weights are those of the plain adabatch loop, bit for bit; the logs carry the batch
    size, the stream's epoch and the test's answers."""
    got, want = run(8, "micro-batch", out=str(tmp_path)), reference(8, "micro-batch")
    assert got["batches"] == want["batches"]
    assert len({len(b) for b in got["batches"]}) > 1
    c.assert_epoch_covered(got["batches"])
    assert got["history"] == want["history"]
    assert got["params"] == want["params"]
    logs = got["logs"]
    assert [row["step"] for row in logs] == list(range(1, 9))
    sizes = [len(b) for b in want["batches"]]
    assert [row["adabatch/batch_size"] for row in logs] == [*sizes[1:], sizes[-1]]
    assert [row.get("adabatch/required") for row in logs[:len(want["history"])]] == \
        [h["required"] for h in want["history"]]
    assert logs[-1]["adabatch/epoch"] == pytest.approx(sum(sizes) / c.N)


def test_resume_from_checkpoint_is_exact(tmp_path):
    """(c) checkpoints every 3 steps; train(resume_from_checkpoint=checkpoint-3) in a new
    Trainer gives the uninterrupted run's remaining batches, decisions and weights."""
    want = reference(8, "micro-batch")
    full = run(8, "micro-batch", out=str(tmp_path / "a"), save_steps=3)
    assert (tmp_path / "a/checkpoint-3/adabatch_state.pt").is_file()
    assert full["batches"] == want["batches"]
    resumed = run(8, "micro-batch", out=str(tmp_path / "b"), save_steps=3,
                  resume=str(tmp_path / "a/checkpoint-3"))
    assert resumed["batches"] == want["batches"][3:]
    assert resumed["history"] == want["history"]
    assert resumed["params"] == want["params"]


def _trainer(tmp_path, controller=None, **kw):
    args = dict(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=c.MICRO,
                use_cpu=True, report_to=[], disable_tqdm=True, save_strategy="no")
    args.update(kw)
    net = model()
    return AdaptiveBatchTrainer(
        model=net, args=TrainingArguments(**args), train_dataset=Tokens(),
        data_collator=lambda items: {k: v for k, v in collate(items).items() if k != "idx"},
        batch_controller=controller or c.controller())


def test_refuses_what_would_silently_go_wrong(tmp_path):
    """The Trainer's own accumulation, an epoch budget, MicroBatchStats on one micro-batch
    per step (it could never decide) and a checkpoint without the adabatch state."""
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        _trainer(tmp_path, gradient_accumulation_steps=2)
    with pytest.raises(ValueError, match="max_steps > 0"):
        _trainer(tmp_path, max_steps=-1)
    one_micro = BatchSizeController(NormTest(0.5), initial=8, maximum=64, granularity=8)
    with pytest.raises(ValueError, match="at least 2 micro-batches"):
        _trainer(tmp_path, one_micro).train()
    (tmp_path / "checkpoint-1").mkdir()
    with pytest.raises(FileNotFoundError, match=r"adabatch_state\.pt"):
        _trainer(tmp_path).train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert torch.is_grad_enabled()


@pytest.mark.slow
def test_two_processes_take_the_decisions_of_one(tmp_path):
    """(d) 2 CPU processes under torchrun (the Trainer wraps the model in DDP, gloo): each
    rank trains on its half of the same global batches, and the decisions and weights are
    those of 1 process."""
    ranks = torchrun(ROOT / "tests/integrations/_hf_loop.py", tmp_path / "r", "8",
                     "micro-batch")
    c.assert_two_ranks_match_one(ranks, reference(8, "micro-batch"), "micro-batch")
