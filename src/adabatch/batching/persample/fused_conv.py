"""Fused convolution: the batch weight gradient of a convolution taken from the per-sample
weight gradients the estimator materialises anyway (``PerSampleStats(fuse_conv_grad=True)``).

Mechanism (the one place it happens): for the duration of one ``measure()`` block,
:class:`ConvFusion` gives each fusable convolution module an *instance* attribute ``forward``
that runs :class:`FusedConv` (the module's own convolution, public ``F.conv*d``), and deletes
it when the block ends. The class's ``forward`` is untouched, and so is any module whose
``forward`` is already replaced on the instance (it is not fused). The forward hook of the
estimator, which runs right after, hands the call's :class:`LayerCall` to the autograd node
through a :class:`FusedSlot`; the output's gradient hook, which runs before the node's
backward, sums the per-sample gradients into ``call.wsum`` / ``call.bsum``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from adabatch.batching.persample.conv import ConvRule, conv
from adabatch.batching.persample.layers import LayerRule
from adabatch.batching.persample.records import LayerCall


@dataclass(slots=True)
class FusedSlot:
    """Where the forward hook leaves the layer call of one fused convolution for its backward."""

    call: LayerCall | None = None


class FusedConv(torch.autograd.Function):
    """A convolution whose backward takes the weight gradient from the per-sample weight
    gradients that the estimator has already summed (``call.wsum``, set by the output's
    gradient hook, which runs before this backward), instead of a second weight-gradient
    convolution. Without ``call.wsum`` (a tied weight, the ghost-norm path, no statistics
    needed) it computes the weight gradient as usual. The input gradient comes from the
    backend's convolution_backward (input only); the bias gradient is the summed per-sample
    bias gradients (``call.bsum``) or the output gradient summed over batch and positions."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, module: nn.Module,
                slot: FusedSlot) -> Tensor:
        # the gradients go back in the dtypes of the tensors given, not of their casts below
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        dev = x.device.type
        cast = torch.is_autocast_enabled(dev)
        if cast:
            x, weight, bias = autocast_inputs(x, weight, bias, torch.get_autocast_dtype(dev))
        ctx.save_for_backward(x, weight)
        ctx.module = module
        ctx.slot = slot
        ctx.has_bias = bias is not None
        if not cast:
            return conv(module, x, weight, bias, ())  # zero padding (see fusable)
        with torch.autocast(dev, enabled=False):
            return conv(module, x, weight, bias, ())

    @staticmethod
    def backward(ctx: Any, go: Tensor) -> tuple[Tensor | None, ...]:
        x, w = ctx.saved_tensors
        m = ctx.module
        call = ctx.slot.call
        wsum = bsum = None
        if call is not None:
            wsum, bsum, call.wsum, call.bsum = call.wsum, call.bsum, None, None
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        mask = [need_x, need_w and wsum is None, False]
        gi = gw = gb = None
        if mask[0] or mask[1]:
            dims = w.dim() - 2
            gi, gw, _ = torch.ops.aten.convolution_backward(
                go, x, w, None, list(m.stride), list(m.padding), list(m.dilation),
                False, [0] * dims, m.groups, mask)
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        if need_b and ctx.has_bias:
            gb = (go.sum((0, *range(2, go.dim()))) if bsum is None else bsum).to(b_dtype)
        if need_w and wsum is not None:
            gw = wsum
        return (gi.to(x_dtype) if need_x else None, gw.to(w_dtype) if need_w else None, gb,
                None, None)


def autocast_inputs(x: Tensor, weight: Tensor, bias: Tensor | None, dt: torch.dtype
                    ) -> tuple[Tensor, Tensor, Tensor | None]:
    """The input, weight and bias as the convolution sees them under autocast with dtype
    ``dt``: cast to it, as autocast casts them for the module's own convolution
    (convolutions run in the lower precision on CPU and CUDA). Saved for the backward in
    these dtypes, so that the backend's input gradient gets matching dtypes."""
    return (x.to(dt), weight.to(dt), None if bias is None else bias.to(dt))


def fusable(module: nn.Module, rule: LayerRule) -> bool:
    """A convolution whose weight is measured, with numeric zero padding."""
    return (isinstance(rule, ConvRule) and "weight" in rule.names
            and not isinstance(module.padding, str) and module.padding_mode == "zeros")


class ConvFusion:
    """Runs the given convolutions through :class:`FusedConv` between :meth:`install` and
    :meth:`remove` (see the module docstring)."""

    def __init__(self, modules: tuple[nn.Module, ...]) -> None:
        self.modules = modules
        #: the fused calls of the running pass whose forward hook has not run yet
        self.pending: dict[nn.Module, FusedSlot] = {}
        self._installed: list[nn.Module] = []

    def install(self) -> None:
        for module in self.modules:
            if "forward" not in module.__dict__:
                module.forward = functools.partial(self._forward, module)
                self._installed.append(module)

    def remove(self) -> None:
        for module in self._installed:
            module.__dict__.pop("forward", None)
        self._installed = []
        self.pending.clear()

    def claim(self, module: nn.Module, call: LayerCall) -> None:
        """Called by the forward hook: if this call of ``module`` runs fused, link it."""
        slot = self.pending.pop(module, None)
        if slot is not None:
            slot.call = call
            call.fuse = True

    def _forward(self, module: nn.Module, x: Tensor) -> Tensor:
        w, b = module.weight, module.bias
        if not (torch.is_grad_enabled() and w.requires_grad):
            return conv(module, x, w, b, ())
        slot = FusedSlot()
        self.pending[module] = slot  # the forward hook (runs next) puts the call's record in
        return FusedConv.apply(x, w, b, module, slot)
