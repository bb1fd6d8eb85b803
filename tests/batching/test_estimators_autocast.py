"""PerSampleStats under torch.autocast (CPU, bfloat16 and float16): autocast casts a layer's
input inside the layer, so the hooks keep it in float32 while the output gradient comes back
in the low precision. Every layer path must take the two dtypes together (the sequence Linear
once multiplied them as they were and raised), and the fused convolution must run and
differentiate in the dtype autocast gives it (it once saved the uncast input and raised in
the backward under float16). The statistics agree with a float64 run to the precision of the
dtype, and the fused convolution's gradients with those of the plain autocast backward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adabatch.batching.estimators import PerSampleStats
from adabatch.batching.stats import STAT_NAMES

#: relative agreement with float64 expected of each dtype (measured up to 7e-3 for bfloat16
#: and 1e-3 for float16 on these models)
TOL = {torch.bfloat16: 5e-2, torch.float16: 1e-2}
SCALARS = ("grad_sq_norm", "variance_trace", "ip_variance", "orth_variance")


class _Sequence(nn.Module):
    """Linear layers on [b, T, in] (the materialising and ghost paths), a LayerNorm."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 16)
        self.norm = nn.LayerNorm(16)
        self.b = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        h = torch.relu(self.b(self.norm(self.a(x))))
        return self.head(h.mean(1))


def _model(name):
    torch.manual_seed(0)
    if name == "cnn":
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2),
                             nn.GroupNorm(2, 8), nn.Flatten(), nn.Linear(72, 4))
    return _Sequence()


def _data(name):
    gen = torch.Generator().manual_seed(1)
    shape = (3, 10, 10) if name == "cnn" else (5, 6)
    return torch.randn(24, *shape, generator=gen), torch.randint(0, 4, (24,), generator=gen)


def _measure(model, x, y, dtype, **kw):
    est = PerSampleStats(model, needs=STAT_NAMES, **kw)
    model.zero_grad()
    with est.measure():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            out = model(x)
        F.cross_entropy(out.float(), y).backward()
    stats = est.stats()
    est.remove()
    return stats


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("name", ["cnn", "sequence"])
def test_statistics_under_autocast_agree_with_float64(name, dtype, fuse):
    model = _model(name)
    x, y = _data(name)
    ref = _measure(copy.deepcopy(model).double(), x.double(), y, None)
    got = _measure(model, x, y, dtype, fuse_conv_grad=fuse)
    for field in SCALARS:
        assert getattr(got, field) == pytest.approx(getattr(ref, field), rel=TOL[dtype]), field
    flat = torch.cat([v.reshape(-1).double() for v in got.coord_variance])
    want = torch.cat([v.reshape(-1) for v in ref.coord_variance])
    assert (flat - want).abs().max() <= TOL[dtype] * want.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_fused_convolution_gradients_under_autocast(dtype):
    """p.grad through the fused convolution (its weight gradient summed from the per-sample
    ones in float32) against the plain autocast backward (the backend's, in the low
    precision), in the parameters' dtype; and the input gradient, which the fused backward
    takes from the backend in the cast dtypes."""
    model = _model("cnn")
    twin = copy.deepcopy(model)
    x, y = _data("cnn")
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    est = PerSampleStats(model, needs={"variance_trace"})
    assert est.fused_convs
    with est.measure():
        with torch.autocast("cpu", dtype=dtype):
            out = model(x1)
        F.cross_entropy(out.float(), y).backward()
    with torch.autocast("cpu", dtype=dtype):
        out = twin(x2)
    F.cross_entropy(out.float(), y).backward()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert p.grad.dtype == p.dtype == torch.float32
        torch.testing.assert_close(p.grad, q.grad, rtol=TOL[dtype], atol=TOL[dtype] *
                                   float(q.grad.abs().max()))
    assert x1.grad.dtype == torch.float32
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=1e-6 * float(x2.grad.abs().max()))
