"""Data-parallel training on CPU (gloo) with 2 processes under torchrun.

The global batch sequence depends only on the seed, so a 2-process run and a 1-process run
with the same flags take the same batch-size decisions and end with the same model (float
tolerance); the ranks agree on every decision, also when one rank sends NaN statistics; a
rank killed mid-run makes torchrun restart the group, which resumes from the newest checkpoint;
a run written by 2 processes continues in 1.

Each torchrun launch costs a few seconds of process start-up, so the runs are shared by
module-scoped fixtures and kept tiny (digits MLP, 1 thread per process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adabatch.cli import main
from tests._fault_runner import Faults, run_train

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:.*could not decide:RuntimeWarning")]

ROOT = Path(__file__).resolve().parents[2]
SRC = str(ROOT / "src")
RUNNER = str(ROOT / "tests" / "_fault_runner.py")  # adabatch train + faults via callbacks
# batch sizes are multiples of 16 in both runs (--batch-granularity), micro-batches of 8:
# 1 process accumulates B/8 micro-batches, 2 processes B/16 each (the same micro-batches)
FLAGS = ["--epochs", "4", "--micro-batch", "8", "--batch-granularity", "16",
         "--initial-batch", "16", "--max-batch", "256", "--eta", "0.5", "--threads", "1",
         "--no-plots", "--checkpoint-every", "4", "--eval-every", "7"]
NAN_STEP = "3"  # the last rank sends NaN statistics at this step
KILL_STEP = "10"  # rank 1 kills itself (SIGKILL) during this step, first attempt only


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _torchrun(faults: list[str], args: list[str], env: dict[str, str], *,
              max_restarts: int = 0) -> subprocess.CompletedProcess:
    """2 processes of ``adabatch train ARGS`` with ``faults`` (tests/_fault_runner.py)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", "2", "--max-restarts", str(max_restarts),
           RUNNER, *faults, "--", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _steps(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if not r.get("eval")]


def _evals(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r.get("eval")]


def _max_diff(a: Path, b: Path) -> float:
    sa = torch.load(a / "final.pt", weights_only=True)
    sb = torch.load(b / "final.pt", weights_only=True)
    assert sa.keys() == sb.keys()
    return max(float((sa[k] - sb[k]).abs().max()) for k in sa)


def _decisions(history: list[dict]) -> list[tuple]:
    return [(h["step"], h["batch_size"], h["required"], h["passed"], h["new_batch_size"])
            for h in history]


def _one_process(out: Path, *extra: str, nan: bool = False) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        for k in ("WORLD_SIZE", "RANK"):
            mp.delenv(k, raising=False)
        faults = Faults(nan_at=int(NAN_STEP) if nan else None)
        assert run_train([*FLAGS, *extra, "--quiet", "--out", str(out)], faults) == 0
    return out


@pytest.fixture(scope="module")
def faulty_pair(tmp_path_factory) -> dict[str, Path]:
    """Per-sample estimator, 4 epochs: 2 processes under torchrun --max-restarts 1 with rank 1
    killed at step 10 and NaN statistics from rank 1 at step 3; and 1 process with the NaN."""
    tmp = tmp_path_factory.mktemp("ps")
    two, decisions = tmp / "two", tmp / "decisions"
    proc = _torchrun(["--kill-rank", "1", "--kill-at", KILL_STEP, "--nan-at", NAN_STEP,
                      "--decisions", str(decisions)], [*FLAGS, "--out", str(two)], _env(),
                     max_restarts=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = _one_process(tmp / "one", nan=True)
    return {"two": two, "one": one, "decisions": decisions, "log": proc.stdout + proc.stderr,
            "tmp": tmp}


def test_killed_rank_restarts_group_and_resumes_from_checkpoint(faulty_pair):
    two, log = faulty_pair["two"], faulty_pair["log"]
    # the second attempt resumed from the newest checkpoint before step 10 (every 4 steps)
    assert "restarted by torchrun (restart 1); resuming" in log
    assert "from step_00000008.pt (step 8," in log
    steps = [r["step"] for r in _steps(two)]
    assert steps == list(range(1, len(steps) + 1))  # no step lost or logged twice
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == len(steps)
    assert summary["epochs"] >= 4


def test_two_processes_match_one_process_per_sample(faulty_pair):
    one, two = faulty_pair["one"], faulty_pair["two"]
    a, b = _steps(one), _steps(two)
    assert [r["batch_size"] for r in a] == [r["batch_size"] for r in b]
    assert len({r["batch_size"] for r in a}) > 3  # the batch size really grows
    for ra, rb in zip(a, b):
        assert ra["passed"] == rb["passed"] and ra["required"] == rb["required"]
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5)
    assert _max_diff(one, two) <= 1e-4
    # the sharded, reduced evaluation sees the whole test set
    ea, eb = _evals(one), _evals(two)
    assert [e["step"] for e in ea] == [e["step"] for e in eb] and len(ea) >= 2
    for x, y in zip(ea, eb):
        assert y["test_loss"] == pytest.approx(x["test_loss"], abs=1e-5)
        assert y["test_accuracy"] == pytest.approx(x["test_accuracy"], abs=1e-9)


def test_ranks_agree_on_every_decision_even_with_nan_statistics(faulty_pair):
    d = faulty_pair["decisions"]
    r0 = json.loads((d / "rank0.json").read_text())
    r1 = json.loads((d / "rank1.json").read_text())
    assert (r0["rank"], r1["rank"]) == (0, 1)
    assert _decisions(r0["history"]) == _decisions(r1["history"])
    assert r0["final_batch_size"] == r1["final_batch_size"]
    # rank 1's NaN reached every rank through the sum: nobody decided at that step
    assert r0["warnings"] == r1["warnings"] == 1
    undecided = [h for h in r0["history"] if h["required"] is None]
    assert [h["step"] for h in undecided] == [int(NAN_STEP) - 1]
    one = json.loads((faulty_pair["one"] / "summary.json").read_text())
    assert one["stat_warnings"] == 1


def test_run_of_two_processes_continues_in_one(faulty_pair, tmp_path):
    """Resume with another world size: the 2-process run, continued by 1 process to 5
    epochs, equals a 1-process run of 5 epochs."""
    import shutil

    run = tmp_path / "cont"
    shutil.copytree(faulty_pair["two"], run)
    assert main(["train", "--resume", str(run), "--epochs", "5", "--quiet",
                 "--threads", "1"]) == 0
    ref = _one_process(tmp_path / "ref", "--epochs", "5", nan=True)
    assert [r["batch_size"] for r in _steps(run)] == [r["batch_size"] for r in _steps(ref)]
    assert json.loads((run / "summary.json").read_text())["world_size"] == 1
    assert _max_diff(run, ref) <= 1e-4


def test_two_processes_match_one_process_micro_batch(tmp_path, monkeypatch):
    """The micro-batch estimator: each (rank, accumulation step) gradient is one micro-batch,
    the same micro-batches as 1 process accumulating micro-batches of 8. Launched with
    torchrun as ``adabatch train --nproc 2`` launches it (the decisions recorded through the
    callbacks of tests/_fault_runner.py); ``--nproc 2`` itself is checked to give the same
    run."""
    decisions = tmp_path / "decisions"
    flags = [*FLAGS, "--estimator", "micro-batch", "--eta", "0.4"]
    one = tmp_path / "one"
    assert main(["train", *flags, "--quiet", "--out", str(one)]) == 0
    two = tmp_path / "two"
    proc = _torchrun(["--decisions", str(decisions)], [*flags, "--quiet", "--out", str(two)],
                     _env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    launched = tmp_path / "launched"  # one epoch: the first steps of the same run
    assert main(["train", "--nproc", "2", *flags, "--epochs", "1", "--quiet", "--out",
                 str(launched)]) == 0
    short = _steps(launched)
    assert len(short) > 3
    assert short == [{**r, "time": a["time"]} for r, a in zip(_steps(two), short)]
    a, b = _steps(one), _steps(two)
    assert [r["batch_size"] for r in a] == [r["batch_size"] for r in b]
    assert len({r["batch_size"] for r in a}) > 3
    assert [r["required"] for r in a] == [r["required"] for r in b]
    assert _max_diff(one, two) <= 1e-4
    r0 = json.loads((decisions / "rank0.json").read_text())
    r1 = json.loads((decisions / "rank1.json").read_text())
    assert r0["world_size"] == 2
    assert _decisions(r0["history"]) == _decisions(r1["history"])
    s1 = json.loads((one / "summary.json").read_text())
    s2 = json.loads((two / "summary.json").read_text())
    assert s2["world_size"] == 2 and s1["final_batch_size"] == s2["final_batch_size"]
    assert s2["test_accuracy"] == pytest.approx(s1["test_accuracy"], abs=1e-9)
