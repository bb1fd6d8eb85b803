r"""Batch-size policies: the adaptive :class:`BatchSizeController` and fixed schedules.

Every policy has the same interface, so a training loop treats them alike::

    policy.batch_size          # the global batch size of the next step
    policy.needs               # statistics the next update needs (empty for fixed schedules)
    policy.wants_stats()       # True when the next update() will use statistics
    policy.update(stats)       # after every optimizer step; returns the next batch size
    policy.history             # rows {step, samples, batch_size, required, passed,
                               #       statistic, new_batch_size}: one per test step
                               #       (adaptive) or per batch-size change (schedules)
    policy.warnings            # count of undecidable statistics (adaptive controller)
    policy.state_dict() / policy.load_state_dict(state)

**Adaptive controller.** After a test step of batch size b_k, with the test's required batch
size r_k (see :mod:`adabatch.batching.batch_tests`)::

    b_{k+1} = min(B_max, max(b_k, granularity · ⌈r_k / granularity⌉))

so the batch size never decreases, never exceeds ``maximum``, and stays a multiple of
``granularity`` (the micro-batch size × world size of the loop). ``initial`` and ``maximum``
must themselves be multiples of ``granularity`` (a :class:`ValueError` says so otherwise): a
maximum that the loop cannot run would be silently lowered, and we prefer the loop's author
to choose. ``r_k = math.inf`` jumps to the maximum. Undecidable statistics (the test returns
``None``: G = 0 or NaN/inf) keep the batch size, add one to ``warnings`` and emit a single
:class:`RuntimeWarning` per controller.

**Interval.** The test runs on steps 0, interval, 2·interval, ... (steps counted from 0 by
``update``), and never once the batch size has reached ``maximum`` (there is nothing left to
decide, and measuring statistics costs time): :meth:`wants_stats` says whether the next
update is such a step, so the loop measures statistics only then.

**Learning-rate coupling** (``lr_scaling``; default ``None`` as in the AdAdaGrad paper). When
the batch grows from b to b', ``lr_factor`` is multiplied by b'/b (``"linear"``) or √(b'/b)
(``"sqrt"``), so it is B/B_0 or √(B/B_0): the learning rate relative to the one at the
initial batch. The controller never touches an optimizer: the loop owns the learning rate and
sets it once per step with :func:`apply_lr` (``base_lr × schedule × controller.lr_factor``),
or folds the factor into a scheduler that sets lr from its ``base_lrs``
(``LambdaLR(optimizer, lambda s: schedule(s) * controller.lr_factor)``). The factor is part
of ``state_dict``.

**Fixed schedules** (the ramp-up baselines of the AdAdaGrad authors' code,
https://github.com/timlautk/AdAdaGrad, ``main.py``):

- :class:`ConstantSchedule` -- one batch size throughout.
- :class:`LinearSchedule` -- the authors' ``--linear_ramp_up``: after every step the global
  batch size grows by a fixed ``--linear_ramp_up_increment`` (default 256), capped at
  ``--max_batch_size``. Here: ``+increment`` every ``interval`` steps (default 1), rounded up
  to ``granularity``, capped at ``maximum``.
- :class:`StagewiseSchedule` -- the authors' ``--stagewise_ramp_up``: a list of global batch
  sizes (``--global_batch_sizes``) and a sample budget per stage (``--samples_stages``,
  default ``max_samples // number of stages`` each); after each step the samples are counted
  and, once they reach the cumulative budget of the current stage, the next batch size in
  the list is used (one stage per step at most). :meth:`StagewiseSchedule.geometric` builds
  the list by multiplying by a factor (the authors' default list doubles from 512).
"""

from __future__ import annotations

import math
import warnings as _warnings
from collections.abc import Sequence
from typing import Any

import torch

from adabatch._validation import check_int, check_mapping
from adabatch.batching.batch_tests import BatchTest
from adabatch.batching.stats import GradientStats

__all__ = [
    "BatchSizeController",
    "ConstantSchedule",
    "LinearSchedule",
    "StagewiseSchedule",
    "apply_lr",
]

_LR_SCALINGS = (None, "linear", "sqrt")



def _check_multiple(name: str, value: int, granularity: int) -> None:
    if value % granularity != 0:
        raise ValueError(
            f"{name} ({value}) must be a multiple of granularity ({granularity})"
        )


def _round_up(value: int | float, granularity: int) -> int | float:
    """The smallest multiple of ``granularity`` >= value (exact integer arithmetic)."""
    if math.isinf(value):
        return value
    return -(-math.ceil(value) // granularity) * granularity


class _BatchPolicy:
    """Shared bookkeeping: steps, samples, history, LR coupling and state."""

    needs: frozenset[str] = frozenset()

    def __init__(
        self,
        initial: int,
        maximum: int,
        *,
        granularity: int = 1,
        lr_scaling: str | None = None,
    ) -> None:
        initial = check_int("initial", initial)
        maximum = check_int("maximum", maximum)
        granularity = check_int("granularity", granularity)
        if maximum < initial:
            raise ValueError(f"maximum ({maximum}) must be >= initial ({initial})")
        _check_multiple("initial", initial, granularity)
        _check_multiple("maximum", maximum, granularity)
        if lr_scaling not in _LR_SCALINGS:
            raise ValueError(
                f"Invalid lr_scaling: {lr_scaling!r} (choose from {list(_LR_SCALINGS)})"
            )
        self.initial = initial
        self.maximum = maximum
        self.granularity = granularity
        self.lr_scaling = lr_scaling
        self.batch_size: int = initial
        self.step: int = 0
        self.samples: int = 0
        self.warnings: int = 0
        self.lr_factor: float = 1.0
        self.history: list[dict[str, Any]] = []
        self._warned = False

    # -- interface --------------------------------------------------------------------------

    def wants_stats(self, step: int | None = None) -> bool:
        """True when the update after step ``step`` (default: the next one) uses statistics."""
        return False

    def update(self, stats: GradientStats | None = None) -> int:
        """Record one optimizer step of ``self.batch_size`` samples; return the next size.

        Call it once after every optimizer step. ``stats`` is required when
        :meth:`wants_stats` was True before the step (a :class:`ValueError` otherwise, with
        nothing changed) and ignored on the other steps, so a loop may pass whatever it has.
        """
        if stats is not None and not isinstance(stats, GradientStats):
            raise TypeError(f"Invalid stats: {type(stats).__name__} (must be GradientStats "
                            "or None)")
        test_step = self.wants_stats()
        if test_step and stats is None:
            raise ValueError(
                "update() needs GradientStats on a test step (wants_stats() was True); "
                "measure them with an estimator created with needs=controller.needs"
            )
        old = self.batch_size
        new, row = self._decide(stats if test_step else None)
        new = min(self.maximum, max(old, int(new)))
        self.step += 1
        self.samples += old
        if row is not None or new != old:
            entry = {"step": self.step - 1, "samples": self.samples, "batch_size": old,
                     "required": None, "passed": None, "statistic": None}
            entry.update(row or {})
            entry["new_batch_size"] = new
            self.history.append(entry)
        if new != old:
            self._scale_lr(old, new)
            self.batch_size = new
        return self.batch_size

    def _decide(self, stats: GradientStats | None) -> tuple[int, dict[str, Any] | None]:
        raise NotImplementedError

    # -- learning-rate coupling -------------------------------------------------------------

    def _scale_lr(self, old: int, new: int) -> None:
        if self.lr_scaling is None:
            return
        ratio = new / old
        self.lr_factor *= ratio if self.lr_scaling == "linear" else math.sqrt(ratio)

    # -- state ------------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        return {
            "type": type(self).__name__,
            "initial": self.initial,
            "maximum": self.maximum,
            "granularity": self.granularity,
            "lr_scaling": self.lr_scaling,
        }

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume with identical decisions (history rows are copied)."""
        state = {
            "config": self.config(),
            "batch_size": self.batch_size,
            "step": self.step,
            "samples": self.samples,
            "warnings": self.warnings,
            "warned": self._warned,
            "lr_factor": self.lr_factor,
            "history": [dict(row) for row in self.history],
        }
        state.update(self._extra_state())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; on invalid input raise and leave ``self`` unchanged.

        Only what would break the invariants is checked (the policy type, a batch size in
        [initial, maximum] that is a multiple of granularity, counters >= 0): resuming with
        other hyperparameters (a new η, a larger maximum) is allowed and takes effect from
        the next decision. Keys that older versions saved beside these are ignored.
        """
        check_mapping("state_dict", state)
        required = ("batch_size", "step", "samples", "warnings", "lr_factor", "history")
        missing = [k for k in required if k not in state]
        if missing:
            raise ValueError(f"{type(self).__name__} state_dict is missing keys {missing}")
        saved_type = state.get("config", {}).get("type", type(self).__name__)
        if saved_type != type(self).__name__:
            raise ValueError(
                f"state_dict was saved by a {saved_type}, not a {type(self).__name__}"
            )
        batch_size = state["batch_size"]
        if (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                or not self.initial <= batch_size <= self.maximum
                or batch_size % self.granularity != 0):
            raise ValueError(
                f"state_dict batch_size {batch_size!r} is not a multiple of granularity "
                f"({self.granularity}) in [initial, maximum] = [{self.initial}, {self.maximum}]"
            )
        for key in ("step", "samples", "warnings"):
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"state_dict {key} must be an int >= 0, got {value!r}")
        lr_factor = state["lr_factor"]
        if not isinstance(lr_factor, (int, float)) or not (
            math.isfinite(lr_factor) and lr_factor > 0
        ):
            raise ValueError(f"state_dict lr_factor must be finite and > 0, got {lr_factor!r}")
        self._check_extra_state(state)
        self.batch_size = batch_size
        self.step = state["step"]
        self.samples = state["samples"]
        self.warnings = state["warnings"]
        self._warned = bool(state.get("warned", self.warnings > 0))
        self.lr_factor = float(lr_factor)
        self.history = [dict(row) for row in state["history"]]
        self._load_extra_state(state)

    def _check_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(batch_size={self.batch_size}, step={self.step}, "
                f"samples={self.samples})")


class BatchSizeController(_BatchPolicy):
    """Adaptive batch size driven by a statistical test (see the module docstring).

    Args:
        test: a :class:`~adabatch.batching.batch_tests.BatchTest` (``NormTest(eta)``, ...).
        initial: the first global batch size (a multiple of ``granularity``).
        maximum: the largest batch size (a multiple of ``granularity``).
        interval: run the test every ``interval`` steps (steps 0, interval, 2·interval, ...).
        granularity: batch sizes are multiples of it (micro-batch size × world size).
        lr_scaling: ``None`` (default, the paper), ``"linear"`` or ``"sqrt"``: multiply
            ``lr_factor`` by the growth factor (or its square root); apply it with
            :func:`apply_lr`.

    History rows (one per test step): ``step`` (0-based index of the step that was
    measured), ``samples`` (samples seen including that step), ``batch_size`` (that step's
    batch size), ``required`` (the test's answer), ``passed`` (``required <= b`` of the
    measured batch; ``None`` when undecidable), ``statistic`` (the test's ratio / b, ≤ 1
    passes), ``new_batch_size`` (the size of the next step).
    """

    def __init__(
        self,
        test: BatchTest,
        initial: int,
        maximum: int,
        *,
        interval: int = 1,
        granularity: int = 1,
        lr_scaling: str | None = None,
    ) -> None:
        if not (callable(test) and isinstance(getattr(test, "needs", None), frozenset)):
            raise TypeError(
                f"test must be a BatchTest (callable with a frozenset `needs`), got {test!r}"
            )
        self.interval = check_int("interval", interval)
        super().__init__(initial, maximum, granularity=granularity, lr_scaling=lr_scaling)
        self.test = test

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return self.test.needs

    def wants_stats(self, step: int | None = None) -> bool:
        """True when the update after step ``step`` (default: the next) runs the test."""
        step = self.step if step is None else step
        return self.batch_size < self.maximum and step % self.interval == 0

    def _decide(self, stats: GradientStats | None) -> tuple[int, dict[str, Any] | None]:
        if stats is None:
            return self.batch_size, None
        required = self.test(stats)
        statistic_fn = getattr(self.test, "statistic", None)
        statistic = statistic_fn(stats) if statistic_fn is not None else None
        if required is None:
            self.warnings += 1
            if not self._warned:
                self._warned = True
                _warnings.warn(
                    f"{self.test!r} could not decide at step {self.step} (zero mean gradient "
                    f"or non-finite statistics); the batch size stays {self.batch_size}. "
                    f"Further cases are only counted in controller.warnings.",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return self.batch_size, {"required": None, "passed": None, "statistic": None}
        passed = required <= stats.batch_size
        new = _round_up(required, self.granularity)
        new = self.maximum if math.isinf(new) else min(self.maximum, int(new))
        return new, {"required": required, "passed": passed, "statistic": statistic}

    def config(self) -> dict[str, Any]:
        config = super().config()
        test_config = getattr(self.test, "config", None)
        config["test"] = test_config() if test_config is not None else repr(self.test)
        config["interval"] = self.interval
        return config


def apply_lr(optimizer: torch.optim.Optimizer, base_lrs: Sequence[float],
             schedule: float = 1.0, lr_factor: float = 1.0) -> None:
    """Set every param group's learning rate to ``base_lr × schedule × lr_factor``.

    The one place a loop writes the learning rate: ``base_lrs`` are the groups' rates as
    created (``[g["lr"] for g in optimizer.param_groups]`` before the first step),
    ``schedule`` the loop's warmup/decay multiplier of the step and ``lr_factor`` the batch
    policy's (``controller.lr_factor``). A tensor ``lr`` is filled in place.
    """
    groups = optimizer.param_groups
    if len(base_lrs) != len(groups):
        raise ValueError(f"apply_lr: {len(base_lrs)} base learning rates for "
                         f"{len(groups)} param groups")
    for group, base in zip(groups, base_lrs):
        lr = base * schedule * lr_factor
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


class ConstantSchedule(_BatchPolicy):
    """A constant batch size (the baseline): ``update`` always returns ``batch_size``."""

    def __init__(self, batch_size: int) -> None:
        super().__init__(batch_size, batch_size)

    def _decide(self, stats: GradientStats | None) -> tuple[int, dict[str, Any] | None]:
        return self.batch_size, None


class LinearSchedule(_BatchPolicy):
    """Linear ramp-up: ``+increment`` every ``interval`` steps, up to ``maximum``.

    The AdAdaGrad authors' ``--linear_ramp_up`` baseline (their ``main.py`` adds
    ``--linear_ramp_up_increment`` to the global batch size after every step, capped at
    ``--max_batch_size``); ``interval=1`` is their schedule. After step k (0-based) the
    batch size is ``min(maximum, round_up(initial + increment·⌊(k+1)/interval⌋))``, rounded
    up to a multiple of ``granularity``, so the maximum is reached after
    ``interval·⌈(maximum − initial)/increment⌉`` steps.
    """

    def __init__(
        self,
        initial: int,
        maximum: int,
        increment: int,
        *,
        interval: int = 1,
        granularity: int = 1,
        lr_scaling: str | None = None,
    ) -> None:
        self.increment = check_int("increment", increment)
        self.interval = check_int("interval", interval)
        super().__init__(initial, maximum, granularity=granularity, lr_scaling=lr_scaling)

    def _decide(self, stats: GradientStats | None) -> tuple[int, dict[str, Any] | None]:
        grown = self.initial + self.increment * ((self.step + 1) // self.interval)
        return int(_round_up(min(grown, self.maximum), self.granularity)), None

    def config(self) -> dict[str, Any]:
        config = super().config()
        config.update(increment=self.increment, interval=self.interval)
        return config


class StagewiseSchedule(_BatchPolicy):
    """Stagewise ramp-up: batch size ``batch_sizes[s]`` during stage s.

    The AdAdaGrad authors' ``--stagewise_ramp_up`` baseline: stage s lasts
    ``stage_samples[s]`` samples (their ``--samples_stages``); after each step the samples
    seen are compared with the cumulative budget ``stage_samples[0] + ... + stage_samples[s]``
    and, once reached, the schedule moves to stage s + 1 (one stage per step at most; the
    last stage lasts forever). ``stage_samples`` is a list with one budget per stage (the
    last one is not used, it may be omitted) or a single int for equal stages.

    Args:
        batch_sizes: non-decreasing batch sizes, multiples of ``granularity``.
        stage_samples: samples per stage (a list, or one int for every stage).
    """

    def __init__(
        self,
        batch_sizes: Sequence[int],
        stage_samples: int | Sequence[int],
        *,
        granularity: int = 1,
        lr_scaling: str | None = None,
    ) -> None:
        sizes = list(batch_sizes)
        if not sizes:
            raise ValueError("batch_sizes must not be empty")
        for size in sizes:
            check_int("batch size", size)
        if any(b > a for a, b in zip(sizes[1:], sizes[:-1])):
            raise ValueError(f"batch_sizes must be non-decreasing, got {sizes}")
        if isinstance(stage_samples, int) and not isinstance(stage_samples, bool):
            budgets = [stage_samples] * max(1, len(sizes) - 1)
        else:
            budgets = list(stage_samples)
        if len(budgets) not in (len(sizes) - 1, len(sizes)):
            raise ValueError(
                f"stage_samples needs one budget per stage ({len(sizes) - 1} or "
                f"{len(sizes)} values), got {len(budgets)}"
            )
        for budget in budgets:
            check_int("stage samples", budget)
        super().__init__(sizes[0], sizes[-1], granularity=granularity, lr_scaling=lr_scaling)
        for size in sizes:
            _check_multiple("batch size", size, granularity)
        self.batch_sizes = sizes
        self.stage_samples = budgets
        self.stage = 0

    @classmethod
    def geometric(
        cls,
        initial: int,
        maximum: int,
        stage_samples: int | Sequence[int],
        *,
        factor: float = 2.0,
        granularity: int = 1,
        lr_scaling: str | None = None,
    ) -> StagewiseSchedule:
        """Stages ``initial·factor^s`` (rounded up to ``granularity``) until ``maximum``."""
        if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 1):
            raise ValueError(f"Invalid factor: {factor!r} (must be finite and > 1)")
        initial = check_int("initial", initial)
        maximum = check_int("maximum", maximum)
        if maximum < initial:
            raise ValueError(f"maximum ({maximum}) must be >= initial ({initial})")
        sizes = [initial]
        while sizes[-1] < maximum:
            nxt = int(_round_up(math.ceil(sizes[-1] * factor), granularity))
            sizes.append(min(max(nxt, sizes[-1] + granularity), maximum))
        return cls(sizes, stage_samples, granularity=granularity, lr_scaling=lr_scaling)

    def _decide(self, stats: GradientStats | None) -> tuple[int, dict[str, Any] | None]:
        samples = self.samples + self.batch_size  # including the step being recorded
        if (self.stage < len(self.batch_sizes) - 1
                and samples >= sum(self.stage_samples[: self.stage + 1])):
            self.stage += 1
        return self.batch_sizes[self.stage], None

    def config(self) -> dict[str, Any]:
        config = super().config()
        config.update(batch_sizes=list(self.batch_sizes), stage_samples=list(self.stage_samples))
        return config

    def _extra_state(self) -> dict[str, Any]:
        return {"stage": self.stage}

    def _check_extra_state(self, state: dict[str, Any]) -> None:
        stage = state.get("stage")
        if isinstance(stage, bool) or not isinstance(stage, int) or not (
            0 <= stage < len(self.batch_sizes)
        ):
            raise ValueError(
                f"state_dict stage must be an int in [0, {len(self.batch_sizes)}), got {stage!r}"
            )

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        self.stage = state["stage"]
