"""AdaGrad-Norm against a float64 reference loop written straight from the formula."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from adabatch.optim.adagradnorm import AdaGradNorm, adagradnorm

SHAPES = [(3, 4), (5,), (0,), (2, 2), (1,)]
STEPS = 8


def _data(seed: int = 0, shapes=SHAPES, steps: int = STEPS, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x0 = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=dtype) for s in shapes] for _ in range(steps)]
    grads[3][1] = None  # a step where one gradient is None
    grads[5][0] = None
    return x0, grads


def _reference(x0, grads, groups, per_group):
    """Plain Python/float64 AdaGrad-Norm. ``groups``: list of (indices, lr, b0, wd, maximize)."""
    xs = [x.clone() for x in x0]
    pools = [[g] for g in groups] if per_group else [groups]
    bsq = [pool[0][2] ** 2 for pool in pools]
    for gs in grads:
        for k, pool in enumerate(pools):
            dirs = {}
            for idx, _lr, _b0, wd, maximize in pool:
                for i in idx:
                    if gs[i] is None:
                        continue
                    g = -gs[i] if maximize else gs[i]
                    dirs[i] = g + wd * xs[i]
            if not dirs:
                continue
            bsq[k] = bsq[k] + sum(float((d * d).sum()) for d in dirs.values())
            b = math.sqrt(bsq[k])
            for idx, lr, _b0, _wd, _maximize in pool:
                for i in idx:
                    if i in dirs:
                        xs[i] = xs[i] - lr * dirs[i] / b
    return xs, bsq


def _run(x0, grads, group_specs, *, per_group=False, foreach=False, opt_out=None):
    params = [torch.nn.Parameter(x.clone()) for x in x0]
    param_groups = [
        {"params": [params[i] for i in idx], "lr": lr, "b0": b0, "weight_decay": wd, "maximize": mx}
        for idx, lr, b0, wd, mx in group_specs
    ]
    opt = AdaGradNorm(param_groups, per_group=per_group, foreach=foreach)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = None if g is None else g.clone()
        opt.step()
    if opt_out is not None:
        opt_out.append(opt)
    return params, opt


GROUPS = {
    "one_group": [([0, 1, 2, 3, 4], 0.5, 0.3, 0.0, False)],
    "wd": [([0, 1, 2, 3, 4], 0.5, 0.3, 0.1, False)],
    "maximize": [([0, 1, 2, 3, 4], 0.5, 0.3, 0.0, True)],
    "maximize_wd": [([0, 1, 2, 3, 4], 0.5, 0.3, 0.05, True)],
    "two_groups": [([0, 2], 0.5, 0.3, 0.0, False), ([1, 3, 4], 0.1, 0.7, 0.2, True)],
}


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("per_group", [False, True])
@pytest.mark.parametrize("case", sorted(GROUPS))
def test_matches_reference(case, per_group, foreach):
    x0, grads = _data()
    specs = GROUPS[case]
    params, opt = _run(x0, grads, specs, per_group=per_group, foreach=foreach)
    ref, bsq = _reference(x0, grads, specs, per_group)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r, rtol=1e-12, atol=1e-14)
    # the accumulators: in the state of each pool's first parameter
    holders = (
        [opt.param_groups[i]["params"][0] for i in range(len(specs))]
        if per_group
        else [opt.param_groups[0]["params"][0]]
    )
    assert len(holders) == len(bsq)
    for h, v in zip(holders, bsq):
        assert opt.state[h]["sum_sq"].item() == pytest.approx(v, rel=1e-13)
    # no other parameter has state
    assert sum(1 for s in opt.state.values() if s) == len(holders)


def test_global_norm_differs_from_per_group():
    """The scalar over ALL parameters is not the per-group accumulator (the test can fail)."""
    x0, grads = _data()
    specs = GROUPS["two_groups"]
    glob, _ = _run(x0, grads, specs, per_group=False)
    per, _ = _run(x0, grads, specs, per_group=True)
    assert not torch.allclose(glob[0], per[0])
    # with one group the two are the same method
    one = GROUPS["one_group"]
    a, _ = _run(x0, grads, one, per_group=False)
    b, _ = _run(x0, grads, one, per_group=True)
    for p, q in zip(a, b):
        assert torch.equal(p, q)


@pytest.mark.parametrize("case", ["one_group", "maximize_wd", "two_groups"])
@pytest.mark.parametrize("per_group", [False, True])
def test_foreach_matches_for_loop(case, per_group):
    """float64, 8 steps, a zero-size parameter, None grads: params and every state tensor."""
    x0, grads = _data(seed=1)
    a, oa = _run(x0, grads, GROUPS[case], per_group=per_group, foreach=False)
    b, ob = _run(x0, grads, GROUPS[case], per_group=per_group, foreach=True)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=1e-14, atol=0)
    sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
    assert sa.keys() == sb.keys() and len(sa) >= 1
    for k in sa:
        assert sa[k].keys() == sb[k].keys()
        for key in sa[k]:
            torch.testing.assert_close(sa[k][key], sb[k][key], rtol=1e-14, atol=0)


def test_functional_matches_class():
    x0, grads = _data(seed=2)
    params, _ = _run(x0, grads, GROUPS["wd"])
    xs = [x.clone() for x in x0]
    sum_sq = torch.tensor(0.3**2, dtype=torch.float64)
    for gs in grads:
        ps = [x for x, g in zip(xs, gs) if g is not None]
        adagradnorm(ps, [g for g in gs if g is not None], sum_sq, lr=0.5, weight_decay=0.1)
    for p, x in zip(params, xs):
        torch.testing.assert_close(p.detach(), x, rtol=1e-14, atol=0)


def test_first_step_and_zero_gradient():
    # b_1 includes g_1: the first step is lr * g / sqrt(b0^2 + ||g||^2), at most lr long
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = AdaGradNorm([p], lr=1.0, b0=1e-3)
    p.grad = torch.tensor([3.0, 4.0], dtype=torch.float64)
    opt.step()
    b = math.sqrt(1e-6 + 25.0)
    torch.testing.assert_close(p.detach(), torch.tensor([-3.0 / b, -4.0 / b], dtype=torch.float64))
    assert float(p.detach().norm()) < 1.0
    # a zero gradient: no NaN (b0 > 0), no move
    q = torch.nn.Parameter(torch.ones(3))
    opt = AdaGradNorm([q], lr=1.0)
    q.grad = torch.zeros(3)
    opt.step()
    assert torch.equal(q.detach(), torch.ones(3))


def test_all_grads_none_leaves_everything():
    p = torch.nn.Parameter(torch.ones(3))
    opt = AdaGradNorm([p], b0=0.5)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3))
    assert opt.state[p]["sum_sq"].item() == 0.25


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1.0}, r"Invalid learning rate: -1.0 \(must be >= 0\)"),
        ({"b0": 0.0}, r"Invalid b0 value: 0.0 \(must be > 0 and finite\)"),
        ({"b0": -0.1}, r"Invalid b0 value: -0.1 \(must be > 0 and finite\)"),
        ({"b0": math.inf}, r"Invalid b0 value: inf \(must be > 0 and finite\)"),
        ({"b0": math.nan}, r"Invalid b0 value: nan \(must be > 0 and finite\)"),
        ({"weight_decay": -0.5}, r"Invalid weight_decay value: -0.5 \(must be >= 0\)"),
        ({"b0": 1e-30}, r"Invalid b0 value: 1e-30 \(b0\*\*2 underflows to 0 in torch.float32\)"),
    ],
)
def test_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AdaGradNorm([torch.nn.Parameter(torch.ones(2))], **kwargs)


@pytest.mark.parametrize(
    ("group", "message"),
    [
        ({"lr": -2.0}, r"Invalid learning rate: -2.0 \(must be >= 0\)"),
        ({"b0": 0.0}, r"Invalid b0 value: 0.0 \(must be > 0 and finite\)"),
        ({"weight_decay": -1.0}, r"Invalid weight_decay value: -1.0 \(must be >= 0\)"),
    ],
)
def test_validation_of_group_values(group, message):
    p, q = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match=message):
        AdaGradNorm([{"params": [p], **group}])
    opt = AdaGradNorm([p])
    with pytest.raises(ValueError, match=message):
        opt.add_param_group({"params": [q], **group})
    assert len(opt.param_groups) == 1


def test_grad_scaler_skips_inf_steps():
    p = torch.nn.Parameter(torch.ones(3))
    opt = AdaGradNorm([p], lr=0.5, b0=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale((p * torch.tensor([1.0, 2.0, math.inf])).sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.equal(p.detach(), torch.ones(3)) and opt.state[p]["sum_sq"].item() == 0.25
    opt.zero_grad()
    scaler.scale((p * torch.tensor([3.0, 4.0, 0.0])).sum()).backward()
    scaler.step(opt)  # unscaled gradient (3, 4, 0): b^2 = 0.25 + 25
    assert opt.state[p]["sum_sq"].item() == pytest.approx(25.25)
    torch.testing.assert_close(
        p.detach(), 1 - 0.5 * torch.tensor([3.0, 4.0, 0.0]) / math.sqrt(25.25)
    )


def test_b0_tiny_is_fine_in_float64():
    opt = AdaGradNorm([torch.nn.Parameter(torch.ones(2, dtype=torch.float64))], b0=1e-30)
    assert next(iter(opt.state.values()))["sum_sq"].item() == pytest.approx(1e-60)


def test_flags_in_defaults_and_setstate():
    p = torch.nn.Parameter(torch.ones(2))
    opt = AdaGradNorm([p], per_group=True, maximize=True, foreach=False)
    for key in ("lr", "b0", "weight_decay", "per_group", "maximize", "foreach"):
        assert key in opt.defaults and key in opt.param_groups[0]
    state = opt.__getstate__()
    for key in ("per_group", "maximize", "foreach", "b0"):
        del state["param_groups"][0][key]
    opt2 = AdaGradNorm([torch.nn.Parameter(torch.ones(2))])
    opt2.__setstate__(state)
    assert opt2.param_groups[0]["per_group"] is False
    assert opt2.param_groups[0]["maximize"] is False
    assert opt2.param_groups[0]["foreach"] is None


def test_grad_and_storage_untouched():
    p = torch.nn.Parameter(torch.randn(4, 3))
    g = torch.randn(4, 3)
    p.grad = g.clone()
    ptr = p.data_ptr()
    AdaGradNorm([p], weight_decay=0.3, maximize=True).step()
    assert torch.equal(p.grad, g)
    assert p.data_ptr() == ptr


@pytest.mark.parametrize("foreach", [False, True])
def test_complex_is_view_as_real(foreach):
    gen = torch.Generator().manual_seed(3)
    z0 = torch.randn(4, 3, dtype=torch.complex128, generator=gen)
    r0 = torch.randn(5, dtype=torch.float64, generator=gen)
    zs = [torch.randn(4, 3, dtype=torch.complex128, generator=gen) for _ in range(7)]
    rs = [torch.randn(5, dtype=torch.float64, generator=gen) for _ in range(7)]
    pz, pr = torch.nn.Parameter(z0.clone()), torch.nn.Parameter(r0.clone())
    qz = torch.nn.Parameter(torch.view_as_real(z0).clone())
    qr = torch.nn.Parameter(r0.clone())
    o1 = AdaGradNorm([pz, pr], lr=0.3, weight_decay=0.1, foreach=foreach)
    o2 = AdaGradNorm([qz, qr], lr=0.3, weight_decay=0.1, foreach=foreach)
    for gz, gr in zip(zs, rs):
        pz.grad, pr.grad = gz.clone(), gr.clone()
        qz.grad, qr.grad = torch.view_as_real(gz).clone(), gr.clone()
        o1.step()
        o2.step()
    torch.testing.assert_close(torch.view_as_real(pz.detach()), qz.detach(), rtol=1e-14, atol=0)
    torch.testing.assert_close(pr.detach(), qr.detach(), rtol=1e-14, atol=0)
    assert o1.state[pz]["sum_sq"].dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("foreach", [False, True])
def test_low_precision_float32_math(dtype, foreach):
    gen = torch.Generator().manual_seed(4)
    p = torch.nn.Parameter(torch.randn(6, 5, generator=gen).to(dtype))
    q = torch.nn.Parameter(torch.randn(7, generator=gen).to(dtype))
    opt = AdaGradNorm([p, q], lr=0.1, b0=0.2, weight_decay=0.01, foreach=foreach)
    acc = opt.state[p]["sum_sq"]
    assert acc.dtype == torch.float32
    bsq = torch.tensor(0.04, dtype=torch.float32)
    for _ in range(3):
        gp = torch.randn(6, 5, generator=gen).to(dtype)
        gq = torch.randn(7, generator=gen).to(dtype)
        p.grad, q.grad = gp, gq
        dp = gp.float() + 0.01 * p.detach().float()
        dq = gq.float() + 0.01 * q.detach().float()
        bsq = bsq + (dp.square().sum() + dq.square().sum())
        exp_p = (p.detach().float() - 0.1 * dp / bsq.sqrt()).to(dtype)
        exp_q = (q.detach().float() - 0.1 * dq / bsq.sqrt()).to(dtype)
        ptr = p.data_ptr()
        opt.step()
        assert p.data_ptr() == ptr and p.dtype == dtype
        # float32 math then one rounding to the parameter dtype: at most one ulp apart
        torch.testing.assert_close(p.detach(), exp_p, rtol=1e-2, atol=1e-3)
        torch.testing.assert_close(q.detach(), exp_q, rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(opt.state[p]["sum_sq"], bsq, rtol=1e-5, atol=0)
    # the accumulator keeps float32 (not the parameter's dtype) through a state_dict round trip
    sd = copy.deepcopy(opt.state_dict())
    p2 = torch.nn.Parameter(p.detach().clone())
    q2 = torch.nn.Parameter(q.detach().clone())
    opt2 = AdaGradNorm([p2, q2], lr=0.1, b0=0.2, weight_decay=0.01, foreach=foreach)
    opt2.load_state_dict(sd)
    assert opt2.state[p2]["sum_sq"].dtype == torch.float32
    assert torch.equal(opt2.state[p2]["sum_sq"], opt.state[p]["sum_sq"])


def test_mixed_dtypes_global_accumulator_is_float64():
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = AdaGradNorm([a, b])
    assert opt.state[a]["sum_sq"].dtype == torch.float64
    a.grad, b.grad = torch.ones(3), torch.ones(2, dtype=torch.float64)
    opt.step()
    assert opt.state[a]["sum_sq"].item() == pytest.approx(0.01 + 5.0)
    assert a.dtype == torch.float32


def _lstsq_setup(seed=0):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(32, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(6, generator=gen, dtype=torch.float64)
    y = A @ w + 0.1 * torch.randn(32, generator=gen, dtype=torch.float64)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 1)).double()
    return A, y, model


def _train(model, opt, A, y, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(A).squeeze(-1) - y).square().mean()
        loss.backward()
        opt.step()
    return loss.item()


@pytest.mark.parametrize("per_group", [False, True])
def test_state_dict_round_trip_lockstep(per_group):
    A, y, model = _lstsq_setup()
    model_b = copy.deepcopy(model)

    def make(m):
        groups = [{"params": m[0].parameters()}, {"params": m[1].parameters(), "lr": 0.3}]
        return AdaGradNorm(groups, lr=0.5, weight_decay=1e-3, per_group=per_group)

    opt_a, opt_b = make(model), make(model_b)
    _train(model, opt_a, A, y, 5)
    _train(model_b, opt_b, A, y, 5)
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    _, _, model_c = _lstsq_setup(seed=9)  # different initial weights, overwritten below
    model_c.load_state_dict(ckpt["model"])
    opt_c = make(model_c)
    opt_c.load_state_dict(ckpt["opt"])
    _train(model, opt_a, A, y, 6)
    _train(model_c, opt_c, A, y, 6)
    for p, q in zip(model.parameters(), model_c.parameters()):
        assert torch.equal(p, q)
    sa, sc = opt_a.state_dict(), opt_c.state_dict()
    assert sa["param_groups"] == sc["param_groups"]
    assert sa["state"].keys() == sc["state"].keys()
    for k in sa["state"]:
        assert torch.equal(sa["state"][k]["sum_sq"], sc["state"][k]["sum_sq"])
    # the loaded accumulator is a copy: stepping does not change the checkpoint
    assert not torch.equal(
        ckpt["opt"]["state"][0]["sum_sq"], opt_c.state[model_c[0].weight]["sum_sq"]
    )


def test_state_dict_before_first_step_has_accumulator():
    p = torch.nn.Parameter(torch.ones(2))
    q = torch.nn.Parameter(torch.ones(2))
    opt = AdaGradNorm([p], b0=0.5, per_group=True)
    opt.add_param_group({"params": [q], "b0": 2.0})
    st = opt.state_dict()["state"]
    assert st[0]["sum_sq"].item() == 0.25 and st[1]["sum_sq"].item() == 4.0


def test_loading_other_optimizer_state_raises_and_keeps_state():
    p = torch.nn.Parameter(torch.ones(3))
    adam = torch.optim.Adam([torch.nn.Parameter(torch.ones(3))])
    adam.param_groups[0]["params"][0].grad = torch.ones(3)
    adam.step()
    opt = AdaGradNorm([p], b0=0.5)
    with pytest.raises(ValueError, match="not an AdaGradNorm state_dict: no accumulator 'sum_sq'"):
        opt.load_state_dict(adam.state_dict())
    assert opt.state[p]["sum_sq"].item() == 0.25
    assert "betas" not in opt.param_groups[0]


def test_loss_decreases_and_lr_scheduler():
    A, y, model = _lstsq_setup()
    opt = AdaGradNorm(model.parameters(), lr=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    with torch.no_grad():
        start = (model(A).squeeze(-1) - y).square().mean().item()
    for _ in range(30):
        _train(model, opt, A, y, 1)
        sched.step()
    end = _train(model, opt, A, y, 1)
    assert end < 0.1 * start
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * 0.5**3)


def test_sparse_gradient_rejected():
    emb = torch.nn.Embedding(5, 2, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="AdaGradNorm does not support sparse gradients"):
        AdaGradNorm(emb.parameters()).step()
