"""benchmarks/time_to_accuracy.py on a tiny budget: the report's numbers follow from the cached
run files, a second invocation trains nothing, evaluation is excluded from the training clock,
and the learning-rate rule picks the best median; the language model's loss targets (lower is
better, the gap from the initial loss closed) and the learning-rate coupling policies."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from tests.conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tta():
    yield from load_benchmark(ROOT / "benchmarks" / "time_to_accuracy.py", "time_to_accuracy")


def _run(row: list[float], seed: int = 0, lr: float = 0.1) -> dict:
    """A fake run whose evaluation k (k = 1, 2, ...) reached accuracy row[k-1] at time k."""
    return {"lr": lr, "seed": seed, "eval_time": 0.0, "evals": [
        {"step": 10 * k, "samples": 160 * k, "train_time": float(k), "accuracy": a}
        for k, a in enumerate(row, 1)]}


def test_lr_rule_picks_the_best_median(tta):
    # lr 0.1 has the fastest single seed (time 1) but median 3; lr 0.3: median 2
    by_lr = {0.1: [_run([0.9], 0, 0.1), _run([0, 0, 0.9], 1, 0.1), _run([0] * 4 + [.9], 2, .1)],
             0.3: [_run([0, 0.9], 0, 0.3), _run([0, 0.9], 1, 0.3), _run([0.0] * 5, 2, 0.3)]}
    assert tta.median_to(by_lr[0.1], 0.9) == {"time": 3.0, "steps": 30, "samples": 480}
    assert tta.choose_lr(by_lr, 0.9) == 0.3
    # a rate whose median run never reaches the target loses to one that does
    by_lr[0.3] = [_run([0.9], 0, 0.3), _run([0.0], 1, 0.3), _run([0.0], 2, 0.3)]
    assert math.isinf(tta.median_to(by_lr[0.3], 0.9)["time"])
    assert tta.choose_lr(by_lr, 0.9) == 0.1
    # none reaches it: the highest median best accuracy
    by_lr = {0.1: [_run([0.5]), _run([0.6]), _run([0.7])],
             0.3: [_run([0.9]), _run([0.55]), _run([0.56])]}
    assert tta.choose_lr(by_lr, 0.95) == 0.1


def test_quick_report_matches_the_run_files_and_resumes(tta, tmp_path):
    argv = ["--only", "digits-cnn", "--policies", "fixed-32,adadagradnorm", "--seeds", "1",
            "--samples", "480", "--no-plots", "--out", str(tmp_path)]
    first = tta.main(argv)
    setup = tta.SETUPS["digits-cnn"]
    assert first["trained"] == 6  # 2 policies x 3 learning rates x 1 seed
    files = sorted((tmp_path / "cache").rglob("*.json"))
    assert len(files) == 6
    # the key holds everything that changes a run's record: budget and evaluation grid too
    assert {f.parent.parent.relative_to(tmp_path / "cache") for f in files} == {
        Path("cpu") / f"digits-cnn-s480-e{setup.eval_samples}"}
    runs = [json.loads(f.read_text()) for f in files]
    best = max(e["accuracy"] for r in runs for e in r["evals"])
    summary = first["summaries"]["digits-cnn"]
    assert summary["best"] == best
    for row in summary["rows"]:
        assert row["lr"] in tta.lr_grid(setup, "adagradnorm" if row["policy"] ==
                                        "adadagradnorm" else "adagrad")
        (run,) = [r for r in runs if r["policy"] == row["policy"] and r["lr"] == row["lr"]]
        for f in tta.TARGETS:  # the first evaluation row at or above each target
            hit = next((e for e in run["evals"] if e["accuracy"] >= f * best), None)
            got = row["to"][str(f)]
            if hit is None:
                assert math.isinf(got["time"])
            else:
                assert (got["time"], got["steps"], got["samples"]) == (
                    hit["train_time"], hit["step"], hit["samples"])
    for run in runs:  # evaluations on the sample grid, the last at the end of the budget
        assert [e["samples"] for e in run["evals"]][-1] >= 480
        assert all(e["samples"] >= 160 * k for k, e in enumerate(run["evals"], 1))
        times = [e["train_time"] for e in run["evals"]]
        assert times == sorted(times) and times[0] > 0
    report = (tmp_path / "report.md").read_text()
    assert "| fixed-32 |" in report and "| adadagradnorm |" in report
    second = tta.main(argv)  # everything from the cache
    assert second["trained"] == 0
    assert second["summaries"]["digits-cnn"]["rows"] == summary["rows"]


def test_evaluation_is_excluded_from_the_training_clock(tta, monkeypatch):
    import adabatch.train.steps as steps

    real = steps.evaluate

    def slow(*args, **kwargs):
        time.sleep(0.05)
        return real(*args, **kwargs)

    monkeypatch.setattr(steps, "evaluate", slow)
    setup = tta.Setup("t", "t", "digits", "logistic", samples=320, max_batch=64,
                      eval_samples=32)
    policy = tta.policies(setup)[0]
    t = time.perf_counter()
    rec = tta.train_one(setup, policy, 0.1, 0, device="cpu", threads=1, mnist_dir=None)
    wall = time.perf_counter() - t
    evals = rec["evals"]
    assert len(evals) == 10 and rec["steps"] == 20
    assert all(e["eval_time"] >= 0.05 for e in evals)
    assert rec["eval_time"] == pytest.approx(sum(e["eval_time"] for e in evals))
    # nine evaluations (0.45 s) happened before the last row: none is in its training time
    assert evals[-1]["train_time"] < wall - rec["eval_time"]
    assert evals[-1]["train_time"] < 0.45


def test_missing_mnist_is_skipped_with_a_line(tta, tmp_path):
    args = tta.parse_args(["--only", "mnist-cnn,digits-cnn", "--mnist-dir", str(tmp_path)])
    setups, skipped = tta.selected(args)
    assert [s.name for s in setups] == ["digits-cnn"]
    assert skipped == [f"mnist-cnn: skipped, the MNIST files are not in {tmp_path}"]
    with pytest.raises(SystemExit, match="unknown setup"):
        tta.selected(tta.parse_args(["--only", "nope"]))


def test_a_diverged_run_is_recorded_and_never_reaches_a_target(tta):
    setup = tta.Setup("t", "t", "digits", "cnn", samples=320, max_batch=64, eval_samples=32)
    policy = tta.policies(setup)[0]
    rec = tta.train_one(setup, policy, 1e4, 0, device="cpu", threads=1, mnist_dir=None)
    assert rec["diverged"] and "loss" in rec["diverged"]
    assert rec["steps"] < 20 and all(e["step"] < 20 for e in rec["evals"])
    assert tta.time_to(rec, 0.99) is None
    assert 0.0 <= tta.best_accuracy(rec) < 0.5


def _loss_run(row: list[float], seed: int = 0, lr: float = 0.1, initial: float = 5.0) -> dict:
    """A fake language-model run: evaluation k reached validation loss row[k-1] at time k."""
    return {"lr": lr, "seed": seed, "eval_time": 0.0, "initial_loss": initial, "evals": [
        {"step": 10 * k, "samples": 160 * k, "train_time": float(k), "test_loss": loss,
         "accuracy": 0.1} for k, loss in enumerate(row, 1)]}


def test_loss_targets_close_the_gap_and_lower_is_better(tta):
    runs = [_loss_run([4.0, 3.0, 2.5], initial=5.0), _loss_run([4.5, 2.0], 1, initial=5.2),
            _loss_run([3.0, float("nan")], 2, initial=4.8)]
    best, initial, targets = tta.targets_of(runs, "loss")
    assert (best, initial) == (2.0, 5.0)  # the lowest loss of any run, the median initial
    assert targets == pytest.approx({0.9: 2.3, 0.95: 2.15, 0.98: 2.06})
    assert tta.time_to(runs[0], 3.0, "loss") == {"time": 2.0, "steps": 20, "samples": 320}
    assert tta.time_to(runs[0], 2.4, "loss") is None and tta.best_value(runs[2], "loss") == 3.0
    assert tta.median_to(runs, 3.0, "loss")["time"] == 2.0
    # the rate rule: the fastest median; none reaches: the lowest median best loss
    by_lr = {0.1: [_loss_run([4.0, 2.9]), _loss_run([2.9])],
             0.3: [_loss_run([2.9, 2.0]), _loss_run([3.5, 2.9])]}
    assert tta.choose_lr(by_lr, 3.0, "loss") == 0.1
    assert tta.choose_lr(by_lr, 2.5, "loss") == 0.3  # no median run reaches 2.5: best 2.45
    assert tta.choose_lr(by_lr, 2.5) == 0.1  # the accuracy rule: equal accuracies, lower rate


def test_lr_rules_add_the_learning_rate_coupling_policies(tta):
    setup = tta.SETUPS["pydoc-charlm"]
    names = [p.name for p in tta.policies(setup)]
    assert "critical" in names and not any(n.startswith("critical-lr-") for n in names)
    assert not any(n.startswith("goodput-lr-") for n in names)
    for test in ("critical", "goodput"):
        extra = {p.name: p.flags for p in tta.policies(setup, lr_rules=True)
                 if p.name.startswith(f"{test}-lr-")}
        assert {n: f["lr_scaling"] for n, f in extra.items()} == {
            f"{test}-lr-none": "none", f"{test}-lr-linear": "linear",
            f"{test}-lr-sqrt": "sqrt"}
        assert all(f["batch_test"] == test for f in extra.values())


def test_language_model_setup_reports_loss_targets(tta, tmp_path):
    argv = ["--only", "pydoc-charlm", "--policies", "fixed-32,critical-lr-sqrt", "--lr-rules",
            "--seeds", "1", "--samples", "192", "--out", str(tmp_path)]
    first = tta.main(argv)
    assert first["trained"] == 6
    runs = [json.loads(f.read_text()) for f in (tmp_path / "cache").rglob("*.json")]
    assert all(r["initial_loss"] > 5.0 for r in runs)  # about log(256) before the first step
    summary = first["summaries"]["pydoc-charlm"]
    best = min(e["test_loss"] for r in runs for e in r["evals"])
    initial = sorted(r["initial_loss"] for r in runs)[2:4]
    assert summary["metric"] == "loss" and summary["best"] == best
    assert summary["initial"] == pytest.approx(sum(initial) / 2)
    target = summary["targets"][0.95]
    assert target == pytest.approx(summary["initial"] - 0.95 * (summary["initial"] - best))
    for row in summary["rows"]:
        (run,) = [r for r in runs if r["policy"] == row["policy"] and r["lr"] == row["lr"]]
        hit = next((e for e in run["evals"] if e["test_loss"] <= target), None)
        assert row["to"]["0.95"]["time"] == (hit["train_time"] if hit else math.inf)
    report = (tmp_path / "report.md").read_text()
    assert "Validation loss (lower is better)" in report and "best val. loss" in report
    assert "| critical-lr-sqrt |" in report and "SHA-256" in report
    for name in ("loss-vs-time", "loss-vs-steps", "batch-vs-samples", "frontier"):
        assert (tmp_path / "img" / f"pydoc-charlm-{name}.png").stat().st_size > 0


def test_goal_when_only_an_adaptive_policy_reaches_the_target(tta):
    """No fixed batch reaching the target within the budget is a met goal, not 'not
    measurable'; no adaptive policy reaching it is 'not measurable'."""
    inf = math.inf

    def row(policy, kind, time, steps, whole=10.0):
        return {"policy": policy, "kind": kind, "min_train_time": whole,
                "to": {"0.95": {"time": time, "steps": steps}}}

    rows = [row("fixed-16", "fixed", inf, inf, 9.0), row("fixed-32", "fixed", inf, inf, 4.0),
            row("critical", "adaptive", 2.5, 465.0), row("goodput", "adaptive", inf, inf)]
    g = tta.goals(rows)
    assert g["time_ratio"] is None and g["adaptive_time"] == 2.5
    assert g["fixed_bound"] == ("fixed-32", 4.0)
    text = tta.goals_text(g)
    assert "met (≤ 1.0×)" in text and "critical" in text and "2.5 s" in text
    # a fixed batch whose whole budget took less than the adaptive time might get there first
    rows[1] = row("fixed-32", "fixed", inf, inf, 1.5)
    text = tta.goals_text(tta.goals(rows))
    assert "not decidable with this budget" in text and "met" not in text
    rows = [row("fixed-16", "fixed", 1.0, 100.0), row("critical", "adaptive", inf, inf)]
    assert "not measurable: no adaptive policy" in tta.goals_text(tta.goals(rows))


def test_rows_carry_the_least_whole_run_training_time(tta):
    """min_train_time: the smallest median (over seeds) training time of a whole run over
    the rates of the grid."""
    def run(lr, seed, times):
        return {"policy": "fixed-16", "lr": lr, "seed": seed, "eval_time": 0.0,
                "diverged": None, "evals": [{"train_time": t, "accuracy": 0.5, "samples": 1,
                                             "step": 1} for t in times]}

    assert tta._train_time(run(0.1, 0, [0.5, 2.0, 1.0])) == 2.0
    # a diverged run stopped early: its short clock is no bound on a longer budget
    runs = [run(0.1, k, [t]) for k, t in enumerate((3.0, 4.0, 5.0))]
    assert tta._budget_time(runs) == 4.0
    runs[0]["diverged"] = runs[1]["diverged"] = "the loss is 230 at step 2"
    assert tta._budget_time(runs) == math.inf
    runs[1]["diverged"] = None
    assert tta._budget_time(runs) == 5.0


def test_an_evaluation_subset_is_fixed_and_keys_the_cache(tta, monkeypatch, tmp_path):
    import adabatch.train.steps as steps

    real, seen = steps.evaluate, []

    def spy(model, x, y, *args, **kwargs):
        seen.append(y.clone())
        return real(model, x, y, *args, **kwargs)

    monkeypatch.setattr(steps, "evaluate", spy)
    setup = tta.Setup("t", "t", "digits", "logistic", samples=128, max_batch=64,
                      eval_samples=64, eval_subset=50)
    policy = tta.policies(setup)[0]
    tta.train_one(setup, policy, 0.1, 0, device="cpu", threads=1, mnist_dir=None)
    tta.train_one(setup, policy, 0.1, 1, device="cpu", threads=1, mnist_dir=None)
    # the benchmark's two evaluations per run on 50 samples; the trainer's final one on all
    ours = [y for y in seen if len(y) == 50]
    assert len(ours) == 4 and all(len(y) > 50 for y in seen if len(y) != 50)
    # the same 50 test samples at every evaluation of every run
    assert all(bool((y == ours[0]).all()) for y in ours)
    full = tta.Setup(**{**setup.__dict__, "eval_subset": None})
    a = tta.cache_path(tmp_path, setup, "fixed-16", 0.1, 0, "cpu")
    b = tta.cache_path(tmp_path, full, "fixed-16", 0.1, 0, "cpu")
    assert a != b and a.parent.parent.name.endswith("-t50")
