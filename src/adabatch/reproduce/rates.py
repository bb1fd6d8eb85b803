r"""The convergence rate of AdaGrad-Norm with the norm test against fixed batches.

The AdAdaGrad paper (Lau, Liu, Kolar, arXiv:2402.11215) proves that AdaGrad-Norm whose
batch sizes follow the norm test (AdAdaGradNorm) finds an ε-stationary point of a smooth
objective F at the rate min_{k≤K} ‖∇F(x_k)‖² = O(1/K) in iterations, against O(1/√K) for
AdaGrad-Norm with a fixed batch. We measure min_{k≤K} ‖∇F(x_k)‖² with the *full* gradient
(computed exactly at every iterate) on two smooth finite-sum problems:

- ``logistic``: binary logistic regression on generated data (n samples, d features from a
  standard normal, labels drawn from the logistic model of a fixed ground-truth vector, so
  the data are not separable and the minimum is finite);
- ``mlp``: a 64-32-10 tanh MLP with cross-entropy on scikit-learn's digits (n = 1797;
  nonconvex, smooth).

Every run uses :class:`adabatch.optim.AdaGradNorm`; batches come from
:class:`adabatch.batching.AdaptiveBatchSampler` (sampling without replacement, epoch by
epoch); the norm test is :class:`adabatch.batching.NormTest` inside a
:class:`adabatch.batching.BatchSizeController` (maximum: the dataset size; a step whose
batch is the whole dataset uses the exact full gradient), with exact per-sample statistics
from :class:`adabatch.batching.PerSampleStats`; fixed batches use
:class:`adabatch.batching.ConstantSchedule`. Slopes are least-squares fits of
log min_{k≤K} ‖∇F(x_k)‖² against log K over the last decade-and-a-bit of K (from K/20 to
K, leaving out values at round-off level, ≤ ``FLOOR``), one per seed, reported as mean ± std
over seeds.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from adabatch.reproduce.common import (
    Section,
    fit_loglog_slope,
    fmt,
    markdown_table,
    pyplot,
    save_figure,
)

__all__ = ["Policy", "Problem", "make_problem", "run", "run_policy"]

#: min ‖∇F‖² values at or below this are round-off and left out of the slope fits
FLOOR = 1e-20


@dataclass(frozen=True)
class Problem:
    """A finite-sum problem F(x) = (1/n) Σ_i f_i(x) with data held as tensors."""

    key: str
    label: str
    X: Tensor
    Y: Tensor
    make_model: Callable[[], nn.Module]
    loss: Callable[[Tensor, Tensor], Tensor]
    lr: float
    b0: float

    @property
    def n(self) -> int:
        return int(self.X.shape[0])


@dataclass(frozen=True)
class Policy:
    """A batch-size policy: ``fixed`` (``batch``) or ``norm`` (``initial``, ``eta``)."""

    kind: str
    batch: int
    eta: float | None = None

    @property
    def label(self) -> str:
        if self.kind == "fixed":
            return f"fixed b={self.batch}"
        return f"norm test η={self.eta:g} (b0={self.batch})"


def _bce(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.binary_cross_entropy_with_logits(out.squeeze(-1), y)


def _ce(out: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(out, y)


def make_problem(key: str, *, n: int | None = None, seed: int = 0) -> Problem:
    """Build the ``logistic`` or ``mlp`` problem (float64). ``n`` subsamples / sizes the data."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    if key == "logistic":
        n = 4096 if n is None else n
        d = 20
        X = torch.randn(n, d, generator=gen, dtype=torch.float64)
        w_true = torch.randn(d, generator=gen, dtype=torch.float64) * (2.0 / math.sqrt(d))
        p = torch.sigmoid(X @ w_true)
        Y = torch.bernoulli(p, generator=gen)

        def make_model() -> nn.Module:
            return nn.Linear(d, 1).double()

        return Problem("logistic", f"logistic regression (n={n}, d={d})", X, Y, make_model,
                       _bce, lr=1.0, b0=0.1)
    if key == "mlp":
        from sklearn.datasets import load_digits

        digits = load_digits()
        X = torch.tensor(digits.data / 16.0, dtype=torch.float64)
        Y = torch.tensor(digits.target, dtype=torch.long)
        if n is not None:
            X, Y = X[:n], Y[:n]

        def make_model() -> nn.Module:
            return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)).double()

        return Problem("mlp", f"MLP 64-32-10 tanh on digits (n={X.shape[0]})", X, Y,
                       make_model, _ce, lr=1.0, b0=0.1)
    raise ValueError(f"unknown problem {key!r}; choose from ['logistic', 'mlp']")


def _full_grad_sq(problem: Problem, model: nn.Module) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    loss = problem.loss(model(problem.X), problem.Y)
    grads = torch.autograd.grad(loss, params)
    return float(sum((g.double() ** 2).sum() for g in grads))


def run_policy(problem: Problem, policy: Policy, steps: int, seed: int) -> dict[str, Any]:
    """One AdaGrad-Norm run; ‖∇F(x_k)‖² at every iterate x_0 .. x_{steps-1}.

    Returns lists ``grad_sq`` (‖∇F(x_k)‖²), ``samples`` (samples consumed before step k)
    and ``batch`` (the batch size of step k), and the final batch size.
    """
    from adabatch.batching import (
        AdaptiveBatchSampler,
        BatchSizeController,
        ConstantSchedule,
        NormTest,
        PerSampleStats,
    )
    from adabatch.optim import AdaGradNorm

    torch.manual_seed(seed)
    model = problem.make_model()
    opt = AdaGradNorm(model.parameters(), lr=problem.lr, b0=problem.b0)
    n = problem.n
    if policy.kind == "fixed":
        ctrl: Any = ConstantSchedule(min(policy.batch, n))
    elif policy.kind == "norm":
        if policy.eta is None:
            raise ValueError(f"Invalid policy: {policy!r} (a 'norm' policy needs eta)")
        ctrl = BatchSizeController(NormTest(policy.eta), initial=min(policy.batch, n),
                                   maximum=n)
    else:
        raise ValueError(f"unknown policy kind {policy.kind!r}")
    est = PerSampleStats(model, needs=ctrl.needs) if ctrl.needs else None
    sampler = AdaptiveBatchSampler(n, 1, seed=seed)
    grad_sq: list[float] = []
    samples: list[int] = []
    batch: list[int] = []
    for _ in range(steps):
        grad_sq.append(_full_grad_sq(problem, model))
        samples.append(sampler.samples_consumed)
        B = ctrl.batch_size
        batch.append(B)
        # A batch of the whole dataset size is the exact full gradient (the stream's window
        # of n samples may straddle two epochs' permutations and repeat samples).
        idx = torch.arange(n) if B >= n else sampler.global_batch(B)
        sampler.advance(B)
        opt.zero_grad(set_to_none=True)
        x, y = problem.X[idx], problem.Y[idx]
        stats = None
        if est is not None and ctrl.wants_stats():
            with est.measure():
                problem.loss(model(x), y).backward()
            stats = est.stats()
        else:
            problem.loss(model(x), y).backward()
        opt.step()
        ctrl.update(stats)
    return {"grad_sq": grad_sq, "samples": samples, "batch": batch,
            "final_batch": ctrl.batch_size, "total_samples": sampler.samples_consumed}


def _running_min(values: list[float]) -> np.ndarray:
    return np.minimum.accumulate(np.asarray(values, dtype=np.float64))


def _slope(run: dict[str, Any], x_key: str) -> float:
    """Slope of log min_{k≤K} ‖∇F‖² against log K (x_key "K") or log samples ("samples"),
    over the points with K in [K_end/20, K_end]."""
    m = _running_min(run["grad_sq"])
    K = np.arange(1, len(m) + 1, dtype=np.float64)
    x = K if x_key == "K" else np.asarray(run["samples"], dtype=np.float64) + run["batch"][0]
    lo = max(1, len(m) // 20)
    sel = slice(lo - 1, len(m))
    # log-spaced subsample so that late iterations do not dominate the fit
    idx = np.unique(np.geomspace(lo, len(m), num=60).astype(int)) - 1
    idx = idx[(idx >= sel.start) & (idx < len(m))]
    # values at float64 round-off level carry no rate information
    idx = idx[m[idx] > FLOOR]
    return fit_loglog_slope(x[idx].tolist(), m[idx].tolist())


_SIZES: dict[str, dict[str, Any]] = {
    "full": {"steps": 3000, "seeds": (0, 1, 2), "n": None, "dpi": 110},
    "quick": {"steps": 800, "seeds": (0,), "n": None, "dpi": 80},
    "tiny": {"steps": 25, "seeds": (0,), "n": 256, "dpi": 40},
}

POLICIES: tuple[Policy, ...] = (
    Policy("fixed", 16),
    Policy("fixed", 128),
    Policy("norm", 16, eta=0.5),
    Policy("norm", 16, eta=0.9),
)

_STYLE = {0: ("tab:blue", "-"), 1: ("tab:purple", "-"), 2: ("tab:red", "-"),
          3: ("tab:orange", "--")}


def _plot(problem: Problem, runs: dict[int, list[dict[str, Any]]], out: Path, dpi: int) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for i, policy in enumerate(POLICIES):
        color, ls = _STYLE[i]
        r = runs[i][0]
        m = _running_min(r["grad_sq"])
        K = np.arange(1, len(m) + 1)
        samples = np.asarray(r["samples"]) + np.asarray(r["batch"])
        axes[0].loglog(K, m, color=color, ls=ls, label=policy.label)
        axes[1].loglog(samples, m, color=color, ls=ls, label=policy.label)
        axes[2].semilogy(K, r["batch"], color=color, ls=ls, label=policy.label)
    # reference slopes through the first fixed-batch curve at K = 10
    m0 = _running_min(runs[0][0]["grad_sq"])
    K = np.arange(1, len(m0) + 1)
    k0 = min(10, len(m0))
    for power, name in ((-0.5, "K^-1/2"), (-1.0, "K^-1")):
        axes[0].loglog(K[k0 - 1:], m0[k0 - 1] * (K[k0 - 1:] / k0) ** power, color="gray",
                       ls=":" if power == -1.0 else "-.", lw=0.9, label=name)
    axes[0].set_xlabel("iteration K")
    axes[0].set_ylabel("min_{k≤K} ‖∇F(x_k)‖²")
    axes[1].set_xlabel("samples processed")
    axes[2].set_xlabel("iteration K")
    axes[2].set_ylabel("batch size")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"AdaGrad-Norm on {problem.label} (seed 0)", fontsize=10)
    return save_figure(fig, out, f"rates_{problem.key}", dpi)


def _mean_std(values: list[float]) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "nan"
    if len(finite) == 1:
        return f"{finite[0]:.2f}"
    return f"{statistics.mean(finite):.2f} ± {statistics.stdev(finite):.2f}"


def _policy_rows(problem: Problem, runs: dict[int, list[dict[str, Any]]],
                 data: dict[str, Any]) -> list[list[str]]:
    """The table rows of one problem (one per policy); its numbers go into ``data``."""
    # the smallest sample count any policy used: compare every policy at that budget too
    s_ref = min(r["total_samples"] for rs in runs.values() for r in rs)
    rows = []
    for i, policy in enumerate(POLICIES):
        slopes_k = [_slope(r, "K") for r in runs[i]]
        slopes_s = [_slope(r, "samples") for r in runs[i]]
        finals = [float(_running_min(r["grad_sq"])[-1]) for r in runs[i]]
        at_ref = [_min_within(r, s_ref) for r in runs[i]]
        rows.append([
            problem.label, policy.label, _mean_std(slopes_k), _mean_std(slopes_s),
            fmt(statistics.median(finals)), fmt(statistics.median(at_ref)),
            fmt(statistics.median([r["total_samples"] for r in runs[i]])),
            fmt(statistics.median([r["final_batch"] for r in runs[i]])),
        ])
        data["problems"].setdefault(problem.key, {})[policy.label] = {
            "slope_K": slopes_k, "slope_samples": slopes_s, "final_min_grad_sq": finals,
            "min_grad_sq_within_ref_samples": at_ref, "ref_samples": s_ref,
            "first_step_at_full_batch": [
                next((k for k, b in enumerate(r["batch"]) if b >= problem.n), None)
                for r in runs[i]],
            "total_samples": [r["total_samples"] for r in runs[i]],
            "final_batch": [r["final_batch"] for r in runs[i]],
        }
    return rows


def _markdown(steps: int, seeds: list[int], rows: list[list[str]], data: dict[str, Any],
              images: list[str]) -> str:
    header = ["problem", "batch policy", "slope vs K", "slope vs samples",
              f"min ‖∇F‖² at K={steps}", "min ‖∇F‖² within the smallest sample count",
              "samples", "final batch"]
    md = [
        f"AdaGrad-Norm (lr 1, b0 0.1), {steps} iterations, seeds {seeds}; "
        f"‖∇F(x_k)‖² is the exact full gradient at every iterate. Slopes: least-squares fit "
        f"of log min_(k≤K) ‖∇F(x_k)‖² against log K (or log samples processed) for K from "
        f"{max(1, steps // 20)} to {steps}, mean ± std over seeds. The theorem's bounds are "
        f"slope -1 (norm test) and -1/2 (fixed batch) against K; a steeper measured slope "
        f"is consistent with a bound, a shallower one is not. The sixth column compares "
        f"the policies at equal cost: the best ‖∇F‖² among the iterates reached within the "
        f"smallest number of samples any policy used on that problem (the fixed small "
        f"batch's budget).\n",
        markdown_table(header, rows),
        "\n" + _reading(data) + "\n",
        "\n".join(f"![{k}]({img})" for k, img in zip(("logistic", "mlp"), images)) + "\n",
    ]
    return "\n".join(md)


def run(out: Path, *, scale: str = "full") -> Section:
    """Run the rates section at ``scale`` and write its figures under ``out/img``."""
    t0 = time.perf_counter()
    size = _SIZES[scale]
    steps, seeds = size["steps"], size["seeds"]
    rows: list[list[str]] = []
    data: dict[str, Any] = {"steps": steps, "seeds": list(seeds), "problems": {}}
    images = []
    for key in ("logistic", "mlp"):
        problem = make_problem(key, n=size["n"])
        runs = {i: [run_policy(problem, policy, steps, seed) for seed in seeds]
                for i, policy in enumerate(POLICIES)}
        rows += _policy_rows(problem, runs, data)
        images.append(_plot(problem, runs, out, size["dpi"]))
    return Section(
        name="rates",
        title="Convergence rate: AdaGrad-Norm with the norm test vs fixed batches",
        markdown=_markdown(steps, list(seeds), rows, data, images),
        images=images,
        wall_time_s=time.perf_counter() - t0,
        data=data,
    )


def _min_within(run: dict[str, Any], samples: int) -> float:
    """min ‖∇F(x_k)‖² over the iterates reached with at most ``samples`` samples."""
    best = math.inf
    for g, s in zip(run["grad_sq"], run["samples"]):
        if s > samples:
            break
        best = min(best, g)
    # the iterate after the last step that fits in the budget is not in grad_sq when the run
    # ended there; the running list covers x_0 .. x_{K-1}, which is enough for a comparison
    return best


def _reading(data: dict[str, Any]) -> str:
    """Generated reading: each policy's mean slope against K, compared with its bound."""
    lines = []
    for key, by_policy in data["problems"].items():
        parts = []
        for label, d in by_policy.items():
            s = [v for v in d["slope_K"] if math.isfinite(v)]
            if not s:
                continue
            slope = statistics.mean(s)
            bound = -1.0 if label.startswith("norm") else -0.5
            verdict = "consistent with" if slope <= bound + 0.05 else "shallower than"
            text = f"{label}: {slope:.2f} ({verdict} the {bound:g} bound)"
            full = [k for k in d["first_step_at_full_batch"] if k is not None]
            if label.startswith("norm") and full:
                text += (f", batch = whole dataset from iteration {min(full)}–{max(full)} in "
                         f"{len(full)} of {len(d['first_step_at_full_batch'])} seeds")
            parts.append(text)
        lines.append(f"- {key}: mean slope against K — " + "; ".join(parts) + ".")
    lines.append(
        "- Once the batch is the whole dataset the iteration is deterministic AdaGrad-Norm, "
        "which converges geometrically on a locally strongly convex problem: a log-log slope "
        "far below -1 then says \"faster than any power of K\", not a measured exponent. "
        "Note also that the test uses the batch's own estimates, and E‖ḡ‖² = ‖∇F‖² + V/b: "
        "when the noise dominates (‖∇F‖² ≪ V/b) the required size V/(η²‖ḡ‖²) is about "
        "b/η², so the batch grows by about 1/η² per test for η < 1, and for η ≥ 1 only "
        "through fluctuations."
    )
    return "\n".join(lines)
