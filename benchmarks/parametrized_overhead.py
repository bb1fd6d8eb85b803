"""Cost of the per-sample statistics on layers with a parametrized weight (``weight_norm``,
``spectral_norm``), against the same network with plain Linear layers and against
``torch.func.vmap`` per-sample gradients (the way without hooks).

The network is the MLP of ``benchmarks/test_overhead.py`` (784→256→256→10, random
MNIST-shaped data, SGD, float32), with every Linear plain, under ``weight_norm`` or under
``spectral_norm`` (training mode). Each configuration is a training step (zero_grad,
forward, backward, statistics, SGD step):

- ``plain``: no statistics (each network's own; the other cells are ratios to it);
- ``norm`` / ``coord``: :class:`PerSampleStats` with the needs of the norm and the
  coordinate-wise test. On a ``weight_norm`` or ``spectral_norm`` Linear over [b, in]
  inputs both are in closed form (no per-sample gradient materialised:
  ``persample/parametrized.py``);
- ``vmap``: a plain step plus the per-sample gradients of every parameter by
  ``torch.func.vmap(grad(loss))`` over the model (with ``functional_call``, which runs the
  parametrizations), then V.

Timing: every round runs every configuration (shuffled order) for one untimed and ``--reps``
timed steps; a ratio is the median over the rounds of the configuration's time over the
``plain`` time of the same network in the same round (robust on a shared machine whose speed
drifts); ``plain`` is its best round.

    python benchmarks/parametrized_overhead.py [--rounds 10] [--reps 2] [--batch 128]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm, weight_norm

from _interleave import interleaved
from adabatch.batching.estimators import PerSampleStats

NEEDS = {"norm": {"grad_sq_norm", "variance_trace"},
         "coord": {"coord_variance", "mean_grad"}}
WRAPS = {"linear": lambda m: m, "weight_norm": weight_norm, "spectral_norm": spectral_norm}
KINDS = ("plain", "norm", "coord", "vmap")


def make_model(wrap: str) -> nn.Module:
    torch.manual_seed(0)
    layers = [WRAPS[wrap](nn.Linear(i, o)) for i, o in ((784, 256), (256, 256), (256, 10))]
    return nn.Sequential(nn.Flatten(), layers[0], nn.ReLU(), layers[1], nn.ReLU(), layers[2])


def make_step(wrap: str, kind: str, b: int) -> Callable[[], object]:
    """One training step of the configuration; returns its statistic (or None)."""
    model = make_model(wrap)
    x, y = torch.randn(b, 1, 28, 28), torch.randint(0, 10, (b,))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    est = PerSampleStats(model, needs=NEEDS[kind]) if kind in NEEDS else None
    per_sample = vmap_grads(model) if kind == "vmap" else None

    def step() -> object:
        opt.zero_grad()
        if est is None:
            F.cross_entropy(model(x), y).backward()
            out = per_sample(x, y) if per_sample is not None else None
        else:
            with est.measure():
                F.cross_entropy(model(x), y).backward()
            out = est.stats()
        opt.step()
        return out
    return step


def vmap_grads(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """V = Σ_j Var_i(g_ij) from per-sample gradients by torch.func."""
    from torch.func import functional_call, grad, vmap

    def sample_loss(params, xi, yi):
        return F.cross_entropy(functional_call(model, params, (xi.unsqueeze(0),)),
                               yi.unsqueeze(0))

    per = vmap(grad(sample_loss), in_dims=(None, 0, 0))

    def run(x: torch.Tensor, y: torch.Tensor) -> float:
        params = {k: v.detach() for k, v in model.named_parameters()}
        return sum(float(g.var(0, correction=1).sum()) for g in per(params, x, y).values())
    return run


def time_all(b: int, rounds: int, reps: int, seed: int = 0) -> dict:
    configs = [(w, k) for w in WRAPS for k in KINDS]
    steps = {c: make_step(*c, b) for c in configs}
    for c in configs:
        steps[c]()
    return interleaved(steps, rounds, reps, seed=seed)


def table(times: dict) -> str:
    lines = ["| network | " + " | ".join(KINDS) + " |", "|---|" + "---|" * len(KINDS)]
    for w in WRAPS:
        ref = times[(w, "plain")]
        cells = [f"{min(ref) * 1e3:.2f} ms"] + [
            f"{statistics.median(t / r for t, r in zip(times[(w, k)], ref)):.2f}×"
            for k in KINDS[1:]]
        lines.append(f"| {w} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    times = time_all(args.batch, args.rounds, args.reps)
    print(f"torch {torch.__version__}, {args.threads} threads, b = {args.batch}, "
          f"{args.rounds} rounds × (1 untimed + {args.reps} timed) steps; cells: median "
          f"per-round time ratio to the same network's plain step; plain: best round")
    print(table(times))


if __name__ == "__main__":
    main()
