"""keep_freed_memory: glibc's malloc keeps freed memory, and a CPU step stops page-faulting."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from adabatch.allocator import keep_freed_memory

GLIBC = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION") is not None

# The estimator on the AdAdaGrad authors' MNIST CNN at batch 32: minor page faults per step.
STEP = textwrap.dedent(
    """
    import resource, sys, torch, torch.nn.functional as F
    from torch import nn
    from adabatch import keep_freed_memory
    from adabatch.batching import PerSampleStats
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 5, 1, 2), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 5, 1, 2),
        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 7 * 7, 10))
    est = PerSampleStats(model, needs={"grad_sq_norm", "variance_trace"})
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    def step():
        model.zero_grad()
        with est.measure():
            F.cross_entropy(model(x), y).backward()
        est.stats()
    for _ in range(5):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
    """
)


def _faults_per_step(mode: str) -> float:
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for var in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"):
        env.pop(var, None)
    out = subprocess.run(
        [sys.executable, "-c", STEP, mode], env=env, capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")
def test_a_measured_step_stops_faulting():
    default, kept = _faults_per_step("default"), _faults_per_step("keep")
    assert default > 200  # the estimator's large temporaries come from fresh pages each step
    assert kept < 0.1 * default


def test_arguments_are_checked():
    with pytest.raises(ValueError, match=r"mmap_threshold must be at most 33554432"):
        keep_freed_memory(mmap_threshold=64 << 20)
    with pytest.raises(ValueError, match=r"trim_threshold must be an int in \[0, 2\*\*31 - 1\]"):
        keep_freed_memory(trim_threshold=-1)
    with pytest.raises(ValueError, match=r"top_pad must be an int"):
        keep_freed_memory(top_pad=1.5)  # type: ignore[arg-type]


def test_returns_whether_it_applied(monkeypatch):
    assert keep_freed_memory() is GLIBC
    monkeypatch.setattr(sys, "platform", "darwin")
    assert keep_freed_memory() is False


def test_adabatch_train_keeps_freed_memory_on_cpu(tmp_path, monkeypatch):
    import adabatch.allocator
    from adabatch.train.config import build_config
    from adabatch.train.loop import train

    calls = []
    monkeypatch.setattr(adabatch.allocator, "keep_freed_memory", lambda: calls.append(1))
    cfg = build_config({"steps": 1, "quiet": True, "plots": False, "device": "cpu",
                        "out": str(tmp_path / "run")})  # fmt: skip
    train(cfg)
    assert calls == [1]
