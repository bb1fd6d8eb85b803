"""The CUDA fused AdaBelief (a Triton kernel) against the reference written from the math.

With a GPU the kernel is compiled and run on CUDA tensors. Without one, ``conftest.py`` sets
``TRITON_INTERPRET=1`` and the same kernel runs on CPU tensors under Triton's interpreter, so
its arithmetic, tables and flags are checked on every machine that has Triton. Where Triton
does not install (it has wheels for Linux only), the ``triton`` fixture asserts the clear
error instead and the numeric tests end there. The tests of the ``AdaBelief`` class on CUDA
tensors need a GPU.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from adabatch.optim import fused as F
from adabatch.optim.fused import cuda as C
from tests.optim.test_adabelief_fused import (
    CONFIGS,
    HP,
    grads_for,
    make,
    reference_step,
    rel,
)

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda") if CUDA else torch.device("cpu")
needs_gpu = pytest.mark.skipif(not CUDA, reason="the AdaBelief class on CUDA tensors needs a GPU")
KERNEL_HP = {k: v for k, v in HP.items() if k not in ("capturable", "differentiable")}


@pytest.fixture(scope="module")
def triton() -> bool:
    """True when Triton imports; otherwise assert the clear error and end the test there."""
    if C.triton_available():
        return True
    p = torch.zeros(3)
    with pytest.raises(RuntimeError, match=r"needs Triton \(pip install triton\)"):
        C.fused_adabelief_cuda([p], [p], [p], [p], [], [torch.zeros(())], **KERNEL_HP)
    return False


def to_dev(lists):
    return [[t.to(DEV) for t in ts] for ts in lists]


def triton_step(params, grads, m, s, smax, steps, hp, **kw):
    """One step through the Triton path (the dispatcher's checks included)."""
    hp = {k: v for k, v in hp.items() if k not in ("capturable", "differentiable")}
    C.step(params, grads, m, s, smax if hp["amsgrad"] else [], steps, **hp, **kw)


def dev_grads(params, k, **kw):
    cpu = [p.cpu() for p in params]
    return [g.to(DEV) for g in grads_for(cpu, k, **kw)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_reference(triton, name, dtype):
    if not triton:
        return
    hp = {**HP, **CONFIGS[name]}
    params, m, s, smax, steps = to_dev(make(dtype))
    ptrs = [t.data_ptr() for t in params + m + s]
    rp, rm, rs, rv = ([t.cpu().clone() for t in ts] for ts in (params, m, s, smax))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    n_steps = 8
    for k in range(1, n_steps + 1):
        grads = dev_grads(params, k)
        grads_copy = [g.clone() for g in grads]
        triton_step(params, grads, m, s, smax, steps, hp)
        for i in range(len(params)):
            rp[i], rm[i], rs[i], rv[i] = reference_step(
                rp[i], grads[i].cpu(), rm[i], rs[i], rv[i], k, hp
            )
        assert all(torch.equal(g, gc) for g, gc in zip(grads, grads_copy))  # never written
    for i in range(len(params)):
        assert rel(params[i].cpu(), rp[i]) <= tol, (i, rel(params[i].cpu(), rp[i]))
        assert rel(m[i].cpu(), rm[i]) <= tol
        assert rel(s[i].cpu(), rs[i]) <= tol
        if hp["amsgrad"]:
            assert rel(smax[i].cpu(), rv[i]) <= tol
            assert torch.all(smax[i] >= s[i])
    assert all(t.item() == float(n_steps) for t in steps)
    assert [t.data_ptr() for t in params + m + s] == ptrs
    fresh = make(dtype)[0]
    if name == "never-rectified-no-sgd":  # rho_t < 5 forever and no SGD fallback
        assert all(torch.equal(p.cpu(), q) for p, q in zip(params, fresh))
    else:
        assert all(not torch.equal(p.cpu(), q) for p, q in zip(params, fresh) if p.numel())


def test_block_map():
    table = C._block_map([0, 5, 2 * 64 + 1, 64], torch.device("cpu"), 64)
    assert table.tolist() == [[1, 0], [2, 0], [2, 64], [2, 128], [3, 0]]
    assert C._block_map([0], torch.device("cpu"), 64).shape == (0, 2)


@pytest.mark.parametrize("name", ["default", "amsgrad-rectify", "l2-amsgrad-no-rectify"])
def test_blocks_split_tensors_without_changing_results(triton, name):
    """Tensors spread over many programs give the results of one program per tensor.

    Bit for bit under the interpreter; on a GPU the two launch shapes are two compiled
    kernels, whose multiply-adds may be contracted differently, so to rounding there (an
    element skipped or updated twice would be off by a whole step).
    """
    if not triton:
        return
    hp = {**HP, **CONFIGS[name]}
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(n, generator=gen).to(DEV) for n in (300, 64, 1, 129)]
    runs = []
    for block in (64, 512):
        params = [t.clone() for t in init]
        m, s, smax = ([torch.zeros_like(t) for t in init] for _ in range(3))
        steps = [torch.zeros((), device=DEV) for _ in init]
        for k in range(1, 4):
            triton_step(params, dev_grads(params, k), m, s, smax, steps, hp, block=block)
        runs.append(params + m + s + (smax if hp["amsgrad"] else []))
    for a, b in zip(*runs):
        assert torch.equal(a, b) if not CUDA else rel(a, b) <= 1e-6
    assert not torch.equal(runs[0][0], init[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("name", ["default", "no-rectify", "amsgrad-rectify"])
def test_low_precision_float32_state(triton, dtype, name):
    if not triton:
        return
    hp = {**HP, **CONFIGS[name]}
    params, m, s, smax, steps = to_dev(make(dtype))
    assert m[0].dtype == torch.float32
    rp = [p.float().cpu() for p in params]
    rm, rs, rv = ([t.cpu().clone() for t in ts] for ts in (m, s, smax))
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    exact = total = 0
    for k in range(1, 7):
        grads = dev_grads(params, k)
        triton_step(params, grads, m, s, smax, steps, hp)
        for i, p in enumerate(params):
            new = reference_step(rp[i], grads[i].float().cpu(), rm[i], rs[i], rv[i], k, hp)
            expected = new[0].to(dtype).float()
            assert p.dtype == dtype
            diff = (p.float().cpu() - expected).abs()
            # at most one rounding step apart (float32 evaluation order), mostly identical
            assert torch.all(diff <= 2 * ulp * expected.abs() + 1e-30)
            exact += int((diff == 0).sum())
            total += diff.numel()
            assert rel(m[i].cpu(), new[1]) <= 1e-5 and rel(s[i].cpu(), new[2]) <= 1e-5
            # continue both from the stored values
            rp[i], rm[i], rs[i], rv[i] = (t.float().cpu().clone() for t in (p, m[i], s[i], smax[i]))
    assert exact >= 0.97 * total


def test_cached_tables_follow_lr_and_gradient_changes(triton):
    """The tables kept between steps: a new lr or new gradient tensors reach the kernel."""
    if not triton:
        return
    plans = F.PlanCache()
    hp = {**HP, "rectify": False}
    params, m, s, _, steps = to_dev(make(torch.float32, seed=2))
    params, m, s, steps = params[:-1], m[:-1], s[:-1], steps[:-1]  # contiguous: a plan
    rp, rm, rs, rv = ([t.cpu().clone() for t in ts] for ts in (params, m, s, s))
    grads = dev_grads(params, 1)
    for k, lr in enumerate([1e-2, 1e-2, 5e-3, 1e-3, 1e-3], start=1):
        if k in (2, 4):  # the same gradient tensors, new values
            for g, new in zip(grads, dev_grads(params, k)):
                g.copy_(new)
        elif k > 1:
            grads = dev_grads(params, k)  # new tensors
        triton_step(params, grads, m, s, [], steps, {**hp, "lr": lr}, plans=plans)
        if k == 1:
            plan = plans.plan
            static = plan.backend[(torch.float32, C.BLOCK)][:2]  # static table, block map
        assert plans.plan is plan is not None  # the plan and its tables were kept
        kept = plan.backend[(torch.float32, C.BLOCK)][:2]
        assert all(a is b for a, b in zip(kept, static))
        for i in range(len(params)):
            rp[i], rm[i], rs[i], rv[i] = reference_step(
                rp[i], grads[i].cpu(), rm[i], rs[i], rv[i], k, {**hp, "lr": lr}
            )
    for i in range(len(params)):
        assert rel(params[i].cpu(), rp[i]) <= 1e-5 and rel(m[i].cpu(), rm[i]) <= 1e-5


def test_grad_scale_and_found_inf(triton):
    if not triton:
        return
    hp = {**HP, "weight_decay": 0.1}
    a = to_dev(make(torch.float32, seed=4))
    b = to_dev(make(torch.float32, seed=4))
    for k in range(1, 5):
        g = dev_grads(a[0], k)
        triton_step(*a[:1], g, *a[1:3], a[3], a[4], hp)
        scale = torch.tensor(2.0**12, device=DEV)
        scaled = [x * scale for x in g]
        triton_step(
            b[0], scaled, *b[1:3], b[3], b[4], hp, grad_scale=scale,
            found_inf=torch.tensor(0.0, device=DEV),
        )  # fmt: skip
    for x, y in zip(a[0] + a[1] + a[2], b[0] + b[1] + b[2]):
        assert torch.equal(x, y)  # a power-of-two scale is exact
    before = [t.clone() for t in b[0] + b[1] + b[2]]
    g = dev_grads(b[0], 9)
    triton_step(
        b[0], g, *b[1:3], b[3], b[4], hp, grad_scale=torch.tensor(1.0, device=DEV),
        found_inf=torch.tensor(1.0, device=DEV),
    )  # fmt: skip
    assert all(torch.equal(x, y) for x, y in zip(before, b[0] + b[1] + b[2]))
    assert all(t.item() == 4.0 for t in b[4])  # the counters did not move either


def test_errors(triton, monkeypatch):
    params, m, s, _, steps = make(torch.float32)
    g = grads_for(params, 1)
    assert not C.available("cpu")
    if not CUDA:
        assert not C.available("cuda")
        with pytest.raises(RuntimeError, match="needs a CUDA device"):
            C.build("cuda")
    with pytest.raises(RuntimeError, match="needs a CUDA device, not cpu"):
        C.build("cpu")
    if not triton:
        return
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="the CUDA fused AdaBelief got tensors on cpu"):
        C.fused_adabelief_cuda(params, g, m, s, [], steps, **KERNEL_HP)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="grad_scale must be a one-element tensor"):
        C.fused_adabelief_cuda(params, g, m, s, [], steps, **KERNEL_HP, grad_scale=torch.ones(2))
    with pytest.raises(RuntimeError, match="state_steps must be float32 scalars on cpu"):
        C.step(params, g, m, s, [], [t.double() for t in steps], **KERNEL_HP)
    assert all(t.item() == 0.0 for t in steps)  # errors come before anything changes


def test_without_triton_fused_true_on_cuda_is_a_clear_error(monkeypatch):
    from adabatch.optim import adabelief

    monkeypatch.setattr(C, "triton", None)
    assert not F.fused_available("cuda")
    with pytest.raises(RuntimeError, match=r"fused=True requires .*needs Triton"):
        adabelief._require_fused(torch.device("cuda"))
    with pytest.raises(RuntimeError, match=r"needs Triton"):
        F.build("cuda")


# ------------------------------------------------------------------ the class, on a GPU
def _model(dtype=torch.float32):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    return net.to(device=DEV, dtype=dtype)


def _train(models, opts, steps=20, scalers=None, inf_at=None):
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(5)).to(DEV)
    y = torch.randn(32, 3, generator=torch.Generator().manual_seed(6)).to(DEV)
    for k in range(steps):
        for j, (model, opt) in enumerate(zip(models, opts)):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(
                model(x.to(model[0].weight.dtype)), y.to(model[0].weight.dtype)
            )
            if k == inf_at:
                loss = loss * math.inf
            if scalers is None:
                loss.backward()
                opt.step()
            else:
                scalers[j].scale(loss).backward()
                scalers[j].step(opt)
                scalers[j].update()


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", ["default", "amsgrad-rectify", "l2", "fixed", "maximize"])
def test_class_fused_cuda_matches_for_loop(name, dtype):
    from adabatch.optim import AdaBelief

    cfg = dict(CONFIGS[name])
    betas = (cfg.pop("beta1", 0.9), cfg.pop("beta2", 0.999))
    models = [_model(dtype), _model(dtype)]
    opts = [
        AdaBelief(models[0].parameters(), lr=1e-2, betas=betas, fused=True, **cfg),
        AdaBelief(models[1].parameters(), lr=1e-2, betas=betas, foreach=False, **cfg),
    ]
    assert opts[0]._implementation(opts[0].param_groups[0]) == "fused"
    _train(models, opts)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for pa, pb in zip(models[0].parameters(), models[1].parameters()):
        assert rel(pa, pb) <= tol
        sa, sb = opts[0].state[pa], opts[1].state[pb]
        assert sa["step"].device == pa.device and sa["step"].item() == 20.0
        for key in ("exp_avg", "exp_avg_var", "max_exp_avg_var"):
            if key in sb:
                assert rel(sa[key], sb[key]) <= tol, key
    assert C.available(DEV)  # the first fused=True step left the compile marker
    assert F.fused_available(DEV)


@needs_gpu
def test_class_fused_cuda_with_grad_scaler():
    from adabatch.optim import AdaBelief

    models = [_model(), _model()]
    opts = [
        AdaBelief(models[0].parameters(), lr=1e-2, fused=True),
        AdaBelief(models[1].parameters(), lr=1e-2, foreach=False),
    ]
    scalers = [torch.amp.GradScaler("cuda", init_scale=2.0**10) for _ in opts]
    _train(models, opts, steps=8, scalers=scalers, inf_at=3)
    assert scalers[0].get_scale() == scalers[1].get_scale() < 2.0**10
    for pa, pb in zip(models[0].parameters(), models[1].parameters()):
        assert rel(pa, pb) <= 1e-5
        assert opts[0].state[pa]["step"].item() == opts[1].state[pb]["step"].item() == 7.0


@needs_gpu
def test_fused_none_and_state_dict_from_foreach():
    """After a build, fused=None picks the kernel; a foreach state dict (CPU counters) loads."""
    from adabatch.optim import AdaBelief

    F.build(DEV)
    models = [_model(), _model()]
    plain = AdaBelief(models[0].parameters(), lr=1e-2, foreach=True, fused=False)
    _train(models[:1], [plain], steps=5)
    auto = AdaBelief(models[1].parameters(), lr=1e-2)
    assert auto._implementation(auto.param_groups[0]) == "fused"
    models[1].load_state_dict(models[0].state_dict())
    auto.load_state_dict(copy.deepcopy(plain.state_dict()))  # torch would share the tensors
    _train(models, [plain, auto], steps=5)
    for pa, pb in zip(models[0].parameters(), models[1].parameters()):
        assert rel(pa, pb) <= 1e-5
        assert auto.state[pb]["step"].item() == 10.0
