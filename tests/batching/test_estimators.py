"""PerSampleStats against a naive loop (one backward per sample), in float64."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from adabatch.batching.estimators import PerSampleStats, PerSampleTuning
from adabatch.batching.stats import STAT_NAMES

DT = torch.float64
ALL = STAT_NAMES
NEEDS = [
    ALL,
    frozenset({"variance_trace"}),  # norm test: ghost / outer-product paths
    frozenset({"ip_variance", "orth_variance", "grad_sq_norm"}),
    frozenset({"coord_variance", "mean_grad"}),
]


def ce(out, y):
    return F.cross_entropy(out, y)


def flat_grads(params):
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in params])


def naive(model, batches, params, loss_fn=ce):
    """Per-sample gradients by one backward per sample; statistics by definition."""
    gs = []
    for x, y in batches:
        for i in range(len(x)):
            model.zero_grad()
            loss_fn(model(x[i:i + 1]), y[i:i + 1]).backward()
            gs.append(flat_grads(params))
    g = torch.stack(gs)
    b = len(g)
    m = g.mean(0)
    G = m @ m
    ip = g @ m
    return {
        "grad_sq_norm": G,
        "variance_trace": ((g - m) ** 2).sum() / (b - 1),
        "ip_variance": ((ip - G) ** 2).sum() / (b - 1),
        "orth_variance": ((g - (ip / G)[:, None] * m) ** 2).sum() / (b - 1),
        "coord_variance": ((g - m) ** 2).sum(0) / (b - 1),
        "mean_grad": m,
        "b": b,
    }


def measured(model, batches, loss_fn=ce, **kw):
    est = PerSampleStats(model, **kw)
    model.zero_grad()
    n_total = sum(len(x) for x, _ in batches)
    for x, y in batches:
        with est.measure():
            (loss_fn(model(x), y) * (len(x) / n_total)).backward()
    return est, est.stats()


def check(model, batches, needs=ALL, loss_fn=ce, rtol=1e-6, **kw):
    est, s = measured(model, batches, loss_fn, needs=needs, **kw)
    ref = naive(model, batches, est.params, loss_fn)
    assert s.batch_size == ref["b"]
    assert s.grad_sq_norm == pytest.approx(float(ref["grad_sq_norm"]), rel=rtol)
    for name in ("variance_trace", "ip_variance", "orth_variance"):
        value = getattr(s, name)
        if name in needs:
            assert value == pytest.approx(float(ref[name]), rel=rtol), name
        else:
            assert value is None, name
    for name in ("coord_variance", "mean_grad"):
        value = getattr(s, name)
        if name in needs:
            assert len(value) == len(est.params)
            assert all(v.shape == p.shape for v, p in zip(value, est.params))
            flat = torch.cat([v.reshape(-1) for v in value])
            scale = ref[name].abs().max()
            assert (flat - ref[name]).abs().max() <= rtol * scale, name
        else:
            assert value is None
    return est, s


def batch(b, shape, classes, seed=0, ints=None):
    gen = torch.Generator().manual_seed(seed)
    if ints is not None:
        x = torch.randint(0, ints, (b, *shape), generator=gen)
    else:
        x = torch.randn(b, *shape, generator=gen, dtype=DT)
    return x, torch.randint(0, classes, (b,), generator=gen)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(inplace=True), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 3)).to(DT)


class CNN(nn.Module):
    """Conv2d with stride / padding / dilation / groups / reflect padding, then Conv1d."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.c1 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, padding_mode="reflect")
        self.c3 = nn.Conv1d(6, 5, 3, stride=2, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.fc = nn.Linear(5 * 13, 3)

    def forward(self, x):
        h = torch.relu(self.gn(self.c1(x)))
        h = torch.tanh(self.c2(h)).flatten(2)  # [b, 6, 25]
        return self.fc(torch.relu(self.c3(h)).flatten(1))


class SeqModel(nn.Module):
    """Embedding (with padding_idx) + LayerNorm + Linear over [b, T, d]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.emb = nn.Embedding(11, 8, padding_idx=0)
        self.ln = nn.LayerNorm(8)
        self.lin = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, t):
        return self.head(F.gelu(self.lin(self.ln(self.emb(t)))).mean(1))


class Tied(nn.Module):
    """Input embedding tied to the output layer; the head also reuses a Linear twice."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.emb = nn.Embedding(10, 6)
        self.lin = nn.Linear(6, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, t):
        h = torch.tanh(self.lin(self.emb(t)))
        h = torch.tanh(self.lin(h))  # the same module called twice
        return self.head(h).mean(1)


class RawParam(nn.Module):
    """No dedicated rule: raw parameters and a child Linear (torch.func fallback)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, dtype=DT))
        self.inner = nn.Linear(6, 6)

    def forward(self, x):
        return self.inner(x) * torch.sigmoid(self.w) + x * x * self.w


@pytest.mark.parametrize("needs", NEEDS)
def test_mlp(needs):
    check(mlp(), [batch(7, (6,), 3)], needs)


@pytest.mark.parametrize("needs", NEEDS)
def test_cnn_strides_padding_groups_groupnorm(needs):
    check(CNN().to(DT), [batch(7, (2, 9, 9), 3, seed=1)], needs)


@pytest.mark.parametrize("needs", NEEDS)
def test_embedding_layernorm_sequence(needs):
    check(SeqModel().to(DT), [batch(7, (5,), 4, seed=2, ints=11)], needs)


def count_ghost(monkeypatch):
    """Count the calls of the ghost-product kernel (observed, not replaced)."""
    from adabatch.batching.persample import layers

    calls = [0]
    real = layers.ghost_sq_norm

    def counting(U, D):
        calls[0] += 1
        return real(U, D)

    monkeypatch.setattr(layers, "ghost_sq_norm", counting)
    return calls


def test_sequence_linear_ghost_path_matches_materialised(monkeypatch):
    # T = 3 < in*out/(in+out) = 4: the norm-only run takes the ghost product
    model = SeqModel().to(DT)
    x, y = batch(9, (3,), 4, seed=4, ints=11)
    calls = count_ghost(monkeypatch)
    _, a = check(model, [(x, y)], frozenset({"variance_trace"}))
    assert calls[0] == 1
    _, b = measured(model, [(x, y)], needs=ALL)
    assert a.variance_trace == pytest.approx(b.variance_trace, rel=1e-10)


@pytest.mark.parametrize("needs", NEEDS)
def test_tied_weights_and_reused_module(needs):
    check(Tied().to(DT), [batch(7, (4,), 10, seed=3, ints=10)], needs)


class Reused2D(nn.Module):
    """A Linear on [b, in] inputs called twice, and a weight shared by two Linears."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.lin = nn.Linear(5, 5)
        self.a = nn.Linear(5, 5, bias=False)
        self.b = nn.Linear(5, 3)
        self.other = nn.Linear(5, 5)
        self.other.weight = self.a.weight

    def forward(self, x):
        h = torch.tanh(self.lin(torch.tanh(self.lin(x))))
        return self.b(torch.tanh(self.a(h)) + torch.tanh(self.other(x)))


@pytest.mark.parametrize("needs", NEEDS)
def test_reused_linear_on_flat_inputs(needs):
    # the norm-only Linear hook must hand shared parameters to the per-pass path
    check(Reused2D().to(DT), [batch(9, (5,), 3, seed=4)], needs)


@pytest.mark.parametrize("needs", NEEDS)
def test_fallback_torch_func(needs):
    torch.manual_seed(5)
    model = nn.Sequential(RawParam(), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    check(model, [batch(7, (6,), 3, seed=5)], needs)


def test_gradient_accumulation_unequal_micro_batches():
    x, y = batch(10, (2, 9, 9), 3, seed=6)
    parts = [(x[:3], y[:3]), (x[3:8], y[3:8]), (x[8:], y[8:])]
    _, s = check(CNN().to(DT), parts)
    assert s.batch_size == 10


@pytest.mark.parametrize("needs", NEEDS)
def test_conv_with_large_weight_small_activations(needs, monkeypatch):
    # weight (216) larger than input + output gradient (12 + 32): inner products come from
    # the conv forward with ḡ as weight, norms from the ghost product
    torch.manual_seed(11)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Flatten(),
                          nn.Linear(32, 3)).to(DT)
    calls = count_ghost(monkeypatch)
    check(model, [batch(7, (3, 2, 2), 3, seed=11)], needs)
    uses_ghost = "coord_variance" not in needs and bool(needs & {"variance_trace", "orth_variance"})
    assert (calls[0] > 0) == uses_ghost


def test_chunking_gives_the_same_statistics():
    model = CNN().to(DT)
    data = [batch(7, (2, 9, 9), 3, seed=7)]
    check(model, data, chunk_size=2)
    check(model, data, budget=50)


def test_frozen_layer_excluded():
    model = mlp()
    for p in model[0].parameters():
        p.requires_grad_(False)
    est, _ = check(model, [batch(7, (6,), 3)])
    assert len(est.params) == 4
    assert all(p is not model[0].weight for p in est.params)


def test_unused_parameter_gives_zero():
    model = SeqModel().to(DT)
    extra = nn.Linear(3, 3).to(DT)  # registered but never called
    model.extra = extra
    est, s = check(model, [batch(5, (4,), 4, ints=11)])
    i = next(i for i, p in enumerate(est.params) if p is extra.weight)
    assert torch.count_nonzero(s.mean_grad[i]) == 0
    assert torch.count_nonzero(s.coord_variance[i]) == 0


def test_conv3d_and_1d_padding_modes():
    torch.manual_seed(8)
    model = nn.Sequential(
        nn.Conv3d(2, 4, (2, 3, 3), stride=(1, 2, 1), padding=(1, 1, 0), dilation=(1, 1, 2),
                  groups=2),
        nn.Tanh(), nn.Flatten(2),
        nn.Conv1d(4, 3, 3, padding="same", padding_mode="circular"), nn.Flatten(),
        nn.LazyLinear(3),
    ).to(DT)
    x, y = batch(5, (2, 3, 5, 6), 3, seed=8)
    model(x)  # materialise the lazy layer
    check(model, [(x, y)])


@pytest.mark.parametrize("im2col", [False, True])
@pytest.mark.parametrize("fuse", [False, True])
def test_conv_weight_gradient_paths_agree(im2col, fuse):
    # per-sample conv weight gradients by im2col + bmm or by one grouped convolution, with the
    # batch weight gradient fused from them or not: the same statistics and the same p.grad
    tuning = PerSampleTuning(im2col_max_cin=64 if im2col else 0)
    torch.manual_seed(12)
    model = nn.Sequential(
        nn.Conv3d(2, 4, (2, 3, 3), stride=(1, 2, 1), padding=(1, 1, 0), dilation=(1, 1, 2),
                  groups=2),
        nn.Tanh(), nn.Flatten(2),
        nn.Conv1d(4, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(),
        nn.LazyLinear(3),
    ).to(DT)
    x, y = batch(5, (2, 3, 5, 6), 3, seed=12)
    model(x)
    plain = copy.deepcopy(model)
    ce(plain(x), y).backward()
    check(model, [(x, y)], fuse_conv_grad=fuse, tuning=tuning)
    check(model, [(x, y)], frozenset({"variance_trace"}), fuse_conv_grad=fuse, tuning=tuning)
    model.zero_grad()
    est = PerSampleStats(model, fuse_conv_grad=fuse, tuning=tuning)
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv3d))]
    assert all(est._rules[m].im2col == im2col for m in convs)
    with est.measure():
        ce(model(x), y).backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)


def test_batchnorm_in_training_mode_raises():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 2))
    est = PerSampleStats(model)
    with pytest.raises(ValueError, match=r"layer '1' \(BatchNorm2d\) is in training mode.*"
                                         r"MicroBatchStats.*GroupNorm"):
        with est.measure():
            pass
    model.eval()  # running statistics: per-sample statistics are defined again
    with est.measure():
        F.cross_entropy(model(torch.randn(4, 1, 4, 4)), torch.tensor([0, 1, 0, 1])).backward()
    assert est.stats().batch_size == 4


def _parametrized(kind):
    from torch.nn.utils.parametrizations import orthogonal, spectral_norm, weight_norm

    torch.manual_seed(3)
    if kind == "weight_norm conv":
        return nn.Sequential(weight_norm(nn.Conv2d(2, 3, 3)), nn.Tanh(), nn.Flatten(),
                             nn.Linear(27, 3)).to(DT)
    wrap = {"weight_norm": weight_norm, "orthogonal": orthogonal,
            "spectral_norm": spectral_norm}[kind]
    return nn.Sequential(nn.Linear(4, 5), wrap(nn.Linear(5, 5)), nn.Tanh(),
                         nn.Linear(5, 3)).to(DT)


@pytest.mark.parametrize("needs", NEEDS)
@pytest.mark.parametrize("kind", ["weight_norm", "weight_norm conv", "orthogonal",
                                  "spectral_norm"])
def test_parametrized_layers(kind, needs):
    """A Linear or convolution with a parametrized weight (torch.nn.utils.parametrize) is
    measured over its original parameters (weight_norm's g and v, ...): exact against the
    per-sample loop, through the closed form (weight_norm on a flat Linear, norms or
    coordinates only) and the materialised pullback alike. spectral_norm in eval mode here;
    in training mode see test_spectral_norm_in_training_mode_is_exact_and_not_advanced."""
    model = _parametrized(kind)
    if kind == "spectral_norm":
        model.eval()
    shape = (2, 5, 5) if kind == "weight_norm conv" else (4,)
    est, _ = check(model, [batch(6, shape, 3, seed=9)], needs=needs)
    names = [n for n, p in model.named_parameters() if any(p is q for q in est.params)]
    assert any("parametrizations.weight.original" in n for n in names)


@pytest.mark.parametrize("needs", NEEDS)
@pytest.mark.parametrize("frozen", ["original0", "original1"])
def test_weight_norm_with_a_frozen_original(frozen, needs):
    """weight_norm with its magnitude g (original0) or its direction v (original1) frozen:
    the other is measured, exact; the frozen one still enters the pullback."""
    model = _parametrized("weight_norm")
    getattr(model[1].parametrizations.weight, frozen).requires_grad_(False)
    est, _ = check(model, [batch(6, (4,), 3, seed=14)], needs=needs)
    names = [n for n, p in model.named_parameters() if any(p is q for q in est.params)]
    assert f"1.parametrizations.weight.{frozen}" not in names


@pytest.mark.parametrize("dim", [0, 1, None])
@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_weight_norm_pullback_is_the_vector_jacobian_product(layer, dim):
    """The closed form of weight_norm's per-sample pullback equals torch.func.vjp of the
    parametrization itself (torch._weight_norm), sample by sample, for every dim."""
    from torch.func import functional_call, vjp
    from torch.nn.utils.parametrizations import weight_norm

    from adabatch.batching.persample.parametrized import weight_norm_pullback

    torch.manual_seed(4)
    base = nn.Linear(5, 4) if layer == "linear" else nn.Conv2d(3, 4, 2)
    m = weight_norm(base.to(DT), dim=dim)
    plist = m.parametrizations.weight
    theta = {k: v.detach() for k, v in plist.named_parameters()}
    gw = torch.randn(6, *m.weight.shape, dtype=DT)
    dg, dv = weight_norm_pullback(gw, theta["original1"], theta["original0"], plist[0].dim)
    _, pullback = vjp(lambda t: functional_call(plist, t, ()), theta)
    for i in range(len(gw)):
        want = pullback(gw[i])[0]
        torch.testing.assert_close(dg[i], want["original0"], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(dv[i], want["original1"], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("layer, dim", [("linear", 0), ("linear", 1), ("conv", 0),
                                        ("conv", 1)])
def test_spectral_norm_pullback_is_the_vector_jacobian_product(layer, dim):
    """The closed form of spectral_norm's per-sample pullback (u, v held fixed) equals
    torch.func.vjp of the parametrization itself in eval mode, sample by sample."""
    from torch.func import functional_call, vjp
    from torch.nn.utils.parametrizations import spectral_norm

    from adabatch.batching.persample.parametrized import spectral_norm_pullback

    torch.manual_seed(5)
    base = nn.Linear(5, 4) if layer == "linear" else nn.Conv2d(3, 4, 2)
    m = spectral_norm(base.to(DT), dim=dim).eval()
    plist = m.parametrizations.weight
    theta = {k: v.detach() for k, v in plist.named_parameters()}
    sn = plist[0]
    gw = torch.randn(6, *m.weight.shape, dtype=DT)
    got = spectral_norm_pullback(gw, theta["original"], sn._u, sn._v, dim)
    _, pullback = vjp(lambda t: functional_call(plist, t, ()), theta)
    for i in range(len(gw)):
        torch.testing.assert_close(got[i], pullback(gw[i])[0]["original"], rtol=1e-12,
                                   atol=1e-14)


@pytest.mark.parametrize("need_norm, need_coord", [(True, False), (False, True), (True, True)])
def test_flat_weight_norm_sums_match_the_materialised_gradients(need_norm, need_coord):
    """The closed-form norms and coordinate sums of a weight_norm Linear on [b, in] inputs
    equal those of the per-sample gradients materialised (δ_i a_iᵀ, then the pullback)."""
    from adabatch.batching.persample.parametrized import (
        flat_weight_norm_sums,
        weight_norm_pullback,
    )

    gen = torch.Generator().manual_seed(6)
    a, D = (torch.randn(9, 7, generator=gen, dtype=DT), torch.randn(9, 4, generator=gen,
                                                                      dtype=DT))
    v, g = torch.randn(4, 7, generator=gen, dtype=DT), torch.randn(4, 1, generator=gen,
                                                                     dtype=DT)
    dg, dv = weight_norm_pullback(torch.einsum("io,ij->ioj", D, a), v, g, 0)
    got = flat_weight_norm_sums(a, D, v, g, need_norm, need_coord)
    want = ((dg ** 2).sum(), (dv ** 2).sum(), (dg ** 2).sum(0), (dv ** 2).sum(0))
    for k, (x, w) in enumerate(zip(got, want)):
        if (k < 2 and not need_norm) or (k >= 2 and not need_coord):
            assert x is None
        else:
            torch.testing.assert_close(x.to(DT), w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("need_norm, need_coord", [(True, False), (False, True), (True, True)])
def test_flat_spectral_norm_sums_match_the_materialised_gradients(need_norm, need_coord, dim):
    """The closed-form norm and coordinate sums of a spectral_norm Linear on [b, in] inputs
    equal those of the per-sample gradients materialised (δ_i a_iᵀ, then the pullback)."""
    from adabatch.batching.persample.parametrized import (
        flat_spectral_norm_sums,
        spectral_norm_pullback,
    )

    gen = torch.Generator().manual_seed(7)
    a, D = torch.randn(9, 7, generator=gen, dtype=DT), torch.randn(9, 4, generator=gen,
                                                                     dtype=DT)
    w = torch.randn(4, 7, generator=gen, dtype=DT)
    u, v = ((torch.randn(4, generator=gen, dtype=DT), torch.randn(7, generator=gen, dtype=DT))
            if dim == 0 else
            (torch.randn(7, generator=gen, dtype=DT), torch.randn(4, generator=gen, dtype=DT)))
    per = spectral_norm_pullback(torch.einsum("io,ij->ioj", D, a), w, u, v, dim)
    norm, coord = flat_spectral_norm_sums(a, D, w, u, v, dim, need_norm, need_coord)
    assert (norm is None) != need_norm and (coord is None) != need_coord
    if need_norm:
        torch.testing.assert_close(norm, (per ** 2).sum(), rtol=1e-12, atol=1e-14)
    if need_coord:
        torch.testing.assert_close(coord, (per ** 2).sum(0), rtol=1e-12, atol=1e-14)


def test_parametrized_rules_chosen():
    """A parametrized Linear or convolution weight goes through the layer's own rule and the
    parametrization's pullback (ParametrizedRule); any other parametrized tensor (here a
    bias) through the recomputation of the whole module (FuncRule), also exact."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.parametrizations import orthogonal, spectral_norm, weight_norm

    from adabatch.batching.persample.layers import FuncRule
    from adabatch.batching.persample.parametrized import ParametrizedRule

    class Softplus(nn.Module):
        def forward(self, x):
            return F.softplus(x)

    torch.manual_seed(8)
    biased = nn.Linear(5, 5)
    parametrize.register_parametrization(biased, "bias", Softplus())
    model = nn.Sequential(weight_norm(nn.Linear(4, 5)), nn.Tanh(), orthogonal(nn.Linear(5, 5)),
                          nn.Tanh(), biased, nn.Tanh(), spectral_norm(nn.Linear(5, 3))).to(DT)
    model[6].eval()  # the per-sample loop would advance u in training mode (see below)
    est, _ = check(model, [batch(7, (4,), 3, seed=12)])
    rules = {name: est._rules[model[int(name)]] for name in ("0", "2", "4", "6")}
    assert {k: type(r) for k, r in rules.items()} == {
        "0": ParametrizedRule, "2": ParametrizedRule, "4": FuncRule, "6": ParametrizedRule}
    assert rules["0"].weight_norm_dim == 0 and rules["0"].spectral is None
    assert rules["2"].weight_norm_dim is None and rules["2"].spectral is None  # vjp
    assert rules["6"].spectral is model[6].parametrizations.weight[0]


def test_spectral_norm_in_training_mode_is_exact_and_not_advanced():
    """spectral_norm in training mode takes a power-iteration step on its vectors u, v in
    every forward and then uses them. The estimator recomputes the layer with its
    parametrization in eval mode: it uses the u, v the pass's forward used (the statistics
    equal the per-sample loop in eval mode after the pass), and takes no step of its own (u
    equals that of the same model trained without the estimator)."""
    model = _parametrized("spectral_norm")
    twin = copy.deepcopy(model)
    x, y = batch(6, (4,), 3, seed=10)
    est = PerSampleStats(model, needs=ALL)
    with est.measure():
        F.cross_entropy(model(x), y).backward()
    s = est.stats()
    twin(x)  # the same forward, without the estimator
    u = model[1].parametrizations.weight[0]._u
    assert torch.equal(u, twin[1].parametrizations.weight[0]._u)
    assert model.training and model[1].parametrizations.weight.training
    model.eval()  # the u, v of the pass, not advanced again: the per-sample loop in eval mode
    ref = naive(model, [(x, y)], est.params)
    for name in ("grad_sq_norm", "variance_trace", "ip_variance", "orth_variance"):
        assert getattr(s, name) == pytest.approx(float(ref[name]), rel=1e-9), name
    flat = torch.cat([v.reshape(-1) for v in s.coord_variance])
    assert (flat - ref["coord_variance"]).abs().max() <= 1e-9 * ref["coord_variance"].abs().max()


def test_spectral_norm_layer_called_twice_in_training_mode_raises():
    """A spectral_norm layer in training mode that runs twice in one pass moves its u, v
    between the calls, so the first call cannot be recomputed as it ran: refused, naming the
    layer. In eval mode the same model is exact."""
    from torch.nn.utils.parametrizations import spectral_norm

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = spectral_norm(nn.Linear(5, 5))
            self.head = nn.Linear(5, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.layer(torch.tanh(self.layer(x)))))

    torch.manual_seed(9)
    model = Twice().to(DT)
    x, y = batch(6, (5,), 3, seed=13)
    est = PerSampleStats(model, needs={"variance_trace"})
    with pytest.raises(ValueError, match=r"layer 'layer' runs 2 times in one pass with "
                                         r"spectral_norm .* in training mode"):
        with est.measure():
            F.cross_entropy(model(x), y).backward()
    est.remove()
    model.eval()
    check(model, [(x, y)])


def test_samples_mixed_outside_the_layers_give_the_hooks_split():
    """A documented limit (README, Estimators): samples mixed outside any layer the
    estimator recomputes (here a mean over the batch inside a forward) are invisible to hooks.
    The statistics are then those of the hooks' split of the batch gradient by sample,
    b·δ_i a_iᵀ (+ b·δ_i for the bias) from the batch's own output gradients δ, not of the
    gradients of samples alone, which differ."""
    class Mixing(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            h = self.lin(x)
            return h - 0.5 * h.mean(0, keepdim=True)

    torch.manual_seed(5)
    model = Mixing().to(DT)
    x, y = batch(6, (4,), 3, seed=11)
    est, s = measured(model, [(x, y)], needs=ALL)
    # the split: δ of the batch loss at the Linear's output, row by row
    h = model.lin(x)
    h.retain_grad()
    F.cross_entropy(h - 0.5 * h.mean(0, keepdim=True), y).backward()
    b = len(x)
    split = torch.cat([b * torch.einsum("io,ij->ioj", h.grad, x).reshape(b, -1), b * h.grad], 1)
    mean = split.mean(0)
    assert s.variance_trace == pytest.approx(float(((split - mean) ** 2).sum() / (b - 1)),
                                             rel=1e-12)
    alone = naive(model, [(x, y)], est.params)
    assert abs(s.variance_trace - float(alone["variance_trace"])) > 0.1 * s.variance_trace


class _Recurrent(nn.Module):
    """A recurrent layer (batch first) and a Linear head on its last output."""

    def __init__(self, cls):
        super().__init__()
        self.rnn = cls(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


@pytest.mark.parametrize("cls", [nn.RNN, nn.GRU, nn.LSTM])
def test_recurrent_layers_are_refused_at_construction(cls):
    """torch's RNN kernels fail inside torch.func.vmap (or fail to batch): the estimator
    refuses them when it is built, naming the layer and the ways out, instead of raising a
    torch error from inside vmap after the backward pass; left out, the rest is measured."""
    model = _Recurrent(cls).to(DT)
    with pytest.raises(ValueError, match=rf"'rnn' is a recurrent layer \(nn\.{cls.__name__}\)"
                                         r".*exclude=\['rnn'\].*MicroBatchStats"):
        PerSampleStats(model)
    est, _ = check(model, [batch(5, (6, 3), 2, seed=7)], exclude=["rnn"])
    assert est.params == list(model.head.parameters())


def test_module_that_vmap_cannot_run_is_named():
    """A module without a rule of its own is recomputed sample by sample by torch.func.vmap;
    one it cannot run (here a data-dependent branch in the forward, which treats each sample
    alone) raises a ValueError that names it and the ways out, the torch error kept as its
    cause."""
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4, dtype=DT))

        def forward(self, x):
            if bool((x.detach().abs() > 1e6).any()):  # never here: a guard against overflow
                x = x.clamp(-1e6, 1e6)
            return x * self.scale

    model = nn.Sequential(nn.Linear(3, 4), DataDependent(), nn.Linear(4, 2)).to(DT)
    x, y = batch(5, (3,), 2, seed=8)
    est = PerSampleStats(model, needs={"variance_trace"})
    with pytest.raises(ValueError, match=r"layer '1' \(DataDependent, measured by recomputing "
                                         r"it sample by sample\) cannot be run by "
                                         r"torch\.func\.vmap: .*exclude=\['1'\]") as info:
        with est.measure():
            F.cross_entropy(model(x), y).backward()
    assert isinstance(info.value.__cause__, RuntimeError)
    est.remove()
    check(model, [(x, y)], exclude=["1"])


def test_parameter_used_outside_a_module_call_raises():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.w = nn.Linear(4, 2)  # its weight is only used through F.linear

        def forward(self, x):
            return F.linear(self.lin(x), self.w.weight)

    model = Functional()
    est = PerSampleStats(model)
    with est.measure():
        F.cross_entropy(model(torch.randn(3, 4)), torch.tensor([0, 1, 1])).backward()
    with pytest.raises(ValueError, match=r"parameter 'w\.weight' has a gradient that no hooked"):
        est.stats()


def test_batch_first_check():
    # positional embeddings shared by the samples are measured: tests/batching/test_transformers.py
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(4, 4)
            self.lin = nn.Linear(4, 2)

        def forward(self, x):  # a layer that sees the sequence axis first
            return self.lin(self.inp(x).transpose(0, 1)).mean(0)

    model = SeqFirst()
    est = PerSampleStats(model)
    msg = r"layer 'lin' saw a batch of 5 samples but the pass has 3"
    with pytest.raises(ValueError, match=msg):
        with est.measure():
            model(torch.randn(3, 5, 4))


def test_batch_first_check_flat_linear():
    # the short forward hook of a Linear on [b, in] inputs (_flat_linear_hook) makes the same
    # checks: against the size given to measure(), and against an earlier layer's
    class Transposed(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(4, 6)
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(self.inp(x).T)

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    est = PerSampleStats(model)
    with pytest.raises(ValueError, match=r"layer '0' saw a batch of 3 samples but the pass has 5"):
        with est.measure(batch_size=5):
            model(torch.randn(3, 4))
    assert not model._forward_pre_hooks  # no model hook without an Embedding to serve
    est = PerSampleStats(Transposed())
    msg = r"layer 'lin' saw a batch of 6 samples but the pass has 3"
    with pytest.raises(ValueError, match=msg):
        with est.measure():
            est.model(torch.randn(3, 4))


def test_validation_messages():
    with pytest.raises(ValueError, match="unknown statistics"):
        PerSampleStats(mlp(), needs={"variance"})
    with pytest.raises(ValueError, match=r"Invalid chunk_size: 0 \(must be >= 1\)"):
        PerSampleStats(mlp(), chunk_size=0)
    with pytest.raises(TypeError, match="Invalid chunk_size"):
        PerSampleStats(mlp(), chunk_size=2.0)
    with pytest.raises(ValueError, match="Invalid budget"):
        PerSampleStats(mlp(), budget=0)
    with pytest.raises(TypeError, match="Invalid budget"):
        PerSampleStats(mlp(), budget="big")
    with pytest.raises(TypeError, match="Invalid reduce"):
        PerSampleStats(mlp(), reduce=3)
    with pytest.raises(ValueError, match="Invalid im2col_max_cin"):
        PerSampleTuning(im2col_max_cin=-1)
    with pytest.raises(ValueError, match="Invalid grouped_max_chunk"):
        PerSampleTuning(grouped_max_chunk=0)
    with pytest.raises(TypeError, match="Invalid gram_form"):
        PerSampleTuning(gram_form=1)
    with pytest.raises(TypeError, match="Invalid tuning"):
        PerSampleStats(mlp(), tuning={"im2col_max_cin": 0})
    with pytest.raises(TypeError, match=r"needs an nn\.Module"):
        PerSampleStats([torch.zeros(2)])
    with pytest.raises(ValueError, match="scale_grad_by_freq"):
        PerSampleStats(nn.Embedding(4, 2, scale_grad_by_freq=True))
    est = PerSampleStats(mlp())
    with pytest.raises(RuntimeError, match="nothing measured"):
        est.stats()
    with pytest.raises(ValueError, match="Invalid batch_size"), est.measure(batch_size=0):
        pass
    with pytest.raises(TypeError, match="Invalid batch_size"), est.measure(batch_size=2.5):
        pass


@pytest.mark.parametrize("model_fn", [mlp, lambda: CNN().to(DT)])
def test_backward_after_the_measure_block_raises(model_fn):
    # the output-gradient hooks of a pass fire only inside its measure(); later, their
    # contributions would be lost or land in another pass
    model = model_fn()
    est = PerSampleStats(model)
    x, y = (batch(5, (6,), 3) if isinstance(model, nn.Sequential)
            else batch(5, (2, 9, 9), 3, seed=1))
    with est.measure():
        out = model(x)
    with pytest.raises(RuntimeError, match="arrived after its measure"):
        ce(out, y).backward()
    with est.measure():  # another pass does not revive the old graph's hooks
        out = model(x)
    with est.measure():
        model(x)
        with pytest.raises(RuntimeError, match="arrived after its measure"):
            ce(out, y).backward()


def test_single_sample_gives_nan_variances_and_resets():
    model = mlp()
    est = PerSampleStats(model)
    x, y = batch(1, (6,), 3)
    with est.measure():
        ce(model(x), y).backward()
    s = est.stats()
    assert s.batch_size == 1 and s.grad_sq_norm > 0
    assert s.variance_trace != s.variance_trace  # NaN: a test cannot decide
    assert not s.is_finite()
    with pytest.raises(RuntimeError, match="nothing measured"):
        est.stats()  # stats() reset the estimator


def test_grad_sq_norm_only_needs_no_per_sample_work():
    model = mlp()
    est = PerSampleStats(model, needs={"grad_sq_norm"})
    x, y = batch(7, (6,), 3)
    with est.measure():
        ce(model(x), y).backward()
    s = est.stats()
    assert s.grad_sq_norm == pytest.approx(float(flat_grads(est.params).square().sum()))
    assert s.variance_trace is None and s.batch_size == 7


def test_reduce_across_two_simulated_ranks():
    """Two 'ranks' (threads) with a fake SUM all-reduce equal one process on the whole batch."""
    x, y = batch(8, (2, 9, 9), 3, seed=9)
    ref_model = CNN().to(DT)
    ref = naive(ref_model, [(x, y)], list(ref_model.parameters()))
    models = [CNN().to(DT) for _ in range(2)]
    barrier = threading.Barrier(2)
    slots: dict[tuple[int, int], torch.Tensor] = {}
    calls = [0, 0]

    def make_reduce(rank):
        def reduce(flat):
            key = calls[rank]
            calls[rank] += 1
            slots[(rank, key)] = flat.clone()
            barrier.wait()
            flat.copy_(slots[(0, key)] + slots[(1, key)])
            barrier.wait()
            return flat
        return reduce

    ests = [PerSampleStats(m, reduce=make_reduce(r)) for r, m in enumerate(models)]
    for r, (m, est) in enumerate(zip(models, ests)):
        with est.measure():
            ce(m(x[4 * r:4 * r + 4]), y[4 * r:4 * r + 4]).backward()
    for ps in zip(*(m.parameters() for m in models)):  # what DDP's all-reduce does
        mean = (ps[0].grad + ps[1].grad) / 2
        for p in ps:
            p.grad = mean.clone()
    out = [None, None]

    def run(r):
        out[r] = ests[r].stats()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [2, 2]  # one small reduction + one for coord_variance
    for s in out:
        assert s.batch_size == 8
        for name in ("variance_trace", "ip_variance", "orth_variance"):
            assert getattr(s, name) == pytest.approx(float(ref[name]), rel=1e-6)
        flat = torch.cat([v.reshape(-1) for v in s.coord_variance])
        assert torch.allclose(flat, ref["coord_variance"], rtol=1e-6, atol=1e-12)


def test_float32_model_close_to_float64():
    model = CNN()
    x, y = batch(16, (2, 9, 9), 3, seed=10)
    _, s32 = measured(model, [(x.float(), y)])
    _, s64 = measured(model.to(DT), [(x, y)])
    for name in ("variance_trace", "ip_variance", "orth_variance"):
        assert getattr(s32, name) == pytest.approx(getattr(s64, name), rel=1e-3)


@settings(max_examples=6, deadline=None)
@given(b=st.integers(2, 6), c_in=st.integers(1, 3), c_out=st.integers(1, 4),
       k=st.integers(1, 3), stride=st.integers(1, 2), pad=st.integers(0, 2),
       dil=st.integers(1, 2), length=st.integers(5, 8), seq=st.integers(1, 4),
       hidden=st.integers(1, 5))
def test_property_random_shapes(b, c_in, c_out, k, stride, pad, dil, length, seq, hidden):
    torch.manual_seed(b * 100 + length)
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=pad, dilation=dil)
    x, y = batch(b, (c_in, length, length), 2, seed=b + length)
    with torch.no_grad():
        n_out = conv(x.float()).shape[-1]
    if n_out < 1:
        return
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(2), nn.Linear(n_out * n_out, hidden),
                          nn.Tanh(), nn.Flatten(), nn.Linear(c_out * hidden, 2)).to(DT)
    check(model, [(x, y)])
    check(model, [(x, y)], frozenset({"variance_trace"}))
    del seq


@settings(max_examples=10, deadline=None)
@given(b=st.integers(2, 9), d_in=st.integers(1, 24), hidden=st.integers(1, 24),
       bias=st.booleans(), frozen_bias=st.booleans(), two=st.booleans())
def test_property_linear_inner_products(b, d_in, hidden, bias, frozen_bias, two):
    # Linear layers on [b, in]: the Gram form (b·(in + out) < in·out) or the direct product,
    # with and without (trainable) bias, in one pass or two
    torch.manual_seed(b * 1000 + d_in * 30 + hidden)
    model = nn.Sequential(nn.Linear(d_in, hidden, bias=bias), nn.Tanh(),
                          nn.Linear(hidden, 3)).to(DT)
    if bias and frozen_bias:
        model[0].bias.requires_grad_(False)
    x, y = batch(b, (d_in,), 3, seed=b + d_in)
    parts = [(x[:1], y[:1]), (x[1:], y[1:])] if two else [(x, y)]
    check(model, parts, frozenset({"ip_variance", "orth_variance", "variance_trace"}), rtol=1e-9)
