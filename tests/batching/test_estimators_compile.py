"""PerSampleStats on a model wrapped by torch.compile (the estimator's conv fusion replaces
``module.forward`` inside ``measure()``; the compiled wrapper must still see the hooks)."""

from __future__ import annotations

import copy
import logging
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adabatch.batching import PerSampleStats


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, 1, 1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
    ).double()


@pytest.mark.slow
def test_compiled_model_gives_the_eager_statistics():
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(2))
    eager, inner = _model(), _model()
    compiled = torch.compile(inner)
    ests = [PerSampleStats(eager), PerSampleStats(inner)]
    for _ in range(2):  # a second step: the compiled code is reused, the hooks still fire
        out = []
        for model, call, est in zip((eager, inner), (eager, compiled), ests):
            model.zero_grad()
            with est.measure():
                F.cross_entropy(call(x), y).backward()
            out.append(est.stats())
        a, b = out
        for name in ("grad_sq_norm", "variance_trace", "ip_variance", "orth_variance"):
            assert math.isclose(getattr(a, name), getattr(b, name), rel_tol=1e-10), name
        assert a.variance_trace > 0
        for ca, cb in zip(a.coord_variance, b.coord_variance):
            assert torch.allclose(ca, cb, rtol=1e-10, atol=0)


# -- the README's recipe: one graph while the batch grows -------------------------------------

README = Path(__file__).resolve().parents[2] / "README.md"


class CompileEvents:
    """What dynamo does inside the ``with``: ``graphs`` (distinct graphs compiled),
    ``recompiles`` (a frame compiled again after a guard failed, from dynamo's "recompiles"
    log) and ``breaks`` (graph breaks). Resets dynamo's caches on entry."""

    def __enter__(self) -> CompileEvents:
        import torch._dynamo
        from torch._dynamo.utils import counters

        torch._dynamo.reset()
        counters.clear()
        self._messages: list[str] = []
        self._handler = logging.Handler()
        self._handler.emit = lambda record: self._messages.append(record.getMessage())
        torch._logging.set_logs(recompiles=True)
        self._logger = logging.getLogger("torch._dynamo.guards.__recompiles")
        self._logger.addHandler(self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        from torch._dynamo.utils import counters

        self._logger.removeHandler(self._handler)
        torch._logging.set_logs()
        self.graphs = counters["stats"]["unique_graphs"]
        self.breaks = sum(counters["graph_break"].values())
        self.recompiles = sum(m.startswith("Recompiling") for m in self._messages)


def readme_compile_loop() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    loops = [b for b in blocks if "torch.compile(model)" in b and "MicroBatchStats" in b]
    assert len(loops) == 1, "the README must hold one torch.compile loop"
    return loops[0]


def _exec(source: str) -> dict:
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(source, str(README), "exec"), namespace)
    return namespace


@pytest.mark.slow
def test_readme_compile_loop_keeps_one_graph_while_the_batch_grows_16_to_512():
    source = readme_compile_loop()
    # aot_eager: the compiled forward and backward of the default backend without its code
    # generation (inductor compiles the same graph; here its C++ build would dominate)
    compiled = source.replace("torch.compile(model)", 'torch.compile(model, backend="aot_eager")')
    assert compiled != source
    with CompileEvents() as events:
        ns = _exec(compiled)
    sizes = [h["batch_size"] for h in ns["controller"].history]
    assert ns["controller"].batch_size == 512 and min(sizes) == 16
    assert events.graphs <= 2 and events.recompiles <= 2, (events.graphs, events.recompiles)
    assert events.breaks == 0
    # the same decisions as the uncompiled loop
    eager = _exec(source.replace("torch.compile(model)", "model"))
    assert [h["batch_size"] for h in eager["controller"].history] == sizes
    for a, b in zip(ns["model"].parameters(), eager["model"].parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("track", ["hooks", "grad"])
def test_fixed_micro_batches_compile_once_as_the_batch_doubles_16_to_512(track):
    from adabatch.batching import AdaptiveBatchSampler, MicroBatchStats

    torch.manual_seed(0)
    x, y = torch.randn(1024, 20), torch.randint(0, 5, (1024,))
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))
    reference = copy.deepcopy(model)
    sampler = AdaptiveBatchSampler(len(x), 8, seed=0)
    ests = [MicroBatchStats(m, needs=("grad_sq_norm", "variance_trace"), track=track)
            for m in (model, reference)]
    with CompileEvents() as events:
        forward = torch.compile(model, backend="aot_eager")
        for B in (16, 32, 64, 128, 256, 512, 512):
            idx_all = sampler.take(B)
            out = []
            for call, m, est in zip((forward, reference), (model, reference), ests):
                m.zero_grad(set_to_none=True)
                with est.step(True) as step:
                    for idx in idx_all:
                        assert len(idx) == 8  # one shape, also across the epoch boundary
                        with step.micro_batch(len(idx)):
                            (F.cross_entropy(call(x[idx]), y[idx]) * len(idx) / B).backward()
                out.append(est.stats())
            a, b = out
            assert math.isclose(a.variance_trace, b.variance_trace, rel_tol=1e-5)
            assert math.isclose(a.grad_sq_norm, b.grad_sq_norm, rel_tol=1e-5)
    assert sampler.epoch > 1  # the batches crossed an epoch boundary
    assert events.graphs <= 2 and events.recompiles <= 2, (events.graphs, events.recompiles)
    assert events.breaks == 0
