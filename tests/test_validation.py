"""adabatch._validation: one rule, TypeError for the type, ValueError for the value."""

from __future__ import annotations

import math

import pytest

from adabatch import _validation as v


@pytest.mark.parametrize("value", [True, 1.0, "3", None])
def test_check_int_type(value) -> None:
    with pytest.raises(TypeError, match=r"Invalid n: .* \(must be an int\)"):
        v.check_int("n", value)


def test_check_int_value() -> None:
    assert v.check_int("n", 3) == 3
    assert v.check_int("n", -5, minimum=None) == -5
    with pytest.raises(ValueError, match=r"Invalid n: 0 \(must be >= 1\)"):
        v.check_int("n", 0)


@pytest.mark.parametrize("value", [False, "1e-3", None, [1.0]])
def test_check_real_type(value) -> None:
    with pytest.raises(TypeError, match="must be a real number"):
        v.check_real("lr", value)


def test_check_real_ranges() -> None:
    assert v.check_real("lr", 2) == 2.0
    assert v.check_positive("lr", 1e-3) == 1e-3
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="Invalid lr"):
            v.check_positive("lr", bad)
    with pytest.raises(ValueError, match=r"must be <= 1"):
        v.check_real("beta", 1.5, maximum=1.0)
    with pytest.raises(ValueError, match="too large for a float"):
        v.check_real("x", 10**400)
    assert v.check_real("x", math.inf, finite=False) == math.inf


def test_check_choice_callable_mapping() -> None:
    assert v.check_choice("mode", "a", ("a", "b")) == "a"
    with pytest.raises(ValueError, match=r"must be one of 'a', 'b'"):
        v.check_choice("mode", "c", ("a", "b"))
    with pytest.raises(TypeError, match="must be callable"):
        v.check_callable("reduce", 3)
    with pytest.raises(TypeError, match=r"Invalid state_dict: NoneType \(must be a dict\)"):
        v.check_mapping("state_dict", None)
