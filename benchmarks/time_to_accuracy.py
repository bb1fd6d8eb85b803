"""Time to accuracy: wall time, steps and samples each batch-size policy takes to first reach
a few accuracy (or validation-loss) targets, per setup, over 3 seeds.

Run (one setup at a time; every finished run is cached, so an interrupted run resumes)::

    python benchmarks/time_to_accuracy.py --only digits-cnn --out runs/tta
    python benchmarks/time_to_accuracy.py --only mnist1d-cnn1d --out runs/tta
    python benchmarks/time_to_accuracy.py --only mnist-cnn --out runs/tta   # ../shared/data/mnist
    python benchmarks/time_to_accuracy.py --only pydoc-charlm --out runs/tta
    python benchmarks/time_to_accuracy.py --only pydoc-charlm --lr-rules --out runs/tta
    python benchmarks/time_to_accuracy.py --quick --out /tmp/tta-quick      # CI: a few minutes
    python benchmarks/time_to_accuracy.py --only digits-cnn --device cuda --out runs/tta-cuda

It writes ``OUT/report.md`` (the tables and the goals of issue #18, point 3) and
``OUT/img/<setup>-*.png`` (the metric, accuracy or validation loss, against training wall time
and against steps, batch size against samples, the steps-versus-samples frontier at the 95%
target); the cache is
``OUT/cache/<device>/<setup>-s<samples>-e<eval_samples>[-t<eval_subset>]/<policy>/lr<lr>-seed<seed>.json``,
one file per finished run.

Rules (stated on the report):

- **Timing.** The training wall time runs from the start of the first step to the end of the
  step at which the target is first seen, minus every evaluation before it; the evaluation
  time is measured separately and reported. Evaluations happen at the first step end after
  every ``eval_samples`` training samples, the same sample grid for every policy (the
  benchmark's own callback; the trainer's ``--eval-every`` is off). With ``--device cuda``
  every clock reading is preceded by ``torch.cuda.synchronize()``.
- **Targets.** Accuracy setups: 90/95/98% of the best test accuracy that any run of the setup
  reached (any policy, learning rate and seed). Loss setups (the language model, whose metric
  is the validation loss, lower is better): the losses that close 90/95/98% of the gap from
  the initial validation loss (measured before the first step, the median over the runs) to
  the lowest validation loss that any run reached, ``initial − f·(initial − best)``. "The
  target" is 95%.
- **Learning rate.** Every policy gets the same grid: the setup's centre learning rate for
  the policy's optimizer (the registry's default where the setup names none) times
  1/√10, 1 and √10. The rule picks the rate with the smallest median (over seeds) training
  time to the target; a rate whose median run never reaches it counts as infinitely slow;
  where no rate reaches it, the highest median best accuracy (the lowest median best loss)
  wins.
- **Policies.** Fixed batches 16, 32, ... up to the setup's maximum; the AdAdaGrad authors'
  linear and stagewise ramps; the paper's tests (AdAdaGradNorm = AdaGrad-Norm + norm test,
  AdAdaGrad = AdaGrad + coordinate-wise test, AdaGrad + augmented inner-product test); the
  policies beyond the paper (critical batch size and goodput, with the learning-rate gain).
  "Adaptive" below means the tests and the policies beyond the paper (not the ramps).
  ``--lr-rules`` adds the learning-rate coupling comparison: the critical-batch-size and
  goodput policies with no learning-rate change (``critical-lr-none``, ``goodput-lr-none``),
  linear (``-lr-linear``, lr ∝ b) and square-root (``-lr-sqrt``, lr ∝ √b) scaling, beside
  ``critical`` and ``goodput`` (the gain rule); off by default, as its 54 runs per setup would
  take a setup's sweep past the hour.

Setups: digits and MNIST-1D CNNs, real MNIST (the AdAdaGrad authors' CNN and logistic
regression; the four IDX files in ``--mnist-dir``, skipped with a line in the report when
they are absent) and ``pydoc-charlm``: the byte-level causal transformer ``charlm`` (2
pre-LayerNorm blocks, d_model 32, tied embedding) on the text of Python's
``pydoc_data.topics`` (in every CPython; the corpus's Python version and SHA-256 are on the
report, as the text differs slightly between Python versions), context 32, target a
validation loss.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

TARGETS = (0.90, 0.95, 0.98)
MAIN_TARGET = 0.95
LR_FACTORS = (10 ** -0.5, 1.0, 10 ** 0.5)
MNIST_FILES = ("train-images.idx3-ubyte.gz", "train-labels.idx1-ubyte.gz",
               "t10k-images.idx3-ubyte.gz", "t10k-labels.idx1-ubyte.gz")


@dataclass(frozen=True)
class Setup:
    name: str
    title: str
    dataset: str
    model: str
    samples: int  # the training budget of every run
    max_batch: int
    eval_samples: int  # evaluate after every this many training samples
    #: centre of the learning-rate grid per optimizer (others: the registry's default)
    lrs: dict[str, float] = field(default_factory=dict)
    flags: dict[str, Any] = field(default_factory=dict)
    needs_mnist: bool = False
    #: "accuracy" (higher is better) or "loss" (the validation loss, lower is better)
    metric: str = "accuracy"
    #: evaluate on this many test samples, a fixed random subset (seed 0); None: all of them
    eval_subset: int | None = None


SETUPS: dict[str, Setup] = {
    "digits-cnn": Setup("digits-cnn", "scikit-learn digits, CNN", "digits", "cnn",
                        samples=28_740, max_batch=512, eval_samples=160),
    # 40 epochs, and the grids two steps of √10 above the registry's defaults (AdaGrad
    # 1e-2 -> 9.999e-2 = 1e-2·√10², AdaGrad-Norm 1 -> 3.1623): at centre 1e-2 (80,000
    # samples) and then 3.162e-2 most policies picked the top rate (docs/time_to_accuracy.md)
    "mnist1d-cnn1d": Setup("mnist1d-cnn1d", "MNIST-1D, 1D CNN", "mnist1d", "cnn1d",
                           samples=160_000, max_batch=1024, eval_samples=1000,
                           lrs={"adagrad": 0.09999, "adagradnorm": 3.1623}),
    # the AdAdaGrad authors' settings (configs/mnist_*_adagrad_norm.toml): AdaGrad, lr 8e-3,
    # eta 0.1. Sized for an hour on 1 CPU thread (the default sweep's 135 runs of about 20 s
    # take about 50 minutes, 70 with --lr-rules): 2/3 of an epoch (theirs is 100 epochs),
    # evaluated on 2,000 of the 10,000 test images, as a forward pass over all of them costs
    # 1.7 s, more than the training between two evaluations (docs/time_to_accuracy.md)
    "mnist-cnn": Setup("mnist-cnn", "MNIST, the AdAdaGrad authors' CNN", "mnist", "cnn",
                       samples=40_000, max_batch=2048, eval_samples=2000,
                       lrs={"adagrad": 8e-3}, flags={"eta": 0.1}, needs_mnist=True,
                       eval_subset=2000),
    "mnist-logistic": Setup("mnist-logistic", "MNIST, logistic regression", "mnist",
                            "logistic", samples=120_000, max_batch=4096, eval_samples=1000,
                            lrs={"adagrad": 8e-3}, flags={"eta": 0.1}, needs_mnist=True),
    # sized for about an hour of sweep on 2 CPU cores (docs/time_to_accuracy.md: the timed
    # single runs): about 1.2 epochs of the 419 KB training text
    "pydoc-charlm": Setup("pydoc-charlm", "Python docs text (pydoc_data.topics), byte-level "
                          "transformer LM", "pydoc", "charlm", samples=16_000, max_batch=512,
                          eval_samples=1000, lrs={"adagrad": 0.03},
                          flags={"data_options": {"context": 32},
                                 "model_options": {"d_model": 32}}, metric="loss"),
}

#: ``--quick``: the setups and their (samples, eval_samples)
QUICK = {"digits-cnn": (2 * 1437, 160), "pydoc-charlm": (2048, 512)}


@dataclass(frozen=True)
class Policy:
    name: str
    kind: str  # "fixed", "ramp" or "adaptive"
    optimizer: str
    flags: dict[str, Any]
    batch: int = 16  # the initial (or fixed) batch size


def policies(setup: Setup, lr_rules: bool = False) -> list[Policy]:
    """Every policy of the benchmark on ``setup`` (fixed batches first); ``lr_rules``: also
    the critical batch size with no, linear and square-root learning-rate scaling."""
    out, b = [], 16
    while b <= setup.max_batch:
        out.append(Policy(f"fixed-{b}", "fixed", "adagrad",
                          {"batch_test": "none", "batch_schedule": "constant"}, batch=b))
        b *= 2
    gain = {"lr_scaling": "gain", "kappa": 1.0}
    out += [
        Policy("linear-ramp", "ramp", "adagrad",
               {"batch_test": "none", "batch_schedule": "linear"}),
        Policy("stagewise-ramp", "ramp", "adagrad",
               {"batch_test": "none", "batch_schedule": "stagewise"}),
        Policy("adadagradnorm", "adaptive", "adagradnorm", {"batch_test": "norm"}),
        Policy("adadagrad", "adaptive", "adagrad", {"batch_test": "coord"}),
        Policy("aip", "adaptive", "adagrad", {"batch_test": "aip"}),
        Policy("critical", "adaptive", "adagrad", {"batch_test": "critical", **gain}),
        Policy("goodput", "adaptive", "adagrad", {"batch_test": "goodput", **gain}),
    ]
    if lr_rules:
        out += [Policy(f"{test}-lr-{rule}", "adaptive", "adagrad",
                       {"batch_test": test, "lr_scaling": rule, "kappa": 1.0})
                for test in ("critical", "goodput") for rule in ("none", "linear", "sqrt")]
    return out


def lr_grid(setup: Setup, optimizer: str) -> list[float]:
    """The same three rates for every policy: the centre times 1/√10, 1, √10."""
    from adabatch.optim.registry import get_spec

    centre = setup.lrs.get(optimizer, get_spec(optimizer).defaults["lr"])
    return [float(f"{centre * f:.4g}") for f in LR_FACTORS]


# ---------------------------------------------------------------------------- one run
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _clock_callbacks(every: int, budget: int, device: str, initial: bool = False,
                     subset: int | None = None) -> Any:
    """The benchmark's evaluation and training clock, as trainer callbacks; ``initial``: one
    evaluation before the first step (outside the clock), the start of a loss setup's gap;
    ``subset``: evaluate on that many test samples (a fixed random subset, seed 0)."""
    import torch

    from adabatch.train.callbacks import Callbacks
    from adabatch.train.steps import evaluate

    def test_set(run: Any) -> tuple[Any, Any]:
        x, y = run.data.x_test, run.data.y_test
        if subset is None or subset >= len(y):
            return x, y
        keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:subset]
        return x[keep.to(x.device)], y[keep.to(y.device)]

    class Clock(Callbacks):
        def __init__(self) -> None:
            self.t0: float | None = None
            self.eval_total = 0.0
            self.next_eval = every
            self.rows: list[dict[str, Any]] = []
            self.initial_loss: float | None = None
            self.test: tuple[Any, Any] | None = None

        def on_step_start(self, run: Any) -> None:
            if self.t0 is None:
                self.test = test_set(run)
                if initial:
                    self.initial_loss, _ = evaluate(run.model, *self.test, run.data.task,
                                                    batch=run.cfg.eval_batch)
                _sync(device)
                self.t0 = time.perf_counter()

        def on_step_end(self, run: Any) -> None:
            if run.samples < self.next_eval and run.samples < budget:
                return
            _sync(device)
            t = time.perf_counter()
            assert self.t0 is not None and self.test is not None
            loss, acc = evaluate(run.model, *self.test, run.data.task,
                                 batch=run.cfg.eval_batch)
            _sync(device)
            spent = time.perf_counter() - t
            self.rows.append({"step": run.step, "samples": run.samples,
                              "train_time": t - self.t0 - self.eval_total,
                              "eval_time": spent, "test_loss": loss, "accuracy": acc,
                              "batch_size": run.controller.batch_size})
            self.eval_total += spent
            while self.next_eval <= run.samples:
                self.next_eval += every

    return Clock()


def _batch_curve(metrics: Path, limit: int = 400) -> list[list[int]]:
    """(samples, batch size, step) of the step rows, thinned to about ``limit`` points (the
    last row kept)."""
    rows = []
    if metrics.exists():
        with open(metrics) as f:
            for line in f:
                row = json.loads(line)
                if not row.get("eval") and "batch_size" in row:
                    rows.append([row["samples"], row["batch_size"], row["step"]])
    stride = max(1, len(rows) // limit)
    return rows[::stride] + ([rows[-1]] if rows and (len(rows) - 1) % stride else [])


def train_one(setup: Setup, policy: Policy, lr: float, seed: int, *, device: str,
              threads: int | None, mnist_dir: Path | None) -> dict[str, Any]:
    """Train one run; its evaluation rows (with the training clock) and batch curve."""
    from adabatch.train.config import build_config
    from adabatch.train.divergence import Diverged
    from adabatch.train.loop import train

    flags: dict[str, Any] = {
        "dataset": setup.dataset, "model": setup.model, "optimizer": policy.optimizer,
        "lr": lr, "seed": seed, "samples": setup.samples, "initial_batch": policy.batch,
        "max_batch": setup.max_batch, "eval_every": 0, "checkpoint_every": 0,
        "keep_checkpoints": 1, "plots": False, "quiet": True, "device": device,
        **setup.flags, **policy.flags,
    }
    if threads is not None and not device.startswith("cuda"):
        flags["threads"] = threads
    if setup.needs_mnist:
        flags["data_dir"] = str(mnist_dir)
    clock = _clock_callbacks(setup.eval_samples, setup.samples, device,
                             initial=setup.metric == "loss", subset=setup.eval_subset)
    diverged = None
    with tempfile.TemporaryDirectory(prefix="tta-") as tmp:
        flags["out"] = str(Path(tmp) / "run")
        try:
            train(build_config(flags), callbacks=clock)
        except Diverged as e:  # a finished run that never reaches a later target
            diverged = str(e).split(";")[0]
        curve = _batch_curve(Path(tmp) / "run" / "metrics.jsonl")
    return {"setup": setup.name, "policy": policy.name, "lr": lr, "seed": seed,
            "device": device, "config": flags | {"out": None}, "diverged": diverged,
            "steps": curve[-1][2] if curve else 0, "evals": clock.rows,
            "batch_curve": [c[:2] for c in curve], "initial_loss": clock.initial_loss,
            "eval_time": sum(r["eval_time"] for r in clock.rows)}


def cache_path(cache: Path, setup: Setup, policy: str, lr: float, seed: int,
               device: str) -> Path:
    run = f"{setup.name}-s{setup.samples}-e{setup.eval_samples}" + (
        f"-t{setup.eval_subset}" if setup.eval_subset is not None else "")
    return cache / device / run / policy / f"lr{lr:g}-seed{seed}.json"


def run_all(setup: Setup, pols: Sequence[Policy], seeds: Sequence[int], cache: Path, *,
            device: str, threads: int | None, mnist_dir: Path | None,
            say: Any = print) -> tuple[list[dict[str, Any]], int]:
    """Every (policy, lr, seed) run of ``setup``, from the cache where finished; returns the
    runs and how many were trained now."""
    runs, trained = [], 0
    for policy in pols:
        for lr in lr_grid(setup, policy.optimizer):
            for seed in seeds:
                path = cache_path(cache, setup, policy.name, lr, seed, device)
                if path.exists():
                    runs.append(json.loads(path.read_text()))
                    continue
                t = time.perf_counter()
                rec = train_one(setup, policy, lr, seed, device=device, threads=threads,
                                mnist_dir=mnist_dir)
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(rec))
                os.replace(tmp, path)  # a finished run only: an interrupted one reruns
                trained += 1
                runs.append(rec)
                best = best_value(rec, setup.metric)
                say(f"{setup.name} {policy.name} lr={lr:g} seed={seed}: "
                    f"{time.perf_counter() - t:.1f} s, best {_NAMES[setup.metric]} {best:.4f}"
                    + (f" (diverged: {rec['diverged']})" if rec["diverged"] else ""))
    return runs, trained


# ---------------------------------------------------------------------------- analysis
#: the evaluation row's key and the report's short name of each metric
_KEYS = {"accuracy": "accuracy", "loss": "test_loss"}
_NAMES = {"accuracy": "acc.", "loss": "val. loss"}


def reached(value: float | None, target: float, metric: str = "accuracy") -> bool:
    """Whether ``value`` is at the target: at or above it for an accuracy, at or below it
    for a loss."""
    if value is None or not math.isfinite(value):
        return False
    return value >= target if metric == "accuracy" else value <= target


def time_to(run: dict[str, Any], target: float, metric: str = "accuracy"
            ) -> dict[str, float] | None:
    """Training time, steps and samples of the first evaluation at the target."""
    for row in run["evals"]:
        if reached(row[_KEYS[metric]], target, metric):
            return {"time": row["train_time"], "steps": row["step"], "samples": row["samples"]}
    return None


def median_to(runs: Sequence[dict[str, Any]], target: float, metric: str = "accuracy"
              ) -> dict[str, float]:
    """Median over seeds of time, steps and samples to ``target`` (inf: not reached)."""
    hits = [time_to(r, target, metric) for r in runs]
    return {k: statistics.median(h[k] if h else math.inf for h in hits)
            for k in ("time", "steps", "samples")}


def best_accuracy(run: dict[str, Any]) -> float:
    """The run's best test accuracy (0 for a run that diverged before its first evaluation)."""
    return best_value(run, "accuracy")


def best_value(run: dict[str, Any], metric: str = "accuracy") -> float:
    """The run's best accuracy (0 when it has none) or lowest finite validation loss (inf)."""
    values = [r[_KEYS[metric]] for r in run["evals"]
              if r[_KEYS[metric]] is not None and math.isfinite(r[_KEYS[metric]])]
    if metric == "accuracy":
        return max(values, default=0.0)
    return min(values, default=math.inf)


def choose_lr(by_lr: dict[float, list[dict[str, Any]]], target: float,
              metric: str = "accuracy") -> float:
    """The rule: the smallest median time to ``target``; none reaches it: the best median
    best value (the highest accuracy, the lowest loss)."""
    times = {lr: median_to(rs, target, metric)["time"] for lr, rs in by_lr.items()}
    if any(math.isfinite(t) for t in times.values()):
        return min(times, key=lambda lr: (times[lr], lr))
    sign = 1.0 if metric == "accuracy" else -1.0
    return max(by_lr, key=lambda lr: (
        sign * statistics.median(best_value(r, metric) for r in by_lr[lr]), -lr))


def targets_of(runs: Sequence[dict[str, Any]], metric: str) -> tuple[float, float | None,
                                                                      dict[float, float]]:
    """(best, initial, {f: target}): accuracy: f × the best accuracy of any run (initial
    None); loss: the loss closing the fraction f of the gap from the initial validation loss
    (median over the runs, before the first step) to the lowest of any run."""
    values = [best_value(r, metric) for r in runs]
    if metric == "accuracy":
        best = max(values)
        return best, None, {f: f * best for f in TARGETS}
    best = min(values)
    initial = statistics.median(r["initial_loss"] for r in runs
                                if r.get("initial_loss") is not None)
    return best, initial, {f: initial - f * (initial - best) for f in TARGETS}


def summarize(setup: Setup, pols: Sequence[Policy], runs: Sequence[dict[str, Any]]
              ) -> dict[str, Any]:
    """Targets, the chosen rate per policy and its medians to each target."""
    metric = setup.metric
    best, initial, targets = targets_of(runs, metric)
    rows = []
    for policy in pols:
        by_lr: dict[float, list[dict[str, Any]]] = {}
        for r in runs:
            if r["policy"] == policy.name:
                by_lr.setdefault(r["lr"], []).append(r)
        if not by_lr:
            continue
        lr = choose_lr(by_lr, targets[MAIN_TARGET], metric)
        chosen = by_lr[lr]
        rows.append({"policy": policy.name, "kind": policy.kind, "lr": lr,
                     "seeds": len(chosen),
                     "to": {str(f): median_to(chosen, t, metric) for f, t in targets.items()},
                     "reached": sum(time_to(r, targets[MAIN_TARGET], metric) is not None
                                    for r in chosen),
                     "diverged": sum(bool(r.get("diverged")) for r in chosen),
                     "eval_time": statistics.median(r["eval_time"] for r in chosen),
                     # the least training time any rate's median run spent on the whole budget
                     "min_train_time": min(_budget_time(rs) for rs in by_lr.values()),
                     "best": statistics.median(best_value(r, metric) for r in chosen)})
    return {"setup": setup.name, "metric": metric, "best": best, "initial": initial,
            "targets": targets, "rows": rows, "goals": goals(rows)}


def _train_time(run: dict[str, Any]) -> float:
    """The training time of a whole run (its last evaluation's training clock)."""
    return max((e["train_time"] for e in run["evals"]), default=0.0)


def _budget_time(runs: Sequence[dict[str, Any]]) -> float:
    """The median over seeds of the training time of the whole budget at one rate; a
    diverged run counts as infinite: it stopped early and never reaches a later target, so
    its short clock bounds nothing."""
    return statistics.median(math.inf if r.get("diverged") else _train_time(r) for r in runs)


def goals(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Issue #18 point 3 at the 95% target: the best adaptive policy's time over the best
    fixed batch's, and its steps over fixed-16's."""
    key = str(MAIN_TARGET)

    def best_of(kind: str) -> dict[str, Any] | None:
        cands = [r for r in rows if r["kind"] == kind and math.isfinite(r["to"][key]["time"])]
        return min(cands, key=lambda r: r["to"][key]["time"]) if cands else None

    fixed, adaptive = best_of("fixed"), best_of("adaptive")
    f16 = next((r for r in rows if r["policy"] == "fixed-16"), None)
    out: dict[str, Any] = {"best_fixed": fixed and fixed["policy"],
                           "best_adaptive": adaptive and adaptive["policy"],
                           "time_ratio": None, "steps_ratio": None}
    if fixed and adaptive:
        out["time_ratio"] = adaptive["to"][key]["time"] / fixed["to"][key]["time"]
    elif adaptive:
        # no fixed batch reached it within the budget: with a longer one each would take more
        # than its whole run's training time, so the adaptive policy wins if it is faster
        # than the quickest fixed run; otherwise the budget is too short to decide
        out["adaptive_time"] = adaptive["to"][key]["time"]
        quickest = min((r for r in rows if r["kind"] == "fixed"),
                       key=lambda r: r.get("min_train_time", math.inf), default=None)
        if quickest is not None:
            out["fixed_bound"] = (quickest["policy"], quickest.get("min_train_time", math.inf))
    if adaptive and f16 and math.isfinite(f16["to"][key]["steps"]):
        out["steps_ratio"] = adaptive["to"][key]["steps"] / f16["to"][key]["steps"]
    return out


# ---------------------------------------------------------------------------- report
def _fmt(v: float, digits: int = 3) -> str:
    if not math.isfinite(v):
        return "—"
    return f"{v:.{digits}g}" if isinstance(v, float) and not v.is_integer() else f"{int(v)}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if math.isfinite(a) and math.isfinite(b) and b > 0 else "—"


def setup_markdown(setup: Setup, summary: dict[str, Any], seeds: int) -> str:
    """The setup's section: targets, one row per policy, the goals."""
    key = str(MAIN_TARGET)
    f16 = next((r for r in summary["rows"] if r["policy"] == "fixed-16"), None)
    head = ["policy", "lr", f"reached {int(MAIN_TARGET * 100)}%"]
    for f in TARGETS:
        p = round(f * 100)
        head += [f"time to {p}% (s)", f"steps to {p}%", f"samples to {p}%"]
    head += ["steps / fixed-16 at 95%", f"best {_NAMES[setup.metric]}", "eval time (s)"]
    lines = [f"### {setup.title} (`{setup.name}`)", "",
             f"Budget {setup.samples} samples per run, maximum batch {setup.max_batch}, "
             f"evaluation every {setup.eval_samples} samples"
             + (f" on a fixed random {setup.eval_subset} of the test samples"
                if setup.eval_subset is not None else "") + f"; {seeds} seed(s). "
             + _targets_text(summary) + _data_text(setup)
             + " Medians over seeds at the chosen learning rate; — : the median run never "
             "reached it.", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]
    for r in summary["rows"]:
        cells = [r["policy"], f"{r['lr']:g}", f"{r['reached']}/{r['seeds']}"
                 + (f" ({r['diverged']} diverged)" if r["diverged"] else "")]
        for f in TARGETS:
            m = r["to"][str(f)]
            cells += [_fmt(m["time"]), _fmt(m["steps"]), _fmt(m["samples"])]
        steps16 = f16["to"][key]["steps"] if f16 else math.inf
        cells += [_ratio(r["to"][key]["steps"], steps16), f"{r['best']:.4f}",
                  f"{r['eval_time']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    g = summary["goals"]
    lines += ["", goals_text(g), ""]
    return "\n".join(lines)


def _targets_text(summary: dict[str, Any]) -> str:
    targets = ", ".join(f"{round(f * 100)}% = {t:.4f}" for f, t in summary["targets"].items())
    if summary.get("metric", "accuracy") == "accuracy":
        return f"Best accuracy of any run: {summary['best']:.4f}; targets {targets}."
    return (f"Validation loss (lower is better): initial {summary['initial']:.4f} (median "
            f"over the runs, before the first step), lowest of any run {summary['best']:.4f}; "
            f"targets (the loss closing 90/95/98% of the gap) {targets}.")


def _data_text(setup: Setup) -> str:
    """The corpus of a text setup: its Python version and SHA-256 (the pydoc text differs
    slightly between Python versions)."""
    if setup.dataset != "pydoc":
        return ""
    from adabatch.train.data import load_dataset

    extra = load_dataset("pydoc", **setup.flags.get("data_options", {})).extra
    return (f" Corpus: {extra['corpus']}, Python {extra['python_version']}, "
            f"{extra['bytes']} bytes, SHA-256 {extra['sha256'][:16]}…; context "
            f"{extra['context']} bytes.")


def goals_text(g: dict[str, Any]) -> str:
    if g["time_ratio"] is None and g.get("adaptive_time") is not None:
        t = g["adaptive_time"]
        name, bound = g.get("fixed_bound") or ("none", 0.0)
        head = (f"**Goals (95% target):** the best adaptive policy ({g['best_adaptive']}) "
                f"reaches the target in {t:.3g} s in the median run; no fixed batch of the "
                f"sweep reaches it within the budget at any learning rate of the grid")
        if t <= bound:
            return (f"{head}, and the quickest of them ({name}) spends {bound:.3g} s on its "
                    f"whole budget: met (≤ 1.0×); steps against fixed-16's: not measurable.")
        return (f"{head}, but {name} spends only {bound:.3g} s on its whole budget and might "
                f"reach it sooner with a longer one: not decidable with this budget.")
    if g["time_ratio"] is None:
        return ("**Goals (95% target):** not measurable: no adaptive policy reached the target "
                "in the median run.")
    steps = ("fixed-16 never reached it" if g["steps_ratio"] is None
             else f"{g['steps_ratio']:.3f} of fixed-16's steps (goal ≤ 0.2: "
                  f"{'met' if g['steps_ratio'] <= 0.2 else 'missed'})")
    return (f"**Goals (95% target):** the best adaptive policy ({g['best_adaptive']}) takes "
            f"{g['time_ratio']:.2f}× the wall time of the best fixed batch ({g['best_fixed']}) "
            f"(goal ≤ 1.25×: {'met' if g['time_ratio'] <= 1.25 else 'missed'}; ≤ 1.0×: "
            f"{'yes' if g['time_ratio'] <= 1.0 else 'no'}) and {steps}.")


RULES = (
    "Rules: the training wall time is measured from the start of the first step to the end of "
    "the step at which the target is first seen, minus every evaluation before it "
    "(evaluation time is reported in its own column, the median total per run); evaluations "
    "run every `eval_samples` training samples for every policy. Targets are 90/95/98% of the "
    "best test accuracy that any run of the setup reached; for a language model (metric: the "
    "validation loss, lower is better) they are the losses that close 90/95/98% of the gap "
    "from the initial validation loss (median over the runs, measured before the first step) "
    "to the lowest validation loss that any run reached. Each policy's learning rate comes "
    "from the same grid (the setup's centre rate for the policy's optimizer × 1/√10, 1, √10) "
    "by one rule: the smallest median time to the 95% target over the seeds (where no rate "
    "reaches it, the highest median best accuracy, or lowest loss). Adaptive policies: "
    "adadagradnorm "
    "(AdaGrad-Norm + norm test), adadagrad (AdaGrad + coordinate-wise test), aip (AdaGrad + "
    "augmented inner-product test), critical and goodput (κ = 1, learning-rate gain); with "
    "`--lr-rules` also critical-lr-none, critical-lr-linear, critical-lr-sqrt and the same "
    "three for goodput (no, linear, "
    "square-root learning-rate scaling as the batch grows); ramps: the AdAdaGrad authors' "
    "linear and stagewise schedules; every other policy uses AdaGrad.")


# ---------------------------------------------------------------------------- plots
def _chosen_runs(summary: dict[str, Any], runs: Sequence[dict[str, Any]]
                 ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(row, the lowest seed's run at the chosen rate) per policy."""
    out = []
    for row in summary["rows"]:
        rs = [r for r in runs if r["policy"] == row["policy"] and r["lr"] == row["lr"]]
        out.append((row, min(rs, key=lambda r: r["seed"])))
    return out


def plot_setup(setup: Setup, summary: dict[str, Any], runs: Sequence[dict[str, Any]],
               img: Path) -> list[Path]:
    """The four figures of ``setup`` (matplotlib's Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    img.mkdir(parents=True, exist_ok=True)
    chosen = _chosen_runs(summary, runs)
    color = _colors(summary)
    target = summary["targets"][MAIN_TARGET]
    metric, ykey = setup.metric, _KEYS[setup.metric]
    label = "test accuracy" if metric == "accuracy" else "validation loss"
    paths = []
    for name, xkey, logx in (("time", "train_time", False), ("steps", "step", True)):
        fig = Figure(figsize=(7, 4.5))
        ax = fig.add_subplot()
        for row, run in chosen:
            xs, ys = [e[xkey] for e in run["evals"]], [e[ykey] for e in run["evals"]]
            if name == "time" and run.get("initial_loss") is not None:  # the loss at time 0
                xs, ys = [0.0, *xs], [run["initial_loss"], *ys]
            ax.plot(xs, ys, "--" if row["kind"] == "fixed" else "-", label=row["policy"],
                    lw=1.2, color=color[row["policy"]])
        ax.axhline(target, color="k", lw=0.6)
        ax.set_ylim(*_ylim(summary, metric))
        ax.set(xlabel="training wall time (s)" if name == "time" else "steps",
               ylabel=label, title=f"{setup.name}: {metric} vs {name}")
        if logx:
            ax.set_xscale("log")
        ax.legend(fontsize=6, ncol=2)
        paths.append(_save(fig, FigureCanvasAgg, img / f"{setup.name}-{metric}-vs-{name}.png"))
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for row, run in chosen:
        if row["kind"] != "fixed" and run["batch_curve"]:
            ax.plot(*zip(*run["batch_curve"]), label=row["policy"], lw=1.2,
                    color=color[row["policy"]])
    ax.set(xlabel="samples", ylabel="batch size", yscale="log",
           title=f"{setup.name}: batch size vs samples")
    ax.legend(fontsize=7)
    paths.append(_save(fig, FigureCanvasAgg, img / f"{setup.name}-batch-vs-samples.png"))
    paths.append(_frontier(setup, summary, img, Figure, FigureCanvasAgg))
    return paths


def _ylim(summary: dict[str, Any], metric: str) -> tuple[float, float]:
    """The metric axis: accuracy from 0.25 below the target to 1; loss from a little below
    the lowest to the initial loss."""
    target = summary["targets"][MAIN_TARGET]
    if metric == "accuracy":
        return max(0.0, target - 0.25), 1.0
    best, initial = summary["best"], summary["initial"]
    return best - 0.05 * (initial - best), initial


def _colors(summary: dict[str, Any]) -> dict[str, Any]:
    """One colour per policy, the same in every figure."""
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    return {r["policy"]: cmap(i % 20) for i, r in enumerate(summary["rows"])}


def _frontier(setup: Setup, summary: dict[str, Any], img: Path, Figure: Any,
              Canvas: Any) -> Path:
    key = str(MAIN_TARGET)
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    pts = [(r, r["to"][key]) for r in summary["rows"] if math.isfinite(r["to"][key]["steps"])]
    fixed = [(m["samples"], m["steps"]) for r, m in pts if r["kind"] == "fixed"]
    if fixed:
        ax.plot(*zip(*fixed), "k--", lw=0.8, label="fixed batches")
    for r, m in pts:
        ax.scatter(m["samples"], m["steps"], marker="o" if r["kind"] == "fixed" else "*",
                   s=25 if r["kind"] == "fixed" else 70, color=_colors(summary)[r["policy"]])
        ax.annotate(r["policy"], (m["samples"], m["steps"]), fontsize=6)
    ax.set(xscale="log", yscale="log", xlabel="samples to the 95% target",
           ylabel="steps to the 95% target", title=f"{setup.name}: steps vs samples at 95%")
    return _save(fig, Canvas, img / f"{setup.name}-frontier.png")


def _save(fig: Any, Canvas: Any, path: Path) -> Path:
    fig.tight_layout()
    Canvas(fig).print_png(str(path))
    return path


# ---------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=None, help="comma-separated setups: " + ", ".join(SETUPS))
    p.add_argument("--quick", action="store_true",
                   help="CI form: digits (2 epochs) and pydoc-charlm (2048 samples), 1 seed, "
                        "fixed-32 and adadagradnorm")
    p.add_argument("--lr-rules", action="store_true",
                   help="add the learning-rate coupling comparison: critical-lr-none, "
                        "critical-lr-linear, critical-lr-sqrt and goodput-lr-* (beside "
                        "critical and goodput, the gain)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "time_to_accuracy")
    p.add_argument("--cache", type=Path, default=None, help="default: OUT/cache")
    p.add_argument("--device", default="cpu", help="cpu or cuda (synchronised timing)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (CPU)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--policies", default=None, help="comma-separated policy names")
    p.add_argument("--samples", type=int, default=None, help="override every setup's budget")
    p.add_argument("--mnist-dir", type=Path, default=ROOT.parent / "shared" / "data" / "mnist")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.threads < 1:
        p.error("--seeds and --threads must be >= 1")
    return args


def selected(args: argparse.Namespace) -> tuple[list[Setup], list[str]]:
    """The setups to run, and a line per setup left out (missing data, unknown name)."""
    names = (list(QUICK) if args.quick else
             args.only.split(",") if args.only else list(SETUPS))
    unknown = [n for n in names if n not in SETUPS]
    if unknown:
        raise SystemExit(f"unknown setup(s) {', '.join(unknown)}; choose from "
                         f"{', '.join(SETUPS)}")
    out, skipped = [], []
    for n in names:
        s = SETUPS[n]
        if args.quick:
            samples, every = QUICK[n]
            s = Setup(**{**s.__dict__, "samples": samples, "eval_samples": every})
        if args.samples is not None:
            s = Setup(**{**s.__dict__, "samples": args.samples})
        if s.needs_mnist and not all((args.mnist_dir / f).exists() for f in MNIST_FILES):
            skipped.append(f"{n}: skipped, the MNIST files are not in {args.mnist_dir}")
            continue
        out.append(s)
    return out, skipped


def run_setup(setup: Setup, args: argparse.Namespace, cache: Path
              ) -> tuple[dict[str, Any], str, int]:
    pols = policies(setup, lr_rules=args.lr_rules)
    wanted = (["fixed-32", "adadagradnorm"] if args.quick else
              args.policies.split(",") if args.policies else None)
    if wanted is not None:
        pols = [p for p in pols if p.name in wanted]
    seeds = list(range(1 if args.quick else args.seeds))
    runs, trained = run_all(setup, pols, seeds, cache, device=args.device,
                            threads=args.threads, mnist_dir=args.mnist_dir)
    summary = summarize(setup, pols, runs)
    md = setup_markdown(setup, summary, len(seeds))
    if not args.no_plots:
        paths = plot_setup(setup, summary, runs, args.out / "img")
        md += "\n" + "\n".join(f"![{p.stem}](img/{p.name})" for p in paths) + "\n"
    return summary, md, trained


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the selected setups (cached runs are reused) and write ``OUT/report.md`` and
    ``OUT/summary.json``; returns the summaries and the number of runs trained now."""
    import torch

    args = parse_args(argv)
    setups, skipped = selected(args)
    cache = args.cache if args.cache is not None else args.out / "cache"
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/time_to_accuracy.py " + " ".join(
        sys.argv[1:] if argv is None else argv)
    parts = [f"## Time to accuracy ({args.device})", "",
             f"Measured by `{command}` (torch {torch.__version__}, device {args.device}, "
             f"{args.threads} torch thread(s) per run on CPU, {os.cpu_count()} CPUs).", "",
             RULES, ""]
    parts += [f"- {line}" for line in skipped] + ([""] if skipped else [])
    summaries, trained = {}, 0
    for setup in setups:
        summary, md, n = run_setup(setup, args, cache)
        summaries[setup.name], trained = summary, trained + n
        parts.append(md)
    (args.out / "report.md").write_text("\n".join(parts) + "\n")
    (args.out / "summary.json").write_text(json.dumps(summaries, indent=1, default=str) + "\n")
    print(f"wrote {args.out / 'report.md'} ({trained} runs trained, the rest from the cache)")
    return {"summaries": summaries, "trained": trained, "skipped": skipped}


if __name__ == "__main__":
    main()
