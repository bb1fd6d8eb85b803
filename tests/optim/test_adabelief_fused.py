"""The fused (C++) AdaBelief kernel against a plain reference written from the math.

The kernel is built once per machine and source version (cached under the torch extensions
directory); the first test session pays a few seconds. Where no C++ compiler exists, the
``kernel`` fixture asserts the clear error instead and the numeric tests end there.
"""

from __future__ import annotations

import math

import pytest
import torch

from adabatch.optim import fused as F
from adabatch.optim.fused import common, cpu

HP = dict(
    beta1=0.9,
    beta2=0.999,
    lr=1e-2,
    eps=1e-16,
    weight_decay=0.0,
    amsgrad=False,
    weight_decouple=True,
    fixed_decay=False,
    rectify=True,
    degenerated_to_sgd=True,
    maximize=False,
    capturable=False,
    differentiable=False,
)


@pytest.fixture(scope="session")
def kernel() -> bool:
    """True when the kernel is built; without a compiler, assert the clear error instead."""
    if cpu._loader.compiler() is None and not F.is_built():
        with pytest.raises(RuntimeError, match=r"needs a C\+\+ compiler"):
            F.build()
        return False
    path = F.build()
    assert path.is_file()
    assert F.fused_available("cpu")
    return True


# ------------------------------------------------------------------ reference (from the math)
def reference_step(p, g, m, s, smax, t, hp, grad_scale=None):
    """One step on tensors of the compute dtype; returns the new (p, m, s, smax)."""
    g = -g if hp["maximize"] else g.clone()
    if grad_scale is not None:
        g = g / grad_scale
    p = p.clone()
    wd = hp["weight_decay"]
    if hp["weight_decouple"]:
        p = p * ((1.0 - wd) if hp["fixed_decay"] else (1.0 - hp["lr"] * wd))
    elif wd != 0:
        g = g + wd * p
    b1, b2, eps, lr = hp["beta1"], hp["beta2"], hp["eps"], hp["lr"]
    m = b1 * m + (1 - b1) * g
    s = b2 * s + (1 - b2) * (g - m) ** 2 + eps
    if hp["amsgrad"]:
        smax = torch.maximum(smax, s)
        v = smax
    else:
        v = s
    bc1 = 1 - b1**t
    bc2 = 1 - b2**t
    if not hp["rectify"]:
        p = p - lr / bc1 * m / (v.sqrt() / math.sqrt(bc2) + eps)
    else:
        rho_inf = 2 / (1 - b2) - 1
        rho_t = rho_inf - 2 * t * b2**t / (1 - b2**t)
        if rho_t >= 5:
            r = (
                math.sqrt(
                    (1 - b2**t)
                    * (rho_t - 4)
                    / (rho_inf - 4)
                    * (rho_t - 2)
                    / rho_t
                    * rho_inf
                    / (rho_inf - 2)
                )
                / bc1
            )
            p = p - lr * r * m / (v.sqrt() + eps)
        elif hp["degenerated_to_sgd"]:
            p = p - lr / bc1 * m
    return p, m, s, smax


def shapes():
    return [(7, 5), (0,), (33,), (3, 4, 5), (1,)]


def make(dtype, seed=0, state_dtype=None):
    gen = torch.Generator().manual_seed(seed)
    state_dtype = state_dtype or (torch.float64 if dtype == torch.float64 else torch.float32)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes()]
    # one non-contiguous parameter (with non-contiguous state and grad)
    params.append(torch.randn(6, 4, generator=gen, dtype=torch.float64).to(dtype).t())
    m = [torch.zeros_like(p, dtype=state_dtype) for p in params]
    s = [torch.zeros_like(p, dtype=state_dtype) for p in params]
    smax = [torch.zeros_like(p, dtype=state_dtype) for p in params]
    steps = [torch.zeros((), dtype=torch.float32) for _ in params]
    return params, m, s, smax, steps


def grads_for(params, step, seed=1, scale=1.0):
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    out = []
    for p in params:
        g = torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale
        g = g.to(p.dtype)
        if not p.is_contiguous():
            g = g.t().contiguous().t()
        out.append(g)
    return out


def rel(a, b):
    a, b = a.double(), b.double()
    if b.numel() == 0:
        return 0.0
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


CONFIGS = {
    "default": {},
    "no-rectify": dict(rectify=False),
    "rectify-no-sgd": dict(degenerated_to_sgd=False),
    "amsgrad": dict(amsgrad=True, rectify=False),
    "amsgrad-rectify": dict(amsgrad=True),
    "decoupled": dict(weight_decay=0.1),
    "fixed": dict(weight_decay=0.01, fixed_decay=True),
    "l2": dict(weight_decay=0.1, weight_decouple=False),
    "l2-amsgrad-no-rectify": dict(
        weight_decay=0.1, weight_decouple=False, amsgrad=True, rectify=False
    ),
    "maximize": dict(maximize=True, rectify=False),
    "maximize-rectify": dict(maximize=True, weight_decay=0.05),
    "never-rectified": dict(beta1=0.8, beta2=0.5),
    "never-rectified-no-sgd": dict(beta1=0.8, beta2=0.5, degenerated_to_sgd=False),
    "beta1-zero-eps": dict(beta1=0.0, eps=1e-8, rectify=False),
    # eps comparable to s, so that eps inside s and outside the root both matter
    "big-eps": dict(eps=1e-3, rectify=False),
    "big-eps-rectify-amsgrad": dict(eps=1e-3, amsgrad=True),
}


def run_fused(params, m, s, smax, steps, hp, n_steps, grad_seed=1, **kw):
    for k in range(1, n_steps + 1):
        grads = grads_for(params, k, grad_seed)
        F.fused_adabelief(params, grads, m, s, smax if hp["amsgrad"] else [], steps, **hp, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_reference(kernel, name, dtype):
    if not kernel:
        return
    hp = {**HP, **CONFIGS[name]}
    params, m, s, smax, steps = make(dtype)
    ptrs = [t.data_ptr() for t in params + m + s]
    rp, rm, rs, rv = (
        [p.clone() for p in params],
        [t.clone() for t in m],
        [t.clone() for t in s],
        [t.clone() for t in smax],
    )
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for k in range(1, 21):
        grads = grads_for(params, k)
        grads_copy = [g.clone() for g in grads]
        F.fused_adabelief(params, grads, m, s, smax if hp["amsgrad"] else [], steps, **hp)
        for i in range(len(params)):
            rp[i], rm[i], rs[i], rv[i] = reference_step(rp[i], grads[i], rm[i], rs[i], rv[i], k, hp)
        # grads are never written
        for g, gc in zip(grads, grads_copy):
            assert torch.equal(g, gc)
    for i in range(len(params)):
        assert rel(params[i], rp[i]) <= tol, (i, rel(params[i], rp[i]))
        assert rel(m[i], rm[i]) <= tol
        assert rel(s[i], rs[i]) <= tol
        if hp["amsgrad"]:
            assert rel(smax[i], rv[i]) <= tol
            assert torch.all(smax[i] >= s[i])
    assert all(t.item() == 20.0 for t in steps)
    assert [t.data_ptr() for t in params + m + s] == ptrs
    fresh = make(dtype)[0]
    if name == "never-rectified-no-sgd":  # rho_t < 5 forever and no SGD fallback
        assert all(torch.equal(p, q) for p, q in zip(params, fresh))
    else:  # the parameters really moved (except the empty one)
        assert all(not torch.equal(p, q) for p, q in zip(params, fresh) if p.numel())


@pytest.mark.parametrize(
    "name", ["default", "no-rectify", "rectify-no-sgd", "l2", "fixed", "big-eps", "never-rectified"]
)
def test_matches_adabelief_pytorch_021(kernel, name):
    """The reference above is checked against the original package (float64, 20 steps)."""
    if not kernel:
        return
    import adabelief_pytorch

    hp = {**HP, **CONFIGS[name]}
    params, m, s, _, steps = make(torch.float64)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = adabelief_pytorch.AdaBelief(
        theirs,
        lr=hp["lr"],
        betas=(hp["beta1"], hp["beta2"]),
        eps=hp["eps"],
        weight_decay=hp["weight_decay"],
        weight_decouple=hp["weight_decouple"],
        fixed_decay=hp["fixed_decay"],
        rectify=hp["rectify"],
        degenerated_to_sgd=hp["degenerated_to_sgd"],
        print_change_log=False,
    )
    for k in range(1, 21):
        grads = grads_for(params, k)
        F.fused_adabelief(params, grads, m, s, [], steps, **hp)
        for q, g in zip(theirs, grads):
            q.grad = g.clone()
        opt.step()
    for i, q in enumerate(theirs):
        assert rel(params[i], q.detach()) <= 1e-12
        if q.numel():
            assert rel(m[i], opt.state[q]["exp_avg"]) <= 1e-12
            assert rel(s[i], opt.state[q]["exp_avg_var"]) <= 1e-12


def test_no_sgd_fallback_leaves_params_until_rectified(kernel):
    if not kernel:
        return
    hp = {**HP, "degenerated_to_sgd": False}
    params, m, s, smax, steps = make(torch.float32)
    before = [p.clone() for p in params]
    run_fused(params, m, s, smax, steps, hp, 3)  # rho_t < 5 for t <= 3 with beta2 = 0.999
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    assert all(t.abs().sum() > 0 for t in s if t.numel())
    run_fused(params, m, s, smax, steps, hp, 5)
    assert any(not torch.equal(p, q) for p, q in zip(params, before) if p.numel())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("name", ["default", "no-rectify", "decoupled", "amsgrad-rectify"])
def test_low_precision_float32_state(kernel, dtype, name):
    if not kernel:
        return
    hp = {**HP, **CONFIGS[name]}
    params, m, s, smax, steps = make(dtype)
    assert m[0].dtype == torch.float32
    ptrs = [p.data_ptr() for p in params]
    rp = [p.float() for p in params]
    rm, rs, rv = [t.clone() for t in m], [t.clone() for t in s], [t.clone() for t in smax]
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    exact = total = 0
    for k in range(1, 21):
        grads = grads_for(params, k)
        F.fused_adabelief(params, grads, m, s, smax if hp["amsgrad"] else [], steps, **hp)
        for i in range(len(params)):
            # reference: float32 math from the stored low-precision value, rounded once
            new = reference_step(rp[i], grads[i].float(), rm[i], rs[i], rv[i], k, hp)
            rp[i] = new[0].to(dtype).float()
            rm[i], rs[i], rv[i] = new[1], new[2], new[3]
        for i, p in enumerate(params):
            assert p.dtype == dtype
            diff = (p.float() - rp[i]).abs()
            # at most one rounding step apart (float32 evaluation order), mostly identical
            assert torch.all(diff <= 2 * ulp * rp[i].abs() + 1e-30)
            exact += int((diff == 0).sum())
            total += diff.numel()
            rp[i] = p.float()  # continue both from the same stored parameter
        for i in range(len(params)):
            assert rel(m[i], rm[i]) <= 1e-5 and rel(s[i], rs[i]) <= 1e-5
            rm[i], rs[i], rv[i] = m[i].clone(), s[i].clone(), smax[i].clone()
    assert exact >= 0.97 * total
    assert [p.data_ptr() for p in params] == ptrs


def _all_bit_patterns(dtype):
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_low_precision_rounding_every_bit_pattern(kernel, dtype):
    """p <- round(float(p) * decay): widening and round-to-nearest-even, all 65536 values."""
    if not kernel:
        return
    for decay in (1.0, 0.7, 1.5, 1.0 + 2.0**-9, 3e-3):
        p = _all_bit_patterns(dtype).clone()
        expected = (p.float() * torch.tensor(decay, dtype=torch.float32)).to(dtype)
        hp = {**HP, "lr": 0.0, "weight_decay": 1.0 - decay, "fixed_decay": True, "rectify": False}
        g = torch.zeros_like(p)
        F.fused_adabelief(
            [p],
            [g],
            [torch.zeros_like(p, dtype=torch.float32)],
            [torch.zeros_like(p, dtype=torch.float32)],
            [],
            [torch.zeros((), dtype=torch.float32)],
            **hp,
        )
        nan = expected.isnan()
        assert torch.equal(p.isnan(), nan)
        assert torch.equal(p[~nan].view(torch.int16), expected[~nan].view(torch.int16)), decay


def test_isa_variants_and_threads_bit_identical(kernel):
    if not kernel:
        return
    best = cpu._loader.get(build=False).adabatch_fused_isa()
    # every ISA on one thread, and the best ISA on two (chunks split over threads)
    runs = [(isa, 1) for isa in range(best + 1)] + [(best, 2)]
    for dtype in (torch.float32, torch.bfloat16):
        results = []
        for isa, threads in runs:
            hp = {**HP, "amsgrad": True, "weight_decay": 0.1}
            params, m, s, smax, steps = make(dtype)
            big = torch.randn(100_000, generator=torch.Generator().manual_seed(3)).to(dtype)
            params.append(big)
            for lst in (m, s, smax):
                lst.append(torch.zeros_like(big, dtype=torch.float32))
            steps.append(torch.zeros((), dtype=torch.float32))
            old = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                run_fused(params, m, s, smax, steps, hp, 4, isa=isa)
            finally:
                torch.set_num_threads(old)
            assert not torch.equal(
                big, torch.randn(100_000, generator=torch.Generator().manual_seed(3)).to(dtype)
            )
            results.append([t.clone() for t in params + m + s + smax])
        for other in results[1:]:
            assert all(torch.equal(a, b) for a, b in zip(results[0], other))


def test_unsupported_isa_is_an_error(kernel):
    if not kernel:
        return
    params, m, s, _, steps = make(torch.float32)
    with pytest.raises(RuntimeError, match="ISA not supported"):
        F.fused_adabelief(params, grads_for(params, 1), m, s, [], steps, **HP, isa=99)


def test_grad_scale_and_found_inf(kernel):
    if not kernel:
        return
    hp = {**HP, "weight_decay": 0.1, "amsgrad": True}
    a = make(torch.float32)
    b = make(torch.float32)
    scale = torch.tensor(1024.0)
    for k in range(1, 6):
        g = grads_for(a[0], k)
        g_scaled = [x * 1024.0 for x in g]
        g_scaled_copy = [x.clone() for x in g_scaled]
        F.fused_adabelief(a[0], g, *a[1:4], a[4], **hp)
        F.fused_adabelief(
            b[0], g_scaled, *b[1:4], b[4], **hp, grad_scale=scale, found_inf=torch.tensor(0.0)
        )
        assert all(torch.equal(x, y) for x, y in zip(g_scaled, g_scaled_copy))
    for x, y in zip(a[0] + a[1] + a[2] + a[3], b[0] + b[1] + b[2] + b[3]):
        assert torch.equal(x, y)  # power-of-two scale: exactly the unscaled step
    # found_inf: nothing changes, not even the step counters
    before = [t.clone() for t in b[0] + b[1] + b[2] + b[3] + b[4]]
    g = [x * math.inf for x in grads_for(b[0], 9)]
    F.fused_adabelief(b[0], g, *b[1:4], b[4], **hp, grad_scale=scale, found_inf=torch.tensor(1.0))
    after = b[0] + b[1] + b[2] + b[3] + b[4]
    assert all(torch.equal(x, y) for x, y in zip(before, after))
    assert b[4][0].item() == 5.0


def test_mixed_dtypes_in_one_call(kernel):
    """One call over float32, float64 and bfloat16 parameters equals one call per dtype."""
    if not kernel:
        return
    hp = {**HP, "weight_decay": 0.1, "amsgrad": True}
    dtypes = (torch.float32, torch.float64, torch.bfloat16)
    together = [make(d, seed=7) for d in dtypes]
    apart = [make(d, seed=7) for d in dtypes]
    for k in range(1, 4):
        grads = [grads_for(x[0], k) for x in together]
        lists = [[t for x in together for t in x[j]] for j in range(5)]
        F.fused_adabelief(lists[0], [g for gs in grads for g in gs], *lists[1:], **hp)
        for x, g in zip(apart, grads):
            F.fused_adabelief(x[0], g, *x[1:], **hp)
    for x, y in zip(together, apart):
        for j in range(5):
            assert all(torch.equal(a, b) for a, b in zip(x[j], y[j]))
    assert together[2][0][0].dtype == torch.bfloat16
    assert not torch.equal(together[2][0][0], make(torch.bfloat16, seed=7)[0][0])


def test_zero_size_only_and_empty_lists(kernel):
    if not kernel:
        return
    p = torch.empty(0, 3)
    steps = [torch.zeros((), dtype=torch.float32)]
    F.fused_adabelief(
        [p], [torch.empty(0, 3)], [torch.empty(0, 3)], [torch.empty(0, 3)], [], steps, **HP
    )
    assert steps[0].item() == 1.0
    F.fused_adabelief([], [], [], [], [], [], **HP)  # nothing to do, no error


def test_errors(kernel):
    params, m, s, _, steps = make(torch.float32)
    g = grads_for(params, 1)
    with pytest.raises(RuntimeError, match="does not support differentiable=True"):
        F.fused_adabelief(params, g, m, s, [], steps, **{**HP, "differentiable": True})
    with pytest.raises(ValueError, match="differ in length"):
        F.fused_adabelief(params, g[:-1], m, s, [], steps, **HP)
    with pytest.raises(ValueError, match="differ in length"):
        F.fused_adabelief(params, g, m, s, [], steps, **{**HP, "amsgrad": True})
    assert not F.fused_available("meta")
    if not torch.cuda.is_available():
        assert not F.fused_available(torch.device("cuda"))
    if not kernel:
        return
    meta = [torch.empty(3, device="meta")]
    with pytest.raises(RuntimeError, match="runs on CPU and CUDA tensors only"):
        F.fused_adabelief(meta, meta, meta, meta, [], [steps[0]], **HP)
    with pytest.raises(RuntimeError, match=r"must be torch.float32"):
        F.fused_adabelief([params[0]], [g[0]], [m[0].double()], [s[0]], [], [steps[0]], **HP)
    with pytest.raises(RuntimeError, match="state_steps must be float32"):
        F.fused_adabelief([params[0]], [g[0]], [m[0]], [s[0]], [], [torch.tensor(0)], **HP)
    with pytest.raises(RuntimeError, match="does not support parameters of dtype"):
        x = torch.zeros(3, dtype=torch.int32)
        F.fused_adabelief([x], [x], [x], [x], [], [steps[0]], **HP)
    # errors are raised before anything changes
    assert all(t.item() == 0.0 for t in steps)
    assert all(torch.equal(t, torch.zeros_like(t)) for t in m)


def test_checked_plan_is_reused_and_rechecked(kernel, monkeypatch):
    """The per-tensor checks run once; a changed state, shape or layout is checked again."""
    if not kernel:
        return
    calls = []
    real = common.prepare
    monkeypatch.setattr(common, "prepare", lambda *a: calls.append(1) or real(*a))
    plans = F.PlanCache()
    params, m, s, smax, steps = make(torch.float32)
    params, m, s, smax = (t[:-1] for t in (params, m, s, smax))  # all contiguous
    steps = steps[:-1]
    ref = [t.clone() for t in params], [t.clone() for t in m], [t.clone() for t in s]
    kept = []
    for k in range(1, 4):
        F.fused_adabelief(params, grads_for(params, k), m, s, [], steps, **HP, plans=plans)
        kept.append(plans.plan)
    assert len(calls) == 1  # checked once, then the plan held
    assert kept[0] is not None and kept[0] is kept[1] is kept[2]
    # the same steps with the checks every time (a working copy forces the slow path)
    ref_steps = [torch.zeros(()) for _ in ref[0]]
    for k in range(1, 4):
        g = grads_for(ref[0], k)
        g[0] = g[0].t().contiguous().t()  # not contiguous (7 x 5): checked and copied
        F.fused_adabelief(ref[0], g, ref[1], ref[2], [], ref_steps, **HP)
    assert len(calls) == 4
    assert all(torch.equal(a, b) for a, b in zip(params + m + s, ref[0] + ref[1] + ref[2]))
    before = [t.clone() for t in params + m + s]
    bad = grads_for(params, 9)
    bad[0] = bad[0][:, :4].contiguous()  # wrong shape: the plan does not hold, _prepare raises
    with pytest.raises(RuntimeError, match="a grad differs from its parameter"):
        F.fused_adabelief(params, bad, m, s, [], steps, **HP, plans=plans)
    bad = grads_for(params, 9)
    bad[1] = bad[1].double()
    with pytest.raises(RuntimeError, match="a grad differs from its parameter"):
        F.fused_adabelief(params, bad, m, s, [], steps, **HP, plans=plans)
    m[0] = m[0].double()  # a replaced state tensor: new address, checked again
    with pytest.raises(RuntimeError, match=r"must be torch\.float32"):
        F.fused_adabelief(params, grads_for(params, 9), m, s, [], steps, **HP, plans=plans)
    assert all(torch.equal(a, b) for a, b in zip(params + m[1:] + s, before[:5] + before[6:]))
    assert all(t.item() == 3.0 for t in steps)


def test_no_compiler_gives_clear_error_and_no_build(tmp_path, monkeypatch):
    loader = cpu.Loader(cache_root=tmp_path, cxx="adabatch-no-such-compiler")
    monkeypatch.setattr(cpu, "_loader", loader)
    assert not F.fused_available("cpu")
    assert not F.is_built()
    params, m, s, _, steps = make(torch.float32)
    with pytest.raises(RuntimeError, match=r"needs a C\+\+ compiler.*fused=None"):
        F.fused_adabelief(params, grads_for(params, 1), m, s, [], steps, **HP)
    with pytest.raises(RuntimeError, match=r"needs a C\+\+ compiler"):
        F.build()
    assert list(tmp_path.rglob("*.so")) == []
    assert all(t.item() == 0.0 for t in steps)


def test_failed_build_reports_compiler_output(tmp_path, monkeypatch):
    fake = tmp_path / "fakecxx"
    fake.write_text("#!/bin/sh\necho 'fake compiler says no' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(cpu, "_loader", cpu.Loader(cache_root=tmp_path / "cache", cxx=str(fake)))
    with pytest.raises(RuntimeError, match=r"(?s)could not build.*fake compiler says no"):
        F.build()
    assert not F.fused_available("cpu")


def test_availability_never_compiles_and_cache_is_reused(kernel, tmp_path):
    if not kernel:
        return
    # an empty cache: available is False and nothing gets built
    empty = cpu.Loader(cache_root=tmp_path / "empty")
    assert empty.get(build=False) is None
    assert not (tmp_path / "empty").exists()
    # the session's cached build is found and loaded by a new loader without compiling
    cached = cpu.Loader()
    assert cached.path() == F.kernel_path()
    assert cached.get(build=False) is not None
    assert cached.build_seconds is None
    # the cache key follows the source
    assert F.kernel_path().name.startswith("adabelief_")
    assert F.kernel_path().parent.name == "adabatch_adabelief_fused"


def test_cold_build_is_atomic_and_reused(kernel, tmp_path):
    """A cold build into an empty cache (the compiler stubbed by a copy of the session's
    build, so the test stays fast): written once under the keyed name, then reused."""
    if not kernel:
        return
    fake = tmp_path / "fakecxx"
    fake.write_text(
        "#!/bin/sh\n"
        'while [ "$#" -gt 0 ]; do if [ "$1" = -o ]; then out="$2"; fi; shift; done\n'
        f'cp "{F.kernel_path()}" "$out"\n'
        f'echo run >> "{tmp_path}/calls"\n'
    )
    fake.chmod(0o755)
    loader = cpu.Loader(cache_root=tmp_path / "cache", cxx=str(fake))
    assert loader.get(build=False) is None
    assert loader.get(build=True) is not None and loader.build_seconds is not None
    assert list((tmp_path / "cache").rglob("*")) == [loader.path().parent, loader.path()]
    again = cpu.Loader(cache_root=tmp_path / "cache", cxx=str(fake))
    assert again.get(build=True) is not None and again.build_seconds is None
    assert (tmp_path / "calls").read_text() == "run\n"  # compiled exactly once


# ------------------------------------------------------------------ through the class
def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).to(
        dtype
    )


@pytest.mark.parametrize("name", ["default", "amsgrad-rectify", "l2", "fixed", "maximize"])
def test_class_fused_matches_for_loop(kernel, name):
    from adabatch.optim import AdaBelief

    if not kernel:
        return
    cfg = {k: v for k, v in CONFIGS[name].items()}
    betas = (cfg.pop("beta1", 0.9), cfg.pop("beta2", 0.999))
    models = [_model(), _model()]
    opts = [
        AdaBelief(models[0].parameters(), lr=1e-2, betas=betas, fused=True, **cfg),
        AdaBelief(models[1].parameters(), lr=1e-2, betas=betas, foreach=False, **cfg),
    ]
    x = torch.randn(32, 6, generator=torch.Generator().manual_seed(5))
    y = torch.randn(32, 3, generator=torch.Generator().manual_seed(6))
    for _ in range(20):
        for model, opt in zip(models, opts):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    for pa, pb in zip(models[0].parameters(), models[1].parameters()):
        assert rel(pa, pb) <= 1e-5
        sa, sb = opts[0].state[pa], opts[1].state[pb]
        for key in sb:
            assert rel(sa[key], sb[key]) <= 1e-5, key
    assert not all(torch.equal(p, q) for p, q in zip(models[0].parameters(), _model().parameters()))


def test_class_fused_with_grad_scaler(kernel):
    from adabatch.optim import AdaBelief

    if not kernel:
        return
    models = [_model(), _model()]
    opts = [
        AdaBelief(models[0].parameters(), lr=1e-2, fused=True),
        AdaBelief(models[1].parameters(), lr=1e-2, foreach=False),
    ]
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in opts]
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(5))
    y = torch.randn(16, 3, generator=torch.Generator().manual_seed(6))
    for k in range(8):
        for model, opt, scaler in zip(models, opts, scalers):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            if k == 3:
                loss = loss * math.inf  # an overflowing step: skipped by the scaler
            scaler.scale(loss).backward()
            grads = [p.grad.clone() for p in model.parameters()]
            scaler.step(opt)
            scaler.update()
            if opt is opts[0]:
                # the fused path got the scale and never wrote the (scaled) grads
                assert all(
                    torch.equal(g.view(torch.int32), p.grad.view(torch.int32))
                    for g, p in zip(grads, model.parameters())
                )
    assert scalers[0].get_scale() == scalers[1].get_scale() < 2.0**10
    for pa, pb in zip(models[0].parameters(), models[1].parameters()):
        assert rel(pa, pb) <= 1e-5
        assert opts[0].state[pa]["step"].item() == opts[1].state[pb]["step"].item() == 7.0


def test_class_fused_complex_parameter(kernel):
    """Complex parameters go through the kernel as their real view."""
    from adabatch.optim import AdaBelief

    if not kernel:
        return
    gen = torch.Generator().manual_seed(11)
    start = torch.randn(5, 3, dtype=torch.complex64, generator=gen)
    ps = [torch.nn.Parameter(start.clone()) for _ in range(2)]
    opts = [
        AdaBelief([ps[0]], lr=1e-2, weight_decay=0.1, amsgrad=True, fused=True),
        AdaBelief([ps[1]], lr=1e-2, weight_decay=0.1, amsgrad=True, foreach=False),
    ]
    for _ in range(10):
        g = torch.randn(5, 3, dtype=torch.complex64, generator=gen)
        for p, opt in zip(ps, opts):
            p.grad = g.clone()
            opt.step()
    assert rel(torch.view_as_real(ps[0]), torch.view_as_real(ps[1])) <= 1e-5
    assert rel(torch.view_as_real(ps[0]), torch.view_as_real(start)) > 1e-3
    for key in ("exp_avg", "exp_avg_var", "max_exp_avg_var"):
        a, b = opts[0].state[ps[0]][key], opts[1].state[ps[1]][key]
        assert a.dtype == torch.complex64
        assert rel(torch.view_as_real(a), torch.view_as_real(b)) <= 1e-5
