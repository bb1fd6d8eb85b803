"""Policies beyond the paper: CriticalBatchSize, Goodput and the learning-rate gain rules."""

from __future__ import annotations

import copy
import itertools
import math
import random
import warnings

import pytest

from adabatch import batching
from adabatch.batching.policies import (
    CriticalBatchSize,
    Goodput,
    noise_scale,
    raw_statistics,
)
from adabatch.batching.stats import GradientStats


def stats(b: int, G: float, V: float, **extra: float) -> GradientStats:
    return GradientStats(b, grad_sq_norm=G, variance_trace=V, **extra)


def expected_stats(b: int, grad_sq: float, V: float) -> GradientStats:
    """The statistics whose unbiased estimate is exactly ‖∇F‖² = grad_sq: G = grad_sq + V/b."""
    return stats(b, grad_sq + V / b, V)


# --------------------------------------------------------------------------------------------
# the noise scale
# --------------------------------------------------------------------------------------------


def test_exports_and_raw_statistics():
    assert batching.CriticalBatchSize is CriticalBatchSize and batching.Goodput is Goodput
    assert noise_scale(2.0, 8.0, 8) == pytest.approx(8.0 / (2.0 - 1.0))
    assert noise_scale(1.0, 8.0, 8) is None and noise_scale(math.nan, 1.0, 2) is None
    row = raw_statistics(stats(8, 2.0, 8.0, ip_variance=3.0))
    assert row == {"grad_sq_norm": 2.0, "variance_trace": 8.0, "ip_variance": 3.0,
                   "b_noise": pytest.approx(8.0)}
    assert raw_statistics(None) == {}
    assert raw_statistics(stats(8, 0.5, 8.0))["b_noise"] is None
    assert "b_noise" not in raw_statistics(GradientStats(8, grad_sq_norm=1.0))


def test_ema_math_numerator_and_denominator_separately():
    p = CriticalBatchSize(4, 1024, smoothing=0.5, granularity=4)
    seq = [(4, 3.0, 4.0), (4, 1.5, 8.0), (8, 2.0, 16.0)]  # (b, G, V): Ĝ = 2, -0.5, 0
    ev = eg = 0.0
    for b, G, V in seq:
        p.batch_size = b  # as if the policy had chosen it
        p.update(stats(b, G, V))
        ev, eg = 0.5 * ev + 0.5 * V, 0.5 * eg + 0.5 * (G - V / b)
        assert p.ema_variance == pytest.approx(ev) and p.ema_grad_sq == pytest.approx(eg)
    rows = p.history
    assert rows[0]["b_noise"] == pytest.approx(4.0 / 2.0)  # one step: no bias from the EMA
    assert rows[1]["b_noise_step"] is None                  # Ĝ < 0 on that step alone
    assert rows[1]["b_noise"] == pytest.approx((0.5 * 2 + 4.0) / (0.5 * 1 - 0.25))
    assert rows[2]["required"] == pytest.approx(ev / eg)


def test_grows_to_kappa_times_noise_scale_rounded_and_clamped():
    p = CriticalBatchSize(8, 256, kappa=2.0, smoothing=0.0, granularity=8)
    assert p.needs == frozenset({"grad_sq_norm", "variance_trace"}) and p.wants_stats()
    assert p.update(expected_stats(8, 1.0, 20.0)) == 40      # 2·20 = 40
    row = p.history[-1]
    assert row["required"] == pytest.approx(40.0) and row["passed"] is False
    assert row["statistic"] == pytest.approx(40.0 / 8) and row["grad_sq_norm"] > 0
    assert p.update(expected_stats(40, 1.0, 1.0)) == 40      # never shrinks
    assert p.update(expected_stats(40, 1.0, 1e6)) == 256     # clamped to the maximum
    assert not p.wants_stats()
    assert p.update(None) == 256


def test_non_positive_estimate_keeps_the_batch_and_warns_once():
    p = CriticalBatchSize(8, 64, smoothing=0.0)
    with pytest.warns(RuntimeWarning, match="no positive estimate"):
        assert p.update(stats(8, 1.0, 16.0)) == 8  # Ĝ = 1 - 2 < 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert p.update(stats(8, math.nan, 1.0)) == 8
        assert p.update(stats(8, 1.0, math.inf)) == 8
    assert p.warnings == 3 and p.history[-1]["required"] is None
    assert p.ema_count == 1  # the non-finite steps are not averaged


def test_non_finite_step_does_not_decide_from_old_averages():
    p = CriticalBatchSize(8, 64, smoothing=0.9)
    p.update(expected_stats(8, 1.0, 16.0))
    before = p.batch_size
    with pytest.warns(RuntimeWarning):
        assert p.update(stats(before, math.nan, 1e9)) == before


@pytest.mark.parametrize("seed", range(5))
def test_monotone_and_multiples_of_granularity(seed):
    rng = random.Random(seed)
    p = CriticalBatchSize(6, 600, smoothing=0.8, granularity=6, interval=2)
    sizes = [p.batch_size]
    for _ in range(60):
        s = stats(p.batch_size, rng.uniform(-1, 3), rng.uniform(0, 200)) \
            if p.wants_stats() else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sizes.append(p.update(s))
    assert sizes == sorted(sizes) and all(b % 6 == 0 and 6 <= b <= 600 for b in sizes)
    assert all(r["step"] % 2 == 0 for r in p.history if r["required"] is not None)


def test_requires_stats_on_a_test_step_and_validates():
    p = CriticalBatchSize(4, 64)
    with pytest.raises(ValueError, match="needs GradientStats"):
        p.update(None)
    with pytest.raises(ValueError, match="grad_sq_norm and variance_trace"):
        p.update(GradientStats(4, grad_sq_norm=1.0))
    with pytest.raises(ValueError):
        CriticalBatchSize(4, 64, kappa=0)
    with pytest.raises(TypeError):
        CriticalBatchSize(4, 64, kappa="1")
    with pytest.raises(ValueError):
        CriticalBatchSize(4, 64, smoothing=1.0)
    with pytest.raises(ValueError):
        CriticalBatchSize(4, 64, lr_scaling="cubic")
    with pytest.raises(ValueError):
        Goodput(4, 64, max_growth=1.0)


def _drive(p, n, grad_sq=1.0, V=50.0):
    for _ in range(n):
        b = p.batch_size
        if isinstance(p, Goodput):
            p.observe_time(b, 0.01 + 0.001 * b)
        p.update(expected_stats(b, grad_sq, V) if p.wants_stats() else None)


@pytest.mark.parametrize("cls", [CriticalBatchSize, Goodput])
def test_state_dict_round_trip_and_resume_exactness(cls):
    kwargs = {"lr_scaling": "gain-sum", "granularity": 2}
    a = cls(2, 512, **kwargs)
    _drive(a, 7, V=40.0)
    saved = copy.deepcopy(a.state_dict())
    b = cls(2, 512, **kwargs)
    b.load_state_dict(saved)
    assert b.state_dict() == a.state_dict()
    _drive(a, 9, V=300.0)
    _drive(b, 9, V=300.0)
    assert b.state_dict() == a.state_dict() and a.history == b.history
    with pytest.raises(ValueError, match="ema_count"):
        cls(2, 512, **kwargs).load_state_dict({**saved, "ema_count": -1})
    with pytest.raises(ValueError, match="saved by"):
        batching.BatchSizeController(batching.NormTest(0.5), 2, 512).load_state_dict(saved)
    c = cls(2, 512, **kwargs)
    with pytest.raises(ValueError):
        c.load_state_dict({**saved, "ema_grad_sq": math.nan})
    assert c.step == 0  # unchanged


# --------------------------------------------------------------------------------------------
# goodput
# --------------------------------------------------------------------------------------------


def test_goodput_fit_is_robust_to_noisy_times():
    rng = random.Random(0)
    alpha, beta = 0.05, 0.0005
    p = Goodput(8, 4096, granularity=8, smoothing=0.5, max_growth=2.0)
    B = 400.0  # b* = √(α·B/β) = 200
    sizes = [p.batch_size]
    for _ in range(300):
        b = p.batch_size
        t = (alpha + beta * b) * rng.uniform(0.9, 1.1)
        if rng.random() < 0.05:
            t *= 20  # a stall: an outlier the fit must ignore
        p.observe_time(b, t)
        p.update(expected_stats(b, 1.0, B))
        sizes.append(p.batch_size)
    moves = [n / o for o, n in itertools.pairwise(sizes) if n != o]
    assert moves and max(moves) <= 2.0 + 1e-9          # bounded moves
    assert sizes == sorted(sizes)                      # the batch only grows
    assert 150 <= p.batch_size <= 300                  # near √(α·B/β) = 200, not B = 400
    fa, fb = p.fit()
    assert fa == pytest.approx(alpha, rel=0.3) and fb == pytest.approx(beta, rel=0.3)
    assert p.history[-1]["time_beta"] == pytest.approx(fb)


def test_goodput_without_slope_follows_the_noise_scale_in_bounded_moves():
    p = Goodput(8, 1024, smoothing=0.0, max_growth=1.5, granularity=8)
    p.observe_time(8, 0.1)
    assert p.fit() is None
    assert p.update(expected_stats(8, 1.0, 800.0)) == 16  # at least one multiple
    p.observe_time(16, 0.1)                               # flat: β = 0, device not saturated
    assert p.fit() == (pytest.approx(0.1), pytest.approx(0.0))
    assert p.update(expected_stats(16, 1.0, 800.0)) == 24  # 1.5 × 16
    p.observe_time(24, math.nan)  # ignored
    p.observe_time(24, -1.0)      # ignored
    assert 24 not in p.times
    with pytest.raises(TypeError):
        p.observe_time(24, "fast")


# --------------------------------------------------------------------------------------------
# learning-rate gain rules
# --------------------------------------------------------------------------------------------


def _grow(rule, sizes, B=100.0, steps_each=1, kappa=1.0):
    """Steps at the given sizes (set by hand; the maximum is the last size)."""
    p = CriticalBatchSize(sizes[0], sizes[-1], smoothing=0.0, lr_scaling=rule, kappa=kappa)
    factors = []
    for b in sizes:
        for _ in range(steps_each):
            p.batch_size = b
            p.update(expected_stats(b, 1.0, B))
            factors.append(p.lr_factor)
    return p, factors


def test_gain_sgd_is_adascale_and_gain_ema_its_square_root():
    B, b0 = 100.0, 10
    p, _ = _grow("gain-sgd", [b0, 50])
    r = (B / b0 + 1) / (B / 50 + 1)
    assert p.lr_factor == pytest.approx(r) and 1 < r < 50 / b0
    q, _ = _grow("gain-ema", [b0, 50])
    assert q.lr_factor == pytest.approx(math.sqrt(r))
    # the limits: noise-dominated r -> b/b0, signal-dominated r -> 1
    assert CriticalBatchSize(1, 8, lr_scaling="gain-sgd").gain() is None
    big, _ = _grow("gain-sgd", [1, 8], B=1e9)
    assert big.lr_factor == pytest.approx(8.0, rel=1e-6)


def test_gain_sum_rule_stated_property():
    """φ = 1 while b = b0; φ ≈ r right after a growth; φ -> 1 as steps at b accumulate."""
    B, b0, b1 = 1000.0, 4, 8
    r = (B / b0 + 1) / (B / b1 + 1)
    # κ tiny: the policy never moves the batch itself; the sizes are set by hand
    p = CriticalBatchSize(b0, 2 * b1, smoothing=0.0, lr_scaling="gain-sum", kappa=1e-3)
    factors = []
    for _ in range(100):
        p.update(expected_stats(b0, 1.0, B))
        factors.append(p.lr_factor)
    assert factors == pytest.approx([1.0] * 100)
    after = []
    for _ in range(20000):
        p.batch_size = b1
        p.update(expected_stats(b1, 1.0, B))
        after.append(p.lr_factor)
    assert after[0] == pytest.approx(r, rel=0.02)
    assert after == sorted(after, reverse=True)  # decays as the accumulator adapts
    assert after[-1] == pytest.approx(1.0, rel=0.01)


def test_readme_snippet_builds_a_policy_and_its_estimator():
    import re
    from pathlib import Path

    import torch

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S)
              if "CriticalBatchSize(" in b]
    assert len(blocks) == 1
    ns = {"model": torch.nn.Linear(3, 2)}
    exec(compile(blocks[0], "README.md", "exec"), ns)
    assert ns["est"].needs == ns["policy"].needs == CriticalBatchSize.needs
    assert ns["policy"].lr_scaling == "gain-sum"
