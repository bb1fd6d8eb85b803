"""The byte-level language model of issue #18: the ``pydoc`` and ``text`` data sets, the
``language_model`` task's loss and accuracy, the ``charlm`` transformer (tied embedding,
blocks), exact per-sample statistics on it against a torch.func vmap oracle, and a short
``adabatch train`` run."""

from __future__ import annotations

import hashlib
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from adabatch.batching.estimators import PerSampleStats
from adabatch.batching.stats import STAT_NAMES
from adabatch.cli import main
from adabatch.train.data import DatasetBundle, DatasetError, load_dataset, task_loss
from adabatch.train.models import create_model, list_models, model_info
from adabatch.train.steps import evaluate
from tests.batching.test_estimators import NEEDS

DT = torch.float64


# --- data ------------------------------------------------------------------------------------
def test_text_file_windows_and_split(tmp_path):
    corpus = bytes(range(256)) * 2 + "naïve €\n".encode()  # 523 bytes, UTF-8 beyond ASCII
    path = tmp_path / "corpus.txt"
    path.write_bytes(corpus)
    b = load_dataset("text", path, context=8)
    cut = len(corpus) * 9 // 10  # first 90% train
    assert b.task == "language_model" and b.num_classes == 256 and b.input_shape == (8,)
    assert b.x_train.dtype == b.y_train.dtype == torch.int64
    assert b.x_train.shape == ((cut - 1) // 8, 8)
    assert b.x_test.shape == ((len(corpus) - cut - 1) // 8, 8)
    tokens = torch.tensor(list(corpus))
    # non-overlapping windows, targets the next tokens, test from the cut on
    assert torch.equal(b.x_train.flatten(), tokens[: b.x_train.numel()])
    assert torch.equal(b.y_train.flatten(), tokens[1 : b.x_train.numel() + 1])
    assert torch.equal(b.x_test.flatten(), tokens[cut : cut + b.x_test.numel()])
    assert torch.equal(b.y_test.flatten(), tokens[cut + 1 : cut + 1 + b.x_test.numel()])
    assert b.extra["sha256"] == hashlib.sha256(corpus).hexdigest()
    assert b.extra["bytes"] == len(corpus) and b.extra["files"] == [str(path)]


def test_text_directory_joins_matching_files_in_order(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_bytes(b"b" * 60)
    (tmp_path / "sub" / "a.txt").write_bytes(b"a" * 60)
    (tmp_path / "skip.md").write_bytes(b"m" * 60)
    b = load_dataset("text", tmp_path, context=4)
    assert b.extra["bytes"] == 120
    assert [p.rsplit("/", 1)[-1] for p in b.extra["files"]] == ["b.txt", "a.txt"]
    assert int(b.x_train[0, 0]) == ord("b") and int(b.x_test[-1, -1]) == ord("a")
    assert load_dataset("text", tmp_path, context=4, pattern="*.md").extra["bytes"] == 60


@pytest.mark.parametrize(("content", "message"), [
    (None, "file or directory not found"),
    (b"", "empty"),
    (b"x" * 80, r"80 bytes is too short for context=8 \(needs at least 81 bytes"),
    ("dir", r"no file matching '\*.txt'"),
])
def test_text_errors(tmp_path, content, message):
    path = tmp_path if content == "dir" else tmp_path / "corpus.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    with pytest.raises(DatasetError, match=message):
        load_dataset("text", path, context=8)


def test_text_shortest_corpus(tmp_path):
    (tmp_path / "s.txt").write_bytes(b"x" * 81)
    b = load_dataset("text", tmp_path / "s.txt", context=8)
    assert b.num_test == 1 and b.num_train == 8  # (72 - 1) // 8: a target past each window


def test_pydoc_corpus_and_facts():
    from pydoc_data.topics import topics

    b = load_dataset("pydoc", context=32)
    corpus = "".join(topics[k] for k in sorted(topics)).encode()
    assert b.extra["sha256"] == hashlib.sha256(corpus).hexdigest()
    assert b.extra["python_version"] == ".".join(map(str, sys.version_info[:3]))
    assert b.num_train == (len(corpus) * 9 // 10 - 1) // 32 and b.input_shape == (32,)
    assert bytes(b.x_train[0].tolist()) == corpus[:32]


def test_bundle_checks_token_tensors():
    x = torch.zeros(3, 4, dtype=torch.int64)
    ok = {"name": "t", "x_train": x, "y_train": x, "x_test": x, "y_test": x,
          "task": "language_model", "num_classes": 5}
    assert DatasetBundle(**ok).input_shape == (4,)
    with pytest.raises(ValueError, match="int64 token ids of shape"):
        DatasetBundle(**{**ok, "x_train": x.float()})
    with pytest.raises(ValueError, match=r"outside \[0, num_classes=5\)"):
        DatasetBundle(**{**ok, "y_test": x + 5})
    with pytest.raises(ValueError, match="expected x_train's"):
        DatasetBundle(**{**ok, "y_train": x[:, :3]})


# --- loss and accuracy -----------------------------------------------------------------------
def test_loss_contract():
    gen = torch.Generator().manual_seed(0)
    out = torch.randn(5, 7, 11, generator=gen)
    y = torch.randint(0, 11, (5, 7), generator=gen)
    per_seq = task_loss("language_model", out, y, reduction="none")
    by_hand = torch.stack([F.cross_entropy(out[i], y[i]) for i in range(5)])
    assert per_seq.shape == (5,) and torch.allclose(per_seq, by_hand, rtol=1e-6)
    mean = task_loss("language_model", out, y)
    assert torch.allclose(mean, by_hand.mean(), rtol=1e-6)
    assert torch.allclose(task_loss("language_model", out, y, reduction="sum"), by_hand.sum(),
                          rtol=1e-6)
    with pytest.raises(ValueError, match=r"output \(n, T, V\) and target \(n, T\)"):
        task_loss("language_model", out[:, 0], y)


def test_evaluate_next_token_accuracy():
    class Echo(nn.Module):  # predicts token x[t] for every position: right where y == x
        def forward(self, x):
            return F.one_hot(x, 6).float() * 10

    x = torch.tensor([[1, 2, 3, 4], [5, 5, 5, 5], [0, 1, 0, 1]])
    y = torch.tensor([[1, 2, 0, 0], [5, 5, 5, 5], [1, 0, 1, 0]])
    loss, acc = evaluate(Echo(), x, y, "language_model", batch=2)
    assert acc == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    expected = float(task_loss("language_model", Echo()(x), y, reduction="sum")) / 3
    assert loss == pytest.approx(expected)


# --- the model -------------------------------------------------------------------------------
def test_charlm_shape_tied_weight_and_blocks():
    assert "charlm" in list_models() and model_info("charlm")["input"] == "tokens"
    torch.manual_seed(0)
    m = create_model("charlm", (16,), 256, d_model=32, layers=3, heads=4)
    assert m.head.weight is m.tok.weight  # one Parameter
    params = list(m.parameters())
    assert sum(p is m.tok.weight for p in params) == 1
    assert isinstance(m.blocks, nn.ModuleList) and len(m.blocks) == 3
    x = torch.randint(0, 256, (2, 16))
    out = m(x)
    assert out.shape == (2, 16, 256)
    # causal: the logits at position t do not depend on later tokens
    x2 = x.clone()
    x2[:, 10:] = (x2[:, 10:] + 1) % 256
    assert torch.allclose(m(x2)[:, :10], out[:, :10], atol=1e-6)
    assert not torch.allclose(m(x2)[:, 10:], out[:, 10:])
    # near-uniform start: the loss starts at about log(256)
    loss = task_loss("language_model", out, torch.randint(0, 256, (2, 16)))
    assert abs(loss.item() - math.log(256)) < 0.2
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


@pytest.mark.parametrize(("options", "message"), [
    ({"d_model": 30, "heads": 4}, r"d_model \(30\) must be a multiple of heads \(4\)"),
    ({"context": 8}, r"context \(8\) must be >= the input length \(16\)"),
    ({"layers": 0}, "layers must be a positive int"),
])
def test_charlm_option_errors(options, message):
    with pytest.raises(ValueError, match=message):
        create_model("charlm", (16,), 256, **options)
    with pytest.raises(ValueError, match="takes token sequences of shape"):
        create_model("charlm", (1, 8, 8), 256)


def test_charlm_shorter_input_than_context():
    m = create_model("charlm", (4,), 7, context=8)
    assert m(torch.zeros(2, 6, dtype=torch.int64)).shape == (2, 6, 7)
    with pytest.raises(ValueError, match="T <= 8"):
        m(torch.zeros(2, 9, dtype=torch.int64))


# --- exact per-sample statistics against vmap ------------------------------------------------
def vmap_oracle(model, x, y, params):
    """Per-sample gradients from torch.func (grad of each sequence's loss, vmapped), and the
    statistics by their definitions."""
    names = {id(p): k for k, p in model.named_parameters()}
    weights = {k: p.detach() for k, p in model.named_parameters()}

    def loss(w, xi, yi):
        return task_loss("language_model", functional_call(model, w, (xi[None],)), yi[None])

    g = vmap(grad(loss), in_dims=(None, 0, 0))(weights, x, y)
    g = torch.cat([g[names[id(p)]].reshape(len(x), -1) for p in params], 1)
    b, m = len(g), g.mean(0)
    G, ip = m @ m, g @ m
    return {"grad_sq_norm": G, "variance_trace": ((g - m) ** 2).sum() / (b - 1),
            "ip_variance": ((ip - G) ** 2).sum() / (b - 1),
            "orth_variance": ((g - (ip / G)[:, None] * m) ** 2).sum() / (b - 1),
            "coord_variance": ((g - m) ** 2).sum(0) / (b - 1), "mean_grad": m}


@pytest.mark.parametrize(("b", "split", "needs", "kw"), [
    (5, None, STAT_NAMES, {}),
    (6, None, STAT_NAMES, {}),  # as many samples as positions: the positions stay shared
    (5, 3, STAT_NAMES, {}),  # two micro-batches
    (6, 2, STAT_NAMES, {"chunk_size": 2}),
    *[(5, None, needs, {}) for needs in NEEDS[1:]],  # the paths of each subset
])
def test_persample_stats_exact_on_charlm(b, split, needs, kw):
    torch.manual_seed(1)
    model = create_model("charlm", (6,), 13, d_model=8, heads=2).to(DT)
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(0, 13, (b, 6), generator=gen)
    y = torch.randint(0, 13, (b, 6), generator=gen)
    est = PerSampleStats(model, needs=needs, **kw)
    assert sum(p is model.tok.weight for p in est.params) == 1  # the tied weight, once
    parts = [(x, y)] if split is None else [(x[:split], y[:split]), (x[split:], y[split:])]
    for xs, ys in parts:
        with est.measure():
            (task_loss("language_model", model(xs), ys) * (len(xs) / b)).backward()
    s, ref = est.stats(), vmap_oracle(model, x, y, est.params)
    assert s.batch_size == b
    assert s.grad_sq_norm == pytest.approx(float(ref["grad_sq_norm"]), rel=1e-9)
    for name in ("variance_trace", "ip_variance", "orth_variance"):
        if name in needs:
            assert getattr(s, name) == pytest.approx(float(ref[name]), rel=1e-9), name
    for name in ("coord_variance", "mean_grad"):
        if name in needs:
            flat = torch.cat([v.reshape(-1) for v in getattr(s, name)])
            assert (flat - ref[name]).abs().max() <= 1e-9 * ref[name].abs().max(), name


# --- adabatch train --------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["per-sample", "micro-batch"])
def test_train_loss_goes_down(tmp_path, estimator):
    out = tmp_path / "run"
    args = ["train", "--dataset", "pydoc", "--data-option", "context=16", "--model", "charlm",
            "--model-option", "d_model=16", "--model-option", "layers=1",
            "--optimizer", "adam", "--lr", "0.01", "--samples", "600", "--initial-batch", "8",
            "--max-batch", "32", "--batch-test", "norm", "--estimator", estimator,
            "--eval-every", "1000", "--threads", "2", "--out", str(out), "--quiet",
            "--no-plots"]
    if estimator == "micro-batch":
        args[args.index("--initial-batch") + 1] = "16"
        args += ["--micro-batch", "8"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[0] > 5.0 and sum(losses[-3:]) / 3 < losses[0] - 1.0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["test_loss"] < losses[0] and 0 < summary["test_accuracy"] < 1
    if estimator == "per-sample":  # adabatch plot draws the run (loss, next-token accuracy)
        assert main(["plot", str(out), "--out", str(tmp_path / "plots")]) == 0
        drawn = {p.name for p in (tmp_path / "plots").glob("*.png")}
        assert {"loss_vs_steps.png", "accuracy_vs_steps.png",
                "statistics_vs_samples.png"} <= drawn


@pytest.mark.parametrize("test", ["norm", "coord"])
def test_train_bf16_with_per_sample_statistics(tmp_path, test):
    """``--precision bf16`` (torch.autocast) with the per-sample estimator on the transformer:
    its Linear layers see [b, T, in] inputs, which the hooks keep in float32 while autocast
    sends back bfloat16 gradients. This once stopped at the first step with an internal
    error; the run must finish, with finite statistics (the controller tests no batch once
    it is at ``--max-batch``)."""
    out = tmp_path / "run"
    assert main(["train", "--dataset", "pydoc", "--data-option", "context=16",
                 "--model", "charlm", "--model-option", "d_model=16", "--model-option",
                 "layers=1", "--precision", "bf16", "--samples", "96", "--initial-batch", "8",
                 "--max-batch", "32", "--batch-test", test, "--estimator", "per-sample",
                 "--eval-every", "1000", "--threads", "2", "--out", str(out), "--quiet",
                 "--no-plots"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r and not r.get("eval")]
    assert steps and all(math.isfinite(r["loss"]) for r in steps)
    measured = [r["statistic"] for r in steps if r["statistic"] is not None]
    assert measured and all(math.isfinite(v) and v > 0 for v in measured)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stat_warnings"] == 0


def test_train_text_errors_are_one_line(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_bytes(b"abc")
    assert main(["train", "--dataset", "text", "--data-dir", str(short), "--model", "charlm",
                 "--out", str(tmp_path / "r")]) == 3  # a data error (train/errors.py)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "3 bytes is too short for context=64" in err[0]
    assert main(["train", "--dataset", "text", "--data-dir", str(tmp_path / "none.txt"),
                 "--model", "charlm", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--data-dir: file or directory not found" in err[0]
    good = tmp_path / "good.txt"  # a file as --data-dir trains
    good.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 20)
    assert main(["train", "--dataset", "text", "--data-dir", str(good), "--data-option",
                 "context=8", "--model", "charlm", "--model-option", "d_model=8",
                 "--steps", "2", "--batch-test", "none", "--max-batch", "16", "--no-plots",
                 "--quiet",
                 "--out", str(tmp_path / "ok")]) == 0
    summary = json.loads((tmp_path / "ok" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["test_loss"] > 0
