"""When is a run diverging? A documented rule for losses that blow up and stay finite.

A NaN or infinite loss is divergence. A finite one is too when it is far above the run's own
scale: the *reference* is the mean training loss of the first ``warmup`` steps (the loss of an
untrained model, which any useful run goes below), and step k diverges when

    loss_k > factor · reference        (factor = 100 by default)

Cross-entropy starts near ln(classes) (2.3 for 10 classes): the rule fires above 230, which a
model that learns anything never reaches; adagradnorm or adabelief at ``--lr 1e6`` reach
1e22. Until ``warmup`` steps are seen only non-finite losses count. The reference is part of
the trainer's checkpoint (:meth:`DivergenceMonitor.state_dict`), so a resumed run judges by the
same number. ``factor=inf`` turns the finite rule off.
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
        warmup: steps whose mean loss is the reference (>= 1).
    """

    def __init__(self, factor: float = 100.0, warmup: int = 10) -> None:
        self.factor = check_real("divergence factor", factor, minimum=1.0, strict=True,
                                 finite=False)
        self.warmup = check_int("divergence warmup", warmup, minimum=1)
        self._sum = 0.0
        self._count = 0

    @property
    def reference(self) -> float | None:
        """The mean loss of the first ``warmup`` steps, once they are seen."""
        return self._sum / self._count if self._count >= self.warmup else None

    def check(self, loss: float, step: int) -> None:
        """Raise :class:`Diverged` (one-line message) if ``loss`` at ``step`` diverges."""
        if not math.isfinite(loss):
            raise Diverged(f"the loss is {loss} at step {step}")
        ref = self.reference
        if ref is None:
            self._sum += loss
            self._count += 1
            return
        if loss > self.factor * max(ref, 0.0) and loss > 0.0:
            raise Diverged(f"the loss is {loss:.4g} at step {step}, more than {self.factor:g}x "
                           f"its scale ({ref:.4g}, the mean of the first {self.warmup} steps)")

    def state_dict(self) -> dict[str, Any]:
        return {"sum": self._sum, "count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_mapping("divergence state", state)
        try:
            total, count = float(state["sum"]), int(state["count"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"Invalid divergence state: {state!r} (must hold a float 'sum' "
                             "and an int 'count')") from None
        self._sum, self._count = total, count
