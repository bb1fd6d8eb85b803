"""PerSampleStats on a model wrapped by torch.compile (the estimator's conv fusion replaces
``module.forward`` inside ``measure()``; the compiled wrapper must still see the hooks)."""

from __future__ import annotations

import math

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
