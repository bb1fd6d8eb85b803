"""adabatch.integrations.accelerate with the real accelerate: the batches, decisions and
weights of the hand-written adabatch loop, exact save_state/load_state, 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("accelerate")

from tests.integrations import _common as c
from tests.integrations._accelerate_loop import run

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("estimator", ["per-sample", "micro-batch"])
def test_steps_equal_the_handwritten_loop(estimator):
    """(a) each step trains on exactly the sampler's global batch (every sample once per
    epoch; the size changes only between optimizer steps) and (b) takes the same decisions
    and ends with the same weights as the plain adabatch loop: the integration adds
    nothing."""
    got, want = run(8, estimator), c.reference(8, estimator)
    assert got["batches"] == want["batches"]
    assert len({len(b) for b in got["batches"]}) > 1  # the batch size did change
    c.assert_epoch_covered(got["batches"])
    assert got["history"] == want["history"]
    assert got["params"] == want["params"]


def test_save_state_load_state_resumes_exactly(tmp_path):
    """(c) accelerator.save_state after 3 steps, then fresh objects and load_state: the
    remaining steps equal the uninterrupted run's (batches, decisions, weights)."""
    want = c.reference(8)
    first = run(8, save_at=3, save_dir=str(tmp_path / "ckpt"))
    assert first["batches"] == want["batches"][:3]
    resumed = run(8, resume=str(tmp_path / "ckpt"))
    assert resumed["batches"] == want["batches"][3:]
    assert resumed["history"] == want["history"]
    assert resumed["params"] == want["params"]


def test_refuses_what_would_silently_do_nothing():
    import torch
    from accelerate import Accelerator

    from adabatch.batching import BatchSizeController, MicroBatchStats, NormTest
    from adabatch.integrations.accelerate import AdaptiveBatch

    net = c.model()
    acc = Accelerator(cpu=True)
    one_micro = BatchSizeController(NormTest(0.5), initial=8, maximum=64, granularity=8)
    with pytest.raises(ValueError, match="at least 2 micro-batches"):
        AdaptiveBatch(acc, net, one_micro, c.Indexed(), micro_batch=8, estimator="micro-batch")
    with pytest.raises(ValueError, match="at least 2 micro-batches"):
        AdaptiveBatch(acc, net, one_micro, c.Indexed(), micro_batch=8,
                      estimator=MicroBatchStats(net, needs=one_micro.needs))
    with pytest.raises(ValueError, match="multiple of world_size"):
        AdaptiveBatch(acc, net, BatchSizeController(NormTest(0.5), 12, 48, granularity=12),
                      c.Indexed(), micro_batch=8)
    with pytest.raises(ValueError, match="do not pass batch_size"):
        AdaptiveBatch(acc, net, c.controller(), c.Indexed(), micro_batch=8, batch_size=4)
    acc.gradient_accumulation_steps = 2  # what Accelerator(gradient_accumulation_steps=2) sets
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        AdaptiveBatch(acc, net, c.controller(), c.Indexed(), micro_batch=8)
    acc.gradient_accumulation_steps = 1
    assert torch.is_tensor(net[0].weight)


def torchrun(script: Path, out: Path, *args: str) -> list[dict]:
    """``script OUT ARGS`` in 2 processes under torchrun (the Lightning and Hugging Face
    tests' launcher); every rank's result."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", str(script), str(out), *args]
    return _ranks(cmd, env, out)


def _ranks(cmd: list[str], env: dict[str, str], out: Path) -> list[dict]:
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(2)]


def accelerate_launch(script: Path, out: Path, *args: str) -> list[dict]:
    """``accelerate launch`` with 2 processes on CPU. ``--cpu`` would need mpirun for more
    than one process; ``--multi_gpu`` launches through torchrun, and on a machine without a
    GPU ``Accelerator(cpu=True)`` then runs MULTI_CPU over gloo."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(script), str(out), *args]
    return _ranks(cmd, env, out)


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["per-sample", "micro-batch"])
def test_two_processes_take_the_decisions_of_one(tmp_path, estimator):
    """(d) 2 CPU processes launched by `accelerate launch` (gloo, Accelerator(cpu=True) ->
    MULTI_CPU): each rank trains on its half of the same global batches, no sample twice, and
    the decisions and weights are those of 1 process."""
    ranks = accelerate_launch(ROOT / "tests/integrations/_accelerate_loop.py", tmp_path / "r",
                              "8", estimator)
    c.assert_two_ranks_match_one(ranks, c.reference(8, estimator), estimator)


def test_a_step_not_ended_is_not_silently_repeated():
    """micro_batches() again without end_step() would train on the same batch twice: it
    raises instead, and end_step() then moves on to the next global batch."""
    import torch.nn.functional as F
    from accelerate import Accelerator

    from adabatch.integrations.accelerate import AdaptiveBatch

    net = c.model()
    acc = Accelerator(cpu=True)
    adaptive = AdaptiveBatch(acc, net, c.controller(), c.Indexed(), micro_batch=c.MICRO,
                             seed=c.SEED)
    seen = []
    for x, y, idx in adaptive.micro_batches():
        adaptive.backward(F.cross_entropy(net(x), y))
        seen += idx.tolist()
    with pytest.raises(RuntimeError, match="call end_step"):
        next(iter(adaptive.micro_batches()))
    adaptive.end_step()
    second = []
    for x, y, idx in adaptive.micro_batches():
        adaptive.backward(F.cross_entropy(net(x), y))
        second += idx.tolist()
    assert [seen, second] == c.reference(2)["batches"]
