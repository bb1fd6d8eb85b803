"""The fast paths of the estimators against the reference paths and a naive loop (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adabatch.batching.estimators import MicroBatchStats, PerSampleStats, PerSampleTuning
from adabatch.batching.stats import STAT_NAMES

DT = torch.float64
SCALARS = ("grad_sq_norm", "variance_trace", "ip_variance", "orth_variance")


class Tied(nn.Module):
    """A layer used twice in one pass (its parameters get the sum of both uses)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.out = nn.Linear(5, 3, bias=False)

    def forward(self, x):
        return self.out(torch.tanh(self.a(torch.tanh(self.a(x)))))


def make(kind, seed=0):
    torch.manual_seed(seed)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    elif kind == "nobias":  # weight-only layers and a frozen bias: the joint norm path
        model = nn.Sequential(nn.Linear(5, 8, bias=False), nn.Tanh(), nn.Linear(8, 3))
        model[2].bias.requires_grad_(False)
    else:
        model = Tied()
    return model.to(DT)


def data(b, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, 5, generator=gen, dtype=DT), torch.randint(0, 3, (b,), generator=gen)


def per_sample_grads(model, x, y):
    """[b, parameters]: one backward per sample."""
    params = [p for p in model.parameters() if p.requires_grad]
    gs = []
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        gs.append(torch.cat([p.grad.reshape(-1) for p in params]))
    return torch.stack(gs)


def per_sample_naive(model, x, y):
    g = per_sample_grads(model, x, y)
    m = g.mean(0)
    return m @ m, ((g - m) ** 2).sum() / (len(g) - 1)


@pytest.mark.parametrize("kind", ["mlp", "nobias", "tied"])
@pytest.mark.parametrize("b", [2, 7])
def test_linear_norm_fast_path_matches_naive_loop(kind, b):
    model = make(kind)
    x, y = data(b)
    est = PerSampleStats(model, needs={"variance_trace"})
    model.zero_grad()
    with est.measure():
        F.cross_entropy(model(x), y).backward()
    s = est.stats()
    G, V = per_sample_naive(model, x, y)
    assert s.grad_sq_norm == pytest.approx(float(G), rel=1e-10)
    assert s.variance_trace == pytest.approx(float(V), rel=1e-10)


@pytest.mark.parametrize("kind", ["mlp", "tied"])
def test_measure_leaves_p_grad_as_a_plain_backward(kind):
    model = make(kind)
    x, y = data(6)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    plain = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    est = PerSampleStats(model)
    model.zero_grad()
    with est.measure():
        F.cross_entropy(model(x), y).backward()
    est.stats()
    after = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(after, plain))


def run_both(model, parts, needs):
    grad_est = MicroBatchStats(model, needs=needs)
    hook_est = MicroBatchStats(model, needs=needs, track="hooks")
    model.zero_grad()
    n = sum(len(x) for x, _ in parts)
    for x, y in parts:
        (F.cross_entropy(model(x), y) * (len(x) / n)).backward()
        grad_est.accumulate(len(x))
        hook_est.accumulate(len(x))
    return grad_est.stats(), hook_est.stats()


@pytest.mark.parametrize("kind", ["mlp", "nobias", "tied"])
@pytest.mark.parametrize("needs", [STAT_NAMES, frozenset({"variance_trace"}),
                                   frozenset({"coord_variance"})])
def test_micro_hooks_equal_grad_tracking(kind, needs):
    model = make(kind)
    x, y = data(10)
    parts = [(x[:3], y[:3]), (x[3:4], y[3:4]), (x[4:], y[4:])]
    a, b = run_both(model, parts, needs)
    assert a.batch_size == b.batch_size == 10
    for name in SCALARS:
        va, vb = getattr(a, name), getattr(b, name)
        if name in needs or name == "grad_sq_norm":
            assert vb == pytest.approx(va, rel=1e-12, abs=1e-300), name
            assert va == va and va > 0, name
        else:
            assert va is None and vb is None
    if "coord_variance" in needs:
        for ca, cb in zip(a.coord_variance, b.coord_variance):
            torch.testing.assert_close(cb, ca, rtol=1e-12, atol=1e-300)
        assert any(bool((c > 0).any()) for c in a.coord_variance)


def test_micro_hooks_contract_errors_and_enabled_flag():
    model = make("mlp")
    x, y = data(4)
    with pytest.raises(ValueError, match=r"Invalid track: 'x' \(must be one of 'grad', 'hooks'\)"):
        MicroBatchStats(model, track="x")
    with pytest.raises(TypeError, match="Invalid reduce"):
        MicroBatchStats(model, reduce="sum")
    est = MicroBatchStats(model, track="hooks")
    with pytest.raises(RuntimeError, match="no backward pass reached the parameters"):
        est.accumulate(4)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="a second backward pass reached a parameter"):
        F.cross_entropy(model(x), y).backward()
    est.reset()
    est.enabled = False
    F.cross_entropy(model(x), y).backward()  # not recorded
    with pytest.raises(RuntimeError, match="no backward pass reached the parameters"):
        est.accumulate(4)
    est.enabled = True
    est.remove()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="no backward pass reached the parameters"):
        est.accumulate(4)


class SmallCNN(nn.Module):
    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.fc = nn.Linear(4 * 4 * 4, 3)
        self.tied = tied

    def forward(self, x):
        h = torch.tanh(self.c1(x))
        h = torch.tanh(self.c2(h))
        if self.tied:  # c2 used twice: its weight gradient takes the ordinary path
            h = torch.tanh(self.c2(h))
        return self.fc(h.flatten(1))


def cnn_stats(model, parts, needs, fuse):
    est = PerSampleStats(model, needs=needs, fuse_conv_grad=fuse)
    model.zero_grad()
    n = sum(len(x) for x, _ in parts)
    for x, y in parts:
        with est.measure():
            (F.cross_entropy(model(x), y) * (len(x) / n)).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    return est.stats(), grads


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("needs", [STAT_NAMES, frozenset({"variance_trace"}),
                                   frozenset({"ip_variance"})])
def test_fused_conv_gradient_and_statistics(tied, needs):
    torch.manual_seed(0)
    model = SmallCNN(tied).to(DT)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, 2, 8, 8, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (7,), generator=gen)
    parts = [(x[:4], y[:4]), (x[4:], y[4:])]  # two accumulated passes
    ref, ref_grads = cnn_stats(model, parts, needs, fuse=False)
    got, got_grads = cnn_stats(model, parts, needs, fuse=True)
    model.zero_grad()
    for xk, yk in parts:  # plain backward, no estimator
        (F.cross_entropy(model(xk), yk) * (len(xk) / 7)).backward()
    plain = [p.grad for p in model.parameters()]
    for a, b, c in zip(got_grads, ref_grads, plain):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-15)
        assert torch.equal(b, c)
    for name in SCALARS:
        if getattr(ref, name) is not None:
            assert getattr(got, name) == pytest.approx(getattr(ref, name), rel=1e-10), name
    if ref.coord_variance is not None:
        for a, b in zip(got.coord_variance, ref.coord_variance):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-300)
    assert "forward" not in model.c1.__dict__ and "forward" not in model.c2.__dict__


def spy_convolution_backward(monkeypatch) -> list:
    """Record the output mask of every convolution_backward the estimator calls."""
    masks: list = []
    real = torch.ops.aten.convolution_backward

    class Spy:
        def __call__(self, *args):
            masks.append(list(args[-1]))
            return real(*args)

    monkeypatch.setattr(torch.ops.aten, "convolution_backward", Spy())
    return masks


def test_fused_conv_takes_the_weight_gradient_from_the_per_sample_sum(monkeypatch):
    """The backend's weight-gradient kernel is asked only for tensors it still must give."""
    torch.manual_seed(0)
    model = SmallCNN().to(DT)
    x = torch.randn(5, 2, 8, 8, dtype=DT)
    y = torch.randint(0, 3, (5,))
    masks = spy_convolution_backward(monkeypatch)
    est = PerSampleStats(model, needs={"variance_trace"}, fuse_conv_grad=True)
    with est.measure():
        F.cross_entropy(model(x), y).backward()
    est.stats()
    # per-sample (grouped) calls ask for the weight only; the fused backward never does
    fused = [mk for mk in masks if mk != [False, True, False]]
    assert fused and all(not mk[1] for mk in fused)


def test_inner_products_alone_do_not_fuse_convolutions(monkeypatch):
    """ip needs no per-sample conv gradients (the direct form takes ⟨g_i, ḡ⟩): the forward is
    not patched, p.grad is bitwise a plain backward's, and no per-sample weight gradients are
    taken; the statistics still equal the fused and materialising paths'."""
    torch.manual_seed(0)
    model = SmallCNN().to(DT)
    x = torch.randn(6, 2, 8, 8, dtype=DT)
    y = torch.randint(0, 3, (6,))
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    plain = [p.grad.clone() for p in model.parameters()]
    masks = spy_convolution_backward(monkeypatch)
    from adabatch.batching.persample.conv import ConvRule

    per_sample = ConvRule.weight_grads

    def spy_weight_grads(self, *args, **kwargs):
        masks.append("per-sample")
        return per_sample(self, *args, **kwargs)

    monkeypatch.setattr(ConvRule, "weight_grads", spy_weight_grads)
    needs = {"grad_sq_norm", "ip_variance"}
    est = PerSampleStats(model, needs=needs)
    assert est.fused_convs == (model.c1, model.c2)  # fusable, but not fused for ip alone
    model.zero_grad()
    with est.measure():
        assert "forward" not in model.c1.__dict__
        F.cross_entropy(model(x), y).backward()
    got = est.stats()
    assert masks == []  # neither a fused backward nor a per-sample weight gradient
    for p, g in zip(model.parameters(), plain):
        assert torch.equal(p.grad, g)
    monkeypatch.undo()
    # the same statistic from the per-sample gradients (aip fuses and keeps them)
    ref, _ = cnn_stats(model, [(x, y)], {"ip_variance", "variance_trace"}, fuse=True)
    assert got.ip_variance == pytest.approx(ref.ip_variance, rel=1e-10)
    assert got.grad_sq_norm == pytest.approx(ref.grad_sq_norm, rel=1e-12)


def test_bfloat16_gradients_give_float32_accumulated_statistics():
    # low-precision gradients: ‖·‖² is accumulated in float32 (no bf16 dot products), so both
    # estimators agree with the same computation on a float32 copy of the bf16 model
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).to(torch.bfloat16)
    ref = copy.deepcopy(model).float()
    x, y = data(12)
    parts = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]
    for m in (model, ref):
        for p in m.parameters():
            p.grad = None
    outs = []
    for m in (model, ref):
        est = MicroBatchStats(m, needs={"variance_trace"}, track="hooks")
        for xp, yp in parts:
            xp = xp.to(next(m.parameters()).dtype)
            (F.cross_entropy(m(xp).float(), yp) * (len(xp) / 12)).backward()
            est.accumulate(len(xp))
        outs.append(est.stats())
        est.remove()
        per = PerSampleStats(m, needs={"variance_trace"})
        m.zero_grad()
        with per.measure():
            F.cross_entropy(m(x.to(next(m.parameters()).dtype)).float(), y).backward()
        outs.append(per.stats())
    for got, want in ((outs[0], outs[2]), (outs[1], outs[3])):
        assert got.grad_sq_norm == pytest.approx(want.grad_sq_norm, rel=0.05)
        assert got.variance_trace == pytest.approx(want.variance_trace, rel=0.05)
        assert got.grad_sq_norm > 0 and got.variance_trace > 0


# --- the Gram-form inner products of Linear layers --------------------------------------------
IP_NEEDS = frozenset({"grad_sq_norm", "variance_trace", "ip_variance", "orth_variance"})


def gram_mlp():
    # b = 5: the Linear(20, 24) and both Linear(24, 24), one without bias, take the Gram form
    # (b·(in + out) < in·out); Linear(24, 3) takes the direct product
    torch.manual_seed(7)
    return nn.Sequential(nn.Linear(20, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(),
                         nn.Linear(24, 24, bias=False), nn.Tanh(), nn.Linear(24, 3)).to(DT)


def naive_ip_stats(model, x, y, gbar=None):
    """The inner-product statistics by definition; ḡ is the mean unless given."""
    g = per_sample_grads(model, x, y)
    m = g.mean(0) if gbar is None else gbar
    G = m @ m
    ip = g @ m
    b = len(g)
    return {"grad_sq_norm": G, "variance_trace": ((g - g.mean(0)) ** 2).sum() / (b - 1)
            if gbar is None else None,
            "ip_variance": ((ip - G) ** 2).sum() / (b - 1),
            "orth_variance": ((g - (ip / G)[:, None] * m) ** 2).sum() / (b - 1)}


def count_direct_ip(monkeypatch):
    """Record the Linear layers whose inner products take the direct form (observed)."""
    from adabatch.batching.persample.layers import LinearRule

    calls = []
    real = LinearRule.weight_bias_ip

    def counting(self, call, gw, gb, chunks):
        calls.append(self.module)
        return real(self, call, gw, gb, chunks)

    monkeypatch.setattr(LinearRule, "weight_bias_ip", counting)
    return calls


def gram_inputs():
    x, y = data(5, seed=3)
    return torch.cat([x, x * 0.5, -x, x + 1], 1), y


def test_linear_gram_inner_products_match_naive_loop(monkeypatch):
    model = gram_mlp()
    x, y = gram_inputs()  # 20 features
    calls = count_direct_ip(monkeypatch)
    est = PerSampleStats(model, needs=IP_NEEDS)
    model.zero_grad()
    with est.measure():
        F.cross_entropy(model(x), y).backward()
    s = est.stats()
    assert calls == [model[6]]  # the three Gram layers took no direct product
    ref = naive_ip_stats(model, x, y)
    for name in IP_NEEDS:
        assert getattr(s, name) == pytest.approx(float(ref[name]), rel=1e-10), name


@pytest.mark.parametrize("case", ["two-passes", "stale-grad", "grad-hook", "reduce"])
def test_linear_gram_form_is_not_used_when_p_grad_is_not_the_pass_gradient(case, monkeypatch):
    model = gram_mlp()
    x, y = gram_inputs()
    params = list(model.parameters())
    calls = count_direct_ip(monkeypatch)
    kw = {"reduce": lambda flat: flat} if case == "reduce" else {}
    est = PerSampleStats(model, needs=IP_NEEDS, **kw)
    model.zero_grad()
    stale = None
    if case == "stale-grad":  # grads not zeroed: ḡ = p.grad includes the stale part
        stale = [torch.randn_like(p) * 0.1 for p in params]
        for p, g in zip(params, stale):
            p.grad = g.clone()
    if case == "grad-hook":  # a hook doubles the gradient of the first layer's weight
        handle = model[0].weight.register_hook(lambda g: 2 * g)
    if case == "two-passes":
        for lo, hi in ((0, 2), (2, 5)):
            with est.measure():
                (F.cross_entropy(model(x[lo:hi]), y[lo:hi]) * ((hi - lo) / 5)).backward()
    else:
        with est.measure():
            F.cross_entropy(model(x), y).backward()
    gbar = torch.cat([p.grad.reshape(-1) for p in params]).clone()
    s = est.stats()
    if case == "grad-hook":  # only the hooked layer falls back
        assert set(calls) == {model[0], model[6]} and len(calls) == 2
        # the per-sample gradients are the unhooked ones; ḡ is what p.grad holds
        handle.remove()
        ref = naive_ip_stats(model, x, y, gbar=gbar)
    else:
        assert set(calls) == {model[0], model[2], model[4], model[6]}
        ref = naive_ip_stats(model, x, y, gbar=None if stale is None else gbar)
    for name in ("grad_sq_norm", "ip_variance", "orth_variance"):
        assert getattr(s, name) == pytest.approx(float(ref[name]), rel=1e-10), name


def test_gram_form_can_be_turned_off(monkeypatch):
    # PerSampleTuning(gram_form=False): every Linear takes the direct form, with the same statistics
    model = gram_mlp()
    x, y = gram_inputs()
    calls = count_direct_ip(monkeypatch)
    est = PerSampleStats(model, needs=IP_NEEDS, tuning=PerSampleTuning(gram_form=False))
    model.zero_grad()
    with est.measure():
        F.cross_entropy(model(x), y).backward()
    s = est.stats()
    assert set(calls) == {model[0], model[2], model[4], model[6]}
    ref = naive_ip_stats(model, x, y)
    for name in IP_NEEDS:
        assert getattr(s, name) == pytest.approx(float(ref[name]), rel=1e-10), name


@pytest.mark.parametrize("im2col", [False, True])
def test_grouped_chunk_bound_is_a_tuning_option(im2col, monkeypatch):
    """PerSampleTuning.grouped_max_chunk bounds the samples per grouped weight-gradient convolution
    (not the im2col path's chunks); the statistics do not depend on it."""
    from adabatch.batching.persample.conv import ConvRule

    sizes: list = []
    real = ConvRule.weight_grads

    def spy(self, x, d, bias=False):
        sizes.append(x.shape[0])
        return real(self, x, d, bias)

    torch.manual_seed(0)
    model = SmallCNN().to(DT)
    x = torch.randn(7, 2, 8, 8, dtype=DT)
    y = torch.randint(0, 3, (7,))
    needs = frozenset({"variance_trace", "coord_variance"})
    ref, _ = cnn_stats(model, [(x, y)], needs, fuse=False)
    monkeypatch.setattr(ConvRule, "weight_grads", spy)
    tuning = PerSampleTuning(grouped_max_chunk=2, im2col_max_cin=64 if im2col else 0)
    est = PerSampleStats(model, needs=needs, fuse_conv_grad=False, tuning=tuning)
    model.zero_grad()
    with est.measure():
        F.cross_entropy(model(x), y).backward()
    got = est.stats()
    assert sizes and (max(sizes) == 7 if im2col else max(sizes) == 2)
    assert got.variance_trace == pytest.approx(ref.variance_trace, rel=1e-10)
    for a, b in zip(got.coord_variance, ref.coord_variance):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-300)


def test_fused_convs_lists_what_measure_fuses():
    # numeric zero padding only; nothing with fuse_conv_grad=False; the class forward untouched
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 3, 3, padding="same"),
                          nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular"),
                          nn.Flatten(), nn.Linear(3 * 8 * 8, 2)).to(DT)
    assert PerSampleStats(model).fused_convs == (model[0],)
    assert PerSampleStats(model, fuse_conv_grad=False).fused_convs == ()
    est = PerSampleStats(model, needs={"variance_trace"})
    seen = []
    with est.measure():
        seen.append("forward" in model[0].__dict__)
        F.cross_entropy(model(torch.randn(4, 2, 8, 8, dtype=DT)), torch.tensor([0, 1, 0, 1])
                        ).backward()
    assert seen == [True] and "forward" not in model[0].__dict__
    assert est.stats().variance_trace > 0


def test_explicit_padding_matches_torch():
    """The public-attribute padding of the conv rule equals what nn.ConvNd computes."""
    from adabatch.batching.persample.conv import explicit_padding

    mods = [nn.Conv1d(2, 2, 4, padding="same", dilation=3), nn.Conv2d(2, 2, (3, 4), padding="same"),
            nn.Conv2d(2, 2, 3, padding="valid"), nn.Conv3d(2, 2, (1, 2, 3), padding=(0, 1, 2)),
            nn.Conv2d(2, 2, 5, padding=(2, 1), padding_mode="reflect")]
    for m in mods:
        assert list(explicit_padding(m)) == list(m._reversed_padding_repeated_twice), m
