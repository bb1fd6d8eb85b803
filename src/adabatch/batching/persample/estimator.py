"""PerSampleStats: the hooks that collect each layer call's inputs and output gradients, the
per-pass bookkeeping (single-use and shared parameters), and the statistics at the end of a
step. The arithmetic of each layer type is in layers.py and conv.py."""

from __future__ import annotations

import contextlib
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize
from torch.utils._pytree import tree_flatten

from adabatch import _dist
from adabatch._validation import check_callable, check_int
from adabatch.batching import _sharded
from adabatch.batching.persample.conv import ConvRule
from adabatch.batching.persample.fused_conv import ConvFusion, fusable
from adabatch.batching.persample.layers import (
    AttentionRule,
    EmbeddingRule,
    FuncRule,
    LayerRule,
    LinearRule,
    NormRule,
    TransposedLinearRule,
    common_float,
    flat_linear_sums,
    is_transposed_linear,
    linear_gram,
)
from adabatch.batching.persample.parametrized import (
    ParametrizedRule,
    parametrized_base,
    power_iteration_in_training,
)
from adabatch.batching.persample.records import (
    CallProducts,
    Chunking,
    IPItem,
    KeptGrads,
    LayerCall,
    ParamSums,
    PassProducts,
    PerSampleTuning,
    WeightBiasProducts,
)
from adabatch.batching.protocol import ParamWatch, StepScope
from adabatch.batching.stats import (
    STAT_NAMES,
    GradientStats,
    Reduce,
    check_needs,
    mean_grads,
    plain_grad,
    stack_f64,
    stats_from_parts,
)

#: Default bound on the number of elements of one temporary tensor (per chunk of samples).
DEFAULT_BUDGET = 2**20

_NORM_STATS = frozenset({"variance_trace", "orth_variance"})
_IP_STATS = frozenset({"ip_variance", "orth_variance"})

#: (module type, rule, the parameter names the rule knows); any other module with its own
#: trainable parameters gets :class:`FuncRule`.
RULES: tuple[tuple[type[nn.Module], type[LayerRule], tuple[str, ...]], ...] = (
    (nn.Linear, LinearRule, ("weight", "bias")),
    (nn.Conv1d, ConvRule, ("weight", "bias")),
    (nn.Conv2d, ConvRule, ("weight", "bias")),
    (nn.Conv3d, ConvRule, ("weight", "bias")),
    (nn.Embedding, EmbeddingRule, ("weight",)),
    (nn.LayerNorm, NormRule, ("weight", "bias")),
    (nn.GroupNorm, NormRule, ("weight", "bias")),
    *(((nn.RMSNorm, NormRule, ("weight",)),) if hasattr(nn, "RMSNorm") else ()),
)


def is_unit(module: nn.Module) -> bool:
    """Whether the module is measured as a whole, with the parameters of its submodules: an
    attention unit (:func:`is_attention_unit`), or a module with a parametrized tensor
    (``torch.nn.utils.parametrize``: ``weight_norm``, ``spectral_norm``, ``orthogonal``,
    ...), whose original parameters live in its ``parametrizations`` submodule and are used
    only through the module's forward (:class:`ParametrizedRule` for a Linear or convolution
    weight, else :class:`FuncRule` over the module)."""
    return is_attention_unit(module) or parametrize.is_parametrized(module)


def is_attention_unit(module: nn.Module) -> bool:
    """Whether the module is measured as a whole by
    :class:`~adabatch.batching.persample.layers.AttentionRule`: nn.MultiheadAttention (its
    out_proj weight is used outside out_proj's forward), and the transformer layers, stacks and
    nn.Transformer with ``batch_first=False`` (their Linear and LayerNorm layers see the batch
    along dimension 1)."""
    if isinstance(module, nn.MultiheadAttention):
        return True
    if isinstance(module, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)):
        return not module.self_attn.batch_first
    if isinstance(module, (nn.TransformerEncoder, nn.TransformerDecoder)):
        return bool(module.layers) and not module.layers[0].self_attn.batch_first
    if isinstance(module, nn.Transformer):
        return not module.batch_first
    return False


def module_type(module: nn.Module) -> type:
    """The module's class; for a module wrapped by FSDP2's ``fully_shard``, which swaps in a
    subclass ``FSDP<Class>`` of (FSDPModule, Class), the class it wrapped."""
    cls = type(module)
    fsdp = sys.modules.get("torch.distributed.fsdp")  # no FSDP module before its import
    if fsdp is not None and issubclass(cls, fsdp.FSDPModule):
        return next(b for b in cls.__bases__ if not issubclass(b, fsdp.FSDPModule))
    return cls


def rule_for(module: nn.Module, names: tuple[str, ...], tuning: PerSampleTuning) -> LayerRule:
    """The layer rule of ``module`` whose trainable parameters are ``names``."""
    if is_attention_unit(module):
        return AttentionRule(module, names, tuning)
    if parametrize.is_parametrized(module):
        base = parametrized_base(module, names)
        return (FuncRule(module, names, tuning) if base is None
                else ParametrizedRule(module, names, tuning, base))
    if is_transposed_linear(module) and set(names) <= {"weight", "bias"}:
        return TransposedLinearRule(module, names, tuning)
    kind = module_type(module)
    for cls, rule, known in RULES:
        if kind is cls and set(names) <= set(known):
            return rule(module, names, tuning)
    return FuncRule(module, names, tuning)


def has_grad_hooks(p: Tensor) -> bool:
    """Whether a gradient hook (``register_hook``, ``register_post_accumulate_grad_hook``)
    sits on the parameter: it may change the gradient on its way into p.grad. torch has no
    public accessor for a tensor's hooks; this reads its hook dicts, and treats a torch
    without them as "no hooks" (then a hook that changes p.grad must come with
    ``PerSampleTuning(gram_form=False)``, see :class:`PerSampleStats`)."""
    return bool(getattr(p, "_backward_hooks", None)
                or getattr(p, "_post_accumulate_grad_hooks", None))


def _resolve(model: nn.Module, item: object, what: str) -> set[int]:
    """The ids of the parameters that one entry of ``params=`` / ``exclude=`` names."""
    if isinstance(item, nn.Module):
        if not any(m is item for m in model.modules()):
            raise ValueError(f"Invalid {what}: {type(item).__name__} is not a module of the model")
        return {id(p) for p in item.parameters()}
    if isinstance(item, Tensor):
        if not any(p is item for p in model.parameters()):
            raise ValueError(f"Invalid {what}: a tensor of shape {tuple(item.shape)} that is not "
                             f"a parameter of the model")
        return {id(item)}
    if isinstance(item, str):
        named = dict(model.named_parameters(remove_duplicate=False))
        if item in named:
            return {id(named[item])}
        modules = dict(model.named_modules(remove_duplicate=False))
        if item in modules:
            return {id(p) for p in modules[item].parameters()}
        raise ValueError(f"Invalid {what}: the model has no parameter or module named {item!r}")
    raise TypeError(f"Invalid {what}: {type(item).__name__} (must be a parameter, a module, "
                    f"or the name of either)")


def _check_options(chunk_size: int | None, budget: int, reduce: Reduce | None,
                   tuning: PerSampleTuning | None) -> None:
    if chunk_size is not None:
        check_int("chunk_size", chunk_size)
    check_int("budget", budget)
    if reduce is not None:
        check_callable("reduce", reduce)
    if tuning is not None and not isinstance(tuning, PerSampleTuning):
        raise TypeError(f"Invalid tuning: {type(tuning).__name__} (must be a PerSampleTuning)")


def select_params(model: nn.Module, params: Iterable[Tensor | str] | None,
                  exclude: Iterable[Tensor | str | nn.Module]) -> set[int]:
    """The ids of the parameters to measure: those of ``params`` (default: all), less those
    of ``exclude``; each entry a parameter, a module or the (dotted) name of either."""
    def entries(x: object) -> list:
        return [x] if isinstance(x, (str, Tensor, nn.Module)) else list(x)  # type: ignore[call-overload]

    if params is None:
        chosen = {id(p) for p in model.parameters()}
    else:
        chosen = set().union(*(_resolve(model, p, "params") for p in entries(params)))
    for item in entries(exclude):
        chosen -= _resolve(model, item, "exclude")
    return chosen


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
    dimension 0 of the first hooked layer input (dimension 1 for a module measured with its
    batch there), or given as ``measure(batch_size=n)``.

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
            flattened per-coordinate sums. ḡ is read from p.grad (DDP has averaged it;
            under FSDP2 see below).
        fuse_conv_grad: default True: fuse the convolutions listed in :attr:`fused_convs`.
            Inside :meth:`measure`, when ``needs`` ask for per-sample norms or coordinates
            (not for inner products alone), those layers run through an autograd Function
            whose backward takes the batch weight gradient as the sum of the per-sample
            weight gradients the estimator materialises anyway, so the backend's own
            weight-gradient convolution is skipped (and the bias gradient is a plain sum).
            p.grad still arrives through autograd (accumulation, tied weights and DDP's
            gradient hooks work as usual) and equals a plain backward's up to floating-point
            summation order (not bitwise; pass False for the backend's own gradients). Under
            autocast the convolution runs in autocast's dtype, as the module's own would,
            and the weight gradient is the per-sample ones summed in float32 or wider, where
            the plain backward computes it in the low precision.
            Mechanism: for the duration of :meth:`measure`, each such module gets an instance
            attribute ``forward`` (removed when the block ends; a module whose ``forward``
            is already replaced on the instance is left alone); see
            ``adabatch/batching/persample/fused_conv.py``.
        tuning: how equivalent computations are chosen (:class:`PerSampleTuning`: the im2col/grouped
            convolution threshold, the grouped chunk size, the Gram form of Linear inner
            products); the defaults suit CPU and GPU.
        params: the parameters to measure (parameters, modules, or their dotted names;
            default: all that require gradients); the statistics (``grad_sq_norm`` and
            ``mean_grad`` included) are then over this subset.
        exclude: parameters, modules or names to leave out (a module: all its parameters),
            for instance a parameter used outside a module call, which otherwise raises.

    Layers: Linear, Conv1d/2d/3d, Embedding, LayerNorm/GroupNorm/RMSNorm and transformers'
    ``Conv1D`` have dedicated rules; nn.MultiheadAttention (its out_proj weight is used
    outside out_proj's forward) and the transformer layers, stacks and nn.Transformer with
    ``batch_first=False`` are measured as a whole by ``torch.func``, with the batch along
    dimension 1 where it is (see :func:`is_unit`). A Linear or convolution with a
    parametrized weight (``weight_norm``, ``spectral_norm``, ``orthogonal``, ...) is measured
    over its original parameters through the parametrization's vector-Jacobian product
    (``persample/parametrized.py``; ``weight_norm`` and ``spectral_norm`` in closed form), the
    parametrization in eval mode, so that ``spectral_norm`` in training mode uses the u, v of
    the pass and takes no second power-iteration step (such a layer that runs twice in one
    pass raises: its first call no longer has its u, v); another parametrized module is
    measured as a whole by ``torch.func``. Any other module with its own parameters also
    goes through ``torch.func``, which checks that the module gives
    each sample alone the output it gave in the batch (else it raises naming the module:
    dropout active in it, samples mixed, batch not along dimension 0), and it raises naming
    the module when ``torch.func.vmap`` cannot run it (a ``.item()`` or data-dependent branch
    in its forward, an operation without a batching rule). Recurrent layers (nn.RNN, nn.GRU,
    nn.LSTM) raise at construction: torch's RNN kernels have no per-sample path in
    ``torch.func``. Dropout outside those modules is fine.
    An Embedding whose indices are shared by the samples (no batch dimension, as
    ``pos(torch.arange(T))``, or a batch dimension of 1, as Hugging Face's position ids)
    returns its output with the batch as an expanded view (the batch dimension added in front,
    or the leading 1 expanded), so that the broadcast that follows (``x + pos``, with ``x``
    batch-first and of the expanded output's rank) is done here and carries per-sample
    gradients; indices 0..b−1 exactly as many as the samples (shared or one per sample?) and
    an index without a dimension raise. The pass's batch size for this comes from
    ``measure(batch_size=...)``, else the first hooked layer call, else dimension 0 of the
    model's first tensor input.

    FSDP2 (``fully_shard``: the parameters are DTensors; needs ``reduce``): exact for every
    statistic. FSDP2 unshards a layer for its forward and backward, so the hooks see whole
    layers and measure this rank's samples, as under DDP; what reads ḡ, which each rank holds
    only on its shard, is shard-aware: G = Σ_r ‖ḡ|shard_r‖² in the one all-reduce, the
    coordinate sums reduce-scattered (each rank gets its shard of v_j; ``coord_variance`` and
    ``mean_grad`` are DTensors placed like the parameters), ḡ gathered one parameter at a
    time for the inner products ⟨g_i, ḡ⟩ (see ``batching/_sharded.py``). Layers measured by
    recomputation (torch.func: nn.MultiheadAttention, modules without a rule) need their
    weights after the backward pass: their FSDP modules (the one around each, and any inside
    it) are unsharded (one all-gather of them) after each pass, and once more for the inner
    products, and the recomputation runs without FSDP2's forward hooks. The fused
    convolution path is off.

    Gram form: a Linear on [b, in] inputs takes ⟨g_i, ḡ⟩ = Σ_j (δ_i·δ_j)(a_i·a_j + 1) in its
    backward hook when that is cheaper (b·(in + out) < in·out) and p.grad will be exactly that
    pass's gradient: the first pass since :meth:`stats`, no ``reduce``, no torch.distributed,
    p.grad None before the backward, and no gradient hook on the parameter (see
    :func:`has_grad_hooks`; ``PerSampleTuning(gram_form=False)`` turns the Gram form off).

    Attributes:
        params: the parameters the statistics are over, aligned with ``mean_grad`` and
            ``coord_variance``.
        fused_convs: the convolution modules that :meth:`measure` runs fused (empty with
            ``fuse_conv_grad=False``): numeric zero padding, weight measured.
        needs_local_grads: False: it measures inside each backward pass, so the usual
            gradient synchronisation of data parallelism may run (see
            :class:`~adabatch.batching.protocol.Estimator`).
    """

    needs_local_grads = False

    def __init__(self, model: nn.Module, needs: Iterable[str] = STAT_NAMES, *,
                 chunk_size: int | None = None, budget: int = DEFAULT_BUDGET,
                 reduce: Reduce | None = None, fuse_conv_grad: bool = True,
                 tuning: PerSampleTuning | None = None,
                 params: Iterable[Tensor | str] | None = None,
                 exclude: Iterable[Tensor | str | nn.Module] = ()) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"PerSampleStats needs an nn.Module, got {type(model).__name__}")
        self.needs = check_needs(frozenset(needs))
        _check_options(chunk_size, budget, reduce, tuning)
        self.model = model
        self.chunk_size = chunk_size
        self.budget = budget
        self.reduce = reduce
        self.fuse_conv_grad = bool(fuse_conv_grad)
        self.tuning = tuning if tuning is not None else PerSampleTuning()
        self._chunks = Chunking(budget, chunk_size)
        self._need_norm = bool(self.needs & _NORM_STATS)
        self._need_coord = "coord_variance" in self.needs
        self._need_ip = bool(self.needs & _IP_STATS)
        self._per_sample = self._need_norm or self._need_coord or self._need_ip

        self.params: list[Tensor] = []
        self._index: dict[int, int] = {}  # id(parameter) -> its position in params
        self._collect_params(model, select_params(model, params, exclude))
        self._names = {id(p): n for n, p in model.named_parameters()}
        self._watch = ParamWatch("PerSampleStats", model, self.params)
        self._module_names: dict[nn.Module, str] = {}
        self._rules = self._make_rules(model)
        self._fsdp2 = self._check_fsdp2()
        self._setup_fusion()
        self._batchnorms = [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
        self._hooks = self._register_hooks(model)
        # the running pass (measure()): its id, batch size, layer calls, uses per parameter,
        # inner-product items, and whether its Linear layers may take the Gram form
        self._active = False
        self._pass_id = 0
        self._pass_n: int | None = None
        self._model_n: int | None = None  # dimension 0 of the model's first input
        self._records: list[LayerCall] = []
        self._uses: dict[int, int] = {}
        self._pass_ip: list[IPItem] = []
        self._gram_pass = False
        # the step (since the last stats()): see reset()
        self._n_total = 0
        self._passes = 0
        self._norm_parts: list[Tensor] = []  # Σ‖g_i‖² by layer, summed in float64 at stats()
        self._coord: list[Tensor | None] = []
        self._ip_parts: list[PassProducts] = []
        self._seen: set[int] = set()
        self._gram_void = False  # a Gram-form inner product may be wrong: use the direct one
        self._unreached = 0  # measured passes whose backward never reached a hooked layer
        self.reset()

    def _setup_fusion(self) -> None:
        """The convolutions whose weight gradient comes from the fused per-sample kernel
        (``fused_conv.py``), and whether a pass installs it."""
        self.fused_convs: tuple[nn.Module, ...] = tuple(
            m for m, r in self._rules.items()
            if self.fuse_conv_grad and not self._fsdp2 and fusable(m, r))
        self._fusion = ConvFusion(self.fused_convs)
        # fusion pays when per-sample weight gradients are taken anyway: for norms or
        # coordinates; inner products alone take the direct form, which needs none
        self._fuse = bool(self.fused_convs) and (self._need_norm or self._need_coord)
        self._fused_pending = self._fusion.pending

    def _register_hooks(self, model: nn.Module) -> list:
        """A forward hook on every measured layer (:meth:`_flat_linear_hook` on a Linear
        whose weight is measured, else :meth:`_forward_hook`), and where an Embedding is
        measured, a pre-hook on the model for its batch size (:meth:`_is_shared`; a hook on
        the model costs every call of it, so only where it is read)."""
        hooks = [m.register_forward_hook(
            self._flat_linear_hook if type(r) is LinearRule and r.names[0] == "weight"
            else self._forward_hook, with_kwargs=True) for m, r in self._rules.items()]
        if any(isinstance(r, EmbeddingRule) for r in self._rules.values()):
            hooks.append(model.register_forward_pre_hook(self._model_pre_hook,
                                                         with_kwargs=True))
        return hooks

    def _collect_params(self, model: nn.Module, selected: set[int]) -> None:
        for p in model.parameters():
            if p.requires_grad and id(p) in selected and id(p) not in self._index:
                self._index[id(p)] = len(self.params)
                self.params.append(p)
        if not self.params:
            raise ValueError("PerSampleStats: the model has no parameters that require gradients"
                             " (among those selected by params= and exclude=)")

    def _check_fsdp2(self) -> bool:
        """Whether the parameters are sharded by FSDP2 (DTensors); refuses what would not
        be exact there (see :meth:`_stats_sharded`)."""
        where = "PerSampleStats under FSDP2 (DTensor parameters, fully_shard)"
        self._owners: list[nn.Module] = []  # see _recompute_owners
        self._muted: list[nn.Module] = []
        if not _sharded.sharded_params(self.params, where):
            return False
        if self.reduce is None:
            raise ValueError(f"{where} needs reduce=, a SUM all-reduce over the ranks: each "
                             f"rank holds only its shard of the mean gradient")
        if self._per_sample:
            self._recompute_owners()
        return True

    def _recompute_owners(self) -> None:
        """The FSDP modules that hold the parameters of the layers measured by recomputation
        (:class:`FuncRule`, run after the backward pass when FSDP2 has resharded them): the
        nearest one around each such layer and any inside it, unsharded around that work
        (:meth:`_unsharded`); those that are the layer or inside it are also kept from
        running FSDP2's forward hooks in the recomputation (:attr:`_muted`)."""
        from torch.distributed.fsdp import FSDPModule

        fsdp = {n: m for n, m in self.model.named_modules() if isinstance(m, FSDPModule)}
        names = {m: n for n, m in self.model.named_modules()}
        owners: dict[int, nn.Module] = {}
        muted: dict[int, nn.Module] = {}
        for module, rule in self._rules.items():
            if not isinstance(rule, FuncRule):
                continue
            name = names[module]
            owner = max((n for n in fsdp if n == "" or name.startswith(n + ".")), key=len,
                        default=None)
            if owner is not None:  # (else its parameters are not DTensors: refused before)
                owners[id(fsdp[owner])] = fsdp[owner]
            for sub in module.modules():
                if isinstance(sub, FSDPModule):
                    owners[id(sub)] = muted[id(sub)] = sub
        self._owners = list(owners.values())
        self._muted = list(muted.values())

    def _unsharded(self) -> contextlib.AbstractContextManager:
        """Under FSDP2, a context in which the layers measured by recomputation hold their
        whole parameters (an all-gather of their FSDP modules; every rank enters it at the
        same points) and run without FSDP2's forward hooks; else a no-op."""
        if not self._owners:
            return contextlib.nullcontext()
        return _unsharded_modules(self._owners, self._muted)

    def _make_rules(self, model: nn.Module) -> dict[nn.Module, LayerRule]:
        rules = {}
        units: list[str] = []  # modules measured as a whole: their submodules get no rule
        for mname, module in model.named_modules():
            self._module_names[module] = mname or type(module).__name__
            if any(mname.startswith(u + ".") for u in units):
                continue
            unit = is_unit(module)
            if unit:
                units.append(mname)
            names = tuple(n for n, p in module.named_parameters(recurse=unit)
                          if id(p) in self._index)
            if not names:
                continue
            if isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
                raise ValueError(
                    f"PerSampleStats: {mname} uses scale_grad_by_freq, which mixes the samples "
                    f"of a batch; use MicroBatchStats"
                )
            if isinstance(module, nn.RNNBase):
                label = self._module_names[module]
                raise ValueError(
                    f"PerSampleStats: {label!r} is a recurrent layer "
                    f"(nn.{type(module).__name__}), which it cannot measure: torch's RNN "
                    f"kernels have no per-sample path in torch.func; leave its parameters out "
                    f"(exclude=[{label!r}]) or use MicroBatchStats"
                )
            rules[module] = rule_for(module, names, self.tuning)
            rules[module].label = self._module_names[module]
        return rules

    # --- state ---------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every measured pass (start a new step)."""
        self._n_total = 0
        self._passes = 0
        self._norm_parts = []
        self._coord = [None] * len(self.params)
        self._ip_parts = []
        self._seen = set()
        self._gram_void = False
        self._unreached = 0  # measured passes whose backward never reached a hooked layer

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

    def measure(self, batch_size: int | None = None) -> contextlib.AbstractContextManager:
        """Context for the forward and backward pass of one (micro-)batch; entering it gives
        the estimator."""
        return _Pass(self, batch_size)

    def _begin_pass(self, batch_size: int | None) -> None:
        if self._active:
            raise RuntimeError("PerSampleStats.measure() is already active")
        if batch_size is not None:
            check_int("batch_size", batch_size)
        if self._per_sample:
            self._check_mixing()
        self._pass_n = batch_size
        self._model_n = None
        self._records = []
        self._uses = {}
        self._pass_ip = []
        # Gram-form inner products of Linear layers (see _make_linear_hook) need p.grad to be
        # exactly this pass's gradient: only the first pass, no all-reduce
        self._gram_pass = (self._need_ip and self.tuning.gram_form and self._passes == 0
                           and self.reduce is None and not _dist.initialized())
        self._pass_id += 1  # the hooks of this pass's records check it
        self._active = True
        if self._fuse:
            self._fusion.install()

    def _end_pass(self, ok: bool) -> None:
        """The end of a pass: its records processed, unless the pass raised (``ok`` False)."""
        if self._fuse:
            self._fusion.remove()
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
    def _model_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._active and self._model_n is None:
            first = args[0] if args and isinstance(args[0], Tensor) else None
            if first is None or first.dim() == 0:  # the common case skips the flattening
                first = next((t for t in tree_flatten((args, kwargs))[0]
                              if isinstance(t, Tensor) and t.dim() > 0), None)
            if first is not None:
                self._model_n = first.shape[0]

    def _first_input(self, module: nn.Module, args: tuple, kwargs: dict) -> Tensor:
        """The first tensor input of a layer call; its batch dimension (the rule's
        ``batch_dim``), the batch size, is checked against the pass's."""
        first = args[0] if args and isinstance(args[0], Tensor) else next(
            (t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)), None)
        bd = self._rules[module].batch_dim
        if first is None or first.dim() <= bd:
            raise ValueError(
                f"PerSampleStats: layer {self._module_names[module]!r} got no batched tensor "
                f"input; inputs must be batch-first"
            )
        n = first.shape[bd]
        if self._pass_n is None:
            self._pass_n = n
        elif n != self._pass_n:
            raise ValueError(
                f"PerSampleStats: layer {self._module_names[module]!r} saw a batch of {n} "
                f"samples but the pass has {self._pass_n}; inputs must be batch-first "
                f"(or give measure(batch_size=...)); only an Embedding may take indices shared "
                f"by the samples (else leave the layer out: exclude=...)"
            )
        return first

    def _flat_linear_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: object
                          ) -> Tensor | None:
        """:meth:`_forward_hook` of a Linear whose weight is measured, its common call made
        short: one [b, in] input of the pass's batch size and an output that requires grad,
        recorded and hooked for :meth:`_make_linear_hook` as :meth:`_forward_hook` would. Any
        other call goes through :meth:`_forward_hook` (its checks and messages)."""
        if not self._active:
            return None
        a = args[0] if len(args) == 1 and not kwargs else None
        if not (isinstance(a, Tensor) and a.dim() == 2 and self._per_sample
                and isinstance(output, Tensor) and output.requires_grad):
            return self._forward_hook(module, args, kwargs, output)
        n = a.shape[0]
        if self._pass_n is None:
            self._pass_n = n  # the first layer call of the pass (as _first_input)
        elif n != self._pass_n:
            return self._forward_hook(module, args, kwargs, output)  # raises
        rule = self._rules[module]
        rec = LayerCall(module, rule, (a.detach(),), {}, n, [None], 1, rule.names)
        self._record(rec)
        output.register_hook(self._make_linear_hook(rec))
        return None

    def _forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: object
                      ) -> Tensor | None:
        if not self._active:
            return None
        rule = self._rules[module]
        first = args[0] if args and isinstance(args[0], Tensor) else None
        if (first is None or first.dim() == 0 or first.shape[0] != self._pass_n
                or (first.dim() == 1 and isinstance(rule, EmbeddingRule))):
            if (isinstance(rule, EmbeddingRule) and first is not None
                    and self._is_shared(module, first)):
                return self._shared_embedding(rule, first, output)
            first = self._first_input(module, args, kwargs)  # the checks, off the common path
        n = first.shape[rule.batch_dim]
        if not self._per_sample:
            return None
        if isinstance(output, Tensor):
            if not output.requires_grad:
                return None
            outs = [output]
        else:
            outs = [o for o in tree_flatten(output)[0] if isinstance(o, Tensor)]
            if not any(o.requires_grad for o in outs):
                return None
        if isinstance(rule, FuncRule):
            self._check_random(module, rule)
        saved_args = ((first.detach(),) if len(args) == 1 and args[0] is first else
                      tuple(a.detach() if isinstance(a, Tensor) else a for a in args))
        kw = ({k: (v.detach() if isinstance(v, Tensor) else v) for k, v in kwargs.items()}
              if kwargs else {})
        k = len(outs)
        rec = LayerCall(module, rule, saved_args, kw, n, [None] * k, k, rule.names)
        if isinstance(rule, FuncRule):
            rec.outputs = [o.detach() for o in outs]
        self._record(rec)
        if self._fused_pending:
            self._fusion.claim(module, rec)
        if (type(rule) is LinearRule and len(outs) == 1 and first.dim() == 2
                and rule.names[0] == "weight"):
            outs[0].register_hook(self._make_linear_hook(rec))
            return None
        for i, o in enumerate(outs):
            if o.requires_grad:
                o.register_hook(self._make_grad_hook(rec, i))
        return None

    def _record(self, rec: LayerCall) -> None:
        """A layer call of the running pass: kept, and its parameters' uses counted (a
        parameter used more than once is measured by :meth:`_process_shared`)."""
        uses = self._uses
        for pid in rec.rule.pids:
            uses[pid] = uses.get(pid, 0) + 1
        self._records.append(rec)

    def _check_random(self, module: nn.Module, rule: FuncRule) -> None:
        """The torch.func path recomputes the module: an active dropout inside would draw
        other masks (checked here, before the pass, where it is cheap to say why)."""
        random = rule.random_part() if module.training else None
        if random is not None:
            raise ValueError(
                f"PerSampleStats: layer {self._module_names[module]!r} is measured by "
                f"recomputing it sample by sample, but its dropout ({random}) is active; "
                f"set the dropout to 0 or put the layer in eval mode, exclude its parameters "
                f"(exclude=...), or use MicroBatchStats")

    def _is_shared(self, module: nn.Module, idx: Tensor) -> bool:
        """Whether the indices of an Embedding call are shared by the samples of the pass:
        no batch dimension (``pos(torch.arange(T))``) or a batch dimension of 1, against the
        batch size of the pass (or of the model's input when no layer has run yet)."""
        if self._pass_n is None:
            self._pass_n = self._model_n
        n = self._pass_n
        if idx.dim() == 0:
            raise ValueError(
                f"PerSampleStats: layer {self._module_names[module]!r} got one index without "
                f"a dimension, so where the batch goes in its output is unknown; give it the "
                f"shape of the output's place in the batch ([1] for [b, dim], [1, 1] for "
                f"[b, T, dim])")
        if (self._per_sample and n is not None and n > 1 and idx.dim() == 1 and idx.shape[0] == n
                and torch.equal(idx, torch.arange(n, device=idx.device))):
            raise ValueError(
                f"PerSampleStats: layer {self._module_names[module]!r} got the indices "
                f"0..{n - 1}, as many as the batch has samples: positions shared by the samples "
                f"or one index per sample? Give shared indices a leading dimension of 1 "
                f"(torch.arange(T)[None]), or per-sample ones a second dimension ([b, 1])")
        return n is not None and idx.shape[0] != n

    def _shared_embedding(self, rule: LayerRule, idx: Tensor, output: Tensor) -> Tensor | None:
        """An Embedding call whose indices are shared by the samples (:meth:`_is_shared`):
        its output is given the batch dimension as an expanded view, so the broadcast that
        follows (``x + pos``) happens here and the output gradient arrives per sample; the
        indices are expanded alike. None: nothing is measured per sample."""
        n = self._pass_n
        assert n is not None
        if not (self._per_sample and output.requires_grad):
            return None
        if idx.shape[0] == 1:
            idx, output = idx.expand(n, *idx.shape[1:]), output.expand(n, *output.shape[1:])
        else:
            idx = idx.unsqueeze(0).expand(n, *idx.shape)
            output = output.unsqueeze(0).expand(n, *output.shape)
        rec = LayerCall(rule.module, rule, (idx.detach(),), {}, n, [None], 1, rule.names)
        self._record(rec)
        output.register_hook(self._make_grad_hook(rec, 0))
        return output

    def _make_linear_hook(self, rec: LayerCall) -> Callable[[Tensor], None]:
        """The common case made cheap: a Linear on [b, in] inputs, done in the output's
        gradient hook (:func:`~adabatch.batching.persample.layers.flat_linear_sums`).

        Inner products: the call (a, δ) is kept for :meth:`stats`, which takes
        ⟨g_i, ḡ⟩ = δ_iᵀ(ḡ_W a_i + ḡ_b) (one b·in·out product). When this pass alone makes
        p.grad (see :meth:`_gram_allowed`) and b·(in + out) < in·out, the hook also takes the
        Gram form ⟨g_i, Σ_j g_j⟩ = Σ_j (δ_i·δ_j)(a_i·a_j + [bias]) (b²·(in + out)), which
        :meth:`stats` uses if no second pass follows; the per-sample norms are then its
        diagonal. This hook does not go through :meth:`LinearRule.process`: its views and
        bookkeeping cost the 1 ms MLP step measurably (benchmarks/test_overhead.py)."""
        pass_id = self._pass_id

        def hook(grad: Tensor) -> None:
            if not (self._active and self._pass_id == pass_id):
                self._check_pass(pass_id)  # raises
            rec.deltas[0] = plain_grad(grad)
            rec.pending = 0
            if max(map(self._uses.__getitem__, rec.rule.pids)) > 1:
                return  # a shared parameter: the per-pass path sums its uses
            if torch.is_grad_enabled():  # backward(create_graph=True)
                with torch.no_grad():
                    self._linear_sums(rec)
            else:
                self._linear_sums(rec)
        return hook

    def _linear_sums(self, rec: LayerCall) -> None:
        """The work of :meth:`_make_linear_hook`'s hook, once the call's output gradient
        is in ``rec.deltas[0]``."""
        a, D = rec.inputs[0], rec.deltas[0]
        assert D is not None
        pids = rec.rule.pids
        # inputs and output gradients may differ in dtype under autocast: reduce both in
        # their common type, at least float32
        dt = common_float(a, D)
        bias = len(pids) == 2
        gram = None
        if self._need_ip:
            n = a.shape[0]
            out_f, in_f = D.shape[1], a.shape[1]
            if n * (in_f + out_f) < in_f * out_f and self._gram_allowed(rec.rule):
                gram, diag = linear_gram(a, D, bias, dt, self._need_norm)
                if diag is not None:
                    self._norm_parts.append(diag)
            self._pass_ip.append(WeightBiasProducts(pids[0], pids[1] if bias else None, rec, gram))
        need_norm = self._need_norm and gram is None
        if need_norm or self._need_coord:
            parts, coord_w, coord_b = flat_linear_sums(a, D, bias, need_norm, self._need_coord,
                                                       dt)
            self._norm_parts += parts
            if coord_w is not None:
                self._add(pids[0], None, coord_w)
                if coord_b is not None:
                    self._add(pids[1], None, coord_b)
        self._seen.update(pids)
        rec.done = True
        if not self._need_ip:
            rec.inputs, rec.deltas = (), []

    def _gram_allowed(self, rule: LayerRule) -> bool:
        """Whether p.grad of the rule's parameters will be this layer call's gradient in
        this pass and nothing else: the first pass since the last :meth:`stats`, no reduction
        across processes (DDP averages p.grad), no gradient yet, and no hook that could
        change the gradient on its way into p.grad. A gradient already there (a second
        backward pass, or grads not zeroed) voids every Gram form of the step."""
        if not self._gram_pass:
            return False
        for pid in rule.pids:  # (not under FSDP2, where the module holds other tensors)
            p = self.params[self._index[pid]]
            if p.grad is not None:
                self._gram_pass = False
                self._gram_void = True
                return False
            if has_grad_hooks(p):
                return False
        return True

    def _check_pass(self, pass_id: int) -> None:
        if not (self._active and self._pass_id == pass_id):
            raise RuntimeError(
                "PerSampleStats: a layer's output gradient arrived after its measure() block "
                "ended; run the backward pass inside the same `with est.measure():` as the "
                "forward pass"
            )

    def _make_grad_hook(self, rec: LayerCall, i: int) -> Callable[[Tensor], None]:
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

    def _simple(self, rec: LayerCall) -> bool:
        if isinstance(rec.rule, FuncRule) or len(rec.deltas) != 1:
            return False
        uses = self._uses
        return all(uses[pid] <= 1 for pid in rec.rule.pids)

    # --- per-pass processing -----------------------------------------------------------------
    def _store_mat(self, rec: LayerCall, names: tuple[str, ...]) -> set[str]:
        """The parameters whose per-sample gradients are kept for the inner products."""
        if not self._need_ip:
            return set()
        if isinstance(rec.rule, ConvRule) and not rec.fuse:
            # the direct form (one convolution with ḡ) costs the multiply-adds of the
            # per-sample weight gradients and keeps nothing; only a fused convolution, whose
            # per-sample gradients replace the batch one, has them for free
            return set()
        kept = rec.rule.kept_numel(rec)
        # a fused conv materialises its per-sample weight gradients anyway (they replace the
        # backend's weight gradient): keeping them for the inner products then costs memory
        # only, which is worth up to twice the input and output gradient it frees
        limit = 2 * kept if rec.fuse else kept
        store = {nm for nm in names if rec.rule.param(nm).numel() <= limit}
        if (isinstance(rec.rule, (LinearRule, ConvRule)) and "weight" in names
                and "weight" not in store):
            store.discard("bias")  # taken with the weight in one addmm/convolution
        return store

    def _add(self, pid: int, norm: Tensor | None, coord: Tensor | None) -> None:
        idx = self._index[pid]
        if norm is not None:
            self._norm_parts.append(norm)
        if coord is not None:
            cur = self._coord[idx]
            self._coord[idx] = coord if cur is None else cur.add_(coord)

    def _process(self, rec: LayerCall, names: tuple[str, ...], release: bool) -> None:
        """Norm and coordinate sums of single-use parameters; keep what inner products need."""
        rec.done = True
        store = self._store_mat(rec, names)
        res = rec.rule.process(rec, names, self._chunks, self._need_norm, self._need_coord,
                               store)
        later: list[tuple[int, str]] = []
        for nm in names:
            pid = _pid(rec.rule, nm)
            self._seen.add(pid)
            sums = res[nm]
            self._add(pid, sums.norm, sums.coord)
            if self._need_ip:
                if sums.kept is not None:
                    self._pass_ip.append(KeptGrads(pid, sums.kept))
                else:
                    later.append((pid, nm))
        if (len(later) == 2 and isinstance(rec.rule, (LinearRule, ConvRule))
                and later[0][1] == "weight" and later[1][1] == "bias"):
            # weight and bias together: one addmm (Linear) or convolution per chunk
            self._pass_ip.append(WeightBiasProducts(later[0][0], later[1][0], rec))
        else:
            self._pass_ip.extend(CallProducts(pid, rec, nm) for pid, nm in later)
        if release and not later:
            rec.release()

    def _finish_pass(self, records: list[LayerCall]) -> None:
        # the calls not done in their backward hook (all of them are, in the common case of
        # single-use Linear layers: then nothing here touches a tensor)
        todo = [rec for rec in records if not rec.done]
        if self._per_sample and records and len(todo) == len(records) and all(
                d is None for rec in records for d in rec.deltas):
            self._unreached += 1  # stats() refuses: its samples would count as zeros
        if todo or self._owners:  # (under FSDP2 every rank unshards at every pass)
            with torch.no_grad(), self._unsharded():
                self._process_pass(todo)
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
            self._ip_parts.append(PassProducts(n, self._pass_ip))
        self._pass_ip = []

    def _process_pass(self, records: list[LayerCall]) -> None:
        """The calls of a pass not done in their backward hook: single-use parameters by
        :meth:`_process`, parameters used by several calls by :meth:`_process_shared`."""
        multi: dict[int, list[tuple[LayerCall, str]]] = {}
        for rec in records:
            if all(d is None for d in rec.deltas):
                continue  # no gradient reached it
            if not isinstance(rec.rule, FuncRule) and rec.deltas[0] is None:
                continue
            shared = tuple(nm for nm in rec.names
                           if self._uses.get(_pid(rec.rule, nm), 0) > 1)
            single = tuple(nm for nm in rec.names if nm not in shared)
            if single:
                self._process(rec, single, release=not shared)
            for nm in shared:
                multi.setdefault(_pid(rec.rule, nm), []).append((rec, nm))
        for pid, uses in multi.items():
            self._process_shared(pid, uses)

    def _process_shared(self, pid: int, uses: list[tuple[LayerCall, str]]) -> None:
        """A parameter used several times: per-sample gradient = sum of the uses."""
        p = self.params[self._index[pid]]
        rule = uses[0][0].rule
        # only rules that recompute a parametrization see its state (a tied Embedding, the
        # common shared parameter, has none to walk)
        stateful = (power_iteration_in_training(rule.module)
                    if isinstance(rule, (ParametrizedRule, FuncRule)) else None)
        if stateful is not None:
            raise ValueError(
                f"PerSampleStats: layer {rule.label!r} runs {len(uses)} times in "
                f"one pass with {stateful} in training mode, whose power iteration moves its "
                f"u, v between the calls, so the earlier calls cannot be recomputed as they "
                f"ran; put the layer in eval mode, exclude it (exclude=...), or use "
                f"MicroBatchStats")
        self._seen.add(pid)
        n = uses[0][0].n
        per = p.numel() * 2 + max(r.rule.sample_numel(r, (nm,)) for r, nm in uses)
        norm = torch.zeros((), dtype=torch.float64, device=p.device)
        sums = ParamSums()
        for lo, hi in self._chunks(n, per):
            total = None
            for rec, nm in uses:
                g = rec.rule.grads(rec, (nm,), lo, hi)[nm]
                total = g if total is None else total + g
            assert total is not None
            sums.norm = None
            sums.add(total, self._need_norm, self._need_coord, False)
            if sums.norm is not None:
                norm += sums.norm
        self._add(pid, norm if self._need_norm else None, sums.coord)
        if self._need_ip:
            self._pass_ip.extend(CallProducts(pid, rec, nm) for rec, nm in uses)

    # --- the statistics ------------------------------------------------------------------------
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
        if self._unreached:
            self.reset()
            raise RuntimeError(
                "PerSampleStats.stats(): no backward pass reached the hooked layers in "
                "a measure() context; call loss.backward() inside it"
            )
        try:
            self._watch.check()
            return self._stats()
        finally:
            self.reset()

    def _check_attributed(self, gbar: list[Tensor]) -> None:
        """Every parameter with a nonzero gradient was produced by a hooked layer call."""
        if self._per_sample and len(self._seen) < len(self.params):
            for p, g in zip(self.params, gbar):
                if id(p) not in self._seen and p.grad is not None and bool(g.any()):
                    raise ValueError(
                        f"PerSampleStats: parameter {self._names.get(id(p), '?')!r} has a "
                        f"gradient that no hooked layer call produced (used outside a module "
                        f"call?); per-sample statistics cannot be attributed to samples"
                    )

    def _ip_sums(self, gbar: list[Tensor]) -> tuple[Tensor, Tensor]:
        """(Σ_i ip_i, Σ_i ip_i²) over the step's samples, ip_i = N⟨contribution_i, ḡ⟩."""
        n_loc = self._n_total
        flat_g = {id(p): g for p, g in zip(self.params, gbar)}
        s_ip, s_ip2 = [], []
        # the Gram forms are ⟨g_i, this pass's gradient⟩: = ⟨g_i, ḡ⟩ for a single pass
        gram_ok = self._passes == 1 and not self._gram_void
        for part in self._ip_parts:
            ip = None  # float64 [n]: Σ over the pass's layers
            for item in part.items:
                term = item.inner_products(flat_g, self._chunks, gram_ok)
                # every term is a fresh tensor of ours: summed in place
                ip = term.to(torch.float64) if ip is None else ip.add_(term)
            if ip is None:
                ip = torch.zeros(part.n, dtype=torch.float64, device=gbar[0].device)
            ip.mul_(n_loc)
            s_ip.append(ip.sum())
            s_ip2.append(torch.dot(ip, ip))
        if len(s_ip) == 1:  # one pass: nothing to add up
            return s_ip[0], s_ip2[0]
        return torch.stack(s_ip).sum(), torch.stack(s_ip2).sum()

    def _stats(self) -> GradientStats:
        if self._fsdp2:
            return self._stats_sharded()
        gbar = mean_grads(self.params)
        self._check_attributed(gbar)
        coords = None
        if self._need_coord:
            coords = [c if c is not None else torch.zeros_like(p)
                      for c, p in zip(self._coord, self.params)]
        # every partial sum is a 0-dim tensor on the gradients' device, read back once in
        # float64; units are samples: K = N
        return stats_from_parts(
            self.needs, gbar, n=self._n_total, units=self._n_total,
            sq_groups=[(1, self._norm_parts)], squared=True,
            ip_sums=self._ip_sums(gbar) if self._need_ip else None, coord_sums=coords,
            reduce=self.reduce, in_place=True)

    # --- FSDP2 -----------------------------------------------------------------------------
    def _ip_sums_sharded(self) -> tuple[Tensor, Tensor]:
        """:meth:`_ip_sums` under FSDP2: ḡ of one parameter at a time gathered from the shards
        (every rank gathers every parameter once, in the same order), used by the items
        whose last parameter it is, and freed once no later item needs it."""
        n_loc = self._n_total
        by_last: dict[int, list[tuple[int, IPItem]]] = {}
        needed: dict[int, int] = {}
        for k, part in enumerate(self._ip_parts):
            for item in part.items:
                pids = _item_pids(item)
                by_last.setdefault(max(self._index[p] for p in pids), []).append((k, item))
                for p in pids:
                    needed[p] = needed.get(p, 0) + 1
        ips: list[Tensor | None] = [None] * len(self._ip_parts)
        whole: dict[int, Tensor] = {}
        with self._unsharded():
            for i, p in enumerate(self.params):
                whole[id(p)] = _sharded.whole_grad(p)
                for k, item in by_last.get(i, []):
                    term = item.inner_products(whole, self._chunks, False).to(torch.float64)
                    ips[k] = term if ips[k] is None else ips[k].add_(term)  # type: ignore[union-attr]
                    for q in _item_pids(item):
                        needed[q] -= 1
                for q in [q for q in whole if needed.get(q, 0) == 0]:
                    del whole[q]
        s_ip, s_ip2 = [], []
        dev = self.params[0].device
        for ip, part in zip(ips, self._ip_parts):
            ip = torch.zeros(part.n, dtype=torch.float64, device=dev) if ip is None else ip
            ip.mul_(n_loc)
            s_ip.append(ip.sum())
            s_ip2.append(torch.dot(ip, ip))
        zero = torch.zeros((), dtype=torch.float64, device=dev)
        return torch.stack([zero, *s_ip]).sum(), torch.stack([zero, *s_ip2]).sum()

    def _stats_sharded(self) -> GradientStats:
        """The statistics under FSDP2. The hooks ran on whole layers (FSDP2 unshards a layer
        for its forward and backward), on this rank's samples: the norm and coordinate sums
        are this rank's, as under DDP. ḡ is sharded: G from the shards in the one all-reduce
        [N, N, S, s1, s2, G]; the coordinate sums C_j reduce-scattered (each rank gets its
        shard of Σ_r C_j, where v_j = (C_j − N·ḡ_j²)/(N − 1) is taken); the inner products
        ⟨g_i, ḡ⟩ take ḡ gathered one parameter at a time (:meth:`_ip_sums_sharded`)."""
        gbar = [_sharded.local_shard(p) for p in self.params]
        self._check_attributed(gbar)
        dev = gbar[0].device
        n = self._n_total
        S = torch.zeros((), dtype=torch.float64, device=dev)
        if self._norm_parts:
            S = stack_f64(self._norm_parts).sum() * float(n * n)
        s1, s2 = self._ip_sums_sharded() if self._need_ip else (None, None)
        coords = None
        if self._need_coord:
            coords = [c if c is not None else torch.zeros(p.shape, dtype=p.dtype, device=dev)
                      for c, p in zip(self._coord, self.params)]
        assert self.reduce is not None  # invariant: refused in _check_fsdp2
        return _sharded.finish_sharded(self.needs, self.params, gbar, n=n, units=n, S=S,
                                       s1=s1, s2=s2, coords=coords, reduce=self.reduce)


@contextlib.contextmanager
def _unsharded_modules(modules: list[nn.Module], muted: list[nn.Module]) -> Iterator[None]:
    """FSDP modules unsharded (``unshard()``, then ``reshard()``), and the forward hooks of
    ``muted`` set aside meanwhile: FSDP2 runs its forward logic in forward hooks, which a
    recomputation of the layer by torch.func must not run (it would reshard, cast and
    register backward hooks inside vmap). The modules' hook dicts are swapped for empty ones
    and put back (nn.Module calls no hook when they are empty)."""
    for m in modules:
        m.unshard()  # type: ignore[operator]
    saved = [(m, m._forward_pre_hooks, m._forward_hooks) for m in muted]
    try:
        for m in muted:
            m._forward_pre_hooks, m._forward_hooks = OrderedDict(), OrderedDict()
        yield
    finally:
        for m, pre, post in saved:
            m._forward_pre_hooks, m._forward_hooks = pre, post
        for m in modules:
            m.reshard()  # type: ignore[operator]


def _pid(rule: LayerRule, name: str) -> int:
    """id() of the parameter ``name`` of the rule as the estimator knows it (under FSDP2 the
    module holds another, unsharded Parameter during forward and backward)."""
    return rule.pids[rule.names.index(name)]


def _item_pids(item: IPItem) -> tuple[int, ...]:
    """The parameters (ids) whose ḡ an inner-product item reads."""
    if isinstance(item, WeightBiasProducts):
        return (item.weight,) if item.bias is None else (item.weight, item.bias)
    return (item.pid,)


class _Pass:
    """The context of one measured pass (:meth:`PerSampleStats.measure`)."""

    __slots__ = ("batch_size", "est")

    def __init__(self, est: PerSampleStats, batch_size: int | None) -> None:
        self.est = est
        self.batch_size = batch_size

    def __enter__(self) -> PerSampleStats:
        self.est._begin_pass(self.batch_size)
        return self.est

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: object) -> None:
        self.est._end_pass(exc_type is None)
