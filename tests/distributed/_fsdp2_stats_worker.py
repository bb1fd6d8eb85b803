"""Worker of tests/distributed/test_fsdp2_stats.py, run by torchrun with 2 processes (gloo).

An FSDP2 (fully_shard) float64 MLP with uneven shards measures MicroBatchStats
(track="hooks") over two steps of a global batch of 16 samples, 8 per rank in micro-batches
of unequal sizes: step 1 with gradient sync after every micro-batch, step 2 accumulating
without sync (``set_requires_gradient_sync(False)``) until the last micro-batch. Rank 0
writes the gathered statistics, the coordinate-test ratios and the bytes handed to
collectives (ours and FSDP2's reduce-scatter) as JSON to argv[1].
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from adabatch.batching import _microbatch
from adabatch.batching.batch_tests import CoordinateNormTest, NormTest

#: per rank: the sizes of its micro-batches (8 samples each rank; rank r takes rows 8r..8r+7)
SIZES = {0: [3, 5], 1: [2, 6]}
NEEDS = ("grad_sq_norm", "variance_trace", "coord_variance", "mean_grad")


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randn(2, 16, 7, generator=g, dtype=torch.float64),
            torch.randn(2, 16, 3, generator=g, dtype=torch.float64))


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


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    model = make_model()
    fully_shard(model[0])
    fully_shard(model[2])
    fully_shard(model)
    result: dict = {"steps": [], "bytes": [], "refusals": refusals(model)}
    counter = {"fsdp_reduce_scatter": 0, "stats_reduce_scatter": 0, "stats_all_reduce": 0}

    def reduce(flat: torch.Tensor) -> None:
        counter["stats_all_reduce"] += flat.numel() * flat.element_size()
        dist.all_reduce(flat)
    est = _microbatch.MicroBatchStats(model, needs=NEEDS, reduce=reduce, track="hooks")
    count_bytes(counter)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs, ys = data()
    for step in range(2):
        x, y = xs[step, 8 * rank:8 * rank + 8], ys[step, 8 * rank:8 * rank + 8]
        sizes = SIZES[rank]
        opt.zero_grad()
        for k in counter:
            counter[k] = 0
        with est.step() as scope:
            start = 0
            for i, n in enumerate(sizes):
                model.set_requires_gradient_sync(step == 0 or i == len(sizes) - 1)
                with scope.micro_batch(n):
                    sl = slice(start, start + n)
                    loss = nn.functional.mse_loss(model(x[sl]), y[sl]) * n / 8
                    loss.backward()
                start += n
        stats = est.stats()
        coord = [v.full_tensor().tolist() for v in stats.coord_variance]
        mean = [g.full_tensor().tolist() for g in stats.mean_grad]
        result["steps"].append({
            "batch_size": stats.batch_size, "grad_sq_norm": stats.grad_sq_norm,
            "variance_trace": stats.variance_trace, "coord_variance": coord,
            "mean_grad": mean, "norm_ratio": NormTest(0.5).ratio(stats),
            "coord_ratio": coord_ratios(stats)})
        result["bytes"].append(dict(counter))
        opt.step()
    if rank == 0:
        result["param_numel"] = sum(p.numel() for p in model.parameters())
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
