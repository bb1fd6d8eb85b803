"""A Linear or convolution whose weight is parametrized (``torch.nn.utils.parametrize``:
``weight_norm``, ``spectral_norm``, ``orthogonal``, or a user's own parametrization).

The weight the layer uses is W = f(θ), where θ are the original parameters (``weight_norm``:
the magnitude g and the direction v) that the optimizer updates. Sample i's gradient with
respect to θ is the vector-Jacobian product of f at θ with its gradient with respect to W:

    ∂ℓ_i/∂θ = J_f(θ)ᵀ ∂ℓ_i/∂W,

exact, since θ does not depend on the sample. The per-sample ∂ℓ_i/∂W come from the layer's
own rule (:class:`~adabatch.batching.persample.layers.LinearRule`,
:class:`~adabatch.batching.persample.conv.ConvRule`: a batched matrix product, no
recomputation of the layer), and J_f(θ)ᵀ is applied to them with one ``torch.func.vjp`` of f,
vmapped over the samples. A parametrization is a function of θ alone, so this is far cheaper
than recomputing the whole layer sample by sample (:class:`FuncRule`, which the estimator
uses for every other parametrized module).

``weight_norm`` (W = g·v/‖v‖) and ``spectral_norm`` (W = W_orig/σ, σ = uᵀ W_orig v with u,
v held fixed) have their pullbacks in closed form (:func:`weight_norm_pullback`,
:func:`spectral_norm_pullback`: elementwise on the batch, where torch's fused weight-norm
backward has no batching rule and vmap would loop over the samples), and on a Linear over
[b, in] inputs their norms and coordinate sums need no per-sample gradient at all
(:func:`flat_weight_norm_sums`, :func:`flat_spectral_norm_sums`: products of the forward's
size). Each closed form is used only where it reproduces the layer's weight (checked once).
Timed in ``benchmarks/parametrized_overhead.py``.

The parametrization runs in eval mode with the parametrized weight cached
(:func:`~adabatch.batching.persample.layers.parametrizations_in_eval`,
``parametrize.cached``): ``spectral_norm`` in training mode takes one power-iteration step
in each forward and then uses its vectors u, v, so after the pass they are the ones that
forward used; in eval mode they are used as they are and not advanced again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.nn.utils import parametrize

from adabatch.batching.persample.conv import ConvRule
from adabatch.batching.persample.layers import (
    LayerRule,
    LinearRule,
    Sums,
    common_float,
    parametrizations_in_eval,
)
from adabatch.batching.persample.records import Chunking, LayerCall, ParamSums, PerSampleTuning

#: the layer types whose parametrized weight this rule measures, and their own rule
BASES: tuple[tuple[type[nn.Module], type[LayerRule]], ...] = (
    (nn.Linear, LinearRule),
    (nn.Conv1d, ConvRule), (nn.Conv2d, ConvRule), (nn.Conv3d, ConvRule),
)

_PREFIX = "parametrizations.weight."
#: the classes of torch's weight_norm and spectral_norm parametrizations, by name (private
#: to torch.nn.utils.parametrizations; a closed form is also checked against the value)
_WEIGHT_NORM, _SPECTRAL_NORM = "_WeightNorm", "_SpectralNorm"


def parametrized_base(module: nn.Module, names: tuple[str, ...]) -> type[LayerRule] | None:
    """The rule of the layer under a parametrized weight that :class:`ParametrizedRule`
    measures through (the weight is the module's only parametrized tensor and ``names`` are
    its originals and the bias), or None (then :class:`FuncRule` measures the module)."""
    if set(module.parametrizations.keys()) != {"weight"}:
        return None
    if not all(nm == "bias" or nm.startswith(_PREFIX) for nm in names):
        return None
    return next((rule for cls, rule in BASES if isinstance(module, cls)), None)


class ParametrizedRule(LayerRule):
    """Per-sample gradients of a parametrized weight's originals by the vector-Jacobian
    product of its parametrization (see the module docstring); the bias by the layer's rule.
    """

    def __init__(self, module: nn.Module, names: tuple[str, ...], tuning: PerSampleTuning,
                 base: type[LayerRule]) -> None:
        super().__init__(module, names, tuning)
        self.plist = module.parametrizations["weight"]
        #: the originals' names in the module and in the ParametrizationList
        self.originals = tuple(nm for nm in names if nm.startswith(_PREFIX))
        with self.weight_as_in_pass():  # the base rule may read the weight's shape
            self.base = base(module, tuple(nm for nm in names if nm == "bias"), tuning)
        #: the dim of a lone weight_norm (closed-form pullback), else None
        self.weight_norm_dim = self._weight_norm_dim()
        #: a lone spectral_norm (closed-form pullback) on a matrix or larger, else None
        self.spectral = self._spectral_norm()

    @contextlib.contextmanager
    def weight_as_in_pass(self) -> Iterator[None]:
        """The parametrized weight as the pass used it, computed once: eval mode, cached."""
        with parametrizations_in_eval(self.module), parametrize.cached():
            yield

    def sample_numel(self, call: LayerCall, names: tuple[str, ...]) -> int:
        base = ("weight",) if any(nm in self.originals for nm in names) else ()
        base += ("bias",) if "bias" in names else ()
        weights = sum(self.param(nm).numel() for nm in names if nm in self.originals)
        with self.weight_as_in_pass():  # the base rule may read the weight's size
            return self.base.sample_numel(call, base) + 2 * weights

    def max_chunk(self) -> int | None:
        return self.base.max_chunk()

    def process(self, call: LayerCall, names: tuple[str, ...], chunks: Chunking,
                need_norm: bool, need_coord: bool, store: set[str]) -> Sums:
        """The norms and coordinate sums of a ``weight_norm`` (over rows) or
        ``spectral_norm`` Linear on [b, in] inputs in closed form
        (:func:`flat_weight_norm_sums`, :func:`flat_spectral_norm_sums`: no per-sample
        gradient materialised); anything else by the generic driver over :meth:`grads`."""
        a, D = call.inputs[0], call.deltas[0]
        if not (self._closed_form(call, names, store) and (need_norm or need_coord)):
            return super().process(call, names, chunks, need_norm, need_coord, store)
        assert D is not None
        theta = self._theta()
        if self.spectral is not None:
            sn = self.spectral
            norm, coord = flat_spectral_norm_sums(a, D, theta["original"], sn._u, sn._v,
                                                  int(sn.dim), need_norm, need_coord)
            out = {_PREFIX + "original": ParamSums(norm, coord)}
        else:
            sums = flat_weight_norm_sums(a, D, theta["original1"], theta["original0"],
                                         need_norm, need_coord)
            out = {_PREFIX + "original0": ParamSums(sums[0], sums[2]),
                   _PREFIX + "original1": ParamSums(sums[1], sums[3])}
        if "bias" in names:
            sq = D.to(common_float(a, D)).square()
            out["bias"] = ParamSums(sq.sum(dtype=torch.float64) if need_norm else None,
                                    sq.sum(0) if need_coord else None)
        return out

    def _closed_form(self, call: LayerCall, names: tuple[str, ...], store: set[str]) -> bool:
        """Whether the call is measured in closed form (:meth:`process`): ``weight_norm``
        over the rows, or ``spectral_norm``, of a Linear on [b, in] inputs, every original
        measured, nothing kept for the inner products."""
        return ((self.weight_norm_dim == 0 or self.spectral is not None)
                and isinstance(self.base, LinearRule)
                and call.inputs[0].dim() == 2 and call.deltas[0] is not None and not store
                and set(self.originals) <= set(names))

    def grads(self, call: LayerCall, names: tuple[str, ...], lo: int, hi: int
              ) -> dict[str, Tensor]:
        wanted = [nm for nm in names if nm in self.originals]
        base = ("weight",) * bool(wanted) + ("bias",) * ("bias" in names)
        with self.weight_as_in_pass():
            g = self.base.grads(call, base, lo, hi)
            out = {"bias": g["bias"]} if "bias" in names else {}
            if wanted:
                out.update(self._originals(g["weight"], wanted))
        return out

    def _theta(self) -> dict[str, Tensor]:
        """Every tensor the parametrization takes (measured or frozen), detached, by its
        name in the ParametrizationList."""
        return {nm: p.detach() for nm, p in self.plist.named_parameters()}

    def _weight_norm_dim(self) -> int | None:
        """The ``dim`` of a lone ``weight_norm`` parametrization whose weight is
        :func:`weight_norm_value` of its originals (checked once on the current values), or
        None: the generic vector-Jacobian product."""
        plist = self.plist
        if len(plist) != 1 or type(plist[0]).__name__ != _WEIGHT_NORM:
            return None
        dim = int(plist[0].dim)
        theta = self._theta()
        with torch.no_grad():
            ours = weight_norm_value(theta["original1"], theta["original0"], dim)
            same = torch.allclose(ours, functional_call(plist, theta, ()), rtol=1e-5, atol=0.0)
        return dim if same else None

    def _spectral_norm(self) -> nn.Module | None:
        """The lone ``spectral_norm`` parametrization of a weight with 2 or more dimensions
        whose value is W/σ(u, v) as :func:`spectral_norm_value` computes it (checked once,
        in eval mode), or None."""
        plist = self.plist
        if len(plist) != 1 or type(plist[0]).__name__ != _SPECTRAL_NORM:
            return None
        sn = plist[0]
        theta = self._theta()
        if theta["original"].dim() < 2:
            return None
        with torch.no_grad(), parametrizations_in_eval(self.module):
            ours = spectral_norm_value(theta["original"], sn._u, sn._v, int(sn.dim))
            same = torch.allclose(ours, functional_call(plist, theta, ()), rtol=1e-5, atol=0.0)
        return sn if same else None

    def _originals(self, gw: Tensor, wanted: list[str]) -> dict[str, Tensor]:
        """J_f(θ)ᵀ applied to each sample's weight gradient ``gw`` [c, *W.shape]: in closed
        form for ``weight_norm`` (:func:`weight_norm_pullback`) and ``spectral_norm``
        (:func:`spectral_norm_pullback`), else by ``torch.func.vjp`` of the
        parametrization, vmapped over the samples."""
        theta = self._theta()
        if self.weight_norm_dim is not None:
            dg, dv = weight_norm_pullback(gw, theta["original1"], theta["original0"],
                                          self.weight_norm_dim)
            per = {"original0": dg, "original1": dv}
        elif self.spectral is not None:
            sn = self.spectral
            per = {"original": spectral_norm_pullback(gw, theta["original"], sn._u, sn._v,
                                                      int(sn.dim))}
        else:
            w, pullback = vjp(lambda t: functional_call(self.plist, t, ()), theta)
            per = vmap(pullback)(gw.to(w.dtype))[0]
        return {nm: per[nm[len(_PREFIX):]] for nm in wanted}


def _norm_dims(v: Tensor, dim: int) -> list[int]:
    """The dimensions ``weight_norm`` takes ‖v‖ over: all but ``dim`` (−1: all of them)."""
    return [d for d in range(v.dim()) if dim == -1 or d != dim % v.dim()]


def weight_norm_value(v: Tensor, g: Tensor, dim: int) -> Tensor:
    """W = g · v / ‖v‖ with the norm over every dimension but ``dim`` (−1: over all), as
    ``torch._weight_norm(v, g, dim)`` computes it, in elementary operations."""
    return v * (g / torch.linalg.vector_norm(v, dim=_norm_dims(v, dim), keepdim=True))


def weight_norm_pullback(gw: Tensor, v: Tensor, g: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Per-sample gradients of ``weight_norm``'s originals from those of W = g·v/‖v‖
    (``gw`` [c, *W.shape]; norms over every dimension but ``dim``, −1: over all), with
    s_i = ⟨∂ℓ_i/∂W, v⟩ over the same dimensions:

        ∂ℓ_i/∂g = s_i / ‖v‖,    ∂ℓ_i/∂v = (g/‖v‖)·(∂ℓ_i/∂W − (s_i/‖v‖²)·v),

    as [c, *g.shape] and [c, *v.shape], in the dtype of ``gw`` promoted with v's."""
    dt = torch.promote_types(gw.dtype, v.dtype)
    gw, v, g = gw.to(dt), v.to(dt), g.to(dt)
    dims = _norm_dims(v, dim)
    norm = torch.linalg.vector_norm(v, dim=dims, keepdim=True)
    s = (gw * v).sum([d + 1 for d in dims], keepdim=True)  # [c, ...] like g, batched
    dg = (s / norm).reshape(gw.shape[0], *g.shape)
    dv = (g / norm) * (gw - (s / norm.square()) * v)
    return dg, dv


def power_iteration_in_training(module: nn.Module) -> str | None:
    """The name of a ``spectral_norm`` parametrization in training mode inside ``module``
    (it advances its u, v in every forward), or None. Recomputing one call of such a layer
    after the pass is exact only for its last forward (see the module docstring)."""
    for name, sub in module.named_modules():
        if type(sub).__name__ == _SPECTRAL_NORM and sub.training:
            return f"spectral_norm ({name})"
    return None


def _to_matrix(w: Tensor, dim: int) -> Tensor:
    """W as spectral_norm sees it: dimension ``dim`` first, the others flattened."""
    if dim != 0:
        w = w.permute(dim, *(d for d in range(w.dim()) if d != dim))
    return w.flatten(1)


def spectral_sigma(w: Tensor, u: Tensor, v: Tensor, dim: int) -> Tensor:
    """σ = uᵀ M v, M the matrix of W (:func:`_to_matrix`), as ``spectral_norm`` computes it
    from its vectors u, v."""
    return torch.dot(u, torch.mv(_to_matrix(w, dim), v))


def spectral_norm_value(w: Tensor, u: Tensor, v: Tensor, dim: int) -> Tensor:
    """W/σ (:func:`spectral_sigma`), the weight ``spectral_norm`` gives the layer."""
    return w / spectral_sigma(w, u, v, dim)


def spectral_norm_pullback(gw: Tensor, w: Tensor, u: Tensor, v: Tensor, dim: int) -> Tensor:
    """Per-sample gradients of ``spectral_norm``'s original weight from those of W/σ
    (``gw`` [c, *W.shape]), with u, v held fixed as spectral_norm holds them (they are
    computed without gradient): σ = uᵀ M v has ∂σ/∂W = u vᵀ (in W's layout), so

        ∂ℓ_i/∂W_orig = ∂ℓ_i/∂W / σ − (⟨∂ℓ_i/∂W, W_orig⟩/σ²) · u vᵀ,

    in the dtype of ``gw`` promoted with W's."""
    dt = torch.promote_types(gw.dtype, w.dtype)
    gw, w, u, v = gw.to(dt), w.to(dt), u.to(dt), v.to(dt)
    sigma = spectral_sigma(w, u, v, dim)
    uv = torch.outer(u, v)  # in the matrix layout: back to W's
    shape = [w.shape[dim]] + [n for d, n in enumerate(w.shape) if d != dim]
    uv = uv.reshape(shape)
    if dim != 0:
        uv = uv.movedim(0, dim)
    k = (gw * w).sum(list(range(1, gw.dim()))) / sigma.square()  # [c]
    return gw / sigma - k.reshape(-1, *[1] * w.dim()) * uv


def flat_spectral_norm_sums(a: Tensor, D: Tensor, w: Tensor, u: Tensor, v: Tensor, dim: int,
                            need_norm: bool, need_coord: bool
                            ) -> tuple[Tensor | None, Tensor | None]:
    """(Σ_i ‖∂ℓ_i/∂W_orig‖², Σ_i (∂ℓ_i/∂W_orig)²) of a Linear with ``spectral_norm`` on inputs
    a [b, in] with output gradients δ = D [b, out], without materialising a per-sample
    gradient (None where not needed). In W's layout ∂σ/∂W = p qᵀ (dim 0: p = u, q = v; dim 1:
    p = v, q = u), and with k_i = δ_iᵀ W a_i / σ², :func:`spectral_norm_pullback` gives
    ∂ℓ_i/∂W_orig = δ_i a_iᵀ/σ − k_i p qᵀ, so

        ‖∂ℓ_i/∂W_orig‖² = ‖δ_i‖²‖a_i‖²/σ² − 2 k_i (p·δ_i)(q·a_i)/σ + k_i² ‖p‖²‖q‖²,
        Σ_i (∂ℓ_i/∂W_orig)² = ((δ²)ᵀ(a²)/σ² − 2 p qᵀ ⊙ (k ⊙ δ)ᵀa/σ + (p qᵀ)² Σ_i k_i²),

    the coordinate sums clamped at 0 against rounding; in the inputs' common float type (at
    least float32), norms as float64 0-dim tensors (the sums of the coordinate sums when
    those are taken)."""
    dt = common_float(a, D)
    a_, D_, w_ = a.to(dt), D.to(dt), w.to(dt)
    sigma = spectral_sigma(w_, u.to(dt), v.to(dt), dim)
    p, q = (u.to(dt), v.to(dt)) if dim == 0 else (v.to(dt), u.to(dt))
    k = (D_ * (a_ @ w_.T)).sum(1) / sigma.square()  # [b]
    coord = norm = None
    if need_coord:
        pq = torch.outer(p, q)
        coord = (D_.square().T @ a_.square()).div_(sigma.square())
        coord.sub_(((D_ * k[:, None]).T @ a_).mul_(pq).mul_(2 / sigma))
        coord.add_(pq.square().mul_(k.square().sum())).clamp_min_(0)
        if need_norm:
            norm = coord.sum(dtype=torch.float64)
    elif need_norm:
        da = D_.square().sum(1) * a_.square().sum(1) / sigma.square()
        cross = 2 * k * (D_ @ p) * (a_ @ q) / sigma
        norm = (da - cross + k.square() * (p.square().sum() * q.square().sum())).sum(
            dtype=torch.float64)
    return norm, coord


def flat_weight_norm_sums(a: Tensor, D: Tensor, v: Tensor, g: Tensor, need_norm: bool,
                          need_coord: bool) -> tuple[Tensor | None, ...]:
    """(Σ_i ‖∂ℓ_i/∂g‖², Σ_i ‖∂ℓ_i/∂v‖², Σ_i (∂ℓ_i/∂g)², Σ_i (∂ℓ_i/∂v)²) of a Linear with
    ``weight_norm`` over its rows (W_o = g_o v_o/‖v_o‖) on inputs a [b, in] with output
    gradients δ = D [b, out], without materialising a per-sample gradient (None where not
    needed). With p_io = a_i·v_o (one product of the forward's size), s_io = δ_io p_io,
    r_io = s_io/‖v_o‖² and c_o = g_o/‖v_o‖, :func:`weight_norm_pullback` gives
    ∂ℓ_i/∂g_o = s_io/‖v_o‖ and ∂ℓ_i/∂v_o = c_o (δ_io a_i − r_io v_o), so

        Σ_i (∂ℓ_i/∂v_oj)² = c_o² ((δ²)ᵀ(a²) − 2 v ⊙ (δ ⊙ r)ᵀa + v² ⊙ Σ_i r_i²)_oj,
        ‖∂ℓ_i/∂v_o‖² = c_o² (δ_io² ‖a_i‖² − s_io²/‖v_o‖²)

    (the cross term is −2 c_o² δ_io r_io p_io = −2 c_o² s_io²/‖v_o‖²). The coordinate sums are
    sums of squares: clamped at 0 against rounding. Norms are float64 0-dim tensors (the
    sums of the coordinate sums when those are taken), computed in the inputs' common float
    type (at least float32), as are the coordinate sums."""
    dt = common_float(a, D)
    a_, D_ = a.to(dt), D.to(dt)
    v_, g_ = v.to(dt), g.reshape(-1).to(dt)
    norm2 = v_.square().sum(1)  # ‖v_o‖², [out]
    s = D_ * (a_ @ v_.T)  # s_io, [b, out]
    t = s.square() / norm2  # s_io²/‖v_o‖² = (∂ℓ_i/∂g_o)²
    c2 = g_.square() / norm2
    dg = dv = cg = cv = None
    if need_coord:
        r = s / norm2
        cg = t.sum(0).reshape(g.shape)
        cv = (D_.square().T @ a_.square()).sub_((D_ * r).T @ a_ * (2 * v_))
        cv = cv.add_(v_.square() * r.square().sum(0)[:, None]).mul_(c2[:, None]).clamp_min_(0)
        if need_norm:
            dg, dv = cg.sum(dtype=torch.float64), cv.sum(dtype=torch.float64)
    elif need_norm:
        dg = t.sum(dtype=torch.float64)
        asq = a_.square().sum(1, keepdim=True)  # ‖a_i‖², [b, 1]
        dv = ((D_.square() * asq - t) * c2).sum(dtype=torch.float64)
    return dg, dv, cg, cv
