"""The batch-size tests against statistics computed naively from per-sample gradient rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adabatch.batching import batch_tests as T
from adabatch.batching.stats import STAT_NAMES, GradientStats

SHAPES = [(3, 4), (5,), (2, 2, 2)]  # a tiny "model" of three parameter tensors


def naive_stats(rows: np.ndarray, shapes=SHAPES) -> GradientStats:
    """Every statistic of DESIGN.md straight from its definition, per-sample rows g_1..g_b."""
    b, d = rows.shape
    assert d == sum(int(np.prod(s)) for s in shapes)
    gbar = rows.mean(axis=0)
    G = float(gbar @ gbar)
    V = sum(float((g - gbar) @ (g - gbar)) for g in rows) / (b - 1)
    v = sum((g - gbar) ** 2 for g in rows) / (b - 1)
    ips = rows @ gbar
    W = float(sum((ip - G) ** 2 for ip in ips) / (b - 1))
    O = 0.0
    for g, ip in zip(rows, ips):
        r = g - (ip / G) * gbar
        O += float(r @ r)
    O /= b - 1

    def split(flat):
        out, i = [], 0
        for s in shapes:
            n = int(np.prod(s))
            out.append(torch.from_numpy(flat[i:i + n].reshape(s).copy()))
            i += n
        return out

    return GradientStats(b, grad_sq_norm=G, variance_trace=V, coord_variance=split(v),
                         ip_variance=W, orth_variance=O, mean_grad=split(gbar))


def random_rows(seed: int, b: int, mean_scale: float = 1.0, noise: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    d = sum(int(np.prod(s)) for s in SHAPES)
    return mean_scale * rng.normal(size=d) + noise * rng.normal(size=(b, d))


def ceil_tol(x: float) -> int:
    n = round(x)
    return max(1, n if abs(x - n) <= 1e-12 * x else math.ceil(x))


# --------------------------------------------------------------------------------------------
# formulas against a direct computation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("b", [2, 7, 32])
def test_formulas_match_direct_computation(seed, b):
    rows = random_rows(seed, b, mean_scale=0.5)
    s = naive_stats(rows)
    gbar = rows.mean(axis=0)
    G = float(gbar @ gbar)
    # the one-pass form of V from DESIGN.md agrees with the two-pass definition
    V_alt = (float((rows * rows).sum()) - b * G) / (b - 1)
    assert s.variance_trace == pytest.approx(V_alt, rel=1e-10)
    eta, theta, nu = 0.3, 0.7, 0.4
    assert T.norm_test(s, eta) == ceil_tol(s.variance_trace / (eta**2 * G))
    assert T.inner_product_test(s, theta) == ceil_tol(s.ip_variance / (theta**2 * G**2))
    assert T.orthogonality_test(s, nu) == ceil_tol(s.orth_variance / (nu**2 * G))
    assert T.augmented_inner_product_test(s, theta, nu) == max(
        T.inner_product_test(s, theta), T.orthogonality_test(s, nu))
    v = np.concatenate([t.reshape(-1).numpy() for t in s.coord_variance])
    per_coord = [math.ceil(vj / (eta**2 * gj**2)) for vj, gj in zip(v, gbar)]
    assert T.coordinate_norm_test(s, eta) == max(per_coord)
    # the classes agree with the functions
    assert T.NormTest(eta)(s) == T.norm_test(s, eta)
    assert T.InnerProductTest(theta)(s) == T.inner_product_test(s, theta)
    assert T.OrthogonalityTest(nu)(s) == T.orthogonality_test(s, nu)
    assert T.AugmentedInnerProductTest(theta, nu)(s) == T.augmented_inner_product_test(
        s, theta, nu)
    assert T.CoordinateNormTest(eta)(s) == T.coordinate_norm_test(s, eta)


def test_torch_rows_and_float32_statistics():
    """Statistics in float32 tensors (as an estimator may produce) give the same decision."""
    torch.manual_seed(0)
    rows = torch.randn(16, 25, dtype=torch.float64) + 0.3
    s64 = naive_stats(rows.numpy())
    s32 = GradientStats(
        16, grad_sq_norm=s64.grad_sq_norm, variance_trace=s64.variance_trace,
        coord_variance=[t.float() for t in s64.coord_variance],
        mean_grad=[t.float() for t in s64.mean_grad])
    # torch's own unbiased variance is the same per-coordinate variance
    v_torch = rows.var(dim=0, correction=1)
    v_ours = torch.cat([t.reshape(-1) for t in s64.coord_variance])
    torch.testing.assert_close(v_ours, v_torch)
    r64 = T.CoordinateNormTest(0.5).ratio(s64)
    r32 = T.CoordinateNormTest(0.5).ratio(s32)
    assert r32 == pytest.approx(r64, rel=1e-5)


# --------------------------------------------------------------------------------------------
# a batch passes (required <= b) iff the inequality of DESIGN.md's table holds
# --------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), b=st.integers(2, 40),
       mean_scale=st.floats(0.05, 3.0), param=st.floats(0.05, 2.0))
def test_pass_iff_inequality(seed, b, mean_scale, param):
    s = naive_stats(random_rows(seed, b, mean_scale=mean_scale))
    G, V, W, O = s.grad_sq_norm, s.variance_trace, s.ip_variance, s.orth_variance
    v = np.concatenate([t.reshape(-1).numpy() for t in s.coord_variance])
    g = np.concatenate([t.reshape(-1).numpy() for t in s.mean_grad])
    cases = [
        (T.NormTest(param), V / b <= param**2 * G),
        (T.InnerProductTest(param), W / b <= param**2 * G**2),
        (T.OrthogonalityTest(param), O / b <= param**2 * G),
        (T.AugmentedInnerProductTest(param, 2 * param),
         W / b <= param**2 * G**2 and O / b <= (2 * param) ** 2 * G),
        (T.CoordinateNormTest(param), bool(np.all(v / b <= param**2 * g**2))),
    ]
    for test, holds in cases:
        required = test(s)
        assert (required <= b) == holds, (test, required, b)
        assert test.passes(s) == holds
        # statistic <= 1 iff passes (no case sits within the 1e-12 rounding tolerance here)
        assert (test.statistic(s) <= 1.0) == holds


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), b=st.integers(2, 30))
def test_required_batch_is_the_smallest_passing_one(seed, b):
    """With the batch size set to the required value the inequality holds, and one less fails."""
    s = naive_stats(random_rows(seed, b, mean_scale=0.4))
    eta = 0.5
    required = T.norm_test(s, eta)
    ratio = s.variance_trace / (eta**2 * s.grad_sq_norm)
    assert s.variance_trace / required <= eta**2 * s.grad_sq_norm * (1 + 1e-12)
    if required > 1:
        assert s.variance_trace / (required - 1) > eta**2 * s.grad_sq_norm
    assert required == max(1, math.ceil(ratio)) or abs(ratio - round(ratio)) < 1e-12 * ratio


# --------------------------------------------------------------------------------------------
# monotonicity
# --------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(V=st.floats(0, 1e6), G=st.floats(1e-6, 1e6), eta=st.floats(0.01, 10),
       scale=st.floats(1.0, 100.0))
def test_norm_test_monotone(V, G, eta, scale):
    s = GradientStats(8, grad_sq_norm=G, variance_trace=V)
    r = T.norm_test(s, eta)
    assert r >= 1
    assert T.norm_test(GradientStats(8, grad_sq_norm=G, variance_trace=V * scale), eta) >= r
    assert T.norm_test(GradientStats(8, grad_sq_norm=G * scale, variance_trace=V), eta) <= r
    assert T.norm_test(s, eta * scale) <= r


@settings(max_examples=60, deadline=None)
@given(W=st.floats(0, 1e6), O=st.floats(0, 1e6), G=st.floats(1e-3, 1e3),
       theta=st.floats(0.01, 10), nu=st.floats(0.01, 10), scale=st.floats(1.0, 100.0))
def test_inner_product_tests_monotone(W, O, G, theta, nu, scale):
    s = GradientStats(8, grad_sq_norm=G, ip_variance=W, orth_variance=O)
    ip = T.inner_product_test(s, theta)
    aip = T.augmented_inner_product_test(s, theta, nu)
    assert aip >= ip >= 1
    assert aip >= T.orthogonality_test(s, nu)
    assert T.inner_product_test(s, theta * scale) <= ip
    assert T.augmented_inner_product_test(s, theta * scale, nu * scale) <= aip
    bigger = GradientStats(8, grad_sq_norm=G, ip_variance=W * scale, orth_variance=O * scale)
    assert T.augmented_inner_product_test(bigger, theta, nu) >= aip


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), eta=st.floats(0.05, 5), scale=st.floats(1.0, 50.0),
       q=st.floats(0.01, 1.0))
def test_coordinate_test_monotone_and_reductions_ordered(seed, eta, scale, q):
    s = naive_stats(random_rows(seed, 6, mean_scale=0.5))
    r_max = T.coordinate_norm_test(s, eta)
    assert T.coordinate_norm_test(s, eta * scale) <= r_max
    louder = GradientStats(6, coord_variance=[t * scale for t in s.coord_variance],
                           mean_grad=s.mean_grad)
    assert T.coordinate_norm_test(louder, eta) >= r_max
    r_q = T.coordinate_norm_test(s, eta, reduce="quantile", q=q)
    assert 1 <= r_q <= r_max
    assert T.coordinate_norm_test(s, eta, reduce=("quantile", q)) == r_q
    assert T.coordinate_norm_test(s, eta, reduce="mean") <= r_max
    # every coordinate, the norm test is bounded by the coordinate-wise one: V/G <= max v_j/g_j²
    assert T.norm_test(s, eta) <= r_max


# --------------------------------------------------------------------------------------------
# robust reductions (beyond the paper)
# --------------------------------------------------------------------------------------------


def _coord_stats(v, g):
    return GradientStats(len(v), coord_variance=[torch.tensor(v, dtype=torch.float64)],
                         mean_grad=[torch.tensor(g, dtype=torch.float64)])


def test_quantile_reduction_meaning():
    # ratios v/(η²g²) with eta = 1: 1, 2, 3, ..., 10
    v = [float(i) for i in range(1, 11)]
    s = _coord_stats(v, [1.0] * 10)
    assert T.coordinate_norm_test(s, 1.0) == 10
    assert T.coordinate_norm_test(s, 1.0, reduce="quantile", q=1.0) == 10
    # at least 90 % of the coordinates pass at b = 9, and 9 is the smallest such b
    assert T.coordinate_norm_test(s, 1.0, reduce="quantile", q=0.9) == 9
    assert T.coordinate_norm_test(s, 1.0, reduce="quantile", q=0.5) == 5
    assert T.coordinate_norm_test(s, 1.0, reduce="quantile", q=0.01) == 1
    assert T.coordinate_norm_test(s, 1.0, reduce="mean") == math.ceil(5.5)
    # one hopeless coordinate: max and mean are inf, the quantile ignores it
    s_inf = _coord_stats([*v, 1.0], [1.0] * 10 + [0.0])
    assert T.coordinate_norm_test(s_inf, 1.0) == math.inf
    assert T.coordinate_norm_test(s_inf, 1.0, reduce="mean") == math.inf
    assert T.coordinate_norm_test(s_inf, 1.0, reduce=("quantile", 0.9)) == 10


# --------------------------------------------------------------------------------------------
# edge cases
# --------------------------------------------------------------------------------------------


def test_zero_gradient_is_undecidable():
    s = GradientStats(4, grad_sq_norm=0.0, variance_trace=1.0, ip_variance=1.0,
                      orth_variance=1.0)
    assert T.norm_test(s, 0.1) is None
    assert T.inner_product_test(s, 0.1) is None
    assert T.orthogonality_test(s, 0.1) is None
    assert T.augmented_inner_product_test(s, 0.1, 0.1) is None
    assert T.NormTest(0.1).statistic(s) is None
    assert T.NormTest(0.1).passes(s) is None
    zero = _coord_stats([0.0, 0.0], [0.0, 0.0])
    assert T.coordinate_norm_test(zero, 0.1) is None


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_statistics_are_undecidable(bad):
    for field in ("grad_sq_norm", "variance_trace"):
        kwargs = {"grad_sq_norm": 1.0, "variance_trace": 1.0, field: bad}
        assert T.norm_test(GradientStats(4, **kwargs), 0.5) is None
    for field in ("grad_sq_norm", "ip_variance", "orth_variance"):
        kwargs = {"grad_sq_norm": 1.0, "ip_variance": 1.0, "orth_variance": 1.0, field: bad}
        assert T.augmented_inner_product_test(GradientStats(4, **kwargs), 0.5, 0.5) is None
    assert T.coordinate_norm_test(_coord_stats([1.0, bad], [1.0, 1.0]), 0.5) is None
    assert T.coordinate_norm_test(_coord_stats([1.0, 1.0], [bad, 1.0]), 0.5) is None


def test_coordinate_rules():
    # v = 0 and g = 0: ignored; the other coordinate decides (ratio 2/(0.25·1) = 8)
    assert T.coordinate_norm_test(_coord_stats([0.0, 2.0], [0.0, 1.0]), 0.5) == 8
    # g = 0 with v > 0: unbounded
    assert T.coordinate_norm_test(_coord_stats([1e-30, 2.0], [0.0, 1.0]), 0.5) == math.inf
    # v = 0 with g != 0: the coordinate passes at any b
    assert T.coordinate_norm_test(_coord_stats([0.0, 0.0], [3.0, 1.0]), 0.5) == 1
    # ḡ_j² underflowing float64 with v > 0 is also unbounded, not an error
    assert T.coordinate_norm_test(_coord_stats([1.0], [1e-200]), 0.5) == math.inf


def test_zero_variance_needs_one_sample_and_negative_rounding_noise_is_zero():
    assert T.norm_test(GradientStats(4, grad_sq_norm=2.0, variance_trace=0.0), 0.1) == 1
    assert T.norm_test(GradientStats(4, grad_sq_norm=2.0, variance_trace=-1e-17), 0.1) == 1
    assert T.inner_product_test(GradientStats(4, grad_sq_norm=2.0, ip_variance=-1e-17), 1) == 1


def test_tiny_positive_gradient_overflows_to_inf():
    s = GradientStats(4, grad_sq_norm=1e-320, variance_trace=1.0)
    assert T.norm_test(s, 1e-5) == math.inf  # η²G underflows to 0
    assert T.norm_test(GradientStats(4, grad_sq_norm=1e-300, variance_trace=1e300), 0.1) == (
        math.inf)


def test_rounding_tolerance():
    # 0.1 + 0.2 = 0.30000000000000004; ×10 ratio is 3.0000000000000004, mathematically 3
    s = GradientStats(4, grad_sq_norm=1.0, variance_trace=(0.1 + 0.2) * 10 / 100)
    assert (0.1 + 0.2) * 10 > 3
    assert T.norm_test(s, 0.1) == 3
    # a ratio visibly above an integer still rounds up
    s = GradientStats(4, grad_sq_norm=1.0, variance_trace=3.000001)
    assert T.norm_test(s, 1.0) == 4
    assert T.ROUNDING_RTOL == 1e-12
    assert T.ceil_batch(3.0 * (1 + 1e-13)) == 3
    assert T.ceil_batch(3.0 * (1 - 1e-13)) == 3
    assert T.ceil_batch(3.0 * (1 + 1e-10)) == 4
    # large ratios are not lowered by the tolerance: 1e9 stays 1e9, 1e9 + 0.5 goes up
    assert T.ceil_batch(1e9) == 10**9
    assert T.ceil_batch(1e9 + 0.5) == 10**9 + 1
    assert T.ceil_batch(2.5) == 3 and T.ceil_batch(0.2) == 1
    assert T.ceil_batch(0.0) == 1
    assert T.ceil_batch(None) is None
    assert T.ceil_batch(math.nan) is None
    assert T.ceil_batch(math.inf) == math.inf


def test_returns_python_int():
    r = T.norm_test(GradientStats(4, grad_sq_norm=1.0, variance_trace=10.0), 0.5)
    assert type(r) is int and r == 40
    r = T.coordinate_norm_test(_coord_stats([2.0], [1.0]), 0.5)
    assert type(r) is int and r == 8


def test_tensor_scalars_are_accepted():
    s = GradientStats(4, grad_sq_norm=torch.tensor(1.0), variance_trace=torch.tensor(10.0))
    assert T.norm_test(s, 0.5) == 40


# --------------------------------------------------------------------------------------------
# validation, needs, config
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_hyperparameter_validation(bad):
    with pytest.raises(ValueError, match=r"Invalid eta: .* \(must be (finite|> 0\.0)\)"):
        T.NormTest(bad)
    with pytest.raises(ValueError, match=r"Invalid theta: "):
        T.InnerProductTest(bad)
    with pytest.raises(ValueError, match=r"Invalid nu: "):
        T.AugmentedInnerProductTest(0.5, bad)
    with pytest.raises(ValueError, match=r"Invalid nu: "):
        T.OrthogonalityTest(bad)
    with pytest.raises(ValueError, match=r"Invalid eta: "):
        T.CoordinateNormTest(bad)
    with pytest.raises(ValueError, match=r"Invalid eta: "):
        T.norm_test(GradientStats(4, grad_sq_norm=1.0, variance_trace=1.0), bad)
    with pytest.raises(TypeError, match=r"Invalid eta: '0.1' \(must be a real number\)"):
        T.NormTest("0.1")


def test_reduce_validation():
    with pytest.raises(ValueError, match=r"Invalid reduce: 'median' \(choose from"):
        T.CoordinateNormTest(0.1, reduce="median")
    with pytest.raises(ValueError, match=r"reduce='quantile' needs q"):
        T.CoordinateNormTest(0.1, reduce="quantile")
    with pytest.raises(ValueError, match=r"Invalid q: 1.5 \(must be in \(0, 1\]\)"):
        T.CoordinateNormTest(0.1, reduce="quantile", q=1.5)
    with pytest.raises(ValueError, match=r"Invalid q: 0"):
        T.CoordinateNormTest(0.1, reduce=("quantile", 0))
    with pytest.raises(ValueError, match=r"q is only used with reduce='quantile'"):
        T.CoordinateNormTest(0.1, q=0.5)
    with pytest.raises(ValueError, match=r"not both"):
        T.CoordinateNormTest(0.1, reduce=("quantile", 0.5), q=0.5)
    with pytest.raises(ValueError, match=r"a tuple must be \('quantile', q\)"):
        T.CoordinateNormTest(0.1, reduce=("max", 0.5))


def test_missing_statistic_is_an_error_with_advice():
    with pytest.raises(ValueError, match=r"norm_test needs the statistic 'variance_trace'.*"
                                         r"needs=test.needs"):
        T.norm_test(GradientStats(4, grad_sq_norm=1.0), 0.1)
    with pytest.raises(ValueError, match=r"augmented_inner_product_test needs the statistic "
                                         r"'orth_variance'"):
        T.AugmentedInnerProductTest(0.1, 0.1)(GradientStats(4, grad_sq_norm=1.0,
                                                            ip_variance=1.0))
    with pytest.raises(ValueError, match=r"coordinate_norm_test needs the statistic 'mean_grad'"):
        T.coordinate_norm_test(GradientStats(4, coord_variance=[torch.ones(2)]), 0.1)


def test_misaligned_coordinate_statistics():
    with pytest.raises(ValueError, match=r"coord_variance has 2 tensors but mean_grad has 1"):
        T.coordinate_norm_test(GradientStats(4, coord_variance=[torch.ones(2)] * 2,
                                             mean_grad=[torch.ones(2)]), 0.1)
    with pytest.raises(ValueError, match=r"coord_variance\[0\] has shape \(2,\) but "
                                         r"mean_grad\[0\] has shape \(3,\)"):
        T.coordinate_norm_test(GradientStats(4, coord_variance=[torch.ones(2)],
                                             mean_grad=[torch.ones(3)]), 0.1)


def test_needs_are_exactly_what_the_test_reads():
    expected = {
        T.NormTest(0.1): {"grad_sq_norm", "variance_trace"},
        T.InnerProductTest(0.1): {"grad_sq_norm", "ip_variance"},
        T.AugmentedInnerProductTest(0.1, 0.1): {"grad_sq_norm", "ip_variance", "orth_variance"},
        T.OrthogonalityTest(0.1): {"grad_sq_norm", "orth_variance"},
        T.CoordinateNormTest(0.1): {"coord_variance", "mean_grad"},
    }
    full = naive_stats(random_rows(0, 8, mean_scale=0.5))
    for test, needs in expected.items():
        assert test.needs == frozenset(needs) and needs <= STAT_NAMES
        # with only the declared statistics the test gives the same answer as with all of them
        kwargs = {name: getattr(full, name) for name in needs}
        assert test(GradientStats(8, **kwargs)) == test(full)
        # and each declared statistic is really needed
        for name in needs:
            partial = dict(kwargs, **{name: None})
            with pytest.raises(ValueError, match="needs the statistic"):
                test(GradientStats(8, **partial))


def test_config_round_trip_and_names():
    tests = [T.NormTest(0.1), T.InnerProductTest(0.2), T.OrthogonalityTest(0.3),
             T.AugmentedInnerProductTest(0.2, 0.3), T.CoordinateNormTest(0.1),
             T.CoordinateNormTest(0.1, reduce="quantile", q=0.9),
             T.CoordinateNormTest(0.1, reduce="mean")]
    names = set()
    s = naive_stats(random_rows(3, 8, mean_scale=0.5))
    for test in tests:
        rebuilt = T.BatchTest.from_config(test.config())
        assert type(rebuilt) is type(test) and rebuilt == test
        assert rebuilt(s) == test(s)
        assert test.state_dict() == test.config()
        assert test.config()["name"] == test.name
        names.add(test.name)
        assert type(test).__name__ in repr(test)
    assert names == {"norm", "inner_product", "orthogonality", "augmented_inner_product",
                     "coordinate"}
    with pytest.raises(ValueError, match=r"Unknown batch test 'nope'"):
        T.BatchTest.from_config({"name": "nope"})


def test_statistic_is_ratio_over_batch():
    s = GradientStats(10, grad_sq_norm=2.0, variance_trace=5.0)
    assert T.NormTest(0.5).statistic(s) == pytest.approx(5.0 / (10 * 0.25 * 2.0))
    assert T.NormTest(0.5)(s) == 10  # ratio 10: exactly passes at b = 10
    assert T.NormTest(0.5).passes(s) is True


def test_exports():
    import adabatch.batching as B

    for name in ("norm_test", "inner_product_test", "augmented_inner_product_test",
                 "orthogonality_test", "coordinate_norm_test", "BatchTest", "NormTest",
                 "InnerProductTest", "AugmentedInnerProductTest", "OrthogonalityTest",
                 "CoordinateNormTest"):
        assert getattr(B, name) is getattr(T, name)


def test_partial_sum_read_back_keeps_order_and_values():
    from adabatch.batching.stats import finish_stats, read_f64, stack_f64

    gen = torch.Generator().manual_seed(0)
    f32 = [torch.rand((), generator=gen) for _ in range(4)]
    f64 = [torch.rand((), generator=gen, dtype=torch.float64) for _ in range(3)]
    parts = [f32[0], f32[1], f64[0], f32[2], f64[1], f64[2], f32[3]]  # runs of both dtypes
    want = [float(t) for t in parts]  # float32 -> float64 is exact
    stacked = stack_f64(parts)
    assert stacked.dtype == torch.float64 and stacked.tolist() == want
    assert stack_f64(f32).tolist() == [float(t) for t in f32]  # a single run
    assert read_f64(parts) == want

    # in place: the coordinate sums become the variances, the same values as the copy
    sums = [torch.rand(3, 2, generator=gen), torch.rand(5, generator=gen)]
    mean = [torch.rand(3, 2, generator=gen) * 0.1, torch.rand(5, generator=gen) * 0.1]
    needs = frozenset({"coord_variance"})
    copy = finish_stats(needs, 8.0, 8.0, 0.0, 0.0, 0.0, 1.0, sums, mean, coord_scale=64.0)
    kept = [s.clone() for s in sums]
    assert all(torch.equal(a, b) for a, b in zip(sums, kept))  # not modified by default
    inplace = finish_stats(needs, 8.0, 8.0, 0.0, 0.0, 0.0, 1.0, sums, mean, coord_scale=64.0,
                           in_place=True)
    for a, b, s in zip(copy.coord_variance, inplace.coord_variance, sums):
        assert torch.equal(a, b)
        assert b.data_ptr() == s.data_ptr()  # the sums' own storage
    ref = [((64.0 * k - 8.0 * m * m) / 7.0).clamp_min(0) for k, m in zip(kept, mean)]
    for a, r in zip(copy.coord_variance, ref):
        torch.testing.assert_close(a, r)
