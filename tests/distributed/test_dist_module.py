"""``adabatch._dist``: the one check of whether torch.distributed is running, and the flat
gradient average that the trainer and the integrations share. In one process, and in two
real gloo processes."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from adabatch import _dist
from adabatch.integrations import average_gradients as integrations_average
from adabatch.train.distributed import Dist
from adabatch.train.distributed import average_gradients as trainer_average


def _params(rank: int) -> list[torch.nn.Parameter]:
    """Three parameters; the third has no gradient. Rank r's gradients are (r + 1)·base."""
    ps = [torch.nn.Parameter(torch.zeros(2, 3)), torch.nn.Parameter(torch.zeros(4)),
          torch.nn.Parameter(torch.zeros(5))]
    ps[0].grad = torch.arange(6.0).reshape(2, 3) * (rank + 1)
    ps[1].grad = torch.tensor([1.0, -2.0, 0.5, 4.0]) * (rank + 1)
    return ps


def test_one_process_is_rank_0_of_1_and_averages_nothing():
    assert not _dist.initialized()
    assert (_dist.rank(), _dist.world_size()) == (0, 1)
    ps = _params(3)
    before = [p.grad.clone() for p in ps[:2]]
    _dist.average_gradients(ps)
    trainer_average(ps, Dist())
    integrations_average(ps)
    assert all(torch.equal(p.grad, b) for p, b in zip(ps, before))
    assert ps[2].grad is None


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        seen = (_dist.initialized(), _dist.rank(), _dist.world_size())
        results = {"seen": seen}
        for name, average in (("dist", _dist.average_gradients),
                              ("trainer", lambda ps: trainer_average(
                                  ps, Dist(rank=rank, world_size=world))),
                              ("integrations", integrations_average)):
            ps = _params(rank)
            average(ps)
            results[name] = [None if p.grad is None else p.grad for p in ps]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_average_to_the_mean(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world)
    # the mean of (r + 1)·base over r = 0, 1 is 1.5·base
    want = [p.grad * 1.5 for p in _params(0)[:2]]
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["seen"] == (True, rank, world)
        for name in ("dist", "trainer", "integrations"):
            grads = got[name]
            assert grads[2] is None, name
            for g, w in zip(grads[:2], want):
                torch.testing.assert_close(g, w, rtol=0, atol=0, msg=name)
