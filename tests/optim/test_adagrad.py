"""torch.optim.Adagrad(eps=0, lr_decay=0, initial_accumulator_value=b0**2) is the paper's
AdaGrad."""

from __future__ import annotations

import math

import pytest
import torch

from adabatch.optim.adagrad import adagrad

SHAPES = [(3, 4), (5,), (0,), (2, 3)]
STEPS = 9


def _data(seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x0 = [torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES]
    grads = [[torch.randn(s, generator=gen, dtype=dtype) for s in SHAPES] for _ in range(STEPS)]
    grads[2][1] = None
    grads[4][3] = None
    # a coordinate whose gradient stays exactly 0 (0/0 without b0 > 0)
    for gs in grads:
        if gs[0] is not None:
            gs[0][0, 0] = 0.0
    return x0, grads


def _reference(x0, grads, lr, b0, wd=0.0, maximize=False):
    """Straight from b_kj^2 = b_(k-1)j^2 + g_kj^2, x_kj = x_(k-1)j - lr g_kj / b_kj."""
    xs = [x.clone() for x in x0]
    bsq = [torch.full_like(x, b0**2) for x in x0]
    for gs in grads:
        for i, g in enumerate(gs):
            if g is None:
                continue
            g = (-g if maximize else g) + wd * xs[i]
            bsq[i] = bsq[i] + g * g
            xs[i] = xs[i] - lr * g / torch.sqrt(bsq[i])
    return xs, bsq


def _run(x0, grads, **kw):
    params = [torch.nn.Parameter(x.clone()) for x in x0]
    opt = adagrad(params, **kw)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = None if g is None else g.clone()
        opt.step()
    return params, opt


IMPLS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
CONFIGS = {
    "plain": {"lr": 0.3, "b0": 0.1},
    "tiny_b0": {"lr": 0.3, "b0": 1e-10},
    "wd": {"lr": 0.2, "b0": 0.5, "weight_decay": 0.1},
    "maximize": {"lr": 0.2, "b0": 0.5, "maximize": True},
    "maximize_wd": {"lr": 0.2, "b0": 0.5, "maximize": True, "weight_decay": 0.05},
}


@pytest.mark.parametrize("impl", sorted(IMPLS))
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_matches_reference(config, impl):
    x0, grads = _data()
    kw = CONFIGS[config]
    params, opt = _run(x0, grads, **kw, **IMPLS[impl])
    ref, bsq = _reference(
        x0, grads, kw["lr"], kw["b0"], kw.get("weight_decay", 0.0), kw.get("maximize", False)
    )
    for p, r, s in zip(params, ref, bsq):
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(opt.state[p]["sum"], s, rtol=1e-12, atol=0)


def test_for_loop_is_bitwise_reference_form():
    """The for-loop path is p + (-lr) * (g / sqrt(sum)); identical ops give identical bits."""
    x0, grads = _data(seed=1)
    params, _ = _run(x0, grads, lr=0.3, b0=0.2, foreach=False)
    xs = [x.clone() for x in x0]
    sums = [torch.full_like(x, 0.2**2) for x in x0]
    for gs in grads:
        for i, g in enumerate(gs):
            if g is not None:
                sums[i].addcmul_(g, g)
                xs[i].addcdiv_(g, sums[i].sqrt(), value=-0.3)
    for p, x in zip(params, xs):
        assert torch.equal(p.detach(), x)


def test_configuration():
    p = torch.nn.Parameter(torch.ones(2))
    opt = adagrad([p], lr=0.05, b0=0.3, weight_decay=0.01, maximize=True)
    assert type(opt) is torch.optim.Adagrad
    g = opt.param_groups[0]
    assert g["eps"] == 0.0 and g["lr_decay"] == 0.0
    assert g["initial_accumulator_value"] == pytest.approx(0.09)
    assert g["lr"] == 0.05 and g["weight_decay"] == 0.01 and g["maximize"] is True
    assert torch.equal(opt.state[p]["sum"], torch.full((2,), 0.3**2))


def test_b0_is_needed_with_eps_zero():
    """Why b0 > 0: torch's Adagrad with eps=0 and a zero accumulator computes 0/0."""
    p = torch.nn.Parameter(torch.ones(3))
    bad = torch.optim.Adagrad([p], lr=0.1, eps=0.0, initial_accumulator_value=0.0)
    p.grad = torch.tensor([1.0, 0.0, 2.0])
    bad.step()
    assert torch.isnan(p[1])
    q = torch.nn.Parameter(torch.ones(3))
    good = adagrad([q], lr=0.1)
    q.grad = torch.tensor([1.0, 0.0, 2.0])
    good.step()
    assert torch.isfinite(q).all() and q[1] == 1.0
    # first step with the default tiny b0 is lr * sign(g), as torch's default eps=1e-10 gives
    torch.testing.assert_close(q.detach(), torch.tensor([0.9, 1.0, 0.9]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -0.1}, r"Invalid learning rate: -0.1 \(must be >= 0\)"),
        ({"b0": 0.0}, r"Invalid b0 value: 0.0 \(must be > 0 and finite: with eps=0"),
        ({"b0": -1.0}, r"Invalid b0 value: -1.0 \(must be > 0 and finite"),
        ({"b0": math.nan}, r"Invalid b0 value: nan \(must be > 0 and finite"),
        ({"b0": math.inf}, r"Invalid b0 value: inf \(must be > 0 and finite"),
        ({"weight_decay": -1e-3}, r"Invalid weight_decay value: -0.001 \(must be >= 0\)"),
        ({"b0": 1e-30}, r"Invalid b0 value: 1e-30 \(b0\*\*2 underflows to 0 in torch.float32\)"),
    ],
)
def test_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        adagrad([torch.nn.Parameter(torch.ones(2))], **kwargs)


def test_float16_needs_larger_b0():
    p = torch.nn.Parameter(torch.ones(2, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"underflows to 0 in torch.float16"):
        adagrad([p])
    assert (adagrad([p], b0=1e-3).state[p]["sum"] > 0).all()


def test_params_forms():
    """Generators, param groups (with generators) and named parameters are all accepted."""
    model = torch.nn.Linear(3, 2)
    assert len(adagrad(model.parameters()).param_groups[0]["params"]) == 2
    opt = adagrad(
        [
            {"params": model.weight.unsqueeze(0).squeeze(0).detach().requires_grad_()},
            {"params": (p for p in [model.bias]), "lr": 0.5},
        ]
    )
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1]
    assert opt.param_groups[1]["lr"] == 0.5
    named = adagrad(model.named_parameters())
    assert len(named.param_groups[0]["params"]) == 2
    with pytest.raises(ValueError, match="empty parameter list"):
        adagrad([])


def test_complex_is_view_as_real():
    gen = torch.Generator().manual_seed(5)
    z0 = torch.randn(4, dtype=torch.complex128, generator=gen)
    gs = [torch.randn(4, dtype=torch.complex128, generator=gen) for _ in range(7)]
    pz = torch.nn.Parameter(z0.clone())
    pr = torch.nn.Parameter(torch.view_as_real(z0).clone())
    oz, orr = adagrad([pz], lr=0.2, b0=0.3), adagrad([pr], lr=0.2, b0=0.3)
    for g in gs:
        pz.grad, pr.grad = g.clone(), torch.view_as_real(g).clone()
        oz.step()
        orr.step()
    torch.testing.assert_close(torch.view_as_real(pz.detach()), pr.detach(), rtol=1e-14, atol=0)
