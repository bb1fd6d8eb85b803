"""Worker of tests/distributed/test_fsdp2_stats.py, run by torchrun with 2 processes (gloo).

An FSDP2 (fully_shard) float64 MLP with uneven shards measures MicroBatchStats
(track="hooks") over three steps of a global batch of 16 samples, 8 per rank in micro-batches
of unequal sizes (:data:`SIZES`): step 1 with gradient sync after every micro-batch, the
others accumulating without sync (``set_requires_gradient_sync(False)``) until the last
micro-batch. The same model under DDP (``no_sync`` until the last micro-batch) measures the
same steps. Rank 0 writes the gathered statistics, the coordinate-test ratios, the refused
constructions and the bytes handed to collectives (ours and FSDP2's reduce-scatter) as JSON
to argv[1].
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from adabatch.batching import _microbatch
from adabatch.batching.batch_tests import CoordinateNormTest, NormTest
from adabatch.batching.stats import GradientStats

#: per step, per rank: the sizes of its micro-batches (8 samples each rank; rank r takes rows
#: 8r..8r+7 of the step's 16); the last step has one micro-batch per rank (M = 2 in all)
SIZES = [{0: [3, 5], 1: [2, 6]}, {0: [3, 5], 1: [2, 6]}, {0: [8], 1: [8]}]
NEEDS = ("grad_sq_norm", "variance_trace", "coord_variance", "mean_grad")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(3, 16, 7, generator=g, dtype=torch.float64),
            torch.randn(3, 16, 3, generator=g, dtype=torch.float64))


def count_bytes(counter: dict[str, int]) -> None:
    """Count the bytes of the tensors handed to FSDP2's reduce-scatter and to ours."""
    rs = dist.reduce_scatter_single

    def fsdp_rs(output, input, *args, **kwargs):
        counter["fsdp_reduce_scatter"] += input.numel() * input.element_size()
        return rs(output, input, *args, **kwargs)
    dist.reduce_scatter_single = fsdp_rs
    ours = _microbatch._reduce_scatter

    def our_rs(full, like):
        counter["stats_reduce_scatter"] += full.numel() * full.element_size()
        return ours(full, like)
    _microbatch._reduce_scatter = our_rs


def coord_ratios(stats) -> dict:
    out = {}
    for reduce in ("max", "mean", ("quantile", 0.9)):
        try:
            out[str(reduce)] = CoordinateNormTest(0.5, reduce).ratio(stats)
        except Exception as e:  # recorded for the test
            out[str(reduce)] = f"{type(e).__name__}: {e}"
    return out


def refusals(model: nn.Module) -> dict:
    """What MicroBatchStats refuses under FSDP2 (type and message of each error)."""
    cases = {
        "track_grad": lambda: _microbatch.MicroBatchStats(model, needs=NEEDS, reduce=sum),
        "no_reduce": lambda: _microbatch.MicroBatchStats(model, needs=NEEDS, track="hooks"),
        "params_list": lambda: _microbatch.MicroBatchStats(
            list(model.parameters()), needs=NEEDS, reduce=sum, track="hooks"),
        "ip_variance": lambda: _microbatch.MicroBatchStats(
            model, needs=("ip_variance",), reduce=sum, track="hooks"),
    }
    out = {}
    for name, make in cases.items():
        try:
            make()
            out[name] = "no error"
        except Exception as e:  # recorded for the test
            out[name] = f"{type(e).__name__}: {e}"
    return out


def record(stats, full) -> dict:
    """The statistics as JSON (``full`` turns a result tensor into the whole tensor)."""
    return {"batch_size": stats.batch_size, "grad_sq_norm": stats.grad_sq_norm,
            "variance_trace": stats.variance_trace,
            "coord_variance": [full(v).tolist() for v in stats.coord_variance],
            "mean_grad": [full(g).tolist() for g in stats.mean_grad],
            "norm_ratio": NormTest(0.5).ratio(stats)}


def train(model: nn.Module, est, sync) -> Iterator[GradientStats]:
    """The steps of :data:`SIZES` on this rank's 8 samples; ``sync(step, i, last)`` is the
    context of micro-batch i's backward. Yields each step's statistics."""
    rank = dist.get_rank()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs, ys = data()
    for step, sizes in enumerate(s[rank] for s in SIZES):
        x, y = xs[step, 8 * rank:8 * rank + 8], ys[step, 8 * rank:8 * rank + 8]
        opt.zero_grad()
        with est.step() as scope:
            start = 0
            for i, n in enumerate(sizes):
                with sync(step, i, i == len(sizes) - 1), scope.micro_batch(n):
                    sl = slice(start, start + n)
                    loss = nn.functional.mse_loss(model(x[sl]), y[sl]) * n / 8
                    loss.backward()
                start += n
        yield est.stats()
        opt.step()


def run_fsdp2(result: dict) -> None:
    model = make_model()
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    result["refusals"] = refusals(model)
    counter = {"fsdp_reduce_scatter": 0, "stats_reduce_scatter": 0, "stats_all_reduce": 0}

    def reduce(flat: torch.Tensor) -> None:
        counter["stats_all_reduce"] += flat.numel() * flat.element_size()
        dist.all_reduce(flat)
    est = _microbatch.MicroBatchStats(model, needs=NEEDS, reduce=reduce, track="hooks")
    count_bytes(counter)

    @contextlib.contextmanager
    def sync(step: int, i: int, last: bool):  # step 0: sync each micro-batch; then not
        model.set_requires_gradient_sync(step == 0 or last)
        yield
    steps = train(model, est, sync)
    while True:
        for k in counter:
            counter[k] = 0
        stats = next(steps, None)
        if stats is None:
            break
        result["steps"].append({**record(stats, lambda t: t.full_tensor()),
                                "coord_ratio": coord_ratios(stats)})
        result["bytes"].append(dict(counter))
    result["param_numel"] = sum(p.numel() for p in model.parameters())


def run_ddp(result: dict) -> None:
    ddp = DistributedDataParallel(make_model())
    est = _microbatch.MicroBatchStats(ddp.module, needs=NEEDS, reduce=dist.all_reduce,
                                      track="hooks")

    def sync(step: int, i: int, last: bool):
        return contextlib.nullcontext() if last else ddp.no_sync()
    result["ddp_steps"] = [record(stats, lambda t: t) for stats in train(ddp, est, sync)]


def main(out: str) -> None:
    dist.init_process_group("gloo")
    result: dict = {"steps": [], "bytes": []}
    run_ddp(result)
    run_fsdp2(result)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
