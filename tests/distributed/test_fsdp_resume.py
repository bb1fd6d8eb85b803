"""``adabatch train --parallel fsdp``: sharded checkpoints in the trainer (gloo, CPU).

The reference is an uninterrupted 1-process FSDP2 run (a 1-rank group), which takes the
decisions of 2 processes (tests/distributed/test_fsdp_train.py). Its step-4 checkpoint is
continued by 2 processes (``--resume --from-step 4``: DCP resharding 1 → 2) under torchrun
``--max-restarts 3`` (tests/distributed/_sharded_fault_runner.py): rank 1 is SIGKILLed in the
middle of the save of step 8 (its shard written, no metadata, no marker), torchrun restarts
the group, which deletes the incomplete directory and resumes from step 4 again (the newest
complete checkpoint; not ``--from-step`` again); then rank 0 is SIGKILLed in the save of step
12 after the marker, before the rename: the next start completes the rename and the group
resumes from step 12; then rank 1 is SIGKILLed in step 13 (before its optimizer step), and
the group resumes from step 12 again. The run ends like the reference (the same decisions;
the model within float tolerance). That run continued in 1 process from its step 8
(resharding 2 → 1) ends like it too. A sharded checkpoint does not resume without
``--parallel fsdp``, nor a single-file one with it: one line, exit code 2. An incomplete
newest checkpoint is set aside. A full disk during a sharded save stops the run with the I/O
exit code and one line, and the run then continues to the reference's model.
"""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adabatch.cli import main
from tests.train._runs import metric_rows, subprocess_env

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:.*could not decide:RuntimeWarning")]

ROOT = Path(__file__).resolve().parents[2]
RUNNER = str(Path(__file__).with_name("_sharded_fault_runner.py"))
# batch sizes are multiples of 16 (--batch-granularity): the same micro-batches of 8 in 1 and
# 2 processes; a checkpoint every 4 steps, all kept
FLAGS = ["--parallel", "fsdp", "--epochs", "1", "--estimator", "micro-batch",
         "--micro-batch", "8", "--batch-granularity", "16", "--initial-batch", "16",
         "--max-batch", "128", "--eta", "0.3", "--optimizer", "adam", "--lr", "3e-3",
         "--threads", "1", "--no-plots", "--checkpoint-every", "4", "--keep-checkpoints",
         "20", "--eval-every", "6", "--dist-timeout", "60"]


def _env() -> dict[str, str]:
    env = subprocess_env()
    env["OMP_NUM_THREADS"] = "1"
    return env


def _steps(run: Path) -> list[dict]:
    return [r for r in metric_rows(run) if not r.get("eval")]


def _in_process(args: list[str], *, quiet: bool = True) -> int:
    with pytest.MonkeyPatch.context() as mp:
        for k in ("WORLD_SIZE", "RANK", "TORCHELASTIC_RESTART_COUNT"):
            mp.delenv(k, raising=False)
        return main([*args, "--quiet"] if quiet else args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("fsdp_resume")
    one, two, two_to_one = tmp / "one", tmp / "two", tmp / "two_to_one"
    # not --quiet: the runs resumed from its checkpoints say from which one
    assert _in_process(["train", *FLAGS, "--out", str(one)], quiet=False) == 0
    shutil.copytree(one, two)  # the fault runner takes every flag (no saved config read)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "--max-restarts", "3", RUNNER, *FLAGS,
                           "--resume", str(two), "--from-step", "4"], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copytree(two, two_to_one)
    assert _in_process(["train", "--resume", str(two_to_one), "--from-step", "8",
                        "--threads", "1"]) == 0
    return {"one": one, "two": two, "two_to_one": two_to_one,
            "log": proc.stdout + proc.stderr}


def _assert_like(reference: Path, run: Path) -> None:
    a, b = _steps(reference), _steps(run)
    assert [r["step"] for r in b] == list(range(1, len(b) + 1))  # none lost, none twice
    assert [r["batch_size"] for r in a] == [r["batch_size"] for r in b]
    assert len({r["batch_size"] for r in a}) > 2  # the batch size really grows
    for ra, rb in zip(a, b, strict=True):
        assert rb["required"] == ra["required"] and rb["passed"] == ra["passed"]
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-5)
    fa = torch.load(reference / "final.pt", weights_only=True)
    fb = torch.load(run / "final.pt", weights_only=True)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert float((fa[k] - fb[k]).abs().max()) <= 1e-4, k


def test_ranks_killed_in_saves_restart_the_group_from_the_newest_complete_checkpoint(
        runs) -> None:
    two, log = runs["two"], runs["log"]
    # the first attempt: 2 processes continue the 1-process run's step 4 (1 -> 2)
    assert f"resuming {two} from step_00000004 (step 4," in log
    # restart 1: step 8's save was incomplete: deleted, and step 4 is the newest complete one
    assert "removed 1 temporary file(s) of an interrupted write" in log
    assert f"restarted by torchrun (restart 1); resuming {two} from step_00000004" in log
    # restart 2: step 12's save was complete but not renamed: renamed, and resumed from it
    assert f"restarted by torchrun (restart 2); resuming {two} from step_00000012" in log
    # restart 3: rank 1 was killed in step 13 (a training step): from step 12 again
    assert f"restarted by torchrun (restart 3); resuming {two} from step_00000012" in log
    _assert_like(runs["one"], two)
    marker = json.loads((two / "checkpoints" / "step_00000012" / "complete.json").read_text())
    assert marker["world_size"] == 2 and marker["step"] == 12
    assert len(list((two / "checkpoints" / "step_00000012").glob("*.distcp"))) == 2
    ckpts = sorted(p.name for p in (two / "checkpoints").iterdir())
    assert "step_00000008.abandoned" in ckpts  # the 1-process run's, set aside once
    assert not [name for name in ckpts if name.endswith((".tmp", ".replaced"))]
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2


def test_two_processes_resume_in_one(runs) -> None:
    run = runs["two_to_one"]
    _assert_like(runs["one"], run)
    assert json.loads((run / "summary.json").read_text())["world_size"] == 1
    last = max(p for p in (run / "checkpoints").iterdir() if p.name.startswith("step_")
               and "." not in p.name)
    assert json.loads((last / "complete.json").read_text())["world_size"] == 1


def test_checkpoint_kinds_do_not_mix(runs, tmp_path, capsys) -> None:
    sharded = tmp_path / "sharded"
    shutil.copytree(runs["one"], sharded)
    assert _in_process(["train", "--resume", str(sharded), "--parallel", "ddp"]) == 2
    err = capsys.readouterr().err.strip()
    assert "parallel='fsdp', this run has parallel='ddp'" in err and "\n" not in err
    # a single-file checkpoint of a version before --parallel (no "parallel" in its config)
    single = tmp_path / "single"
    plain = ["--steps", "2", "--estimator", "micro-batch", "--micro-batch", "8",
             "--initial-batch", "16", "--max-batch", "32", "--optimizer", "adam",
             "--threads", "1", "--no-plots"]
    assert _in_process(["train", *plain, "--out", str(single)]) == 0
    for path in (single / "checkpoints").iterdir():
        state = torch.load(path, weights_only=True)
        del state["config"]["parallel"]
        torch.save(state, path)
    assert _in_process(["train", "--resume", str(single), "--parallel", "fsdp"]) == 2
    err = capsys.readouterr().err.strip()
    assert "was written by a run without --parallel fsdp (one file, not sharded)" in err
    assert "\n" not in err


def test_incomplete_newest_is_set_aside_and_the_previous_one_used(runs, tmp_path,
                                                                   capsys) -> None:
    """The newest checkpoint without its marker is set aside as .damaged and the one before
    it used; a save's leftover .tmp directory is removed; the run ends as it did. Twice
    ``--from-step``: the second sets its later checkpoints aside over the first's."""
    run = tmp_path / "run"
    shutil.copytree(runs["one"], run)
    ckpts = run / "checkpoints"
    newest = max(p for p in ckpts.iterdir() if "." not in p.name)
    (newest / "complete.json").unlink()
    (ckpts / "step_00000099.tmp").mkdir()
    (ckpts / "step_00000099.tmp" / "__0_0.distcp").write_bytes(b"partial")
    assert _in_process(["train", "--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert f"skipped {newest.name} (" in err and "is incomplete (no complete.json" in err
    assert (ckpts / f"{newest.name}.damaged").is_dir()
    assert not (ckpts / "step_00000099.tmp").exists()
    assert (newest / "complete.json").is_file()  # written again by the resumed run
    final, reference = (torch.load(r / "final.pt", weights_only=True)
                        for r in (run, runs["one"]))
    assert all(torch.equal(final[k], reference[k]) for k in reference)
    for _ in range(2):
        assert _in_process(["train", "--resume", str(run), "--from-step", "4"]) == 0
    assert (ckpts / "step_00000008.abandoned" / "complete.json").is_file()
    final = torch.load(run / "final.pt", weights_only=True)
    assert all(torch.equal(final[k], reference[k]) for k in reference)


def test_disk_full_during_a_sharded_save(runs, tmp_path) -> None:
    """A file size limit (as a full disk) under the size of a shard file: the first save
    fails, exit code 4 with one line; resumed without the limit, the run ends bitwise as
    the uninterrupted one-process run."""
    run = tmp_path / "run"

    def fill() -> None:  # writes past 100 kB per file fail as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    proc = subprocess.run([sys.executable, "-m", "adabatch", "train", *FLAGS, "--quiet",
                           "--out", str(run)], env=_env(), capture_output=True, text=True,
                          timeout=120, preexec_fn=fill)
    assert proc.returncode == 4, proc.stderr
    assert proc.stderr.count("\n") == 1 and "a write of the checkpoint failed" in proc.stderr
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000004.tmp"]
    assert _in_process(["train", "--resume", str(run)]) == 0
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")] == []
    final, reference = (torch.load(r / "final.pt", weights_only=True)
                        for r in (run, runs["one"]))
    assert all(torch.equal(final[k], reference[k]) for k in reference)
    assert metric_rows(run) == metric_rows(runs["one"])
