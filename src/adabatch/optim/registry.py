"""A registry of optimizer names: defaults, accepted hyperparameters and capability flags.

The training program resolves ``--optimizer NAME`` through :func:`create`; a user's own loop
can do the same::

    from adabatch.optim import create, list_optimizers, get_spec
    opt = create("adagradnorm", model.parameters())          # the spec's defaults
    opt = create("adabelief", model.parameters(), lr=3e-4)   # override a hyperparameter
    get_spec("adam").defaults["lr"]                           # 1e-3

Names: ``adabelief``, ``adagrad``, ``adagradnorm``, ``adam``, ``adamw``, ``sgd``, ``momentum``
(SGD with ``momentum=0.9``; ``sgd`` also accepts ``momentum``). Every spec lists the
hyperparameters its factory accepts; anything else is an error (a typo must not be silently
ignored). Factories import their optimizer lazily, so importing the registry is cheap.

Default learning rates (used when the trainer is not given ``--lr``):

========== ====== ===========================================================
name       lr     source
========== ====== ===========================================================
adabelief  1e-3   Zhuang et al. / adabelief-pytorch default
adagrad    1e-2   torch.optim.Adagrad default (AdAdaGrad runs: 8e-3 .. 5e-2)
adagradnorm 1.0   Ward et al.; the AdAdaGrad release's default
adam       1e-3   Kingma & Ba / torch default
adamw      1e-3   torch default (weight_decay 1e-2, torch default)
sgd        0.1    the usual small-network / ResNet starting point
momentum   0.1    with momentum 0.9, the ResNet recipe (He et al.)
========== ====== ===========================================================
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import torch
from torch.optim import Optimizer

__all__ = ["OptimizerSpec", "create", "get_spec", "list_optimizers", "register"]


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """What the registry knows about one optimizer name.

    Attributes:
        name: the registry name.
        factory: ``factory(params, **hyperparameters) -> torch.optim.Optimizer``.
        defaults: hyperparameters applied when the caller does not give them (read-only).
        description: one line for ``--help`` and listings.
        hyperparameters: every keyword the factory accepts (besides ``params``).
        supports_foreach: has a ``foreach`` path (``foreach=True`` is meaningful).
        supports_fused: has a ``fused`` path.
        supports_maximize: accepts ``maximize=True``.
        supports_weight_decay: accepts ``weight_decay``.
    """

    name: str
    factory: Callable[..., Optimizer]
    defaults: Mapping[str, Any]
    description: str
    hyperparameters: frozenset[str]
    supports_foreach: bool = False
    supports_fused: bool = False
    supports_maximize: bool = False
    supports_weight_decay: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))
        object.__setattr__(self, "hyperparameters", frozenset(self.hyperparameters))
        unknown = set(self.defaults) - self.hyperparameters
        if unknown:
            raise ValueError(
                f"OptimizerSpec {self.name!r}: defaults {sorted(unknown)} are not among its "
                f"hyperparameters {sorted(self.hyperparameters)}"
            )
        for flag, hp in (
            ("supports_foreach", "foreach"),
            ("supports_fused", "fused"),
            ("supports_maximize", "maximize"),
            ("supports_weight_decay", "weight_decay"),
        ):
            if getattr(self, flag) and hp not in self.hyperparameters:
                raise ValueError(
                    f"OptimizerSpec {self.name!r}: {flag}=True but {hp!r} is not a hyperparameter"
                )

    def create(self, params: Any, **hyperparameters: Any) -> Optimizer:
        """``factory(params, **{**defaults, **hyperparameters})`` after checking the names."""
        unknown = sorted(set(hyperparameters) - self.hyperparameters)
        if unknown:
            raise ValueError(
                f"unknown hyperparameter(s) {', '.join(map(repr, unknown))} for optimizer "
                f"{self.name!r}; it accepts: {', '.join(sorted(self.hyperparameters))}"
            )
        return self.factory(params, **{**self.defaults, **hyperparameters})


# ---- factories (lazy imports: adabelief is a separate module, torch's are cheap) ----


def _adabelief(params: Any, **hp: Any) -> Optimizer:
    from adabatch.optim.adabelief import AdaBelief

    return AdaBelief(params, **hp)


def _adagrad(params: Any, **hp: Any) -> Optimizer:
    from adabatch.optim.adagrad import adagrad

    return adagrad(params, **hp)


def _adagradnorm(params: Any, **hp: Any) -> Optimizer:
    from adabatch.optim.adagradnorm import AdaGradNorm

    return AdaGradNorm(params, **hp)


def _adam(params: Any, **hp: Any) -> Optimizer:
    return torch.optim.Adam(params, **hp)


def _adamw(params: Any, **hp: Any) -> Optimizer:
    return torch.optim.AdamW(params, **hp)


def _sgd(params: Any, **hp: Any) -> Optimizer:
    return torch.optim.SGD(params, **hp)


def _keywords(cls: Callable[..., Any]) -> frozenset[str]:
    """The keywords of a torch optimizer class (they differ between torch versions)."""
    return frozenset(k for k in inspect.signature(cls).parameters if k != "params")


_ADABELIEF_HP = frozenset(
    {"lr", "betas", "eps", "weight_decay", "amsgrad", "weight_decouple", "fixed_decay", "rectify"}
    | {"degenerated_to_sgd", "maximize", "foreach", "capturable", "differentiable", "fused"}
)

_REGISTRY: dict[str, OptimizerSpec] = {}


def register(spec: OptimizerSpec, *, overwrite: bool = False) -> OptimizerSpec:
    """Add ``spec`` under ``spec.name`` (a ``ValueError`` if taken, unless ``overwrite``)."""
    if not isinstance(spec, OptimizerSpec):
        raise TypeError(f"register() takes an OptimizerSpec, got {type(spec).__name__}")
    if spec.name in _REGISTRY and not overwrite:
        raise ValueError(f"optimizer {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


for _spec in (
    OptimizerSpec(
        name="adabelief",
        factory=_adabelief,
        defaults={"lr": 1e-3},
        description="AdaBelief (Zhuang et al. 2020), numerics of adabelief-pytorch 0.2.1",
        hyperparameters=_ADABELIEF_HP,
        supports_foreach=True,
        supports_fused=True,
        supports_maximize=True,
        supports_weight_decay=True,
    ),
    OptimizerSpec(
        name="adagrad",
        factory=_adagrad,
        defaults={"lr": 1e-2},
        description="coordinate-wise AdaGrad of the AdAdaGrad paper (torch.optim.Adagrad, eps=0)",
        hyperparameters=frozenset({"lr", "b0", "weight_decay", "maximize", "foreach", "fused"}),
        supports_foreach=True,
        supports_fused=True,
        supports_maximize=True,
        supports_weight_decay=True,
    ),
    OptimizerSpec(
        name="adagradnorm",
        factory=_adagradnorm,
        defaults={"lr": 1.0},
        description="AdaGrad-Norm (Ward, Wu, Bottou): one scalar step size, global norm",
        hyperparameters=frozenset({"lr", "b0", "weight_decay", "per_group", "maximize", "foreach"}),
        supports_foreach=True,
        supports_maximize=True,
        supports_weight_decay=True,
    ),
    OptimizerSpec(
        name="adam",
        factory=_adam,
        defaults={"lr": 1e-3},
        description="Adam (torch.optim.Adam)",
        hyperparameters=_keywords(torch.optim.Adam),
        supports_foreach=True,
        supports_fused=True,
        supports_maximize=True,
        supports_weight_decay=True,
    ),
    OptimizerSpec(
        name="adamw",
        factory=_adamw,
        defaults={"lr": 1e-3, "weight_decay": 1e-2},
        description="AdamW, decoupled weight decay (torch.optim.AdamW)",
        hyperparameters=_keywords(torch.optim.AdamW),
        supports_foreach=True,
        supports_fused=True,
        supports_maximize=True,
        supports_weight_decay=True,
    ),
    OptimizerSpec(
        name="sgd",
        factory=_sgd,
        defaults={"lr": 0.1},
        description="plain SGD (torch.optim.SGD; momentum=0 unless given)",
        hyperparameters=_keywords(torch.optim.SGD),
        supports_foreach=True,
        supports_fused=True,
        supports_maximize=True,
        supports_weight_decay=True,
    ),
    OptimizerSpec(
        name="momentum",
        factory=_sgd,
        defaults={"lr": 0.1, "momentum": 0.9},
        description="SGD with momentum 0.9 (torch.optim.SGD)",
        hyperparameters=_keywords(torch.optim.SGD),
        supports_foreach=True,
        supports_fused=True,
        supports_maximize=True,
        supports_weight_decay=True,
    ),
):
    register(_spec)
del _spec


def list_optimizers() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> OptimizerSpec:
    """The spec of ``name``; ``ValueError`` listing the known names if there is none."""
    spec = _REGISTRY.get(name) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f"unknown optimizer {name!r}; available: {', '.join(list_optimizers())}")
    return spec


def create(name: str, params: Any, **hyperparameters: Any) -> Optimizer:
    """Build optimizer ``name`` over ``params`` with its defaults overridden by ``hyperparameters``.

    Unknown names and unknown hyperparameters raise ``ValueError`` naming the accepted ones.
    """
    return get_spec(name).create(params, **hyperparameters)
