"""The data the per-sample estimator keeps: one record per hooked layer call, the sums a layer
rule returns, and the work items that take the inner products ⟨g_i, ḡ⟩ in ``stats()``."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from adabatch._validation import check_int

if TYPE_CHECKING:
    from adabatch.batching.persample.layers import LayerRule


@dataclass(frozen=True)
class PerSampleTuning:
    """How :class:`~adabatch.batching.persample.PerSampleStats` chooses between equivalent
    computations; none of these changes a statistic beyond floating-point rounding.

    Attributes:
        im2col_max_cin: convolutions with at most this many input channels per group take
            per-sample weight gradients by im2col + batched matmul, the others from one
            grouped convolution whose groups are the samples (the im2col copy is faster for
            few channels: benchmarks/conv_weight_grads.py). 0: always the grouped convolution.
        grouped_max_chunk: at most this many samples per grouped weight-gradient convolution
            (the backend can slow down sharply for many groups: benchmarks/conv_weight_grads.py).
        gram_form: let a Linear layer on [b, in] inputs take its inner products in the Gram
            form Σ_j (δ_i·δ_j)(a_i·a_j + 1) when that is cheaper and allowed (see
            :class:`~adabatch.batching.persample.PerSampleStats`); False: always the direct form.
    """

    im2col_max_cin: int = 4
    grouped_max_chunk: int = 32
    gram_form: bool = True

    def __post_init__(self) -> None:
        check_int("im2col_max_cin", self.im2col_max_cin, minimum=0)
        check_int("grouped_max_chunk", self.grouped_max_chunk)
        if not isinstance(self.gram_form, bool):
            raise TypeError(f"Invalid gram_form: {self.gram_form!r} (must be a bool)")


@dataclass(slots=True, eq=False)
class LayerCall:
    """One call of a hooked module during one measured pass: its (detached) inputs and, as
    they arrive, the gradients δ of the loss with respect to its outputs."""

    module: nn.Module
    rule: LayerRule
    inputs: tuple
    kwargs: dict
    n: int
    deltas: list[Tensor | None]  # one slot per output tensor
    pending: int  # output gradients still to arrive
    names: tuple[str, ...]  # the measured parameters (rule.names)
    done: bool = False
    #: the call ran through the fused convolution (see fused_conv.py): the per-sample weight
    #: (and bias) gradients summed here replace the backend's batch gradients
    fuse: bool = False
    wsum: Tensor | None = None
    bsum: Tensor | None = None
    #: the (detached) tensor outputs, kept for the torch.func path only: its per-sample
    #: recomputation is checked against them
    outputs: list[Tensor] = field(default_factory=list)

    def release(self) -> None:
        """Drop the kept tensors (nothing later needs them)."""
        self.inputs, self.kwargs, self.deltas, self.outputs = (), {}, [], []


@dataclass(slots=True)
class ParamSums:
    """What a layer rule measured for one parameter: Σ_i ‖g_i‖² (``norm``, 0-dim), Σ_i g_i²
    (``coord``, the parameter's shape) and, when asked to keep them, the per-sample gradients
    as chunks [c, numel] (``kept``)."""

    norm: Tensor | None = None
    coord: Tensor | None = None
    kept: list[Tensor] | None = None

    def add(self, g: Tensor, need_norm: bool, need_coord: bool, keep: bool) -> None:
        """Add the per-sample gradients ``g`` [c, *shape] of a chunk of samples."""
        if need_coord:
            sq = g.square()
            c = sq.sum(0)
            self.coord = c if self.coord is None else self.coord.add_(c)
            if need_norm:
                s = sq.sum(dtype=torch.float64)
                self.norm = s if self.norm is None else self.norm + s
        elif need_norm:
            flat = g.reshape(-1)
            s = torch.dot(flat, flat).double()
            self.norm = s if self.norm is None else self.norm + s
        if keep:
            if self.kept is None:
                self.kept = []
            self.kept.append(g.reshape(g.shape[0], -1))


@dataclass(frozen=True)
class Chunking:
    """Chunks of samples: at most ``budget`` elements per temporary, or ``size`` samples."""

    budget: int
    size: int | None = None

    def __call__(self, n: int, per_sample: int, cap: int | None = None
                 ) -> Iterator[tuple[int, int]]:
        """(lo, hi) of equal chunks of n samples whose temporaries take ``per_sample``
        elements per sample; ``cap`` bounds the samples per chunk unless ``size`` is set."""
        step = self.size if self.size is not None else max(1, self.budget // max(1, per_sample))
        if cap is not None and self.size is None:
            step = min(step, cap)
        if self.size is None and n > step:  # equal chunks: no small tail chunk (fixed costs)
            step = -(-n // -(-n // step))
        for lo in range(0, n, step):
            yield lo, min(n, lo + step)


# --- work items of the inner products ---------------------------------------------------------
# Each pass leaves a list of items; stats() asks each for ⟨contribution_i, ḡ⟩ ([n] per item)
# once ḡ = p.grad is final. ``gbar`` maps id(parameter) to its ḡ.


@dataclass(slots=True)
class KeptGrads:
    """Per-sample gradients of one parameter kept as chunks [c, numel]: one product each."""

    pid: int
    kept: list[Tensor]

    def inner_products(self, gbar: dict[int, Tensor], chunks: Chunking,
                       gram_ok: bool) -> Tensor:
        g = gbar[self.pid].reshape(-1).to(self.kept[0].dtype)
        return torch.cat([m @ g for m in self.kept])


@dataclass(slots=True)
class WeightBiasProducts:
    """A Linear or Conv weight with its bias (or without one: ``bias`` None), taken together
    from the kept call: the layer's forward with ḡ as its weight and bias, or the Gram form
    computed in the backward hook (``gram``), valid when ``gram_ok``."""

    weight: int
    bias: int | None
    call: LayerCall
    gram: Tensor | None = None

    def inner_products(self, gbar: dict[int, Tensor], chunks: Chunking,
                       gram_ok: bool) -> Tensor:
        if self.gram is not None and gram_ok:
            return self.gram
        gb = None if self.bias is None else gbar[self.bias]
        return self.call.rule.weight_bias_ip(self.call, gbar[self.weight], gb, chunks)


@dataclass(slots=True)
class CallProducts:
    """One parameter of a kept call, by its layer rule."""

    pid: int
    call: LayerCall
    name: str

    def inner_products(self, gbar: dict[int, Tensor], chunks: Chunking,
                       gram_ok: bool) -> Tensor:
        return self.call.rule.ip(self.call, self.name, gbar[self.pid], chunks)


IPItem = KeptGrads | WeightBiasProducts | CallProducts


@dataclass(slots=True)
class PassProducts:
    """The inner-product items of one measured pass of ``n`` samples."""

    n: int
    items: list[IPItem] = field(default_factory=list)
