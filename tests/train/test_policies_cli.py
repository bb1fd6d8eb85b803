"""`adabatch train --batch-test critical | goodput` (policies beyond the paper), `--kappa`,
`--lr-scaling gain`, and the raw statistics in metrics.jsonl."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from adabatch.cli import main

BASE = ["--quiet", "--no-plots", "--threads", "1", "--initial-batch", "8",
        "--max-batch", "512", "--micro-batch", "8"]


def _train(out: Path, *args: str) -> int:
    return main(["train", *BASE, "--out", str(out), *args])


def _steps(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if not r.get("eval")]


def test_critical_grows_and_logs_the_noise_scale(tmp_path):
    run = tmp_path / "run"
    assert _train(run, "--batch-test", "critical", "--kappa", "2", "--steps", "12") == 0
    rows = _steps(run)
    sizes = [r["batch_size"] for r in rows]
    assert sizes == sorted(sizes) and sizes[-1] > 8 and all(b % 8 == 0 for b in sizes)
    for r in rows:  # every step measures (interval 1) and carries its statistics
        assert r["grad_sq_norm"] > 0 and r["variance_trace"] >= 0 and "b_noise" in r
        if r["required"] is not None:
            assert r["required"] == pytest.approx(2 * r["b_noise"])  # kappa x smoothed
    config = json.loads((run / "config.json").read_text())
    assert config["batch_test"] == "critical" and config["kappa"] == 2.0


def test_critical_resume_is_bitwise_exact(tmp_path):
    ref, run = tmp_path / "ref", tmp_path / "run"
    flags = ["--batch-test", "critical", "--checkpoint-every", "2"]
    assert _train(ref, *flags, "--steps", "8") == 0
    assert _train(run, *flags, "--steps", "5") == 0
    assert main(["train", "--resume", str(run), "--steps", "8", "--quiet"]) == 0
    a = torch.load(run / "final.pt", weights_only=True)
    b = torch.load(ref / "final.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in r.items() if k != "time"} for r in _steps(run)]
    assert strip == [{k: v for k, v in r.items() if k != "time"} for r in _steps(ref)]
    assert len({r["batch_size"] for r in strip}) > 1  # the batch moved across the resume


def test_goodput_runs_with_bounded_moves(tmp_path):
    run = tmp_path / "run"
    assert _train(run, "--batch-test", "goodput", "--steps", "12") == 0
    rows = _steps(run)
    sizes = [r["batch_size"] for r in rows]
    assert sizes == sorted(sizes) and sizes[-1] > 8
    assert all(n <= 2 * o for o, n in itertools.pairwise(sizes))  # max_growth 2
    assert all("time_alpha" in r for r in rows if r["required"] is not None)


def test_gain_lr_scaling_follows_the_noise_scale(tmp_path):
    run = tmp_path / "run"
    assert _train(run, "--batch-test", "critical", "--lr-scaling", "gain",
                  "--optimizer", "adam", "--lr", "0.001", "--steps", "10") == 0
    rows = _steps(run)
    assert rows[0]["lr"] == pytest.approx(0.001)
    grown = [r for r in rows if r["batch_size"] > 8]
    assert grown and all(r["lr"] > 0.001 for r in grown)  # √r > 1 once the batch grew
    b = grown[-1]["batch_size"]
    assert all(r["lr"] <= 0.001 * (b / 8) ** 0.5 + 1e-12 for r in grown)  # √r <= √(b/b0)


@pytest.mark.parametrize(("args", "message"), [
    (["--batch-test", "critical", "--kappa", "0"], "--kappa must be > 0"),
    (["--batch-test", "norm", "--lr-scaling", "gain"], "goes with --batch-test critical"),
])
def test_invalid_flags_are_one_line_config_errors(tmp_path, capsys, args, message):
    assert _train(tmp_path / "run", *args, "--steps", "1") == 2
    assert message in capsys.readouterr().err


def test_raw_statistics_reach_tensorboard(monkeypatch, tmp_path):
    """#18 item 5: the raw statistics are TensorBoard scalars too (a recording stand-in for
    the optional tensorboard package, as in test_tensorboard.py)."""
    import sys
    import types

    scalars: list[tuple[str, float, int]] = []

    class Writer:
        def __init__(self, logdir: str) -> None:
            pass

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            scalars.append((tag, value, step))

        def flush(self) -> None:
            pass

        def close(self) -> None:
            pass

    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    run = tmp_path / "run"
    assert _train(run, "--batch-test", "critical", "--steps", "4", "--tensorboard") == 0
    tags = {tag for tag, _, _ in scalars}
    assert {"train/grad_sq_norm", "train/variance_trace", "train/b_noise"} <= tags
    logged = [(v, s) for tag, v, s in scalars if tag == "train/variance_trace"]
    assert logged == [(r["variance_trace"], r["samples"]) for r in _steps(run)]


@pytest.mark.slow
def test_goodput_ranks_agree_under_torchrun(tmp_path):
    """Two processes (gloo): each rank times its own steps, the all-reduced maximum makes the
    fit and every decision identical on both ranks."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(root / "src") + os.pathsep + env.get("PYTHONPATH", "")
    decisions = tmp_path / "decisions"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", str(root / "tests" / "_fault_runner.py"), "--decisions", str(decisions), "--",
           "--batch-test", "goodput", "--steps", "12", "--micro-batch", "8",
           "--batch-granularity", "16", "--initial-batch", "16", "--max-batch", "512",
           "--threads", "1", "--no-plots", "--quiet", "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = json.loads((decisions / "rank0.json").read_text())
    r1 = json.loads((decisions / "rank1.json").read_text())
    assert r0["history"] == r1["history"] and len(r0["history"]) > 3
    sizes = [r["new_batch_size"] for r in r0["history"]]
    assert sizes[-1] > 16
    assert any(r.get("time_beta") is not None for r in r0["history"])  # a fit was made


# -- --max-micro-batch: passes that grow with the batch ----------------------------------------


def test_max_micro_batch_gives_the_decisions_of_one_pass(tmp_path):
    """Passes of 8 (--micro-batch alone), of up to 32, and one pass (cap = max batch): the
    same batch sizes and statistics (float tolerance), the same model."""
    runs = {}
    for name, extra in (("eight", []), ("capped", ["--max-micro-batch", "32"]),
                        ("one", ["--max-micro-batch", "512"])):
        runs[name] = tmp_path / name
        assert _train(runs[name], "--eta", "0.4", "--steps", "10", *extra) == 0
    ref = _steps(runs["one"])
    assert len({r["batch_size"] for r in ref}) > 2 and ref[-1]["batch_size"] > 32
    final = torch.load(runs["one"] / "final.pt", weights_only=True)
    for name in ("eight", "capped"):
        rows = _steps(runs[name])
        assert [r["batch_size"] for r in rows] == [r["batch_size"] for r in ref]
        for a, b in zip(rows, ref):
            assert a["statistic"] == pytest.approx(b["statistic"], rel=1e-4)
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        other = torch.load(runs[name] / "final.pt", weights_only=True)
        assert all(torch.allclose(other[k], final[k], atol=1e-5) for k in final)


def test_max_micro_batch_pass_sizes(tmp_path):
    from adabatch.train.build import build
    from adabatch.train.config import TrainConfig
    from adabatch.train.steps import StopFlag, _Steps

    cfg = TrainConfig(micro_batch=8, max_micro_batch=32, initial_batch=8, max_batch=512,
                      threads=1, device="cpu")
    steps = _Steps(build(cfg, tmp_path), None, None, StopFlag(), None)
    assert [len(i) for i in steps.take(8)] == [8]
    assert [len(i) for i in steps.take(24)] == [24]   # one pass up to the cap
    assert [len(i) for i in steps.take(80)] == [32, 32, 16]  # accumulation beyond it


@pytest.mark.parametrize(("args", "message"), [
    (["--max-micro-batch", "32"], "goes with --micro-batch"),
    (["--micro-batch", "8", "--max-micro-batch", "20"], "multiple of --micro-batch"),
    (["--micro-batch", "8", "--max-micro-batch", "32", "--estimator", "micro-batch"],
     "--estimator per-sample"),
])
def test_max_micro_batch_refusals(tmp_path, capsys, args, message):
    assert main(["train", "--quiet", "--steps", "1", "--out", str(tmp_path / "run"),
                 *args]) == 2
    assert message in capsys.readouterr().err
