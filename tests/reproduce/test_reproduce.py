"""Tests of ``adabatch reproduce``: the sections' numerics and the command end to end."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from adabatch.reproduce import main
from adabatch.reproduce.common import fit_loglog_slope, fmt, markdown_table
from adabatch.reproduce.rates import Policy, _full_grad_sq, make_problem, run_policy
from adabatch.reproduce.toy import PROBLEMS, _summary, trajectory

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _problem(key):
    return next(p for p in PROBLEMS if p.key == key)


# ----------------------------------------------------------------------------- common


def test_fit_loglog_slope_recovers_power():
    ks = [1, 2, 5, 10, 50, 100]
    assert fit_loglog_slope(ks, [3.0 * k**-0.5 for k in ks]) == pytest.approx(-0.5)
    assert fit_loglog_slope(ks, [k**-1.0 for k in ks]) == pytest.approx(-1.0)
    # non-positive values are ignored; too few points give NaN
    assert math.isnan(fit_loglog_slope([1, 2], [1.0, 0.0]))


def test_markdown_table_and_fmt():
    table = markdown_table(["a", "b"], [[1, 0.5], ["x", None]])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.5 |", "| x | — |"]
    assert fmt(math.inf) == "inf" and fmt(1.5e-7) == "1.50e-07"
    with pytest.raises(ValueError, match="row has 1 cells, header has 2"):
        markdown_table(["a", "b"], [[1]])


# ----------------------------------------------------------------------------- toy


@pytest.mark.parametrize("name", ["SGD-momentum", "Adam", "AdaBelief"])
def test_toy_trajectories_descend_on_the_quadratic(name):
    problem = _problem("quad_rot")
    traj = trajectory(problem, name, 1e-2, 300)
    assert traj.shape == (301, 2)
    np.testing.assert_array_equal(traj[0], problem.start)
    f0 = problem.fn(*traj[0])
    assert problem.fn(*traj[-1]) < 0.1 * f0


def test_toy_adabelief_is_the_papers_algorithm():
    """Our AdaBelief (rectify off, L2 form, eps 1e-16) against adabelief-pytorch 0.2.1."""
    from adabelief_pytorch import AdaBelief as Reference

    problem = _problem("beale")
    ours = trajectory(problem, "AdaBelief", 1e-2, 50)
    xy = torch.tensor(problem.start, dtype=torch.float64, requires_grad=True)
    opt = Reference([xy], lr=1e-2, betas=(0.9, 0.999), eps=1e-16, rectify=False,
                    weight_decouple=False, print_change_log=False)
    ref = [problem.start]
    for _ in range(50):
        opt.zero_grad()
        problem.fn(xy[0], xy[1]).backward()
        opt.step()
        ref.append(tuple(xy.detach().tolist()))
    np.testing.assert_allclose(ours, np.asarray(ref), rtol=1e-12, atol=1e-12)
    # and AdaBelief differs from Adam on the same problem (the comparison is not vacuous)
    adam = trajectory(problem, "Adam", 1e-2, 50)
    assert np.abs(adam[-1] - ours[-1]).max() > 1e-6


def test_toy_divergence_is_detected_and_reported():
    problem = _problem("rosenbrock")
    traj = trajectory(problem, "SGD-momentum", 1e-1, 100)
    assert len(traj) < 101
    summary = _summary(problem, traj, 100)
    assert summary["diverged"] and summary["final_distance"] == math.inf
    assert not summary["reached"]


def test_toy_rejects_unknown_optimizer():
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        trajectory(_problem("abs"), "lion", 1e-2, 5)


# ----------------------------------------------------------------------------- rates


def test_rates_full_gradient_matches_closed_form():
    problem = make_problem("logistic", n=200)
    torch.manual_seed(0)
    model = problem.make_model()
    w, b = model.weight.detach()[0], model.bias.detach()
    r = torch.sigmoid(problem.X @ w + b) - problem.Y
    grad_w = problem.X.T @ r / problem.n
    grad_b = r.mean()
    expected = float((grad_w**2).sum() + grad_b**2)
    assert _full_grad_sq(problem, model) == pytest.approx(expected, rel=1e-10)


def test_rates_norm_test_grows_the_batch_and_fixed_does_not():
    problem = make_problem("logistic", n=256)
    fixed = run_policy(problem, Policy("fixed", 8), steps=30, seed=0)
    norm = run_policy(problem, Policy("norm", 8, eta=0.5), steps=30, seed=0)
    assert fixed["batch"] == [8] * 30 and fixed["total_samples"] == 240
    assert len(norm["grad_sq"]) == 30
    assert norm["batch"] == sorted(norm["batch"]) and norm["final_batch"] > 8
    assert norm["total_samples"] == sum(norm["batch"])
    # the full gradient goes down under both
    assert min(fixed["grad_sq"]) < fixed["grad_sq"][0]
    assert min(norm["grad_sq"]) < 0.5 * norm["grad_sq"][0]


def test_rates_unknown_problem():
    with pytest.raises(ValueError, match="unknown problem 'svm'"):
        make_problem("svm")


def test_rates_norm_policy_without_eta_is_a_value_error():
    """An explicit check, not an assert (which python -O removes)."""
    problem = make_problem("logistic", n=32)
    with pytest.raises(ValueError, match=r"a 'norm' policy needs eta"):
        run_policy(problem, Policy("norm", 4), steps=1, seed=0)
    with pytest.raises(ValueError, match=r"unknown policy kind 'grow'"):
        run_policy(problem, Policy("grow", 4), steps=1, seed=0)


# ----------------------------------------------------------------------------- command


def test_reproduce_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "res"
    assert main(["--tiny", "--out", str(out)]) == 0
    report = (out / "results.md").read_text()
    assert report.startswith("# Reproduction results")
    assert "Sections not in this run" not in report
    assert f"| {torch.__version__} |" in report
    for name in ("toy", "rates", "batches", "adabelief"):
        assert (out / f"{name}.md").is_file()
        data = json.loads((out / f"{name}.json").read_text())
        assert data["wall_time_s"] > 0
        assert re.search(rf"^\| {name} \| \d+\.\d \|$", report, re.M)
    images = re.findall(r"!\[[^\]]*\]\((img/[^)]+\.png)\)", report)
    assert len(images) == len(PROBLEMS) + 2 + 1 + 1
    for rel in images:
        assert (out / rel).read_bytes()[:8] == PNG_MAGIC
    assert "Beale from (-2.5, -2.5)" in report
    assert "slope vs K" in report
    assert "SGD with momentum alone at smaller learning rates" in report
    # the training comparisons: every variant got the same sample budget (the last step may
    # overshoot by less than one batch) and the trainer's run directories are kept
    budget = math.ceil(0.5 * 1438)  # --tiny: half an epoch of digits' training split
    for name, n_variants in (("batches", 3), ("adabelief", 4)):
        runs = json.loads((out / f"{name}.json").read_text())["data"]["setups"]
        rows = runs["digits-logistic"]
        assert len(rows) == n_variants
        for (seed_run,) in rows.values():
            assert budget <= seed_run["samples"] < budget + seed_run["final_batch_size"]
            assert 0.0 <= seed_run["test_accuracy"] <= 1.0
        assert len(list((out / "runs" / name / "digits-logistic").glob("*/summary.json"))) \
            == n_variants


def test_reproduce_only_runs_the_named_section(tmp_path):
    out = tmp_path / "res"
    assert main(["--tiny", "--only", "toy", "--out", str(out)]) == 0
    assert (out / "toy.md").is_file() and not (out / "rates.md").exists()
    assert not (out / "runs").exists()
    report = (out / "results.md").read_text()
    assert "## Convergence rate" not in report
    assert "Sections not in this run: rates, batches, adabelief" in report


def test_reproduce_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--only", "toy,nope", "--out", str(tmp_path)])
    assert exc.value.code == 2
    assert "unknown section(s) ['nope']" in capsys.readouterr().err
    a_file = tmp_path / "f"
    a_file.write_text("x")
    assert main(["--tiny", "--out", str(a_file)]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert a_file.read_text() == "x"


def test_batches_variants_and_errors():
    from adabatch.reproduce.batches import SETUPS, variants

    setup = SETUPS["digits-logistic"]
    vs = variants("batches", setup)
    assert len(vs) == 14 and {v.optimizer for v in vs} == {"adagradnorm", "adagrad"}
    assert {v.policy.get("batch_test") for v in vs} == {"norm", "aip", "coord", "none"}
    assert {v.policy.get("batch_schedule") for v in vs} == {None, "constant", "linear",
                                                           "stagewise"}
    large = [v for v in vs if v.policy.get("initial_batch") == setup.max_batch]
    assert len(large) == 2
    ab = variants("adabelief", setup)
    assert [v.optimizer for v in ab] == ["adabelief", "adabelief", "adam", "adam"]
    with pytest.raises(ValueError, match="unknown comparison 'foo'"):
        variants("foo", setup)


def test_section_round_trip_and_report(tmp_path):
    from adabatch.reproduce.common import Section
    from adabatch.reproduce.report import load_section, write_report, write_section

    section = Section("toy", "A title", "body | with table\n", ["img/a.png"], 1.5,
                      {"rows": [{"x": 1.5}]})
    write_section(tmp_path, section)
    back = load_section(tmp_path, "toy")
    assert back == section
    (tmp_path / "toy.md").write_text("## Another title\n\nbody\n")
    with pytest.raises(ValueError, match="does not start with its heading"):
        load_section(tmp_path, "toy")
    info = {"platform": "P", "processor": "x", "python": "3", "cpu_count": 2, "torch": "T",
            "torch_threads": 1, "date_utc": "D"}
    path = write_report(tmp_path, [section], scale="full", command="cmd", info=info,
                        skipped=["rates"])
    text = path.read_text()
    assert "| P | x | 2 | 3 | T | 1 | D |" in text
    assert "| toy | 1.5 |" in text and "| total | 1.5 |" in text
    assert "Sections not in this run: rates" in text
    assert text.rstrip().endswith("body | with table")


def test_hand_written_reading_survives_regeneration(tmp_path):
    """Issue #18 point 4: the hand-written reading lives in out/reading/*.md, which every
    regenerated results.md ends with, in file-name order."""
    from adabatch.reproduce.common import Section
    from adabatch.reproduce.report import READING_DIR, write_report

    section = Section("toy", "A title", "numbers\n", [], 1.0, {})
    info = {"platform": "P", "processor": "x", "python": "3", "cpu_count": 2, "torch": "T",
            "torch_threads": 1, "date_utc": "D"}
    (tmp_path / READING_DIR).mkdir()
    (tmp_path / READING_DIR / "20-later.md").write_text("## Later\n\nsecond\n")
    (tmp_path / READING_DIR / "10-reading.md").write_text("## Reading\n\nfirst\n")
    for _ in range(2):  # regenerated: still there, once
        text = write_report(tmp_path, [section], scale="full", command="cmd",
                            info=info).read_text()
        assert text.count("## Reading") == 1
        assert text.index("numbers") < text.index("## Reading") < text.index("## Later")
        assert text.rstrip().endswith("second")


def test_the_docs_page_ends_with_its_reading_sources():
    """docs/results.md is what the report writer makes of its sections plus docs/reading."""
    from pathlib import Path

    docs = Path(__file__).resolve().parents[2] / "docs"
    page = (docs / "results.md").read_text()
    tail = "\n\n".join(p.read_text().rstrip() for p in sorted(
        (docs / "reading").glob("*.md")))
    assert tail and page.rstrip().endswith(tail)
