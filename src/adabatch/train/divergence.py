"""When is a run diverging? A documented rule for losses that blow up and stay finite.

A NaN or infinite loss is divergence. A finite one is too when it is far above the run's own
scale: the *reference* is the smallest training loss of the first ``warmup`` steps (the first
step's is the loss of the untrained model, which any useful run goes below; the minimum, not
the mean, so that a blow-up inside the first steps cannot raise the scale it is judged by),
and every step k after the first diverges when

    loss_k > factor · reference        (factor = 100 by default)

Cross-entropy starts near ln(classes) (2.3 for 10 classes): the rule fires above 230, which a
model that learns anything never reaches; adagradnorm at ``--lr 1e6`` on digits jumps from 2.3
to 2.5e11 at step 2. The reference is part of the trainer's checkpoint
(:meth:`DivergenceMonitor.state_dict`), so a resumed run judges by the same number.
``factor=inf`` turns the finite rule off; a reference of 0 (a loss that starts at its exact
minimum) never flags a finite loss.
"""

from __future__ import annotations

import math
from typing import Any

from adabatch._validation import check_int, check_mapping, check_real

__all__ = ["Diverged", "DivergenceMonitor"]


class Diverged(FloatingPointError):
    """The training loss is NaN/inf, or finite and far above the run's scale."""


class DivergenceMonitor:
    """Checks every step's training loss against the rule of this module.

    Args:
        factor: how far above the reference a finite loss may go (> 1; ``math.inf``: never).
        warmup: steps over which the reference (their smallest loss) is taken (>= 1).
    """

    def __init__(self, factor: float = 100.0, warmup: int = 10) -> None:
        self.factor = check_real("divergence factor", factor, minimum=1.0, strict=True,
                                 finite=False)
        self.warmup = check_int("divergence warmup", warmup, minimum=1)
        self._min = math.inf
        self._count = 0

    @property
    def reference(self) -> float | None:
        """The smallest loss of the first ``warmup`` steps seen so far (None before any)."""
        return self._min if self._count else None

    def check(self, loss: float, step: int) -> None:
        """Raise :class:`Diverged` (one-line message) if ``loss`` at ``step`` diverges."""
        if not math.isfinite(loss):
            raise Diverged(f"the loss is {loss} at step {step}")
        ref = self.reference
        if ref is not None and ref > 0.0 and loss > self.factor * ref:
            raise Diverged(f"the loss is {loss:.4g} at step {step}, more than {self.factor:g}x "
                           f"its scale ({ref:.4g}, the smallest loss of the first "
                           f"{min(self._count, self.warmup)} steps)")
        if self._count < self.warmup:
            self._min = min(self._min, loss)
            self._count += 1

    def state_dict(self) -> dict[str, Any]:
        return {"min": self._min, "count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_mapping("divergence state", state)
        try:
            low, count = float(state["min"]), int(state["count"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"Invalid divergence state: {state!r} (must hold a float 'min' "
                             "and an int 'count')") from None
        self._min, self._count = low, count
