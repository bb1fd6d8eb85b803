"""`adabatch train --compile` end to end: one graph while the batch grows, the decisions of
the uncompiled run, and the combinations that would split the graph refused with the recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adabatch.cli import main
from tests.batching.test_estimators_compile import CompileEvents

# aot_eager: the compiled forward and backward without inductor's code generation, whose C++
# build would dominate these tiny runs (the graph is the same)
BASE = ["--quiet", "--no-plots", "--threads", "1", "--estimator", "micro-batch",
        "--micro-batch", "8", "--epochs", "3"]
COMPILE = ["--compile", "--compile-backend", "aot_eager"]


def _steps(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if not r.get("eval")]


@pytest.mark.slow
def test_compiled_digits_mlp_keeps_one_graph_and_the_same_decisions(tmp_path):
    with CompileEvents() as events:
        assert main(["train", *BASE, *COMPILE, "--out", str(tmp_path / "c")]) == 0
    assert main(["train", *BASE, "--out", str(tmp_path / "e")]) == 0
    compiled, eager = _steps(tmp_path / "c"), _steps(tmp_path / "e")
    sizes = [r["batch_size"] for r in compiled]
    assert sizes == [r["batch_size"] for r in eager]
    assert sizes[0] == 16 and sizes[-1] > 16  # the batch grew while the graph stayed
    for a, b in zip(compiled, eager):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
    assert events.graphs <= 2 and events.recompiles <= 2, (events.graphs, events.recompiles)
    assert events.breaks == 0
    saved = json.loads((tmp_path / "c" / "config.json").read_text())
    assert saved["compile"] is True and saved["compile_backend"] == "aot_eager"


def test_resume_may_turn_compile_on(tmp_path):
    run = tmp_path / "run"
    args = ["--quiet", "--no-plots", "--threads", "1", "--estimator", "micro-batch",
            "--micro-batch", "8"]
    assert main(["train", *args, "--steps", "2", "--out", str(run)]) == 0
    assert main(["train", "--resume", str(run), "--steps", "4", *COMPILE]) == 0
    assert len(_steps(run)) == 4


@pytest.mark.parametrize("args, words", [
    ([], ("--estimator per-sample", "split", "--micro-batch", "--estimator micro-batch")),
    (["--batch-test", "none", "--batch-schedule", "linear"],
     ("batch size changes", "recompiles", "--micro-batch")),
    (["--estimator", "micro-batch", "--compile-backend", "no-such-backend"],
     ("--compile-backend 'no-such-backend'", "not a torch.compile backend", "aot_eager")),
])
def test_combinations_that_would_recompile_exit_2_with_the_recipe(tmp_path, capsys, args,
                                                                  words):
    out = tmp_path / "run"
    assert main(["train", "--quiet", "--steps", "1", "--out", str(out), "--compile",
                 *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    for w in words:
        assert w in err, (w, err)


def test_a_constant_batch_compiles_without_micro_batches(tmp_path):
    with CompileEvents() as events:
        assert main(["train", "--quiet", "--no-plots", "--threads", "1", "--batch-test",
                     "none", "--steps", "3", "--out", str(tmp_path / "run"), *COMPILE]) == 0
    assert events.graphs == 1 and events.recompiles == 0 and events.breaks == 0


def test_help_describes_compile(capsys):
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--compile" in text and "--compile-backend" in text
    assert "one graph while the batch grows" in text
