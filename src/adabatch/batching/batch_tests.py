r"""Adaptive batch-size tests: pure functions from :class:`GradientStats` to a batch size.

Each test answers one question about the current step's batch of ``b`` samples: *how large
must the batch be for the mini-batch gradient ḡ to be a good enough estimate of the true
gradient?* It returns that **required batch size** (the smallest integer that passes), so a
batch passes exactly when ``required <= b``. With the statistics of
:mod:`adabatch.batching.stats` (every variance on the scale of one sample's gradient):

==========================  ====================================  ==============================
test                        passes when                           required batch size
==========================  ====================================  ==============================
norm (η)                    V/b ≤ η²·G                            ⌈V/(η²G)⌉
inner product (θ)           W/b ≤ θ²·G²                           ⌈W/(θ²G²)⌉
orthogonality (ν)           O/b ≤ ν²·G                            ⌈O/(ν²G)⌉
augmented inner product     inner product and orthogonality       max(⌈W/(θ²G²)⌉, ⌈O/(ν²G)⌉)
coordinate-wise norm (η)    v_j/b ≤ η²·ḡ_j² for every coord. j    max_j ⌈v_j/(η²ḡ_j²)⌉
==========================  ====================================  ==============================

The norm test is Byrd et al. (2012), the inner-product, orthogonality and augmented
inner-product tests are Bollapragada et al. (2018), and the coordinate-wise norm test is the
one introduced for AdaGrad by Lau, Liu & Kolar, "AdAdaGrad: Adaptive Batch Size Schemes for
Adaptive Gradient Methods" (arXiv 2402.11215). AdAdaGradNorm = AdaGrad-Norm + norm test;
AdAdaGrad = AdaGrad + coordinate-wise norm test.

**Return values.** An ``int >= 1`` (a batch of one sample always suffices when the variance
is zero), ``math.inf`` when no finite batch passes (the controller then jumps to its maximum),
or ``None`` when the statistics cannot decide: G ≤ 0 (a zero mean gradient: every ratio is
0/0 or x/0), or a NaN / infinite statistic. ``None`` never raises in a training loop: the
controller keeps the batch size and counts a warning. A statistic the test needs but that is
``None`` (the estimator was not asked for it) is a programming error and raises
:class:`ValueError`: create the estimator with ``needs=test.needs``.

**Rounding.** The required batch size is the real ratio ``r`` (for example r = V/(η²G))
rounded up, at least 1, except that a ratio within a relative 1e-12 of an integer n is
taken as n (:data:`ROUNDING_RTOL`, :func:`ceil_batch`). This absorbs floating-point noise
such as ``3.0000000000000004`` (mathematically 3) that a bare ``math.ceil`` would turn into 4.
The statistics are random estimates whose noise is many orders of magnitude larger, so the
tolerance changes no decision that matters: a batch passes when its inequality holds up to a
relative 1e-12. A ratio that overflows float64 is ``math.inf``.

**Variances below zero** (the estimator formula (Σ‖g_i‖² − bG)/(b−1) can round to a tiny
negative number when all gradients are equal) are treated as 0.

**Coordinate-wise test.** A coordinate with v_j = 0 and ḡ_j = 0 carries no information and is
ignored; ḡ_j = 0 with v_j > 0 asks for an unbounded batch (``math.inf``); when every
coordinate is ignored the test cannot decide (``None``). The paper's test is the maximum over
coordinates (``reduce="max"``, the default). *Beyond the paper* and clearly not its test, two
robust reductions are offered for models where a few coordinates with ḡ_j ≈ 0 would otherwise
send the batch straight to its maximum:

- ``reduce="quantile", q=0.99`` (or ``reduce=("quantile", 0.99)``): the smallest batch size at
  which at least a fraction q of the informative coordinates pass, i.e. the ⌈q·n⌉-th smallest
  per-coordinate ratio (q = 1 is the paper's maximum);
- ``reduce="mean"``: the mean of the per-coordinate ratios v_j/(η²ḡ_j²) (``math.inf`` as soon
  as one coordinate asks for an unbounded batch).

The ratios are computed in float64 whatever the dtype of the statistics.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from adabatch._validation import check_positive
from adabatch.batching.stats import GradientStats, reduce_over_shards, shard_groups

__all__ = [
    "AugmentedInnerProductTest",
    "BatchTest",
    "CoordinateNormTest",
    "InnerProductTest",
    "NormTest",
    "OrthogonalityTest",
    "augmented_inner_product_test",
    "coordinate_norm_test",
    "inner_product_test",
    "norm_test",
    "orthogonality_test",
]

#: Relative tolerance subtracted before rounding a ratio up (see the module docstring).
ROUNDING_RTOL: float = 1e-12

_REDUCTIONS = ("max", "quantile", "mean")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _scalar(stats: GradientStats, field: str, test: str) -> float:
    value = getattr(stats, field)
    if value is None:
        raise ValueError(
            f"{test} needs the statistic {field!r} but it is None; "
            f"create the estimator with needs=test.needs"
        )
    if isinstance(value, Tensor):
        value = value.item()
    return float(value)


def _undecidable(*values: float) -> bool:
    return not all(math.isfinite(v) for v in values)


def ceil_batch(ratio: float | None) -> int | float | None:
    """Round a real required batch size up to an integer >= 1 (see "Rounding" above).

    A ratio within a relative ``ROUNDING_RTOL`` of an integer n is taken as n; any other
    ratio is rounded up. ``None`` and NaN give ``None``; ``+inf`` gives ``math.inf``.
    """
    if ratio is None or math.isnan(ratio):
        return None
    if math.isinf(ratio):
        return math.inf if ratio > 0 else 1
    nearest = round(ratio)
    if abs(ratio - nearest) <= ROUNDING_RTOL * abs(ratio):
        return max(1, nearest)
    return max(1, math.ceil(ratio))


def _divide(num: float, den: float) -> float:
    """num / den for num >= 0 and den >= 0 that underflowed from a positive product.

    Float division overflows to +inf by itself; a denominator that underflowed to 0 gives
    +inf for num > 0 and 0 for num == 0 (the mathematical ratio is then 0).
    """
    if den == 0.0:
        return math.inf if num > 0.0 else 0.0
    return num / den


# ---------------------------------------------------------------------------------------------
# ratios: the real-valued required batch sizes, before rounding
# ---------------------------------------------------------------------------------------------


def _norm_ratio(stats: GradientStats, eta: float) -> float | None:
    G = _scalar(stats, "grad_sq_norm", "norm_test")
    V = _scalar(stats, "variance_trace", "norm_test")
    if _undecidable(G, V) or G <= 0.0:
        return None
    return _divide(max(V, 0.0), eta * eta * G)


def _ip_ratio(stats: GradientStats, theta: float, test: str = "inner_product_test") -> float | None:
    G = _scalar(stats, "grad_sq_norm", test)
    W = _scalar(stats, "ip_variance", test)
    if _undecidable(G, W) or G <= 0.0:
        return None
    return _divide(max(W, 0.0), theta * theta * G * G)


def _orth_ratio(stats: GradientStats, nu: float, test: str = "orthogonality_test") -> float | None:
    G = _scalar(stats, "grad_sq_norm", test)
    O = _scalar(stats, "orth_variance", test)
    if _undecidable(G, O) or G <= 0.0:
        return None
    return _divide(max(O, 0.0), nu * nu * G)


def _aip_ratio(stats: GradientStats, theta: float, nu: float) -> float | None:
    test = "augmented_inner_product_test"
    ip = _ip_ratio(stats, theta, test)
    orth = _orth_ratio(stats, nu, test)
    if ip is None or orth is None:
        return None
    return max(ip, orth)


def _parse_reduce(reduce: str | tuple[str, float], q: float | None) -> tuple[str, float | None]:
    if isinstance(reduce, tuple):
        if len(reduce) != 2 or reduce[0] != "quantile":
            raise ValueError(
                f"Invalid reduce: {reduce!r} (a tuple must be ('quantile', q))"
            )
        if q is not None:
            raise ValueError("Give q either in reduce=('quantile', q) or as q=, not both")
        reduce, q = reduce
    if reduce not in _REDUCTIONS:
        raise ValueError(f"Invalid reduce: {reduce!r} (choose from {list(_REDUCTIONS)})")
    if reduce == "quantile":
        if q is None:
            raise ValueError("reduce='quantile' needs q (a fraction in (0, 1])")
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not (0.0 < float(q) <= 1.0):
            raise ValueError(f"Invalid q: {q!r} (must be in (0, 1])")
        return reduce, float(q)
    if q is not None:
        raise ValueError(f"q is only used with reduce='quantile', not reduce={reduce!r}")
    return reduce, None


def _coord_ratios(stats: GradientStats, eta: float) -> list[Tensor] | None:
    """Per-tensor float64 ratios v_j/(η²ḡ_j²) of the informative coordinates (1-D each)."""
    test = "coordinate_norm_test"
    variances = stats.coord_variance
    means = stats.mean_grad
    if variances is None or means is None:
        field = "coord_variance" if variances is None else "mean_grad"
        raise ValueError(
            f"{test} needs the statistic {field!r} but it is None; "
            f"create the estimator with needs=test.needs"
        )
    if len(variances) != len(means):
        raise ValueError(
            f"{test}: coord_variance has {len(variances)} tensors but mean_grad has "
            f"{len(means)}; they must be aligned with the same parameter list"
        )
    eta2 = eta * eta
    ratios: list[Tensor] = []
    for i, (v, g) in enumerate(zip(variances, means)):
        if v.shape != g.shape:
            raise ValueError(
                f"{test}: coord_variance[{i}] has shape {tuple(v.shape)} but mean_grad[{i}] "
                f"has shape {tuple(g.shape)}"
            )
        v = v.detach().reshape(-1).to(torch.float64)
        g = g.detach().reshape(-1).to(torch.float64)
        if not (bool(torch.isfinite(v).all()) and bool(torch.isfinite(g).all())):
            return None
        v = v.clamp_min(0.0)
        den = eta2 * g * g
        informative = (v > 0) | (den > 0)
        # Coordinates with ḡ_j == 0 (or ḡ_j² underflowing) and v_j > 0 give +inf here.
        ratios.append(v[informative] / den[informative])
    return ratios


def _coord_ratio(stats: GradientStats, eta: float, reduce: str, q: float | None) -> float | None:
    groups = shard_groups(stats.coord_variance)
    if groups is not None:
        return _coord_ratio_sharded(stats, eta, reduce, groups)
    ratios = _coord_ratios(stats, eta)
    if ratios is None:
        return None
    n = sum(r.numel() for r in ratios)
    if n == 0:
        return None
    if reduce == "max":
        return max(float(r.max()) for r in ratios if r.numel() > 0)
    flat = torch.cat(ratios)
    if reduce == "mean":
        return float(flat.mean())
    assert q is not None  # invariant: _parse_reduce gives "quantile" a q in (0, 1]
    k = ceil_batch(q * n)
    assert isinstance(k, int)  # invariant: q * n is finite and > 0
    return float(torch.kthvalue(flat, min(k, n)).values)


def _coord_ratio_sharded(stats: GradientStats, eta: float, reduce: str,
                         groups: list[Any]) -> float | None:
    """The ratio of FSDP2-sharded statistics (DTensors): each rank's shard, reduced over the
    ranks without gathering v_j (:func:`~adabatch.batching.stats.reduce_over_shards`)."""
    if reduce == "quantile":
        raise ValueError("coordinate_norm_test: reduce='quantile' is not available on "
                         "statistics sharded by FSDP2 (it would gather every v_j); use "
                         "reduce='max' or 'mean'")
    mean_grad = stats.mean_grad
    local = replace(stats, coord_variance=[v.to_local() for v in stats.coord_variance or []],
                    mean_grad=None if mean_grad is None else [g.to_local() for g in mean_grad])
    device = local.coord_variance[0].device if local.coord_variance else "cpu"
    return reduce_over_shards(_coord_ratios(local, eta), groups, reduce, device)


# ---------------------------------------------------------------------------------------------
# the functional tests
# ---------------------------------------------------------------------------------------------


def norm_test(stats: GradientStats, eta: float) -> int | float | None:
    """Norm test (Byrd et al. 2012): required batch size ⌈V/(η²G)⌉.

    Passes for a batch of b samples when V/b ≤ η²·G. Returns an int >= 1, ``math.inf`` or
    ``None`` (G ≤ 0 or a non-finite statistic); see the module docstring.
    """
    eta = check_positive("eta", eta)
    return ceil_batch(_norm_ratio(stats, eta))


def inner_product_test(stats: GradientStats, theta: float) -> int | float | None:
    """Inner-product test (Bollapragada et al. 2018): required batch size ⌈W/(θ²G²)⌉.

    Passes for a batch of b samples when W/b ≤ θ²·G².
    """
    theta = check_positive("theta", theta)
    return ceil_batch(_ip_ratio(stats, theta))


def orthogonality_test(stats: GradientStats, nu: float) -> int | float | None:
    """Orthogonality test alone (Bollapragada et al. 2018): required batch size ⌈O/(ν²G)⌉.

    Passes for a batch of b samples when O/b ≤ ν²·G.
    """
    nu = check_positive("nu", nu)
    return ceil_batch(_orth_ratio(stats, nu))


def augmented_inner_product_test(
    stats: GradientStats, theta: float, nu: float
) -> int | float | None:
    """Augmented inner-product test (Bollapragada et al. 2018).

    Required batch size max(⌈W/(θ²G²)⌉, ⌈O/(ν²G)⌉): passes when both the inner-product
    condition W/b ≤ θ²·G² and the orthogonality condition O/b ≤ ν²·G hold.
    """
    theta = check_positive("theta", theta)
    nu = check_positive("nu", nu)
    return ceil_batch(_aip_ratio(stats, theta, nu))


def coordinate_norm_test(
    stats: GradientStats,
    eta: float,
    reduce: str | tuple[str, float] = "max",
    q: float | None = None,
) -> int | float | None:
    """Coordinate-wise norm test (Lau, Liu & Kolar, AdAdaGrad): max_j ⌈v_j/(η²ḡ_j²)⌉.

    Passes for a batch of b samples when v_j/b ≤ η²·ḡ_j² for every coordinate j. Coordinates
    with v_j = 0 and ḡ_j = 0 are ignored; ḡ_j = 0 with v_j > 0 gives ``math.inf``.

    ``reduce="max"`` (default) is the paper's test. ``reduce="quantile"`` with ``q`` (or
    ``reduce=("quantile", q)``) and ``reduce="mean"`` are robust variants *beyond the paper*
    (see the module docstring).
    """
    eta = check_positive("eta", eta)
    reduce, q = _parse_reduce(reduce, q)
    return ceil_batch(_coord_ratio(stats, eta, reduce, q))


# ---------------------------------------------------------------------------------------------
# classes carrying the hyperparameters
# ---------------------------------------------------------------------------------------------


class BatchTest:
    """Base class: a test with its hyperparameters.

    Subclasses set ``name`` (a short identifier), ``needs`` (the statistics an estimator must
    measure) and implement :meth:`ratio` (the real-valued required batch size before rounding,
    or ``None`` when undecidable).

    - ``test(stats)`` -> required batch size (int >= 1, ``math.inf`` or ``None``);
    - ``test.statistic(stats)`` -> ratio / b, a number for logging: ≤ 1 means the batch passes
      (up to the rounding tolerance);
    - ``test.passes(stats)`` -> ``required <= stats.batch_size`` (``None`` when undecidable);
    - ``test.config()`` -> ``{"name": ..., hyperparameters...}``, and
      :meth:`BatchTest.from_config` to rebuild a test from it (checkpoints, CLI).
    """

    name: str = "base"
    needs: frozenset[str] = frozenset()

    def ratio(self, stats: GradientStats) -> float | None:
        raise NotImplementedError

    def __call__(self, stats: GradientStats) -> int | float | None:
        return ceil_batch(self.ratio(stats))

    def statistic(self, stats: GradientStats) -> float | None:
        """The test's ratio divided by the batch size b: ≤ 1 means the batch passes."""
        r = self.ratio(stats)
        if r is None:
            return None
        return r / stats.batch_size

    def passes(self, stats: GradientStats) -> bool | None:
        required = self(stats)
        if required is None:
            return None
        return required <= stats.batch_size

    def config(self) -> dict[str, Any]:
        return {"name": self.name}

    def state_dict(self) -> dict[str, Any]:
        """Alias of :meth:`config`: a test has no state besides its hyperparameters."""
        return self.config()

    @staticmethod
    def from_config(config: dict[str, Any]) -> BatchTest:
        """Rebuild a test from :meth:`config`'s output."""
        config = dict(config)
        name = config.pop("name", None)
        cls = _TESTS.get(name)  # type: ignore[arg-type]
        if cls is None:
            raise ValueError(f"Unknown batch test {name!r} (choose from {sorted(_TESTS)})")
        return cls(**config)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({params})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BatchTest) and self.config() == other.config()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.config().items())))


class NormTest(BatchTest):
    """Norm test: V/b ≤ η²·G; required batch size ⌈V/(η²G)⌉ (see :func:`norm_test`)."""

    name = "norm"
    needs = frozenset({"grad_sq_norm", "variance_trace"})

    def __init__(self, eta: float) -> None:
        self.eta = check_positive("eta", eta)

    def ratio(self, stats: GradientStats) -> float | None:
        return _norm_ratio(stats, self.eta)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "eta": self.eta}


class InnerProductTest(BatchTest):
    """Inner-product test: W/b ≤ θ²·G²; required ⌈W/(θ²G²)⌉ (see :func:`inner_product_test`)."""

    name = "inner_product"
    needs = frozenset({"grad_sq_norm", "ip_variance"})

    def __init__(self, theta: float) -> None:
        self.theta = check_positive("theta", theta)

    def ratio(self, stats: GradientStats) -> float | None:
        return _ip_ratio(stats, self.theta)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "theta": self.theta}


class OrthogonalityTest(BatchTest):
    """Orthogonality test alone: O/b ≤ ν²·G; required ⌈O/(ν²G)⌉."""

    name = "orthogonality"
    needs = frozenset({"grad_sq_norm", "orth_variance"})

    def __init__(self, nu: float) -> None:
        self.nu = check_positive("nu", nu)

    def ratio(self, stats: GradientStats) -> float | None:
        return _orth_ratio(stats, self.nu)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "nu": self.nu}


class AugmentedInnerProductTest(BatchTest):
    """Augmented inner-product test: max(⌈W/(θ²G²)⌉, ⌈O/(ν²G)⌉)."""

    name = "augmented_inner_product"
    needs = frozenset({"grad_sq_norm", "ip_variance", "orth_variance"})

    def __init__(self, theta: float, nu: float) -> None:
        self.theta = check_positive("theta", theta)
        self.nu = check_positive("nu", nu)

    def ratio(self, stats: GradientStats) -> float | None:
        return _aip_ratio(stats, self.theta, self.nu)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "theta": self.theta, "nu": self.nu}


class CoordinateNormTest(BatchTest):
    """Coordinate-wise norm test of AdAdaGrad: max_j ⌈v_j/(η²ḡ_j²)⌉ with ``reduce="max"``.

    ``reduce="quantile"`` (with ``q``) and ``reduce="mean"`` are robust variants beyond the
    paper; see :func:`coordinate_norm_test` and the module docstring.
    """

    name = "coordinate"
    needs = frozenset({"coord_variance", "mean_grad"})

    def __init__(
        self, eta: float, reduce: str | tuple[str, float] = "max", q: float | None = None
    ) -> None:
        self.eta = check_positive("eta", eta)
        self.reduce, self.q = _parse_reduce(reduce, q)

    def ratio(self, stats: GradientStats) -> float | None:
        return _coord_ratio(stats, self.eta, self.reduce, self.q)

    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"name": self.name, "eta": self.eta, "reduce": self.reduce}
        if self.q is not None:
            config["q"] = self.q
        return config


_TESTS: dict[str, type[BatchTest]] = {
    cls.name: cls
    for cls in (NormTest, InnerProductTest, OrthogonalityTest, AugmentedInnerProductTest,
                CoordinateNormTest)
}
