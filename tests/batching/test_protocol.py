"""The estimator protocol: one loop drives both estimators, and it is the old API's result."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adabatch.batching import Estimator, MicroBatchStats, PerSampleStats, StepScope
from adabatch.batching.stats import STAT_NAMES


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _data(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,),
                                                                               generator=g)


def _protocol_step(est, model, x, y, micro: int, measure: bool = True):
    for p in model.parameters():
        p.grad = None
    N = len(x)
    with est.step(measure=measure) as step:
        for lo in range(0, N, micro):
            xb, yb = x[lo:lo + micro], y[lo:lo + micro]
            with step.micro_batch(len(xb)):
                (F.cross_entropy(model(xb), yb) * len(xb) / N).backward()
    return step, (est.stats() if step.measuring else None)


def _old_step(est, model, x, y, micro: int):
    for p in model.parameters():
        p.grad = None
    N = len(x)
    for lo in range(0, N, micro):
        xb, yb = x[lo:lo + micro], y[lo:lo + micro]
        if isinstance(est, PerSampleStats):
            with est.measure():
                (F.cross_entropy(model(xb), yb) * len(xb) / N).backward()
        else:
            (F.cross_entropy(model(xb), yb) * len(xb) / N).backward()
            est.accumulate(len(xb))
    return est.stats()


def _same(a, b) -> None:
    for name in ("grad_sq_norm", "variance_trace", "ip_variance", "orth_variance"):
        va, vb = getattr(a, name), getattr(b, name)
        assert (va is None) == (vb is None), name
        if va is not None:
            assert math.isclose(va, vb, rel_tol=1e-12, abs_tol=1e-15), (name, va, vb)
    assert a.batch_size == b.batch_size
    for ca, cb in zip(a.coord_variance, b.coord_variance):
        torch.testing.assert_close(ca, cb, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("kind", ["per-sample", "micro-grad", "micro-hooks"])
def test_protocol_equals_the_low_level_api(kind: str) -> None:
    x, y = _data()
    model = _model()

    def make():
        if kind == "per-sample":
            return PerSampleStats(model, needs=STAT_NAMES)
        return MicroBatchStats(model, needs=STAT_NAMES, track=kind.split("-")[1])

    est = make()
    assert isinstance(est, Estimator)
    assert est.needs_local_grads is (kind != "per-sample")
    step, new = _protocol_step(est, model, x, y, micro=4)
    assert isinstance(step, StepScope) and step.micro_batches == 3 and step.samples == 12
    if kind == "micro-hooks":
        est.remove()
    old = _old_step(make(), model, x, y, micro=4)
    _same(new, old)
    assert new.batch_size == 12


@pytest.mark.parametrize("kind", ["per-sample", "micro-hooks"])
def test_unmeasured_step_records_nothing_and_leaves_grads_alone(kind: str) -> None:
    x, y = _data()
    model, plain = _model(), _model()
    est = (PerSampleStats(model, needs=STAT_NAMES) if kind == "per-sample"
           else MicroBatchStats(model, needs=STAT_NAMES, track="hooks"))
    step, stats = _protocol_step(est, model, x, y, micro=4, measure=False)
    assert stats is None and step.micro_batches == 0 and not step.measuring
    # a plain accumulation on an unhooked copy gives the same gradients bit for bit
    for lo in range(0, 12, 4):
        (F.cross_entropy(plain(x[lo:lo + 4]), y[lo:lo + 4]) * 4 / 12).backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p.grad, q.grad)
    # and the next measured step measures normally
    _, stats = _protocol_step(est, model, x, y, micro=4)
    assert stats is not None and stats.batch_size == 12


def test_hooks_enabled_flag_is_restored_after_a_step() -> None:
    model = _model()
    est = MicroBatchStats(model, needs=STAT_NAMES, track="hooks")
    est.enabled = False
    x, y = _data()
    _protocol_step(est, model, x, y, micro=6, measure=True)
    assert est.enabled is False


@pytest.mark.parametrize("kind", ["per-sample", "micro-grad", "micro-hooks"])
def test_one_micro_batch_per_step(kind: str) -> None:
    """One micro-batch per step: per-sample statistics as usual; MicroBatchStats refuses it
    (it would never decide), and its next step with 2 micro-batches works."""
    x, y = _data()
    model = _model()
    est = (PerSampleStats(model, needs=STAT_NAMES) if kind == "per-sample"
           else MicroBatchStats(model, needs=STAT_NAMES, track=kind.split("-")[1]))
    if kind == "per-sample":
        _, stats = _protocol_step(est, model, x, y, micro=12)
        assert stats is not None and math.isfinite(stats.variance_trace)
    else:
        with pytest.raises(ValueError, match="at least 2 micro-batches"):
            _protocol_step(est, model, x, y, micro=12)
        _, stats = _protocol_step(est, model, x, y, micro=6)
        assert stats is not None and math.isfinite(stats.variance_trace)
    # an unmeasured step of one micro-batch asks nothing of the estimator
    step, stats = _protocol_step(est, model, x, y, micro=12, measure=False)
    assert stats is None and not step.measuring


@pytest.mark.parametrize("bad, exc", [(0, ValueError), (-3, ValueError), (2.0, TypeError),
                                      (True, TypeError)])
def test_micro_batch_size_is_checked(bad, exc) -> None:
    est = PerSampleStats(_model(), needs=STAT_NAMES)
    with est.step() as step, pytest.raises(exc, match="micro_batch"):
        with step.micro_batch(bad):
            pass
