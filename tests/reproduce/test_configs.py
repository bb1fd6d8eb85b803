"""The paper's configurations in configs/ stay valid: they load, validate, carry the AdAdaGrad
authors' numbers, and run a few steps on generated files in the MNIST IDX / CIFAR formats."""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# The authors' numbers (github.com/timlautk/AdAdaGrad, expt.sh): the files must carry them.
EXPECTED = {
    "mnist_logistic_adagrad_norm.toml": {
        "dataset": "mnist", "model": "logistic", "optimizer": "adagrad", "lr": 8e-3,
        "batch_test": "norm", "eta": 0.1, "initial_batch": 2, "max_batch": 60000,
        "samples": 6_000_000, "lr_schedule": "constant",
    },
    "mnist_cnn_adagrad_norm.toml": {
        "dataset": "mnist", "model": "cnn", "optimizer": "adagrad", "lr": 8e-3,
        "batch_test": "norm", "eta": 0.1, "initial_batch": 8, "max_batch": 60000,
        "samples": 6_000_000, "lr_schedule": "constant",
    },
    "cifar10_resnet18_adagrad_norm.toml": {
        "dataset": "cifar10", "model": "resnet18", "optimizer": "adagrad", "lr": 5e-2,
        "batch_test": "norm", "eta": 0.5, "initial_batch": 8, "max_batch": 50000,
        "samples": 10_000_000, "lr_schedule": "cosine", "warmup_samples": 1_000_000,
        "min_lr_ratio": 0.1,
    },
}


def test_every_config_file_is_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.toml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_validates_and_has_the_papers_numbers(name):
    from adabatch.train.config import build_config, validate

    cfg = validate(build_config({}, CONFIGS / name))
    for key, value in EXPECTED[name].items():
        assert getattr(cfg, key) == value, key
    assert cfg.budget() == ("samples", EXPECTED[name]["samples"])


def _write_mnist(root: Path, rng: np.random.Generator) -> None:
    root.mkdir(parents=True)
    for prefix, n in (("train", 48), ("t10k", 16)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        (root / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">iiii", 2051, n, 28, 28) + images.tobytes())
        (root / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">ii", 2049, n) + labels.tobytes())


def _write_cifar10(root: Path, rng: np.random.Generator) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch = {b"data": rng.integers(0, 256, size=(8, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, size=8).tolist()}
        (folder / name).write_bytes(pickle.dumps(batch))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_runs_a_few_steps_on_generated_files(name, tmp_path):
    from adabatch.cli import main

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    (_write_cifar10 if name.startswith("cifar10") else _write_mnist)(data, rng)
    out = tmp_path / "run"
    # Only the budget, the maximum batch (so that 2 steps stay small on random labels) and
    # the outputs are overridden; everything else comes from the file.
    rc = main(["train", "--config", str(CONFIGS / name), "--data-dir", str(data),
               "--steps", "2", "--max-batch", "32", "--out", str(out), "--quiet",
               "--threads", "1", "--no-plots"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2
    assert summary["initial_batch_size"] == EXPECTED[name]["initial_batch"]
    for key in ("dataset", "model", "optimizer", "lr", "eta", "batch_test"):
        assert summary["config"][key] == EXPECTED[name][key], key
    assert np.isfinite(summary["test_loss"])
