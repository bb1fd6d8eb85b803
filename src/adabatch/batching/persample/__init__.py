"""Exact per-sample gradient statistics from one ordinary backward pass.

:class:`PerSampleStats` measures the statistics of :mod:`adabatch.batching.stats` over the
samples of a step's batch without materialising b × model-size memory. It hooks the layers
that own parameters, keeps their inputs a and output gradients δ (the gradient of the loss
with respect to the layer output), and computes per layer:

- Linear (inputs [b, in] or sequences [b, T..., in]): the per-sample weight gradient is
  g_i = Σ_t δ_it a_itᵀ. Without a sequence axis it is an outer product, so
  ‖g_i‖² = ‖a_i‖²‖δ_i‖² and Σ_i g_i² = (δ²)ᵀ(a²) elementwise. With a sequence axis the
  cheaper of materialising g_i (chunked over samples) and the "ghost" product
  ‖g_i‖² = Σ_{t,s} (a_it·a_is)(δ_it·δ_is) is used (cost L·in·out against L²·(in+out)).
- Conv1d/2d/3d (any stride, padding and padding mode, dilation, groups): the same with the
  unfolded input (im2col) as a and the output positions as the sequence axis.
- Embedding: g_i adds δ_it to row idx_it; the rows a sample touches are summed sparsely
  (torch.unique over (sample, row) keys), never a b × vocab × dim tensor.
- LayerNorm / GroupNorm / RMSNorm (affine): g_i = Σ δ_i ⊙ x̂_i over the positions that share
  a parameter, with x̂ recomputed from the saved input; always materialised (small).
- transformers' Conv1D (GPT-2): a Linear with its weight stored transposed.
- Any other module with its own trainable parameters (a custom module with a raw
  nn.Parameter, ...): per-sample vector-Jacobian products with
  ``torch.func.vmap(grad(...))`` of that module alone, chunked over samples. The module must
  treat dimension 0 of its tensor inputs and outputs as the batch and be deterministic: the
  recomputation is checked against the outputs of the pass (and an active dropout module
  inside raises before), so a module that breaks this raises naming it.
- MultiheadAttention (F.multi_head_attention_forward uses out_proj's weight without calling
  out_proj) and the transformer layers, stacks (TransformerEncoder / Decoder) and
  nn.Transformer with ``batch_first=False``: the same,
  over the parameters of the whole module (its submodules get no hooks), with the batch along
  dimension 1 where it is, key padding masks and 3-D attention masks split by sample.
- Embedding calls whose indices are shared by the samples (``pos(torch.arange(T))``, position
  ids [1, T]): the output is returned with the batch dimension as an expanded view, so the
  broadcast against the batch-first activations happens at the layer and its output gradient
  arrives per sample.

Inner products with the mean gradient ḡ need ḡ, which is only known after the last backward
(after DDP's all-reduce, after every accumulation micro-batch), so they are computed in
:meth:`PerSampleStats.stats`: for each layer either from the stored per-sample gradient (when
that is smaller than the layer's input and output gradient) or as "the layer's forward with ḡ
as its weight": ⟨g_i, ḡ_W⟩ = Σ δ_i ⊙ f(a_i; ḡ_W), for a layer f linear in its weight (for
Linear and Conv layers weight and bias together: Σ δ_i ⊙ f(a_i; ḡ_W, ḡ_b)). A convolution
keeps its per-sample gradients for this only when the fused backward (``fuse_conv_grad``)
computes them anyway, for norms or coordinates; for inner products alone the direct form
costs the same multiply-adds and keeps nothing.
One exception: a Linear on [b, in] inputs whose p.grad will be this one pass's gradient of
this call (a single pass, no reduce, no gradient before, no gradient hook on the parameter)
takes ⟨g_i, ḡ⟩ = Σ_j (δ_i·δ_j)(a_i·a_j + [bias]) in its backward hook when that Gram form is
cheaper (b·(in + out) < in·out); a second pass makes :meth:`PerSampleStats.stats` fall back to
the direct form.

Scaling contract. The losses of one step's backward passes must add up to the mean of the
per-sample losses over all N samples of the step (on this process): one pass with a
mean-reduced loss, or micro-batches k of n_k samples with ``loss_k = mean_loss_k * n_k / N``.
Then p.grad is ḡ and every captured contribution is g_i / N, whatever the micro-batch sizes.

Shared (tied) parameters: a parameter used by several module calls in one pass (an
embedding tied to the output layer, a module called twice) has per-sample gradient equal to the
sum of the uses, so its norms and per-coordinate sums are computed from that sum, materialised
chunk by chunk over samples after the backward pass (memory: chunk × parameter size). Its inner
products are linear in g_i and are taken use by use.

Limits (documented, not silent where detectable): a parameter used outside a module call
(``F.linear(x, self.emb.weight)``) cannot be attributed to samples; if it is used only so, the
estimator raises in :meth:`~PerSampleStats.stats` (``exclude=`` leaves such a parameter out).
Modules must take batch-first inputs (checked through the batch size only: every hooked call
of a pass must see the same one, so a Linear on [T, b, in] with T = b is not detected; the
modules measured as a whole above are the exception). The output of an Embedding with shared
indices must be used by broadcasting against batch-first activations of its expanded rank
(``x + pos``, not ``pos[None]``, which then has the wrong rank and usually fails). Layers that
mix samples (BatchNorm in training mode) raise a :class:`ValueError`.

Modules: ``records`` (the kept layer calls, the per-parameter sums, the inner-product work
items, :class:`PerSampleTuning`), ``layers`` and ``conv`` (the rule of each layer type),
``fused_conv`` (``fuse_conv_grad``), ``estimator`` (:class:`PerSampleStats`: hooks and
bookkeeping).
"""

from __future__ import annotations

from adabatch.batching.persample.estimator import DEFAULT_BUDGET, PerSampleStats
from adabatch.batching.persample.records import PerSampleTuning

__all__ = ["DEFAULT_BUDGET", "PerSampleStats", "PerSampleTuning"]
