"""Worker of tests/distributed/test_fsdp2_stats.py, run by torchrun with 2 processes (gloo).

Six float64 models (:data:`MODELS`: an MLP with uneven shards, a language model whose
Embedding and output Linear share one Parameter, an MLP with frozen parameters, the CLI's
``charlm`` with its blocks sharded one by one, and a block with nn.MultiheadAttention, which
PerSampleStats recomputes sample by sample, sharded with the block or on its own inside it)
measure both estimators (:data:`ESTIMATORS`) with every statistic over three steps of a
global batch of 16 samples, 8 per rank in micro-batches of unequal sizes (:data:`SIZES`):
step 1 with gradient sync after every micro-batch, the others accumulating without sync
(``set_requires_gradient_sync(False)``) until the last micro-batch. The same models under DDP
(``no_sync`` until the last micro-batch) measure the same steps. Rank 0 writes the gathered
statistics, the batch tests' ratios, the policies' state, the refused constructions and the
bytes handed to collectives (ours and FSDP2's) as JSON to argv[1].

The original case (``"steps"``, ``"ddp_steps"``, ``"bytes"``): the MLP with MicroBatchStats
and the norm and coordinate needs (:data:`NEEDS`).
"""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from adabatch.batching import PerSampleStats, _microbatch, _sharded
from adabatch.batching.batch_tests import (
    AugmentedInnerProductTest,
    CoordinateNormTest,
    InnerProductTest,
    NormTest,
    OrthogonalityTest,
)
from adabatch.batching.policies import CriticalBatchSize, Goodput
from adabatch.batching.stats import STAT_NAMES, GradientStats
from adabatch.train.models import create_model

#: per step, per rank: the sizes of its micro-batches (8 samples each rank; rank r takes rows
#: 8r..8r+7 of the step's 16); the last step has one micro-batch per rank (M = 2 in all)
SIZES = [{0: [3, 5], 1: [2, 6]}, {0: [3, 5], 1: [2, 6]}, {0: [8], 1: [8]}]
NEEDS = ("grad_sq_norm", "variance_trace", "coord_variance", "mean_grad")
ALL = tuple(sorted(STAT_NAMES))
MODELS = ("mlp", "tied", "frozen", "charlm", "attn", "attn_unit")
ESTIMATORS = ("micro", "persample")
VOCAB, TOKENS = 11, 4


class TiedLM(nn.Module):
    """Embedding -> residual Linear -> LayerNorm -> Linear to the vocabulary, the output
    layer's weight the Embedding's Parameter (tied)."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, 6)
        self.mix = nn.Linear(6, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, VOCAB, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x)
        return self.head(self.norm(h + torch.tanh(self.mix(h))))


class AttnBlock(nn.Module):
    """nn.MultiheadAttention (PerSampleStats recomputes it sample by sample with torch.func)
    and a Linear, sharded together by one fully_shard."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.ff = nn.Linear(6, 6)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a, _ = self.attn(h, h, h, need_weights=False)
        return h + self.ff(torch.tanh(h + a))


class AttnNet(nn.Module):
    """[n, 7] -> two tokens of 6 -> :class:`AttnBlock` -> mean over the tokens -> [n, 3]."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(7, 12)
        self.block = AttnBlock()
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.block(self.inp(x).reshape(-1, 2, 6)).mean(1))


def make_model(name: str = "mlp") -> nn.Module:
    torch.manual_seed(0)
    if name == "tied":
        return TiedLM().double()
    if name in ("attn", "attn_unit"):
        model = AttnNet().double()
        model.attn_unit = name == "attn_unit"  # fully_shard on the attention itself too
        return model
    if name == "charlm":  # the CLI's language model: pre-LN blocks, positions, tied output
        return create_model("charlm", (TOKENS,), VOCAB, d_model=8, layers=2,
                            heads=2).double()
    if name == "frozen":  # a frozen weight beside its trainable bias, and a frozen layer
        model = nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(),
                              nn.Linear(5, 3)).double()
        model[0].weight.requires_grad_(False)
        model[2].requires_grad_(False)
        return model
    return nn.Sequential(nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def shard(model: nn.Module, **options) -> nn.Module:
    """fully_shard on every layer with parameters (not the tied ones), then the root."""
    if getattr(model, "attn_unit", False):
        fully_shard(model.block.attn, **options)
    for name, m in model.named_children():
        if name == "blocks":
            for block in m:
                fully_shard(block, **options)
        elif any(True for _ in m.parameters()) and name not in ("tok", "head"):
            fully_shard(m, **options)
    fully_shard(model, **options)
    return model


def data(name: str = "mlp") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if name in ("tied", "charlm"):
        return (torch.randint(0, VOCAB, (3, 16, TOKENS), generator=g),
                torch.randint(0, VOCAB, (3, 16, TOKENS), generator=g))
    return (torch.randn(3, 16, 7, generator=g, dtype=torch.float64),
            torch.randn(3, 16, 3, generator=g, dtype=torch.float64))


def loss_of(name: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if name in ("tied", "charlm"):
        return nn.functional.cross_entropy(out.reshape(-1, VOCAB), y.reshape(-1))
    return nn.functional.mse_loss(out, y.to(out.dtype))


def make_estimator(kind: str, model: nn.Module, needs=ALL, reduce=None):
    if kind == "persample":
        return PerSampleStats(model, needs=needs, reduce=reduce)
    return _microbatch.MicroBatchStats(model, needs=needs, reduce=reduce, track="hooks")


def train(model: nn.Module, est, sync, name: str = "mlp", rank: int | None = None
          ) -> Iterator[GradientStats]:
    """The steps of :data:`SIZES`: on rank ``rank``'s 8 samples, or (None) on all 16 in one
    process (rank 0's micro-batches, then rank 1's); ``sync(step, i, last)`` is the context
    of micro-batch i's backward. Yields each step's statistics."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs, ys = data(name)
    for step, per_rank in enumerate(SIZES):
        rows = slice(0, 16) if rank is None else slice(8 * rank, 8 * rank + 8)
        sizes = per_rank[0] + per_rank[1] if rank is None else per_rank[rank]
        total = sum(sizes)
        x, y = xs[step, rows], ys[step, rows]
        opt.zero_grad()
        with est.step() as scope:
            start = 0
            for i, n in enumerate(sizes):
                with sync(step, i, i == len(sizes) - 1), scope.micro_batch(n):
                    sl = slice(start, start + n)
                    loss = loss_of(name, model(x[sl]), y[sl]) * n / total
                    loss.backward()
                start += n
        yield est.stats()
        opt.step()


def _attempt(fn: Callable[[], object]) -> object:
    try:
        return fn()
    except Exception as e:  # recorded for the test
        return f"{type(e).__name__}: {e}"


def coord_ratios(stats) -> dict:
    return {str(how): _attempt(lambda how=how: CoordinateNormTest(0.5, how).ratio(stats))
            for how in ("max", "mean", ("quantile", 0.9))}


def test_ratios(stats) -> dict:
    """The ratio of every batch test that the statistics allow (all ranks call them)."""
    tests = {"norm": NormTest(0.5), "ip": InnerProductTest(0.5),
             "orth": OrthogonalityTest(0.5), "aip": AugmentedInnerProductTest(0.5, 0.5)}
    out = {k: t.ratio(stats) for k, t in tests.items() if t.needs <= _present(stats)}
    if stats.coord_variance is not None:
        out.update({f"coord_{k}": v for k, v in coord_ratios(stats).items()})
    return out


def _present(stats) -> set[str]:
    return {k for k in STAT_NAMES if getattr(stats, k) is not None}


def record(stats, full=lambda t: t) -> dict:
    """The statistics as JSON (``full`` turns a result tensor into the whole tensor)."""
    out: dict = {"batch_size": stats.batch_size}
    for k in ("grad_sq_norm", "variance_trace", "ip_variance", "orth_variance"):
        if getattr(stats, k) is not None:
            out[k] = getattr(stats, k)
    for k in ("coord_variance", "mean_grad"):
        if getattr(stats, k) is not None:
            out[k] = [full(v).tolist() for v in getattr(stats, k)]
    out["ratios"] = test_ratios(stats)
    return out


def run_steps(steps: Iterator[GradientStats], full, counter: dict[str, int] | None = None
              ) -> tuple[list[dict], list[dict], list]:
    """Records, bytes per step (``counter`` zeroed before each) and the policies' states
    after the steps (CriticalBatchSize and Goodput updated with each step's statistics)."""
    policies = [CriticalBatchSize(4, 1000, smoothing=0.5), Goodput(4, 1000, smoothing=0.5)]
    records, nbytes = [], []
    while True:
        if counter is not None:
            for k in counter:
                counter[k] = 0
        stats = next(steps, None)
        if stats is None:
            break
        records.append(record(stats, full))
        if counter is not None:
            nbytes.append(dict(counter))
        with warnings.catch_warnings():  # "no positive estimate" (frozen model): recorded
            warnings.simplefilter("ignore", RuntimeWarning)
            for p in policies:
                if stats.variance_trace is not None:
                    p.update(stats)
    state = [[p.batch_size, p.ema_variance, p.ema_grad_sq] for p in policies]
    return records, nbytes, state


def count_bytes(counter: dict[str, int]) -> None:
    """Count the bytes of the whole (unsharded) tensors of FSDP2's collectives and of ours:
    a reduce-scatter's input, an all-gather's output."""
    def wrap(mod, name: str, key: str, arg: int, kw: str) -> None:
        inner = getattr(mod, name)

        def counted(*args, **kwargs):
            t = args[arg] if len(args) > arg else kwargs[kw]
            counter[key] += t.numel() * t.element_size()
            return inner(*args, **kwargs)
        setattr(mod, name, counted)
    wrap(dist, "reduce_scatter_single", "fsdp_reduce_scatter", 1, "input")
    wrap(dist, "all_gather_single", "fsdp_all_gather", 0, "output")
    wrap(_sharded, "reduce_scatter", "stats_reduce_scatter", 0, "full")
    wrap(_sharded, "all_gather", "stats_all_gather", 0, "shard")


def refusals(model: nn.Module) -> dict:
    """What the estimators refuse under FSDP2 (type and message of each error)."""
    mbs = _microbatch.MicroBatchStats
    cases = {
        "track_grad": lambda: mbs(model, needs=NEEDS, reduce=sum),
        "no_reduce": lambda: mbs(model, needs=NEEDS, track="hooks"),
        "params_list": lambda: mbs(list(model.parameters()), needs=NEEDS, reduce=sum,
                                   track="hooks"),
        "persample_no_reduce": lambda: PerSampleStats(model, needs=ALL),
        "hsdp_micro": lambda: mbs(_hsdp(), needs=NEEDS, reduce=sum, track="hooks"),
        "hsdp_persample": lambda: PerSampleStats(_hsdp(), needs=ALL, reduce=sum),
    }
    return {name: str(_attempt(make)) for name, make in cases.items()}


def _hsdp() -> nn.Module:
    """The MLP under HSDP: a 2-D mesh (replicated x sharded), placements (Replicate, Shard)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1, dist.get_world_size()), mesh_dim_names=("rep", "shard"))
    return fully_shard(make_model(), mesh=mesh)


def _fsdp_sync(model: nn.Module):
    @contextlib.contextmanager
    def sync(step: int, i: int, last: bool):  # step 0: sync each micro-batch; then not
        model.set_requires_gradient_sync(step == 0 or last)
        yield
    return sync


def run_case(name: str, kind: str, needs, counter: dict[str, int]) -> dict:
    """One model and estimator under FSDP2 and under DDP (the same steps)."""
    ddp = DistributedDataParallel(make_model(name))
    est = make_estimator(kind, ddp.module, needs, dist.all_reduce)

    def ddp_sync(step: int, i: int, last: bool):
        return contextlib.nullcontext() if last else ddp.no_sync()
    ddp_records, _, ddp_state = run_steps(
        train(ddp, est, ddp_sync, name, dist.get_rank()), lambda t: t)
    est.remove()

    model = shard(make_model(name))

    def reduce(flat: torch.Tensor) -> None:
        counter["stats_all_reduce"] += flat.numel() * flat.element_size()
        dist.all_reduce(flat)
    est = make_estimator(kind, model, needs, reduce)
    records, nbytes, state = run_steps(
        train(model, est, _fsdp_sync(model), name, dist.get_rank()),
        lambda t: t.full_tensor(), counter)
    est.remove()
    return {"fsdp2": records, "ddp": ddp_records, "bytes": nbytes,
            "policies": {"fsdp2": state, "ddp": ddp_state},
            "param_numel": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def run_mixed(kind: str) -> list[dict]:
    """The MLP in float32 under FSDP2 with bfloat16 compute (MixedPrecisionPolicy): the
    hooks see bfloat16 gradients, the statistics stay in float32."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                  output_dtype=torch.float32)
    model = shard(make_model("mlp").float(), mp_policy=policy)
    est = make_estimator(kind, model, ALL, dist.all_reduce)
    steps = train(model, est, _fsdp_sync(model), "mlp", dist.get_rank())
    records = []
    for stats in steps:
        records.append({**record(stats, lambda t: t.full_tensor()),
                        "dtypes": [str(t.dtype) for t in stats.coord_variance]})
    est.remove()
    return records


def main(out: str) -> None:
    dist.init_process_group("gloo")
    counter = {k: 0 for k in ("fsdp_reduce_scatter", "fsdp_all_gather", "stats_reduce_scatter",
                              "stats_all_gather", "stats_all_reduce")}
    count_bytes(counter)
    result: dict = {"refusals": refusals(shard(make_model()))}
    first = run_case("mlp", "micro", NEEDS, counter)
    result.update(steps=first["fsdp2"], ddp_steps=first["ddp"], bytes=first["bytes"],
                  param_numel=first["param_numel"])
    result["cases"] = {f"{name}/{kind}": run_case(name, kind, ALL, counter)
                       for name in MODELS for kind in ESTIMATORS}
    result["mixed"] = {kind: run_mixed(kind) for kind in ESTIMATORS}
    result["norm_only"] = {kind: run_case("mlp", kind, ("grad_sq_norm", "variance_trace"),
                                          counter)["bytes"] for kind in ESTIMATORS}
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
