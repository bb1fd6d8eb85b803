"""Plots and the compare table from fake run directories in the loop's format."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from adabatch.train.plot import compare_table, load_run, plot_runs, run_labels

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(
    d: Path,
    *,
    optimizer="adagradnorm",
    batch_test="norm",
    eta=0.1,
    steps=12,
    accuracy=True,
    summary=True,
    b0=4,
):
    d.mkdir(parents=True)
    config = {
        "dataset": "digits",
        "model": "cnn",
        "optimizer": optimizer,
        "lr": 0.05,
        "batch_test": batch_test,
        "eta": eta,
        "theta": 0.9,
        "nu": 1.0,
        "batch_schedule": "constant",
    }
    (d / "config.json").write_text(json.dumps(config))
    rows, samples, b = [], 0, b0
    for step in range(1, steps + 1):
        samples += b
        rows.append(
            {
                "step": step,
                "samples": samples,
                "batch_size": b,
                "loss": 2.0 / step,
                "lr": 0.05,
                "statistic": 1.5,
                "required": b * 2,
                "passed": False,
                "time": 0.01 * step,
            }
        )
        if step % 4 == 0:
            ev = {"eval": True, "step": step, "samples": samples, "test_loss": 1.5 / step}
            if accuracy:
                ev["test_accuracy"] = 0.5 + 0.03 * step
            elif step == 4:
                ev["test_accuracy"] = None  # the loop writes null for regression
            rows.append(ev)
            b *= 2
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if summary:
        s = {
            "test_accuracy": 0.86 if accuracy else None,
            "test_loss": 0.125,
            "steps": steps,
            "samples": samples,
            "initial_batch_size": b0,
            "final_batch_size": b // 2,
            "wall_time_s": 3.25,
            "config": config,
        }
        (d / "summary.json").write_text(json.dumps(s))
    return d


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_load_run(tmp_path):
    d = _write_run(tmp_path / "run-a")
    run = load_run(d)
    assert run["name"] == "run-a" and run["config"]["optimizer"] == "adagradnorm"
    assert len(run["steps"]) == 12 and len(run["evals"]) == 3
    assert run["steps"][0]["batch_size"] == 4 and run["evals"][-1]["step"] == 12
    assert run["summary"]["final_batch_size"] == 16


def test_plot_runs_writes_pngs(tmp_path):
    a = _write_run(tmp_path / "a")
    b = _write_run(tmp_path / "b", optimizer="adagrad", batch_test="coord", b0=8)
    out = tmp_path / "plots"
    paths = plot_runs([a, str(b)], out)
    names = sorted(p.name for p in paths)
    assert names == [
        "accuracy_vs_samples.png",
        "accuracy_vs_steps.png",
        "batch_size_vs_samples.png",
        "loss_vs_samples.png",
        "loss_vs_steps.png",
        "statistics_vs_samples.png",
    ]
    for p in paths:
        assert p.parent == out and p.is_file()
        w, h = _png_size(p)
        assert w > 200 and h > 200


def test_plot_regression_runs_skip_accuracy(tmp_path):
    a = _write_run(tmp_path / "reg", accuracy=False, summary=False)
    paths = plot_runs([a], tmp_path / "out")
    assert sorted(p.name for p in paths) == [
        "batch_size_vs_samples.png",
        "loss_vs_samples.png",
        "loss_vs_steps.png",
        "statistics_vs_samples.png",
    ]
    for p in paths:
        _png_size(p)


def test_compare_table(tmp_path):
    a = _write_run(tmp_path / "ada", steps=12)
    b = _write_run(tmp_path / "fixed", optimizer="sgd", batch_test="none", steps=8)
    table = compare_table([a, b])
    lines = table.strip().split("\n")
    assert len(lines) == 4
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header == [
        "run",
        "optimizer",
        "batch policy",
        "test_accuracy",
        "test_loss",
        "steps",
        "samples",
        "initial_batch_size",
        "final_batch_size",
        "wall_time_s",
    ]
    assert set(lines[1]) <= set("|-:")
    row_a = [c.strip() for c in lines[2].strip("|").split("|")]
    row_b = [c.strip() for c in lines[3].strip("|").split("|")]
    assert row_a == [
        "ada",
        "adagradnorm (lr=0.05)",
        "norm (eta=0.1)",
        "0.8600",
        "0.125",
        "12",
        str(4 * 4 + 8 * 4 + 16 * 4),
        "4",
        "16",
        "3.2",
    ]
    assert row_b[:3] == ["fixed", "sgd (lr=0.05)", "constant"]
    assert row_b[5] == "8"


def test_labels_disambiguate_same_names(tmp_path):
    a = _write_run(tmp_path / "x" / "run")
    b = _write_run(tmp_path / "y" / "run")
    assert run_labels([load_run(a), load_run(b)]) == ["x/run", "y/run"]
    table = compare_table([a, b])
    assert "| x/run |" in table and "| y/run |" in table


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ValueError, match="not a run directory"):
        load_run(tmp_path / "nope")
    d = _write_run(tmp_path / "r")
    (d / "metrics.jsonl").unlink()
    with pytest.raises(ValueError, match=r"r/metrics.jsonl: file not found"):
        load_run(d)
    (d / "metrics.jsonl").write_text(
        '{"step": 1, "samples": 4, "batch_size": 4, "loss": 1}\n{bad\n'
    )
    with pytest.raises(ValueError, match=r"r/metrics.jsonl:2: not valid JSON"):
        load_run(d)
    (d / "metrics.jsonl").write_text('{"step": 1, "samples": 4, "loss": 1}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: step row is missing batch_size"):
        load_run(d)
    (d / "metrics.jsonl").write_text('{"eval": true, "step": 1, "samples": 4}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: eval row is missing test_loss"):
        load_run(d)
    (d / "metrics.jsonl").write_text('{"step": 1, "samples": 4, "batch_size": "4", "loss": 1}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: non-numeric value for batch_size"):
        load_run(d)
    (d / "metrics.jsonl").write_text("[1, 2]\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: expected a JSON object, found list"):
        load_run(d)
    (d / "metrics.jsonl").write_text('{"step": 1, "samples": 4, "batch_size": 4, "loss": 1}\n')
    (d / "summary.json").write_text("{truncated")
    with pytest.raises(ValueError, match=r"r/summary.json: not valid JSON"):
        load_run(d)
    (d / "summary.json").unlink()
    (d / "config.json").write_text("[]")
    with pytest.raises(ValueError, match=r"r/config.json: expected a JSON object, found list"):
        load_run(d)
    (d / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"r/summary.json: file not found \(has the run finished"):
        compare_table([d])
    (d / "config.json").unlink()
    with pytest.raises(ValueError, match=r"r/config.json: file not found"):
        load_run(d)
    with pytest.raises(ValueError, match="at least one run directory"):
        compare_table([])
    with pytest.raises(ValueError, match="at least one run directory"):
        plot_runs([], tmp_path / "o")


def test_incomplete_last_line_is_skipped_with_warning(tmp_path):
    d = _write_run(tmp_path / "killed", summary=False)
    with open(d / "metrics.jsonl", "a") as f:
        f.write('{"step": 13, "samples": 9')
    with pytest.warns(RuntimeWarning, match=r"metrics.jsonl:\d+: skipping an incomplete last line"):
        run = load_run(d)
    assert len(run["steps"]) == 12


def test_config_from_summary_when_config_json_missing(tmp_path):
    d = _write_run(tmp_path / "s")
    (d / "config.json").unlink()
    assert load_run(d)["config"]["optimizer"] == "adagradnorm"
    assert "adagradnorm (lr=0.05)" in compare_table([d])


def test_statistics_figure_draws_the_threshold_and_the_noise_scale(tmp_path):
    """#18 item 5: the test's statistic against its threshold, with b, required and b_noise;
    a run without test statistics (a fixed schedule) gets no such figure."""
    from adabatch.train.plot import _statistics_figure

    a = _write_run(tmp_path / "a")
    rows = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        if not r.get("eval"):
            r.update(grad_sq_norm=2.0, variance_trace=8.0, b_noise=3.0 * r["batch_size"])
    (a / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fig = _statistics_figure([(load_run(a), "a", "C0")])
    top, bottom = fig.axes
    threshold = [ln for ln in top.get_lines() if ln.get_label().startswith("threshold")]
    assert len(threshold) == 1 and list(threshold[0].get_ydata()) == [1.0, 1.0]
    labels = {ln.get_label() for ln in bottom.get_lines()}
    assert {"a batch size", "a required", "a b_noise"} <= labels
    b_noise = next(ln for ln in bottom.get_lines() if ln.get_label() == "a b_noise")
    assert list(b_noise.get_ydata())[:2] == [12.0, 12.0]

    fixed = _write_run(tmp_path / "fixed", batch_test="none")
    rows = [json.loads(x) for x in (fixed / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        if not r.get("eval"):
            r.update(statistic=None, required=None, passed=None)
    (fixed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    names = [p.name for p in plot_runs([fixed], tmp_path / "out")]
    assert "statistics_vs_samples.png" not in names


def test_compare_table_names_kappa_for_the_noise_scale_policies(tmp_path):
    a = _write_run(tmp_path / "crit", batch_test="critical")
    config = json.loads((a / "config.json").read_text())
    (a / "config.json").write_text(json.dumps({**config, "kappa": 2.0}))
    table = compare_table([a])
    assert "critical (kappa=2)" in table and "eta=" not in table
