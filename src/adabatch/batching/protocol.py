"""The one interface every estimator offers to a training loop.

A training step is one context, each micro-batch (one forward and backward pass) another
inside it, and the statistics are read after the step's gradients are final::

    with est.step(measure=controller.wants_stats()) as step:
        for x, y in micro_batches:                       # n_k samples each, N in all
            with step.micro_batch(len(x)):
                (loss_fn(model(x), y) * len(x) / N).backward()
    # (under DDP, when est.needs_local_grads: average the gradients by hand here)
    stats = est.stats() if step.measuring else None
    optimizer.step()
    controller.update(stats)

The losses of one step add up to the mean per-sample loss over its N samples
(``loss_k = mean_loss_k * n_k / N``), so that p.grad is the mean gradient ḡ when
:meth:`Estimator.stats` reads it. With ``measure=False`` both contexts do nothing and the
step costs what a plain step costs. The same loop drives :class:`~adabatch.batching.
PerSampleStats` (hooks inside each micro-batch) and :class:`~adabatch.batching.
MicroBatchStats` (one accumulation after each micro-batch); the trainer, the integrations
and users' loops all use it, so none of them branches on the kind of estimator.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol, runtime_checkable

from torch import Tensor, nn

from adabatch.batching.stats import GradientStats


class StepScope:
    """The context of one step: hands out one :meth:`micro_batch` context per pass.

    Built by an estimator's ``step()``; ``enter(n)`` and ``leave(n)`` are the estimator's
    own work before and after a micro-batch's forward and backward pass (``leave`` runs only
    when the pass raised nothing).
    """

    def __init__(self, measuring: bool,
                 enter: Callable[[int], contextlib.AbstractContextManager[object]],
                 leave: Callable[[int], None]) -> None:
        self.measuring = measuring
        self.micro_batches = 0
        self.samples = 0
        self._enter = enter
        self._leave = leave

    @contextlib.contextmanager
    def micro_batch(self, n: int) -> Iterator[None]:
        """Context for the forward and backward pass of one micro-batch of ``n`` samples."""
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"micro_batch(n): n must be an int, got {type(n).__name__}")
        if n < 1:
            raise ValueError(f"micro_batch(n): n must be at least 1, got {n}")
        if not self.measuring:
            yield
            return
        with self._enter(n):
            yield
        self._leave(n)
        self.micro_batches += 1
        self.samples += n


@runtime_checkable
class Estimator(Protocol):
    """What the loop needs from an estimator (both estimators of this package are one).

    Attributes:
        needs: the statistics it computes (names of :data:`~adabatch.batching.stats.
            STAT_NAMES`).
        params: the parameters the statistics are over.
        needs_local_grads: True when :meth:`stats` needs each process's micro-batch gradients
            before the gradients are averaged across processes: a data-parallel loop then
            runs every backward of a measured step without gradient synchronisation and
            averages the gradients by hand before :meth:`stats` (:class:`MicroBatchStats`).
            False when the estimator measures inside the backward pass and the usual
            synchronisation can run (:class:`PerSampleStats`).
    """

    needs: frozenset[str]
    params: list[Tensor]
    needs_local_grads: bool

    def step(self, measure: bool = True) -> contextlib.AbstractContextManager[StepScope]:
        """Context for one training step; ``measure=False`` makes it (and its micro-batch
        contexts) do nothing."""
        ...

    def stats(self) -> GradientStats:
        """The statistics of the measured step (reads the final ḡ from p.grad); resets.

        Statistics that one step cannot estimate come back NaN (a test then cannot decide
        and the controller keeps the batch size), except when no step of the loop could:
        then it raises a :class:`ValueError` naming the fix (:class:`MicroBatchStats` on a
        step of N ≥ 2 samples in one micro-batch: split it into at least 2, or use
        :class:`PerSampleStats`)."""
        ...


def check_params_current(name: str, module: nn.Module, params: list[Tensor]) -> None:
    """Raise RuntimeError unless every tensor of ``params`` is still a parameter of
    ``module``. ``fully_shard`` (or any code that registers new Parameter objects) after an
    estimator was built from ``module`` leaves the old parameters without gradients, so its
    statistics would read ḡ as zero: both estimators check this in ``stats()``, through a
    :class:`ParamWatch` (the same answer at a fraction of the cost of this full walk)."""
    current = set(map(id, module.parameters()))
    if not all(map(current.__contains__, map(id, params))):
        raise RuntimeError(
            f"{name}: the model's parameters are no longer those it was built with (sharded "
            f"by fully_shard, or replaced, after {name}(model)); build the estimator after "
            f"sharding or replacing them")


class ParamWatch:
    """:func:`check_params_current`, cheap when nothing changed.

    It remembers where each parameter sits: the entry ``owner._parameters[key]`` holding it
    and each entry ``parent._modules[key]`` on the way down from ``module`` to that owner.
    When every remembered entry still holds the same object, every parameter is still
    reachable from ``module``, so :func:`check_params_current` would pass: a few dict lookups
    replace the walk over all modules (about 30 us a step on a 3-layer MLP after a backward
    pass). When an entry changed (``fully_shard``, a replaced parameter or layer), the full
    check runs: it raises, or (the parameters only moved) the places are found again."""

    def __init__(self, name: str, module: nn.Module, params: list[Tensor]) -> None:
        self.name = name
        self.module = module
        self.params = params
        self._entries = self._find()

    def _find(self) -> tuple[list[tuple[nn.Module, str, Tensor]],
                             list[tuple[nn.Module, str, nn.Module]]] | None:
        """(parameter entries, module entries) for every parameter, or None if one is not
        reachable through ``_parameters`` / ``_modules`` (then every check is the full one)."""
        wanted = set(map(id, self.params))
        held: list[tuple[nn.Module, str, Tensor]] = []
        path: dict[tuple[int, str], tuple[nn.Module, str, nn.Module]] = {}
        seen: set[int] = set()
        todo: list[tuple[nn.Module, list[tuple[nn.Module, str, nn.Module]]]] = [(self.module, [])]
        while todo:
            mod, chain = todo.pop()
            if id(mod) in seen:
                continue
            seen.add(id(mod))
            hit = False
            for key, p in mod._parameters.items():
                if p is not None and id(p) in wanted:
                    wanted.discard(id(p))
                    held.append((mod, key, p))
                    hit = True
            if hit:
                path.update(((id(parent), key), (parent, key, child))
                            for parent, key, child in chain)
            todo.extend((child, [*chain, (mod, key, child)])
                        for key, child in mod._modules.items() if child is not None)
        return None if wanted else (held, list(path.values()))

    def check(self) -> None:
        """Raise RuntimeError unless every parameter is still one of the module's."""
        entries = self._entries
        if entries is not None and all(
                owner._parameters.get(key) is p for owner, key, p in entries[0]) and all(
                parent._modules.get(key) is child for parent, key, child in entries[1]):
            return
        check_params_current(self.name, self.module, self.params)
        self._entries = self._find()
