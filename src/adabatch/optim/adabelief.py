r"""AdaBelief (Zhuang et al., NeurIPS 2020) with the numerics of ``adabelief-pytorch`` 0.2.1.

The class does the bookkeeping (parameter groups, state, ``state_dict``); the math lives in the
functional cores :func:`_single_tensor_adabelief` (a for-loop over tensors) and
:func:`_multi_tensor_adabelief` (``torch._foreach_*`` ops grouped by device and dtype). The
fused core lives in the package :mod:`adabatch.optim.fused` (C++ on CPU, Triton on CUDA); all
three share one signature (see :func:`adabelief`).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor
from torch.optim.optimizer import Optimizer

from adabatch._validation import LOW_PRECISION, check_mapping

if TYPE_CHECKING:
    from adabatch.optim.fused import PlanCache

__all__ = ["AdaBelief", "adabelief"]

_STATE_KEYS = ("exp_avg", "exp_avg_var", "max_exp_avg_var")
_FLAGS = (
    "amsgrad",
    "weight_decouple",
    "fixed_decay",
    "rectify",
    "degenerated_to_sgd",
    "maximize",
    "foreach",
    "capturable",
    "differentiable",
    "fused",
)

Implementation = Literal["fused", "foreach", "for-loop"]


def _state_dtype(p: Tensor) -> torch.dtype:
    """float16/bfloat16 parameters keep float32 state; everything else keeps its own dtype."""
    return torch.float32 if p.dtype in LOW_PRECISION else p.dtype


@functools.cache
def _fused_module() -> Any | None:
    """The fused kernel package, or None when it does not import (asked once per process)."""
    try:
        from adabatch.optim import fused
    except ImportError:
        return None
    return fused


def _fused_available(device: torch.device) -> bool:
    """Whether the fused kernel can run on ``device`` now, without compiling anything."""
    module = _fused_module()
    return module is not None and bool(module.fused_available(device))


def _require_fused(device: torch.device) -> None:
    """For ``fused=True``: make the kernel available on ``device`` (building it) or raise."""
    module = _fused_module()
    reason = "the package adabatch.optim.fused does not import"
    if module is not None:
        if module.fused_available(device):
            return
        reason = f"it is not available for device {device}"
        if device.type in ("cpu", "cuda"):
            try:
                module.build(device)
            except (RuntimeError, OSError) as err:
                reason = f"building it failed: {err}"
            if module.fused_available(device):
                return
    raise RuntimeError(
        f"fused=True requires the fused AdaBelief kernel, but {reason}; "
        "use fused=None (falls back to foreach) or foreach=True"
    )


def _choose_implementation(
    params: list[Tensor],
    *,
    foreach: bool | None,
    fused: bool | None,
    differentiable: bool,
    available: Callable[[torch.device], bool] = _fused_available,
) -> Implementation:
    """Pick the functional core for one parameter group.

    ``fused=True`` -> fused (availability is checked at construction); ``fused=None`` -> fused
    when ``available`` (default: the fused package imports and says the kernel is built) says
    so for the one device of the group and nothing asks otherwise (``foreach`` unset, not
    differentiable, not inside ``torch.compile``); then ``foreach`` (default: on for plain
    CPU/CUDA tensors, unlike torch, which defaults to the for-loop on CPU: our
    foreach path is the fast one on both); else the for-loop.
    """
    if fused:
        return "fused"
    if fused is None and foreach is None and not differentiable and params:
        # under torch.compile the foreach ops are traced and fused by the compiler; the fused
        # kernel is an opaque call that Dynamo cannot trace
        devices = {p.device for p in params}
        # one launch covers one device: a group spread over devices keeps foreach
        if not torch.compiler.is_compiling() and len(devices) == 1 and available(devices.pop()):
            return "fused"
    if foreach is None:
        foreach = not differentiable and all(
            type(p) in (Tensor, torch.nn.Parameter) and p.device.type in ("cpu", "cuda")
            for p in params
        )
    return "foreach" if foreach else "for-loop"


def _check_hyperparameters(lr: float | Tensor, betas: Any, eps: float, weight_decay: float) -> None:
    """The constructor's checks of its numbers (ValueError for a value out of range)."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr} (must be >= 0)")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps} (must be >= 0)")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay} (must be >= 0)")
    if not isinstance(betas, (tuple, list)):
        raise TypeError(f"Invalid betas: {betas!r} (must be a pair (beta1, beta2))")
    if len(betas) != 2:
        raise ValueError(
            f"Invalid betas: {tuple(betas)} (must be a pair (beta1, beta2), got {len(betas)})"
        )
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta} (must be in [0, 1))")
    if betas[0] == 0.0:
        warnings.warn(
            "AdaBelief with beta1 == 0: the residual g_t - m_t is always 0, so the step "
            "divides the gradient by about sqrt(eps / (1 - beta2))",
            UserWarning,
            stacklevel=3,
        )


def _merge_groups(
    groups: list[dict[str, Any]], saved_groups: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The loaded groups without 0.2.1's ``buffer``, with the flags they lack taken from this
    optimizer's ``groups``."""
    if len(groups) != len(saved_groups):
        raise ValueError("loaded state dict has a different number of parameter groups")
    new_groups = []
    for group, saved in zip(groups, saved_groups):
        saved = {k: v for k, v in saved.items() if k != "buffer"}
        for key, value in group.items():
            if key != "params" and key not in saved:
                saved[key] = value
        new_groups.append(saved)
    return new_groups


def _convert_state(state: dict[Any, Any], groups: list[dict[str, Any]]) -> dict[Any, Any]:
    """The loaded per-parameter state, checked (every key AdaBelief needs) and with tensor
    step counters (0.2.1 stores integers)."""
    amsgrad_of = {pid: g["amsgrad"] for g in groups for pid in g["params"]}
    new_state: dict[Any, Any] = {}
    for pid, pstate in state.items():
        if len(pstate) == 0:
            new_state[pid] = pstate
            continue
        required = ["step", "exp_avg", "exp_avg_var"]
        if amsgrad_of.get(pid, False):
            required.append("max_exp_avg_var")
        missing = [k for k in required if k not in pstate]
        if missing:
            raise ValueError(
                "loaded state dict is not an AdaBelief state dict: the state of parameter "
                f"{pid} lacks {missing} (it has {sorted(map(str, pstate))})"
            )
        pstate = dict(pstate)
        if not torch.is_tensor(pstate["step"]):
            pstate["step"] = torch.tensor(float(pstate["step"]), dtype=torch.float32)
        new_state[pid] = pstate
    return new_state


class AdaBelief(Optimizer):
    r"""AdaBelief: Adam whose second moment tracks the *belief* :math:`(g_t - m_t)^2`.

    With parameters :math:`\theta`, learning rate :math:`\gamma`, betas
    :math:`(\beta_1, \beta_2)`, weight decay :math:`\lambda`, and :math:`\epsilon`:

    .. math::
        \begin{aligned}
        & t \leftarrow t + 1 \\
        & \textbf{weight decay: } \theta \leftarrow \theta (1 - \gamma\lambda)
          \text{ (decoupled)}, \quad \theta \leftarrow \theta (1 - \lambda)
          \text{ (decoupled, fixed\_decay)}, \quad g_t \leftarrow g_t + \lambda\theta
          \text{ (L2, weight\_decouple=False)} \\
        & m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t \\
        & s_t = \beta_2 s_{t-1} + (1 - \beta_2)(g_t - m_t)^2 + \epsilon \\
        & v_t = \max(v_{t-1}, s_t) \text{ if amsgrad else } s_t \\
        & \textbf{not rectify: } \theta \leftarrow \theta - \frac{\gamma}{1-\beta_1^t}
          \cdot \frac{m_t}{\sqrt{v_t}/\sqrt{1-\beta_2^t} + \epsilon} \\
        & \textbf{rectify: } \rho_\infty = \tfrac{2}{1-\beta_2} - 1, \quad
          \rho_t = \rho_\infty - \tfrac{2 t \beta_2^t}{1 - \beta_2^t} \\
        & \quad \rho_t \ge 5: \theta \leftarrow \theta - \gamma r_t
          \frac{m_t}{\sqrt{v_t} + \epsilon}, \quad
          r_t = \frac{1}{1-\beta_1^t}\sqrt{(1-\beta_2^t)
          \frac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}} \\
        & \quad \rho_t < 5,\ \text{degenerated\_to\_sgd}: \theta \leftarrow \theta -
          \frac{\gamma}{1-\beta_1^t} m_t; \quad \text{otherwise no update}
        \end{aligned}

    With ``maximize=True`` the gradient is negated first. The step never changes ``p.grad`` and
    updates ``p`` in place.

    **eps.** As in ``adabelief-pytorch`` 0.2.1, :math:`\epsilon` is added to the *stored*
    :math:`s_t` at every step and again outside the square root. The stored sum makes the
    effective floor inside the square root about :math:`\epsilon / (1 - \beta_2)` (1000 eps
    for :math:`\beta_2 = 0.999`), so :math:`\epsilon` plays the role of the *square* of Adam's
    eps: the authors advise ``eps_adabelief ≈ eps_adam**2``.

    **Recommended settings** (the original authors' README, juntang-zhuang/Adabelief-Optimizer):
    where SGD beats Adam (CNNs for image classification) use a large eps (1e-8) to make the
    method less adaptive; where Adam beats SGD (Transformers, GANs) use a small eps (1e-16,
    1e-12); turn ``weight_decouple`` on where AdamW beats Adam. Their table:

    ==========================  =====  =====  =====  =====  ======  ========  =======
    task                        lr     beta1  beta2  eps    wd      decouple  rectify
    ==========================  =====  =====  =====  =====  ======  ========  =======
    CIFAR                       1e-3   0.9    0.999  1e-8   5e-4    False     False
    ImageNet                    1e-3   0.9    0.999  1e-8   1e-2    True      False
    object detection (PASCAL)   1e-4   0.9    0.999  1e-8   1e-4    False     False
    LSTM, 1 layer               1e-3   0.9    0.999  1e-16  1.2e-6  False     False
    LSTM, 2-3 layers            1e-2   0.9    0.999  1e-12  1.2e-6  False     False
    GAN (small)                 2e-4   0.5    0.999  1e-12  0       n/a       False
    SN-GAN (large)              2e-4   0.5    0.999  1e-16  0       n/a       True
    Transformer                 5e-4   0.9    0.999  1e-16  1e-4    True      True
    RL (Rainbow)                1e-4   0.9    0.999  1e-10  0       n/a       True
    RL (HalfCheetah-v2)         1e-3   0.9    0.999  1e-16  0       n/a       True
    ==========================  =====  =====  =====  =====  ======  ========  =======

    (``fixed_decay`` and ``amsgrad`` are False throughout.)

    **Defaults vs the paper.** The defaults are those of ``adabelief-pytorch`` >= 0.1.0, not
    the paper's algorithm (no rectification, no decoupled decay) nor ``adabelief-pytorch``
    0.0.5, the code of the paper's experiments (eps=1e-8, ``weight_decouple=False``,
    ``rectify=False``): here eps=1e-16, ``weight_decouple=True`` (AdamW-style decay) and
    ``rectify=True`` (the RAdam
    warm-up: with the default betas, :math:`\rho_t < 5` and an SGD step for
    :math:`t \le 5`).

    **Differences from 0.2.1** (everything else gives the same numbers): ``amsgrad`` also
    takes effect with ``rectify=True`` (0.2.1 ignores it there); ``p.grad`` is never modified
    (0.2.1 adds the L2 term into it); float16/bfloat16 parameters keep float32 state and do
    the math in float32 without reallocating ``p``; complex parameters are treated as their
    :func:`torch.view_as_real`; every flag is in the param group and ``state_dict``; the step
    count is a tensor and nothing is printed.

    Args:
        params: parameters or parameter groups.
        lr: learning rate :math:`\gamma` (float or 1-element tensor).
        betas: :math:`(\beta_1, \beta_2)`, each in [0, 1).
        eps: :math:`\epsilon` (see above).
        weight_decay: :math:`\lambda`.
        amsgrad: use :math:`\max(v_{t-1}, s_t)` in the denominator.
        weight_decouple: decoupled (AdamW-style) weight decay; else L2 added to the gradient.
        fixed_decay: with ``weight_decouple``, decay by :math:`\lambda` instead of
            :math:`\gamma\lambda`.
        rectify: the RAdam-style rectification.
        degenerated_to_sgd: with ``rectify``, take an SGD-with-momentum step while
            :math:`\rho_t < 5` (else no step).
        maximize: maximize the objective.
        foreach: use the ``torch._foreach_*`` implementation (default: on for CPU/CUDA).
        capturable: keep the step counters on the parameters' device and never synchronise
            with the host (CUDA graphs).
        differentiable: run the step under autograd (for-loop path).
        fused: use the fused kernel: C++ on CPU (:mod:`adabatch.optim.fused.cpu`), Triton
            on CUDA (:mod:`adabatch.optim.fused.cuda`). ``None``: when it is available
            without compiling anything (built earlier on this machine).

    The optimizer owns the fused path's caches: whether the kernel is available, per device
    (asked once per optimizer), and the checked plan of each parameter group's fused step
    (:class:`adabatch.optim.fused.PlanCache`). Neither is part of ``state_dict``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-16,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        weight_decouple: bool = True,
        fixed_decay: bool = False,
        rectify: bool = True,
        degenerated_to_sgd: bool = True,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        _check_hyperparameters(lr, betas, eps, weight_decay)
        if fused and foreach:
            raise ValueError("`fused` and `foreach` cannot be `True` together.")
        if fused and differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            weight_decouple=weight_decouple,
            fixed_decay=fixed_decay,
            rectify=rectify,
            degenerated_to_sgd=degenerated_to_sgd,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
        )
        self._fused_ok: dict[torch.device, bool] = {}
        self._fused_plans: dict[int, PlanCache] = {}
        super().__init__(params, defaults)
        self._require_fused_groups(self.param_groups)
        self._declare_amp_scaling()

    def _require_fused_groups(self, groups: list[dict[str, Any]]) -> None:
        """Build (or check) the fused kernel for every device of the ``fused=True`` groups;
        raise before anything changes when it is not available."""
        for group in groups:
            if group["fused"]:
                for device in {p.device for p in group["params"]}:
                    _require_fused(device)
        self._fused_ok.clear()  # a build may have made the kernel available

    def _declare_amp_scaling(self) -> None:
        # GradScaler passes grad_scale/found_inf only to optimizers that declare this.
        if any(self._implementation(g) == "fused" for g in self.param_groups):
            self._step_supports_amp_scaling = True

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._fused_ok = {}
        self._fused_plans = {}
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("weight_decouple", True)
            group.setdefault("fixed_decay", False)
            group.setdefault("rectify", True)
            group.setdefault("degenerated_to_sgd", True)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
            on_device = group["capturable"] or group["fused"]
            for p in group["params"]:
                p_state = self.state.get(p, [])
                if len(p_state) != 0 and not torch.is_tensor(p_state["step"]):
                    p_state["step"] = torch.tensor(
                        float(p_state["step"]),
                        dtype=torch.float32,
                        device=p.device if on_device else None,
                    )

    def _implementation(self, group: dict[str, Any]) -> Implementation:
        return _choose_implementation(
            group["params"],
            foreach=group["foreach"],
            fused=group["fused"],
            differentiable=group["differentiable"],
            available=self._fused_available,
        )

    def _fused_available(self, device: torch.device) -> bool:
        """Whether the fused kernel is available on ``device`` (asked once per optimizer)."""
        ok = self._fused_ok.get(device)
        if ok is None:
            ok = self._fused_ok[device] = _fused_available(device)
        return ok

    # ------------------------------------------------------------------ state_dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class or of ``adabelief_pytorch.AdaBelief`` 0.2.1.

        0.2.1 stores integer steps and a ``buffer`` cache in each group and keeps
        ``weight_decouple``, ``rectify``, ``fixed_decay`` and ``degenerated_to_sgd`` as
        attributes outside its state dict: flags missing from a loaded group are taken from
        this optimizer's groups (the constructor's arguments). A state dict of another
        optimizer (for example ``torch.optim.Adam``) raises ``ValueError`` naming what is
        missing.
        """
        check_mapping("state_dict", state_dict)
        missing = [k for k in ("state", "param_groups") if k not in state_dict]
        if missing:
            raise ValueError(
                f"Invalid state_dict: it lacks {missing} (must be the state_dict() of an optimizer)"
            )
        new_groups = _merge_groups(self.param_groups, state_dict["param_groups"])
        new_state = _convert_state(state_dict["state"], new_groups)
        full = dict(state_dict)
        full["param_groups"] = new_groups
        full["state"] = new_state
        self._require_fused_groups(  # fail before anything is loaded
            [{**saved, "params": g["params"]} for g, saved in zip(self.param_groups, new_groups)]
        )
        super().load_state_dict(full)
        self._fused_plans.clear()
        self._declare_amp_scaling()
        # torch casts floating state to the parameter's dtype; low-precision parameters keep
        # float32 state here, so restore it from the (float32) saved values.
        saved_ids = [pid for g in new_groups for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            if p.dtype in LOW_PRECISION and pid in new_state:
                for key in _STATE_KEYS:
                    if key in new_state[pid]:
                        self.state[p][key] = (
                            new_state[pid][key]
                            .detach()
                            .to(device=p.device, dtype=torch.float32)
                            .clone()
                        )

    # ------------------------------------------------------------------ step
    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_vars: list[Tensor],
        max_exp_avg_vars: list[Tensor],
        state_steps: list[Tensor],
    ) -> None:
        on_device = group["capturable"] or self._implementation(group) == "fused"
        amsgrad, differentiable = group["amsgrad"], group["differentiable"]
        state_of = self.state
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError("AdaBelief does not support sparse gradients")
            state = state_of[p]
            if len(state) == 0:
                state["step"] = torch.zeros(
                    (), dtype=torch.float32, device=p.device if on_device else None
                )
                sd = _state_dtype(p)
                state["exp_avg"] = torch.zeros_like(
                    p, dtype=sd, memory_format=torch.preserve_format
                )
                state["exp_avg_var"] = torch.zeros_like(
                    p, dtype=sd, memory_format=torch.preserve_format
                )
            step = state["step"]
            if on_device and step.is_cpu != p.is_cpu:
                # e.g. a state dict saved by a foreach run (counters on the CPU)
                step = state["step"] = step.to(p.device)
            if amsgrad and "max_exp_avg_var" not in state:
                state["max_exp_avg_var"] = torch.zeros_like(
                    state["exp_avg_var"], memory_format=torch.preserve_format
                )
            if differentiable and step.requires_grad:
                raise RuntimeError(
                    "`requires_grad` is not supported for `step` in differentiable mode"
                )
            param = p
            m, s = state["exp_avg"], state["exp_avg_var"]
            v = state["max_exp_avg_var"] if amsgrad else None
            if p.is_complex():
                param, grad = torch.view_as_real(param), torch.view_as_real(grad)
                m, s = torch.view_as_real(m), torch.view_as_real(s)
                if v is not None:
                    v = torch.view_as_real(v)
            params.append(param)
            grads.append(grad)
            exp_avgs.append(m)
            exp_avg_vars.append(s)
            if v is not None:
                max_exp_avg_vars.append(v)
            state_steps.append(step)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for index, group in enumerate(self.param_groups):
            with torch.set_grad_enabled(group["differentiable"]):
                self._step_group(index, group, grad_scale, found_inf)
        return loss

    def _step_group(
        self,
        index: int,
        group: dict[str, Any],
        grad_scale: Tensor | None,
        found_inf: Tensor | None,
    ) -> None:
        params: list[Tensor] = []
        grads: list[Tensor] = []
        exp_avgs: list[Tensor] = []
        exp_avg_vars: list[Tensor] = []
        max_exp_avg_vars: list[Tensor] = []
        state_steps: list[Tensor] = []
        impl = self._implementation(group)
        scaler_fallback = impl != "fused" and (grad_scale is not None or found_inf is not None)
        if scaler_fallback and found_inf is not None and bool(found_inf.item()):
            return  # a GradScaler's fused-protocol arguments on a non-fused group: skip
        self._init_group(
            group, params, grads, exp_avgs, exp_avg_vars, max_exp_avg_vars, state_steps
        )
        if not params:
            return
        if scaler_fallback:
            if grad_scale is not None:
                grads = [g / grad_scale.to(g.device) for g in grads]
            grad_scale = found_inf = None
        beta1, beta2 = group["betas"]
        extra: dict[str, Any] = {}
        if impl == "fused":
            extra["plans"] = self._fused_plans.get(index)
            if extra["plans"] is None:
                extra["plans"] = self._fused_plans[index] = _fused_module().PlanCache()
        adabelief(
            params,
            grads,
            exp_avgs,
            exp_avg_vars,
            max_exp_avg_vars,
            state_steps,
            implementation=impl,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            amsgrad=group["amsgrad"],
            weight_decouple=group["weight_decouple"],
            fixed_decay=group["fixed_decay"],
            rectify=group["rectify"],
            degenerated_to_sgd=group["degenerated_to_sgd"],
            maximize=group["maximize"],
            capturable=group["capturable"],
            differentiable=group["differentiable"],
            grad_scale=grad_scale,
            found_inf=found_inf,
            **extra,
        )


# ---------------------------------------------------------------------- functional API
def adabelief(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_vars: list[Tensor],
    max_exp_avg_vars: list[Tensor],
    state_steps: list[Tensor],
    *,
    implementation: Implementation = "foreach",
    **kwargs: Any,
) -> None:
    """Functional AdaBelief: dispatch to the fused, foreach or for-loop core.

    Every core has the signature ``fn(params, grads, exp_avgs, exp_avg_vars,
    max_exp_avg_vars, state_steps, *, beta1, beta2, lr, eps, weight_decay, amsgrad,
    weight_decouple, fixed_decay, rectify, degenerated_to_sgd, maximize, capturable,
    differentiable, grad_scale=None, found_inf=None)``; the lists hold only parameters that
    have gradients (complex ones as :func:`torch.view_as_real`), ``max_exp_avg_vars`` is
    empty unless ``amsgrad``, and ``state_steps`` are scalar float32 tensors that the core
    increments. The fused core also takes ``plans``, the caller's
    :class:`adabatch.optim.fused.PlanCache` (the optimizer keeps one per parameter group).
    """
    if implementation == "fused":
        from adabatch.optim.fused import fused_adabelief

        fn: Callable[..., None] = fused_adabelief
    elif implementation == "foreach":
        fn = _multi_tensor_adabelief
    else:
        fn = _single_tensor_adabelief
    fn(params, grads, exp_avgs, exp_avg_vars, max_exp_avg_vars, state_steps, **kwargs)


def _scalar(x: float | Tensor) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def _float_coefficients(
    t: float, beta1: float, beta2: float, rectify: bool, degenerated_to_sgd: bool
) -> tuple[str, float, float]:
    """Host-side step coefficients for step ``t``, computed in the order 0.2.1 uses.

    Returns ``(kind, step_size, bc2_sqrt)``: kind ``"adam"`` (not rectified: denominator
    ``sqrt(v)/bc2_sqrt + eps``, step ``lr/step_size``: here step_size holds 1 - beta1^t),
    ``"rect"`` (rectified adaptive step ``lr*step_size``, denominator ``sqrt(v) + eps``),
    ``"sgd"`` (``lr*step_size*m``) or ``"skip"``.
    """
    bias_correction1 = 1 - beta1**t
    if not rectify:
        return "adam", bias_correction1, math.sqrt(1 - beta2**t)
    beta2_t = beta2**t
    n_sma_max = 2 / (1 - beta2) - 1
    n_sma = n_sma_max - 2 * t * beta2_t / (1 - beta2_t)
    if n_sma >= 5:
        step_size = math.sqrt(
            (1 - beta2_t)
            * (n_sma - 4)
            / (n_sma_max - 4)
            * (n_sma - 2)
            / n_sma
            * n_sma_max
            / (n_sma_max - 2)
        ) / (1 - beta1**t)
        return "rect", step_size, 1.0
    if degenerated_to_sgd:
        return "sgd", 1.0 / (1 - beta1**t), 1.0
    return "skip", 0.0, 1.0


def _tensor_coefficients(
    step: Tensor,
    beta1: float,
    beta2: float,
    rectify: bool,
    degenerated_to_sgd: bool,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """Device-side coefficients, without Python branching on the step (compile/capturable).

    Returns ``(adaptive, coef, inv_bc2_sqrt)``: ``adaptive`` is 1.0 where the step divides by
    the denominator and 0.0 where it is an SGD step (or none); the update is
    ``-lr * coef * m / denom`` with ``denom = sqrt(v) * inv_bc2_sqrt + eps`` when adaptive,
    ``1`` otherwise.
    """
    # float64 where the device has it: in float32, rho_t - 4 loses ~2% to cancellation at t=5
    t = step.to(torch.float32 if step.device.type == "mps" else torch.float64)
    bc1 = 1 - torch.pow(beta1, t)
    beta2_t = torch.pow(beta2, t)
    bc2 = 1 - beta2_t
    one = torch.ones((), dtype=dtype, device=t.device)
    if not rectify:
        return one, (1 / bc1).to(dtype), torch.rsqrt(bc2).to(dtype)
    sgd = 1 / bc1 if degenerated_to_sgd else torch.zeros_like(t)
    n_sma_max = 2 / (1 - beta2) - 1
    if n_sma_max < 5:  # a hyperparameter, not the step: the adaptive branch is unreachable
        return torch.zeros_like(one), sgd.to(dtype), one
    n_sma = n_sma_max - 2 * t * beta2_t / bc2
    ratio = (
        bc2 * (n_sma - 4) / (n_sma_max - 4) * (n_sma - 2) / n_sma * (n_sma_max / (n_sma_max - 2))
    )
    rect = torch.sqrt(torch.clamp(ratio, min=0)) / bc1
    adaptive = n_sma >= 5
    return adaptive.to(dtype), torch.where(adaptive, rect, sgd).to(dtype), one


def _check_scaler_args(grad_scale: Tensor | None, found_inf: Tensor | None) -> None:
    if grad_scale is not None or found_inf is not None:
        raise RuntimeError(
            "grad_scale/found_inf are only supported by the fused AdaBelief; the optimizer "
            "unscales and skips non-finite steps itself on the other paths"
        )


def _single_tensor_adabelief(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_vars: list[Tensor],
    max_exp_avg_vars: list[Tensor],
    state_steps: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    weight_decouple: bool,
    fixed_decay: bool,
    rectify: bool,
    degenerated_to_sgd: bool,
    maximize: bool,
    capturable: bool,
    differentiable: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """The for-loop core: one tensor at a time, same operation order as 0.2.1."""
    _check_scaler_args(grad_scale, found_inf)
    tensor_math = capturable or torch.compiler.is_compiling()
    if not tensor_math:
        lr = _scalar(lr)
    for i, param in enumerate(params):
        grad = grads[i]
        exp_avg, exp_avg_var, step_t = exp_avgs[i], exp_avg_vars[i], state_steps[i]
        low = param.dtype != exp_avg.dtype
        p = param.to(exp_avg.dtype) if low else param
        if low:
            grad = grad.to(exp_avg.dtype)
        if maximize:
            grad = -grad
        step_t += 1

        if weight_decouple:
            if weight_decay != 0:
                p.mul_(1 - (weight_decay if fixed_decay else lr * weight_decay))
        elif weight_decay != 0:
            grad = grad.add(p, alpha=weight_decay)

        exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
        residual = grad - exp_avg
        exp_avg_var.mul_(beta2).addcmul_(residual, residual, value=1 - beta2).add_(eps)
        if amsgrad:
            max_v = max_exp_avg_vars[i]
            if differentiable:
                max_v.copy_(torch.maximum(max_v, exp_avg_var))
            else:
                torch.maximum(max_v, exp_avg_var, out=max_v)
            var = max_v
        else:
            var = exp_avg_var

        if tensor_math:
            adaptive, coef, inv_bc2_sqrt = _tensor_coefficients(
                step_t, beta1, beta2, rectify, degenerated_to_sgd, exp_avg.dtype
            )
            denom = (var.sqrt() * inv_bc2_sqrt + eps) * adaptive + (1 - adaptive)
            p.sub_(exp_avg / denom * (lr * coef))
        else:
            kind, step_size, bc2_sqrt = _float_coefficients(
                _scalar(step_t), beta1, beta2, rectify, degenerated_to_sgd
            )
            if kind == "adam":
                denom = (var.sqrt() / bc2_sqrt).add_(eps)
                p.addcdiv_(exp_avg, denom, value=-(lr / step_size))
            elif kind == "rect":
                denom = var.sqrt()
                denom = denom + eps if differentiable else denom.add_(eps)
                p.addcdiv_(exp_avg, denom, value=-step_size * lr)
            elif kind == "sgd":
                p.add_(exp_avg, alpha=-step_size * lr)
        if low:
            param.copy_(p)


# CPU blocking: tensors are cut into 1-D pieces of at most this many elements and processed
# in waves of about this many elements, so that the temporaries and the tensors a wave
# touches stay in cache between the seven passes and allocations are reused, not faulted in.
# Each wave has a fixed cost in Python and dispatch, so the block is as large as a wave's
# five tensors can be while they stay in the last-level cache (5 x 1 MiB of float32);
# benchmarks/optimizer_step.py --only foreach times it against torch's foreach Adam.
_CPU_BLOCK = 1 << 18


def _cpu_waves(
    lists: list[list[Tensor]], block: int = _CPU_BLOCK
) -> list[tuple[list[int], list[list[Tensor]]]]:
    """Cut aligned tensor lists into waves of <= ``block``-element pieces (contiguous only).

    Returns ``[(owner index per piece, [pieces of list 0, pieces of list 1, ...]), ...]``.
    """
    waves: list[tuple[list[int], list[list[Tensor]]]] = []
    owners: list[int] = []
    pieces: list[list[Tensor]] = [[] for _ in lists]
    size = 0
    for i, tensors in enumerate(zip(*lists)):
        n = tensors[0].numel()
        if n <= block or not all(t.is_contiguous() for t in tensors):
            parts = [(t,) for t in tensors]
        else:
            parts = [t.view(-1).split(block) for t in tensors]
        for piece in zip(*parts):
            owners.append(i)
            for dst, t in zip(pieces, piece):
                dst.append(t)
            size += piece[0].numel()
            if size >= block:
                waves.append((owners, pieces))
                owners, pieces, size = [], [[] for _ in lists], 0
    if owners:
        waves.append((owners, pieces))
    return waves


def _multi_tensor_adabelief(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_vars: list[Tensor],
    max_exp_avg_vars: list[Tensor],
    state_steps: list[Tensor],
    *,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    weight_decouple: bool,
    fixed_decay: bool,
    rectify: bool,
    degenerated_to_sgd: bool,
    maximize: bool,
    capturable: bool,
    differentiable: bool,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
) -> None:
    """The foreach core, grouped by (device, dtype), with few passes over memory.

    Per tensor: ``m.lerp_(g, 1-beta1)``; ``T = g - m``; ``T = eps/(1-beta2) + T*T``;
    ``s.lerp_(T, 1-beta2)`` (= ``beta2 s + (1-beta2) r^2 + eps``); ``T = sqrt(v)`` (reusing T);
    ``T += eps``; ``p.addcdiv_(m, T)``: seven passes and one temporary. On CPU the tensors are
    processed in cache-sized waves (see ``_CPU_BLOCK``), which makes the seven passes cost
    little more than one trip through memory.
    """
    _check_scaler_args(grad_scale, found_inf)
    if differentiable:
        raise RuntimeError("the foreach AdaBelief does not support differentiable=True")
    if not params:
        return
    tensor_math = capturable or torch.compiler.is_compiling()
    if not tensor_math:
        lr = _scalar(lr)
    hyper = dict(
        beta1=beta1,
        beta2=beta2,
        lr=lr,
        eps=eps,
        weight_decay=weight_decay,
        amsgrad=amsgrad,
        weight_decouple=weight_decouple,
        fixed_decay=fixed_decay,
        maximize=maximize,
    )

    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(params):
        buckets.setdefault((p.device, p.dtype), []).append(i)

    for (device, _), idx in buckets.items():
        lists = [
            [params[i] for i in idx],
            [grads[i] for i in idx],
            [exp_avgs[i] for i in idx],
            [exp_avg_vars[i] for i in idx],
        ]
        if amsgrad:
            lists.append([max_exp_avg_vars[i] for i in idx])
        b_steps = [state_steps[i] for i in idx]
        if not tensor_math and b_steps[0].is_cpu:
            torch._foreach_add_(b_steps, torch.tensor(1.0), alpha=1.0)
        else:
            torch._foreach_add_(b_steps, 1)

        if tensor_math:
            dtype = lists[2][0].dtype
            coefs = [
                _tensor_coefficients(st, beta1, beta2, rectify, degenerated_to_sgd, dtype)
                for st in b_steps
            ]
            _foreach_update(*lists, coefs=coefs, kinds=None, **hyper)  # type: ignore[arg-type]
            continue
        coefficients = functools.cache(
            functools.partial(
                _float_coefficients,
                beta1=beta1, beta2=beta2, rectify=rectify, degenerated_to_sgd=degenerated_to_sgd,
            )
        )  # fmt: skip
        kinds = [coefficients(t) for t in torch.stack(b_steps).tolist()]
        if device.type != "cpu":
            _foreach_update(*lists, coefs=None, kinds=kinds, **hyper)  # type: ignore[arg-type]
            continue
        # the step count is usually the same for every tensor: then one kind for all waves,
        # and the per-wave work is only the tensor operations
        uniform = kinds[0] if all(k == kinds[0] for k in kinds) else None
        consts = (
            torch.tensor(eps / (1 - beta2), dtype=lists[2][0].dtype),
            torch.tensor(eps, dtype=lists[2][0].dtype),
        )
        for owners, pieces in _cpu_waves(lists):
            wave_kinds = uniform if uniform is not None else [kinds[o] for o in owners]
            _foreach_update(*pieces, coefs=None, kinds=wave_kinds, consts=consts, **hyper)  # type: ignore[arg-type]


def _foreach_update(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_vars: list[Tensor],
    max_exp_avg_vars: list[Tensor] | None = None,
    *,
    coefs: list[tuple[Tensor, Tensor, Tensor]] | None,
    kinds: list[tuple[str, float, float]] | tuple[str, float, float] | None,
    consts: tuple[Tensor, Tensor] | None = None,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    weight_decouple: bool,
    fixed_decay: bool,
    maximize: bool,
) -> None:
    """One foreach pass sequence over aligned lists of one device and dtype (steps done).

    ``kinds``: the host coefficients per tensor, or one tuple for every tensor; ``consts``:
    the 0-dim tensors ``eps / (1 - beta2)`` and ``eps`` of the state dtype on the lists'
    device (made here when not given).
    """
    state_dtype = exp_avgs[0].dtype
    low = params[0].dtype != state_dtype
    work = [p.to(state_dtype) for p in params] if low else params
    grads, private_grads = _foreach_grads(
        work, grads, state_dtype, low=low, maximize=maximize, weight_decay=weight_decay,
        l2=not weight_decouple,
    )  # fmt: skip
    if weight_decouple and weight_decay != 0:
        torch._foreach_mul_(work, 1 - (weight_decay if fixed_decay else lr * weight_decay))

    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    if private_grads:  # residual r = g - m, in place where grads is ours: no new tensors
        torch._foreach_sub_(grads, exp_avgs)
        tmp = grads
    else:
        tmp = torch._foreach_sub(grads, exp_avgs)
    del grads
    # tmp = eps/(1-beta2) + r*r; then s + (1-beta2)(tmp - s) = beta2 s + (1-beta2) r^2 + eps
    if consts is None:
        consts = (
            torch.tensor(eps / (1 - beta2), dtype=tmp[0].dtype, device=tmp[0].device),
            torch.tensor(eps, dtype=tmp[0].dtype, device=tmp[0].device),
        )
    floor = consts[0]
    for t in tmp:
        torch.addcmul(floor, t, t, out=t)
    torch._foreach_lerp_(exp_avg_vars, tmp, 1 - beta2)
    if amsgrad:
        assert max_exp_avg_vars is not None
        torch._foreach_maximum_(max_exp_avg_vars, exp_avg_vars)
        var = max_exp_avg_vars
    else:
        var = exp_avg_vars
    for t, v in zip(tmp, var):
        torch.sqrt(v, out=t)
    denom = tmp

    if coefs is not None:
        torch._foreach_mul_(denom, [c[2] * c[0] for c in coefs])
        torch._foreach_add_(denom, [c[0] * eps + (1 - c[0]) for c in coefs])
        update = torch._foreach_mul(exp_avgs, [c[1] * (-lr) for c in coefs])
        torch._foreach_div_(update, denom)
        torch._foreach_add_(work, update)
    else:
        assert kinds is not None
        if isinstance(kinds, tuple):
            _apply_uniform_update(work, exp_avgs, denom, kinds, float(lr), eps, consts[1])
        else:
            _apply_float_update(work, exp_avgs, denom, kinds, float(lr), eps, consts[1])
    if low:
        torch._foreach_copy_(params, work)


def _foreach_grads(
    work: list[Tensor],
    grads: list[Tensor],
    state_dtype: torch.dtype,
    *,
    low: bool,
    maximize: bool,
    weight_decay: float,
    l2: bool,
) -> tuple[list[Tensor], bool]:
    """The gradients the foreach update uses: in the state dtype, negated under maximize, plus
    the L2 term ``weight_decay * p`` (``l2``). Returns them and whether they are new tensors
    (ours to overwrite) rather than the caller's ``p.grad``."""
    if low:
        grads = [g.to(state_dtype) for g in grads]
        if maximize:
            torch._foreach_neg_(grads)
    elif maximize:
        grads = torch._foreach_neg(grads)
    private = low or maximize
    if l2 and weight_decay != 0:
        if private:
            torch._foreach_add_(grads, work, alpha=weight_decay)
        else:
            grads = torch._foreach_add(grads, work, alpha=weight_decay)
            private = True
    return grads, private


def _apply_float_update(
    params: list[Tensor],
    exp_avgs: list[Tensor],
    denom: list[Tensor],
    kinds: list[tuple[str, float, float]],
    lr: float,
    eps: float,
    eps_t: Tensor,
) -> None:
    """The host-coefficient update of the foreach core (``eps_t``: ``eps`` as a 0-dim tensor
    of the state dtype on the tensors' device)."""
    by_kind: dict[str, list[int]] = {}
    for i, (kind, _, _) in enumerate(kinds):
        by_kind.setdefault(kind, []).append(i)
    for kind, idx in by_kind.items():
        if kind == "skip":
            continue
        whole = len(idx) == len(params)
        ps = params if whole else [params[i] for i in idx]
        ms = exp_avgs if whole else [exp_avgs[i] for i in idx]
        if kind == "sgd":
            torch._foreach_add_(ps, torch._foreach_mul(ms, [-kinds[i][1] * lr for i in idx]))
            continue
        ds = denom if whole else [denom[i] for i in idx]
        if kind == "adam":
            _adam_denominator(ds, [kinds[i][2] for i in idx], eps_t)
            values = [-(lr / kinds[i][1]) for i in idx]
        else:
            torch._foreach_add_(ds, eps)
            values = [-kinds[i][1] * lr for i in idx]
        torch._foreach_addcdiv_(ps, ms, ds, values)


def _apply_uniform_update(
    params: list[Tensor],
    exp_avgs: list[Tensor],
    denom: list[Tensor],
    kind: tuple[str, float, float],
    lr: float,
    eps: float,
    eps_t: Tensor,
) -> None:
    """:func:`_apply_float_update` when every tensor has the same coefficients ``kind``: the
    same operations with one scalar for all tensors."""
    name, step_size, bc2_sqrt = kind
    if name == "skip":
        return
    if name == "sgd":
        torch._foreach_add_(params, torch._foreach_mul(exp_avgs, -step_size * lr))
        return
    if name == "adam":
        _adam_denominator(denom, [bc2_sqrt] * len(denom), eps_t)
        value = -(lr / step_size)
    else:
        torch._foreach_add_(denom, eps)
        value = -step_size * lr
    torch._foreach_addcdiv_(params, exp_avgs, denom, value)


def _adam_denominator(denom: list[Tensor], bc2_sqrts: list[float], eps_t: Tensor) -> None:
    """``d <- sqrt(v)/sqrt(bc2) + eps`` in place, in one pass per tensor.

    Computed as ``eps + d * (1/sqrt(bc2))`` with a single rounding (a fused multiply-add) on
    every device. On CPU ``add(eps, d, alpha=1/sqrt(bc2))`` does it with eps as the only
    broadcast operand, so the kernel stays vectorized; ``addcmul`` with two broadcast scalars
    (used on other devices) gives the same numbers through the element-by-element loop.
    """
    if denom[0].is_cpu:
        for d, bc2_sqrt in zip(denom, bc2_sqrts):
            torch.add(eps_t, d, alpha=1.0 / bc2_sqrt, out=d)
        return
    for d, bc2_sqrt in zip(denom, bc2_sqrts):
        inv = torch.tensor(1.0 / bc2_sqrt, dtype=d.dtype, device=d.device)
        torch.addcmul(eps_t, d, inv, out=d)
