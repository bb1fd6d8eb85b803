"""Typed ``KEY=VALUE`` options: ``--opt-option``, ``--data-option`` and ``--model-option``.

A flag's value arrives as text (``maximize=False``) and a config file's as whatever TOML/YAML
made of it, but the optimizer, data set or model expects a bool, a number or a string. The
rule: every option is converted to the type its target declares (the annotation of the
optimizer class's or the factory's keyword, else the type of its default), and a value that
cannot be converted is an error naming the option. Booleans accept ``true``/``false``,
``yes``/``no`` and ``1``/``0`` in any case; a non-empty string is never taken for ``True``.
Options whose type is unknown (no annotation, no default) are passed on unchanged.
"""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any

__all__ = ["BOOL_FALSE", "BOOL_TRUE", "call_factory", "check_factory_options", "coerce",
           "coerce_all", "factory_options", "import_factory", "is_factory", "kinds_of"]

BOOL_TRUE = ("true", "yes", "1")
BOOL_FALSE = ("false", "no", "0")

#: The Python types a value may have; None: unknown (the value passes unchanged).
Kinds = frozenset[type] | None

_SEQUENCES = (tuple, list, collections.abc.Sequence)


def _hint_kinds(hint: Any) -> set[type]:
    """The accepted value types of a type hint; members other than None, bool, int, float,
    str and sequences (e.g. ``Tensor``) are left out, since no flag or file can give them."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_hint_kinds(a) for a in typing.get_args(hint)))
    if hint in (type(None), bool, int, float, str):
        return {hint}
    if origin in _SEQUENCES or hint in _SEQUENCES:
        return {list, tuple}
    return set()


def _default_kinds(default: Any) -> set[type]:
    if default is None or default is inspect.Parameter.empty:
        return set()
    if isinstance(default, (list, tuple)):
        return {list, tuple}
    return {type(default)}


def kinds_of(fn: Callable[..., Any], names: collections.abc.Iterable[str],
             defaults: dict[str, Any] | None = None) -> dict[str, Kinds]:
    """The accepted types of the keywords ``names`` of ``fn`` (annotation, else default)."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an annotation that does not resolve: fall back to the defaults
        hints = {}
    params = inspect.signature(fn).parameters
    out: dict[str, Kinds] = {}
    for name in names:
        kinds = _hint_kinds(hints[name]) if name in hints else set()
        if not kinds - {type(None)}:
            param = params.get(name)
            default = (defaults or {}).get(name, param.default if param else None)
            kinds |= _default_kinds(default)
        out[name] = frozenset(kinds) if kinds - {type(None)} else None
    return out


def _describe(kinds: frozenset[type]) -> str:
    words = {bool: "true or false (true/false/yes/no/1/0)", int: "an integer",
             float: "a number", str: "a string", list: "a list", type(None): "null"}
    if float in kinds:
        kinds = kinds - {int}
    return " or ".join(words[k] for k in (bool, int, float, str, list, type(None)) if k in kinds)


def _from_text(text: str, kinds: frozenset[type]) -> Any:
    """``text`` as the first of bool, int, float that ``kinds`` accepts; ValueError if none."""
    if bool in kinds and text.strip().lower() in BOOL_TRUE + BOOL_FALSE:
        return text.strip().lower() in BOOL_TRUE
    if int in kinds and float not in kinds:
        return int(text)
    if float in kinds:
        return float(text)
    raise ValueError(text)


def _convert(value: Any, kinds: frozenset[type]) -> Any:
    if isinstance(value, bool):
        if bool in kinds:
            return value
    elif isinstance(value, int):
        if int in kinds and float not in kinds:
            return value
        if float in kinds:
            return float(value)
        if bool in kinds and value in (0, 1):
            return bool(value)
    elif isinstance(value, float):
        if float in kinds:
            return value
        if int in kinds and value.is_integer():
            return int(value)
    elif isinstance(value, str):
        return value if str in kinds else _from_text(value, kinds)
    elif isinstance(value, (list, tuple)):
        if list in kinds:
            return value
    elif value is None and type(None) in kinds:
        return None
    raise ValueError(value)


def coerce(flag: str, key: str, value: Any, kinds: Kinds) -> Any:
    """``value`` converted to ``kinds``; a ValueError naming ``flag`` and ``key`` if it cannot
    be (``kinds`` None: unchanged)."""
    if kinds is None:
        return value
    try:
        return _convert(value, kinds)
    except (ValueError, OverflowError):
        raise ValueError(
            f"{flag} {key}: expected {_describe(kinds)}, got {value!r}"
        ) from None


def coerce_all(flag: str, options: dict[str, Any], kinds: dict[str, Kinds]) -> dict[str, Any]:
    """Every option of ``options`` converted (keys missing from ``kinds`` pass unchanged)."""
    return {k: coerce(flag, k, v, kinds.get(k)) for k, v in options.items()}


def optimizer_kinds(name: str) -> dict[str, Kinds]:
    """The accepted types of the hyperparameters of registry optimizer ``name``.

    The registry's factories import their optimizer lazily and take ``**hyperparameters``, so
    the class is learned by building one over a one-element tensor; its ``__init__``
    annotations and ``defaults`` (over the spec's defaults) give the types. Empty for an
    unknown name or an optimizer that cannot be built that way (the loop reports those).
    """
    import torch

    from adabatch.optim import get_spec

    try:
        spec = get_spec(name)
        opt = spec.create([torch.zeros(1, requires_grad=True)])
    except Exception:  # unknown name or a factory that needs more: the loop reports it
        return {}
    defaults = {**spec.defaults, **opt.defaults}
    return kinds_of(type(opt).__init__, spec.hyperparameters, defaults)


# --------------------------------------------------------------------------------------------
# the user's own factories: ``--dataset package.module:factory``, ``--model ...:factory``


def is_factory(name: str) -> bool:
    """Whether a ``--dataset``/``--model`` value names a factory (``package.module:attr``)
    rather than a built-in choice."""
    return ":" in name


def import_factory(spec: str, what: str) -> Callable[..., Any]:
    """The callable ``package.module:attr`` (``attr`` may be dotted) names, imported with
    importlib; the current directory is importable, as for ``python -m``. A ValueError of
    one line naming ``what`` factory ``spec`` when it cannot be imported or is not callable."""
    import importlib
    import os
    import sys

    module_name, _, attr = spec.partition(":")
    where = f"{what} factory {spec!r}"
    if not module_name or not attr or ":" in attr:
        raise ValueError(f"{where}: expected package.module:factory")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # the console script does not put it there
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise ValueError(f"{where}: no module named {e.name or module_name!r} (is it installed, "
                         "in the current directory or on PYTHONPATH?)") from None
    except Exception as e:  # the module's own code failed
        raise ValueError(f"{where}: importing {module_name} raised {type(e).__name__}: "
                         f"{' '.join(str(e).split())}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{where}: module {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{where}: {attr} is a {type(obj).__name__}, not a callable")
    return obj


def factory_options(factory: Callable[..., Any], fixed: int) -> tuple[list[str], bool]:
    """The keyword options a factory takes after its ``fixed`` leading parameters, and
    whether it takes any keyword (``**options``)."""
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: accept anything
        return [], True
    named = [p.name for p in params[fixed:]
             if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return named, any(p.kind is p.VAR_KEYWORD for p in params)


def check_factory_options(where: str, factory: Callable[..., Any], fixed: int,
                          options: collections.abc.Iterable[str]) -> None:
    """ValueError naming the options ``factory`` does not take (see :func:`factory_options`)."""
    named, any_keyword = factory_options(factory, fixed)
    unknown = sorted(set(options) - set(named))
    if unknown and not any_keyword:
        allowed = ", ".join(named) if named else "none"
        raise ValueError(f"{where} does not take option(s) {', '.join(unknown)} (it takes: "
                         f"{allowed})")


def call_factory(where: str, factory: Callable[..., Any], *args: Any, **options: Any) -> Any:
    """``factory(*args, **options)``; whatever it raises becomes a ValueError of one line
    naming ``where``."""
    try:
        return factory(*args, **options)
    except Exception as e:
        raise ValueError(f"{where} raised {type(e).__name__}: "
                         f"{' '.join(str(e).split()) or '(no message)'}") from None
