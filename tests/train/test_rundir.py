"""A run directory is owned by one process (issue #16, item 2), tested with real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from adabatch.train.rundir import LOCK_NAME, RunDirBusy, RunDirLock, check_new_run_dir

HOLDER = textwrap.dedent("""
    import sys, time
    from adabatch.train.rundir import RunDirLock
    lock = RunDirLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(60)
""")


def _holder(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_is_refused_and_named(tmp_path) -> None:
    run_dir = tmp_path / "run"
    proc = _holder(run_dir)
    try:
        with pytest.raises(RunDirBusy, match=rf"in use by process {proc.pid} on "):
            RunDirLock(run_dir).acquire()
    finally:
        proc.kill()
        proc.wait()


def test_a_lock_of_a_killed_process_is_taken_over(tmp_path) -> None:
    run_dir = tmp_path / "run"
    proc = _holder(run_dir)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    lock = RunDirLock(run_dir)
    with lock:
        assert lock.took_over == proc.pid
        assert (run_dir / LOCK_NAME).read_text().split()[0] == str(os.getpid())
    # released: another owner may come
    with RunDirLock(run_dir) as again:
        assert again.took_over is None  # the previous owner was this process


def test_in_process_double_acquire_is_refused(tmp_path) -> None:
    with RunDirLock(tmp_path / "r"):
        with pytest.raises(RunDirBusy):
            RunDirLock(tmp_path / "r").acquire()


def test_two_starters_at_once_exactly_one_wins(tmp_path) -> None:
    code = textwrap.dedent("""
        import sys, time
        from adabatch.train.rundir import RunDirLock, RunDirBusy
        time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
        try:
            RunDirLock(sys.argv[1]).acquire()
            print("won", flush=True)
            time.sleep(2)
        except RunDirBusy:
            print("busy", flush=True)
    """)
    start = time.time() + 1.5
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "r"), str(start)],
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outs == ["busy", "busy", "busy", "won"]


def test_new_run_dir_rule(tmp_path) -> None:
    assert check_new_run_dir(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / LOCK_NAME).write_text("123 host\n")
    assert check_new_run_dir(tmp_path / "empty") == tmp_path / "empty"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"is not empty \(config.json\)"):
        check_new_run_dir(tmp_path / "mine")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        check_new_run_dir(tmp_path / "file")
    with pytest.raises(ValueError, match="--out is empty"):
        check_new_run_dir("")


def test_a_failed_start_leaves_nothing_behind(tmp_path) -> None:
    with RunDirLock(tmp_path / "new"):
        pass
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    with RunDirLock(tmp_path / "mine"):
        pass
    assert (tmp_path / "mine").is_dir() and not list((tmp_path / "mine").iterdir())
    with RunDirLock(tmp_path / "run"):
        (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_NAME, "metrics.jsonl"]
