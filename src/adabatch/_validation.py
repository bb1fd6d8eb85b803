"""Checks of user-given values, with one rule for every module of adabatch.

The rule: a value of the wrong *type* raises :class:`TypeError`, a value of the right type
but outside its range raises :class:`ValueError`. Every message has the same form,
``Invalid NAME: VALUE (must be ...)``, so that a user reads the name of what to fix first.
``bool`` is never accepted where a number is expected (``True`` is an ``int`` in Python, but
nobody means 1 by it). Runtime input is checked here, never with ``assert`` (which ``python
-O`` removes).
"""

from __future__ import annotations

import math
from typing import Any

import torch

#: Floating-point dtypes whose optimizer state is kept in float32.
LOW_PRECISION: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)


def check_int(name: str, value: Any, minimum: int | None = 1) -> int:
    """``value`` as an int of at least ``minimum`` (no lower bound with ``None``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Invalid {name}: {value!r} (must be an int)")
    if minimum is not None and value < minimum:
        raise ValueError(f"Invalid {name}: {value} (must be >= {minimum})")
    return int(value)


def check_real(name: str, value: Any, *, minimum: float | None = None,
               strict: bool = False, maximum: float | None = None,
               finite: bool = True) -> float:
    """``value`` as a float: a real number (int or float, not bool) in the given range.

    Args:
        minimum: lower bound (inclusive, or exclusive with ``strict=True``); none by default.
        maximum: upper bound (inclusive); none by default.
        finite: refuse NaN and ±inf (default True).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Invalid {name}: {value!r} (must be a real number)")
    try:
        x = float(value)
    except OverflowError:
        raise ValueError(f"Invalid {name}: {value} (too large for a float)") from None
    if math.isnan(x) or (finite and math.isinf(x)):
        raise ValueError(f"Invalid {name}: {x} (must be finite)")
    if minimum is not None and (x <= minimum if strict else x < minimum):
        raise ValueError(f"Invalid {name}: {x} (must be {'>' if strict else '>='} {minimum})")
    if maximum is not None and x > maximum:
        raise ValueError(f"Invalid {name}: {x} (must be <= {maximum})")
    return x


def check_positive(name: str, value: Any) -> float:
    """A finite real number > 0."""
    return check_real(name, value, minimum=0.0, strict=True)


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> Any:
    """``value`` if it is one of ``choices`` (a ValueError listing them otherwise)."""
    if value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"Invalid {name}: {value!r} (must be one of {listed})")
    return value


def check_callable(name: str, value: Any) -> Any:
    """``value`` if it is callable (a TypeError otherwise)."""
    if not callable(value):
        raise TypeError(f"Invalid {name}: {type(value).__name__} (must be callable)")
    return value


def check_mapping(name: str, value: Any) -> dict[str, Any]:
    """``value`` if it is a dict (for ``load_state_dict``; a TypeError otherwise)."""
    if not isinstance(value, dict):
        raise TypeError(f"Invalid {name}: {type(value).__name__} (must be a dict)")
    return value
