"""`adabatch train | plot | compare` end to end, in-process on tiny budgets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adabatch.cli import main

TINY = ["--steps", "2", "--quiet", "--no-plots", "--threads", "1"]


def _run(tmp_path: Path, *args: str, name: str = "run") -> tuple[Path, dict]:
    out = tmp_path / name
    assert main(["train", *TINY, "--out", str(out), *args]) == 0
    return out, json.loads((out / "summary.json").read_text())


def _steps(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if not r.get("eval")]


def test_default_run(tmp_path, monkeypatch, capsys):
    """`adabatch train` with no arguments: AdAdaGradNorm on digits, >= 0.85 test accuracy,
    a growing batch size, a summary and where the outputs and plots are."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--threads", "1"]) == 0
    (run,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.85
    assert summary["final_batch_size"] > summary["initial_batch_size"]
    assert summary["config"]["optimizer"] == "adagradnorm"
    assert summary["config"]["batch_test"] == "norm"
    assert summary["config"]["dataset"] == "digits" and summary["config"]["model"] == "mlp"
    out = capsys.readouterr().out
    assert f"test accuracy {summary['test_accuracy']:.4f}" in out
    assert f"outputs: {Path('runs') / run.name}/" in out
    assert "plots: " in out and list((run / "plots").glob("*.png"))
    for name in ("config.json", "metrics.jsonl", "summary.json", "final.pt"):
        assert (run / name).is_file()
    assert list((run / "checkpoints").glob("step_*.pt"))
    config = json.loads((run / "config.json").read_text())
    assert config == summary["config"]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    step_keys = {"step", "samples", "batch_size", "loss", "lr", "statistic", "required",
                 "passed", "time"}
    # a norm-test step also logs the raw statistics it read (#18 item 5)
    assert set(rows[0]) == step_keys | {"grad_sq_norm", "variance_trace", "b_noise"}
    assert set(rows[-1]) == {"eval", "step", "samples", "test_loss", "test_accuracy", "time"}
    assert rows[-1]["test_accuracy"] == summary["test_accuracy"]


@pytest.mark.parametrize("test", ["none", "norm", "ip", "aip", "coord"])
def test_every_batch_test(tmp_path, test):
    run, summary = _run(tmp_path, "--batch-test", test, "--eta", "0.3", "--theta", "0.3",
                        "--nu", "0.5", "--initial-batch", "8", "--max-batch", "32")
    rows = _steps(run)
    assert len(rows) == 2 and summary["config"]["batch_test"] == test
    if test == "none":
        assert all(r["required"] is None for r in rows)
        assert summary["final_batch_size"] == 8
    else:
        assert rows[0]["required"] is not None
        assert rows[0]["passed"] == (rows[0]["required"] <= 8)


@pytest.mark.parametrize(("schedule", "sizes"), [("constant", [8, 8, 8]),
                                                 ("linear", [8, 12, 16]),
                                                 ("stagewise", [8, 16, 32])])
def test_fixed_schedules(tmp_path, schedule, sizes):
    run, _ = _run(tmp_path, "--batch-test", "none", "--batch-schedule", schedule,
                  "--initial-batch", "8", "--max-batch", "32", "--micro-batch", "4",
                  "--ramp-increment", "4", "--stage-samples", "8", "--steps", "3")
    assert [r["batch_size"] for r in _steps(run)] == sizes


@pytest.mark.parametrize("estimator", ["per-sample", "micro-batch"])
def test_both_estimators_with_accumulation(tmp_path, estimator):
    run, summary = _run(tmp_path, "--estimator", estimator, "--micro-batch", "4",
                        "--initial-batch", "8", "--max-batch", "64", "--eta", "0.2",
                        "--steps", "3")
    rows = _steps(run)
    assert rows[0]["required"] is not None
    assert summary["final_batch_size"] > 8 and summary["final_batch_size"] % 4 == 0


def test_config_files_toml_and_yaml_flags_override(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('optimizer = "adabelief"\nlr = 0.003\nbatch-test = "ip"\ntheta = 0.5\n'
                    'initial_batch = 8\nmax_batch = 16\nsteps = 5\n')
    yaml = tmp_path / "c.yaml"
    yaml.write_text("optimizer: adabelief\nlr: 0.003\nbatch_test: ip\ntheta: 0.5\n"
                    "initial-batch: 8\nmax_batch: 16\nsteps: 5\n")
    for path in (toml, yaml):
        out = tmp_path / path.suffix[1:]
        assert main(["train", "--config", str(path), "--lr", "0.01", "--quiet", "--no-plots",
                     "--out", str(out)]) == 0
        config = json.loads((out / "config.json").read_text())
        assert config["optimizer"] == "adabelief" and config["batch_test"] == "ip"
        assert config["theta"] == 0.5 and config["initial_batch"] == 8
        assert config["lr"] == 0.01  # the flag wins over the file
        assert config["config"] == str(path)
        assert len(_steps(out)) == 5
        assert _steps(out)[0]["lr"] == pytest.approx(0.01)


@pytest.mark.parametrize(("preset", "optimizer", "test"), [("adadagrad", "adagrad", "coord"),
                                                          ("adadagradnorm", "adagradnorm",
                                                           "norm")])
def test_presets(tmp_path, preset, optimizer, test):
    run, summary = _run(tmp_path, "--preset", preset)
    assert (summary["config"]["optimizer"], summary["config"]["batch_test"]) == (optimizer, test)
    assert _steps(run)[0]["required"] is not None


def test_optimizer_hyperparameter_flags(tmp_path):
    _, summary = _run(tmp_path, "--optimizer", "adabelief", "--lr", "0.002", "--betas", "0.8",
                      "0.95", "--eps", "1e-12", "--weight-decay", "0.01")
    c = summary["config"]
    assert (c["lr"], c["betas"], c["eps"], c["weight_decay"]) == (0.002, [0.8, 0.95], 1e-12,
                                                                  0.01)
    _, summary = _run(tmp_path, "--optimizer", "momentum", "--momentum", "0.5",
                      "--opt-option", "nesterov=true", name="m")
    assert summary["config"]["optimizer_options"] == {"nesterov": True}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--estimator", "per-sample", "--model", "resnet18", "--norm", "batch"],
         "--estimator per-sample cannot measure model 'resnet18' with BatchNorm"),
        (["--max-batch", "8", "--initial-batch", "16"],
         "--max-batch (8) must be >= --initial-batch (16)"),
        (["--micro-batch", "5"], "--initial-batch (16) must be a multiple of --micro-batch (5)"),
        (["--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["--dataset", "mnist", "--data-dir", "/nonexistent/dir"],
         "--data-dir: directory not found: /nonexistent/dir"),
        (["--epochs", "1", "--steps", "3"], "give the budget once: --epochs and --steps"),
        (["--batch-test", "fancy"], "argument --batch-test: invalid choice: 'fancy'"),
        (["--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
        (["--optimizer", "sgd", "--b0", "0.1"], "optimizer 'sgd' does not take --b0"),
        (["--batch-test", "norm", "--batch-schedule", "linear"], "are exclusive"),
        (["--config", "/nonexistent/c.toml"], "config file not found: /nonexistent/c.toml"),
        (["--steps", "0"], "--steps must be > 0, got 0"),
        (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
        (["--epochs", "1e308"], "--epochs must be <= 1e+09, got 1e+308"),
        (["--seed", "99999999999999999999999"], "--seed must be in [0, 2**63 - 1]"),
        (["--opt-option", "lr=abc"], "--opt-option lr: expected a number, got 'abc'"),
        (["--opt-option", "maximize=perhaps"],
         "--opt-option maximize: expected true or false (true/false/yes/no/1/0)"),
        (["--model-option", "hidden=abc"],
         "--model-option hidden: expected an integer or a list, got 'abc'"),
        (["--dataset", "cifar10", "--data-option", "augment=2"],
         "--data-option augment: expected true or false"),
        (["--dataset", "synthetic", "--data-option", "n=many"],
         "--data-option n: expected an integer, got 'many'"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert message in lines[0] and lines[0].startswith("adabatch")
    assert captured.out == ""
    assert not out.exists()


def test_binary_config_file_exits_2_with_one_line(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_bytes(bytes(range(256)) * 4)
    assert main(["train", "--out", str(tmp_path / "run"), "--config", str(path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "not a text file" in lines[0], captured.err
    assert "Traceback" not in captured.err


@pytest.mark.parametrize(
    ("args", "key", "expected"),
    [
        (["--opt-option", "maximize=False"], "optimizer_options", {"maximize": False}),
        (["--optimizer", "adam", "--opt-option", "amsgrad=no", "--opt-option", "foreach=NO"],
         "optimizer_options", {"amsgrad": False, "foreach": False}),
        (["--optimizer", "sgd", "--opt-option", "nesterov=Yes", "--opt-option", "momentum=0"],
         "optimizer_options", {"nesterov": True, "momentum": 0.0}),
        (["--dataset", "cifar10", "--data-option", "augment=no"], "data_options",
         {"augment": False}),
        (["--dataset", "cifar100", "--data-option", "augment=0", "--data-option",
          "labels=coarse"], "data_options", {"augment": False, "labels": "coarse"}),
        (["--model", "mlp", "--model-option", "hidden=[8, 4]"], "model_options",
         {"hidden": [8, 4]}),
        (["--model", "cnn", "--model-option", "padding=1"], "model_options", {"padding": 1}),
    ],
)
def test_key_value_options_take_their_targets_types(args, key, expected):
    """#16: `--opt-option maximize=False` used to be the truthy string 'False' (maximising)."""
    from adabatch.cli import _train_config, build_parser
    from adabatch.train.config import validate

    ns = build_parser().parse_args(["train", *args])
    flags = {k: v for k, v in vars(ns).items() if k != "command"}
    options = getattr(validate(_train_config(flags)), key)
    assert options == expected
    assert all(type(options[k]) is type(v) for k, v in expected.items())


def test_mnist_data_dir_without_files(tmp_path, capsys):
    assert main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path)]) == 3  # data
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "mnist" in lines[0] and "train-images" in lines[0]


def test_plot_and_compare(tmp_path, capsys):
    a, _ = _run(tmp_path, name="a")
    b, _ = _run(tmp_path, "--batch-test", "none", name="b")
    capsys.readouterr()
    assert main(["plot", str(a), str(b), "--out", str(tmp_path / "figs")]) == 0
    printed = capsys.readouterr().out.split()
    pngs = sorted((tmp_path / "figs").glob("*.png"))
    assert pngs and sorted(printed) == sorted(str(p) for p in pngs)
    assert main(["compare", str(a), str(b)]) == 0
    table = capsys.readouterr().out
    assert table.lstrip().startswith("|") and "a" in table and "b" in table
    assert main(["compare", str(tmp_path / "missing")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_help_and_no_command(capsys):
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--dataset", "--data-dir", "--model", "--optimizer", "--lr", "--betas", "--eps",
                 "--weight-decay", "--b0", "--batch-test", "--eta", "--theta", "--nu",
                 "--batch-schedule", "--initial-batch", "--max-batch", "--micro-batch",
                 "--test-interval", "--estimator", "--epochs", "--samples", "--steps",
                 "--lr-schedule", "--warmup-samples", "--eval-every", "--checkpoint-every",
                 "--seed", "--out", "--resume", "--device", "--threads", "--precision",
                 "--quiet", "--preset", "--config"):
        assert flag in text
    assert main([]) == 2


def test_diverging_loss_stops_with_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "20", "--optimizer", "sgd", "--lr", "1e30",
                 "--out", str(out)]) == 5  # the divergence exit code (train.errors)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "diverged: the loss is nan at step" in lines[0]
    assert not (out / "final.pt").exists()
