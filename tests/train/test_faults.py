"""Fault injection (issue #16): kill the trainer at random moments and in the middle of every
kind of write, fill the disk, and check after each resume that nothing was lost or
duplicated in ``metrics.jsonl`` and that ``final.pt`` is bitwise the uninterrupted run's.

Marked ``faults`` (``pytest -m faults`` runs only these; the default test command runs them
too). Every run is a real subprocess killed with SIGKILL, so no cleanup code of the trainer
gets a chance to run.
"""

from __future__ import annotations

import json
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from adabatch.cli import main
from adabatch.train.rundir import LOCK_NAME
from tests.train._runs import metric_rows as _rows
from tests.train._runs import subprocess_env as _env

pytestmark = pytest.mark.faults

RUNNER = str(Path(__file__).resolve().parents[1] / "_fault_runner.py")
# a run whose batch grows, with an evaluation every 4 steps and a checkpoint every step
FLAGS = ["--steps", "10", "--eta", "0.6", "--initial-batch", "8", "--max-batch", "64",
         "--micro-batch", "8", "--eval-every", "4", "--checkpoint-every", "1",
         "--keep-checkpoints", "2", "--threads", "1", "--quiet", "--no-plots"]




@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    ref = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", *FLAGS, "--out", str(ref)]) == 0
    assert len({r["batch_size"] for r in _rows(ref) if not r.get("eval")}) > 2
    return ref


def _finish(run: Path, reference: Path) -> None:
    """Resume (a new start when the killed one never reached its first step) until done,
    then compare with the uninterrupted run."""
    if (run / "config.json").exists():
        code = main(["train", "--resume", str(run), "--threads", "1"])
    else:
        code = main(["train", *FLAGS, "--out", str(run)])
    assert code == 0
    a = torch.load(run / "final.pt", weights_only=True)
    b = torch.load(reference / "final.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert _rows(run) == _rows(reference)  # nothing lost, nothing twice
    assert json.loads((run / "summary.json").read_text())["steps"] == 10
    leftovers = [p.name for p in run.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers
    assert (run / LOCK_NAME).exists()  # free again: a new owner could take it


@pytest.mark.parametrize("spec", ["checkpoint:1", "checkpoint:6", "metrics:2", "config:1",
                                  "final:1", "summary:1"])
def test_killed_in_the_middle_of_a_write(tmp_path, reference, spec: str) -> None:
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, RUNNER, "--kill-in-write", spec, "--", *FLAGS,
                           "--out", str(run)], env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    _finish(run, reference)


def test_killed_at_random_moments(tmp_path, reference) -> None:
    rng = random.Random(16)  # random moments, the same in every run of the suite
    for trial in range(3):
        run = tmp_path / f"run{trial}"
        for _ in range(2):  # killed twice: once fresh, once while resuming
            cmd = ([sys.executable, "-m", "adabatch", "train", "--resume", str(run)]
                   if (run / "config.json").exists()
                   else [sys.executable, "-m", "adabatch", "train", *FLAGS, "--out", str(run)])
            proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(1.5, 5.0))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        _finish(run, reference)


# 30 kB: the first checkpoint (about 60 kB) fails at step 1; 50 kB with checkpoints only at
# the end: ten steps train, then the final checkpoint fails
@pytest.mark.parametrize("limit, extra", [(30_000, []), (50_000, ["--checkpoint-every", "0"])])
def test_disk_full_then_resume(tmp_path, reference, limit: int, extra: list[str]) -> None:
    run = tmp_path / "run"

    def fill() -> None:  # writes past `limit` bytes per file fail as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, "-m", "adabatch", "train", *FLAGS, *extra,
                           "--out", str(run)], env=_env(), capture_output=True, text=True,
                          timeout=300, preexec_fn=fill)
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr.count("\n") == 1 and "file too large" in proc.stderr
    _finish(run, reference)
