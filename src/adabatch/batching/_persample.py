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
- Any other module with its own trainable parameters (a custom module with a raw
  nn.Parameter, MultiheadAttention, ...): per-sample vector-Jacobian products with
  ``torch.func.vmap(grad(...))`` of that module alone, chunked over samples. The module must
  treat dimension 0 of its tensor inputs and outputs as the batch and be deterministic
  (no dropout inside it).

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
estimator raises in :meth:`~PerSampleStats.stats`. Modules must take batch-first inputs
(checked: every hooked call of a pass must see the same batch size). Layers that mix samples
(BatchNorm in training mode) raise a :class:`ValueError`.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_flatten, tree_unflatten

from adabatch.batching.protocol import StepScope
from adabatch.batching.stats import (
    STAT_NAMES,
    GradientStats,
    Reduce,
    check_needs,
    finish_stats,
    read_f64,
    sq_norm_parts,
    stack_f64,
    stats_from_sums,
)

#: Default bound on the number of elements of one temporary tensor (per chunk of samples).
DEFAULT_BUDGET = 2**20
#: Convolutions with at most this many input channels per group take per-sample weight
#: gradients by im2col + batched matmul (see :meth:`_ConvHandler._im2col`).
_IM2COL_MAX_CIN = 4
#: At most this many samples per grouped weight-gradient convolution: on one development
#: machine the backend slowed down sharply beyond (2 threads, 16 -> 32 channels, 5x5 on 14x14,
#: b = 128: 4.2 ms in chunks of 16 or 32, 9.0 ms in chunks of 64, against 2.9 ms for the batch
#: weight gradient); on a later one chunks of 16-128 were within ±0.15x of each other
#: (benchmarks/conv_weight_grads.py).
_GROUPED_MAX_CHUNK = 32


_NORM_STATS = frozenset({"variance_trace", "orth_variance"})
_IP_STATS = frozenset({"ip_variance", "orth_variance"})


class _Record:
    """One call of a hooked module during one measured pass."""

    __slots__ = ("bsum", "deltas", "done", "fuse", "handler", "inputs", "kwargs", "module", "n",
                 "names", "pending", "wsum")

    def __init__(self, module: nn.Module, handler: _Handler, inputs: tuple, kwargs: dict,
                 n: int, n_outputs: int) -> None:
        self.module = module
        self.handler = handler
        self.inputs = inputs
        self.kwargs = kwargs
        self.n = n
        self.names = handler.names
        self.deltas: list[Tensor | None] = [None] * n_outputs
        self.pending = n_outputs
        self.done = False
        self.fuse = False  # the call ran through _FusedConv: the batch weight gradient is
        self.wsum: Tensor | None = None  # Σ_i of the per-sample weight gradients, if computed
        self.bsum: Tensor | None = None  # and of the bias gradients


def _chunks(n: int, per_sample: int, budget: int, chunk_size: int | None,
            cap: int | None = None) -> Iterator[tuple[int, int]]:
    step = chunk_size if chunk_size is not None else max(1, budget // max(1, per_sample))
    if cap is not None and chunk_size is None:
        step = min(step, cap)
    if chunk_size is None and n > step:  # equal chunks: no small tail chunk (fixed costs)
        step = -(-n // -(-n // step))
    for lo in range(0, n, step):
        yield lo, min(n, lo + step)


class _Handler:
    """Per-sample gradient arithmetic for one module type (base: generic chunked path)."""

    def __init__(self, module: nn.Module, names: tuple[str, ...]) -> None:
        self.module = module
        self.names = names
        self.pids = tuple(id(getattr(module, nm)) for nm in names)

    def param(self, name: str) -> Tensor:
        return getattr(self.module, name)

    # --- to override -------------------------------------------------------------------
    def grads(self, rec: _Record, names: tuple[str, ...], lo: int, hi: int) -> dict[str, Tensor]:
        """Per-sample contributions [hi-lo, *shape] of samples lo:hi for each name."""
        raise NotImplementedError

    def sample_numel(self, rec: _Record, names: tuple[str, ...]) -> int:
        """Elements per sample of the temporaries of :meth:`grads` (for chunking)."""
        return sum(self.param(nm).numel() for nm in names)

    def max_chunk(self) -> int | None:
        """An upper bound on the samples per chunk of :meth:`grads` (None: the budget's)."""
        return None

    def kept_numel(self, rec: _Record) -> int:
        """Elements per sample that keeping the record for a later inner product costs."""
        total = 0
        for t in tree_flatten((rec.inputs, rec.deltas))[0]:
            if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == rec.n:
                total += t[0].numel()
        return total

    def ip(self, rec: _Record, name: str, gbar: Tensor, est: PerSampleStats) -> Tensor:
        """⟨contribution_i, ḡ⟩ for every sample i: a tensor [n]."""
        out = []
        for lo, hi in _chunks(rec.n, self.sample_numel(rec, (name,)), est.budget,
                              est.chunk_size):
            g = self.grads(rec, (name,), lo, hi)[name]
            out.append(g.reshape(hi - lo, -1) @ gbar.reshape(-1).to(g.dtype))
        return torch.cat(out)

    # --- generic driver ------------------------------------------------------------------
    def process(self, rec: _Record, names: tuple[str, ...], est: PerSampleStats,
                need_norm: bool, need_coord: bool,
                store: set[str]) -> dict[str, tuple[Tensor | None, Tensor | None,
                                                    list[Tensor] | None]]:
        """Norm sum, coordinate sums and (for names in ``store``) the materialised per-sample
        gradients, as chunks [hi - lo, numel].

        With ``rec.fuse`` the per-sample weight (and bias) gradients are also summed into
        ``rec.wsum`` (``rec.bsum``), which then serve as the batch gradients
        (:class:`_FusedConv`)."""
        fuse = rec.fuse and "weight" in names and (need_norm or need_coord or "weight" in store)
        if not (need_norm or need_coord or store or fuse):
            return {nm: (None, None, None) for nm in names}  # nothing to measure here
        acc: dict[str, list[Any]] = {nm: [None, None, []] for nm in names}
        wsum = bsum = None
        for lo, hi in _chunks(rec.n, self.sample_numel(rec, names), est.budget,
                              est.chunk_size, self.max_chunk()):
            grads = self.grads(rec, names, lo, hi)
            for nm in names:
                g = grads[nm]
                _accumulate(acc[nm], g, need_norm, need_coord, nm in store)
            if fuse:
                part = grads["weight"].sum(0)
                wsum = part if wsum is None else wsum.add_(part)
                if "bias" in grads:
                    part = grads["bias"].sum(0)
                    bsum = part if bsum is None else bsum.add_(part)
        if fuse:
            rec.wsum, rec.bsum = wsum, bsum
        return {nm: _finish(a) for nm, a in acc.items()}


def _accumulate(a: list[Any], g: Tensor, need_norm: bool, need_coord: bool, keep: bool) -> None:
    if need_coord:
        sq = g.square()
        c = sq.sum(0)
        a[1] = c if a[1] is None else a[1].add_(c)
        if need_norm:
            s = sq.sum(dtype=torch.float64)
            a[0] = s if a[0] is None else a[0] + s
    elif need_norm:
        flat = g.reshape(-1)
        s = torch.dot(flat, flat).double()
        a[0] = s if a[0] is None else a[0] + s
    if keep:
        a[2].append(g.reshape(g.shape[0], -1))


def _finish(a: list[Any]) -> tuple[Tensor | None, Tensor | None, list[Tensor] | None]:
    return a[0], a[1], (a[2] or None)


def _ghost_sq_norm(U: Tensor, D: Tensor) -> Tensor:
    """Σ_i ‖D_i U_iᵀ‖² from U [B, I, L] and D [B, O, L] via L × L Gram matrices."""
    gu = torch.bmm(U.transpose(1, 2), U)
    gd = torch.bmm(D.transpose(1, 2), D)
    return (gu * gd).sum(dtype=torch.float64)


def _chunked_ghost_norm(rec: _Record, est: Any, per: int,
                        pair: Callable[[int, int], tuple[Tensor, Tensor]]) -> Tensor:
    """Σ_i ‖g_i‖² of one weight by ghost products, over chunks of samples that keep ``per``
    elements per sample within the estimator's memory budget; ``pair(lo, hi)`` gives the
    (U, D) factors of samples lo..hi for :func:`_ghost_sq_norm`."""
    norm = torch.zeros((), dtype=torch.float64, device=rec.inputs[0].device)
    for lo, hi in _chunks(rec.n, per, est.budget, est.chunk_size):
        norm += _ghost_sq_norm(*pair(lo, hi))
    return norm

class _LinearHandler(_Handler):
    """nn.Linear over [b, in] or [b, T..., in]."""

    def _AD(self, rec: _Record, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        a, d = rec.inputs[0], rec.deltas[0]
        assert d is not None
        return (a[lo:hi].reshape(hi - lo, -1, a.shape[-1]),
                d[lo:hi].reshape(hi - lo, -1, d.shape[-1]))

    def grads(self, rec: _Record, names: tuple[str, ...], lo: int, hi: int) -> dict[str, Tensor]:
        A, D = self._AD(rec, lo, hi)
        out = {}
        if "weight" in names:
            out["weight"] = torch.bmm(D.transpose(1, 2), A)
        if "bias" in names:
            out["bias"] = D.sum(1)
        return out

    def _length(self, rec: _Record) -> int:
        a = rec.inputs[0]
        return a[0].numel() // a.shape[-1]

    def sample_numel(self, rec: _Record, names: tuple[str, ...]) -> int:
        a, d = rec.inputs[0], rec.deltas[0]
        total = d[0].numel() if d is not None else 0
        if "weight" in names:
            total += a[0].numel() + self.module.weight.numel()
        return total

    def process(self, rec, names, est, need_norm, need_coord, store):  # type: ignore[override]
        result: dict[str, tuple[Tensor | None, Tensor | None, Tensor | None]] = {}
        a = rec.inputs[0]
        if (a.dim() == 2 and not need_coord and "weight" in names and "weight" not in store
                and set(names) <= {"weight", "bias"}):
            # Fast path (no sequence axis, norms only): Σ_i ‖δ_i‖²(‖a_i‖² + [bias]) in one
            # dot product for weight and bias together, without n × in temporaries.
            D = rec.deltas[0]
            assert D is not None
            norm = None
            if need_norm:
                # inputs and output gradients may differ in dtype under autocast: reduce
                # both in their common type, at least float32
                dt = torch.promote_types(torch.promote_types(a.dtype, D.dtype), torch.float32)
                na = torch.linalg.vector_norm(a, dim=1, dtype=dt).square_()
                if "bias" in names:
                    na.add_(1.0)
                nd = torch.linalg.vector_norm(D, dim=1, dtype=dt)
                norm = torch.dot(na, nd.square_())
            result["weight"] = (norm, None, None)
            if "bias" in names:
                result["bias"] = (None, None, [D] if "bias" in store else None)
            return result
        rest = tuple(nm for nm in names if nm != "weight")
        dsq = None  # δ² of a layer without a sequence axis, shared by bias and weight
        if rest == ("bias",):
            _, D = self._AD(rec, 0, rec.n)
            Db = D[:, 0] if D.shape[1] == 1 else D.sum(1)
            norm = torch.dot(Db.reshape(-1), Db.reshape(-1)).double() if need_norm else None
            coord = None
            if need_coord:
                sq = Db.square()
                coord = sq.sum(0)
                if D.shape[1] == 1:
                    dsq = sq
            result["bias"] = (norm, coord, [Db] if "bias" in store else None)
            rest = ()
        if "weight" in names:
            L = self._length(rec)
            out_f, in_f = self.module.weight.shape
            if L == 1 and "weight" not in store:
                A, D = self._AD(rec, 0, rec.n)
                A, D = A[:, 0], D[:, 0]
                norm = coord = None
                if need_norm:  # Σ_i ‖a_i‖²‖δ_i‖², without an n × in temporary
                    prod = torch.linalg.vector_norm(A, dim=1) * torch.linalg.vector_norm(D, dim=1)
                    norm = torch.dot(prod, prod).double()
                if need_coord:
                    coord = (D.square() if dsq is None else dsq).T @ A.square()
                result["weight"] = (norm, coord, None)
            elif (not need_coord and "weight" not in store
                  and L * (in_f + out_f) < in_f * out_f):
                norm = None
                if need_norm:
                    norm = _chunked_ghost_norm(
                        rec, est, L * (L + in_f + out_f),
                        lambda lo, hi: tuple(t.transpose(1, 2) for t in self._AD(rec, lo, hi)))
                result["weight"] = (norm, None, None)
            else:
                rest = (*rest, "weight")
        if rest:
            result.update(super().process(rec, rest, est, need_norm, need_coord, store))
        return result

    def ip(self, rec, name, gbar, est):  # type: ignore[override]
        if name == "bias":
            _, D = self._AD(rec, 0, rec.n)
            return D.sum(1) @ gbar.to(D.dtype)
        return self.ip_wb(rec, gbar, None, est)

    def ip_wb(self, rec: _Record, gw: Tensor, gb: Tensor | None,
              est: PerSampleStats) -> Tensor:
        """⟨g_i, ḡ⟩ over the weight and (unless ``gb`` is None) the bias together:
        Σ_t δ_it · (ḡ_W a_it + ḡ_b), one addmm per chunk."""
        a, d = rec.inputs[0], rec.deltas[0]
        assert d is not None
        per = a[0].numel() + 2 * d[0].numel()
        bias = None if gb is None else gb.to(a.dtype)
        if a.dim() == 2 and est.chunk_size is None and rec.n * per <= est.budget:
            return (d * F.linear(a, gw.to(a.dtype), bias)).sum(1)  # the common case, in one
        out = []
        for lo, hi in _chunks(rec.n, per, est.budget, est.chunk_size):
            A, D = self._AD(rec, lo, hi)
            out.append((D * F.linear(A, gw.to(A.dtype), bias)).sum((1, 2)))
        return out[0] if len(out) == 1 else torch.cat(out)


class _ConvHandler(_Handler):
    """nn.Conv1d / Conv2d / Conv3d with any stride, padding, dilation and groups."""

    def __init__(self, module: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__(module, names)
        self.dims = module.weight.dim() - 2
        self._ws: Tensor | None = None

    def unfold(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """im2col: [c, C_in, *spatial] -> [c, C_in·Πk, L], ordered like the weight.

        A strided view of the padded input (Tensor.unfold per spatial axis) copied once into
        ``out`` (a flat buffer of at least as many elements, any dtype: the copy casts) or
        into a new tensor; F.unfold is several times slower on CPU."""
        m = self.module
        pad = m._reversed_padding_repeated_twice
        if any(pad):
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, pad, mode=mode)
        c, C = x.shape[:2]
        nd = self.dims
        for i in range(nd):
            k, dil, s = m.kernel_size[i], m.dilation[i], m.stride[i]
            x = x.unfold(2 + i, (k - 1) * dil + 1, s)
        if any(dd != 1 for dd in m.dilation):
            x = x[(..., *(slice(None, None, dd) for dd in m.dilation))]
        # [c, C, L_1..L_nd, k_1..k_nd] -> [c, C, k_1..k_nd, L_1..L_nd]
        x = x.permute(0, 1, *range(2 + nd, 2 + 2 * nd), *range(2, 2 + nd))
        rows = C * math.prod(m.kernel_size)
        if out is None:
            return x.reshape(c, rows, -1)
        view = out[:x.numel()].view(x.shape)
        view.copy_(x)
        return view.view(c, rows, -1)

    def _workspace(self, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A flat buffer kept across steps for the im2col copy (no page faults per step)."""
        ws = self._ws
        if ws is None or ws.numel() < numel or ws.dtype != dtype or ws.device != device:
            ws = self._ws = torch.empty(numel, dtype=dtype, device=device)
        return ws

    def _im2col(self) -> bool:
        """Per-sample weight gradients by im2col + batched matmul rather than one grouped
        convolution: faster on CPU for few input channels per group (2 threads, b = 128:
        1.3 ms against 4.9 ms for 1 -> 16 channels, 5x5 on 28x28; the grouped call wins
        from about 8 channels)."""
        m = self.module
        return m.in_channels // m.groups <= _IM2COL_MAX_CIN

    def max_chunk(self) -> int | None:
        return None if self._im2col() else _GROUPED_MAX_CHUNK

    def _UD(self, rec: _Record, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        """Unfolded input [c·g, I, L] and output gradient [c·g, O, L] per group."""
        g = self.module.groups
        c = hi - lo
        U = self.unfold(rec.inputs[0][lo:hi])
        D = rec.deltas[0][lo:hi].reshape(c, self.module.out_channels, -1)  # type: ignore[index]
        return U.reshape(c * g, -1, U.shape[-1]), D.reshape(c * g, -1, D.shape[-1])

    def grads(self, rec: _Record, names: tuple[str, ...], lo: int, hi: int) -> dict[str, Tensor]:
        out = {}
        c = hi - lo
        d = rec.deltas[0][lo:hi]  # type: ignore[index]
        gb = None
        if "weight" in names:
            out["weight"], gb = self._weight_grads(rec.inputs[0][lo:hi], d, "bias" in names)
        if "bias" in names:
            out["bias"] = gb if gb is not None else d.reshape(c, d.shape[1], -1).sum(-1)
        return out

    def _weight_grads(self, x: Tensor, d: Tensor,
                      bias: bool = False) -> tuple[Tensor, Tensor | None]:
        """Per-sample weight gradients [c, *weight.shape]: by im2col (into the kept workspace)
        and a batched matmul for few input channels (:meth:`_im2col`), else the weight
        gradient of one grouped convolution whose groups are the samples (the backend's
        weight-gradient kernel; no im2col copy), which with ``bias`` also gives the per-sample
        bias gradients [c, C_out] from the same pass over d (else None)."""
        m = self.module
        c = x.shape[0]
        if self._im2col():
            dt = torch.promote_types(x.dtype, d.dtype)
            ws = self._workspace(c * m.in_channels * math.prod(m.kernel_size)
                                 * d[0, 0].numel(), dt, x.device)
            U = self.unfold(x, ws)
            U = U.view(c * m.groups, -1, U.shape[-1])  # [c·g, I, L]
            D = d.reshape(c * m.groups, -1, U.shape[-1]).to(dt)  # [c·g, O, L]
            return torch.bmm(D, U.transpose(1, 2)).view(c, *m.weight.shape), None
        if isinstance(m.padding, str) or m.padding_mode != "zeros":
            pad = m._reversed_padding_repeated_twice
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, pad, mode=mode)
            padding = [0] * self.dims
        else:
            padding = list(m.padding)
        w = m.weight
        xin = x.reshape(1, c * x.shape[1], *x.shape[2:])
        go = d.reshape(1, c * d.shape[1], *d.shape[2:])
        wshape = (c * w.shape[0], *w.shape[1:])
        _, gw, gb = torch.ops.aten.convolution_backward(
            go, xin, w.new_empty(wshape), [c * w.shape[0]] if bias else None, list(m.stride),
            padding, list(m.dilation), False, [0] * self.dims, c * m.groups,
            [False, True, bias])
        return gw.reshape(c, *w.shape), (gb.view(c, w.shape[0]) if bias else None)

    def _sizes(self, rec: _Record) -> tuple[int, int, int]:
        m = self.module
        d = rec.deltas[0] if rec.deltas[0] is not None else None
        L = d[0, 0].numel() if d is not None else 1
        I = m.weight[0].numel()
        O = m.out_channels // m.groups
        return L, I, O

    def sample_numel(self, rec: _Record, names: tuple[str, ...]) -> int:
        L, I, O = self._sizes(rec)
        g = self.module.groups
        total = self.module.out_channels * L
        if "weight" in names:
            total += g * O * I + 2 * rec.inputs[0][0].numel()
            if self._im2col():
                total += g * I * L
        return total

    def process(self, rec, names, est, need_norm, need_coord, store):  # type: ignore[override]
        result = {}
        rest = tuple(nm for nm in names if nm != "weight")
        if "weight" in names:
            L, I, O = self._sizes(rec)
            if not need_coord and "weight" not in store and L * (I + O) < I * O:
                norm = None
                if need_norm:
                    per = self.module.groups * (I * L + 2 * L * L) + rec.inputs[0][0].numel()
                    norm = _chunked_ghost_norm(rec, est, per,
                                               lambda lo, hi: self._UD(rec, lo, hi))
                result["weight"] = (norm, None, None)
            else:
                rest = (*rest, "weight")
        if rest:
            result.update(super().process(rec, rest, est, need_norm, need_coord, store))
        return result

    def ip(self, rec, name, gbar, est):  # type: ignore[override]
        d = rec.deltas[0]
        assert d is not None
        if name == "bias":
            return d.reshape(rec.n, d.shape[1], -1).sum(-1) @ gbar.to(d.dtype)
        return self.ip_wb(rec, gbar, None, est)

    def ip_wb(self, rec: _Record, gw: Tensor, gb: Tensor | None,
              est: PerSampleStats) -> Tensor:
        """⟨g_i, ḡ⟩ over the weight and (unless ``gb`` is None) the bias together, in the
        direct form: Σ_t δ_it · (ḡ_W ⋆ x_i + ḡ_b)_t, the layer's own convolution of its input
        with ḡ (one per chunk of samples), multiplied by the output gradient in place."""
        x, d = rec.inputs[0], rec.deltas[0]
        assert d is not None
        # under autocast the kept input and the output gradient may differ in dtype
        dt = torch.promote_types(x.dtype, d.dtype)
        w = gw.to(dt)
        bias = None if gb is None else gb.to(dt)
        per = x[0].numel() + 2 * d[0].numel()
        out = []
        for lo, hi in _chunks(rec.n, per, est.budget, est.chunk_size):
            y = self.module._conv_forward(x[lo:hi].to(dt), w, bias)
            out.append(y.mul_(d[lo:hi]).reshape(hi - lo, -1).sum(1))
        return out[0] if len(out) == 1 else torch.cat(out)


class _FusedConv(torch.autograd.Function):
    """A convolution whose backward takes the weight gradient from the per-sample weight
    gradients that the estimator has already summed (``rec.wsum``, set by the output's
    gradient hook, which runs before this backward), instead of a second weight-gradient
    convolution. Without ``rec.wsum`` (a tied weight, the ghost-norm path, no statistics
    needed) it computes the weight gradient as usual. The input gradient comes from the
    backend's convolution_backward (input only); the bias gradient is the summed per-sample
    bias gradients (``rec.bsum``) or the output gradient summed over batch and positions."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, module: nn.Module,
                box: list[Any]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.module = module
        ctx.box = box
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        return module._conv_forward(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, go: Tensor) -> tuple[Tensor | None, ...]:
        x, w = ctx.saved_tensors
        m = ctx.module
        rec = ctx.box[0]
        wsum = bsum = None
        if rec is not None:
            wsum, bsum, rec.wsum, rec.bsum = rec.wsum, rec.bsum, None, None
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        mask = [need_x, need_w and wsum is None, False]
        gi = gw = gb = None
        if mask[0] or mask[1]:
            dims = w.dim() - 2
            gi, gw, _ = torch.ops.aten.convolution_backward(
                go, x, w, None, list(m.stride), list(m.padding), list(m.dilation),
                False, [0] * dims, m.groups, mask)
        if need_b and ctx.bias_sizes is not None:
            gb = (go.sum((0, *range(2, go.dim()))) if bsum is None
                  else bsum.to(go.dtype))
        if need_w and wsum is not None:
            gw = wsum.to(w.dtype)
        return (gi if need_x else None, gw if need_w else None, gb,
                None, None)


def _fusable(module: nn.Module, handler: _Handler) -> bool:
    return (isinstance(handler, _ConvHandler) and "weight" in handler.names
            and not isinstance(module.padding, str) and module.padding_mode == "zeros"
            and "forward" not in module.__dict__)


class _EmbeddingHandler(_Handler):
    """nn.Embedding: sparse per-sample rows, never b × vocab × dim."""

    def _ID(self, rec: _Record, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        m = self.module
        idx = rec.inputs[0][lo:hi].reshape(hi - lo, -1)
        D = rec.deltas[0][lo:hi].reshape(hi - lo, -1, m.embedding_dim)  # type: ignore[index]
        if m.padding_idx is not None:
            D = D * (idx != m.padding_idx).unsqueeze(-1).to(D.dtype)
        return idx, D

    def grads(self, rec: _Record, names: tuple[str, ...], lo: int, hi: int) -> dict[str, Tensor]:
        m = self.module
        V, dim = m.weight.shape
        idx, D = self._ID(rec, lo, hi)
        c = hi - lo
        keys = (torch.arange(c, device=idx.device).unsqueeze(1) * V + idx).reshape(-1)
        out = D.new_zeros(c * V, dim).index_add_(0, keys, D.reshape(-1, dim))
        return {"weight": out.reshape(c, V, dim)}

    def sample_numel(self, rec: _Record, names: tuple[str, ...]) -> int:
        return self.module.weight.numel()

    def kept_numel(self, rec: _Record) -> int:
        return rec.inputs[0][0].numel() * (1 + self.module.embedding_dim)

    def process(self, rec, names, est, need_norm, need_coord, store):  # type: ignore[override]
        V, dim = self.module.weight.shape
        idx, D = self._ID(rec, 0, rec.n)
        keys = (torch.arange(rec.n, device=idx.device).unsqueeze(1) * V + idx).reshape(-1)
        uniq, inv = torch.unique(keys, return_inverse=True)
        S = D.new_zeros(uniq.numel(), dim).index_add_(0, inv, D.reshape(-1, dim)).square_()
        norm = S.sum(dtype=torch.float64) if need_norm else None
        coord = D.new_zeros(V, dim).index_add_(0, uniq % V, S) if need_coord else None
        return {"weight": (norm, coord, None)}

    def ip(self, rec, name, gbar, est):  # type: ignore[override]
        idx, D = self._ID(rec, 0, rec.n)
        return (D * gbar.to(D.dtype)[idx]).reshape(rec.n, -1).sum(1)


class _NormHandler(_Handler):
    """LayerNorm / GroupNorm / RMSNorm with affine parameters (always materialised)."""

    def _xhat(self, x: Tensor) -> Tensor:
        m = self.module
        if isinstance(m, nn.GroupNorm):
            return F.group_norm(x, m.num_groups, None, None, m.eps)
        if isinstance(m, nn.LayerNorm):
            return F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        return F.rms_norm(x, m.normalized_shape, None, m.eps)

    def grads(self, rec: _Record, names: tuple[str, ...], lo: int, hi: int) -> dict[str, Tensor]:
        m = self.module
        c = hi - lo
        x = rec.inputs[0][lo:hi]
        d = rec.deltas[0][lo:hi]  # type: ignore[index]
        if isinstance(m, nn.GroupNorm):
            def fold(t: Tensor) -> Tensor:
                return t.reshape(c, m.num_channels, -1).sum(-1)
        else:
            shape = tuple(m.normalized_shape)

            def fold(t: Tensor) -> Tensor:
                return t.reshape(c, -1, *shape).sum(1)
        out = {}
        if "weight" in names:
            out["weight"] = fold(d * self._xhat(x))
        if "bias" in names:
            out["bias"] = fold(d)
        return out

    def sample_numel(self, rec: _Record, names: tuple[str, ...]) -> int:
        return 3 * rec.inputs[0][0].numel()


class _FuncHandler(_Handler):
    """Any other module with its own parameters: chunked torch.func.vmap(grad(...))."""

    def sample_numel(self, rec: _Record, names: tuple[str, ...]) -> int:
        return 4 * self.kept_numel(rec) + sum(self.param(nm).numel() for nm in names)

    def grads(self, rec: _Record, names: tuple[str, ...], lo: int, hi: int) -> dict[str, Tensor]:
        from torch.func import functional_call, grad, vmap

        m = self.module
        params = {nm: self.param(nm).detach() for nm in names}
        flat, spec = tree_flatten((rec.inputs, rec.kwargs))
        dims = [0 if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == rec.n else None
                for t in flat]
        xs = [t[lo:hi] if d == 0 else t for t, d in zip(flat, dims)]
        ds = [None if d is None else d[lo:hi] for d in rec.deltas]
        d_dims = [None if d is None else 0 for d in ds]

        def loss(p: dict[str, Tensor], xs_: list[Any], ds_: list[Tensor | None]) -> Tensor:
            xs_ = [x.unsqueeze(0) if dm == 0 else x for x, dm in zip(xs_, dims)]
            args, kwargs = tree_unflatten(xs_, spec)
            outs = [o for o in tree_flatten(functional_call(m, p, args, kwargs))[0]
                    if isinstance(o, Tensor)]
            total = torch.zeros((), dtype=torch.float64)
            for o, dl in zip(outs, ds_):
                if dl is not None:
                    total = total + (o * dl.unsqueeze(0)).sum()
            return total

        return vmap(grad(loss), in_dims=(None, dims, d_dims))(params, xs, ds)


_SUPPORTED: tuple[tuple[type[nn.Module], type[_Handler], tuple[str, ...]], ...] = (
    (nn.Linear, _LinearHandler, ("weight", "bias")),
    (nn.Conv1d, _ConvHandler, ("weight", "bias")),
    (nn.Conv2d, _ConvHandler, ("weight", "bias")),
    (nn.Conv3d, _ConvHandler, ("weight", "bias")),
    (nn.Embedding, _EmbeddingHandler, ("weight",)),
    (nn.LayerNorm, _NormHandler, ("weight", "bias")),
    (nn.GroupNorm, _NormHandler, ("weight", "bias")),
    *(((nn.RMSNorm, _NormHandler, ("weight",)),) if hasattr(nn, "RMSNorm") else ()),
)


def _make_handler(module: nn.Module, names: tuple[str, ...]) -> _Handler:
    for cls, handler, known in _SUPPORTED:
        if type(module) is cls and set(names) <= set(known):
            return handler(module, names)
    return _FuncHandler(module, names)


class PerSampleStats:
    """Exact gradient statistics over the samples of a step, from ordinary backward passes.

    Usage (one pass)::

        est = PerSampleStats(model, needs=test.needs)
        with est.measure():
            loss_fn(model(x), y).backward()      # mean-reduced loss
        stats = est.stats()                      # GradientStats over the b samples

    Gradient accumulation: enter :meth:`measure` once per micro-batch, with losses scaled so
    that their sum is the mean over all N samples of the step (``loss_k = mean_loss_k * n_k /
    N``; then p.grad is the step's mean gradient ḡ); :meth:`stats` then covers all N samples
    and resets the estimator for the next step. The batch size of a pass is read from
    dimension 0 of the first hooked layer input, or given as ``measure(batch_size=n)``.

    With G = ‖ḡ‖², S = Σ_i ‖g_i‖², ip_i = ⟨g_i, ḡ⟩ and C_j = Σ_i g_ij²:
    V = (S − N·G)/(N−1), W = (Σ ip_i² − 2G Σ ip_i + N·G²)/(N−1),
    O = (S − Σ ip_i²/G)/(N−1) (NaN when G = 0), v_j = (C_j − N·ḡ_j²)/(N−1);
    variances are clamped at 0 against rounding. With N < 2 the variances are NaN (a test
    then cannot decide: it returns None and the controller keeps the batch size).

    Args:
        model: the module whose trainable parameters (``requires_grad``) the statistics are
            over (a DistributedDataParallel wrapper works: hooks sit on the inner layers).
        needs: the statistics to compute (names from :data:`STAT_NAMES`); only the work
            they need is done (``{"grad_sq_norm"}`` needs no per-sample work at all).
        chunk_size: samples per chunk of the materialising paths; default: as many as keep
            every temporary under ``budget`` elements.
        budget: bound on the elements of one temporary (default :data:`DEFAULT_BUDGET`).
            Convolutions with few input channels keep one im2col workspace of at most this
            many elements across steps (no fresh allocation per step).
        reduce: optional ``reduce(flat) -> flat`` summing a float64 tensor across processes
            (an all-reduce with SUM, in place or returned). Called once per :meth:`stats`
            on ``[N, Σ‖g_i‖², Σ ip_i, Σ ip_i²]`` and, only for ``coord_variance``, once on the
            flattened per-coordinate sums. ḡ is read from p.grad (DDP has averaged it).
        fuse_conv_grad: default True. Inside :meth:`measure`, when ``needs`` ask for
            per-sample norms or coordinates (not for inner products alone), Conv1d/2d/3d
            layers (zero padding, not tied) run through an autograd Function whose backward
            takes the batch weight gradient as the sum of the per-sample weight gradients the
            estimator materialises anyway, so the backend's own weight-gradient convolution is
            skipped (and the bias gradient is a plain sum). p.grad still arrives through
            autograd (accumulation, tied weights and DDP's gradient hooks work as usual) and
            equals a plain backward's up to floating-point summation order (not bitwise; pass
            False for the backend's own gradients). The module's ``forward`` is replaced by an
            instance attribute for the duration of :meth:`measure`.

    Attributes:
        params: the parameters the statistics are over, aligned with ``mean_grad`` and
            ``coord_variance``.
        needs_local_grads: False: it measures inside each backward pass, so the usual
            gradient synchronisation of data parallelism may run (see
            :class:`~adabatch.batching.protocol.Estimator`).
    """

    needs_local_grads = False

    def __init__(self, model: nn.Module, needs: Iterable[str] = STAT_NAMES, *,
                 chunk_size: int | None = None, budget: int = DEFAULT_BUDGET,
                 reduce: Reduce | None = None, fuse_conv_grad: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"PerSampleStats needs an nn.Module, got {type(model).__name__}")
        self.needs = check_needs(frozenset(needs))
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        if not isinstance(budget, int) or budget < 1:
            raise ValueError(f"budget must be a positive integer, got {budget!r}")
        if reduce is not None and not callable(reduce):
            raise TypeError("reduce must be a callable(flat_tensor) -> flat_tensor")
        self.model = model
        self.chunk_size = chunk_size
        self.budget = budget
        self.reduce = reduce
        self.fuse_conv_grad = bool(fuse_conv_grad)
        self._boxes: dict[nn.Module, list[Any]] = {}
        self._need_norm = bool(self.needs & _NORM_STATS)
        self._need_coord = "coord_variance" in self.needs
        self._need_ip = bool(self.needs & _IP_STATS)
        self._per_sample = self._need_norm or self._need_coord or self._need_ip
        self._direct_linear = self._per_sample

        self.params: list[Tensor] = []
        self._index: dict[int, int] = {}
        for p in model.parameters():
            if p.requires_grad and id(p) not in self._index:
                self._index[id(p)] = len(self.params)
                self.params.append(p)
        if not self.params:
            raise ValueError("PerSampleStats: the model has no parameters that require gradients")
        self._names = {id(p): n for n, p in model.named_parameters()}
        self._owners: dict[int, int] = {}
        self._handlers: dict[nn.Module, _Handler] = {}
        self._module_names: dict[nn.Module, str] = {}
        for mname, module in model.named_modules():
            self._module_names[module] = mname or type(module).__name__
            names = tuple(n for n, p in module.named_parameters(recurse=False)
                          if p.requires_grad)
            if not names:
                continue
            if isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
                raise ValueError(
                    f"PerSampleStats: {mname} uses scale_grad_by_freq, which mixes the samples "
                    f"of a batch; use MicroBatchStats"
                )
            self._handlers[module] = _make_handler(module, names)
            for n in names:
                pid = id(getattr(module, n))
                self._owners[pid] = self._owners.get(pid, 0) + 1
        self._batchnorms = [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
        self._hooks = [m.register_forward_hook(self._forward_hook, with_kwargs=True)
                       for m in self._handlers]
        self._active = False
        self._pass_id = 0
        self.reset()

    # --- state ---------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every measured pass (start a new step)."""
        self._n_total = 0
        self._passes = 0
        self._norm_parts: list[Tensor] = []  # Σ‖g_i‖² by layer, summed in float64 at stats()
        self._coord: list[Tensor | None] = [None] * len(self.params)
        self._ip_parts: list[tuple[int, list[tuple]]] = []
        self._seen: set[int] = set()
        self._gram_void = False  # a Gram-form inner product may be wrong: use the direct one

    def remove(self) -> None:
        """Remove the hooks from the model."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _check_mixing(self) -> None:
        for name, module in self._batchnorms:
            if module.training:
                raise ValueError(
                    f"PerSampleStats: layer {name!r} ({type(module).__name__}) is in training "
                    f"mode and mixes the samples of a batch, so per-sample gradients are not "
                    f"defined; use MicroBatchStats, replace it with GroupNorm, or put it in "
                    f"eval mode"
                )

    @contextlib.contextmanager
    def measure(self, batch_size: int | None = None) -> Iterator[PerSampleStats]:
        """Context for the forward and backward pass of one (micro-)batch."""
        if self._active:
            raise RuntimeError("PerSampleStats.measure() is already active")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if self._per_sample:
            self._check_mixing()
        self._pass_n = batch_size
        self._records: list[_Record] = []
        self._uses: dict[int, int] = {}
        self._deferred: list[_Record] = []
        self._pass_ip: list[tuple] = []
        # Gram-form inner products of Linear layers (see _make_linear_hook) need p.grad to be
        # exactly this pass's gradient: only the first pass, no all-reduce
        self._gram_pass = (self._need_ip and self._passes == 0 and self.reduce is None
                           and not (torch.distributed.is_available()
                                    and torch.distributed.is_initialized()))
        self._pass_id += 1  # the hooks of this pass's records check it
        self._active = True
        patched = []
        if self.fuse_conv_grad and (self._need_norm or self._need_coord):
            # fusion pays when per-sample weight gradients are taken anyway: for norms or
            # coordinates; inner products alone take the direct form (ip_wb), which needs none
            for module, handler in self._handlers.items():
                if _fusable(module, handler):
                    module.forward = functools.partial(self._fused_forward, module)
                    patched.append(module)
        ok = False
        try:
            yield self
            ok = True
        finally:
            for module in patched:
                module.__dict__.pop("forward", None)
            self._boxes.clear()
            self._active = False
            records, self._records = self._records, []
            if ok:
                self._finish_pass(records)

    @contextlib.contextmanager
    def step(self, measure: bool = True) -> Iterator[StepScope]:
        """Context for one training step (the :class:`~adabatch.batching.protocol.Estimator`
        protocol): each ``scope.micro_batch(n)`` is a :meth:`measure` context; with
        ``measure=False`` nothing is hooked and the step costs a plain step."""
        if measure:
            self.reset()
        yield StepScope(bool(measure), lambda n: self.measure(), lambda n: None)

    # --- hooks -----------------------------------------------------------------------------
    def _fused_forward(self, module: nn.Module, x: Tensor) -> Tensor:
        w, b = module.weight, module.bias
        if not (torch.is_grad_enabled() and w.requires_grad):
            return module._conv_forward(x, w, b)
        box: list[Any] = [None]
        self._boxes[module] = box  # the forward hook (runs next) puts the call's record in
        return _FusedConv.apply(x, w, b, module, box)

    def _forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if not self._active:
            return
        first = args[0] if args and isinstance(args[0], Tensor) else next(
            (t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)), None)
        if first is None or first.dim() == 0:
            raise ValueError(
                f"PerSampleStats: layer {self._module_names[module]!r} got no batched tensor "
                f"input; inputs must be batch-first"
            )
        n = first.shape[0]
        if self._pass_n is None:
            self._pass_n = n
        elif n != self._pass_n:
            raise ValueError(
                f"PerSampleStats: layer {self._module_names[module]!r} saw a batch of {n} "
                f"samples but the pass has {self._pass_n}; inputs must be batch-first "
                f"(or give measure(batch_size=...))"
            )
        if not self._per_sample:
            return
        if isinstance(output, Tensor):
            if not output.requires_grad:
                return
            outs = [output]
        else:
            outs = [o for o in tree_flatten(output)[0] if isinstance(o, Tensor)]
            if not any(o.requires_grad for o in outs):
                return
        handler = self._handlers[module]
        saved_args = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
        kw = ({k: (v.detach() if isinstance(v, Tensor) else v) for k, v in kwargs.items()}
              if kwargs else {})
        rec = _Record(module, handler, saved_args, kw, n, len(outs))
        uses = self._uses
        for pid in handler.pids:
            uses[pid] = uses.get(pid, 0) + 1
        self._records.append(rec)
        if self._boxes:
            box = self._boxes.pop(module, None)
            if box is not None:
                box[0] = rec
                rec.fuse = True
        if (self._direct_linear and type(handler) is _LinearHandler and len(outs) == 1
                and first.dim() == 2 and handler.names[0] == "weight"):
            output.register_hook(self._make_linear_hook(rec))
            return
        for i, o in enumerate(outs):
            if o.requires_grad:
                o.register_hook(self._make_grad_hook(rec, i))

    def _make_linear_hook(self, rec: _Record) -> Callable[[Tensor], None]:
        """The common case made cheap: a Linear on [b, in] inputs, done in the output's
        gradient hook: Σ_i ‖g_i‖² = Σ_i ‖a_i‖²‖δ_i‖² (+ Σ_i ‖δ_i‖² for the bias) and
        Σ_i g_i² = (δ²)ᵀ(a²) (and Σ_i δ_i² for the bias).

        Inner products: the record (a, δ) is kept for :meth:`stats`, which takes
        ⟨g_i, ḡ⟩ = δ_iᵀ(ḡ_W a_i + ḡ_b) (one b·in·out product). When this pass alone makes
        p.grad (see :meth:`_gram_allowed`) and b·(in + out) < in·out, the hook also takes the
        Gram form ⟨g_i, Σ_j g_j⟩ = Σ_j (δ_i·δ_j)(a_i·a_j + [bias]) (b²·(in + out)), which
        :meth:`stats` uses if no second pass follows; the per-sample norms are then its
        diagonal.

        The same arithmetic as :meth:`_LinearHandler.process` for L = 1, written out here on
        purpose: going through the handler (its views and bookkeeping) measured 0.13-0.18x
        slower for the coordinate-wise statistics of the 1 ms MLP step
        (benchmarks/test_overhead.py --baseline)."""
        pass_id = self._pass_id

        def hook(grad: Tensor) -> None:
            self._check_pass(pass_id)
            rec.deltas[0] = grad.detach()
            rec.pending = 0
            uses = self._uses
            pids = rec.handler.pids
            if any(uses[pid] > 1 for pid in pids):
                return  # a shared parameter: the per-pass path sums its uses
            a, D = rec.inputs[0], rec.deltas[0]
            # inputs and output gradients may differ in dtype under autocast: reduce both in
            # their common type, at least float32
            dt = torch.promote_types(torch.promote_types(a.dtype, D.dtype), torch.float32)
            bias = len(pids) == 2
            with torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext():
                gram = None
                if self._need_ip:
                    n = a.shape[0]
                    out_f, in_f = D.shape[1], a.shape[1]
                    if (n * (in_f + out_f) < in_f * out_f
                            and self._gram_allowed(rec.handler)):
                        a_, D_ = a.to(dt), D.to(dt)
                        K = D_ @ D_.T
                        M = a_ @ a_.T
                        if bias:
                            M.add_(1.0)
                        gram = (K * M).sum(1)
                        if self._need_norm:
                            self._norm_parts.append(torch.dot(K.diagonal(), M.diagonal()))
                    self._pass_ip.append(("wb", pids[0], pids[1] if bias else None, rec,
                                          gram))
                if self._need_norm and gram is None:
                    nd = torch.linalg.vector_norm(D, dim=1, dtype=dt)
                    t = torch.linalg.vector_norm(a, dim=1, dtype=dt).mul_(nd)
                    self._norm_parts.append(torch.dot(t, t))
                    if bias:  # Σ_i ‖δ_i‖²
                        self._norm_parts.append(torch.dot(nd, nd))
                if self._need_coord:
                    dsq = D.to(dt).square()
                    self._add(pids[0], None, dsq.T @ a.to(dt).square())
                    if bias:
                        self._add(pids[1], None, dsq.sum(0))
            self._seen.update(pids)
            rec.done = True
            if not self._need_ip:
                rec.inputs, rec.deltas = (), []
        return hook

    def _gram_allowed(self, handler: _Handler) -> bool:
        """Whether p.grad of the handler's parameters will be this layer call's gradient in
        this pass and nothing else: the first pass since the last :meth:`stats`, no reduction
        across processes (DDP averages p.grad), no gradient yet, and no hook that could
        change the gradient on its way into p.grad. A gradient already there (a second
        backward pass, or grads not zeroed) voids every Gram form of the step."""
        if not self._gram_pass:
            return False
        for nm in handler.names:
            p = handler.param(nm)
            if p.grad is not None:
                self._gram_pass = False
                self._gram_void = True
                return False
            if p._backward_hooks or getattr(p, "_post_accumulate_grad_hooks", None):
                return False
        return True

    def _check_pass(self, pass_id: int) -> None:
        if not (self._active and self._pass_id == pass_id):
            raise RuntimeError(
                "PerSampleStats: a layer's output gradient arrived after its measure() block "
                "ended; run the backward pass inside the same `with est.measure():` as the "
                "forward pass"
            )

    def _make_grad_hook(self, rec: _Record, i: int) -> Callable[[Tensor], None]:
        pass_id = self._pass_id

        def hook(grad: Tensor) -> None:
            self._check_pass(pass_id)
            rec.deltas[i] = grad.detach()
            rec.pending -= 1
            if rec.pending == 0 and self._simple(rec):
                if torch.is_grad_enabled():  # backward(create_graph=True)
                    with torch.no_grad():
                        self._process(rec, rec.names, release=True)
                else:
                    self._process(rec, rec.names, release=True)
        return hook

    def _simple(self, rec: _Record) -> bool:
        if isinstance(rec.handler, _FuncHandler) or len(rec.deltas) != 1:
            return False
        uses = self._uses
        return all(uses[pid] <= 1 for pid in rec.handler.pids)

    # --- per-pass processing -----------------------------------------------------------------
    def _store_mat(self, rec: _Record, names: tuple[str, ...]) -> set[str]:
        if not self._need_ip:
            return set()
        if isinstance(rec.handler, _ConvHandler) and not rec.fuse:
            # the direct form (one convolution with ḡ) costs the multiply-adds of the
            # per-sample weight gradients and keeps nothing; only a fused convolution, whose
            # per-sample gradients replace the batch one, has them for free
            return set()
        kept = rec.handler.kept_numel(rec)
        # a fused conv materialises its per-sample weight gradients anyway (they replace the
        # backend's weight gradient): keeping them for the inner products then costs memory
        # only, which is worth up to twice the input and output gradient it frees
        limit = 2 * kept if rec.fuse else kept
        store = {nm for nm in names if rec.handler.param(nm).numel() <= limit}
        if (isinstance(rec.handler, (_LinearHandler, _ConvHandler)) and "weight" in names
                and "weight" not in store):
            store.discard("bias")  # taken with the weight in one addmm/convolution (ip_wb)
        return store

    def _add(self, pid: int, norm: Tensor | None, coord: Tensor | None) -> None:
        idx = self._index[pid]
        if norm is not None:
            self._norm_parts.append(norm)
        if coord is not None:
            cur = self._coord[idx]
            self._coord[idx] = coord if cur is None else cur.add_(coord)

    def _process(self, rec: _Record, names: tuple[str, ...], release: bool) -> None:
        """Norm and coordinate sums of single-use parameters; keep what inner products need."""
        rec.done = True
        store = self._store_mat(rec, names)
        res = rec.handler.process(rec, names, self, self._need_norm, self._need_coord, store)
        later: list[tuple[int, str]] = []
        for nm in names:
            pid = id(rec.handler.param(nm))
            self._seen.add(pid)
            norm, coord, mat = res[nm]
            self._add(pid, norm, coord)
            if self._need_ip:
                if mat is not None:
                    self._pass_ip.append(("mat", pid, mat))
                else:
                    later.append((pid, nm))
        if (len(later) == 2 and isinstance(rec.handler, (_LinearHandler, _ConvHandler))
                and later[0][1] == "weight" and later[1][1] == "bias"):
            # weight and bias together: one addmm (Linear) or convolution per chunk
            self._pass_ip.append(("wb", later[0][0], later[1][0], rec, None))
        else:
            self._pass_ip.extend(("rec", pid, rec, nm) for pid, nm in later)
        keep = bool(later)
        if release and not keep:
            rec.inputs, rec.kwargs, rec.deltas = (), {}, []

    def _finish_pass(self, records: list[_Record]) -> None:
        with torch.no_grad():
            multi: dict[int, list[tuple[_Record, str]]] = {}
            for rec in records:
                if rec.done or all(d is None for d in rec.deltas):
                    continue  # processed in the backward hook, or no gradient reached it
                if not isinstance(rec.handler, _FuncHandler) and rec.deltas[0] is None:
                    continue
                shared = tuple(nm for nm in rec.names
                               if self._uses.get(id(rec.handler.param(nm)), 0) > 1)
                single = tuple(nm for nm in rec.names if nm not in shared)
                if single:
                    self._process(rec, single, release=not shared)
                for nm in shared:
                    multi.setdefault(id(rec.handler.param(nm)), []).append((rec, nm))
            for pid, uses in multi.items():
                self._process_shared(pid, uses)
            n = self._pass_n
            if n is None:
                if self._per_sample:
                    raise RuntimeError(
                        "PerSampleStats.measure(): no hooked layer ran a forward pass; run "
                        "the forward inside measure() or give measure(batch_size=...)"
                    )
                return
            self._n_total += n
            self._passes += 1
            if self._need_ip:
                self._ip_parts.append((n, self._pass_ip))
            self._pass_ip = []

    def _process_shared(self, pid: int, uses: list[tuple[_Record, str]]) -> None:
        """A parameter used several times: per-sample gradient = sum of the uses."""
        p = self.params[self._index[pid]]
        self._seen.add(pid)
        n = uses[0][0].n
        per = p.numel() * 2 + max(r.handler.sample_numel(r, (nm,)) for r, nm in uses)
        norm = torch.zeros((), dtype=torch.float64, device=p.device)
        coord = None
        for lo, hi in _chunks(n, per, self.budget, self.chunk_size):
            total = None
            for rec, nm in uses:
                g = rec.handler.grads(rec, (nm,), lo, hi)[nm]
                total = g if total is None else total + g
            assert total is not None
            acc: list[Any] = [None, coord, []]
            _accumulate(acc, total, self._need_norm, self._need_coord, False)
            if acc[0] is not None:
                norm += acc[0]
            coord = acc[1]
        self._add(pid, norm if self._need_norm else None, coord)
        if self._need_ip:
            for rec, nm in uses:
                self._pass_ip.append(("rec", pid, rec, nm))

    # --- the statistics ------------------------------------------------------------------------
    def _mean_grads(self) -> list[Tensor]:
        out = []
        for p in self.params:
            g = p.grad
            if g is None:
                out.append(torch.zeros_like(p))
            else:
                out.append(g.to_dense() if g.is_sparse else g.detach())
        return out

    def stats(self) -> GradientStats:
        """The statistics over every sample measured since the last reset; then reset.

        ḡ is read from p.grad now: call this after the last backward and before anything
        rescales or clips p.grad (``GradScaler.unscale_``, ``clip_grad_norm_``), whose
        per-sample counterparts the hooks never see."""
        if self._active:
            raise RuntimeError("PerSampleStats.stats() called inside measure()")
        if self._passes == 0:
            raise RuntimeError(
                "PerSampleStats.stats(): nothing measured; run the forward and backward pass "
                "inside est.measure()"
            )
        try:
            return self._stats()
        finally:
            self.reset()

    def _stats(self) -> GradientStats:
        gbar = self._mean_grads()
        if self._per_sample and len(self._seen) < len(self.params):
            for p, g in zip(self.params, gbar):
                if id(p) not in self._seen and p.grad is not None and bool(g.any()):
                    raise ValueError(
                        f"PerSampleStats: parameter {self._names.get(id(p), '?')!r} has a "
                        f"gradient that no hooked layer call produced (used outside a module "
                        f"call?); per-sample statistics cannot be attributed to samples"
                    )
        n_loc = self._n_total
        # every partial sum is a 0-dim tensor on the gradients' device; they are read back
        # once (read_f64: one stacked copy off the CPU), in float64: [‖ḡ_p‖² per tensor,
        # Σ‖g_i‖² parts, s1, s2]
        vals = sq_norm_parts(gbar)
        k = len(vals)
        vals += self._norm_parts
        n_norm = len(self._norm_parts)
        if self._need_ip:
            f64 = {"dtype": torch.float64, "device": gbar[0].device}
            flat_g = {id(p): g for p, g in zip(self.params, gbar)}
            s_ip, s_ip2 = [], []
            # the Gram forms are ⟨g_i, this pass's gradient⟩: = ⟨g_i, ḡ⟩ for a single pass
            gram_ok = self._passes == 1 and not self._gram_void
            for n, parts in self._ip_parts:
                ip = None  # float64 [n]: Σ over the pass's layers
                for part in parts:
                    if part[0] == "mat":
                        _, pid, mats = part
                        g = flat_g[pid].reshape(-1).to(mats[0].dtype)
                        term = torch.cat([m @ g for m in mats])
                    elif part[0] == "wb":
                        _, pw, pb, rec, gram = part
                        term = (gram if gram is not None and gram_ok else rec.handler.ip_wb(
                            rec, flat_g[pw], None if pb is None else flat_g[pb], self))
                    else:
                        _, pid, rec, nm = part
                        term = rec.handler.ip(rec, nm, flat_g[pid], self)
                    # every term is a fresh tensor of ours: summed in place
                    ip = term.to(torch.float64) if ip is None else ip.add_(term)
                if ip is None:
                    ip = torch.zeros(n, **f64)
                ip.mul_(n_loc)
                s_ip.append(ip.sum())
                s_ip2.append(torch.dot(ip, ip))
            vals += [torch.stack(s_ip).sum(), torch.stack(s_ip2).sum()]
        coords = None
        if self._need_coord:
            coords = [c if c is not None else torch.zeros_like(p)
                      for c, p in zip(self._coord, self.params)]
        if self.reduce is None:
            v = read_f64(vals)
            G = math.fsum(v[:k])
            S = math.fsum(v[k:k + n_norm]) * n_loc**2
            s1, s2 = (v[-2], v[-1]) if self._need_ip else (0.0, 0.0)
            # units are samples: K = N
            return finish_stats(self.needs, float(n_loc), float(n_loc), S, s1, s2, G, coords,
                                gbar, coord_scale=float(n_loc**2), in_place=True)
        if coords is not None:  # each process scales by its own N before the sum
            coords = torch._foreach_mul(coords, float(n_loc**2))
        stacked = stack_f64(vals)
        n_t = torch.tensor(float(n_loc), dtype=torch.float64, device=stacked.device)
        zero = stacked.new_zeros(())
        flat = torch.stack([n_t, n_t, stacked[k:k + n_norm].sum() * n_loc**2,
                            stacked[-2] if self._need_ip else zero,
                            stacked[-1] if self._need_ip else zero])
        return stats_from_sums(self.needs, flat, stacked[:k].sum(), coords, gbar, self.reduce)
