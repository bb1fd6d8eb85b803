"""The registry, and one generic suite run over every configuration in ``optim_table.CASES``."""

from __future__ import annotations

import copy
import inspect
import io
import math

import pytest
import torch

from adabatch.optim import registry
from adabatch.optim.registry import OptimizerSpec, create, get_spec, list_optimizers

from .optim_table import CASES, case_ids

NAMES = {"adabelief", "adagrad", "adagradnorm", "adam", "adamw", "sgd", "momentum"}
PARAMS = [pytest.param(name, hp, id=cid) for cid, name, hp in CASES]


def _cases_with(flag: str) -> list:
    return [
        pytest.param(name, hp, id=cid) for cid, name, hp in CASES if getattr(get_spec(name), flag)
    ]


OURS = ("adabelief", "adagrad", "adagradnorm")  # torch's own accept lr=nan


# ---------------------------------------------------------------- the registry itself


def test_names_and_table_cover_registry():
    assert set(TRAIN_LR) == NAMES
    assert set(list_optimizers()) == NAMES
    assert list_optimizers() == sorted(NAMES)
    assert {name for _, name, _ in CASES} == NAMES
    assert len(set(case_ids())) == len(CASES)


def _target(name):
    from adabatch.optim.adabelief import AdaBelief
    from adabatch.optim.adagrad import adagrad
    from adabatch.optim.adagradnorm import AdaGradNorm

    return {
        "adabelief": AdaBelief,
        "adagrad": adagrad,
        "adagradnorm": AdaGradNorm,
        "adam": torch.optim.Adam,
        "adamw": torch.optim.AdamW,
        "sgd": torch.optim.SGD,
        "momentum": torch.optim.SGD,
    }[name]


@pytest.mark.parametrize("name", sorted(NAMES))
def test_spec_matches_factory_signature(name):
    """The accepted names are exactly the keywords of the class/factory behind the name."""
    spec = get_spec(name)
    sig = inspect.signature(_target(name))
    accepted = {k for k in sig.parameters if k != "params"}
    assert spec.hyperparameters == accepted
    assert "lr" in spec.defaults and spec.defaults["lr"] > 0
    assert spec.name == name and spec.description
    for flag, hp in [
        ("supports_foreach", "foreach"),
        ("supports_fused", "fused"),
        ("supports_maximize", "maximize"),
        ("supports_weight_decay", "weight_decay"),
    ]:
        assert getattr(spec, flag) == (hp in accepted), (name, flag)


def test_defaults_are_applied_and_overridable():
    p = [torch.nn.Parameter(torch.ones(2))]
    assert create("momentum", p).param_groups[0]["momentum"] == 0.9
    assert create("momentum", p, momentum=0.5).param_groups[0]["momentum"] == 0.5
    assert create("sgd", p).param_groups[0]["momentum"] == 0
    assert create("sgd", p, momentum=0.9).param_groups[0]["momentum"] == 0.9
    assert create("adamw", p).param_groups[0]["weight_decay"] == 1e-2
    assert create("adagradnorm", p).param_groups[0]["lr"] == 1.0
    assert type(create("adagrad", p)) is torch.optim.Adagrad
    assert create("adagrad", p, lr=0.5).param_groups[0]["lr"] == 0.5
    with pytest.raises(TypeError):
        get_spec("adam").defaults["lr"] = 1.0  # read-only


def test_unknown_name():
    with pytest.raises(
        ValueError,
        match=r"unknown optimizer 'adamx'; available: adabelief, "
        r"adagrad, adagradnorm, adam, adamw, momentum, sgd",
    ):
        create("adamx", [torch.nn.Parameter(torch.ones(1))])
    with pytest.raises(ValueError, match="unknown optimizer None"):
        get_spec(None)  # type: ignore[arg-type]


def test_unknown_hyperparameter():
    p = [torch.nn.Parameter(torch.ones(1))]
    with pytest.raises(
        ValueError,
        match=r"unknown hyperparameter\(s\) 'betas', 'moment' for optimizer 'sgd'; it accepts: "
        r"dampening, differentiable, foreach, fused, lr, maximize, momentum, nesterov, "
        r"weight_decay",
    ):
        create("sgd", p, moment=0.9, betas=(0.9, 0.99))
    with pytest.raises(ValueError, match=r"'b0' for optimizer 'adam'"):
        create("adam", p, b0=0.1)


def test_register_custom_and_spec_validation():
    spec = OptimizerSpec(
        name="test-rmsprop",
        factory=lambda params, **hp: torch.optim.RMSprop(params, **hp),
        defaults={"lr": 1e-2},
        description="RMSprop for this test",
        hyperparameters=frozenset({"lr", "alpha"}),
    )
    try:
        registry.register(spec)
        assert "test-rmsprop" in list_optimizers()
        opt = create("test-rmsprop", [torch.nn.Parameter(torch.ones(1))], alpha=0.5)
        assert isinstance(opt, torch.optim.RMSprop) and opt.param_groups[0]["alpha"] == 0.5
        with pytest.raises(ValueError, match="'test-rmsprop' is already registered"):
            registry.register(spec)
    finally:
        registry._REGISTRY.pop("test-rmsprop", None)
    assert "test-rmsprop" not in list_optimizers()
    with pytest.raises(ValueError, match=r"defaults \['momentum'\] are not among"):
        OptimizerSpec("x", torch.optim.SGD, {"momentum": 0.9}, "x", frozenset({"lr"}))
    with pytest.raises(ValueError, match="supports_fused=True but 'fused' is not"):
        OptimizerSpec("x", torch.optim.SGD, {}, "x", frozenset({"lr"}), supports_fused=True)


# ---------------------------------------------------------------- generic behaviour


def _problem(seed=0):
    """A small float64 least-squares problem with a two-layer linear model."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(32, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(6, generator=gen, dtype=torch.float64)
    y = A @ w + 0.1 * torch.randn(32, generator=gen, dtype=torch.float64)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Linear(4, 1)).double()
    return A, y, model


def _groups(model, lr):
    # two param groups; the second with half the learning rate
    return [
        {"params": list(model[0].parameters())},
        {"params": list(model[1].parameters()), "lr": lr / 2},
    ]


def _make(name, hp, model):
    lr = hp.get("lr", get_spec(name).defaults["lr"])
    return create(name, _groups(model, lr), **hp)


def _loss(model, A, y):
    return (model(A).squeeze(-1) - y).square().mean()


def _train(model, opt, A, y, steps):
    for _ in range(steps):
        opt.zero_grad()
        _loss(model, A, y).backward()
        opt.step()


# learning rates that make 40 steps on this problem meaningful (the defaults are for networks)
TRAIN_LR = {
    "adabelief": 0.03,
    "adam": 0.03,
    "adamw": 0.03,
    "adagrad": 0.1,
    "adagradnorm": 1.0,
    "sgd": 0.05,
    "momentum": 0.02,
}


def _loss_after(name, hp, steps):
    A, y, model = _problem()
    opt = _make(name, hp, model)
    with torch.no_grad():
        start = _loss(model, A, y).item()
    _train(model, opt, A, y, steps)
    with torch.no_grad():
        return start, _loss(model, A, y).item()


@pytest.mark.parametrize(("name", "hp"), PARAMS)
def test_loss_goes_down(name, hp):
    start, end = _loss_after(name, {**hp, "lr": TRAIN_LR[name]}, 40)
    assert math.isfinite(end) and end < 0.6 * start, (start, end)
    # the registry's default lr makes progress too
    start, end = _loss_after(name, hp, 40)
    assert math.isfinite(end) and end < start, (start, end)


@pytest.mark.parametrize(("name", "hp"), _cases_with("supports_maximize"))
def test_loss_goes_up_with_maximize(name, hp):
    start, end = _loss_after(name, {**hp, "lr": TRAIN_LR[name], "maximize": True}, 5)
    assert end > 1.1 * start, (start, end)


def _state_tensors(opt):
    """{(param index, key): tensor} for every tensor in the optimizer state."""
    sd = opt.state_dict()["state"]
    return {(i, k): v for i, s in sd.items() for k, v in s.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize(("name", "hp"), PARAMS)
def test_state_dict_round_trip_lockstep(name, hp):
    A, y, model_a = _problem()
    model_b = copy.deepcopy(model_a)
    opt_a, opt_b = _make(name, hp, model_a), _make(name, hp, model_b)
    _train(model_a, opt_a, A, y, 5)
    _train(model_b, opt_b, A, y, 5)
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    _, _, model_c = _problem(seed=1)
    model_c.load_state_dict(ckpt["model"])
    opt_c = _make(name, hp, model_c)
    opt_c.load_state_dict(ckpt["opt"])
    _train(model_a, opt_a, A, y, 6)
    _train(model_c, opt_c, A, y, 6)
    for p, q in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(p, q)
    sa, sc = _state_tensors(opt_a), _state_tensors(opt_c)
    assert sa.keys() == sc.keys()
    if get_spec(name).name != "sgd" or hp.get("momentum"):
        assert sa  # every optimizer here but plain SGD has state tensors
    for key in sa:
        assert torch.equal(sa[key], sc[key]), key
    assert opt_a.state_dict()["param_groups"] == opt_c.state_dict()["param_groups"]


SHAPES = [(4, 3), (0,), (5,), (2, 2), (3,)]


def _run_random(name, hp, steps=8, **impl):
    """float64 params incl. a zero-size one; random grads; one grad None on some steps."""
    gen = torch.Generator().manual_seed(7)
    params = [
        torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in SHAPES
    ]
    lr = hp.get("lr", get_spec(name).defaults["lr"])
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": lr / 3}]
    opt = create(name, groups, **{**hp, **impl})
    for k in range(steps):
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            p.grad = None if (i == 3 and k in (2, 5)) or (i == 0 and k == 4) else g
        opt.step()
    return params, opt


def _assert_same_run(a, b, rtol):
    (pa, oa), (pb, ob) = a, b
    for p, q in zip(pa, pb):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=rtol, atol=rtol * 1e-2)
    sa, sb = _state_tensors(oa), _state_tensors(ob)
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(
            sa[key].double(), sb[key].double(), rtol=rtol, atol=rtol * 1e-2, msg=str(key)
        )


@pytest.mark.parametrize(("name", "hp"), _cases_with("supports_foreach"))
def test_foreach_matches_for_loop(name, hp):
    ref = _run_random(name, hp, foreach=False)
    _assert_same_run(ref, _run_random(name, hp, foreach=True), rtol=1e-12)
    # the run moved every parameter that had a gradient, and differently per group
    assert not torch.equal(ref[0][2], _run_random(name, hp, steps=7, foreach=False)[0][2])


@pytest.mark.parametrize(("name", "hp"), _cases_with("supports_fused"))
def test_fused_matches_for_loop(name, hp):
    ref = _run_random(name, hp, foreach=False)
    _assert_same_run(ref, _run_random(name, hp, fused=True), rtol=1e-10)


@pytest.mark.parametrize(("name", "hp"), PARAMS)
def test_invalid_lr(name, hp):
    with pytest.raises(ValueError, match="Invalid learning rate"):
        create(name, [torch.nn.Parameter(torch.ones(2))], **{**hp, "lr": -1e-3})
    if name in OURS:
        with pytest.raises(ValueError, match="Invalid learning rate: nan"):
            create(name, [torch.nn.Parameter(torch.ones(2))], **{**hp, "lr": math.nan})


@pytest.mark.parametrize(("name", "hp"), _cases_with("supports_weight_decay"))
def test_invalid_weight_decay(name, hp):
    with pytest.raises(ValueError, match="Invalid weight_decay value"):
        create(name, [torch.nn.Parameter(torch.ones(2))], **{**hp, "weight_decay": -0.1})


@pytest.mark.parametrize(("name", "hp"), PARAMS)
def test_step_without_any_grad_changes_nothing(name, hp):
    _, _, model = _problem()
    before = copy.deepcopy(model.state_dict())
    opt = _make(name, hp, model)
    opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
