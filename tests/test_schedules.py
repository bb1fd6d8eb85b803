"""The public learning-rate schedules: the trainer's old lr_multiplier, bit for bit."""

from __future__ import annotations

import itertools
import math

import pytest

from adabatch.batching import LinearWarmup, WarmupCosine, apply_lr
from adabatch.train.config import TrainConfig
from adabatch.train.steps import lr_multiplier


def old_lr_multiplier(cfg: TrainConfig, samples: int, step: int, budget_kind: str,
                      budget: int) -> float:
    """The trainer's lr_multiplier before the public schedules (verbatim)."""
    factor = 1.0
    if cfg.warmup_samples > 0:
        factor = min(1.0, (samples + 1) / cfg.warmup_samples)
    if cfg.lr_schedule == "cosine":
        if budget_kind == "steps":
            progress = step / max(1, budget)
        else:
            span = max(1, budget - cfg.warmup_samples)
            progress = max(0, samples - cfg.warmup_samples) / span
        progress = min(1.0, progress)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        factor *= cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine
    return factor


GRID = list(itertools.product(
    ("constant", "cosine"), (0, 1, 7, 100, 5000), (0.0, 0.1, 1 / 3, 1.0),
    ("samples", "steps"), (1, 13, 1000, 4096)))


@pytest.mark.parametrize("schedule, warmup, ratio, kind, budget", GRID)
def test_equals_the_old_trainer_function_bitwise(schedule, warmup, ratio, kind, budget):
    cfg = TrainConfig(lr_schedule=schedule, warmup_samples=warmup, min_lr_ratio=ratio)
    if schedule == "cosine":
        total = {"total_steps" if kind == "steps" else "total_samples": budget}
        public = WarmupCosine(warmup, min_ratio=ratio, **total)
    else:
        public = LinearWarmup(warmup)
    for samples, step in itertools.product((0, 1, 6, 7, 99, 100, 101, 999, 1000, 4095,
                                            4096, 5000, 10**6), (0, 1, 12, 13, 500, 10**5)):
        want = old_lr_multiplier(cfg, samples, step, kind, budget)
        assert public(samples, step) == want, (samples, step)  # == : bit for bit
        assert lr_multiplier(cfg, samples, step, kind, budget) == want


def test_warmup_rises_then_cosine_falls_to_min_ratio():
    s = WarmupCosine(warmup_samples=100, total_samples=1100, min_ratio=0.1)
    values = [s(n, 0) for n in range(0, 1300, 7)]
    peak = values.index(max(values))
    assert all(a < b for a, b in itertools.pairwise(values[:peak + 1]))  # warmup: rising
    assert all(a >= b for a, b in itertools.pairwise(values[peak:]))  # decay: falling
    assert s(0, 0) == pytest.approx(0.01) and s(99, 0) == 1.0
    assert s(600, 0) == pytest.approx(0.55) and s(1100, 0) == pytest.approx(0.1)
    assert s(10**9, 0) == pytest.approx(0.1)  # stays at min_ratio past the total
    # counted in samples, not steps: the step number changes nothing
    assert s(600, 0) == s(600, 5) == s(600, 10**6)
    steps = WarmupCosine(total_steps=10, min_ratio=0.0)
    assert [steps(12345, k) for k in (0, 5, 10, 20)] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert steps(0, 5) == steps(10**6, 5)  # a step budget: the samples change nothing
    warm = LinearWarmup(4)
    assert [warm(n, 99) for n in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert LinearWarmup()(0, 0) == 1.0


def test_pure_and_comparable():
    a = WarmupCosine(10, total_samples=100, min_ratio=0.2)
    assert a == WarmupCosine(10, total_samples=100, min_ratio=0.2)
    assert a(50, 3) == a(50, 3)
    assert not hasattr(a, "state_dict")
    with pytest.raises(AttributeError):
        a.min_ratio = 0.5  # type: ignore[misc]
    assert "total_samples=100" in repr(a)


def test_sets_the_learning_rate_with_apply_lr():
    import torch
    w = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([w], lr=0.5)
    base_lrs = [g["lr"] for g in opt.param_groups]
    schedule = WarmupCosine(warmup_samples=8, total_samples=64)
    apply_lr(opt, base_lrs, schedule(3, 1), 2.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * 0.5 * 2.0)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({}, ValueError, "exactly one of total_samples and total_steps"),
    ({"total_samples": 10, "total_steps": 10}, ValueError, "exactly one"),
    ({"total_samples": 0}, ValueError, r"Invalid total_samples: 0 \(must be >= 1\)"),
    ({"total_steps": -1}, ValueError, "Invalid total_steps"),
    ({"total_steps": 2.0}, TypeError, "Invalid total_steps"),
    ({"total_samples": 10, "warmup_samples": -1}, ValueError, "Invalid warmup_samples"),
    ({"total_samples": 10, "warmup_samples": 1.5}, TypeError, "Invalid warmup_samples"),
    ({"total_samples": 10, "min_ratio": 1.5}, ValueError, r"Invalid min_ratio.*<= 1"),
    ({"total_samples": 10, "min_ratio": -0.1}, ValueError, r"Invalid min_ratio.*>= 0"),
    ({"total_samples": 10, "min_ratio": math.nan}, ValueError, "Invalid min_ratio"),
    ({"total_samples": 10, "min_ratio": "0.1"}, TypeError, "Invalid min_ratio"),
])
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        WarmupCosine(**kwargs)


def test_bad_calls_and_warmup_arguments():
    s = WarmupCosine(total_samples=10)
    with pytest.raises(ValueError, match="Invalid samples"):
        s(-1, 0)
    with pytest.raises(ValueError, match="Invalid step"):
        s(0, -1)
    with pytest.raises(TypeError, match="Invalid samples"):
        s(1.0, 0)
    with pytest.raises(TypeError, match="Invalid step"):
        LinearWarmup(3)(0, True)
    with pytest.raises(ValueError, match="Invalid warmup_samples"):
        LinearWarmup(-3)


def test_readme_schedule_snippet_runs():
    import re
    from pathlib import Path

    import torch

    from adabatch.batching import BatchSizeController, NormTest

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S)
              if "WarmupCosine(" in b]
    assert len(blocks) == 1
    model = torch.nn.Linear(3, 2)
    ns = {"X": torch.zeros(4096, 3), "optimizer": torch.optim.SGD(model.parameters(), lr=0.4),
          "controller": BatchSizeController(NormTest(0.5), initial=16, maximum=64,
                                            lr_scaling="linear")}
    exec(compile(blocks[0], "README.md", "exec"), ns)
    # before the first step: warmup (0 + 1) / 2048 of the base rate, factor 1
    assert ns["optimizer"].param_groups[0]["lr"] == pytest.approx(0.4 / 2048)
