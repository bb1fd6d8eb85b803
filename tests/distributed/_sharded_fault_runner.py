"""``adabatch train`` (through tests/_fault_runner.py) with a rank SIGKILLed inside a sharded
checkpoint save or in a step, for tests/distributed/test_fsdp_resume.py. Run under torchrun
with 2 processes and ``--max-restarts 3``; the flags are ``adabatch train``'s::

    python -m torch.distributed.run --nproc-per-node 2 --max-restarts 3 \\
        tests/distributed/_sharded_fault_runner.py FLAGS...

- first attempt: rank 1 dies in the first save, once DCP has written its shard file (at its
  fsync), before DCP's metadata: the save leaves an incomplete ``step_XXXXXXXX.tmp``;
- second attempt (restart 1): rank 0 dies in the second save, after every shard, the trainer
  state and the marker were written, before the directory is renamed into place;
- third attempt (restart 2): rank 1 dies in the first step it takes, before its optimizer
  step;
- fourth attempt: no fault.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests._fault_runner

from adabatch.train import sharded_checkpoint
from adabatch.train.distributed import restart_count
from tests._fault_runner import Faults, run_train


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_rank1_in_first_shard_write() -> None:
    """Rank 1 calls os.fsync only for its DCP shard file (rank 0 writes every other file)."""
    fsync = os.fsync

    def dying_fsync(fd: int) -> None:
        fsync(fd)
        _die()
    os.fsync = dying_fsync


def _kill_rank0_before_second_rename() -> None:
    move = sharded_checkpoint._move_into_place
    calls = [0]

    def dying_move(tmp: Path, final: Path) -> Any:
        calls[0] += 1
        if calls[0] == 2:
            _die()
        return move(tmp, final)
    sharded_checkpoint._move_into_place = dying_move


class _KillInFirstStep(Faults):
    def before_optimizer_step(self, run: Any) -> None:
        _die()


def main() -> int:
    rank, attempt = int(os.environ.get("RANK", "0")), restart_count()
    if (attempt, rank) == (0, 1):
        _kill_rank1_in_first_shard_write()
    if (attempt, rank) == (1, 0):
        _kill_rank0_before_second_rename()
    faults = _KillInFirstStep() if (attempt, rank) == (2, 1) else Faults()
    return run_train(sys.argv[1:], faults)


if __name__ == "__main__":
    sys.exit(main())
