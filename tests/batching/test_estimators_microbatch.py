"""MicroBatchStats: exactness for size-1 micro-batches, unbiasedness, accumulation, reduce."""

from __future__ import annotations

import itertools
import math
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adabatch.batching.estimators import MicroBatchStats
from adabatch.batching.stats import STAT_NAMES

DT = torch.float64


def model_and_data(b=9, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 5, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (b,), generator=gen)
    return model, x, y


def run_micro(model, parts, est):
    model.zero_grad()
    n = sum(len(x) for x, _ in parts)
    for x, y in parts:
        (F.cross_entropy(model(x), y) * (len(x) / n)).backward()
        est.accumulate(len(x))
    return est.stats()


def flat(params):
    return torch.cat([p.grad.reshape(-1) for p in params])


def micro_reference(model, parts):
    """Weighted statistics of the micro-batch means by definition (one model per part)."""
    means, sizes = [], []
    for x, y in parts:
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        means.append(flat(model.parameters()).clone())
        sizes.append(len(x))
    g = torch.stack(means)
    n = torch.tensor(sizes, dtype=DT)
    N, M = n.sum(), len(sizes)
    m = (n[:, None] * g).sum(0) / N
    G = m @ m
    ip = g @ m
    return {
        "grad_sq_norm": G,
        "variance_trace": (n * ((g - m) ** 2).sum(1)).sum() / (M - 1),
        "coord_variance": (n[:, None] * (g - m) ** 2).sum(0) / (M - 1),
        "ip_variance": (n * (ip - G) ** 2).sum() / (M - 1),
        "orth_variance": (n * ((g - (ip / G)[:, None] * m) ** 2).sum(1)).sum() / (M - 1),
        "mean_grad": m,
    }


def assert_matches(s, ref, rtol=1e-6):
    for name in ("grad_sq_norm", "variance_trace", "ip_variance", "orth_variance"):
        assert getattr(s, name) == pytest.approx(float(ref[name]), rel=rtol), name
    for name in ("coord_variance", "mean_grad"):
        got = torch.cat([t.reshape(-1) for t in getattr(s, name)])
        assert (got - ref[name]).abs().max() <= rtol * ref[name].abs().max(), name


def test_size_one_micro_batches_equal_exact_per_sample_statistics():
    model, x, y = model_and_data(7)
    s = run_micro(model, [(x[i:i + 1], y[i:i + 1]) for i in range(7)], MicroBatchStats(model))
    # naive per-sample statistics
    gs = []
    for i in range(7):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        gs.append(flat(model.parameters()).clone())
    g = torch.stack(gs)
    m = g.mean(0)
    G = m @ m
    ip = g @ m
    assert s.batch_size == 7
    assert s.variance_trace == pytest.approx(float(((g - m) ** 2).sum() / 6), rel=1e-6)
    assert s.ip_variance == pytest.approx(float(((ip - G) ** 2).sum() / 6), rel=1e-6)
    assert s.orth_variance == pytest.approx(
        float(((g - (ip / G)[:, None] * m) ** 2).sum() / 6), rel=1e-6)
    v = torch.cat([t.reshape(-1) for t in s.coord_variance])
    assert torch.allclose(v, ((g - m) ** 2).sum(0) / 6, rtol=1e-6, atol=1e-14)


@pytest.mark.parametrize("sizes", [(3, 5, 2), (4, 4), (1, 6, 2, 3)])
def test_accumulation_matches_weighted_definition(sizes):
    model, x, y = model_and_data(sum(sizes), seed=len(sizes))
    bounds = torch.tensor((0, *sizes)).cumsum(0).tolist()
    parts = [(x[a:b], y[a:b]) for a, b in itertools.pairwise(bounds)]
    s = run_micro(model, parts, MicroBatchStats(model))
    assert s.batch_size == sum(sizes)
    assert_matches(s, micro_reference(model, parts))


def test_needs_restrict_the_work():
    model, x, y = model_and_data(8)
    parts = [(x[:4], y[:4]), (x[4:], y[4:])]
    est = MicroBatchStats(model, needs={"variance_trace"})
    s = run_micro(model, parts, est)
    assert s.variance_trace is not None
    assert s.coord_variance is None and s.ip_variance is None and s.mean_grad is None
    assert est._incs == [] and est._coord is None  # nothing stored for ip / coord


def population_grads(n_pop=30, dim=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.2, 2.0, dim, dtype=DT)
    return torch.randn(n_pop, dim, generator=gen, dtype=DT) * scale + 0.5


def test_unbiased_for_unequal_micro_batches():
    """Average over many draws (with replacement) against the population's V and v_j."""
    pop = population_grads()
    mu = pop.mean(0)
    true_v = ((pop - mu) ** 2).mean(0)  # population covariance diagonal (draws with replacement)
    p = torch.zeros(6, dtype=DT, requires_grad=True)
    est = MicroBatchStats([p], needs={"variance_trace", "coord_variance"})
    sizes = (2, 5, 3)
    N = sum(sizes)
    gen = torch.Generator().manual_seed(1)
    draws = 2500
    total_v = torch.zeros(6, dtype=DT)
    total_V = naive_V = 0.0
    for _ in range(draws):
        p.grad = None
        means = []
        for n_k in sizes:  # p.grad accumulates (n_k/N) × micro-batch mean
            idx = torch.randint(0, len(pop), (n_k,), generator=gen)
            means.append(pop[idx].mean(0))
            inc = means[-1] * (n_k / N)
            p.grad = inc.clone() if p.grad is None else p.grad + inc
            est.accumulate(n_k)
        s = est.stats()
        total_V += s.variance_trace
        total_v += s.coord_variance[0]
        naive_V += float(torch.stack(means).var(0).sum()) * N / len(sizes)
    true_V = float(true_v.sum())
    assert total_V / draws == pytest.approx(true_V, rel=0.05)
    assert torch.allclose(total_v / draws, true_v, rtol=0.10)  # per coordinate: noisier
    # the test has power: the unweighted "mean size × variance of the means" is biased here
    assert abs(naive_V / draws - true_V) > 0.08 * true_V


@pytest.mark.parametrize("track", ["grad", "hooks"])
def test_one_micro_batch_of_several_samples_is_refused(track):
    """M = 1 with N >= 2 has no variance estimate, ever: stats() says so (and how to fix it)
    instead of returning NaN that a controller would count as "undecidable" forever."""
    model, x, y = model_and_data(4)
    est = MicroBatchStats(model, track=track)
    with pytest.raises(ValueError, match=r"4 samples in 1 micro-batch.*at least 2 "
                                         r"micro-batches.*PerSampleStats"):
        run_micro(model, [(x, y)], est)
    assert est.num_micro_batches == 0  # reset: the next step starts clean
    two = run_micro(model, [(x[:2], y[:2]), (x[2:], y[2:])], est)
    assert two.batch_size == 4 and math.isfinite(two.variance_trace)


def test_one_sample_gives_nan_not_an_exception():
    """N = 1 is legitimately undecidable (no variance from one sample): NaN, as before."""
    model, x, y = model_and_data(4)
    s = run_micro(model, [(x[:1], y[:1])], MicroBatchStats(model))
    assert s.batch_size == 1 and s.grad_sq_norm > 0
    assert math.isnan(s.variance_trace) and math.isnan(s.ip_variance)
    assert math.isnan(s.orth_variance)
    assert all(bool(torch.isnan(t).all()) for t in s.coord_variance)
    assert not s.is_finite()


def test_one_micro_batch_is_fine_without_variances():
    model, x, y = model_and_data(4)
    s = run_micro(model, [(x, y)], MicroBatchStats(model, needs={"grad_sq_norm", "mean_grad"}))
    assert s.batch_size == 4 and s.grad_sq_norm > 0 and s.variance_trace is None


def _two_ranks(parts_per_rank, needs=STAT_NAMES):
    """stats() of 2 simulated ranks (threads) with a summing reduce; grads averaged first.
    Returns each rank's statistics (or its ValueError) and each rank's number of reduces."""
    models = [model_and_data(12, seed=3)[0] for _ in range(2)]
    barrier = threading.Barrier(2)
    slots: dict[tuple[int, int], torch.Tensor] = {}
    calls = [0, 0]

    def make_reduce(rank):
        def reduce(flat_):
            key = calls[rank]
            calls[rank] += 1
            slots[(rank, key)] = flat_.clone()
            barrier.wait()
            out = slots[(0, key)] + slots[(1, key)]
            barrier.wait()
            return out
        return reduce

    ests = [MicroBatchStats(m, needs=needs, reduce=make_reduce(r)) for r, m in enumerate(models)]
    for m, est, parts in zip(models, ests, parts_per_rank):
        m.zero_grad()
        n = sum(len(xk) for xk, _ in parts)
        for xk, yk in parts:
            (F.cross_entropy(m(xk), yk) * (len(xk) / n)).backward()
            est.accumulate(len(xk))
    for ps in zip(*(m.parameters() for m in models)):
        mean = (ps[0].grad + ps[1].grad) / 2
        for p in ps:
            p.grad = mean.clone()
    out: list = [None, None]

    def run(r):
        try:
            out[r] = ests[r].stats()
        except ValueError as e:
            out[r] = e
    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out, calls


def test_one_local_micro_batch_per_rank_is_two_in_all():
    """Under a reduction every (rank, micro-batch) pair counts: 2 ranks x 1 micro-batch
    decide, and equal one process with those 2 micro-batches."""
    model, x, y = model_and_data(12, seed=3)
    parts = [(x[:6], y[:6]), (x[6:], y[6:])]
    ref = micro_reference(model, parts)
    out, _ = _two_ranks([[parts[0]], [parts[1]]])
    for s in out:
        assert not isinstance(s, Exception), s
        assert s.batch_size == 12
        assert_matches(s, ref)


def test_one_micro_batch_in_all_under_a_reduction_is_refused():
    """A reduce that leaves one micro-batch in all (a world of one; returned or in place)
    raises on the reduced counts; one sample in all still gives NaN."""
    model, x, y = model_and_data(4)
    est = MicroBatchStats(model, reduce=lambda flat_: flat_)
    with pytest.raises(ValueError, match=r"4 samples in 1 micro-batch"):
        run_micro(model, [(x, y)], est)
    in_place = MicroBatchStats(model, reduce=lambda flat_: None)  # reduce returning None
    with pytest.raises(ValueError, match="at least 2 micro-batches"):
        run_micro(model, [(x, y)], in_place)
    one = MicroBatchStats(model, reduce=lambda flat_: flat_)
    assert math.isnan(run_micro(model, [(x[:1], y[:1])], one).variance_trace)


def test_validation_and_reset():
    model, x, y = model_and_data(4)
    est = MicroBatchStats(model)
    with pytest.raises(ValueError, match=r"Invalid batch_size: 0 \(must be >= 1\)"):
        est.accumulate(0)
    with pytest.raises(TypeError, match="Invalid batch_size"):
        est.accumulate(2.0)
    with pytest.raises(TypeError, match="Invalid batch_size"):
        est.accumulate(True)
    with pytest.raises(RuntimeError, match="nothing accumulated"):
        est.stats()
    with pytest.raises(ValueError, match="unknown statistics"):
        MicroBatchStats(model, needs={"nope"})
    with pytest.raises(ValueError, match="no parameters"):
        MicroBatchStats([])
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters"):
        MicroBatchStats(frozen)
    parts = [(x[:2], y[:2]), (x[2:], y[2:])]
    first = run_micro(model, parts, est)
    assert est.num_micro_batches == 0  # stats() reset it
    second = run_micro(model, parts, est)
    assert second.variance_trace == pytest.approx(first.variance_trace, rel=1e-12)
    for c1, c2 in zip(first.coord_variance, second.coord_variance):  # buffers reused, zeroed
        assert torch.allclose(c1, c2, rtol=1e-12, atol=0)
    assert set(STAT_NAMES) >= {"variance_trace"}


def test_reduce_two_simulated_ranks_equal_one_process():
    """Each rank accumulates its local micro-batches, grads are averaged, one reduce each."""
    model, x, y = model_and_data(12, seed=3)
    parts = [(x[3 * i:3 * i + 3], y[3 * i:3 * i + 3]) for i in range(4)]
    ref = micro_reference(model, parts)
    # each rank: 2 local micro-batches, local loss the mean over its 6 samples
    out, calls = _two_ranks([parts[0:2], parts[2:4]])
    assert calls == [2, 2]
    for s in out:
        assert s.batch_size == 12
        assert_matches(s, ref)
