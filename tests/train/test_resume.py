"""Resume exactness: a run killed (SIGKILL) or stopped (SIGTERM) and resumed ends with a model
bitwise equal to an uninterrupted run's; incompatible checkpoints are refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adabatch.cli import main
from adabatch.train.checkpoint import latest_checkpoint, list_checkpoints, write_atomic
from tests.train._runs import metric_rows as _rows

# a run whose batch grows across the interruption (controller state matters) with micro-batch
# accumulation (sampler position in micro-batches) and a cosine schedule in samples
FLAGS = ["--eta", "0.6", "--initial-batch", "8", "--max-batch", "64", "--micro-batch", "8",
         "--lr-schedule", "cosine", "--warmup-samples", "40", "--steps", "9",
         "--checkpoint-every", "2", "--keep-checkpoints", "2", "--threads", "1", "--quiet",
         "--no-plots"]



def _assert_same_run(run: Path, ref: Path) -> None:
    a = torch.load(run / "final.pt", weights_only=True)
    b = torch.load(ref / "final.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise
    assert _rows(run) == _rows(ref)
    sa = json.loads((run / "summary.json").read_text())
    sb = json.loads((ref / "summary.json").read_text())
    for key in ("steps", "samples", "final_batch_size", "test_loss", "test_accuracy"):
        assert sa[key] == sb[key]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    ref = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", *FLAGS, "--out", str(ref)]) == 0
    sizes = {r["batch_size"] for r in _rows(ref) if not r.get("eval")}
    assert len(sizes) > 2  # the batch size really changes during the run
    return ref


ROOT = Path(__file__).resolve().parents[2]


def _spawn(run: Path, faults: list[str]) -> subprocess.Popen:
    """``adabatch train FLAGS --out RUN`` in a subprocess, with faults injected through the
    trainer's callbacks (tests/_fault_runner.py)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "_fault_runner.py"), *faults,
                             "--", *FLAGS, "--out", str(run)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_step_then_resume_is_bitwise_exact(tmp_path, reference):
    run = tmp_path / "run"
    proc = _spawn(run, ["--kill-at", "6"])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err
    # killed during step 6: the newest checkpoint is step 4, and only the last 2 are kept
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002.pt", "step_00000004.pt"]
    assert not (run / "final.pt").exists()
    assert main(["train", "--resume", str(run), "--quiet", "--threads", "1"]) == 0
    _assert_same_run(run, reference)


def test_sigterm_writes_checkpoint_exits_cleanly_and_resumes(tmp_path, reference):
    run = tmp_path / "run"
    proc = _spawn(run, ["--pause-at", "3"])
    assert proc.stdout.readline().strip() == "paused at step 3"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in err
    assert latest_checkpoint(run).name == "step_00000003.pt"  # written on SIGTERM
    assert main(["train", "--resume", str(run), "--quiet", "--threads", "1"]) == 0
    _assert_same_run(run, reference)


def test_resume_finished_run_with_longer_budget(tmp_path):
    """A finished run continues when its budget is raised (only the budget may change)."""
    base = [f for f in FLAGS if f not in ("--steps", "9")]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(["train", *base, "--steps", "7", "--lr-schedule", "constant",
                 "--out", str(ref)]) == 0
    assert main(["train", *base, "--steps", "4", "--lr-schedule", "constant",
                 "--out", str(run)]) == 0
    assert main(["train", "--resume", str(run), "--steps", "7", "--quiet"]) == 0
    a = torch.load(run / "final.pt", weights_only=True)
    b = torch.load(ref / "final.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in _rows(run) if not r.get("eval")]
    assert steps == list(range(1, 8))  # no duplicated or missing rows


def test_incompatible_resume_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--steps", "2", "--quiet", "--no-plots", "--out", str(run)]) == 0
    final = (run / "final.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--model", "cnn"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"adabatch: error: checkpoint {latest_checkpoint(run)} is incompatible: it "
                   "was written with model='mlp', this run has model='cnn'"]
    # another format version
    path = latest_checkpoint(run)
    state = torch.load(path, weights_only=True)
    state["format_version"] = 99
    write_atomic(state, path)
    assert main(["train", "--resume", str(run), "--steps", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint format version 99; this adabatch reads version 1" in err[0]
    assert (run / "final.pt").read_bytes() == final  # nothing lost
    # not a run directory
    assert main(["train", "--resume", str(tmp_path)]) == 2
    assert "not a run directory (no config.json)" in capsys.readouterr().err


def test_run_written_by_an_older_version_resumes(tmp_path, reference):
    """A run whose config and checkpoints hold the retired key ``log_every`` and whose
    controller state holds an extra key (as older versions wrote them) resumes, bitwise."""
    run = tmp_path / "run"
    proc = _spawn(run, ["--kill-at", "6"])
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    config = json.loads((run / "config.json").read_text())
    assert "log_every" not in config
    (run / "config.json").write_text(json.dumps({**config, "log_every": 0}))
    for path in list_checkpoints(run):
        state = torch.load(path, weights_only=True)
        state["config"]["log_every"] = 0
        state["controller"]["optimizer_lrs"] = [0.1]
        write_atomic(state, path)
    assert main(["train", "--resume", str(run), "--quiet", "--threads", "1"]) == 0
    _assert_same_run(run, reference)
