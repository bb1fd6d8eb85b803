r"""AdaBelief, Adam and SGD with momentum on the 2D functions of the AdaBelief paper's Fig. 3.

The AdaBelief paper (Zhuang et al., NeurIPS 2020, arXiv:2010.07468, Fig. 3) plots the
trajectories of SGD (with momentum), Adam and AdaBelief on

- (a) f = |x| + |y|
- (b) f = |x + y| + |x − y|/10
- (c) f = (x + y)² + (x − y)²/10
- (e, f) the Beale function (1.5 − x + xy)² + (2.25 − x + xy²)² + (2.625 − x + xy³)²,
  minimum 0 at (3, 0.5)
- (g, h) the Rosenbrock function (1 − x)² + 100 (y − x²)², minimum 0 at (1, 1)

and says that AdaBelief reaches the optimum the fastest in all cases. The paper gives the
starting points only in its figure; we use the ones read off it by the public reproductions
github.com/seiyab/adabelief-toy-examples-pytorch (``src/problems/toy.py``) and
github.com/seiyab/adabelief-julia-toy (``entry.jl``): (−2.5, 0) for (a), (2.5, 0) for (b)
and (c), (−2.5, −2.5) for Beale and (−4, −4) for Rosenbrock. The learning rate and the number
of iterations of the figure are not stated, so we run a small grid of learning rates, the
same for the three optimizers, and report every cell.

Optimizers: ``torch.optim.SGD(momentum=0.9)``, ``torch.optim.Adam`` (betas 0.9/0.999,
eps 1e-8) and our :class:`adabatch.optim.AdaBelief` in the paper's Algorithm 2 form
(``rectify=False``, no weight decay) with eps = 1e-16 (AdaBelief's eps enters squared, the
authors advise eps_adabelief ≈ eps_adam²). Everything in float64, full (deterministic)
gradients.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adabatch.reproduce.common import Section, fmt, markdown_table, pyplot, save_figure

__all__ = ["OPTIMIZERS", "PROBLEMS", "ToyProblem", "run", "trajectory"]

#: distance to the optimum under which a run counts as having reached it
REACHED = 0.1
#: |x| beyond which a run counts as diverged (and is stopped)
DIVERGED = 1e6


@dataclass(frozen=True)
class ToyProblem:
    key: str
    label: str
    fn: Callable[[Any, Any], Any]
    start: tuple[float, float]
    optimum: tuple[float, float]
    domain: tuple[float, float]
    log_levels: bool = False


def _abs(x: Any, y: Any) -> Any:
    return abs(x) + abs(y)


def _abs_rot(x: Any, y: Any) -> Any:
    return abs(x + y) + abs(x - y) / 10


def _quad_rot(x: Any, y: Any) -> Any:
    return (x + y) ** 2 + (x - y) ** 2 / 10


def _beale(x: Any, y: Any) -> Any:
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


def _rosenbrock(x: Any, y: Any) -> Any:
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


PROBLEMS: tuple[ToyProblem, ...] = (
    ToyProblem("abs", "|x| + |y|", _abs, (-2.5, 0.0), (0.0, 0.0), (-3.0, 3.0)),
    ToyProblem("abs_rot", "|x+y| + |x-y|/10", _abs_rot, (2.5, 0.0), (0.0, 0.0), (-3.0, 3.0)),
    ToyProblem("quad_rot", "(x+y)² + (x-y)²/10", _quad_rot, (2.5, 0.0), (0.0, 0.0),
               (-3.0, 3.0)),
    ToyProblem("beale", "Beale", _beale, (-2.5, -2.5), (3.0, 0.5), (-4.0, 4.0),
               log_levels=True),
    ToyProblem("rosenbrock", "Rosenbrock", _rosenbrock, (-4.0, -4.0), (1.0, 1.0), (-6.0, 6.0),
               log_levels=True),
)


def _adabelief(params: Any, lr: float) -> torch.optim.Optimizer:
    from adabatch.optim import AdaBelief

    return AdaBelief(params, lr=lr, betas=(0.9, 0.999), eps=1e-16, rectify=False,
                     weight_decouple=False, foreach=False)


OPTIMIZERS: dict[str, Callable[[Any, float], torch.optim.Optimizer]] = {
    "SGD-momentum": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9),
    "Adam": lambda params, lr: torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8),
    "AdaBelief": _adabelief,
}

_COLORS = {"SGD-momentum": "tab:blue", "Adam": "tab:green", "AdaBelief": "tab:red"}

_SIZES: dict[str, dict[str, Any]] = {
    "full": {"steps": 10000, "lrs": (1e-3, 1e-2, 1e-1), "grid": 300, "dpi": 110,
             "sgd_lrs": (1e-4, 1e-5, 1e-6)},
    "quick": {"steps": 2000, "lrs": (1e-2, 1e-1), "grid": 150, "dpi": 80,
              "sgd_lrs": (1e-5,)},
    "tiny": {"steps": 30, "lrs": (1e-1,), "grid": 25, "dpi": 40, "sgd_lrs": (1e-5,)},
}


def trajectory(problem: ToyProblem, optimizer: str, lr: float, steps: int) -> np.ndarray:
    """The iterates x_0 .. x_K (an array [K+1, 2]); shorter if the run diverged.

    A run is stopped at the first non-finite iterate or one with norm > ``DIVERGED``; that
    iterate is kept as the last row.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose from {sorted(OPTIMIZERS)}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    xy = torch.tensor(problem.start, dtype=torch.float64, requires_grad=True)
    opt = OPTIMIZERS[optimizer]([xy], lr)
    out = np.empty((steps + 1, 2))
    out[0] = problem.start
    for k in range(1, steps + 1):
        opt.zero_grad()
        problem.fn(xy[0], xy[1]).backward()
        opt.step()
        point = xy.detach().numpy()
        out[k] = point
        if not np.all(np.isfinite(point)) or float(np.abs(point).max()) > DIVERGED:
            return out[: k + 1]
    return out


def _summary(problem: ToyProblem, traj: np.ndarray, steps: int) -> dict[str, Any]:
    dist = np.linalg.norm(traj - np.asarray(problem.optimum), axis=1)
    diverged = len(traj) < steps + 1
    hits = np.nonzero(dist <= REACHED)[0]
    final = math.inf if diverged or not np.isfinite(dist[-1]) else float(dist[-1])
    return {
        "final_distance": final,
        "final_point": [float(v) for v in traj[-1]],
        "first_within": int(hits[0]) if len(hits) else None,
        "diverged": bool(diverged),
        "reached": bool(final <= REACHED),
    }


def _plot(problem: ToyProblem, lrs: Sequence[float], trajs: dict[tuple[str, float], np.ndarray],
          out: Path, grid: int, dpi: int) -> str:
    plt = pyplot()
    lo, hi = problem.domain
    xs = np.linspace(lo, hi, grid)
    X, Y = np.meshgrid(xs, xs)
    Z = problem.fn(X, Y)
    fig, axes = plt.subplots(1, len(lrs), figsize=(4.2 * len(lrs), 4.2), squeeze=False)
    for ax, lr in zip(axes[0], lrs):
        if problem.log_levels:
            levels = np.logspace(np.log10(max(Z.min(), 1e-3)), np.log10(Z.max()), 25)
            ax.contour(X, Y, Z, levels=levels, cmap="viridis", linewidths=0.6)
        else:
            ax.contour(X, Y, Z, levels=25, cmap="viridis", linewidths=0.6)
        for name in OPTIMIZERS:
            t = trajs[(name, lr)]
            ax.plot(t[:, 0], t[:, 1], color=_COLORS[name], lw=1.2, label=name)
            ax.plot(t[-1, 0], t[-1, 1], "o", color=_COLORS[name], ms=4)
        ax.plot(*problem.start, "ks", ms=5)
        ax.plot(*problem.optimum, "x", color="tab:orange", ms=10, mew=2.5)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
        ax.set_title(f"{problem.label}, lr={lr:g}", fontsize=9)
    axes[0][0].legend(fontsize=7, loc="best")
    return save_figure(fig, out, f"toy_{problem.key}", dpi)


def _reading(rows: list[dict[str, Any]], lrs: Sequence[float], steps: int) -> str:
    """The generated reading of the Beale claim and of "AdaBelief is the fastest"."""
    lines = []
    beale = [r for r in rows if r["problem"] == "beale"]
    for lr in lrs:
        cell = {r["optimizer"]: r for r in beale if r["lr"] == lr}
        reached = [name for name in OPTIMIZERS if cell[name]["reached"]]
        if reached == ["AdaBelief"]:
            verdict = "the claim that only AdaBelief reaches the optimum **holds** here"
        elif not reached:
            verdict = "no optimizer reaches it, so the claim is **not reproduced** here"
        else:
            verdict = ("the claim that only AdaBelief reaches the optimum **does not hold** "
                       "here")
        lines.append(
            f"- Beale from (-2.5, -2.5), lr={lr:g}, {steps} steps: within {REACHED} of (3, 0.5) "
            f"at the end: {', '.join(reached) if reached else 'none'}; {verdict}."
        )
    fastest: dict[str, int] = dict.fromkeys(OPTIMIZERS, 0)
    cells = 0
    for problem in {r["problem"] for r in rows}:
        for lr in lrs:
            cell = [r for r in rows if r["problem"] == problem and r["lr"] == lr]
            hit = [(r["first_within"], r["optimizer"]) for r in cell
                   if r["first_within"] is not None]
            if hit:
                cells += 1
                fastest[min(hit)[1]] += 1
    counts = ", ".join(f"{name} {n}" for name, n in fastest.items())
    lines.append(
        f"- First to come within {REACHED} of the optimum, over the {cells} (function, lr) "
        f"cells where any optimizer did: {counts}."
    )
    ab_first = ab_cells = 0
    for problem in {r["problem"] for r in rows}:
        for lr in lrs:
            cell = {r["optimizer"]: r for r in rows if r["problem"] == problem and r["lr"] == lr}
            a, b = cell["AdaBelief"]["first_within"], cell["Adam"]["first_within"]
            if a is None and b is None:
                continue
            ab_cells += 1
            ab_first += int(b is None or (a is not None and a < b))
    lines.append(
        f"- AdaBelief against Adam: AdaBelief came within {REACHED} first in {ab_first} of the "
        f"{ab_cells} cells where either did."
    )
    diverged = sorted({(r["problem"], r["lr"]) for r in rows
                       if r["optimizer"] == "SGD-momentum" and r["diverged"]})
    if diverged:
        where = ", ".join(f"{p} lr={lr:g}" for p, lr in diverged)
        lines.append(
            f"- SGD with momentum diverged (|x| > {DIVERGED:g} or non-finite) on: {where}; "
            f"a learning rate shared with the adaptive methods is far too large for plain "
            f"gradient steps on these steep functions."
        )
    return "\n".join(lines) + "\n"


def render(rows: list[dict[str, Any]], steps: int, lrs: Sequence[float],
           images: Sequence[str], sgd_rows: Sequence[dict[str, Any]] = ()) -> str:
    """The section's markdown from its result rows (also used to re-render saved data)."""
    header = ["function", "start", "optimum", "lr",
              *[f"{n}: final dist (first ≤{REACHED})" for n in OPTIMIZERS]]
    table = []
    for problem in PROBLEMS:
        for lr in lrs:
            cell = {r["optimizer"]: r for r in rows if r["problem"] == problem.key
                    and r["lr"] == lr}
            entries = []
            for name in OPTIMIZERS:
                r = cell[name]
                if r["diverged"]:
                    entries.append("diverged")
                else:
                    first = "never" if r["first_within"] is None else f"step {r['first_within']}"
                    entries.append(f"{fmt(r['final_distance'])} ({first})")
            table.append([problem.label.replace("|", "\\|"), str(problem.start),
                          str(problem.optimum), f"{lr:g}", *entries])
    md = [
        f"Full-gradient runs of {steps} steps from the starting points of the AdaBelief "
        f"paper's Fig. 3 (as read off by the public reproductions cited in "
        f"`adabatch/reproduce/toy.py`); the learning rate is the same for the three "
        f"optimizers in each row. Final distance to the optimum, and the first step within "
        f"{REACHED} of it.\n",
        markdown_table(header, table),
        "\n" + _reading(rows, lrs, steps),
    ]
    if sgd_rows:
        labels = {p.key: p.label for p in PROBLEMS}
        md += [
            "\nSGD with momentum alone at smaller learning rates on the functions where the "
            "shared ones made it diverge (same number of steps):\n",
            markdown_table(
                ["function", "lr", "final distance", f"first step ≤{REACHED}", "final point"],
                [[labels[r["problem"]], f"{r['lr']:g}",
                  "diverged" if r["diverged"] else fmt(r["final_distance"]),
                  "never" if r["first_within"] is None else str(r["first_within"]),
                  "(" + ", ".join(f"{v:.3g}" for v in r["final_point"]) + ")"]
                 for r in sgd_rows]),
        ]
    md.append("\n" + "\n".join(f"![{p.label}]({img})" for p, img in zip(PROBLEMS, images))
              + "\n")
    return "\n".join(md)


def run(out: Path, *, scale: str = "full") -> Section:
    """Run the toy section at ``scale`` and write its figures under ``out/img``."""
    t0 = time.perf_counter()
    size = _SIZES[scale]
    steps, lrs = size["steps"], size["lrs"]
    rows: list[dict[str, Any]] = []
    images: list[str] = []
    for problem in PROBLEMS:
        trajs: dict[tuple[str, float], np.ndarray] = {}
        for lr in lrs:
            for name in OPTIMIZERS:
                t = trajectory(problem, name, lr, steps)
                trajs[(name, lr)] = t
                rows.append({"problem": problem.key, "optimizer": name, "lr": lr,
                             **_summary(problem, t, steps)})
        images.append(_plot(problem, lrs, trajs, out, size["grid"], size["dpi"]))
    # SGD with momentum alone at smaller learning rates on the steep functions, where the
    # shared learning rates make it diverge
    sgd_rows = []
    for problem in PROBLEMS:
        if not problem.log_levels:
            continue
        for lr in size["sgd_lrs"]:
            t = trajectory(problem, "SGD-momentum", lr, steps)
            sgd_rows.append({"problem": problem.key, "optimizer": "SGD-momentum", "lr": lr,
                             **_summary(problem, t, steps)})
    md = render(rows, steps, lrs, images, sgd_rows)
    return Section(
        name="toy",
        title="AdaBelief, Adam and SGD with momentum on the AdaBelief paper's 2D functions",
        markdown=md,
        images=images,
        wall_time_s=time.perf_counter() - t0,
        data={"steps": steps, "lrs": list(lrs), "rows": rows, "sgd_rows": sgd_rows},
    )
