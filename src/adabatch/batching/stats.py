"""GradientStats: what an adaptive batch-size test needs, measured once per step.

At step k, with per-sample gradients g_1..g_b at the same parameters x_k and their mean
ḡ = (1/b) Σ_i g_i (the gradient the optimizer steps with):

- ``grad_sq_norm``     G = ‖ḡ‖²
- ``variance_trace``   V = (1/(b-1)) Σ_i ‖g_i − ḡ‖² = (Σ_i ‖g_i‖² − b·G)/(b−1)
- ``coord_variance``   v_j = (1/(b-1)) Σ_i (g_ij − ḡ_j)², one tensor per parameter
- ``ip_variance``      W = (1/(b-1)) Σ_i (⟨g_i, ḡ⟩ − G)², the inner product taken over the
  whole parameter vector (all tensors together), not per tensor
- ``orth_variance``    O = (1/(b-1)) Σ_i ‖g_i − (⟨g_i,ḡ⟩/G)·ḡ‖²
- ``mean_grad``        ḡ, one tensor per parameter

Every variance is on the scale of *one sample's* gradient. An estimator that measures the
variance of means of m samples (the micro-batch estimator) multiplies by m, so the tests can
always compare V/b with η²G, whatever the estimator.

Fields that were not requested (see :data:`STAT_NAMES` and the tests' ``needs``) are None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

#: Names of the statistics a test can ask for.
STAT_NAMES: frozenset[str] = frozenset(
    {"grad_sq_norm", "variance_trace", "coord_variance", "ip_variance", "orth_variance",
     "mean_grad"}
)


def check_needs(needs: frozenset[str] | set[str] | tuple[str, ...] | list[str]) -> frozenset[str]:
    """Validate a set of statistic names and return it as a frozenset."""
    needs = frozenset(needs)
    unknown = needs - STAT_NAMES
    if unknown:
        raise ValueError(
            f"unknown statistics {sorted(unknown)}; choose from {sorted(STAT_NAMES)}"
        )
    return needs


@dataclass
class GradientStats:
    """Gradient statistics of one step's batch (see the module docstring for definitions).

    Attributes:
        batch_size: b, the number of samples the mean gradient is over.
        grad_sq_norm: G = ‖ḡ‖².
        variance_trace: V, trace of the per-sample gradient covariance.
        coord_variance: v_j per coordinate, one tensor per parameter (same shapes).
        ip_variance: W, variance of ⟨g_i, ḡ⟩.
        orth_variance: O, variance of the part of g_i orthogonal to ḡ.
        mean_grad: ḡ, one tensor per parameter.
    """

    batch_size: int
    grad_sq_norm: float | None = None
    variance_trace: float | None = None
    coord_variance: list[Tensor] | None = None
    ip_variance: float | None = None
    orth_variance: float | None = None
    mean_grad: list[Tensor] | None = field(default=None, repr=False)

    def is_finite(self) -> bool:
        """True when every present statistic is finite (tensors: every element)."""
        for name in ("grad_sq_norm", "variance_trace", "ip_variance", "orth_variance"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                return False
        for name in ("coord_variance", "mean_grad"):
            tensors = getattr(self, name)
            if tensors is not None and not all(bool(torch.isfinite(t).all()) for t in tensors):
                return False
        return True
