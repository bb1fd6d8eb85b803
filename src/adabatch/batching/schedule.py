"""Learning-rate schedules counted in samples, for any training loop.

When the batch size changes during training, a schedule counted in optimizer steps goes
wrong: a run whose batch grows 8x takes 8x fewer steps to see the same data, so a warmup
or a decay "over 10 000 steps" ends at a different point of training depending on what the
batch-size policy decided. These schedules count *samples* (the samples seen before the
step), so they follow the data whatever the batch size; the cosine decay may instead be
counted in steps when the budget itself is a number of steps.

A schedule is a pure function of ``(samples, step)`` returning a multiplier of the base
learning rates: no state, no ``state_dict`` (resuming a run needs only the sample and step
counters the loop checkpoints anyway, e.g. ``controller.samples`` and ``controller.step``),
and the same arguments always give the same float. Set the learning rate once per step,
before ``optimizer.step()``, with :func:`~adabatch.batching.apply_lr`::

    schedule = WarmupCosine(warmup_samples=10_000, total_samples=1_000_000, min_ratio=0.1)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    for ...:                                   # one training step
        apply_lr(optimizer, base_lrs,
                 schedule(controller.samples, controller.step), controller.lr_factor)
        ...                                    # forward/backward, optimizer.step()
        controller.update(stats)

This is the schedule of the ``adabatch train`` command (``--warmup-samples``,
``--lr-schedule``, ``--min-lr-ratio``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from adabatch._validation import check_int, check_real

__all__ = ["LinearWarmup", "WarmupCosine"]


def _warmup(warmup_samples: int, samples: int) -> float:
    if warmup_samples > 0:
        return min(1.0, (samples + 1) / warmup_samples)
    return 1.0


@dataclass(frozen=True)
class LinearWarmup:
    """Linear warmup in samples, then 1: ``min(1, (samples + 1) / warmup_samples)``.

    Args:
        warmup_samples: samples over which the multiplier rises to 1 (0: no warmup, the
            multiplier is always 1).

    ``schedule(samples, step)`` gives the multiplier of a step taken after ``samples``
    samples (``step`` is accepted for a common signature and ignored). Pure: no state.
    """

    warmup_samples: int = 0

    def __post_init__(self) -> None:
        check_int("warmup_samples", self.warmup_samples, 0)

    def __call__(self, samples: int, step: int) -> float:
        check_int("samples", samples, 0)
        check_int("step", step, 0)
        return _warmup(self.warmup_samples, samples)


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warmup in samples times a cosine decay down to ``min_ratio``.

    The multiplier of a step taken after ``samples`` samples and ``step`` steps is
    ``warmup · (min_ratio + (1 − min_ratio) · (1 + cos(π·p)) / 2)`` with ``warmup`` as in
    :class:`LinearWarmup` and the progress p, clamped to [0, 1]:

    - ``total_samples`` given: p = (samples − warmup_samples) / (total_samples −
      warmup_samples) (the decay starts after the warmup; a denominator below 1 counts
      as 1);
    - ``total_steps`` given: p = step / total_steps (the budget is a number of steps).

    Exactly one of ``total_samples`` and ``total_steps`` is given. Past the total the
    multiplier stays ``warmup · min_ratio``. Pure: no state, nothing to checkpoint.

    Args:
        warmup_samples: samples of linear warmup (0: none).
        total_samples: the sample budget the cosine spans.
        total_steps: the step budget the cosine spans (instead of ``total_samples``).
        min_ratio: the multiplier at the end of the decay, in [0, 1].
    """

    warmup_samples: int = 0
    total_samples: int | None = None
    total_steps: int | None = None
    min_ratio: float = 0.0

    def __post_init__(self) -> None:
        check_int("warmup_samples", self.warmup_samples, 0)
        if (self.total_samples is None) == (self.total_steps is None):
            raise ValueError("WarmupCosine needs exactly one of total_samples and total_steps, "
                             f"got total_samples={self.total_samples!r}, "
                             f"total_steps={self.total_steps!r}")
        if self.total_samples is not None:
            check_int("total_samples", self.total_samples)
        if self.total_steps is not None:
            check_int("total_steps", self.total_steps)
        ratio = check_real("min_ratio", self.min_ratio, minimum=0.0, maximum=1.0)
        object.__setattr__(self, "min_ratio", ratio)

    def __call__(self, samples: int, step: int) -> float:
        check_int("samples", samples, 0)
        check_int("step", step, 0)
        factor = _warmup(self.warmup_samples, samples)
        if self.total_steps is not None:
            progress = step / max(1, self.total_steps)
        else:
            assert self.total_samples is not None  # __post_init__: exactly one is set
            span = max(1, self.total_samples - self.warmup_samples)
            progress = max(0, samples - self.warmup_samples) / span
        progress = min(1.0, progress)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        factor *= self.min_ratio + (1.0 - self.min_ratio) * cosine
        return factor
