"""Cost of measuring gradient statistics every step, relative to a plain training step.

Run (prints a markdown table; about 11 minutes on 2 cores, peak memory included)::

    python benchmarks/test_overhead.py                 # full: b = 32, 128, 512, 2 threads
    python benchmarks/test_overhead.py --quick         # fewer rounds, b = 32, 128
    python benchmarks/test_overhead.py --rounds 12 --reps 1 --no-mem --sizes 128 \
        --kinds norm,coord,norm+unfused,micro --baseline /tmp/base   # A/B subset, with
        # /tmp/base a checkout of the revision to compare: git worktree add /tmp/base REV
    python benchmarks/test_overhead.py --device cuda --sizes 128,1024,8192   # on a GPU
        # (benchmarks/cuda_check.sh, step 6)

Models: the AdAdaGrad authors' MNIST CNN (timlautk/AdAdaGrad, modules.py: conv 1→16 k5 pad 2,
ReLU, max-pool 2, conv 16→32 k5 pad 2, ReLU, max-pool 2, linear 32·7·7→10; the issue's
"linear 512→10" is the same network without padding) and an MLP 784→256→256→10, on random
MNIST-shaped data, SGD, float32, 2 intra-op threads.

Competitors (one training step each: zero_grad, forward, backward, statistics, SGD step):

- ``plain``: no statistics.
- ``norm`` / ``ip`` / ``aip`` / ``coord``: :class:`PerSampleStats` with the needs of the norm,
  inner-product, augmented inner-product and coordinate-wise tests.
- ``plain×4`` / ``micro``: the same batch as 4 accumulated micro-batches, without and with
  :class:`MicroBatchStats` (norm-test needs); ``micro`` is reported relative to ``plain×4``.
- ``micro-hooks``: :class:`MicroBatchStats` with ``track="hooks"`` (increments measured in
  gradient hooks, no snapshot of p.grad), relative to ``plain×4``.
- ``micro-floor``: what any hook-based micro-batch estimator pays: ``plain×4`` with one
  gradient hook per parameter that only takes ‖Δ‖² of the increment (one dot product) and
  keeps it; no bookkeeping, no statistics. ``micro-hooks`` can approach this row.
- ``norm+unfused`` ... ``coord+unfused`` (only with ``--kinds``): :class:`PerSampleStats` with
  ``fuse_conv_grad=False`` (the backend computes the conv weight gradient itself, besides the
  per-sample ones; the default fuses them).
- ``<kind>@base`` (only with ``--baseline DIR``): the same kind with the estimators loaded
  from another source tree of adabatch in DIR, a checkout of the revision to compare or its
  ``src`` folder (an interleaved before/after in one process: :func:`_load_baseline`).
- ``ip-floor``: the least arithmetic of exact inner products ⟨g_i, ḡ⟩ on top of ``floor``
  (:func:`ip_floor_step`): per layer call, from the kept input a and output gradient δ and
  from ḡ = p.grad, the one extra product that the per-sample inner products need and no plain
  step computes (a Linear: δ_iᵀ(ḡ_W a_i + ḡ_b) by one matrix product, or the Gram form
  Σ_j (δ_i·δ_j)(a_i·a_j + 1) where that costs fewer multiply-adds, as :class:`PerSampleStats`
  chooses; a convolution: the convolution of a with ḡ, dotted with δ), then W from the b
  inner products; no bookkeeping, no checks, no chunking. The smoke test checks that its W
  equals ``PerSampleStats``' ip_variance. ``ip`` can approach this row, not go below it.
- ``norm-floor`` / ``coord-floor``: ``floor`` plus the least arithmetic of the exact
  per-sample norms Σ_i ‖g_i‖² (the norm test) or the per-coordinate sums Σ_i g_i² (the
  coordinate-wise test), with no bookkeeping (:func:`_per_sample_floor`): a Linear takes
  ‖a_i‖²‖δ_i‖² (cheap) or (δ²)ᵀ(a²) (one more product of the weight gradient's size); a
  convolution needs its per-sample weight gradients for either (taken by the library's own
  kernel, whose sum then replaces the backend's weight gradient, as the estimator's fused
  convolution does). The smoke test checks their G, V, v_j and gradients against
  ``PerSampleStats`` in float64. They are the same arithmetic without the bookkeeping, not a
  strict lower bound: they take the per-sample products after the backward pass, where the
  estimator takes them in its gradient hooks while the tensors are fresh, and on the CNN the
  estimator has measured faster than these rows (README, "Against the floors").
- ``aip-floor``: the least arithmetic of the augmented inner-product test's W and O, which
  need both the inner products and the norms (:func:`aip_floor_step`): a Linear takes the
  Gram form where ``ip-floor`` does (the norms are its diagonal), else ``ip-floor``'s product
  and ``norm-floor``'s ‖a_i‖²‖δ_i‖²; a convolution takes its per-sample weight gradients as
  ``norm-floor`` does and keeps them, so its inner products are one matrix-vector product
  with ḡ (what the estimator does with a fused convolution). Checked against
  ``PerSampleStats`` in float64 (the smoke test and ``tests/test_overhead_floors.py``, which
  checks every floor row in the suite); like the other floors, the same
  arithmetic without the bookkeeping, not a strict lower bound. ``aip`` is compared with it:
  ``ip-floor`` leaves out the norms, which on a convolution cost its per-sample gradients.
- ``floor``: what any hook-based per-sample estimator pays before computing anything: forward
  hooks on the Linear/Conv layers keep each input and register a hook that keeps the output
  gradient, and G = ‖ḡ‖² is read from the gradients (one dot product per tensor); no
  per-sample arithmetic. The per-sample kinds can approach this row, not go below it.
- ``vmap``: the AdAdaGrad authors' way: a plain step plus per-sample gradients by
  ``torch.func.vmap(grad(loss))`` over the model's detached parameters, then V and G.
- ``backpack``: BackPACK (backpack-for-pytorch, Dangel et al. 2020) with ``BatchL2Grad`` and
  ``SumGradSquared`` on an ``extend``-ed model and loss: per-sample squared norms and the sum of
  squared per-sample gradients (what the norm and coordinate-wise tests need), then V and G.
  Optional: the row appears only when ``import backpack`` works. A plain ``pip install
  backpack-for-pytorch`` replaces torch (its torchvision pin wants torch 2.14.1 with CUDA
  wheels), so install it beside the existing torch with ``pip install --no-deps
  backpack-for-pytorch einops unfoldNd`` (it does not import torchvision). Before timing, the
  benchmark checks that BackPACK's V and per-coordinate variances equal PerSampleStats' on
  both models in float64 (:func:`check_backpack`).

Timing: every round runs every configuration once (shuffled order), each for ``--warm``
untimed steps (default 1: the configuration that ran before left other tensors in the caches)
and then ``--reps`` timed steps. A ratio is the median over the rounds of the configuration's
time divided by the time of ``plain`` (``plain×4`` for the micro-batch kinds) at the same model
and batch size *in the same round*: on a shared machine whose speed drifts over minutes, pairs
measured seconds apart are comparable, while the best rounds of two configurations may come
from different phases. The ``plain`` column is its best round.

After the tables, "Above the floors" (:func:`gap_table`) gives, for each statistics column
and each floor column it is held to (:data:`FLOORS`: the least arithmetic of the same
statistic, and the floor that issue #15 named), the median over the rounds of (t_kind −
t_floor) / t_plain: the distance in plain steps, paired within each round.

malloc: the timing process first calls :func:`adabatch.keep_freed_memory` (as ``adabatch
train`` does on CPU), so that no configuration re-faults the pages of its large tensors every
step; ``--default-malloc`` times with glibc's defaults instead. The page faults cost every
configuration, and the per-sample ones most (they allocate more): see
``src/adabatch/allocator.py``.

On a GPU (``--device cuda``) the model and the batch live on the device, each timed stretch
starts and ends with ``torch.cuda.synchronize``, and peak memory is what torch's caching
allocator reports (``max_memory_allocated`` over creating the configuration and 3 steps,
minus what was allocated before), measured in the timing process since it is exact.

Peak memory on the CPU: torch's CPU tensors come from malloc, which tracemalloc does not
see, so each configuration runs in a fresh subprocess with ``MALLOC_MMAP_THRESHOLD_=65536``
(large blocks are mmapped and returned on free, so the resident set follows the live
tensors); the figure is the peak resident set (VmHWM of /proc/self/status; ``ru_maxrss``
would carry the parent's peak across exec) during model/data/estimator creation and 3 steps,
minus the resident set right after ``import torch``: the memory the training itself needs
(parameters, data, activations, gradients, estimator buffers and temporaries). Ratios are to
``plain``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.util
import math
import os
import statistics
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from _interleave import interleaved
from adabatch.allocator import keep_freed_memory
from adabatch.batching.estimators import MicroBatchStats, PerSampleStats

NEEDS = {
    "norm": {"grad_sq_norm", "variance_trace"},
    "ip": {"grad_sq_norm", "ip_variance"},
    "aip": {"grad_sq_norm", "ip_variance", "orth_variance"},
    "coord": {"coord_variance", "mean_grad"},
}
HAVE_BACKPACK = importlib.util.find_spec("backpack") is not None
KINDS = ["plain", "floor", "norm", "norm-floor", "ip", "ip-floor", "aip", "aip-floor", "coord",
         "coord-floor", "plain×4", "micro", "micro-hooks",
         "micro-floor", "vmap", *(["backpack"] if HAVE_BACKPACK else [])]
MICRO = 4
#: Optional A/B rows: ``--baseline DIR`` loads PerSampleStats / MicroBatchStats from the
#: adabatch source tree in DIR (:func:`_load_baseline`) and adds the kinds ``<kind>@base``.
#: Selectable with ``--kinds`` only: the per-sample kinds with ``fuse_conv_grad=False``.
EXTRA_KINDS = [k + "+unfused" for k in ("norm", "ip", "aip", "coord")]
BASE: dict[str, type] = {}
BASE_DIR: list[str] = []


def make_model(name: str) -> nn.Module:
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 16, 5, 1, 2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5, 1, 2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
        )
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256),
                         nn.ReLU(), nn.Linear(256, 10))


def estimator_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   opt: torch.optim.Optimizer, est) -> Callable[[], object]:
    """A training step measured by a per-sample estimator; returns its statistics."""
    def step():
        opt.zero_grad()
        with est.measure():
            F.cross_entropy(model(x), y).backward()
        s = est.stats()
        opt.step()
        return s
    return step


def micro_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               opt: torch.optim.Optimizer, kind: str, mb_cls) -> Callable[[], object]:
    """MICRO accumulated micro-batches: ``plain×4`` (no statistics), ``micro`` /
    ``micro-hooks`` (MicroBatchStats, parameter or hook tracking) or ``micro-floor`` (one
    dot product per gradient, the least work of the micro-batch norm test)."""
    b = len(x)
    mest = (mb_cls(model, needs=NEEDS["norm"]) if kind == "micro"
            else mb_cls(model, needs=NEEDS["norm"], track="hooks")
            if kind == "micro-hooks" else None)
    xs, ys = x.chunk(MICRO), y.chunk(MICRO)
    sq: list[torch.Tensor] = []
    if kind == "micro-floor":
        def dot_hook(grad: torch.Tensor) -> None:
            flat = grad.reshape(-1)
            sq.append(torch.dot(flat, flat))

        for p in model.parameters():
            p.register_hook(dot_hook)

    def step():
        sq.clear()
        opt.zero_grad()
        for xk, yk in zip(xs, ys):
            (F.cross_entropy(model(xk), yk) * (len(xk) / b)).backward()
            if mest is not None:
                mest.accumulate(len(xk))
        s = mest.stats() if mest is not None else (
            torch.stack(sq).sum().item() if sq else None)
        opt.step()
        return s
    return step


def _kept_backward(kept: list, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   opt: torch.optim.Optimizer) -> None:
    """The start of every floor row's step: the kept layer calls of the last step dropped,
    the gradients zeroed, the forward and backward pass (its hooks keep the new calls)."""
    kept.clear()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()


def _grad_sq_norm(params: Iterable[torch.Tensor]) -> float:
    """G = ‖ḡ‖² from p.grad: one dot product per tensor, one read-back (the floor rows)."""
    return torch.stack([torch.dot(p.grad.reshape(-1), p.grad.reshape(-1))
                        for p in params]).sum().item()


def floor_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               opt: torch.optim.Optimizer) -> Callable[[], float]:
    """The ``floor`` row: keep the layers' inputs and output gradients (what per-sample
    statistics need) and compute ‖ḡ‖² only."""
    kept: list[torch.Tensor] = []

    def keep(module, args, out):
        kept.append(args[0].detach())
        out.register_hook(kept.append)

    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.register_forward_hook(keep)

    def step():
        _kept_backward(kept, model, x, y, opt)
        G = _grad_sq_norm(model.parameters())
        opt.step()
        return G
    return step


def vmap_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
              opt: torch.optim.Optimizer) -> Callable[[], tuple[float, float]]:
    """The ``vmap`` row: per-sample gradients with torch.func; returns (V, G)."""
    from torch.func import functional_call, grad, vmap

    def sample_loss(params, xi, yi):
        return F.cross_entropy(functional_call(model, params, (xi.unsqueeze(0),)),
                               yi.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        params = {k: v.detach() for k, v in model.named_parameters()}
        grads = per_sample(params, x, y)
        V = sum(float(g.var(0, correction=1).sum()) for g in grads.values())
        G = sum(float(g.mean(0).square().sum()) for g in grads.values())
        opt.step()
        return V, G
    return step


def plain_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
               opt: torch.optim.Optimizer) -> Callable[[], None]:
    """The ``plain`` row: a training step without statistics."""
    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def make_step(model_name: str, b: int, kind: str, seed: int = 0,
              device: str = "cpu") -> Callable[[], object]:
    """A closure running one training step of the configuration on ``device``; returns its
    statistics. The model and the batch are drawn on the CPU (the same on every device)."""
    torch.manual_seed(seed)
    model = make_model(model_name).to(device)
    x = torch.randn(b, 1, 28, 28).to(device)
    y = torch.randint(0, 10, (b,)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    kind, _, variant = kind.partition("@")
    ps_cls = BASE["PerSampleStats"] if variant == "base" else PerSampleStats
    mb_cls = BASE["MicroBatchStats"] if variant == "base" else MicroBatchStats
    kind, _, unfused = kind.partition("+")
    if kind in NEEDS:
        est = (ps_cls(model, needs=NEEDS[kind], fuse_conv_grad=False) if unfused
               else ps_cls(model, needs=NEEDS[kind]))
        return estimator_step(model, x, y, opt, est)
    if kind in ("plain×4", "micro", "micro-hooks", "micro-floor"):
        return micro_step(model, x, y, opt, kind, mb_cls)
    builders = {"ip-floor": ip_floor_step, "floor": floor_step, "vmap": vmap_step,
                "backpack": backpack_step, "norm-floor": norm_floor_step,
                "aip-floor": aip_floor_step,
                "coord-floor": coord_floor_step}
    return builders.get(kind, plain_step)(model, x, y, opt)


def _keep_calls(model: nn.Module) -> list[list]:
    """Forward hooks on the Linear/Conv layers that record [module, input, output gradient]
    per call (the output gradient filled in by a gradient hook); the caller clears the list."""
    kept: list[list] = []

    def keep(module, args, out):
        rec = [module, args[0].detach(), None]
        kept.append(rec)

        def grad_hook(g, rec=rec):
            rec[2] = g
        out.register_hook(grad_hook)

    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.register_forward_hook(keep)
    return kept


def ip_floor_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  opt: torch.optim.Optimizer) -> Callable[[], tuple[float, float]]:
    """A training step with the least arithmetic of exact per-sample inner products (the
    ``ip-floor`` row); returns (G, W), W = (1/(b-1)) Σ_i (⟨g_i, ḡ⟩ − G)² over the samples'
    gradients of the mean loss scaled by b (the gradients of each sample's own loss)."""
    kept = _keep_calls(model)
    params = list(model.parameters())
    b = len(x)

    def step():
        _kept_backward(kept, model, x, y, opt)
        s = None  # ⟨g_i, Σ_j g_j⟩ of the mean loss's per-sample gradients
        for m, a, d in kept:
            gw, gb = m.weight.grad, m.bias.grad
            if isinstance(m, nn.Linear):
                out_f, in_f = gw.shape
                # Gram form (ḡ = Σ_j g_j: one pass); + 1: every layer of both models has a bias
                if b * (in_f + out_f) < in_f * out_f:
                    t = ((d @ d.T) * (a @ a.T).add_(1.0)).sum(1)
                else:
                    t = F.linear(a, gw, gb).mul_(d).sum(1)
            else:
                t = m._conv_forward(a, gw, gb).mul_(d).sum((1, 2, 3))
            s = t if s is None else s.add_(t)
        G = _grad_sq_norm(params)
        ip = s.double().mul_(b)  # ⟨b·g_i, ḡ⟩: the per-sample loss's gradient
        W = (ip - G).square_().sum().item() / (b - 1)
        opt.step()
        return G, W
    return step


def _conv_floor_sums(rule, chunks, a: torch.Tensor, d: torch.Tensor, coord: bool,
                     parts: list, sq: dict, keep: list | None = None) -> None:
    """A convolution's part of :func:`_per_sample_floor` (and :func:`aip_floor_step`): its
    per-sample weight and bias gradients by chunks, their norms (``parts``) or squares
    (``sq``), and p.grad = their sum; ``keep``: also each chunk's gradients as [c, numel]."""
    m, n = rule.module, len(a)
    per = m.out_channels * d[0, 0].numel() + m.weight.numel() * 2
    wsum = None
    for lo, hi in chunks(n, per, rule.max_chunk()):
        gw, gb = rule.weight_grads(a[lo:hi], d[lo:hi], bias=True)
        if gb is None:
            gb = d[lo:hi].sum((2, 3))
        wsum = gw.sum(0) if wsum is None else wsum.add_(gw.sum(0))
        if keep is not None:
            keep.append(torch.cat([gw.reshape(hi - lo, -1), gb], 1))
        for p, g in ((m.weight, gw), (m.bias, gb)):
            if coord:
                c = g.square().sum(0)
                sq[p] = c if p not in sq else sq[p].add_(c)
            else:
                flat = g.reshape(-1)
                parts.append(torch.dot(flat, flat))
    m.weight.grad = wsum


def _linear_floor_sums(m: nn.Module, a: torch.Tensor, d: torch.Tensor, coord: bool,
                       parts: list, sq: dict) -> None:
    """A Linear's part of :func:`_per_sample_floor`: ‖a_i‖²‖δ_i‖² and ‖δ_i‖², or (δ²)ᵀ(a²)
    and Σ_i δ_i²."""
    if coord:
        dsq = d.square()
        sq[m.weight] = dsq.T @ a.square()
        sq[m.bias] = dsq.sum(0)
    else:
        nd = torch.linalg.vector_norm(d, dim=1)
        t = torch.linalg.vector_norm(a, dim=1).mul_(nd)
        parts += [torch.dot(t, t), torch.dot(nd, nd)]


def _floor_setup(model: nn.Module) -> tuple[dict, Any, list[list], list[torch.Tensor]]:
    """What the per-sample floor rows share: a :class:`ConvRule` per convolution, whose weight
    is frozen (the rows set its gradient from the per-sample ones), the estimator's chunking,
    the kept layer calls and the parameters."""
    from adabatch.batching.persample.conv import ConvRule
    from adabatch.batching.persample.estimator import DEFAULT_BUDGET
    from adabatch.batching.persample.records import Chunking, PerSampleTuning

    tuning = PerSampleTuning()
    rules = {m: ConvRule(m, ("weight", "bias"), tuning)
             for m in model.modules() if isinstance(m, nn.Conv2d)}
    for m in rules:
        m.weight.requires_grad_(False)
    return rules, Chunking(DEFAULT_BUDGET), _keep_calls(model), list(model.parameters())


def _per_sample_floor(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      opt: torch.optim.Optimizer, coord: bool
                      ) -> Callable[[], tuple[float, float, list[torch.Tensor]]]:
    """The ``norm-floor`` / ``coord-floor`` rows: ``floor`` plus the least arithmetic of exact
    per-sample norms Σ_i ‖g_i‖² (``coord``: per-coordinate sums Σ_i g_i²), with no
    bookkeeping. Per Linear call (input a [b, in], output gradient δ): ‖a_i‖²‖δ_i‖² (+ ‖δ_i‖²
    for the bias), or (δ²)ᵀ(a²) and Σ_i δ_i². Per convolution: the per-sample weight gradients
    by the library's own kernel (:meth:`ConvRule.weight_grads`, im2col + batched matmul or one
    grouped convolution, in the estimator's chunks), whose sum *is* the weight gradient: the
    convolutions' weights are frozen (``requires_grad=False``), so the backend never computes
    the batch weight gradient, and p.grad is set from the sum (what ``fuse_conv_grad`` does
    inside the estimator). Returns (G, V, [v_j] or []) like the estimator's statistics."""
    rules, chunks, kept, params = _floor_setup(model)
    n = len(x)

    def step():
        _kept_backward(kept, model, x, y, opt)
        parts: list[torch.Tensor] = []
        sq: dict = {}
        with torch.no_grad():
            for m, a, d in kept:
                if m in rules:
                    _conv_floor_sums(rules[m], chunks, a, d, coord, parts, sq)
                else:
                    _linear_floor_sums(m, a, d, coord, parts, sq)
        G = _grad_sq_norm(params)
        V, coords = 0.0, []
        if coord:  # the mean loss scales each per-sample gradient by 1/n
            coords = [(sq[p] * n * n - n * p.grad.square()) / (n - 1) for p in params]
        else:
            V = (torch.stack(parts).sum().item() * n * n - n * G) / (n - 1)
        opt.step()
        return G, V, coords
    return step


def norm_floor_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                    opt: torch.optim.Optimizer) -> Callable[[], tuple]:
    """The ``norm-floor`` row (see :func:`_per_sample_floor`)."""
    return _per_sample_floor(model, x, y, opt, coord=False)


def coord_floor_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     opt: torch.optim.Optimizer) -> Callable[[], tuple]:
    """The ``coord-floor`` row (see :func:`_per_sample_floor`)."""
    return _per_sample_floor(model, x, y, opt, coord=True)


def _aip_linear(m: nn.Module, a: torch.Tensor, d: torch.Tensor, b: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """A Linear's part of :func:`aip_floor_step`: (⟨g_i, Σ_j g_j⟩ per sample, Σ_i ‖g_i‖²)."""
    gw, gb = m.weight.grad, m.bias.grad
    out_f, in_f = gw.shape
    if b * (in_f + out_f) < in_f * out_f:  # the Gram form; every layer has a bias
        K, M = d @ d.T, (a @ a.T).add_(1.0)
        return (K * M).sum(1), torch.dot(K.diagonal(), M.diagonal())
    nd = torch.linalg.vector_norm(d, dim=1)
    t = torch.linalg.vector_norm(a, dim=1).mul_(nd)
    return F.linear(a, gw, gb).mul_(d).sum(1), torch.dot(t, t) + torch.dot(nd, nd)


def aip_floor_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   opt: torch.optim.Optimizer) -> Callable[[], tuple[float, float, float]]:
    """The ``aip-floor`` row (see the module docstring); returns (G, W, O) like the
    estimator's ``grad_sq_norm``, ``ip_variance`` and ``orth_variance``."""
    rules, chunks, kept, params = _floor_setup(model)
    b = len(x)

    def step():
        _kept_backward(kept, model, x, y, opt)
        s, norms, convs = None, [], []  # s: ⟨g_i, Σ_j g_j⟩ of the mean loss's g_i
        with torch.no_grad():
            for m, a, d in kept:
                if m not in rules:
                    t, nsq = _aip_linear(m, a, d, b)
                    s = t if s is None else s.add_(t)
                    norms.append(nsq)
                    continue
                parts: list[torch.Tensor] = []
                _conv_floor_sums(rules[m], chunks, a, d, False, norms, {}, keep=parts)
                convs.append((m, parts))
            for m, parts in convs:  # ḡ of the convolution is known now
                g = torch.cat([m.weight.grad.reshape(-1), m.bias.grad])
                t = torch.cat([flat @ g for flat in parts])
                s = t if s is None else s.add_(t)
        G = _grad_sq_norm(params)
        ip = s.double().mul_(b)  # ⟨b·g_i, ḡ⟩: the per-sample loss's gradient
        S = torch.stack(norms).sum().item() * b * b
        W = (ip - G).square_().sum().item() / (b - 1)
        O = (S - torch.dot(ip, ip).item() / G) / (b - 1)
        opt.step()
        return G, W, O
    return step


def check_aip_floor(model_name: str) -> None:
    """The ``aip-floor`` row computes the real statistics: its G, W and O equal
    PerSampleStats' in float64 (b = 8: the Gram forms, one chunk; b = 300: the direct
    products, several chunks), and the weight gradients it sets equal the backend's."""
    for b in (8, 300):
        model, x, y, ours = reference_stats(model_name, b, NEEDS["aip"], seed=4)
        grads = [p.grad.clone() for p in model.parameters()]
        got = aip_floor_step(model, x, y, torch.optim.SGD(model.parameters(), lr=0.0))()
        want = (ours.grad_sq_norm, ours.ip_variance, ours.orth_variance)
        for a, c in zip(got, want):
            if not math.isclose(a, c, rel_tol=1e-9):
                raise AssertionError(f"aip-floor and PerSampleStats disagree on {model_name}, "
                                     f"b = {b}: {got} {want}")
        for p, g in zip(model.parameters(), grads):
            torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-15)


def check_stat_floors(model_name: str) -> None:
    """The ``norm-floor`` and ``coord-floor`` rows compute the real statistics: their G, V and
    v_j equal PerSampleStats' in float64 (b = 8 and 300: one chunk and several), and the
    weight gradients they set equal the backend's."""
    for b in (8, 300):
        needs = {"grad_sq_norm", "variance_trace", "coord_variance"}
        model, x, y, ours = reference_stats(model_name, b, needs, seed=3)
        grads = [p.grad.clone() for p in model.parameters()]
        for kind, step in (("norm-floor", norm_floor_step), ("coord-floor", coord_floor_step)):
            m = copy.deepcopy(model)
            G, V, coords = step(m, x, y, torch.optim.SGD(m.parameters(), lr=0.0))()
            checks = [(G, ours.grad_sq_norm)] + ([] if coords else [(V, ours.variance_trace)])
            for a, c in checks:
                if not math.isclose(a, c, rel_tol=1e-9):
                    raise AssertionError(f"{kind} and PerSampleStats disagree on {model_name}, "
                                         f"b = {b}: {a} {c}")
            for a, c in zip(coords, ours.coord_variance):
                torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-15)
            for p, g in zip(m.parameters(), grads):
                torch.testing.assert_close(p.grad, g, rtol=1e-9, atol=1e-15)


def backpack_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  opt: torch.optim.Optimizer | None) -> Callable[[], object]:
    """A training step with BackPACK's BatchL2Grad + SumGradSquared; returns (G, V, v_j)."""
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad, SumGradSquared

    # BackPACK's module hooks fire on layers whose inputs need no gradient (the first layer)
    warnings.filterwarnings("ignore", message="Full backward hook is firing",
                            category=UserWarning)
    model = extend(model)
    loss_fn = extend(nn.CrossEntropyLoss())
    params = [p for p in model.parameters() if p.requires_grad]
    n = len(x)

    def step():
        model.zero_grad()
        with backpack(BatchL2Grad(), SumGradSquared()):
            loss_fn(model(x), y).backward()
        # the mean loss scales each per-sample gradient by 1/n
        G = sum(float(p.grad.square().sum()) for p in params)
        S = sum(float(p.batch_l2.sum()) for p in params) * n * n
        V = (S - n * G) / (n - 1)
        coord = [((p.sum_grad_squared * n * n - n * p.grad.square()) / (n - 1)).clamp_min(0)
                 for p in params]
        if opt is not None:
            opt.step()
        return G, V, coord
    return step


def check_backpack() -> None:
    """BackPACK as an oracle: its G, V and v_j equal PerSampleStats' in float64."""
    for name in ("cnn", "mlp"):
        model, x, y, ours = reference_stats(name, 8, {"variance_trace", "coord_variance"},
                                            seed=1)
        G, V, coord = backpack_step(model, x, y, None)()
        for a, b in ((G, ours.grad_sq_norm), (V, ours.variance_trace)):
            if not math.isclose(a, b, rel_tol=1e-9):
                raise AssertionError(f"BackPACK and PerSampleStats disagree on {name}: {a} {b}")
        for a, b in zip(coord, ours.coord_variance):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-15)
    print("BackPACK agrees with PerSampleStats (G, V, v_j; float64, CNN and MLP)", flush=True)


def reference_stats(model_name: str, b: int, needs, seed: int):
    """A float64 model, a random batch of b and PerSampleStats' statistics of it (the oracle
    checks compare a competitor's numbers on the same model and batch with these)."""
    torch.manual_seed(seed)
    model = make_model(model_name).double()
    x = torch.randn(b, 1, 28, 28, dtype=torch.float64)
    y = torch.randint(0, 10, (b,))
    est = PerSampleStats(model, needs=needs)
    model.zero_grad()
    with est.measure():
        F.cross_entropy(model(x), y).backward()
    ours = est.stats()
    est.remove()
    return model, x, y, ours


def check_ip_floor(model_name: str) -> None:
    """The ``ip-floor`` row computes the real statistic: its G and W equal PerSampleStats' in
    float64, at b = 8 (the Linear layers take the Gram form) and b = 300 (the direct one)."""
    for b in (8, 300):
        model, x, y, ours = reference_stats(model_name, b, NEEDS["ip"], seed=2)
        G, W = ip_floor_step(model, x, y, torch.optim.SGD(model.parameters(), lr=0.0))()
        for a, c in ((G, ours.grad_sq_norm), (W, ours.ip_variance)):
            if not math.isclose(a, c, rel_tol=1e-9):
                raise AssertionError(f"ip-floor and PerSampleStats disagree on {model_name}, "
                                     f"b = {b}: {a} {c}")


def sync(device: str) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; a CPU step is done when
    it returns)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_all(models, sizes, rounds: int, reps: int, seed: int = 0, kinds=None,
             warm: int = 1, device: str = "cpu") -> dict:
    configs = [(m, b, k) for m in models for b in sizes for k in (kinds or KINDS)]
    steps = {c: make_step(*c, device=device) for c in configs}
    for c in configs:  # warm-up
        steps[c]()
        steps[c]()
    return interleaved(steps, rounds, reps, warm=warm, seed=seed, sync=lambda: sync(device))


def _status_kb(field: str) -> int:
    """A field of /proc/self/status in KB (VmRSS: resident now, VmHWM: peak resident)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def mem_one(model: str, b: int, kind: str) -> int:
    """Peak resident set (KB) of creating the configuration and running 3 steps."""
    torch.set_num_threads(2)
    base = _status_kb("VmRSS")
    step = make_step(model, b, kind)
    for _ in range(3):
        step()
    return _status_kb("VmHWM") - base


def mem_cuda(model: str, b: int, kind: str, device: str) -> int:
    """Peak CUDA memory (KB) allocated by creating the configuration and running 3 steps, from
    torch's caching allocator (exact, so measured in this process: what was allocated before
    is subtracted, and the configuration's tensors are freed afterwards)."""
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step = make_step(model, b, kind, device=device)
    for _ in range(3):
        step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del step
    gc.collect()
    return peak // 1024


def mem_all(models, sizes, kinds=None, device: str = "cpu") -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = {}
    for m in models:
        for b in sizes:
            for k in (kinds or KINDS):
                if torch.device(device).type == "cuda":
                    out[(m, b, k)] = mem_cuda(m, b, k, device)
                    continue
                extra = ["--baseline", BASE_DIR[0]] if BASE_DIR else []
                r = subprocess.run([sys.executable, __file__, "--mem-one", m, str(b), k, *extra],
                                   env=env, capture_output=True, text=True, check=True)
                out[(m, b, k)] = int(r.stdout.strip().splitlines()[-1])
    return out


def reference(kind: str) -> str:
    """The step a kind's ratios are taken to: ``plain×4`` for the micro-batch kinds (the same
    batch as 4 accumulated micro-batches), else ``plain``."""
    return "plain×4" if kind.startswith("micro") else "plain"


def table(times: dict, mems: dict | None, models, sizes, kinds=None) -> str:
    kinds = kinds or KINDS
    lines = ["| model | b | " + " | ".join(kinds) + " |",
             "|---|---|" + "---|" * len(kinds)]
    for m in models:
        for b in sizes:
            cells = []
            for k in kinds:
                t = times[(m, b, k)]
                ref = times[(m, b, reference(k))]
                cell = (f"{min(t) * 1e3:.2f} ms" if k == "plain"
                        else f"{statistics.median(a / r for a, r in zip(t, ref)):.2f}×")
                if mems is not None:
                    mref = mems[(m, b, reference(k))]
                    mem = mems[(m, b, k)]
                    cell += (f" / {mem / 1024:.1f} MB" if k == "plain"
                             else f" / {mem / max(mref, 1):.2f}×")
                cells.append(cell)
            lines.append(f"| {m} | {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: Each statistics column and the floor columns it is compared with (issue #15, item 8): the
#: least arithmetic of the same statistic, and the floor the issue named when it was filed
#: ("norm and coord against floor, ip/aip against ip floor, micro against micro floor").
FLOORS = {"norm": ("norm-floor", "floor"), "ip": ("ip-floor",),
          "aip": ("aip-floor", "ip-floor"), "coord": ("coord-floor", "floor"),
          "micro-hooks": ("micro-floor",)}


def gap_table(times: dict, models, sizes, kinds) -> str:
    """How far each statistics column is above its floor columns (:data:`FLOORS`): per
    round, (t_kind − t_floor) / t_ref (:func:`reference`: ``plain`` or ``plain×4``), paired
    within the round like the ratios; each cell is the median over the rounds, in units of
    the plain step (``+0.06×``: 6 % of a plain step slower than the floor)."""
    pairs = [(k, f) for k, floors in FLOORS.items() for f in floors
             if k in kinds and f in kinds]
    if not pairs:
        return ""
    lines = ["| model | b | " + " | ".join(f"{k} − {f}" for k, f in pairs) + " |",
             "|---|---|" + "---|" * len(pairs)]
    for m in models:
        for b in sizes:
            cells = []
            for k, f in pairs:
                ref = times[(m, b, reference(k))]
                gaps = [(a - c) / r for a, c, r in zip(times[(m, b, k)], times[(m, b, f)], ref)]
                cells.append(f"{statistics.median(gaps):+.2f}×")
            lines.append(f"| {m} | {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def test_overhead_smoke():
    """Every configuration runs and yields finite statistics (no timing asserted)."""
    torch.manual_seed(0)
    for model in ("cnn", "mlp"):
        for kind in KINDS + EXTRA_KINDS:
            out = make_step(model, 8, kind)()
            if kind == "micro-floor":
                assert out > 0
            elif kind in NEEDS or kind.startswith("micro"):
                assert out.is_finite() and out.batch_size == 8
            elif kind == "vmap":
                assert all(v > 0 for v in out)
            elif kind == "backpack":
                assert out[0] > 0 and out[1] > 0
            elif kind == "floor":
                assert out > 0
            elif kind == "ip-floor":
                check_ip_floor(model)
            elif kind == "aip-floor":
                assert all(v > 0 for v in out)
                check_aip_floor(model)
            elif kind in ("norm-floor", "coord-floor"):
                assert out[0] > 0 and (out[1] > 0 or out[2])
                check_stat_floors(model)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--warm", type=int, default=1,
                    help="untimed steps of a configuration before its timed steps in each "
                    "round (0: time the first step after another configuration ran)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu",
                    help="where the steps run: cpu (default) or cuda[:N] (times synchronise "
                    "the device; peak memory is CUDA memory allocated)")
    ap.add_argument("--no-mem", action="store_true")
    ap.add_argument("--mem-one", nargs=3, metavar=("MODEL", "B", "KIND"))
    ap.add_argument("--models", default="cnn,mlp", help="comma-separated: cnn, mlp")
    ap.add_argument("--sizes", default=None, help="comma-separated batch sizes")
    ap.add_argument("--kinds", default=None,
                    help="comma-separated subset of " + ",".join(KINDS) + " (plain and "
                    "plain×4 are always added: the ratios need them)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="time with glibc's default malloc settings (the default is "
                    "adabatch.keep_freed_memory(), as adabatch train does on CPU)")
    ap.add_argument("--baseline", default=None, metavar="DIR",
                    help="also time <kind>@base for the PerSampleStats/MicroBatchStats kinds, "
                    "with the estimators loaded from the adabatch checkout (or src folder) "
                    "in DIR, e.g. git worktree add /tmp/base REV")
    return ap


def main() -> None:
    args = _parser().parse_args()
    device = check_device(args.device)
    if args.baseline:
        _load_baseline(args.baseline)
    if args.mem_one:
        m, b, k = args.mem_one
        print(mem_one(m, int(b), k))
        return
    # after --mem-one: the memory subprocesses keep their MALLOC_MMAP_THRESHOLD_ (live tensors)
    malloc = "glibc defaults" if args.default_malloc else (
        "keep_freed_memory()" if keep_freed_memory() else "defaults (no glibc)")
    torch.set_num_threads(args.threads)
    models = args.models.split(",")
    sizes = ([int(v) for v in args.sizes.split(",")] if args.sizes
             else [32, 128] if args.quick else [32, 128, 512])
    kinds = [k for k in KINDS + EXTRA_KINDS
             if (k in KINDS if args.kinds is None else k in args.kinds.split(","))
             or k in ("plain", "plain×4")]
    if args.baseline:
        kinds += [k + "@base" for k in kinds if k in NEEDS or k in ("micro", "micro-hooks")]
    if "backpack" in kinds:
        check_backpack()
    elif not HAVE_BACKPACK:
        print("BackPACK not installed: no backpack column (see the module docstring)",
              flush=True)
    rounds = args.rounds or (5 if args.quick else 20)
    times = time_all(models, sizes, rounds, args.reps, kinds=kinds, warm=args.warm,
                     device=device)
    print(table(times, None, models, sizes, kinds), flush=True)
    mems = None if args.no_mem else mem_all(models, sizes, kinds, device)
    print(f"torch {torch.__version__}, {describe(device)}, {args.threads} threads, "
          f"{rounds} rounds × "
          f"({args.warm} untimed + {args.reps} timed) steps, malloc: {malloc}; cells: "
          f"median per-round time ratio / "
          f"peak-memory ratio to plain (micro: to plain×4); plain: best round")
    print(table(times, mems, models, sizes, kinds))
    gaps = gap_table(times, models, sizes, kinds)
    if gaps:
        print("\nAbove the floors (median over rounds of (kind − floor) / plain, paired "
              "within each round):\n" + gaps)


def check_device(name: str) -> str:
    """``--device``: a device torch can run the steps on, else exit with the reason."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise SystemExit(f"--device {name}: not a torch device ({e})") from None
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"--device {name}: the benchmark runs on cpu or cuda, "
                         f"not {device.type}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available here (torch "
                         f"{torch.__version__}, CUDA build: {torch.version.cuda})")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise SystemExit(f"--device {name}: this machine has {torch.cuda.device_count()} "
                         f"CUDA device(s)")
    return str(device)


def describe(device: str) -> str:
    """The device, in words, for the table's caption."""
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return "CPU"


def _load_baseline(path: str) -> None:
    """Load the baseline estimators into :data:`BASE` from another source tree of adabatch:
    ``path`` is a checkout (``git worktree add /tmp/base REV``) or its ``src`` folder.

    The tree is imported as ``adabatch`` with the current package's modules set aside in
    ``sys.modules``, then those are put back: the baseline classes keep their own modules
    (their globals), so both versions run side by side in one process. An import done
    inside a baseline function at call time would get the current module (none of the
    estimators' hot paths import lazily)."""
    src = os.path.join(path, "src") if os.path.isdir(os.path.join(path, "src")) else path
    if not os.path.isfile(os.path.join(src, "adabatch", "__init__.py")):
        raise SystemExit(f"--baseline {path}: no adabatch package there (give a checkout "
                         f"or its src folder)")
    BASE_DIR[:] = [path]
    ours = {k: v for k, v in sys.modules.items() if k == "adabatch" or k.startswith("adabatch.")}
    for k in ours:
        del sys.modules[k]
    sys.path.insert(0, src)
    try:
        import adabatch.batching.estimators as base

        BASE["PerSampleStats"] = base.PerSampleStats
        BASE["MicroBatchStats"] = base.MicroBatchStats
    finally:
        sys.path.remove(src)
        for k in [k for k in sys.modules if k == "adabatch" or k.startswith("adabatch.")]:
            del sys.modules[k]
        sys.modules.update(ours)


if __name__ == "__main__":
    main()
