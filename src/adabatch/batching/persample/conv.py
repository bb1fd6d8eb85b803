"""The per-sample gradient rule of Conv1d/2d/3d (any stride, padding, padding mode, dilation
and groups), and the module's convolution written with public functions only."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adabatch.batching.persample.layers import LayerRule, Sums, chunked_ghost_norm
from adabatch.batching.persample.records import Chunking, LayerCall, ParamSums, PerSampleTuning

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def explicit_padding(m: nn.Module) -> tuple[int, ...]:
    """The module's padding as ``F.pad`` amounts (last spatial axis first, left then right),
    "same" and "valid" included: what nn.ConvNd computes at construction."""
    k, dil = m.kernel_size, m.dilation
    out: list[int] = []
    for i in reversed(range(len(k))):
        if m.padding == "valid":
            left = right = 0
        elif m.padding == "same":
            total = dil[i] * (k[i] - 1)
            left, right = total // 2, total - total // 2
        else:
            left = right = m.padding[i]
        out += [left, right]
    return tuple(out)


def conv(m: nn.Module, x: Tensor, weight: Tensor, bias: Tensor | None,
         pad: tuple[int, ...]) -> Tensor:
    """The module's forward with the given weight and bias (``pad``: its
    :func:`explicit_padding`, used for padding modes other than zeros)."""
    f = _CONV[weight.dim() - 2]
    if m.padding_mode != "zeros":
        return f(F.pad(x, pad, mode=m.padding_mode), weight, bias, m.stride, 0, m.dilation,
                 m.groups)
    return f(x, weight, bias, m.stride, m.padding, m.dilation, m.groups)


class ConvRule(LayerRule):
    """nn.Conv1d / Conv2d / Conv3d with any stride, padding, dilation and groups."""

    def __init__(self, module: nn.Module, names: tuple[str, ...], tuning: PerSampleTuning) -> None:
        super().__init__(module, names, tuning)
        self.dims = module.weight.dim() - 2
        self.pad = explicit_padding(module)
        self.pad_mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        #: per-sample weight gradients by im2col + batched matmul rather than one grouped
        #: convolution (PerSampleTuning.im2col_max_cin)
        self.im2col = module.in_channels // module.groups <= tuning.im2col_max_cin
        self._ws: Tensor | None = None

    def padded(self, x: Tensor) -> Tensor:
        """The input with the module's padding applied (any padding mode)."""
        return F.pad(x, self.pad, mode=self.pad_mode) if any(self.pad) else x

    def unfold(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        """im2col: [c, C_in, *spatial] -> [c, C_in·Πk, L], ordered like the weight.

        A strided view of the padded input (Tensor.unfold per spatial axis) copied once into
        ``out`` (a flat buffer of at least as many elements, any dtype: the copy casts) or
        into a new tensor; F.unfold is several times slower on CPU."""
        m = self.module
        x = self.padded(x)
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

    def max_chunk(self) -> int | None:
        return None if self.im2col else self.tuning.grouped_max_chunk

    def unfolded(self, call: LayerCall, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        """Unfolded input [c·g, I, L] and output gradient [c·g, O, L] per group."""
        g = self.module.groups
        c = hi - lo
        U = self.unfold(call.inputs[0][lo:hi])
        D = call.deltas[0][lo:hi].reshape(c, self.module.out_channels, -1)  # type: ignore[index]
        return U.reshape(c * g, -1, U.shape[-1]), D.reshape(c * g, -1, D.shape[-1])

    def grads(self, call: LayerCall, names: tuple[str, ...], lo: int, hi: int
              ) -> dict[str, Tensor]:
        out = {}
        c = hi - lo
        d = call.deltas[0][lo:hi]  # type: ignore[index]
        gb = None
        if "weight" in names:
            out["weight"], gb = self.weight_grads(call.inputs[0][lo:hi], d, "bias" in names)
        if "bias" in names:
            out["bias"] = gb if gb is not None else d.reshape(c, d.shape[1], -1).sum(-1)
        return out

    def weight_grads(self, x: Tensor, d: Tensor,
                     bias: bool = False) -> tuple[Tensor, Tensor | None]:
        """Per-sample weight gradients [c, *weight.shape]: by im2col (into the kept workspace)
        and a batched matmul for few input channels (:attr:`im2col`), else the weight
        gradient of one grouped convolution whose groups are the samples (the backend's
        weight-gradient kernel; no im2col copy), which with ``bias`` also gives the per-sample
        bias gradients [c, C_out] from the same pass over d (else None)."""
        m = self.module
        c = x.shape[0]
        if self.im2col:
            dt = torch.promote_types(x.dtype, d.dtype)
            ws = self._workspace(c * m.in_channels * math.prod(m.kernel_size)
                                 * d[0, 0].numel(), dt, x.device)
            U = self.unfold(x, ws)
            U = U.view(c * m.groups, -1, U.shape[-1])  # [c·g, I, L]
            D = d.reshape(c * m.groups, -1, U.shape[-1]).to(dt)  # [c·g, O, L]
            return torch.bmm(D, U.transpose(1, 2)).view(c, *m.weight.shape), None
        if isinstance(m.padding, str) or m.padding_mode != "zeros":
            x = self.padded(x)
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

    def _sizes(self, call: LayerCall) -> tuple[int, int, int]:
        m = self.module
        d = call.deltas[0]
        L = d[0, 0].numel() if d is not None else 1
        I = m.weight[0].numel()
        O = m.out_channels // m.groups
        return L, I, O

    def sample_numel(self, call: LayerCall, names: tuple[str, ...]) -> int:
        L, I, O = self._sizes(call)
        g = self.module.groups
        total = self.module.out_channels * L
        if "weight" in names:
            total += g * O * I + 2 * call.inputs[0][0].numel()
            if self.im2col:
                total += g * I * L
        return total

    def process(self, call: LayerCall, names: tuple[str, ...], chunks: Chunking,
                need_norm: bool, need_coord: bool, store: set[str]) -> Sums:
        result = {}
        rest = tuple(nm for nm in names if nm != "weight")
        if "weight" in names:
            L, I, O = self._sizes(call)
            if not need_coord and "weight" not in store and L * (I + O) < I * O:
                norm = None
                if need_norm:
                    per = self.module.groups * (I * L + 2 * L * L) + call.inputs[0][0].numel()
                    norm = chunked_ghost_norm(call, chunks, per,
                                              lambda lo, hi: self.unfolded(call, lo, hi))
                result["weight"] = ParamSums(norm)
            else:
                rest = (*rest, "weight")
        if rest:
            result.update(super().process(call, rest, chunks, need_norm, need_coord, store))
        return result

    def ip(self, call: LayerCall, name: str, gbar: Tensor, chunks: Chunking) -> Tensor:
        d = call.deltas[0]
        assert d is not None
        if name == "bias":
            return d.reshape(call.n, d.shape[1], -1).sum(-1) @ gbar.to(d.dtype)
        return self.weight_bias_ip(call, gbar, None, chunks)

    def weight_bias_ip(self, call: LayerCall, gw: Tensor, gb: Tensor | None,
                       chunks: Chunking) -> Tensor:
        """⟨g_i, ḡ⟩ over the weight and (unless ``gb`` is None) the bias together, in the
        direct form: Σ_t δ_it · (ḡ_W ⋆ x_i + ḡ_b)_t, the layer's own convolution of its input
        with ḡ (one per chunk of samples), multiplied by the output gradient in place."""
        x, d = call.inputs[0], call.deltas[0]
        assert d is not None
        # under autocast the kept input and the output gradient may differ in dtype
        dt = torch.promote_types(x.dtype, d.dtype)
        w = gw.to(dt)
        bias = None if gb is None else gb.to(dt)
        per = x[0].numel() + 2 * d[0].numel()
        out = []
        for lo, hi in chunks(call.n, per):
            y = conv(self.module, x[lo:hi].to(dt), w, bias, self.pad)
            out.append(y.mul_(d[lo:hi]).reshape(hi - lo, -1).sum(1))
        return out[0] if len(out) == 1 else torch.cat(out)
