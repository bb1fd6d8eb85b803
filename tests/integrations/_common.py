"""Shared pieces of the integration tests: data, model, policy and the hand-written adabatch
loop that every integration must reproduce (same batches, same decisions, same weights)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from adabatch.batching import (
    AdaptiveBatchSampler,
    BatchSizeController,
    MicroBatchStats,
    NormTest,
    PerSampleStats,
)

N, DIM, MICRO, SEED = 192, 6, 8, 3


def data() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, DIM, generator=gen)
    y = ((x[:, 0] + 0.5 * torch.randn(N, generator=gen)) > 0).long()
    return x, y


class Indexed(Dataset):
    """(x, y, index): the index lets a loop record which samples it trained on."""

    def __init__(self) -> None:
        self.x, self.y = data()

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        return self.x[i], self.y[i], i


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(DIM, 16), nn.Tanh(), nn.Linear(16, 2))


def controller() -> BatchSizeController:
    """Grows 16 -> ... -> 96 within a few steps on this data (several decisions)."""
    return BatchSizeController(NormTest(eta=0.6), initial=16, maximum=96, granularity=16)


def flat_params(m: nn.Module) -> list[float]:
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()]).tolist()


def reference(steps: int, estimator: str = "per-sample", lr: float = 0.1) -> dict[str, Any]:
    """The README's DataLoader-free loop: ``sampler.take(B)``, the estimator protocol,
    SGD. Returns each step's global batch (sample indices), the decisions and the weights."""
    x, y = data()
    net = model()
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    ctl = controller()
    sampler = AdaptiveBatchSampler(N, MICRO, seed=SEED)
    cls = PerSampleStats if estimator == "per-sample" else MicroBatchStats
    est = cls(net, needs=ctl.needs)
    batches = []
    for _ in range(steps):
        B = ctl.batch_size
        micro = sampler.take(B)
        batches.append(torch.cat(micro).tolist())
        opt.zero_grad()
        with est.step(ctl.wants_stats()) as step:
            for idx in micro:
                with step.micro_batch(len(idx)):
                    (F.cross_entropy(net(x[idx]), y[idx]) / len(micro)).backward()
        stats = est.stats() if step.measuring else None
        opt.step()
        ctl.update(stats)
    return {"batches": batches, "history": ctl.history, "params": flat_params(net)}


def assert_same_decisions(history: list[dict], expected: list[dict], rel: float = 0.0) -> None:
    """Same test steps, batch sizes and answers (statistics equal up to ``rel``)."""
    assert [(r["step"], r["batch_size"], r["new_batch_size"], r["passed"]) for r in history] \
        == [(r["step"], r["batch_size"], r["new_batch_size"], r["passed"]) for r in expected]
    for got, want in zip(history, expected):
        if want["statistic"] is None:
            assert got["statistic"] is None
        else:
            assert abs(got["statistic"] - want["statistic"]) <= rel * abs(want["statistic"])


def assert_two_ranks_match_one(ranks: list[dict], want: dict, estimator: str,
                                steps: int = 8) -> None:
    """(d) of every framework: each of 2 ranks trained on its half of the same global batches
    (no sample twice), the decisions and weights are those of 1 process (``want``), and DDP
    all-reduced once per step (the last micro-batch; the tiny model is one bucket), never on a
    step MicroBatchStats measured (it averages by hand)."""
    for r0, r1, batch in zip(ranks[0]["batches"], ranks[1]["batches"], want["batches"]):
        assert len(r0) == len(r1) == len(batch) // 2
        assert sorted(r0 + r1) == sorted(batch)
    assert_same_decisions(ranks[0]["history"], want["history"], rel=1e-6)
    assert ranks[0]["history"] == ranks[1]["history"]
    assert ranks[0]["params"] == ranks[1]["params"]
    assert max(abs(a - b) for a, b in zip(ranks[0]["params"], want["params"])) < 1e-5
    measured = sum(1 for h in want["history"] if h["statistic"] is not None)
    expected = steps if estimator == "per-sample" else steps - measured
    assert ranks[0]["allreduces"] == ranks[1]["allreduces"] == expected


def assert_epoch_covered(batches: list[list[int]]) -> None:
    """The first len(dataset) samples of the stream are a permutation (each sample once)."""
    stream = [i for b in batches for i in b]
    assert len(stream) >= N
    assert sorted(stream[:N]) == list(range(N))


ALLREDUCES = [0]  # DDP gradient all-reduces of this process (comm_hook below)


def counting_hook(state, bucket):  # type: ignore[no-untyped-def]
    """A DDP communication hook: the default all-reduce, counted (no annotations: DDP
    checks them against dist.GradBucket and a postponed one is a string)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    ALLREDUCES[0] += 1
    return allreduce_hook(state, bucket)
