"""Issue #16: nothing silently wrong, nothing lost, one clear line for every failure.

Each test reproduces one reported failure through the command-line program (in-process or as
a real subprocess) and checks the fixed behaviour: the exit code of ``adabatch.train.errors``,
one line on stderr, and files that are intact afterwards.
"""

from __future__ import annotations

import io
import json
import pickle
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from adabatch.cli import main
from adabatch.train.checkpoint import list_checkpoints
from adabatch.train.rundir import LOCK_NAME
from tests.train._runs import metric_rows as _rows
from tests.train._runs import subprocess_env as _env

TESTS = Path(__file__).resolve().parents[1]
TINY = ["--threads", "1", "--quiet", "--no-plots"]




def _same_final(a: Path, b: Path) -> None:
    sa = torch.load(a / "final.pt", weights_only=True)
    sb = torch.load(b / "final.pt", weights_only=True)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert _rows(a) == _rows(b)


def _one_error_line(err: str) -> str:
    lines = [x for x in err.strip().splitlines() if x.startswith("adabatch: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------- 2: one owner per run


def test_two_runs_started_together_on_one_out(tmp_path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "adabatch", "train", "--steps", "40", "--checkpoint-every",
           "5", *TINY, "--out", str(out)]
    procs = [subprocess.Popen([*cmd, "--seed", str(seed)], env=_env(), stderr=subprocess.PIPE,
                              text=True) for seed in (1, 2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert ("in use by process" in _one_error_line(loser)
            or "already holds a run" in _one_error_line(loser))
    winner_seed = json.loads((out / "summary.json").read_text())["config"]["seed"]
    assert json.loads((out / "config.json").read_text())["seed"] == winner_seed
    steps = [r["step"] for r in _rows(out) if not r.get("eval")]
    assert steps == list(range(1, 41))  # one run's rows, whole lines, no interleaving


# ----------------------------------------------------------------------- 3 + 8: damaged files


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    ref = tmp_path_factory.mktemp("ref") / "run"
    assert main(["train", "--steps", "9", "--checkpoint-every", "2", "--keep-checkpoints", "3",
                 *TINY, "--out", str(ref)]) == 0
    return ref


def _killed_run(tmp_path: Path, kill_at: int = 8) -> Path:
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(TESTS / "_fault_runner.py"), "--kill-at",
                           str(kill_at), "--", "--steps", "9", "--checkpoint-every", "2",
                           "--keep-checkpoints", "3", *TINY, "--out", str(run)],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return run


def test_damaged_newest_checkpoint_falls_back_and_ends_bitwise_equal(tmp_path, reference,
                                                                     capsys) -> None:
    run = _killed_run(tmp_path)
    names = [p.name for p in list_checkpoints(run)]
    assert names == ["step_00000002.pt", "step_00000004.pt", "step_00000006.pt"]
    newest = run / "checkpoints" / names[-1]
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    stale = run / "checkpoints" / ".step_00000008.pt.x7y8z9.tmp"
    stale.write_bytes(b"half a checkpoint")
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--threads", "1"]) == 0
    err = capsys.readouterr().err  # said also under --quiet
    assert "skipped step_00000006.pt (cannot read checkpoint" in err
    assert "removed 1 temporary file(s)" in err
    assert not stale.exists() and (run / "checkpoints" / (names[-1] + ".damaged")).exists()
    _same_final(run, reference)


def test_damaged_config_json_is_recovered_from_a_checkpoint(tmp_path, reference,
                                                            capsys) -> None:
    run = _killed_run(tmp_path)
    config = run / "config.json"
    config.write_text(config.read_text()[:40])  # what a crash in a plain write_text leaves
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--threads", "1"]) == 0
    err = capsys.readouterr().err
    assert "config.json is damaged" in err and "using the configuration saved in" in err
    json.loads(config.read_text())  # rewritten whole
    _same_final(run, reference)


def test_checkpoint_with_missing_keys_or_bad_rng_is_one_line(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", "--steps", "2", *TINY, "--out", str(run)]) == 0
    path = list_checkpoints(run)[-1]
    good = torch.load(path, weights_only=True)
    for damage in ("sampler", "rng"):
        state = dict(good)
        if damage == "sampler":
            del state["sampler"]
        else:
            state["rng"] = {"torch": torch.zeros(3, dtype=torch.uint8)}
        torch.save(state, path)
        capsys.readouterr()
        assert main(["train", "--resume", str(run), "--steps", "3", *TINY]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert f"cannot restore {path}" in line


# ----------------------------------------------------------------------- 4: write errors


def test_disk_full_while_checkpointing_is_an_io_error(tmp_path) -> None:
    run = tmp_path / "run"

    def limit() -> None:  # a file size limit: writes past it fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    proc = subprocess.run([sys.executable, "-m", "adabatch", "train", "--steps", "6",
                           "--checkpoint-every", "3", *TINY, "--out", str(run)],
                          env=_env(), capture_output=True, text=True, timeout=300,
                          preexec_fn=limit)
    assert proc.returncode == 4, proc.stderr
    assert "file too large" in _one_error_line(proc.stderr)
    json.loads((run / "config.json").read_text())  # what was written is intact
    assert not list((run / "checkpoints").glob(".*.tmp"))


def test_unwritable_out_fails_before_the_data_loads() -> None:
    proc = subprocess.run([sys.executable, "-m", "adabatch", "train", "--steps", "2", *TINY,
                           "--out", "/proc/adabatch-no-such-dir/run"], env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 4
    assert "No such file or directory: /proc/adabatch-no-such-dir" in _one_error_line(
        proc.stderr)


def test_debug_shows_the_traceback(capsys) -> None:
    assert main(["train", "--steps", "2", *TINY, "--debug", "--out",
                 "/proc/adabatch-no-such-dir/run"]) == 4
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("adabatch: error:")


# ----------------------------------------------------------------------- 5: one line, not a trace


@pytest.mark.parametrize("flags, code, text", [
    (["--optimizer", "adagrad", "--lr", "1e39"], 2, "--lr must be a finite number"),
    (["--dataset", "synthetic", "--data-option", "n=100000000000"], 6, "out of memory"),
    (["--max-batch", "4096"], 2, "--max-batch 4096 is larger than the training set"),
])
def test_bad_values_exit_with_one_line(tmp_path, capsys, flags, code, text) -> None:
    assert main(["train", "--steps", "2", *TINY, *flags, "--out", str(tmp_path / "r")]) == code
    assert text in _one_error_line(capsys.readouterr().err)


# ----------------------------------------------------------------------- 6 + 7: evaluation rows


def test_resuming_a_finished_run_adds_no_second_evaluation(tmp_path) -> None:
    run = tmp_path / "run"
    assert main(["train", "--steps", "3", *TINY, "--out", str(run)]) == 0
    before = (run / "metrics.jsonl").read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert main(["train", "--resume", str(run), *TINY]) == 0
    assert (run / "metrics.jsonl").read_text() == before
    assert [r["step"] for r in _rows(run) if r.get("eval")] == [3]
    again = json.loads((run / "summary.json").read_text())
    assert again["test_loss"] == summary["test_loss"]


def test_an_empty_test_set_is_not_reported_as_measured(tmp_path) -> None:
    from adabatch.train.build import build
    from adabatch.train.config import build_config
    from adabatch.train.steps import eval_row

    run = build(build_config({"steps": 1, "quiet": True}), tmp_path)
    run.data.x_test, run.data.y_test = run.data.x_test[:0], run.data.y_test[:0]
    rows: list[dict] = []

    class Writer:
        def write(self, row):
            rows.append(row)

        def flush(self):
            return 0

    class Progress:
        def write(self, line):
            rows.append({"line": line})

    row = eval_row(run, Writer(), Progress())
    assert row["test_loss"] is None and row["test_accuracy"] is None
    assert row["test_samples"] == 0 and "no test set" in rows[-1]["line"]


def test_the_summary_line_says_there_was_no_test_set(tmp_path, capsys) -> None:
    from adabatch.cli import _print_summary

    summary = {"test_accuracy": None, "test_loss": None, "steps": 3, "samples": 48,
               "epochs": 0.03, "initial_batch_size": 16, "final_batch_size": 16,
               "wall_time_s": 0.1}
    _print_summary(summary, tmp_path, [], "")
    assert "done: no test set; 3 steps" in capsys.readouterr().out


# ----------------------------------------------------------------------- 9: divergence


def test_a_finite_blow_up_stops_the_run(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", "--optimizer", "adagradnorm", "--lr", "1e6", "--epochs", "3", *TINY,
                 "--out", str(run)]) == 5
    line = _one_error_line(capsys.readouterr().err)
    assert "diverged: the loss is" in line and "more than 100x its scale" in line
    assert not (run / "final.pt").exists()


def test_from_step_goes_back_with_another_lr(tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["train", "--steps", "6", "--checkpoint-every", "2", "--keep-checkpoints",
                 "5", *TINY, "--out", str(run)]) == 0
    capsys.readouterr()
    # without --from-step the learning rate is part of the run
    assert main(["train", "--resume", str(run), "--lr", "0.5", *TINY]) == 2
    assert "lr=" in _one_error_line(capsys.readouterr().err)
    assert main(["train", "--resume", str(run), "--from-step", "2", "--lr", "0.5",
                 "--threads", "1", "--no-plots"]) == 0
    assert "set step_00000004.pt aside" in capsys.readouterr().err
    rows = [r for r in _rows(run) if not r.get("eval")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["lr"] for r in rows] == [1.0, 1.0, 0.5, 0.5, 0.5, 0.5]
    assert [r["step"] for r in _rows(run) if r.get("eval")] == [6]
    assert (run / "checkpoints" / "step_00000004.pt.abandoned").exists()
    assert json.loads((run / "config.json").read_text())["from_step"] is None
    assert main(["train", "--resume", str(run), "--from-step", "3", *TINY]) == 2
    assert "has no checkpoint of step 3" in _one_error_line(capsys.readouterr().err)


# ----------------------------------------------------------------------- 10: --out rules


def test_out_rules(tmp_path, capsys) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("my own file")
    assert main(["train", "--steps", "2", *TINY, "--out", str(mine)]) == 2
    assert "is not empty" in _one_error_line(capsys.readouterr().err)
    assert (mine / "config.json").read_text() == "my own file"
    assert main(["train", "--steps", "2", *TINY, "--out", ""]) == 2
    assert "--out is empty" in _one_error_line(capsys.readouterr().err)
    run = tmp_path / "run"
    assert main(["train", "--steps", "2", *TINY, "--out", str(run)]) == 0
    assert main(["train", "--resume", str(run), "--out", str(tmp_path / "other"), *TINY]) == 2
    assert "a resumed run stays in its own directory" in _one_error_line(
        capsys.readouterr().err)
    assert not (run / LOCK_NAME).read_text().strip() == ""  # the last owner is recorded


def test_a_stuck_peer_is_reported_within_dist_timeout(tmp_path) -> None:
    """Rank 1 pauses (alive, not dead); rank 0 gives up after --dist-timeout seconds."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", str(TESTS / "_fault_runner.py"), "--pause-at", "2", "--pause-rank", "1", "--",
           "--steps", "6", "--dist-timeout", "5", *TINY, "--out", str(tmp_path / "run")]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert time.monotonic() - t0 < 120
    assert ("adabatch: error: rank 0: no answer within --dist-timeout 5 s at step 3: rank(s) "
            "1 did not reach step 3 (stopped or stuck)") in proc.stderr, proc.stderr[-3000:]


# ----------------------------------------------------------------------- 11: library edges


def test_library_edges() -> None:
    from adabatch.batching import (
        AdaptiveBatchSampler,
        BatchSizeController,
        NormTest,
        PerSampleStats,
    )
    from adabatch.train.data import _ArrayUnpickler

    c = BatchSizeController(NormTest(0.5), initial=16, maximum=64)
    with pytest.raises(TypeError, match="Invalid stats: str"):
        c.update("x")
    with pytest.raises(TypeError, match="Invalid state_dict: NoneType"):
        c.load_state_dict(None)
    with pytest.raises(TypeError, match="Invalid state_dict: NoneType"):
        AdaptiveBatchSampler(100, 4).load_state_dict(None)
    model = nn.Linear(3, 2)
    est = PerSampleStats(model)
    with est.measure():
        model(torch.randn(4, 3))  # no backward
    with pytest.raises(RuntimeError, match="no backward pass reached the hooked layers"):
        est.stats()
    # a Python 3 protocol-2 pickle with bytes and bytearray names __builtin__
    obj = {b"data": np.arange(6, dtype=np.uint8).reshape(2, 3), b"labels": [1, 2],
           b"name": bytearray(b"ab"), b"raw": b"xy"}
    raw = pickle.dumps(obj, protocol=2)
    assert b"__builtin__" in raw
    got = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    assert got[b"name"] == bytearray(b"ab") and got[b"raw"] == b"xy"
    assert np.array_equal(got[b"data"], obj[b"data"])
