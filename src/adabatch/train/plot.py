"""Figures and tables from run directories (``adabatch plot`` and ``adabatch compare``).

A run directory holds ``config.json`` (the effective configuration), ``metrics.jsonl`` (one JSON
object per line: step rows with ``step``, ``samples``, ``batch_size``, ``loss``, ... and eval
rows with ``"eval": true``, ``step``, ``samples``, ``test_loss``, ``test_accuracy``) and, once the
run has finished, ``summary.json``.

* :func:`load_run` reads one run directory.
* :func:`plot_runs` writes PNG figures overlaying the runs (matplotlib's Agg canvas, no pyplot
  and no global backend change): loss against samples and against steps, test accuracy against
  samples and against steps, batch size against samples, and for adaptive runs the test's
  statistic against its threshold with the batch size, the required size and the noise-scale
  estimate (``statistics_vs_samples.png``: why the batch moved).
* :func:`compare_table` renders the runs' summaries as a markdown table.

A missing or malformed file raises ``ValueError`` naming the file. A last line of
``metrics.jsonl`` cut short by a killed run (no final newline, not valid JSON) is skipped with a
warning.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["compare_table", "load_run", "plot_runs", "run_labels"]

STEP_KEYS = ("step", "samples", "batch_size", "loss")
EVAL_KEYS = ("step", "samples", "test_loss", "test_accuracy")
SUMMARY_COLUMNS = (
    "test_accuracy",
    "test_loss",
    "steps",
    "samples",
    "initial_batch_size",
    "final_batch_size",
    "wall_time_s",
)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def _is_number(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    if not path.is_file():
        raise ValueError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from e
    lines = text.split("\n")
    steps: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):  # the last line has no newline: a write cut short
                warnings.warn(
                    f"{path}:{i}: skipping an incomplete last line", RuntimeWarning, stacklevel=3
                )
                break
            raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{i}: expected a JSON object, found {type(row).__name__}")
        keys = EVAL_KEYS if row.get("eval") else STEP_KEYS
        missing = [k for k in keys if k not in row]
        if row.get("eval"):
            # a regression run has no accuracy: only step, samples, test_loss are required
            missing = [k for k in missing if k != "test_accuracy"]
        if missing:
            kind = "eval" if row.get("eval") else "step"
            raise ValueError(f"{path}:{i}: {kind} row is missing {', '.join(missing)}")
        bad = [k for k in keys if k in row and not _is_number(row[k])]
        if bad:
            raise ValueError(f"{path}:{i}: non-numeric value for {', '.join(bad)}")
        (evals if row.get("eval") else steps).append(row)
    return steps, evals


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """Read a run directory.

    Returns ``{"dir": Path, "name": str, "config": dict, "summary": dict | None,
    "steps": [step rows], "evals": [eval rows]}``. ``metrics.jsonl`` is required; ``config.json``
    is required unless ``summary.json`` carries the config; ``summary.json`` is optional (a run
    still in progress has none) but must be valid when present.
    """
    d = Path(run_dir)
    if not d.is_dir():
        raise ValueError(f"{d}: not a run directory (not found)")
    summary = _read_json(d / "summary.json") if (d / "summary.json").exists() else None
    if (
        (d / "config.json").exists()
        or summary is None
        or not isinstance(summary.get("config"), dict)
    ):
        config = _read_json(d / "config.json")
    else:
        config = summary["config"]
    steps, evals = _read_metrics(d / "metrics.jsonl")
    return {
        "dir": d,
        "name": d.resolve().name or str(d),
        "config": config,
        "summary": summary,
        "steps": steps,
        "evals": evals,
    }


def run_labels(runs: Sequence[dict[str, Any]]) -> list[str]:
    """A label per run: its directory name, with parent folders added while names clash."""
    parts = [run["dir"].resolve().parts for run in runs]
    depth = 1
    while True:
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels) or depth >= max(len(p) for p in parts):
            break
        depth += 1
    # identical paths given twice: number them
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label} ({seen[label]})")
    return out


def _finite(rows: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        vx, vy = r.get(x), r.get(y)
        if _is_number(vx) and _is_number(vy) and vx is not None and vy is not None:
            if math.isfinite(vx) and math.isfinite(vy):
                xs.append(float(vx))
                ys.append(float(vy))
    return xs, ys


def _axes(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Any]:
    """A new figure with one gridded axes (matplotlib is imported here, on first use)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig: Figure, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=120, bbox_inches="tight")
    return path


_Series = Sequence[tuple[dict[str, Any], str, str]]  # (run, label, color)


def _loss_figure(series: _Series, xkey: str, xlabel: str) -> Figure:
    """Training loss as lines, test loss dashed with markers; log scale when all are > 0."""
    fig, ax = _axes(f"loss vs {xlabel}", xlabel, "loss")
    positive = True
    for run, label, color in series:
        xs, ys = _finite(run["steps"], xkey, "loss")
        ax.plot(xs, ys, color=color, linewidth=1.0, alpha=0.85, label=f"{label} (train)")
        ex, ey = _finite(run["evals"], xkey, "test_loss")
        if ex:
            ax.plot(ex, ey, color=color, linestyle="--", marker="o", markersize=3,
                    label=f"{label} (test)")
        positive = positive and all(v > 0 for v in ys + ey)
    if positive and ax.has_data():
        ax.set_yscale("log")
    if ax.has_data():
        ax.legend(fontsize="small")
    return fig


def _accuracy_figure(series: _Series, xkey: str, xlabel: str) -> Figure:
    fig, ax = _axes(f"test accuracy vs {xlabel}", xlabel, "test accuracy")
    for run, label, color in series:
        xs, ys = _finite(run["evals"], xkey, "test_accuracy")
        if xs:
            ax.plot(xs, ys, color=color, marker="o", markersize=3, label=label)
    ax.legend(fontsize="small")
    return fig


def _batch_size_figure(series: _Series) -> Figure:
    from matplotlib.ticker import ScalarFormatter

    fig, ax = _axes("batch size vs samples", "samples", "batch size")
    for run, label, color in series:
        xs, ys = _finite(run["steps"], "samples", "batch_size")
        ax.step(xs, ys, where="post", color=color, label=label)
    if ax.has_data():
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.legend(fontsize="small")
    return fig


def _has_statistics(run: dict[str, Any]) -> bool:
    return bool(_finite(run["steps"], "samples", "statistic")[0]
                or _finite(run["steps"], "samples", "b_noise")[0])


def _statistics_figure(series: _Series) -> Figure:
    """Top: each test step's statistic (required / b; the step passes at or below the
    threshold 1). Bottom: the batch size, the test's required size and the noise-scale
    estimate b_noise = V/(‖ḡ‖² − V/b), on one log axis."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 7))
    top, bottom = fig.subplots(2, 1, sharex=True)
    top.set_title("batch test: statistic vs threshold")
    top.set_ylabel("statistic = required / batch size")
    top.axhline(1.0, color="k", linestyle="--", linewidth=1.0, label="threshold (passes <= 1)")
    bottom.set_xlabel("samples")
    bottom.set_ylabel("samples per step")
    for run, label, color in series:
        xs, ys = _finite(run["steps"], "samples", "statistic")
        top.plot(xs, ys, color=color, marker=".", markersize=3, linewidth=0.8, label=label)
        xs, ys = _finite(run["steps"], "samples", "batch_size")
        bottom.step(xs, ys, where="post", color=color, label=f"{label} batch size")
        for key, style in (("required", ":"), ("b_noise", "-.")):
            xs, ys = _finite(run["steps"], "samples", key)
            if xs:
                bottom.plot(xs, ys, color=color, linestyle=style, linewidth=0.8,
                            label=f"{label} {key}")
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
        if ax.has_data() and all(v > 0 for line in ax.get_lines() for v in line.get_ydata()):
            ax.set_yscale("log")
        ax.legend(fontsize="small")
    return fig


def plot_runs(
    run_dirs: Sequence[str | Path], out_dir: str | Path, *, labels: Sequence[str] | None = None
) -> list[Path]:
    """Write PNG figures overlaying the runs into ``out_dir``; return their paths.

    Figures: ``loss_vs_samples.png`` and ``loss_vs_steps.png`` (training loss as lines, test loss
    as dashed lines with markers), ``accuracy_vs_samples.png`` and ``accuracy_vs_steps.png``
    (test accuracy; written when some run has eval rows with an accuracy) and
    ``batch_size_vs_samples.png``; ``statistics_vs_samples.png`` when some run logged test
    statistics (see :func:`_statistics_figure`). Runs are labelled by ``labels`` or their
    directory names.
    """
    if not run_dirs:
        raise ValueError("plot_runs needs at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    if labels is None:
        labels = run_labels(runs)
    elif len(labels) != len(runs):
        raise ValueError(f"got {len(labels)} labels for {len(runs)} runs")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    series = list(zip(runs, labels, [f"C{i % 10}" for i in range(len(runs))]))
    axes = (("samples", "samples"), ("step", "steps"))
    written = [_save(_loss_figure(series, xkey, xlabel), out / f"loss_vs_{xlabel}.png")
               for xkey, xlabel in axes]
    if any(_finite(run["evals"], "samples", "test_accuracy")[0] for run in runs):
        written += [_save(_accuracy_figure(series, xkey, xlabel), out / f"accuracy_vs_{xlabel}.png")
                    for xkey, xlabel in axes]
    written.append(_save(_batch_size_figure(series), out / "batch_size_vs_samples.png"))
    with_stats = [item for item in series if _has_statistics(item[0])]
    if with_stats:
        written.append(_save(_statistics_figure(with_stats), out / "statistics_vs_samples.png"))
    return written


def _lookup(config: dict[str, Any], *names: str) -> Any:
    """The first of ``names`` in the config, also looking one level into nested sections."""
    for name in names:
        for key in (name, name.replace("_", "-")):
            if key in config:
                return config[key]
    for value in config.values():
        if isinstance(value, dict):
            found = _lookup(value, *names)
            if found is not None:
                return found
    return None


def _optimizer_text(config: dict[str, Any]) -> str:
    opt = _lookup(config, "optimizer")
    if isinstance(opt, dict):
        opt = opt.get("name")
    lr = _lookup(config, "lr", "learning_rate")
    text = str(opt) if opt is not None else "?"
    if _is_number(lr) and lr is not None:
        text += f" (lr={lr:g})"
    return text


def _batch_policy_text(config: dict[str, Any]) -> str:
    test = _lookup(config, "batch_test")
    if isinstance(test, dict):
        test = test.get("name")
    if test is not None and str(test).lower() not in ("none", ""):
        params = []
        wanted = {"norm": ("eta",), "coord": ("eta",), "ip": ("theta",), "aip": ("theta", "nu"),
                  "critical": ("kappa",), "goodput": ("kappa",)}
        for p in wanted.get(str(test).lower(), ("eta", "theta", "nu")):
            v = _lookup(config, p)
            if _is_number(v) and v is not None:
                params.append(f"{p}={v:g}")
        return f"{test} ({', '.join(params)})" if params else str(test)
    schedule = _lookup(config, "batch_schedule")
    if isinstance(schedule, dict):
        schedule = schedule.get("name")
    return str(schedule) if schedule is not None else "constant"


def _cell(value: Any, key: str) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if key == "test_accuracy":
            return f"{value:.4f}"
        if key == "wall_time_s":
            return f"{value:.1f}"
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def compare_table(run_dirs: Sequence[str | Path]) -> str:
    """A markdown table of the runs' summaries, one row per run.

    Columns: run, optimizer (with lr), batch policy (test with its parameters, or the fixed
    schedule), then ``test_accuracy``, ``test_loss``, ``steps``, ``samples``,
    ``initial_batch_size``, ``final_batch_size``, ``wall_time_s`` from ``summary.json`` (which
    every run must have).
    """
    if not run_dirs:
        raise ValueError("compare_table needs at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    for run in runs:
        if run["summary"] is None:
            raise ValueError(
                f"{run['dir'] / 'summary.json'}: file not found (has the run finished?)"
            )
    labels = run_labels(runs)
    header = ["run", "optimizer", "batch policy", *SUMMARY_COLUMNS]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 3 + ["---:"] * len(SUMMARY_COLUMNS)) + "|",
    ]
    for run, label in zip(runs, labels):
        summary = run["summary"]
        config = run["config"] if run["config"] else summary.get("config") or {}
        cells = [
            label.replace("|", "\\|"),
            _optimizer_text(config).replace("|", "\\|"),
            _batch_policy_text(config).replace("|", "\\|"),
        ]
        cells += [_cell(summary.get(k), k) for k in SUMMARY_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
