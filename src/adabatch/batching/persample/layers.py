"""Per-sample gradient arithmetic, one rule per layer type (the convolution's is in conv.py).

A rule turns a :class:`~adabatch.batching.persample.records.LayerCall` (the layer's kept
inputs a and output gradients δ) into per-parameter sums (:meth:`LayerRule.process`) and, once
ḡ is known, into the inner products ⟨g_i, ḡ⟩ (:meth:`LayerRule.ip`).
"""

from __future__ import annotations

import contextlib
import inspect
import math
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_flatten, tree_unflatten

from adabatch.batching.persample.records import Chunking, LayerCall, ParamSums, PerSampleTuning
from adabatch.batching.stats import WIDE_FLOATS

Sums = dict[str, ParamSums]


class LayerRule:
    """Per-sample gradient arithmetic for one module type (base: the generic chunked path,
    which materialises the per-sample gradients of :meth:`grads` chunk by chunk)."""

    def __init__(self, module: nn.Module, names: tuple[str, ...], tuning: PerSampleTuning) -> None:
        self.module = module
        self.names = names
        self.tuning = tuning
        self.pids = tuple(id(module.get_parameter(nm)) for nm in names)
        #: the module's name in the model, for messages
        self.label = type(module).__name__

    #: the dimension of the batch in the layer's first input
    batch_dim = 0

    def param(self, name: str) -> Tensor:
        return self.module.get_parameter(name)

    # --- to override -------------------------------------------------------------------
    def grads(self, call: LayerCall, names: tuple[str, ...], lo: int, hi: int
              ) -> dict[str, Tensor]:
        """Per-sample contributions [hi-lo, *shape] of samples lo:hi for each name."""
        raise NotImplementedError

    def sample_numel(self, call: LayerCall, names: tuple[str, ...]) -> int:
        """Elements per sample of the temporaries of :meth:`grads` (for chunking)."""
        return sum(self.param(nm).numel() for nm in names)

    def max_chunk(self) -> int | None:
        """An upper bound on the samples per chunk of :meth:`grads` (None: the budget's)."""
        return None

    def kept_numel(self, call: LayerCall) -> int:
        """Elements per sample that keeping the call for a later inner product costs."""
        total = 0
        for t in tree_flatten((call.inputs, call.deltas))[0]:
            if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == call.n:
                total += t[0].numel()
        return total

    def ip(self, call: LayerCall, name: str, gbar: Tensor, chunks: Chunking) -> Tensor:
        """⟨contribution_i, ḡ⟩ for every sample i: a tensor [n]."""
        out = []
        for lo, hi in chunks(call.n, self.sample_numel(call, (name,))):
            g = self.grads(call, (name,), lo, hi)[name]
            out.append(g.reshape(hi - lo, -1) @ gbar.reshape(-1).to(g.dtype))
        return torch.cat(out)

    def weight_bias_ip(self, call: LayerCall, gw: Tensor, gb: Tensor | None,
                       chunks: Chunking) -> Tensor:
        """⟨g_i, ḡ⟩ over weight and bias together (Linear and Conv rules only)."""
        raise NotImplementedError

    # --- generic driver ------------------------------------------------------------------
    def process(self, call: LayerCall, names: tuple[str, ...], chunks: Chunking,
                need_norm: bool, need_coord: bool, store: set[str]) -> Sums:
        """Norm sum, coordinate sums and (for names in ``store``) the kept per-sample
        gradients of each name.

        With ``call.fuse`` the per-sample weight (and bias) gradients are also summed into
        ``call.wsum`` (``call.bsum``), which then serve as the batch gradients (fused_conv.py)."""
        fuse = call.fuse and "weight" in names and (need_norm or need_coord or "weight" in store)
        acc = {nm: ParamSums() for nm in names}
        if not (need_norm or need_coord or store or fuse):
            return acc  # nothing to measure here
        wsum = bsum = None
        for lo, hi in chunks(call.n, self.sample_numel(call, names), self.max_chunk()):
            grads = self.grads(call, names, lo, hi)
            for nm in names:
                acc[nm].add(grads[nm], need_norm, need_coord, nm in store)
            if fuse:
                part = grads["weight"].sum(0)
                wsum = part if wsum is None else wsum.add_(part)
                if "bias" in grads:
                    part = grads["bias"].sum(0)
                    bsum = part if bsum is None else bsum.add_(part)
        if fuse:
            call.wsum, call.bsum = wsum, bsum
        return acc


def ghost_sq_norm(U: Tensor, D: Tensor) -> Tensor:
    """Σ_i ‖D_i U_iᵀ‖² from U [B, I, L] and D [B, O, L] via L × L Gram matrices."""
    gu = torch.bmm(U.transpose(1, 2), U)
    gd = torch.bmm(D.transpose(1, 2), D)
    return (gu * gd).sum(dtype=torch.float64)


def chunked_ghost_norm(call: LayerCall, chunks: Chunking, per: int,
                       pair: Callable[[int, int], tuple[Tensor, Tensor]]) -> Tensor:
    """Σ_i ‖g_i‖² of one weight by ghost products, over chunks of samples that keep ``per``
    elements per sample within the memory budget; ``pair(lo, hi)`` gives the (U, D) factors
    of samples lo..hi for :func:`ghost_sq_norm`."""
    norm = torch.zeros((), dtype=torch.float64, device=call.inputs[0].device)
    for lo, hi in chunks(call.n, per):
        norm += ghost_sq_norm(*pair(lo, hi))
    return norm


def common_float(a: Tensor, b: Tensor) -> torch.dtype:
    """The dtype to reduce ``a`` and ``b`` in: their common type, at least float32 (inputs and
    output gradients may differ in dtype under autocast). The common case, both float32 or
    both float64, is answered without promotion (this runs in the Linear hook every step)."""
    if a.dtype is b.dtype and a.dtype in WIDE_FLOATS:
        return a.dtype
    return torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)


def flat_linear_sums(a: Tensor, D: Tensor, bias: bool, need_norm: bool, need_coord: bool,
                     dt: torch.dtype, dsq: Tensor | None = None
                     ) -> tuple[list[Tensor], Tensor | None, Tensor | None]:
    """A Linear on [b, in] inputs (g_i = δ_i a_iᵀ): the parts of Σ_i ‖g_i‖²
    (Σ_i ‖a_i‖²‖δ_i‖², and Σ_i ‖δ_i‖² for the bias) and Σ_i g_i² = (δ²)ᵀ(a²) (and Σ_i δ_i²),
    in ``dt``, without an n × in temporary; ``dsq``: δ² if already computed."""
    parts = []
    coord_w = coord_b = None
    if need_norm:
        nd = torch.linalg.vector_norm(D, dim=1, dtype=dt)
        t = torch.linalg.vector_norm(a, dim=1, dtype=dt).mul_(nd)
        parts.append(torch.dot(t, t))
        if bias:
            parts.append(torch.dot(nd, nd))
    if need_coord:
        if dsq is None:
            dsq = D.to(dt).square()
        coord_w = dsq.T @ a.to(dt).square()
        if bias:
            coord_b = dsq.sum(0)
    return parts, coord_w, coord_b


def linear_gram(a: Tensor, D: Tensor, bias: bool, dt: torch.dtype, need_norm: bool
                ) -> tuple[Tensor, Tensor | None]:
    """A Linear on [b, in] inputs: the Gram form ⟨g_i, Σ_j g_j⟩ = Σ_j (δ_i·δ_j)(a_i·a_j +
    [bias]) for every i ([b], in ``dt``), and (with ``need_norm``) Σ_i ‖g_i‖², the trace of
    the same products."""
    a_ = a if a.dtype is dt else a.to(dt)
    D_ = D if D.dtype is dt else D.to(dt)
    P = D_ @ D_.T
    M = a_ @ a_.T
    if bias:
        M.add_(1.0)
    P.mul_(M)  # P_ij = ⟨g_i, g_j⟩
    return P.sum(1), (torch.trace(P) if need_norm else None)


class LinearRule(LayerRule):
    """nn.Linear over [b, in] or [b, T..., in]."""

    def sequences(self, call: LayerCall, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        """Inputs [c, L, in] and output gradients [c, L, out] of samples lo:hi; in one dtype
        (:func:`common_float`) where they differ, as under autocast, which casts the input
        inside the layer (the hook keeps it uncast) and sends back a low-precision gradient."""
        a, d = call.inputs[0], call.deltas[0]
        assert d is not None
        A = a[lo:hi].reshape(hi - lo, -1, a.shape[-1])
        D = d[lo:hi].reshape(hi - lo, -1, d.shape[-1])
        if A.dtype is not D.dtype:
            dt = common_float(A, D)
            A, D = A.to(dt), D.to(dt)
        return A, D

    def grads(self, call: LayerCall, names: tuple[str, ...], lo: int, hi: int
              ) -> dict[str, Tensor]:
        A, D = self.sequences(call, lo, hi)
        out = {}
        if "weight" in names:
            out["weight"] = torch.bmm(D.transpose(1, 2), A)
        if "bias" in names:
            out["bias"] = D.sum(1)
        return out

    def sample_numel(self, call: LayerCall, names: tuple[str, ...]) -> int:
        a, d = call.inputs[0], call.deltas[0]
        total = d[0].numel() if d is not None else 0
        if "weight" in names:
            total += a[0].numel() + self.module.weight.numel()
        return total

    def process(self, call: LayerCall, names: tuple[str, ...], chunks: Chunking,
                need_norm: bool, need_coord: bool, store: set[str]) -> Sums:
        a = call.inputs[0]
        if (a.dim() == 2 and not need_coord and "weight" in names and "weight" not in store
                and set(names) <= {"weight", "bias"}):
            return self._flat_norms(call, names, need_norm, store)
        result: Sums = {}
        rest = tuple(nm for nm in names if nm != "weight")
        dsq = None  # δ² of a layer without a sequence axis, shared by bias and weight
        if rest == ("bias",):
            result["bias"], dsq = self._bias_sums(call, need_norm, need_coord, "bias" in store)
            rest = ()
        if "weight" in names:
            sums = self._weight_sums(call, chunks, need_norm, need_coord, store, dsq)
            if sums is None:
                rest = (*rest, "weight")
            else:
                result["weight"] = sums
        if rest:
            result.update(super().process(call, rest, chunks, need_norm, need_coord, store))
        return result

    @staticmethod
    def _flat_norms(call: LayerCall, names: tuple[str, ...], need_norm: bool,
                    store: set[str]) -> Sums:
        """No sequence axis, norms only: Σ_i ‖δ_i‖²(‖a_i‖² + [bias]) in one dot product for
        weight and bias together, without n × in temporaries."""
        a, D = call.inputs[0], call.deltas[0]
        assert D is not None
        norm = None
        if need_norm:
            dt = common_float(a, D)
            na = torch.linalg.vector_norm(a, dim=1, dtype=dt).square_()
            if "bias" in names:
                na.add_(1.0)
            nd = torch.linalg.vector_norm(D, dim=1, dtype=dt)
            norm = torch.dot(na, nd.square_())
        result = {"weight": ParamSums(norm)}
        if "bias" in names:
            result["bias"] = ParamSums(kept=[D] if "bias" in store else None)
        return result

    def _bias_sums(self, call: LayerCall, need_norm: bool, need_coord: bool,
                   keep: bool) -> tuple[ParamSums, Tensor | None]:
        """The bias (g_i = Σ_t δ_it); also δ² when there is no sequence axis (for the weight)."""
        _, D = self.sequences(call, 0, call.n)
        Db = D[:, 0] if D.shape[1] == 1 else D.sum(1)
        norm = torch.dot(Db.reshape(-1), Db.reshape(-1)).double() if need_norm else None
        coord = dsq = None
        if need_coord:
            sq = Db.square()
            coord = sq.sum(0)
            if D.shape[1] == 1:
                dsq = sq
        return ParamSums(norm, coord, [Db] if keep else None), dsq

    def _weight_sums(self, call: LayerCall, chunks: Chunking, need_norm: bool,
                     need_coord: bool, store: set[str], dsq: Tensor | None) -> ParamSums | None:
        """The weight without materialising g_i where possible: the outer product for L = 1,
        the ghost product when cheaper; None: materialise (the generic path)."""
        if "weight" in store:
            return None
        a = call.inputs[0]
        L = a[0].numel() // a.shape[-1]
        out_f, in_f = self.module.weight.shape
        if L == 1:
            A, D = self.sequences(call, 0, call.n)
            A, D = A[:, 0], D[:, 0]
            parts, coord, _ = flat_linear_sums(A, D, False, need_norm, need_coord,
                                               torch.promote_types(A.dtype, D.dtype), dsq)
            return ParamSums(parts[0].double() if parts else None, coord)
        if need_coord or L * (in_f + out_f) >= in_f * out_f:
            return None
        norm = None
        if need_norm:
            norm = chunked_ghost_norm(
                call, chunks, L * (L + in_f + out_f),
                lambda lo, hi: tuple(t.transpose(1, 2) for t in self.sequences(call, lo, hi)))
        return ParamSums(norm)

    def ip(self, call: LayerCall, name: str, gbar: Tensor, chunks: Chunking) -> Tensor:
        if name == "bias":
            _, D = self.sequences(call, 0, call.n)
            return D.sum(1) @ gbar.to(D.dtype)
        return self.weight_bias_ip(call, gbar, None, chunks)

    def weight_bias_ip(self, call: LayerCall, gw: Tensor, gb: Tensor | None,
                       chunks: Chunking) -> Tensor:
        """⟨g_i, ḡ⟩ over the weight and (unless ``gb`` is None) the bias together:
        Σ_t δ_it · (ḡ_W a_it + ḡ_b), one addmm per chunk."""
        a, d = call.inputs[0], call.deltas[0]
        assert d is not None
        per = math.prod(a.shape[1:]) + 2 * math.prod(d.shape[1:])
        bias = gb if gb is None or gb.dtype is a.dtype else gb.to(a.dtype)
        if gw.dtype is not a.dtype:
            gw = gw.to(a.dtype)
        if a.dim() == 2 and chunks.size is None and call.n * per <= chunks.budget:
            return F.linear(a, gw, bias).mul_(d).sum(1)  # the common case, in one
        out = []
        for lo, hi in chunks(call.n, per):
            A, D = self.sequences(call, lo, hi)
            out.append(F.linear(A, gw, bias).mul_(D).sum((1, 2)))
        return out[0] if len(out) == 1 else torch.cat(out)


class TransposedLinearRule(LinearRule):
    """A Linear whose weight is stored transposed, [in, out] (the ``Conv1D`` of Hugging Face
    transformers' GPT-2: ``x @ weight + bias``): the Linear arithmetic, transposed."""

    def grads(self, call: LayerCall, names: tuple[str, ...], lo: int, hi: int
              ) -> dict[str, Tensor]:
        out = super().grads(call, names, lo, hi)
        if "weight" in out:
            out["weight"] = out["weight"].transpose(1, 2)
        return out

    def _weight_sums(self, call: LayerCall, chunks: Chunking, need_norm: bool,
                     need_coord: bool, store: set[str], dsq: Tensor | None) -> ParamSums | None:
        sums = super()._weight_sums(call, chunks, need_norm, need_coord, store, dsq)
        if sums is not None and sums.coord is not None:
            sums.coord = sums.coord.T.contiguous()
        return sums

    def weight_bias_ip(self, call: LayerCall, gw: Tensor, gb: Tensor | None,
                       chunks: Chunking) -> Tensor:
        return super().weight_bias_ip(call, gw.T, gb, chunks)


def is_transposed_linear(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (checked by name: transformers is an optional dependency)."""
    cls = type(module)
    return (cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")
            and getattr(module, "weight", None) is not None and module.weight.dim() == 2)


class EmbeddingRule(LayerRule):
    """nn.Embedding: sparse per-sample rows, never b × vocab × dim."""

    def indices(self, call: LayerCall, lo: int, hi: int) -> tuple[Tensor, Tensor]:
        """Indices [c, T] and their output gradients [c, T, dim] (0 at ``padding_idx``)."""
        m = self.module
        idx = call.inputs[0][lo:hi].reshape(hi - lo, -1)
        D = call.deltas[0][lo:hi].reshape(hi - lo, -1, m.embedding_dim)  # type: ignore[index]
        if m.padding_idx is not None:
            D = D * (idx != m.padding_idx).unsqueeze(-1).to(D.dtype)
        return idx, D

    def grads(self, call: LayerCall, names: tuple[str, ...], lo: int, hi: int
              ) -> dict[str, Tensor]:
        V, dim = self.module.weight.shape
        idx, D = self.indices(call, lo, hi)
        c = hi - lo
        keys = (torch.arange(c, device=idx.device).unsqueeze(1) * V + idx).reshape(-1)
        out = D.new_zeros(c * V, dim).index_add_(0, keys, D.reshape(-1, dim))
        return {"weight": out.reshape(c, V, dim)}

    def sample_numel(self, call: LayerCall, names: tuple[str, ...]) -> int:
        return self.module.weight.numel()

    def kept_numel(self, call: LayerCall) -> int:
        return call.inputs[0][0].numel() * (1 + self.module.embedding_dim)

    def process(self, call: LayerCall, names: tuple[str, ...], chunks: Chunking,
                need_norm: bool, need_coord: bool, store: set[str]) -> Sums:
        V, dim = self.module.weight.shape
        idx, D = self.indices(call, 0, call.n)
        keys = (torch.arange(call.n, device=idx.device).unsqueeze(1) * V + idx).reshape(-1)
        uniq, inv = torch.unique(keys, return_inverse=True)
        S = D.new_zeros(uniq.numel(), dim).index_add_(0, inv, D.reshape(-1, dim)).square_()
        norm = S.sum(dtype=torch.float64) if need_norm else None
        coord = D.new_zeros(V, dim).index_add_(0, uniq % V, S) if need_coord else None
        return {"weight": ParamSums(norm, coord)}

    def ip(self, call: LayerCall, name: str, gbar: Tensor, chunks: Chunking) -> Tensor:
        idx, D = self.indices(call, 0, call.n)
        return (D * gbar.to(D.dtype)[idx]).reshape(call.n, -1).sum(1)


class NormRule(LayerRule):
    """LayerNorm / GroupNorm / RMSNorm with affine parameters (always materialised)."""

    def _xhat(self, x: Tensor) -> Tensor:
        m = self.module
        if isinstance(m, nn.GroupNorm):
            return F.group_norm(x, m.num_groups, None, None, m.eps)
        if isinstance(m, nn.LayerNorm):
            return F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        return F.rms_norm(x, m.normalized_shape, None, m.eps)

    def grads(self, call: LayerCall, names: tuple[str, ...], lo: int, hi: int
              ) -> dict[str, Tensor]:
        m = self.module
        c = hi - lo
        x = call.inputs[0][lo:hi]
        d = call.deltas[0][lo:hi]  # type: ignore[index]
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

    def sample_numel(self, call: LayerCall, names: tuple[str, ...]) -> int:
        return 3 * call.inputs[0][0].numel()


class FuncRule(LayerRule):
    """Any other module with its own parameters: chunked torch.func.vmap(grad(...)) of the
    module alone, sample by sample (a batch of one), with the output gradients as weights.

    Exact for a module that treats each sample alone and runs deterministically: a module in
    training mode with an active dropout inside raises (see :meth:`random_part`), and so
    does a recomputation that does not reproduce the module's output in the pass (a random
    or batch-mixing operation inside it, or a batch that is not along dimension 0)."""

    def sample_numel(self, call: LayerCall, names: tuple[str, ...]) -> int:
        return 4 * self.kept_numel(call) + sum(self.param(nm).numel() for nm in names)

    def random_part(self) -> str | None:
        """The name of a dropout that is active in the module (it would draw other masks in
        the per-sample recomputation than in the pass), or None."""
        for name, sub in self.module.named_modules():
            if not sub.training:
                continue
            p = (sub.p if isinstance(sub, nn.modules.dropout._DropoutNd)
                 else sub.dropout if isinstance(sub, nn.MultiheadAttention) else 0.0)
            if p > 0:
                return name or "itself"
        return None

    def split(self, call: LayerCall) -> tuple[list, list[int | None], Callable[[list], tuple]]:
        """The call's inputs as a flat list, the batch dimension of each (None: shared by
        the samples), and a function that makes (args, kwargs) of one sample from the
        per-sample slices (batch dimension removed) and the shared inputs."""
        flat, spec = tree_flatten((call.inputs, call.kwargs))
        dims = [0 if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == call.n else None
                for t in flat]

        def build(xs: list) -> tuple:
            return tree_unflatten([x.unsqueeze(0) if dm == 0 else x
                                   for x, dm in zip(xs, dims)], spec)
        return flat, dims, build

    def out_dims(self, call: LayerCall) -> list[int]:
        """The batch dimension of each tensor output."""
        return [0] * len(call.deltas)

    def grads(self, call: LayerCall, names: tuple[str, ...], lo: int, hi: int
              ) -> dict[str, Tensor]:
        from torch.func import functional_call, grad, vmap

        m = self.module
        params = {nm: self.param(nm).detach() for nm in names}
        flat, dims, build = self.split(call)
        xs = [t.narrow(d, lo, hi - lo) if d is not None else t for t, d in zip(flat, dims)]
        odims = self.out_dims(call)
        ds = [None if d is None else d.narrow(od, lo, hi - lo)
              for d, od in zip(call.deltas, odims)]
        d_dims = [None if d is None else od for d, od in zip(ds, odims)]

        def loss(p: dict[str, Tensor], xs_: list, ds_: list[Tensor | None]
                 ) -> tuple[Tensor, list[Tensor]]:
            args, kwargs = build(xs_)
            outs = [o for o in tree_flatten(functional_call(m, p, args, kwargs))[0]
                    if isinstance(o, Tensor)]
            total = torch.zeros((), dtype=torch.float64)
            for o, dl, od in zip(outs, ds_, odims):
                if dl is not None:
                    total = total + (o * dl.unsqueeze(od)).sum()
            return total, [o.detach().squeeze(od) for o, od in zip(outs, odims)]

        with warnings.catch_warnings(), parametrizations_in_eval(m):
            # torch's vmap falls back to a loop for ops without a batching rule (the CPU
            # attention kernels): slower, still exact
            warnings.filterwarnings("ignore", message="There is a performance drop")
            # random operations draw per sample: check_outputs reports them
            try:
                g, outs = vmap(grad(loss, has_aux=True), in_dims=(None, dims, d_dims),
                               randomness="different")(params, xs, ds)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as e:
                raise ValueError(
                    f"PerSampleStats: layer {self.label!r} ({type(m).__name__}, measured by "
                    f"recomputing it sample by sample) cannot be run by torch.func.vmap: {e}; "
                    f"leave its parameters out (exclude=[{self.label!r}]) or use "
                    f"MicroBatchStats") from e
        self.check_outputs(call, outs, lo, hi)
        return g

    def check_outputs(self, call: LayerCall, outs: list[Tensor], lo: int, hi: int) -> None:
        """Raise unless the per-sample recomputation ``outs`` ([c, ...] each) reproduces the
        outputs of samples lo:hi in the pass (up to rounding of the dtype)."""
        odims = self.out_dims(call)
        if len(outs) != len(call.outputs):
            raise ValueError(f"PerSampleStats: layer {self.label!r} returns {len(outs)} tensors "
                             f"when recomputed for one sample, {len(call.outputs)} in the pass")
        for o, ref, od in zip(outs, call.outputs, odims):
            ref = ref.narrow(od, lo, hi - lo).movedim(od, 0)
            tol = _TOLERANCE.get(ref.dtype, 5e-2) * max(1.0, float(ref.abs().max()))
            if o.shape != ref.shape or float((o - ref).abs().max()) > tol:
                raise ValueError(
                    f"PerSampleStats: layer {self.label!r} (measured by recomputing it sample "
                    f"by sample) does not give the same output for a sample alone as in the "
                    f"batch: it is random (dropout), mixes the samples, or does not take the "
                    f"batch along dimension 0; make it deterministic, exclude its parameters "
                    f"(exclude=...), or use MicroBatchStats")


@contextlib.contextmanager
def parametrizations_in_eval(module: nn.Module) -> Iterator[None]:
    """The parametrizations inside ``module`` (``torch.nn.utils.parametrize``) in eval mode
    for the duration, then each submodule's mode restored.

    For :class:`FuncRule`'s recomputation of a pass's call: a parametrization that updates a
    state in training mode (``spectral_norm``'s power iteration on its vectors u, v) updates
    it in its forward and then uses it, so after the pass the state is the one that forward
    used. In eval mode the recomputation uses that state as it is: the same tensor as in the
    pass, and the state not advanced a second time. Parametrizations without such a state
    (``weight_norm``, ``orthogonal``) compute the same in both modes."""
    lists = [sub for sub in module.modules() if isinstance(sub, parametrize.ParametrizationList)]
    modes = [(sub, sub.training) for plist in lists for sub in plist.modules()]
    for plist in lists:
        plist.eval()
    try:
        yield
    finally:
        for sub, training in modes:
            sub.training = training


#: the largest deviation (relative to the output's scale) of a per-sample recomputation
#: from the batched output that counts as rounding, by dtype
#: (float32: TF32 matmuls round to about 1e-3; a dropout or a batch statistic differs by far
#: more)
_TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-2}


#: the arguments of the attention modules that hold the samples along the batch dimension
_SEQUENCES = frozenset({"query", "key", "value", "src", "tgt", "memory"})


class AttentionRule(FuncRule):
    """nn.MultiheadAttention (whose out_proj weight is used by F.multi_head_attention_forward,
    not through out_proj's own forward), and nn.TransformerEncoderLayer /
    nn.TransformerDecoderLayer with ``batch_first=False``: the whole module through the
    torch.func path over all its parameters (its submodules get no hooks of their own).

    Batch dimension: 0 with ``batch_first``, else 1, for the sequences and the attention
    output; 0 for key padding masks and the attention weights. A 3-D attention mask
    [b·heads, T, S] is split by sample; a 2-D one is shared."""

    def __init__(self, module: nn.Module, names: tuple[str, ...], tuning: PerSampleTuning) -> None:
        super().__init__(module, names, tuning)
        self.batch_dim = 0 if getattr(module, "batch_first", False) else 1
        self._signature = inspect.signature(module.forward)

    def split(self, call: LayerCall) -> tuple[list, list[int | None], Callable[[list], tuple]]:
        bound = self._signature.bind(*call.inputs, **call.kwargs)
        keys = list(bound.arguments)
        flat: list = []
        dims: list[int | None] = []
        for key in keys:
            v = bound.arguments[key]
            d = None
            if isinstance(v, Tensor):
                if key in _SEQUENCES:
                    d = self.batch_dim
                elif key.endswith("key_padding_mask"):
                    d = 0
                elif key.endswith("mask") and v.dim() == 3:
                    v, d = v.reshape(call.n, -1, *v.shape[1:]), 0  # [b, heads, T, S]
            flat.append(v)
            dims.append(d)
        bd = self.batch_dim

        def build(xs: list) -> tuple:
            kwargs = {}
            for key, x, d in zip(keys, xs, dims):
                if d is not None and key in _SEQUENCES:
                    x = x.unsqueeze(bd)
                elif d is not None and key.endswith("key_padding_mask"):
                    x = x.unsqueeze(0)
                kwargs[key] = x  # a split 3-D mask: [heads, T, S] is one sample's
            return (), kwargs
        return flat, dims, build

    def out_dims(self, call: LayerCall) -> list[int]:
        return [self.batch_dim] + [0] * (len(call.deltas) - 1)  # output, attention weights

    def kept_numel(self, call: LayerCall) -> int:
        flat, dims, _ = self.split(call)
        tensors = [t for t, d in zip(flat, dims) if d is not None]
        tensors += [d for d in call.deltas if d is not None]
        return sum(t.numel() for t in tensors) // max(1, call.n)
