"""In-process checks of the distributed pieces (no process group needed): the launcher's
preflight (exit 2 before starting processes), the world-size check on resume, the step
reducer's bookkeeping, the sharding of whole batches."""

from __future__ import annotations

import json

import pytest
import torch

from adabatch.batching import AdaptiveBatchSampler
from adabatch.cli import _strip_launch_flags, main
from adabatch.train.distributed import Dist, StepReducer, check_world_size

TINY = ["--steps", "1", "--threads", "1", "--quiet", "--no-plots"]


def test_nproc_rejects_batches_the_processes_cannot_share(capsys):
    code = main(["train", "--nproc", "2", "--micro-batch", "8", "--initial-batch", "24",
                 "--max-batch", "64", *TINY])
    assert code == 2
    err = capsys.readouterr().err
    assert "--initial-batch (24) must be a multiple of micro-batch x processes (8 x 2 = 16) " \
           "with 2 processes" in err
    assert len(err.strip().splitlines()) == 1


def test_nproc_rejects_granularity_not_multiple_of_world(capsys):
    code = main(["train", "--nproc", "4", "--micro-batch", "8", "--batch-granularity", "16",
                 "--initial-batch", "32", "--max-batch", "64", *TINY])
    assert code == 2
    assert "--batch-granularity (16) must be a multiple of micro-batch x processes (8 x 4)" \
        in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--max-restarts", "1"], "--max-restarts goes with --nproc"),
    (["--nproc", "0"], "--nproc must be >= 1, got 0"),
    (["--nproc", "2", "--max-restarts", "-1"], "--max-restarts must be >= 0, got -1"),
    (["--nproc", "2", "--max-restarts", "1"], "--max-restarts needs --out DIR"),
])
def test_launch_flag_errors(args, message, capsys):
    assert main(["train", *args, *TINY]) == 2
    assert message in capsys.readouterr().err


def test_nproc_under_torchrun_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--nproc", "2", *TINY]) == 2
    assert "under torchrun leave it out" in capsys.readouterr().err


def test_resume_with_processes_that_cannot_share_the_batch_exits_2(tmp_path, capsys):
    """A 1-process run whose batch grew to 56 (micro-batch 8) cannot continue on 2 processes
    (56 is not a multiple of 8 x 2)."""
    run = tmp_path / "run"
    assert main(["train", "--batch-test", "none", "--batch-schedule", "linear",
                 "--ramp-increment", "8", "--micro-batch", "8", "--initial-batch", "48",
                 "--max-batch", "96", "--out", str(run), *TINY]) == 0
    assert json.loads((run / "summary.json").read_text())["final_batch_size"] == 56
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--nproc", "2", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert "with 2 processes: its global batch size 56 is not a multiple of micro-batch x " \
           "processes = 8 x 2 = 16 (it was written by 1 processes)" in err


def test_check_world_size():
    check_world_size(48, 8, 2, 1, "ckpt")  # 48 = 3 rounds of 16
    check_world_size(48, 8, 3, 2, "ckpt")
    with pytest.raises(ValueError, match=r"cannot resume ckpt with 4 processes: its global "
                                         r"batch size 48 is not a multiple of micro-batch x "
                                         r"processes = 8 x 4 = 32"):
        check_world_size(48, 8, 4, 2, "ckpt")


def test_step_reducer_single_process_carries_loss_stop_and_stats():
    red = StepReducer(Dist(), torch.device("cpu"))
    red.attach(torch.tensor(0.25), stop=True)
    out = red(torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64))
    assert out.tolist() == [4.0, 2.0, 1.0]
    assert red(torch.tensor([7.0])).tolist() == [7.0]  # a second call: plain reduce
    assert red.finish() == (0.25, True)
    red.attach(torch.tensor(1.5), stop=False)
    assert red.finish() == (1.5, False)  # a step without statistics
    red.attach(torch.tensor(1.0), stop=False)
    red.debug_nan = 1
    out = red(torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64))
    assert out[0] == 4.0 and out[1:].isnan().all()
    with pytest.raises(RuntimeError, match="finish\\(\\) without attach"):
        red.finish(), red.finish()


@pytest.mark.parametrize("world", [1, 2, 3])
def test_whole_batches_are_sharded_without_overlap(world):
    """Without a micro-batch size every rank forwards its share of the global batch at once;
    the shares of all ranks are the global batch."""
    shares = []
    for rank in range(world):
        s = AdaptiveBatchSampler(100, 1, seed=3, rank=rank, world_size=world)
        s.take(12 * world)
        idx = s.take_batch(6 * world)  # what the trainer forwards without --micro-batch
        assert len(idx) == 6
        shares.append(idx)
    ref = AdaptiveBatchSampler(100, 1, seed=3)
    ref.take(12 * world)
    expected = ref.global_batch(6 * world)
    assert sorted(torch.cat(shares).tolist()) == sorted(expected.tolist())


def test_strip_launch_flags():
    assert _strip_launch_flags(["train", "--nproc", "2", "--lr", "0.1", "--max-restarts=1",
                                "--out", "x"]) == ["train", "--lr", "0.1", "--out", "x"]
