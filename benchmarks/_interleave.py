"""The timing loop that the benchmarks share: every configuration once per round, in an
order shuffled anew each round, so that a machine whose speed drifts over minutes slows all
configurations of a round alike and ratios taken within a round stay comparable."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Hashable


def interleaved(steps: dict[Hashable, Callable[[], object]], rounds: int, reps: int, *,
                warm: int = 1, seed: int = 0,
                sync: Callable[[], None] = lambda: None) -> dict[Hashable, list[float]]:
    """Per configuration, one time per round: the mean over ``reps`` timed calls of its step,
    after ``warm`` untimed calls (the configuration that ran before left other tensors in
    the caches). ``sync`` waits for queued device work at both ends of a timed stretch."""
    configs = list(steps)
    times: dict[Hashable, list[float]] = {c: [] for c in configs}
    rng = random.Random(seed)
    for _ in range(rounds):
        order = configs[:]
        rng.shuffle(order)
        for c in order:
            for _ in range(warm):
                steps[c]()
            sync()
            t0 = time.perf_counter()
            for _ in range(reps):
                steps[c]()
            sync()
            times[c].append((time.perf_counter() - t0) / reps)
    return times
