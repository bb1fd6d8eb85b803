"""Worker of tests/distributed/test_sharded_checkpoint.py, run by torchrun (gloo, CPU).

An FSDP2 (``fully_shard``) float64 MLP with uneven shards and Adam trains on a fixed global
batch of 16 samples per step (rank r of W takes its 16/W rows; FSDP2 averages the gradients,
so every world size takes the same steps)::

    OUT save=RUN ...     steps 1, 2, 3 with a sharded checkpoint after each (the newest one
                         kept); the full model and optimizer state after step 2 go to
                         OUT/RUN.saved.pt, after step 3 to OUT/RUN.step3.pt; between step
                         2's save and step 3, ``load=RUN`` (below) reads step 2 back
    OUT kill<R>=RUN      the same, but rank R SIGKILLs itself in the middle of step 3's save
                         (after writing its shard file, before DCP's metadata): step 3 never
                         completes (the last command: every process ends)
    OUT load=RUN ...     a model initialised differently loads RUN's newest complete
                         checkpoint; its full state goes to OUT/RUN.loaded<W>.pt, then after
                         one more step to OUT/RUN.next<W>.pt (W: the number of processes)

The commands run in order in one process group (one start-up for several checks).
Rank 0 writes the files (``torch.save`` of plain dicts: ``model``, ``optimizer`` (FQN keys,
full tensors), ``step``, ``trainer``).
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.fsdp import fully_shard

from adabatch.train import sharded_checkpoint as sc
from adabatch.train.checkpoint import newest_intact_checkpoint

GLOBAL_BATCH = 16


def make(seed: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    return model, torch.optim.Adam(model.parameters(), lr=0.05, weight_decay=0.01)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    """Step ``step`` (from 1) on this rank's share of its global batch."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, 7, generator=g, dtype=torch.float64)
    y = torch.randn(GLOBAL_BATCH, 3, generator=g, dtype=torch.float64)
    world, rank = dist.get_world_size(), dist.get_rank()
    share = GLOBAL_BATCH // world
    rows = slice(rank * share, (rank + 1) * share)
    opt.zero_grad()
    nn.functional.mse_loss(model(x[rows]), y[rows]).backward()
    opt.step()


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The whole model and optimizer state (gathered, FQN keys), the same for any world size."""
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True,
                                                                   cpu_offload=True))
    return {"model": msd, "optimizer": osd.get("state", {})}  # empty off rank 0


def dump(obj: dict, path: Path) -> None:
    if dist.get_rank() == 0:
        torch.save(obj, path)


def trainer_state(step: int) -> dict:
    return {"step": step, "samples": step * GLOBAL_BATCH, "sampler": {"position": step}}


def arm_kill(rank: int) -> None:
    """SIGKILL this process when DCP fsyncs its shard file (written, not yet complete)."""
    if dist.get_rank() != rank:
        return
    fsync = os.fsync

    def dying_fsync(fd: int) -> None:
        fsync(fd)
        os.kill(os.getpid(), signal.SIGKILL)
    os.fsync = dying_fsync


def save(out: Path, run: Path, kill_rank: int | None) -> None:
    model, opt = make(0)
    for step in (1, 2, 3):
        train_step(model, opt, step)
        if step == 2:
            dump(full_state(model, opt), out / f"{run.name}.saved.pt")
        if step == 3:
            dump(full_state(model, opt), out / f"{run.name}.step3.pt")
            load(out, run)  # step 2's checkpoint, read back by as many processes
            if kill_rank is not None:
                arm_kill(kill_rank)
        sc.save_sharded(run, step, model, opt, trainer_state(step), keep=1)


def load(out: Path, run: Path) -> None:
    model, opt = make(1)  # another initialisation: everything must come from the checkpoint
    found = newest_intact_checkpoint(run) if dist.get_rank() == 0 else None
    box = [None if found is None else (str(found[0]), found[1])]
    dist.broadcast_object_list(box, src=0)
    path, trainer = box[0]
    sc.load_sharded(path, model, opt)
    world = dist.get_world_size()
    dump({**full_state(model, opt), "step": trainer["step"], "trainer": trainer,
          "path": path}, out / f"{run.name}.loaded{world}.pt")
    train_step(model, opt, trainer["step"] + 1)
    dump(full_state(model, opt), out / f"{run.name}.next{world}.pt")


def main() -> None:
    out, commands = Path(sys.argv[1]), [c.split("=", 1) for c in sys.argv[2:]]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    for command, run in commands:
        if command == "load":
            load(out, Path(run))
        else:
            save(out, Path(run), int(command[4:]) if command.startswith("kill") else None)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
