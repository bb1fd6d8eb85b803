"""The training loop in-process: every model with every estimator it supports, accumulation,
learning-rate schedule, statistics cadence, outputs."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from adabatch.train.callbacks import Callbacks
from adabatch.train.config import ConfigError, TrainConfig, build_config
from adabatch.train.logging import Progress
from adabatch.train.loop import lr_multiplier, train
from adabatch.train.models import create_model


def _cfg(tmp_path, **flags) -> TrainConfig:
    flags.setdefault("steps", 3)
    flags.setdefault("quiet", True)
    flags.setdefault("plots", False)
    flags.setdefault("out", str(tmp_path / "run"))
    return build_config(flags)


def _rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if not r.get("eval")], [r for r in rows if r.get("eval")]


# (model, dataset, data options, model kwargs): small inputs so every model runs in a blink
MODELS = [
    ("logistic", "digits", {}, {}),
    ("mlp", "digits", {}, {}),
    ("cnn", "digits", {}, {}),
    ("cifar-cnn", "digits", {}, {}),
    ("resnet18", "digits", {}, {}),
    ("cnn1d", "synthetic", {"kind": "logistic", "n": 64, "d": 12}, {}),
]


CASES = [
    (*m, estimator, test)
    for m in MODELS
    for estimator, test in (
        # resnet18 has 11M parameters: its micro-batch run is the BatchNorm test below
        [("per-sample", "norm")] if m[0] == "resnet18"
        else [("per-sample", "norm"), ("per-sample", "coord"), ("micro-batch", "aip")]
    )
]


@pytest.mark.parametrize(("model", "dataset", "data_options", "extra", "estimator", "test"),
                         CASES)
def test_every_model_with_every_estimator(tmp_path, model, dataset, data_options, extra,
                                          estimator, test):
    small = model == "resnet18"
    cfg = _cfg(tmp_path, model=model, dataset=dataset, data_options=data_options,
               estimator=estimator, batch_test=test, initial_batch=4 if small else 8,
               max_batch=16 if small else 32, micro_batch=2 if small else 4, steps=2,
               eval_batch=64, **extra)
    result = train(cfg)
    steps, evals = _rows(result.run_dir)
    assert [r["step"] for r in steps] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in steps)
    # the statistics were measured on the first step (a test step) and gave a decision
    assert steps[0]["required"] is not None and steps[0]["passed"] in (True, False)
    assert result.summary["final_batch_size"] >= cfg.initial_batch
    assert len(evals) == 1 and evals[0]["step"] == 2
    # final.pt is the model's state_dict: it loads into a fresh model of the same kind
    shape, classes = ((1, 8, 8), 10) if dataset == "digits" else ((12,), 2)
    fresh = create_model(model, shape, classes)
    state = torch.load(result.run_dir / "final.pt", weights_only=True)
    fresh.load_state_dict(state)
    assert any(not torch.equal(v, fresh.state_dict()[k]) for k, v in
               create_model(model, shape, classes).state_dict().items()
               if v.is_floating_point())  # trained weights differ from a new init


def test_resnet18_batchnorm_needs_the_micro_batch_estimator(tmp_path):
    cfg = _cfg(tmp_path, model="resnet18", norm="batch", initial_batch=4, max_batch=8,
               micro_batch=2)
    with pytest.raises(ConfigError, match=r"--estimator per-sample cannot measure model "
                                          r"'resnet18' with BatchNorm"):
        train(cfg)
    assert not (tmp_path / "run").exists()  # failed before writing anything
    cfg = _cfg(tmp_path, model="resnet18", norm="batch", initial_batch=4, max_batch=8,
               micro_batch=2, estimator="micro-batch", batch_test="ip", steps=1,
               eval_batch=64)
    result = train(cfg)
    steps, _ = _rows(result.run_dir)
    assert len(steps) == 1 and steps[0]["required"] is not None


def test_accumulation_matches_one_pass(tmp_path):
    """--micro-batch splits a step into passes whose scaled losses add up to the batch mean:
    the same model (to float tolerance) and the same statistics as one pass."""
    results = []
    for i, micro in enumerate((None, 8)):
        flags = {"initial_batch": 32, "max_batch": 64, "steps": 4, "out": str(tmp_path / f"r{i}")}
        if micro:
            flags["micro_batch"] = micro
        results.append(train(_cfg(tmp_path, **flags)))
    a = torch.load(results[0].run_dir / "final.pt", weights_only=True)
    b = torch.load(results[1].run_dir / "final.pt", weights_only=True)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    rows_a, _ = _rows(results[0].run_dir)
    rows_b, _ = _rows(results[1].run_dir)
    for ra, rb in zip(rows_a, rows_b):
        assert ra["batch_size"] == rb["batch_size"]
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        if ra["statistic"] is not None:
            assert ra["statistic"] == pytest.approx(rb["statistic"], rel=1e-4)


@pytest.mark.parametrize("estimator", ["per-sample", "micro-batch"])
def test_statistics_only_on_test_steps_and_eval_cadence(tmp_path, estimator):
    # the micro-batch estimator's gradient hooks are off on the steps between tests
    cfg = _cfg(tmp_path, eta=10.0, test_interval=3, steps=7, eval_every=3,  # B stays 16
               estimator=estimator, micro_batch=4)
    steps, evals = _rows(train(cfg).run_dir)
    measured = [r["step"] for r in steps if r["required"] is not None]
    assert measured == [1, 4, 7]  # 0-based steps 0, 3, 6
    assert {r["batch_size"] for r in steps} == {16}
    assert [r["step"] for r in evals] == [3, 6, 7]  # every 3 steps and at the end
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in evals)


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


def test_progress_plain_lines_tqdm_on_tty_and_quiet():
    plain = _Stream(tty=False)
    p = Progress(100, "sample", quiet=False, stream=plain)
    for pos in range(10, 101, 10):
        p.update(pos, {"step": pos // 10})
    p.close()
    lines = plain.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("[100.0%] step=10")
    tty = _Stream(tty=True)
    p = Progress(100, "sample", quiet=False, stream=tty)
    p.update(50, {"B": 16})
    p.close()
    assert "50/100" in tty.getvalue() and "B=16" in tty.getvalue()  # a tqdm bar
    quiet = _Stream(tty=True)
    p = Progress(100, "sample", quiet=True, stream=quiet)
    p.update(100, {"B": 16})
    p.write("eval")
    p.close()
    assert quiet.getvalue() == ""


def test_batch_grows_and_respects_bounds(tmp_path):
    cfg = _cfg(tmp_path, eta=0.05, initial_batch=8, max_batch=64, micro_batch=8, steps=6)
    steps, _ = _rows(train(cfg).run_dir)
    sizes = [r["batch_size"] for r in steps]
    assert sizes[0] == 8 and max(sizes) == 64
    assert sizes == sorted(sizes) and all(s % 8 == 0 for s in sizes)
    assert [r["samples"] for r in steps] == [sum(sizes[:i + 1]) for i in range(len(sizes))]
    # no statistics are measured once the maximum is reached
    assert all(r["required"] is None for r in steps if r["batch_size"] == 64)


def test_fixed_schedules(tmp_path):
    lin = _rows(train(_cfg(tmp_path, batch_test="none", batch_schedule="linear",
                           initial_batch=8, max_batch=32, ramp_increment=8, steps=5,
                           out=str(tmp_path / "lin"))).run_dir)[0]
    assert [r["batch_size"] for r in lin] == [8, 16, 24, 32, 32]
    stage = _rows(train(_cfg(tmp_path, batch_test="none", batch_schedule="stagewise",
                             initial_batch=8, max_batch=32, stage_samples=16, steps=5,
                             out=str(tmp_path / "stage"))).run_dir)[0]
    assert [r["batch_size"] for r in stage] == [8, 8, 16, 32, 32]
    const = _rows(train(_cfg(tmp_path, batch_test="none", initial_batch=8, max_batch=32,
                             out=str(tmp_path / "const"))).run_dir)[0]
    assert {r["batch_size"] for r in const} == {8}


def test_samples_and_epochs_budgets(tmp_path):
    r = train(_cfg(tmp_path, batch_test="none", initial_batch=16, samples=40, steps=None))
    assert r.summary["steps"] == 3 and r.summary["samples"] == 48  # stops once >= budget
    r = train(_cfg(tmp_path, batch_test="none", initial_batch=512, max_batch=512,
                   epochs=1.0, steps=None, out=str(tmp_path / "ep")))
    assert r.summary["samples"] == 1536 and r.summary["epochs"] >= 1.0


def test_lr_multiplier_warmup_and_cosine():
    cfg = TrainConfig(lr_schedule="cosine", warmup_samples=100, min_lr_ratio=0.1)
    assert lr_multiplier(cfg, 0, 0, "samples", 1100) == pytest.approx(0.01)
    assert lr_multiplier(cfg, 49, 3, "samples", 1100) == pytest.approx(0.5)
    assert lr_multiplier(cfg, 100, 5, "samples", 1100) == pytest.approx(1.0)
    assert lr_multiplier(cfg, 600, 9, "samples", 1100) == pytest.approx(0.55)
    assert lr_multiplier(cfg, 1100, 9, "samples", 1100) == pytest.approx(0.1)
    steps = TrainConfig(lr_schedule="cosine")
    assert lr_multiplier(steps, 12345, 5, "steps", 10) == pytest.approx(0.5)
    assert lr_multiplier(TrainConfig(), 7, 7, "samples", 10) == 1.0


def test_logged_lr_follows_schedule_in_samples(tmp_path):
    cfg = _cfg(tmp_path, lr=0.5, lr_schedule="cosine", warmup_samples=32, batch_test="none",
               initial_batch=16, steps=None, samples=160)
    steps, _ = _rows(train(cfg).run_dir)
    for r in steps:
        before = r["samples"] - r["batch_size"]
        expected = 0.5 * lr_multiplier(cfg, before, r["step"] - 1, "samples", 160)
        assert r["lr"] == pytest.approx(expected)
    assert steps[0]["lr"] < steps[2]["lr"] and steps[-1]["lr"] < steps[2]["lr"]


def test_lr_scaling_with_the_batch(tmp_path):
    cfg = _cfg(tmp_path, lr=0.2, eta=0.05, initial_batch=8, max_batch=32, lr_scaling="linear",
               steps=4)
    steps, _ = _rows(train(cfg).run_dir)
    for r in steps:
        assert r["lr"] == pytest.approx(0.2 * r["batch_size"] / 8)


def test_bf16_and_regression(tmp_path):
    r = train(_cfg(tmp_path, precision="bf16", steps=2))
    assert math.isfinite(r.summary["test_loss"])
    r = train(_cfg(tmp_path, dataset="synthetic", data_options={"kind": "least-squares"},
                   model="logistic", optimizer="sgd", lr=0.05, out=str(tmp_path / "ls"),
                   steps=20))
    steps, evals = _rows(r.run_dir)
    assert evals[-1]["test_accuracy"] is None and r.summary["test_accuracy"] is None
    assert steps[-1]["loss"] < steps[0]["loss"]


def test_bad_setup_is_a_config_error_and_writes_nothing(tmp_path):
    for flags, match in [
        ({"dataset": "imagenet"}, r"unknown dataset 'imagenet'"),
        ({"model": "vgg"}, r"unknown model 'vgg'"),
        ({"optimizer": "lion"}, r"unknown optimizer 'lion'"),
        ({"optimizer": "adagradnorm", "betas": (0.9, 0.99)},
         r"optimizer 'adagradnorm' does not take --betas"),
        ({"lr": -1.0}, r"optimizer 'adagradnorm': Invalid learning rate: -1.0"),
        ({"data_options": {"bogus": 1}}, r"unknown option\(s\) for dataset 'digits': bogus"),
    ]:
        with pytest.raises(ConfigError, match=match):
            train(_cfg(tmp_path, **flags))
        assert not (tmp_path / "run").exists()


def test_missing_data_files_are_a_data_error_and_write_nothing(tmp_path):
    from adabatch.train.data import DatasetError
    from adabatch.train.errors import EXIT_DATA, classify

    with pytest.raises(DatasetError, match=r"mnist train images file not found") as info:
        train(_cfg(tmp_path, dataset="mnist", data_dir=str(tmp_path)))
    assert classify(info.value)[0] == EXIT_DATA == 3
    assert not (tmp_path / "run").exists()


def test_existing_run_dir_is_not_overwritten(tmp_path):
    train(_cfg(tmp_path, steps=1))
    before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match=r"already holds a run; continue it with --resume"):
        train(_cfg(tmp_path, steps=1))
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before


def test_metrics_rows_are_json_with_non_finite_as_strings(tmp_path):
    from adabatch.train.logging import MetricsWriter

    row = {"step": 1, "none": None, "yes": True, "no": False, "x": 0.1, "big": 1e300,
           "inf": math.inf, "ninf": -math.inf, "nan": math.nan, "s": 'a"b', "n": 3}
    w = MetricsWriter(tmp_path / "m.jsonl")
    w.write(row)
    offset = w.flush()
    w.write({"step": 2})
    w.close()
    first, second = (tmp_path / "m.jsonl").read_text().splitlines()
    assert json.loads(first) == {**row, "inf": "inf", "ninf": "-inf", "nan": "nan"}
    assert json.loads(second) == {"step": 2}
    # a resumed writer cuts the file back to a checkpoint's offset and appends
    w = MetricsWriter(tmp_path / "m.jsonl", truncate_at=offset)
    w.write({"step": 3})
    w.close()
    assert [json.loads(x)["step"] for x in (tmp_path / "m.jsonl").read_text().splitlines()] == [
        1, 3]


class _Recorder(Callbacks):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_step_start(self, run) -> None:
        self.events.append(("start", run.step, run.samples))

    def before_optimizer_step(self, run) -> None:
        grads = [p.grad for p in run.model.parameters()]
        self.events.append(("before", run.step, all(g is not None and bool(g.any())
                                                    for g in grads)))

    def on_step_end(self, run) -> None:
        self.events.append(("end", run.step, run.samples, run.stop.signum))

    def on_train_end(self, run) -> None:
        self.events.append(("train_end", run.step))


@pytest.mark.parametrize("batch_test", ["none", "norm"])
def test_callbacks_see_every_step_in_order(tmp_path, batch_test):
    """Callbacks are the loop's only hooks: each event once per step, in order, with the
    gradients in place before the optimizer step; the same path with and without an
    estimator."""
    rec = _Recorder()
    cfg = _cfg(tmp_path, batch_test=batch_test, initial_batch=16, max_batch=16 if
               batch_test == "none" else 64, micro_batch=8, steps=3)
    result = train(cfg, callbacks=rec)
    B = [r["batch_size"] for r in _rows(result.run_dir)[0]]
    seen = [0, B[0], B[0] + B[1], sum(B)]
    expected = []
    for k in range(3):
        expected += [("start", k, seen[k]), ("before", k, True), ("end", k + 1, seen[k + 1],
                                                                   None)]
    assert rec.events == [*expected, ("train_end", 3)]


def test_plain_callbacks_change_nothing(tmp_path):
    a = train(_cfg(tmp_path, out=str(tmp_path / "a"), micro_batch=8, initial_batch=16))
    b = train(_cfg(tmp_path, out=str(tmp_path / "b"), micro_batch=8, initial_batch=16),
              callbacks=Callbacks())
    sa = torch.load(a.run_dir / "final.pt", weights_only=True)
    sb = torch.load(b.run_dir / "final.pt", weights_only=True)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_log_every_is_retired_and_ignored(tmp_path):
    """``log_every`` was validated but never read: a config file or a saved run that still
    sets it is accepted, and the key is gone from the configuration."""
    path = tmp_path / "run.toml"
    path.write_text("log_every = 5\nsteps = 2\n")
    cfg = build_config({}, path)
    assert cfg.steps == 2 and not hasattr(cfg, "log_every")
    assert "log_every" not in cfg.to_dict()
    assert TrainConfig.from_dict({**cfg.to_dict(), "log_every": 0}) == cfg
    with pytest.raises(ConfigError, match="unknown key 'log_everyy'"):
        TrainConfig.from_dict({"log_everyy": 0})
