"""AdaBelief: agreement with adabelief-pytorch 0.2.1, the fixes over it, the optimizer contract."""

from __future__ import annotations

import contextlib
import copy
import functools
import io
import itertools
from typing import Any

import pytest
import torch
from adabelief_pytorch import AdaBelief as Reference

from adabatch.optim import adabelief as ab
from adabatch.optim.adabelief import AdaBelief

IMPLS = {"for-loop": dict(foreach=False, fused=False), "foreach": dict(foreach=True, fused=False)}


def quiet_reference(params: Any, **kw: Any) -> Reference:
    """adabelief-pytorch 0.2.1 prints on construction; keep the test output clean."""
    with contextlib.redirect_stdout(io.StringIO()):
        return Reference(params, print_change_log=False, **kw)


def make_model(seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(
        dtype
    )


def groups_of(model: torch.nn.Module) -> list[dict[str, Any]]:
    first, *rest = list(model.parameters())
    return [{"params": [first]}, {"params": rest, "lr": 5e-3}]


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    for _ in range(steps):
        x = torch.randn(16, 5, generator=gen, dtype=torch.float64).to(dtype)
        y = torch.randn(16, 3, generator=gen, dtype=torch.float64).to(dtype)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


# ----------------------------------------------------------------- agreement with 0.2.1
DECAYS = {
    "no-decay": dict(weight_decay=0.0),
    "decoupled": dict(weight_decay=1e-2),
    "fixed": dict(weight_decay=1e-2, fixed_decay=True),
    "l2": dict(weight_decay=1e-2, weight_decouple=False),
}
RECTIFY = {
    "plain": dict(rectify=False),
    "plain-amsgrad": dict(rectify=False, amsgrad=True),
    "rect-sgd": dict(rectify=True, degenerated_to_sgd=True),
    "rect-nosgd": dict(rectify=True, degenerated_to_sgd=False),
}
CONFIGS = {f"{d}-{r}": {**DECAYS[d], **RECTIFY[r]} for d, r in itertools.product(DECAYS, RECTIFY)}
CONFIGS["eps1e-8-rect"] = dict(eps=1e-8)
CONFIGS["betas-0.5-0.9-rect"] = dict(betas=(0.5, 0.9), weight_decay=1e-3)
CONFIGS["betas-0.5-0.9-plain-l2"] = dict(betas=(0.5, 0.9), rectify=False, weight_decouple=False)


@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_matches_adabelief_pytorch_021(config: str) -> None:
    kw = {"lr": 1e-2, "eps": 1e-16, **CONFIGS[config]}
    ref_model = make_model()
    ref = quiet_reference(groups_of(ref_model), **kw)
    train(ref_model, ref, 60)
    for impl in IMPLS.values():
        model = make_model()
        opt = AdaBelief(groups_of(model), **kw, **impl)
        train(model, opt, 60)
        for p, q in zip(model.parameters(), ref_model.parameters()):
            assert_rel_close(p, q, 1e-10)
            for key in ("exp_avg", "exp_avg_var", "max_exp_avg_var"):
                if key in ref.state[q]:
                    assert_rel_close(opt.state[p][key], ref.state[q][key], 1e-10)
            assert opt.state[p]["step"].item() == ref.state[q]["step"] == 60


# ----------------------------------------------------------------- fixes over 0.2.1
def manual_adabelief(
    p: torch.Tensor, grads: list[torch.Tensor], lr: float, betas: tuple[float, float], eps: float
) -> torch.Tensor:
    """Rectified AdaBelief with amsgrad written out for one tensor (the docstring's math)."""
    b1, b2 = betas
    p = p.clone()
    m, s, vmax = torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)
    rho_inf = 2 / (1 - b2) - 1
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        s = b2 * s + (1 - b2) * (g - m) ** 2 + eps
        vmax = torch.maximum(vmax, s)
        rho = rho_inf - 2 * t * b2**t / (1 - b2**t)
        if rho >= 5:
            r = (
                (1 - b2**t)
                * (rho - 4)
                * (rho - 2)
                * rho_inf
                / ((rho_inf - 4) * rho * (rho_inf - 2))
            ) ** 0.5
            p = p - lr * r / (1 - b1**t) * m / (vmax.sqrt() + eps)
        else:
            p = p - lr / (1 - b1**t) * m
    return p


@pytest.mark.parametrize("impl", list(IMPLS))
def test_amsgrad_takes_effect_with_rectify(impl: str) -> None:
    # large gradients first, then small ones: the running max keeps the denominator large
    gen = torch.Generator().manual_seed(3)
    grads = [
        torch.randn(6, generator=gen, dtype=torch.float64) * (10.0 if t < 8 else 0.1)
        for t in range(20)
    ]
    start = torch.randn(6, generator=gen, dtype=torch.float64)
    results = {}
    for amsgrad in (False, True):
        p = torch.nn.Parameter(start.clone())
        opt = AdaBelief([p], lr=1e-2, betas=(0.9, 0.99), amsgrad=amsgrad, **IMPLS[impl])
        for g in grads:
            p.grad = g.clone()
            opt.step()
        results[amsgrad] = p.detach()
    expected = manual_adabelief(start, grads, 1e-2, (0.9, 0.99), 1e-16)
    assert_rel_close(results[True], expected, 1e-10)
    assert (results[True] - results[False]).abs().max() > 1e-6
    # 0.2.1 silently ignores amsgrad when rectify=True
    q = torch.nn.Parameter(start.clone())
    ref = quiet_reference([q], lr=1e-2, betas=(0.9, 0.99), amsgrad=True)
    for g in grads:
        q.grad = g.clone()
        ref.step()
    assert_rel_close(q.detach(), results[False], 1e-10)


STEP_CONFIGS = {
    "default": {},
    "l2-maximize-amsgrad": dict(
        weight_decouple=False, weight_decay=1e-2, maximize=True, amsgrad=True
    ),
    "plain-fixed": dict(rectify=False, fixed_decay=True, weight_decay=1e-2),
}


@pytest.mark.parametrize("config", list(STEP_CONFIGS))
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_never_touches_grad_nor_reallocates(
    config: str, impl: str, dtype: torch.dtype
) -> None:
    model = make_model(dtype=dtype)
    opt = AdaBelief(model.parameters(), lr=1e-2, **STEP_CONFIGS[config], **IMPLS[impl])
    params = list(model.parameters())
    ptrs = [p.data_ptr() for p in params]
    before = [p.detach().clone() for p in params]
    x = torch.randn(8, 5, dtype=dtype)
    for _ in range(7):
        opt.zero_grad()
        model(x).square().mean().backward()
        grads = [p.grad.clone() for p in params]
        grad_ptrs = [p.grad.data_ptr() for p in params]
        opt.step()
        for p, g, gp in zip(params, grads, grad_ptrs):
            assert torch.equal(p.grad, g)
            assert p.grad.data_ptr() == gp
    assert [p.data_ptr() for p in params] == ptrs
    assert all(p.dtype == dtype for p in params)
    assert any(not torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_keeps_float32_state_and_math(impl: str, dtype: torch.dtype) -> None:
    """Each step equals the float32 step from the rounded parameter, rounded once."""
    gen = torch.Generator().manual_seed(0)
    low = torch.nn.Parameter(torch.randn(4, 3, generator=gen).to(dtype))
    high = torch.nn.Parameter(low.detach().float())
    kw = dict(lr=1e-2, amsgrad=True, weight_decay=1e-2, **IMPLS[impl])
    opt_low, opt_high = AdaBelief([low], **kw), AdaBelief([high], **kw)
    for _ in range(8):
        g = torch.randn(4, 3, generator=gen).to(dtype)
        low.grad, high.grad = g, g.float()
        with torch.no_grad():
            high.copy_(low.float())
        opt_low.step()
        opt_high.step()
        assert torch.equal(low.detach(), high.detach().to(dtype))
        for key in ("exp_avg", "exp_avg_var", "max_exp_avg_var"):
            assert opt_low.state[low][key].dtype == torch.float32
            assert torch.equal(opt_low.state[low][key], opt_high.state[high][key])


@pytest.mark.parametrize("impl", list(IMPLS))
def test_complex_params_behave_like_view_as_real(impl: str) -> None:
    gen = torch.Generator().manual_seed(0)
    z = torch.nn.Parameter(torch.randn(3, 2, generator=gen, dtype=torch.complex128))
    r = torch.nn.Parameter(torch.view_as_real(z.detach()).clone())
    kw = dict(lr=1e-2, amsgrad=True, weight_decay=1e-2, maximize=True, **IMPLS[impl])
    opt_z, opt_r = AdaBelief([z], **kw), AdaBelief([r], **kw)
    for _ in range(8):
        g = torch.randn(3, 2, generator=gen, dtype=torch.complex128)
        z.grad, r.grad = g, torch.view_as_real(g).clone()
        opt_z.step()
        opt_r.step()
    assert torch.equal(torch.view_as_real(z.detach()), r.detach())
    for key in ("exp_avg", "exp_avg_var", "max_exp_avg_var"):
        assert opt_z.state[z][key].is_complex()
        assert torch.equal(torch.view_as_real(opt_z.state[z][key]), opt_r.state[r][key])


def test_every_flag_in_param_groups_and_state_dict() -> None:
    model = make_model()
    opt = AdaBelief(
        [{"params": model[0].parameters(), "rectify": False}, {"params": model[2].parameters()}],
        amsgrad=True,
        weight_decouple=False,
        maximize=True,
        foreach=True,
    )
    sd = opt.state_dict()
    for group in (*opt.param_groups, *sd["param_groups"]):
        for flag in ab._FLAGS:
            assert flag in group
    assert sd["param_groups"][0]["rectify"] is False
    assert sd["param_groups"][1]["rectify"] is True
    assert all(
        g["amsgrad"] and g["maximize"] and not g["weight_decouple"] for g in sd["param_groups"]
    )


def test_per_group_flags_take_effect() -> None:
    a, b = make_model(), make_model()
    opt_a = AdaBelief(
        [{"params": a[0].parameters(), "rectify": False}, {"params": a[2].parameters()}]
    )
    opt_b0 = AdaBelief(b[0].parameters(), rectify=False)
    opt_b2 = AdaBelief(b[2].parameters())
    x = torch.randn(8, 5, dtype=torch.float64)
    for _ in range(6):
        for m, opts in ((a, [opt_a]), (b, [opt_b0, opt_b2])):
            for o in opts:
                o.zero_grad()
            m(x).square().mean().backward()
            for o in opts:
                o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_nothing_printed(capsys: pytest.CaptureFixture[str]) -> None:
    model = make_model()
    opt = AdaBelief(model.parameters(), amsgrad=True, weight_decay=1e-2)
    train(model, opt, 3)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


# ------------------------------------------------ compile, capturable, differentiable
@pytest.mark.parametrize("impl", list(IMPLS))
def test_compiled_training_step_does_not_recompile(impl: str) -> None:
    """20 compiled steps of forward, backward and AdaBelief: at most 2 graphs.

    Recompilation is decided by Dynamo's guards before any backend runs, so a counting
    backend that runs the captured graph eagerly measures it exactly while avoiding
    inductor's C++ compile time (tens of seconds on this machine). The results must equal
    eager execution.
    """
    import torch._dynamo

    compiles = 0

    def counting_backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        nonlocal compiles
        compiles += 1
        return gm.forward

    def run(compiled: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        opt = AdaBelief(model.parameters(), lr=1e-2, amsgrad=True, **IMPLS[impl])
        x, y = torch.randn(16, 4), torch.randn(16, 1)

        def train_step() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            return loss.detach()

        step = torch.compile(train_step, backend=counting_backend) if compiled else train_step
        return torch.stack([step() for _ in range(20)])

    torch._dynamo.reset()
    try:
        compiled = run(True)
    finally:
        torch._dynamo.reset()
    assert 1 <= compiles <= 2
    torch.testing.assert_close(compiled, run(False), rtol=1e-6, atol=1e-7)
    assert compiled[-1] < compiled[0]


@pytest.mark.parametrize("impl", list(IMPLS))
def test_capturable_matches_host_path(impl: str) -> None:
    kw = dict(lr=1e-2, amsgrad=True, weight_decay=1e-2, **IMPLS[impl])
    a, b = make_model(), make_model()
    opt_a = AdaBelief(a.parameters(), capturable=True, **kw)
    opt_b = AdaBelief(b.parameters(), **kw)
    train(a, opt_a, 10)  # crosses the rectification threshold (step 5)
    train(b, opt_b, 10)
    for p, q in zip(a.parameters(), b.parameters()):
        assert opt_a.state[p]["step"].device == p.device
        assert_rel_close(p, q, 1e-12)
        assert_rel_close(opt_a.state[p]["exp_avg_var"], opt_b.state[q]["exp_avg_var"], 1e-12)


def test_capturable_accepts_tensor_lr() -> None:
    a, b = make_model(), make_model()
    opt_a = AdaBelief(a.parameters(), lr=torch.tensor(1e-2, dtype=torch.float64), capturable=True)
    opt_b = AdaBelief(b.parameters(), lr=1e-2)
    train(a, opt_a, 7)
    train(b, opt_b, 7)
    for p, q in zip(a.parameters(), b.parameters()):
        assert_rel_close(p, q, 1e-12)


def test_differentiable_step_gradcheck() -> None:
    gen = torch.Generator().manual_seed(0)
    p0 = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    m0 = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    s0 = torch.rand(5, generator=gen, dtype=torch.float64).add(0.1).requires_grad_()

    def one_step(p0: torch.Tensor, grad: torch.Tensor, m0: torch.Tensor, s0: torch.Tensor) -> Any:
        p = p0.clone()
        p.grad = grad
        opt = AdaBelief([p], lr=1e-1, eps=1e-8, weight_decay=1e-2, differentiable=True)
        # step 10: the rectified, adaptive branch
        opt.state[p].update(step=torch.tensor(9.0), exp_avg=m0.clone(), exp_avg_var=s0.clone())
        opt.step()
        return p, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_var"]

    out = one_step(p0, grad, m0, s0)
    assert all(t.requires_grad for t in out)
    assert torch.autograd.gradcheck(one_step, (p0, grad, m0, s0))


# ----------------------------------------------------------------- foreach == for-loop
FOREACH_CONFIGS = {
    "default": {},
    "amsgrad-rect-wd": dict(amsgrad=True, weight_decay=1e-2),
    "l2-maximize-plain": dict(
        weight_decouple=False, weight_decay=1e-2, maximize=True, rectify=False
    ),
    "plain-amsgrad-fixed": dict(rectify=False, amsgrad=True, fixed_decay=True, weight_decay=1e-2),
    "rect-nosgd": dict(degenerated_to_sgd=False, betas=(0.8, 0.99)),
}


@pytest.mark.parametrize("config", list(FOREACH_CONFIGS))
def test_foreach_matches_for_loop(config: str) -> None:
    gen = torch.Generator().manual_seed(0)
    # one empty, one cut into 3 CPU pieces
    shapes = [(3, 4), (0,), (5,), (2, 3, 2), (2 * ab._CPU_BLOCK + 37,)]
    start = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    waves = ab._cpu_waves([start])
    assert [owners for owners, _ in waves] == [[0, 1, 2, 3, 4], [4], [4]]  # cut in 3 pieces
    runs = {}
    for name, impl in IMPLS.items():
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = AdaBelief(params, lr=1e-2, **FOREACH_CONFIGS[config], **impl)
        g = torch.Generator().manual_seed(1)
        for step in range(8):
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
                if step == 3 and i == 2:
                    p.grad = None
            opt.step()
        runs[name] = (params, opt)
    (pa, oa), (pb, ob) = runs["for-loop"], runs["foreach"]
    for p, q in zip(pa, pb):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
        assert oa.state[p].keys() == ob.state[q].keys()
        for key in oa.state[p]:
            torch.testing.assert_close(oa.state[p][key], ob.state[q][key], rtol=1e-10, atol=1e-14)
    assert oa.state[pa[2]]["step"].item() == 7 and oa.state[pa[0]]["step"].item() == 8


# ----------------------------------------------------------------- state_dict
@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_state_dict_round_trip_in_lockstep(impl: str, dtype: torch.dtype) -> None:
    kw = dict(lr=1e-2, amsgrad=True, weight_decay=1e-2, **IMPLS[impl])
    a = make_model(dtype=dtype)
    opt_a = AdaBelief(a.parameters(), **kw)
    train(a, opt_a, 5)
    buf = io.BytesIO()
    torch.save(opt_a.state_dict(), buf)
    b = copy.deepcopy(a)
    opt_b = AdaBelief(b.parameters(), **kw)
    opt_b.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    for q in b.parameters():
        assert opt_b.state[q]["exp_avg_var"].dtype == (
            torch.float32 if dtype == torch.bfloat16 else dtype
        )
        assert opt_b.state[q]["step"].dtype == torch.float32
    train(a, opt_a, 5, seed=7)
    train(b, opt_b, 5, seed=7)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
        for key in opt_a.state[p]:
            assert torch.equal(opt_a.state[p][key], opt_b.state[q][key])


@pytest.mark.parametrize(
    "config",
    [dict(), dict(weight_decouple=False, weight_decay=1e-2, rectify=False, amsgrad=True)],
    ids=["default", "l2-plain-amsgrad"],
)
def test_loads_adabelief_pytorch_021_state_dict(config: dict[str, Any]) -> None:
    kw = dict(lr=1e-2, **config)
    ref_model = make_model()
    ref = quiet_reference(groups_of(ref_model), **kw)
    train(ref_model, ref, 10)
    sd = copy.deepcopy(ref.state_dict())  # as if saved: load_state_dict keeps tensors
    assert "buffer" in sd["param_groups"][0]
    model = copy.deepcopy(ref_model)
    # 0.2.1 keeps weight_decouple / rectify / ... outside its state dict: they come from here
    opt = AdaBelief(groups_of(model), **kw)
    opt.load_state_dict(sd)
    assert all("buffer" not in g for g in opt.param_groups)
    assert opt.param_groups[1]["lr"] == 5e-3
    for group in opt.param_groups:
        for flag, value in config.items():
            assert group[flag] == value
    for p in model.parameters():
        assert torch.is_tensor(opt.state[p]["step"]) and opt.state[p]["step"].item() == 10
    train(ref_model, ref, 10, seed=5)
    train(model, opt, 10, seed=5)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert_rel_close(p, q, 1e-10)


def test_setstate_fills_flags_of_older_pickles() -> None:
    p = torch.nn.Parameter(torch.ones(2))
    opt = AdaBelief([p])
    p.grad = torch.ones(2)
    opt.step()
    old_group = {k: v for k, v in opt.param_groups[0].items() if k not in ab._FLAGS}
    old_state = {"step": 1, **{k: v for k, v in opt.state[p].items() if k != "step"}}
    fresh = AdaBelief.__new__(AdaBelief)
    fresh.__setstate__({"defaults": {}, "state": {p: old_state}, "param_groups": [old_group]})
    group = fresh.param_groups[0]
    assert group["rectify"] is True and group["weight_decouple"] is True
    assert group["amsgrad"] is False and group["fused"] is None
    assert torch.is_tensor(fresh.state[p]["step"]) and fresh.state[p]["step"].item() == 1


def test_loading_adam_state_dict_says_what_is_missing() -> None:
    model = make_model()
    adam = torch.optim.Adam(model.parameters())
    train(model, adam, 2)
    opt = AdaBelief(model.parameters())
    with pytest.raises(ValueError, match=r"not an AdaBelief state dict.*lacks \['exp_avg_var'\]"):
        opt.load_state_dict(adam.state_dict())
    assert len(opt.state) == 0  # nothing half-loaded


# ----------------------------------------------------------------- GradScaler, schedulers, lr
@pytest.mark.parametrize("impl", list(IMPLS))
def test_grad_scaler_skips_non_finite_steps(impl: str) -> None:
    model, ref_model = make_model(dtype=torch.float32), make_model(dtype=torch.float32)
    opt = AdaBelief(model.parameters(), lr=1e-2, **IMPLS[impl])
    ref = AdaBelief(ref_model.parameters(), lr=1e-2, **IMPLS[impl])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = torch.randn(8, 5), torch.randn(8, 3)
    for step in range(4):
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        if step == 1:
            model[0].weight.grad[0, 0] = float("inf")
        before = [p.detach().clone() for p in model.parameters()]
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if step == 1:  # skipped: nothing moved, the scale halved
            assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
            assert scaler.get_scale() == scale / 2
        else:
            ref.zero_grad()
            torch.nn.functional.mse_loss(ref_model(x), y).backward()
            ref.step()
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert next(iter(opt.state.values()))["step"].item() == 3


def test_fused_protocol_arguments_on_non_fused_path() -> None:
    """grad_scale/found_inf set by a scaler are honoured by the foreach and for-loop paths."""
    for impl in IMPLS.values():
        p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
        opt, ref = AdaBelief([p], **impl), AdaBelief([q], **impl)
        p.grad, q.grad = torch.full((3,), 8.0), torch.full((3,), 2.0)
        opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(1.0)
        opt.step()
        assert torch.equal(p, torch.ones(3)) and len(opt.state) == 0
        opt.found_inf = torch.tensor(0.0)
        opt.step()
        ref.step()
        assert torch.equal(p, q)
        assert torch.equal(p.grad, torch.full((3,), 8.0))


def test_lr_scheduler_and_tensor_lr() -> None:
    a, b, c = make_model(), make_model(), make_model()
    opt_a = AdaBelief(a.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt_a, step_size=2, gamma=0.5)
    opt_b = AdaBelief(b.parameters(), lr=1e-2)
    opt_c = AdaBelief(c.parameters(), lr=torch.tensor(1e-2, dtype=torch.float64))
    for step in range(8):
        train(a, opt_a, 1, seed=step)
        sched.step()
        for opt, model in ((opt_b, b), (opt_c, c)):
            train(model, opt, 1, seed=step)
            for group in opt.param_groups:
                new = 1e-2 * 0.5 ** ((step + 1) // 2)
                if torch.is_tensor(group["lr"]):
                    group["lr"].fill_(new)
                else:
                    group["lr"] = new
    assert opt_a.param_groups[0]["lr"] == pytest.approx(1e-2 / 16)
    for p, q, r in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q)
        assert_rel_close(r, p, 1e-12)


# ----------------------------------------------------------------- validation, choice of core
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lr=-1e-3), r"Invalid learning rate: -0.001 \(must be >= 0\)"),
        (dict(eps=-1.0), r"Invalid epsilon value: -1.0 \(must be >= 0\)"),
        (dict(weight_decay=-0.1), r"Invalid weight_decay value: -0.1 \(must be >= 0\)"),
        (
            dict(betas=(1.0, 0.999)),
            r"Invalid beta parameter at index 0: 1.0 \(must be in \[0, 1\)\)",
        ),
        (
            dict(betas=(0.9, -0.1)),
            r"Invalid beta parameter at index 1: -0.1 \(must be in \[0, 1\)\)",
        ),
        (dict(betas=(0.9, 1.0)), r"Invalid beta parameter at index 1: 1.0 \(must be in \[0, 1\)\)"),
        (dict(foreach=True, fused=True), r"`fused` and `foreach` cannot be `True` together."),
    ],
)
def test_invalid_hyperparameters(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AdaBelief([torch.nn.Parameter(torch.ones(2))], **kwargs)


@pytest.mark.parametrize(
    ("betas", "error", "message"),
    [
        ((0.9,), ValueError, r"Invalid betas: \(0.9,\) \(must be a pair \(beta1, beta2\), got 1\)"),
        ((0.9, 0.99, 0.999), ValueError, r"Invalid betas: .* got 3\)"),
        (0.9, TypeError, r"Invalid betas: 0.9 \(must be a pair \(beta1, beta2\)\)"),
    ],
)
def test_betas_must_be_a_pair(betas: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        AdaBelief([torch.nn.Parameter(torch.ones(2))], betas=betas)


@pytest.mark.parametrize(
    ("state_dict", "error", "message"),
    [
        ({}, ValueError, r"Invalid state_dict: it lacks \['state', 'param_groups'\]"),
        ({"state": {}}, ValueError, r"Invalid state_dict: it lacks \['param_groups'\]"),
        ([], TypeError, r"Invalid state_dict: list \(must be a dict\)"),
    ],
)
def test_load_state_dict_refuses_what_is_not_a_state_dict(
    state_dict: Any, error: type[Exception], message: str
) -> None:
    p = torch.nn.Parameter(torch.ones(2))
    opt = AdaBelief([p])
    p.grad = torch.ones(2)
    opt.step()
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(error, match=message):
        opt.load_state_dict(state_dict)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert torch.equal(after["state"][0]["exp_avg"], before["state"][0]["exp_avg"])


def test_beta1_zero_warns() -> None:
    with pytest.warns(UserWarning, match=r"beta1 == 0: the residual g_t - m_t is always 0") as rec:
        AdaBelief([torch.nn.Parameter(torch.ones(2))], betas=(0.0, 0.999))
    assert rec[0].filename == __file__  # points at the caller


def test_sparse_gradients_rejected() -> None:
    emb = torch.nn.Embedding(4, 2, sparse=True)
    emb(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="AdaBelief does not support sparse gradients"):
        AdaBelief(emb.parameters()).step()


def test_fused_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ab, "_fused_module", lambda: None)
    p = torch.nn.Parameter(torch.ones(2))
    with pytest.raises(RuntimeError, match=r"fused=True requires the fused AdaBelief kernel"):
        AdaBelief([p], fused=True)
    opt = AdaBelief([p])  # fused=None falls back to foreach silently
    assert opt._implementation(opt.param_groups[0]) == "foreach"
    assert not getattr(opt, "_step_supports_amp_scaling", False)
    loop = AdaBelief([p], foreach=False)
    assert loop._implementation(loop.param_groups[0]) == "for-loop"


def test_implementation_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    def available(device: torch.device) -> bool:
        return device.type in ("cpu", "meta")

    cpu = [torch.ones(2)]
    choose = functools.partial(ab._choose_implementation, available=available)
    assert choose(cpu, foreach=None, fused=None, differentiable=False) == "fused"
    assert choose(cpu, foreach=True, fused=None, differentiable=False) == "foreach"
    assert choose(cpu, foreach=False, fused=None, differentiable=False) == "for-loop"
    assert choose(cpu, foreach=None, fused=False, differentiable=False) == "foreach"
    assert choose(cpu, foreach=None, fused=None, differentiable=True) == "for-loop"
    # one launch covers one device: a group on two devices keeps foreach
    two = [torch.ones(2), torch.ones(2, device="meta")]
    assert choose(two[1:], foreach=None, fused=None, differentiable=False) == "fused"
    assert choose(two, foreach=None, fused=None, differentiable=False) != "fused"
    # the class asks the same question (once per device and optimizer)
    asked = []
    monkeypatch.setattr(ab, "_fused_available", lambda d: asked.append(d) or available(d))
    opt = AdaBelief([torch.nn.Parameter(torch.ones(2))])
    assert opt._step_supports_amp_scaling is True
    assert opt._implementation(opt.param_groups[0]) == "fused"
    assert asked == [torch.device("cpu")]
