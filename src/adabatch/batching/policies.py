r"""Batch-size policies beyond the AdAdaGrad paper: the critical batch size and goodput.

**Beyond the paper.** These policies are not in the AdAdaGrad paper (arXiv 2402.11215); they
read the same statistics as its norm test (G = ‖ḡ‖² and V, :mod:`adabatch.batching.stats`)
and follow the empirical model of large-batch training (McCandlish, Kaplan, Amodei et al.
2018, "An Empirical Model of Large-Batch Training", arXiv 1812.06162) and AdaScale (Johnson,
Agrawal, Gu, Guestrin 2020, arXiv 2007.05105). Each has the interface of
:class:`~adabatch.batching.controller.BatchSizeController` (``batch_size``, ``needs``,
``wants_stats()``, ``update(stats)``, ``lr_factor``, ``history``, ``warnings``,
``state_dict()``/``load_state_dict()``): it never shrinks the batch, clamps it to
``maximum`` and rounds it up to ``granularity``.

**The noise scale.** With per-sample variance V (trace of the covariance) and the batch mean
ḡ of b samples, E‖ḡ‖² = ‖∇F‖² + V/b, so Ĝ = G − V/b is an unbiased estimate of ‖∇F‖² and
B_noise = V/‖∇F‖² is the gradient noise scale. One step's Ĝ is noisy and may be negative, so
numerator and denominator are smoothed separately across test steps (McCandlish et al.,
App. A), with an exponential moving average of decay ``smoothing`` (0: no smoothing)::

    V̄ ← s·V̄ + (1 − s)·V,   Ḡ ← s·Ḡ + (1 − s)·Ĝ,   B̂_noise = V̄ / Ḡ

(the two averages carry the same weights, so their ratio needs no bias correction). When
Ḡ ≤ 0 or a statistic is not finite, the step cannot decide: the batch stays, ``warnings``
counts it and one :class:`RuntimeWarning` is emitted per policy (a non-finite step is not
added to the averages).

**Critical batch size** (:class:`CriticalBatchSize`). In the empirical model, reaching a loss
takes S steps and E samples with (S/S_min − 1)(E/E_min − 1) = 1 and E/S = b, i.e.
S = S_min(1 + B_noise/b), E = E_min(1 + b/B_noise): at b = B_noise both are twice their
minimum, the balanced point. The policy sets b = κ·B̂_noise (``kappa``, default 1). For
comparison, the norm test passes when V/b ≤ η²·E‖ḡ‖² = η²(‖∇F‖² + V/b), i.e. it settles at
b ≈ B_noise·(1 − η²)/η²: η = 0.5 runs at about 3·B_noise, where the model predicts 4·E_min
samples (and 4/3·S_min steps). Same cost as the norm test (it needs G and V only).

**Goodput** (:class:`Goodput`). The loop reports its step times (:meth:`Goodput.observe_time`,
one agreed value per step on every rank); the policy fits t(b) ≈ α + β·b and, with the
statistical efficiency of the empirical model (progress per step ∝ b/(B_noise + b)),
maximises progress per second b / ((B_noise + b)(α + β·b)): its derivative vanishes at
b* = √(α·B_noise/β). The fit is robust to noisy times: per batch size the median of the last
``window`` times, then the Theil–Sen line through those medians (median of the pairwise
slopes; α the median intercept). With one batch size seen (no slope yet) or β ≤ 0 (the step
time does not grow with b: the device is not saturated) the target is the critical batch
size κ·B̂_noise. Every move is at most a factor ``max_growth``, so a bad fit costs a bounded
step; since the batch can only grow, a target below the current size keeps it.

**Learning-rate coupling from the statistics** (``lr_scaling``; the schedule rules
``"linear"`` and ``"sqrt"`` of the controller are accepted as well). AdaScale's gain ratio
between the batch b and the initial b₀ is::

    r = E‖ḡ_{b₀}‖² / E‖ḡ_b‖² = (B_noise/b₀ + 1) / (B_noise/b + 1)  ∈ [1, b/b₀]

With lr φ·λ, one step at b matches r steps at b₀ and lr λ to first and second order in the
step when φ·(signal) = r·(signal) and φ²·E‖D⁻¹ḡ_b‖² = r·E‖D⁻¹ḡ_{b₀}‖² (D the optimizer's
preconditioner; for SGD D = I and both hold with φ = r, AdaScale). For an adaptive optimizer
D ∝ √A with A its accumulated squared gradients; A_b (this run) differs from A_ref (the run
at b₀ that took r steps for each of ours), so the preconditioned step matches when
φ = r·√(A_b / A_ref):

- ``"gain-sgd"``: φ = r (SGD, AdaScale).
- ``"gain-ema"`` (Adam, AdaBelief): A is an exponential average of ḡ² (of its variance for
  AdaBelief, which scales the same way in the noise-dominated regime), so
  A_b/A_ref = E‖ḡ_b‖²/E‖ḡ_{b₀}‖² = 1/r and φ = √r: the square-root rule where the noise
  dominates (r ≈ b/b₀), no change where the signal dominates (r ≈ 1).
- ``"gain-sum"`` (AdaGrad, AdaGrad-Norm): A is a running sum. The policy keeps the two sums
  from the smoothed estimates, A_b += Ḡ + V̄/b_k at every step and A_ref += r_k·(Ḡ + V̄/b₀),
  and sets φ = r·√(A_b/A_ref). Stated property (tested): φ = 1 while b = b₀; right after a
  growth, when the history dominates both sums, φ ≈ r (the accumulator has not yet adapted);
  as steps at the new size accumulate, A_b/A_ref → 1/r² and φ → 1 (AdaGrad's accumulator
  compensates by itself). The coordinate-wise AdaGrad is treated through the same traces.

Until the first estimate (or when it is undecidable) the factor keeps its last value.
"""

from __future__ import annotations

import math
import statistics
import warnings as _warnings
from typing import Any

from adabatch._validation import check_choice, check_int, check_real
from adabatch.batching.controller import _BatchPolicy, _round_up
from adabatch.batching.stats import GradientStats

__all__ = ["LR_GAINS", "CriticalBatchSize", "Goodput", "noise_scale", "raw_statistics"]

#: The learning-rate rules computed from the statistics (see the module docstring).
LR_GAINS = ("gain-sgd", "gain-ema", "gain-sum")
_LR_CHOICES = (None, "linear", "sqrt", *LR_GAINS)
_RAW = ("grad_sq_norm", "variance_trace", "ip_variance", "orth_variance")


def noise_scale(grad_sq_norm: float, variance_trace: float, batch_size: int) -> float | None:
    """One step's B_noise = V / (G − V/b); None when G − V/b ≤ 0 or a value is not finite."""
    est = grad_sq_norm - variance_trace / batch_size
    value = variance_trace / est if est > 0 else None
    return value if value is not None and math.isfinite(value) else None


def raw_statistics(stats: GradientStats | None) -> dict[str, float | None]:
    """The scalar statistics of a test step (those measured) and its one-step B_noise.

    Keys: ``grad_sq_norm``, ``variance_trace``, ``ip_variance``, ``orth_variance`` (when not
    None) and ``b_noise`` (when G and V were measured; None unless G − V/b > 0): the columns
    a loop logs so a reader sees why the batch moved.
    """
    if stats is None:
        return {}
    row: dict[str, float | None] = {
        k: float(getattr(stats, k)) for k in _RAW if getattr(stats, k) is not None}
    G, V = row.get("grad_sq_norm"), row.get("variance_trace")
    if G is not None and V is not None:
        row["b_noise"] = noise_scale(G, V, stats.batch_size)
    return row


def _finite_number(state: dict[str, Any], key: str) -> float:
    value = state.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"state_dict {key} must be a finite number, got {value!r}")
    return float(value)


class _NoisePolicy(_BatchPolicy):
    """Shared: the smoothed noise scale, the test interval, the gain-based lr factor."""

    needs = frozenset({"grad_sq_norm", "variance_trace"})

    def __init__(self, initial: int, maximum: int, *, kappa: float = 1.0,
                 smoothing: float = 0.9, interval: int = 1, granularity: int = 1,
                 lr_scaling: str | None = None) -> None:
        check_choice("lr_scaling", lr_scaling, _LR_CHOICES)
        self.kappa = check_real("kappa", kappa, minimum=0.0, strict=True)
        self.smoothing = check_real("smoothing", smoothing, minimum=0.0, maximum=1.0)
        if self.smoothing == 1.0:
            raise ValueError("Invalid smoothing: 1.0 (must be < 1: the averages would never "
                             "move)")
        self.interval = check_int("interval", interval)
        super().__init__(initial, maximum, granularity=granularity,
                         lr_scaling=lr_scaling if lr_scaling not in LR_GAINS else None)
        self.lr_scaling = lr_scaling
        self.ema_variance = 0.0  # V̄
        self.ema_grad_sq = 0.0   # Ḡ (of the unbiased Ĝ = G − V/b)
        self.ema_count = 0       # test steps in the averages
        self.acc_run = 0.0       # A_b of the "gain-sum" rule
        self.acc_ref = 0.0       # A_ref

    # -- the statistics ---------------------------------------------------------------------

    def wants_stats(self, step: int | None = None) -> bool:
        """True when the update after step ``step`` (default: the next) reads statistics."""
        step = self.step if step is None else step
        return self.batch_size < self.maximum and step % self.interval == 0

    def b_noise(self) -> float | None:
        """The smoothed B̂_noise = V̄/Ḡ; None before the first estimate or when Ḡ ≤ 0."""
        if self.ema_count == 0 or not self.ema_grad_sq > 0:
            return None
        value = self.ema_variance / self.ema_grad_sq
        return value if math.isfinite(value) else None

    def _observe(self, stats: GradientStats) -> dict[str, Any]:
        """Fold one test step into the averages; the raw columns of its history row."""
        raw = raw_statistics(stats)
        G, V = stats.grad_sq_norm, stats.variance_trace
        if G is None or V is None:
            raise ValueError(f"{type(self).__name__} needs grad_sq_norm and variance_trace; "
                             "create the estimator with needs=policy.needs")
        finite = math.isfinite(G) and math.isfinite(V)
        if finite:
            s = self.smoothing
            self.ema_variance = s * self.ema_variance + (1 - s) * V
            self.ema_grad_sq = s * self.ema_grad_sq + (1 - s) * (G - V / stats.batch_size)
            self.ema_count += 1
        raw.pop("b_noise", None)
        raw["b_noise_step"] = noise_scale(G, V, stats.batch_size)
        raw["b_noise"] = self.b_noise() if finite else None  # None: cannot decide
        return raw

    def _undecided(self, row: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        self.warnings += 1
        if not self._warned:
            self._warned = True
            _warnings.warn(
                f"{type(self).__name__}: no positive estimate of |grad F|^2 at step "
                f"{self.step} (smoothed |g|^2 - V/b <= 0, or non-finite statistics); the "
                f"batch size stays {self.batch_size}. Further cases are only counted in "
                f"policy.warnings.", RuntimeWarning, stacklevel=4)
        row.update(required=None, passed=None, statistic=None)
        return self.batch_size, row

    def _verdict(self, required: float, batch_size: int,
                 row: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        rounded = _round_up(required, self.granularity)
        new = self.maximum if math.isinf(rounded) else min(self.maximum, int(rounded))
        row.update(required=required, passed=required <= batch_size,
                   statistic=required / batch_size)
        return new, row

    # -- learning rate ----------------------------------------------------------------------

    def update(self, stats: GradientStats | None = None) -> int:
        result = super().update(stats)
        if self.lr_scaling in LR_GAINS:
            self._gain_lr()
        return result

    def gain(self, batch_size: int | None = None) -> float | None:
        """AdaScale's r = (B/b₀ + 1)/(B/b + 1) for ``batch_size`` (default: the current)."""
        b_noise = self.b_noise()
        if b_noise is None:
            return None
        b = self.batch_size if batch_size is None else batch_size
        return (b_noise / self.initial + 1.0) / (b_noise / b + 1.0)

    def _gain_lr(self) -> None:
        r = self.gain()
        if r is None:
            return
        if self.lr_scaling == "gain-sgd":
            self.lr_factor = r
        elif self.lr_scaling == "gain-ema":
            self.lr_factor = math.sqrt(r)
        else:  # gain-sum: the step just taken (at the batch size before update) adds to A
            b = self.history[-1]["batch_size"] if (
                self.history and self.history[-1]["step"] == self.step - 1) else self.batch_size
            G, V = self.ema_grad_sq, self.ema_variance
            self.acc_run += G + V / b
            self.acc_ref += self.gain(b) * (G + V / self.initial)  # type: ignore[operator]
            self.lr_factor = r * math.sqrt(self.acc_run / self.acc_ref)

    # -- state ------------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        config = super().config()
        config.update(kappa=self.kappa, smoothing=self.smoothing, interval=self.interval,
                      lr_scaling=self.lr_scaling)
        return config

    def _extra_state(self) -> dict[str, Any]:
        return {"ema_variance": self.ema_variance, "ema_grad_sq": self.ema_grad_sq,
                "ema_count": self.ema_count, "acc_run": self.acc_run, "acc_ref": self.acc_ref}

    def _check_extra_state(self, state: dict[str, Any]) -> None:
        for key in ("ema_variance", "ema_grad_sq", "acc_run", "acc_ref"):
            _finite_number(state, key)
        count = state.get("ema_count")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"state_dict ema_count must be an int >= 0, got {count!r}")

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.ema_variance = float(state["ema_variance"])
        self.ema_grad_sq = float(state["ema_grad_sq"])
        self.ema_count = state["ema_count"]
        self.acc_run = float(state["acc_run"])
        self.acc_ref = float(state["acc_ref"])


class CriticalBatchSize(_NoisePolicy):
    """b = κ·B̂_noise, the smoothed gradient noise scale (beyond the paper; see the module
    docstring for the derivation).

    Args:
        initial: the first global batch size (a multiple of ``granularity``).
        maximum: the largest batch size (a multiple of ``granularity``).
        kappa: the multiple of the noise scale to run at (default 1, the balanced point).
        smoothing: the decay of the moving averages of V and Ĝ across test steps (0: none).
        interval: read statistics every ``interval`` steps.
        granularity: batch sizes are multiples of it (micro-batch size × world size).
        lr_scaling: ``None``, ``"linear"``, ``"sqrt"`` or a gain rule of :data:`LR_GAINS`.

    History rows (one per test step): those of the controller (``required`` = κ·B̂_noise,
    ``passed`` = required ≤ b, ``statistic`` = required / b) and the raw statistics
    ``grad_sq_norm``, ``variance_trace``, ``b_noise_step`` (this step's V/(G − V/b), None when
    not positive) and ``b_noise`` (the smoothed estimate the decision used).
    """

    def _decide(self, stats: GradientStats | None) -> tuple[int, dict[str, Any] | None]:
        if stats is None:
            return self.batch_size, None
        row = self._observe(stats)
        b_noise = row["b_noise"]
        if b_noise is None:
            return self._undecided(row)
        return self._verdict(self.kappa * b_noise, stats.batch_size, row)


class Goodput(_NoisePolicy):
    """The batch size that maximises progress per second, b* = √(α·B̂_noise/β), with
    t(b) ≈ α + β·b fitted to the loop's step times (beyond the paper; see the module
    docstring).

    The loop calls :meth:`observe_time` once per step, before :meth:`update`, with a
    duration that every rank agrees on (in a distributed loop: an all-reduced maximum or
    mean). Without times the policy behaves as :class:`CriticalBatchSize` with moves bounded
    by ``max_growth``. The recent times are part of ``state_dict``, so a resumed run goes on
    from them; since they are measured, two runs (or a run and its resumed copy) need not take
    the same decisions, unlike the statistics-only policies.

    Args (besides those of :class:`CriticalBatchSize`):
        max_growth: the largest factor of one move (default 2).
        window: how many recent times per batch size the median is over (default 16).
    """

    def __init__(self, initial: int, maximum: int, *, kappa: float = 1.0,
                 smoothing: float = 0.9, interval: int = 1, granularity: int = 1,
                 lr_scaling: str | None = None, max_growth: float = 2.0,
                 window: int = 16) -> None:
        self.max_growth = check_real("max_growth", max_growth, minimum=1.0, strict=True)
        self.window = check_int("window", window)
        super().__init__(initial, maximum, kappa=kappa, smoothing=smoothing,
                         interval=interval, granularity=granularity, lr_scaling=lr_scaling)
        self.times: dict[int, list[float]] = {}

    def observe_time(self, batch_size: int, seconds: float) -> None:
        """Record one step of ``batch_size`` samples that took ``seconds`` (finite, > 0;
        other values are ignored, so a loop can pass whatever its clock gave)."""
        b = check_int("batch_size", batch_size)
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise TypeError(f"Invalid seconds: {seconds!r} (must be a real number)")
        if not (math.isfinite(seconds) and seconds > 0):
            return
        recent = self.times.setdefault(b, [])
        recent.append(float(seconds))
        del recent[:-self.window]

    def fit(self) -> tuple[float, float] | None:
        """(α, β) of t(b) ≈ α + β·b: Theil–Sen over the per-size medians; None with fewer
        than two batch sizes timed."""
        points = sorted((b, statistics.median(ts)) for b, ts in self.times.items() if ts)
        if len(points) < 2:
            return None
        slopes = [(tj - ti) / (bj - bi) for k, (bi, ti) in enumerate(points)
                  for bj, tj in points[k + 1:]]
        beta = statistics.median(slopes)
        alpha = statistics.median(t - beta * b for b, t in points)
        return alpha, beta

    def target(self, b_noise: float) -> tuple[float, float | None, float | None]:
        """(b*, α, β): the goodput optimum, or κ·B_noise without a usable fit."""
        fitted = self.fit()
        if fitted is None or not fitted[1] > 0:
            return self.kappa * b_noise, *(fitted or (None, None))
        alpha, beta = fitted
        return math.sqrt(max(alpha, 0.0) * b_noise / beta), alpha, beta

    def _decide(self, stats: GradientStats | None) -> tuple[int, dict[str, Any] | None]:
        if stats is None:
            return self.batch_size, None
        row = self._observe(stats)
        b_noise = row["b_noise"]
        if b_noise is None:
            return self._undecided(row)
        required, alpha, beta = self.target(b_noise)
        row.update(time_alpha=alpha, time_beta=beta)
        new, row = self._verdict(required, stats.batch_size, row)
        # at most a factor max_growth, in whole multiples of granularity, and at least one
        # multiple (else a small factor could never move a small batch)
        g = self.granularity
        bound = max(self.batch_size + g, g * math.floor(self.batch_size * self.max_growth / g))
        return min(new, bound), row

    def config(self) -> dict[str, Any]:
        config = super().config()
        config.update(max_growth=self.max_growth, window=self.window)
        return config

    def _extra_state(self) -> dict[str, Any]:
        state = super()._extra_state()
        state["times"] = {str(b): list(ts) for b, ts in sorted(self.times.items())}
        return state

    def _check_extra_state(self, state: dict[str, Any]) -> None:
        super()._check_extra_state(state)
        times = state.get("times")
        if not isinstance(times, dict) or not all(
            str(k).isdigit() and isinstance(v, list)
            and all(isinstance(t, (int, float)) and math.isfinite(t) for t in v)
            for k, v in times.items()
        ):
            raise ValueError("state_dict times must map batch sizes to lists of finite times")

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        super()._load_extra_state(state)
        self.times = {int(b): [float(t) for t in ts] for b, ts in state["times"].items()}
