r"""Adaptive against fixed and ramped batches, through the training program's Python API.

Two comparisons, each at the same sample budget for every variant of a setup:

- ``batches`` (issue item 2): AdaGrad-Norm and AdaGrad, each with the norm test, the augmented
  inner-product test and the coordinate-wise test (AdAdaGradNorm = AdaGrad-Norm + norm test,
  AdAdaGrad = AdaGrad + coordinate-wise test), against the same optimizer with a fixed small
  batch (the adaptive runs' initial batch), a fixed large batch (their maximum), and the
  linear and stagewise ramp-ups of the AdAdaGrad authors' code
  (github.com/timlautk/AdAdaGrad, ``main.py``: ``--linear_ramp_up``, ``--stagewise_ramp_up``).
- ``adabelief`` (issue item 4): AdaBelief and Adam with a fixed small batch and with the norm
  test.

Every run is one :func:`adabatch.train.loop.train` call (the same code as ``adabatch train``),
with the trainer's defaults for everything not set here (estimator: exact per-sample
statistics; η = 0.5, θ = 0.9, ν = 5 for the tests). Results: final test accuracy (mean ± std
over seeds), optimizer steps, samples, final batch size, wall time; figures of test accuracy
and batch size against samples (seed 0).
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adabatch.reproduce.common import Section, fmt, markdown_table, pyplot, save_figure

__all__ = ["SETUPS", "Setup", "Variant", "run", "run_variant", "variants"]


@dataclass(frozen=True)
class Setup:
    key: str
    label: str
    dataset: str
    model: str
    epochs: float
    initial_batch: int
    max_batch: int
    data_options: dict[str, Any] = field(default_factory=dict)
    model_options: dict[str, Any] = field(default_factory=dict)
    #: learning rates per optimizer (others: the registry's defaults)
    lrs: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Variant:
    label: str
    optimizer: str
    policy: dict[str, Any]


SETUPS: dict[str, Setup] = {
    "digits-logistic": Setup("digits-logistic", "digits, logistic regression", "digits",
                             "logistic", epochs=30, initial_batch=16, max_batch=512,
                             lrs={"adagrad": 0.1}),
    "digits-cnn": Setup("digits-cnn", "digits, CNN", "digits", "cnn", epochs=30,
                        initial_batch=16, max_batch=512, lrs={"adagrad": 0.05}),
    "mnist1d-cnn1d": Setup("mnist1d-cnn1d", "MNIST-1D, 1D CNN", "mnist1d", "cnn1d", epochs=30,
                           initial_batch=16, max_batch=1024, lrs={"adagrad": 0.05}),
    "synthetic-logistic": Setup("synthetic-logistic", "synthetic logistic regression",
                                "synthetic", "logistic", epochs=20, initial_batch=16,
                                max_batch=1024,
                                data_options={"kind": "logistic", "n": 4000, "d": 20},
                                lrs={"adagrad": 0.1}),
}


def variants(comparison: str, setup: Setup) -> list[Variant]:
    """The variants of ``comparison`` ("batches" or "adabelief") on ``setup``."""
    b0, bmax = setup.initial_batch, setup.max_batch
    fixed_small = {"batch_test": "none", "batch_schedule": "constant"}
    if comparison == "batches":
        out = []
        for opt, name in (("adagradnorm", "AdaGrad-Norm"), ("adagrad", "AdaGrad")):
            out += [
                Variant(f"{name} + norm test", opt, {"batch_test": "norm"}),
                Variant(f"{name} + aug. inner-product test", opt, {"batch_test": "aip"}),
                Variant(f"{name} + coordinate test", opt, {"batch_test": "coord"}),
                Variant(f"{name}, fixed b={b0}", opt, fixed_small),
                Variant(f"{name}, fixed b={bmax}", opt,
                        {"batch_test": "none", "batch_schedule": "constant",
                         "initial_batch": bmax}),
                Variant(f"{name}, linear ramp", opt,
                        {"batch_test": "none", "batch_schedule": "linear"}),
                Variant(f"{name}, stagewise ramp", opt,
                        {"batch_test": "none", "batch_schedule": "stagewise"}),
            ]
        return out
    if comparison == "adabelief":
        out = []
        for opt, name in (("adabelief", "AdaBelief"), ("adam", "Adam")):
            out += [Variant(f"{name}, fixed b={b0}", opt, fixed_small),
                    Variant(f"{name} + norm test", opt, {"batch_test": "norm"})]
        return out
    raise ValueError(f"unknown comparison {comparison!r}; choose 'batches' or 'adabelief'")


def run_variant(setup: Setup, variant: Variant, seed: int, run_dir: Path,
                epochs: float | None = None) -> dict[str, Any]:
    """Train one variant with :func:`adabatch.train.loop.train`; its summary and curves."""
    from adabatch.train.config import build_config
    from adabatch.train.loop import train

    if run_dir.exists():  # our own output from an earlier reproduce run
        shutil.rmtree(run_dir)
    flags: dict[str, Any] = {
        "dataset": setup.dataset, "model": setup.model, "optimizer": variant.optimizer,
        "data_options": dict(setup.data_options), "model_options": dict(setup.model_options),
        "initial_batch": setup.initial_batch, "max_batch": setup.max_batch,
        "epochs": setup.epochs if epochs is None else epochs, "seed": seed,
        "eval_every": 5, "checkpoint_every": 0, "keep_checkpoints": 1, "plots": False,
        "quiet": True, "out": str(run_dir), "device": "cpu",
    }
    if variant.optimizer in setup.lrs:
        flags["lr"] = setup.lrs[variant.optimizer]
    flags.update(variant.policy)
    cfg = build_config(flags)
    result = train(cfg)
    summary = dict(result.summary)
    evals, steps = [], []
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            row = json.loads(line)
            if row.get("eval"):
                evals.append((row["samples"], row["test_accuracy"]))
            elif "batch_size" in row:
                steps.append((row["samples"], row["batch_size"]))
    return {"summary": summary, "evals": evals, "steps": steps}


_SIZES: dict[str, dict[str, Any]] = {
    "full": {"setups": ("digits-logistic", "digits-cnn", "mnist1d-cnn1d",
                        "synthetic-logistic"), "seeds": (0, 1, 2), "epochs": None,
             "dpi": 100, "batches_subset": None},
    "quick": {"setups": ("digits-logistic",), "seeds": (0,), "epochs": 10.0, "dpi": 70,
              "batches_subset": None},
    "tiny": {"setups": ("digits-logistic",), "seeds": (0,), "epochs": 0.5, "dpi": 40,
             "batches_subset": (0, 3, 7)},
}


def _mean_std(values: list[float], digits: int = 3) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _plot(setup: Setup, comparison: str, results: dict[str, list[dict[str, Any]]], out: Path,
          dpi: int) -> str:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    cmap = plt.get_cmap("tab20")
    for i, (label, runs) in enumerate(results.items()):
        r = runs[0]
        color = cmap(i % 20)
        ls = "-" if ("test" in label) else "--"
        if r["evals"]:
            s, a = zip(*r["evals"])
            axes[0].plot(s, a, color=color, ls=ls, lw=1.1, label=label)
        if r["steps"]:
            s, b = zip(*r["steps"])
            axes[1].step(s, b, where="post", color=color, ls=ls, lw=1.1, label=label)
    axes[0].set_xlabel("samples")
    axes[0].set_ylabel("test accuracy")
    axes[1].set_xlabel("samples")
    axes[1].set_ylabel("batch size")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    axes[1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(f"{setup.label} (seed 0)", fontsize=10)
    return save_figure(fig, out, f"{comparison}_{setup.key}", dpi)


def run(out: Path, *, scale: str = "full", comparison: str = "batches") -> Section:
    """Run ``comparison`` ("batches" or "adabelief") at ``scale``."""
    t0 = time.perf_counter()
    size = _SIZES[scale]
    rows, images = [], []
    data: dict[str, Any] = {"seeds": list(size["seeds"]), "setups": {}}
    for key in size["setups"]:
        setup = SETUPS[key]
        vs = variants(comparison, setup)
        if size["batches_subset"] is not None and comparison == "batches":
            vs = [vs[i] for i in size["batches_subset"]]
        results: dict[str, list[dict[str, Any]]] = {}
        for v_index, v in enumerate(vs):
            results[v.label] = [
                run_variant(setup, v, seed,
                            out / "runs" / comparison / key / f"v{v_index}-seed{seed}",
                            epochs=size["epochs"])
                for seed in size["seeds"]
            ]
            sums = [r["summary"] for r in results[v.label]]
            rows.append([
                setup.label, v.label,
                _mean_std([s["test_accuracy"] for s in sums]),
                fmt(statistics.median([s["steps"] for s in sums])),
                fmt(statistics.median([s["samples"] for s in sums])),
                fmt(statistics.median([s["final_batch_size"] for s in sums])),
                f"{statistics.median([s['wall_time_s'] for s in sums]):.1f}",
            ])
            data["setups"].setdefault(key, {})[v.label] = [
                {k: s[k] for k in ("test_accuracy", "test_loss", "steps", "samples",
                                   "final_batch_size", "wall_time_s")} for s in sums]
        images.append(_plot(setup, comparison, results, out, size["dpi"]))
    epochs = size["epochs"]
    budget = (f"{epochs:g} epochs" if epochs is not None
              else "per setup: " + ", ".join(f"{SETUPS[k].label} {SETUPS[k].epochs:g} epochs"
                                             for k in size["setups"]))
    header = ["setup", "variant", "test accuracy", "steps", "samples", "final batch",
              "wall time (s)"]
    md = [
        f"Same sample budget for every variant of a setup ({budget}); seeds "
        f"{list(size['seeds'])} (accuracy: mean ± std; other columns: median). Trainer "
        f"defaults otherwise (exact per-sample statistics, η = 0.5, θ = 0.9, ν = 5; "
        f"learning rates: the registry's defaults, AdaGrad as listed in "
        f"`adabatch/reproduce/batches.py`).\n",
        markdown_table(header, rows),
        "\n" + "\n".join(f"![{k}]({img})" for k, img in zip(size["setups"], images)) + "\n",
    ]
    title = ("Adaptive batch sizes for AdaGrad-Norm and AdaGrad vs fixed and ramped batches"
             if comparison == "batches" else "AdaBelief and Adam with and without the norm test")
    return Section(name=comparison, title=title, markdown="\n".join(md), images=images,
                   wall_time_s=time.perf_counter() - t0, data=data)
