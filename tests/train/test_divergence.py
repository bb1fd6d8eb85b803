"""The divergence rule: non-finite always, finite when far above the first steps' mean."""

from __future__ import annotations

import math

import pytest

from adabatch.train.divergence import Diverged, DivergenceMonitor


def test_finite_blow_up_is_caught() -> None:
    mon = DivergenceMonitor(factor=100.0, warmup=3)
    for k, loss in enumerate([2.3, 2.2, 2.4], 1):
        mon.check(loss, k)
    assert mon.reference == pytest.approx(2.2)
    mon.check(200.0, 4)  # below 220: allowed
    with pytest.raises(Diverged, match=r"loss is 6.5e\+22 at step 5, more than 100x its "
                                       r"scale \(2.2"):
        mon.check(6.5e22, 5)


def test_a_blow_up_inside_the_first_steps_is_caught() -> None:
    # adagradnorm --lr 1e6 on digits: 2.28 at step 1, 2.5e11 at step 2
    mon = DivergenceMonitor()
    mon.check(2.28, 1)
    with pytest.raises(Diverged, match="at step 2"):
        mon.check(2.5e11, 2)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_is_caught_at_once(bad: float) -> None:
    with pytest.raises(Diverged, match="at step 1"):
        DivergenceMonitor().check(bad, 1)


def test_the_reference_is_fixed_after_warmup() -> None:
    mon = DivergenceMonitor(factor=10.0, warmup=2)
    mon.check(5.0, 1)
    mon.check(4.0, 2)
    mon.check(0.01, 3)  # after the warm-up: does not lower the scale
    assert mon.reference == 4.0
    mon.check(39.0, 4)
    with pytest.raises(Diverged):
        mon.check(41.0, 5)


def test_a_zero_reference_never_flags_a_finite_loss() -> None:
    mon = DivergenceMonitor(warmup=1)
    mon.check(0.0, 1)
    mon.check(1e30, 2)


def test_infinite_factor_disables_the_finite_rule_and_state_round_trips() -> None:
    mon = DivergenceMonitor(factor=math.inf, warmup=1)
    mon.check(1.0, 1)
    mon.check(1e300, 2)
    other = DivergenceMonitor(factor=math.inf, warmup=1)
    other.load_state_dict(mon.state_dict())
    assert other.reference == mon.reference == 1.0


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="divergence factor"):
        DivergenceMonitor(factor=1.0)
    with pytest.raises(TypeError, match="divergence warmup"):
        DivergenceMonitor(warmup=2.5)
    with pytest.raises(TypeError, match="must be a dict"):
        DivergenceMonitor().load_state_dict(None)
    with pytest.raises(ValueError, match="Invalid divergence state"):
        DivergenceMonitor().load_state_dict({"min": 1.0})
