"""How :class:`~adabatch.batching.stats.GradientStats` are measured.

- :class:`PerSampleStats` (package :mod:`adabatch.batching.persample`): exact statistics over
  the samples of a step from the layer inputs and output gradients that one ordinary backward
  pass already has (hooks), without b × model-size memory; chunked ``torch.func`` for layers
  without a dedicated rule.
- :class:`MicroBatchStats` (module :mod:`adabatch.batching._microbatch`): unbiased estimates
  from the M ≥ 2 micro-batch (or per-rank) gradients that gradient accumulation already
  computes; running sums, no extra backward pass, O(model) memory.

Both share the loss-scaling contract of gradient accumulation: the losses of one step's
backward passes add up to the mean per-sample loss over the step's N samples
(``loss_k = mean_loss_k * n_k / N``), so that p.grad is the mean gradient ḡ. Both expose
``.params`` (aligned with ``mean_grad`` and ``coord_variance``) and take an optional
``reduce(flat) -> flat`` (a SUM all-reduce across processes) that they call once per step on
a small float64 tensor of partial sums, plus once on the per-coordinate sums only when
``coord_variance`` is requested.
"""

from __future__ import annotations

from adabatch.batching._microbatch import MicroBatchStats
from adabatch.batching.persample import DEFAULT_BUDGET, PerSampleStats, PerSampleTuning

__all__ = ["DEFAULT_BUDGET", "MicroBatchStats", "PerSampleStats", "PerSampleTuning"]
