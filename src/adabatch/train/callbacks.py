"""Events of the training loop, for code that watches or steers a run from outside.

Subclass :class:`Callbacks`, override the events you need and pass an instance to
:func:`adabatch.train.loop.train` (``train(cfg, callbacks=...)``). Each event receives the
:class:`~adabatch.train.build.Run` (its ``step`` and ``samples`` count the steps finished so
far; ``run.dist`` is this process's place in the group, ``run.stop.signum`` the SIGINT/SIGTERM
received, if any). Every process of a data-parallel run calls its own callbacks. One step::

    on_step_start(run)            # before the step's gradients
    ...forward, backward, statistics, loss reduction...
    before_optimizer_step(run)    # the gradients and statistics are final
    optimizer.step(); controller.update(stats); metrics row; evaluation
    on_step_end(run)              # before the stop check and the periodic checkpoint

and ``on_train_end(run)`` once the run has finished (not when it was stopped by a signal),
after the final evaluation and checkpoint. The test suite injects its faults through these
events (killing a process at a step, pausing it, NaN statistics on one rank:
``tests/_fault_runner.py``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Callbacks"]


class Callbacks:
    """No-op events; override the ones you need.

    ``reduce_statistics``: True makes a single-process run route its statistics through the
    per-step reducer (:class:`~adabatch.train.distributed.StepReducer`, a group of one) as a
    data-parallel run does, so an event can reach ``run.reducer`` (the fault-injection tests
    use it to send NaN partial sums). It changes no result of a multi-process run.
    """

    reduce_statistics: bool = False

    def on_step_start(self, run: Any) -> None:
        """Before the gradients of step ``run.step + 1``."""

    def before_optimizer_step(self, run: Any) -> None:
        """After the step's gradients, statistics and loss reduction, before optimizer.step()."""

    def on_step_end(self, run: Any) -> None:
        """After the step was recorded (``run.step`` is its number) and any evaluation."""

    def on_train_end(self, run: Any) -> None:
        """Once the run has finished, after its final evaluation and checkpoint."""
