"""Dataset loaders: embedded datasets, generated files in the exact on-disk formats, errors."""

from __future__ import annotations

import gzip
import pickle
import random
import re
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from adabatch.train import data as data_mod
from adabatch.train.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    MNIST_MEAN,
    MNIST_STD,
    DatasetBundle,
    DatasetError,
    list_datasets,
    load_dataset,
    random_crop_flip,
)

# ---------------------------------------------------------------------------------------------
# registry


def test_list_datasets():
    assert list_datasets() == [
        "cifar10",
        "cifar100",
        "digits",
        "fashion-mnist",
        "mnist",
        "mnist1d",
        "pydoc",
        "synthetic",
        "text",
    ]


def test_unknown_dataset_and_option():
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'; choose from: cifar10, "):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match=r"unknown option\(s\) for dataset 'digits': foo"):
        load_dataset("digits", foo=1)
    with pytest.raises(
        ValueError, match=r"unknown option\(s\) for dataset 'mnist1d': n \(allowed: none\)"
    ):
        load_dataset("mnist1d", n=3)


def test_bundle_validates_shapes():
    x = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="x_train has 4 samples but y_train has 3"):
        DatasetBundle("t", x, torch.zeros(3), x, torch.zeros(4), "regression", 1, (3,))
    with pytest.raises(ValueError, match=r"x_test has per-sample shape \(3,\), expected \(2,\)"):
        DatasetBundle("t", x[:, :2], torch.zeros(4), x, torch.zeros(4), "regression", 1, (2,))
    with pytest.raises(ValueError, match="task must be 'classification', 'regression' or "
                                         "'language_model'"):
        DatasetBundle("t", x, torch.zeros(4), x, torch.zeros(4), "ranking", 1, (3,))


# ---------------------------------------------------------------------------------------------
# digits


def test_digits_split_normalisation_and_determinism():
    from sklearn.datasets import load_digits

    b = load_dataset("digits")
    assert b.task == "classification" and b.num_classes == 10 and b.input_shape == (1, 8, 8)
    assert b.x_train.dtype == torch.float32 and b.y_train.dtype == torch.int64
    assert b.num_train + b.num_test == 1797
    # stratified 20 %: every class has round(0.2 * count) test samples
    raw = load_digits()
    counts = np.bincount(raw.target, minlength=10)
    assert torch.bincount(b.y_test, minlength=10).tolist() == [round(0.2 * c) for c in counts]
    # standardised with the training statistics
    assert abs(float(b.x_train.mean())) < 1e-5
    assert abs(float(b.x_train.std(unbiased=False)) - 1.0) < 1e-4
    # the samples are digits' images (undo the normalisation), each used exactly once
    mean, std = b.extra["mean"], b.extra["std"]
    rows = {}
    for i, img in enumerate(raw.images):
        rows.setdefault(np.round(img).astype(np.int64).tobytes(), []).append(int(raw.target[i]))
    seen = []
    for x, y in ((b.x_train, b.y_train), (b.x_test, b.y_test)):
        back = np.round((x.double().numpy()[:, 0] * std + mean) * 16.0).astype(np.int64)
        for img, label in zip(back, y.tolist()):
            assert label in rows[img.tobytes()]
            seen.append(img.tobytes())
    assert sorted(seen) == sorted(
        np.round(raw.images).astype(np.int64).reshape(1797, 8, 8)[i].tobytes() for i in range(1797)
    )
    again = load_dataset("digits", seed=123)  # the split does not depend on the run's seed
    assert torch.equal(again.x_train, b.x_train) and torch.equal(again.y_test, b.y_test)
    other = load_dataset("digits", split_seed=1)
    assert not torch.equal(other.y_test, b.y_test)


def test_digits_bad_fraction():
    with pytest.raises(ValueError, match=r"test_fraction must be in \(0, 1\), got 1.5"):
        load_dataset("digits", test_fraction=1.5)


# ---------------------------------------------------------------------------------------------
# mnist1d


def test_mnist1d_offline_matches_package_and_keeps_global_rng(monkeypatch):
    import mnist1d.data
    from mnist1d.data import get_dataset_args

    calls = []
    real_make_dataset = mnist1d.data.make_dataset

    def spy(args=None, *rest, **kw):  # records what the loader got from the package
        out = real_make_dataset(args, *rest, **kw)
        calls.append((vars(args).copy(), out))
        return out

    monkeypatch.setattr(mnist1d.data, "make_dataset", spy)

    def no_network(*args, **kwargs):
        raise AssertionError("the mnist1d loader tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    data_mod._mnist1d_arrays.cache_clear()
    np.random.seed(7)
    random.seed(7)
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
    b = load_dataset("mnist1d")
    np_after, py_after = np.random.get_state()[1], random.getstate()
    assert np.array_equal(np_before, np_after) and py_before == py_after
    assert b.x_train.shape == (4000, 40) and b.x_test.shape == (1000, 40)
    assert b.input_shape == (40,) and b.num_classes == 10
    assert b.y_train.dtype == torch.int64 and set(b.y_train.unique().tolist()) == set(range(10))
    assert len(calls) == 1 and calls[0][0] == vars(get_dataset_args())
    ref = calls[0][1]
    assert np.allclose(b.x_train.numpy(), ref["x"], atol=1e-6)
    assert np.allclose(b.x_test.numpy(), ref["x_test"], atol=1e-6)
    assert np.array_equal(b.y_train.numpy(), ref["y"])
    assert np.array_equal(b.y_test.numpy(), ref["y_test"])
    b2 = load_dataset("mnist1d")
    assert torch.equal(b2.x_train, b.x_train)
    b2.x_train.add_(1.0)  # bundles do not share storage with the cache
    assert torch.equal(load_dataset("mnist1d").x_train, b.x_train)


# ---------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_least_squares_optimum():
    b = load_dataset("synthetic", kind="least-squares", n=200, d=5, noise=0.3, seed=3)
    assert b.task == "regression" and b.num_classes == 1 and b.input_shape == (5,)
    assert b.y_train.dtype == torch.float32 and b.y_train.shape == (200,)
    assert b.num_test == 50
    x, y = b.x_train.double(), b.y_train.double()
    w = b.extra["optimal_weight"].clone().requires_grad_(True)
    bias = torch.tensor(b.extra["optimal_bias"], dtype=torch.float64, requires_grad=True)
    loss = ((x @ w + bias - y) ** 2).mean()
    loss.backward()
    assert w.grad.abs().max() < 1e-5 and abs(float(bias.grad)) < 1e-5
    assert abs(loss.item() - b.extra["optimal_loss"]) < 1e-5
    planted = ((x @ b.extra["planted_weight"] + b.extra["planted_bias"] - y) ** 2).mean()
    assert float(planted) > b.extra["optimal_loss"]
    # the noise level sets the optimal loss: about noise² (d + 1 fitted parameters)
    assert 0.5 * 0.09 < b.extra["optimal_loss"] < 1.5 * 0.09
    # the bundle's loss is the same mean squared error, with a (n, 1) model output
    out = (x @ w + bias).detach().float().unsqueeze(1)
    assert abs(b.loss(out, b.y_train).item() - loss.item()) < 1e-4


def test_synthetic_determinism_and_seeds():
    a = load_dataset("synthetic", seed=5, n=50, d=3)
    b = load_dataset("synthetic", seed=5, n=50, d=3)
    c = load_dataset("synthetic", seed=6, n=50, d=3)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)


def test_synthetic_logistic_optimum():
    b = load_dataset("synthetic", kind="logistic", n=400, d=4, seed=1, n_test=100)
    assert b.task == "classification" and b.num_classes == 2
    assert b.y_train.dtype == torch.int64 and set(b.y_train.tolist()) == {0, 1}
    assert b.num_test == 100
    x = b.x_train.double()
    s = 2.0 * b.y_train.double() - 1.0
    w = b.extra["optimal_weight"].clone().requires_grad_(True)
    bias = torch.tensor(b.extra["optimal_bias"], dtype=torch.float64, requires_grad=True)
    loss = torch.nn.functional.softplus(-s * (x @ w + bias)).mean()
    loss.backward()
    assert w.grad.abs().max() < 1e-7 and abs(float(bias.grad)) < 1e-7
    assert abs(loss.item() - b.extra["optimal_loss"]) < 1e-9
    # a two-class softmax with logits (0, x·w + b) has the same cross-entropy
    z = (x @ w + bias).detach()
    logits = torch.stack([torch.zeros_like(z), z], dim=1)
    ce = torch.nn.functional.cross_entropy(logits, b.y_train)
    assert abs(float(ce) - b.extra["optimal_loss"]) < 1e-9


def test_synthetic_logistic_label_noise_and_separable():
    clean = load_dataset("synthetic", kind="logistic", n=2000, d=3, seed=2)
    noisy = load_dataset("synthetic", kind="logistic", n=2000, d=3, seed=2, noise=0.3)
    flipped = float((clean.y_train != noisy.y_train).double().mean())
    assert 0.25 < flipped < 0.35
    sep = load_dataset("synthetic", kind="logistic", n=8, d=20, seed=0)
    assert sep.extra["optimal_weight"] is None and sep.extra["optimal_loss"] is None


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"kind": "poisson"}, ValueError,
         r"Invalid kind: 'poisson' \(must be one of 'least-squares', 'logistic'\)"),
        ({"kind": 3}, TypeError, r"Invalid kind: 3 \(must be a string\)"),
        ({"n": 0}, ValueError, r"Invalid n: 0 \(must be >= 1\)"),
        ({"n_test": 0}, ValueError, r"Invalid n_test: 0 \(must be >= 1\)"),
        ({"d": 2.5}, TypeError, r"Invalid d: 2.5 \(must be an int\)"),
        ({"noise": -1.0}, ValueError, r"Invalid noise: -1.0 \(must be >= 0.0\)"),
        ({"noise": float("nan")}, ValueError, r"Invalid noise: nan \(must be finite\)"),
        ({"noise": "0.1"}, TypeError, r"Invalid noise: '0.1' \(must be a real number\)"),
        ({"kind": "logistic", "noise": 0.7}, ValueError,
         r"noise \(the label-flip probability\) must be"),
        ({"n": 3, "d": 5}, ValueError, "least-squares needs n >= d \\+ 1"),
    ],
)
def test_synthetic_bad_options(options, error, message):
    with pytest.raises(error, match=message):
        load_dataset("synthetic", **options)


# ---------------------------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST)


def _idx_images(images: np.ndarray) -> bytes:
    n, r, c = images.shape
    return struct.pack(">iiii", 2051, n, r, c) + images.astype(np.uint8).tobytes()


def _idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">ii", 2049, len(labels)) + labels.astype(np.uint8).tobytes()


def _write_idx(folder: Path, n_train=5, n_test=3, gz=False, dot=False, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        lbls = rng.integers(0, 10, size=n, dtype=np.uint8)
        arrays[prefix] = (imgs, lbls)
        sep = "." if dot else "-"
        for kind, payload in (("images", _idx_images(imgs)), ("labels", _idx_labels(lbls))):
            name = f"{prefix}-{kind}{sep}idx{3 if kind == 'images' else 1}-ubyte"
            if gz:
                (folder / (name + ".gz")).write_bytes(gzip.compress(payload))
            else:
                (folder / name).write_bytes(payload)
    return arrays


def _check_idx_bundle(b, arrays, mean, std):
    assert b.task == "classification" and b.num_classes == 10 and b.input_shape == (1, 28, 28)
    for (x, y), prefix in (((b.x_train, b.y_train), "train"), ((b.x_test, b.y_test), "t10k")):
        imgs, lbls = arrays[prefix]
        assert x.shape == (len(lbls), 1, 28, 28) and x.dtype == torch.float32
        expect = (torch.from_numpy(imgs.astype(np.float32)) / 255.0 - mean) / std
        assert torch.allclose(x[:, 0], expect, atol=1e-6)
        assert y.dtype == torch.int64 and y.tolist() == lbls.tolist()


def test_mnist_raw_files(tmp_path):
    arrays = _write_idx(tmp_path)
    _check_idx_bundle(load_dataset("mnist", tmp_path), arrays, MNIST_MEAN, MNIST_STD)


def test_mnist_gz_in_torchvision_layout(tmp_path):
    arrays = _write_idx(tmp_path / "MNIST" / "raw", gz=True, seed=1)
    _check_idx_bundle(load_dataset("mnist", str(tmp_path)), arrays, MNIST_MEAN, MNIST_STD)


def test_fashion_mnist_dot_names(tmp_path):
    arrays = _write_idx(tmp_path / "FashionMNIST" / "raw", dot=True, seed=2)
    b = load_dataset("fashion-mnist", tmp_path)
    assert b.name == "fashion-mnist"
    _check_idx_bundle(b, arrays, FASHION_MNIST_MEAN, FASHION_MNIST_STD)


def test_mnist_default_data_dir_from_env(tmp_path, monkeypatch):
    arrays = _write_idx(tmp_path / "somewhere")
    monkeypatch.setenv("ADABATCH_DATA_DIR", str(tmp_path / "somewhere"))
    _check_idx_bundle(load_dataset("mnist"), arrays, MNIST_MEAN, MNIST_STD)


def test_mnist_missing_file(tmp_path):
    _write_idx(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(
        DatasetError,
        match=r"t10k-labels-idx1-ubyte: mnist test labels file "
        r"not found \(looked for t10k-labels-idx1-ubyte\[.gz\]",
    ):
        load_dataset("mnist", tmp_path)


def test_mnist_truncated_images(tmp_path):
    _write_idx(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:1000])
    expected = 16 + 5 * 28 * 28
    with pytest.raises(
        DatasetError,
        match=re.escape(f"{path}: expected {expected} bytes for 5 images of 28x28, found 1000"),
    ):
        load_dataset("mnist", tmp_path)


def test_mnist_short_header_bad_magic_bad_dims(tmp_path):
    _write_idx(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"\x00\x00")
    with pytest.raises(DatasetError, match="16-byte header, found 2 bytes"):
        load_dataset("mnist", tmp_path)
    path.write_bytes(_idx_labels(np.zeros(20)))  # a label file where images belong
    with pytest.raises(
        DatasetError, match=re.escape(f"{path}: bad magic number 2049 (expected 2051")
    ):
        load_dataset("mnist", tmp_path)
    path.write_bytes(_idx_images(np.zeros((5, 32, 32))))
    with pytest.raises(DatasetError, match="expected 5 images of 28x28, header says 32x32"):
        load_dataset("mnist", tmp_path)


def test_mnist_label_errors(tmp_path):
    _write_idx(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(_idx_images(np.zeros((5, 28, 28))))
    with pytest.raises(
        DatasetError, match=re.escape(f"{path}: bad magic number 2051 (expected 2049")
    ):
        load_dataset("mnist", tmp_path)
    path.write_bytes(_idx_labels(np.arange(5))[:-2])
    with pytest.raises(DatasetError, match="expected 13 bytes for 5 labels, found 11"):
        load_dataset("mnist", tmp_path)
    path.write_bytes(_idx_labels(np.arange(4)))
    with pytest.raises(
        DatasetError, match="expected 5 labels to match train-images-idx3-ubyte, found 4"
    ):
        load_dataset("mnist", tmp_path)
    path.write_bytes(_idx_labels(np.array([0, 1, 2, 3, 12])))
    with pytest.raises(DatasetError, match=r"labels must be in 0..9, found 12"):
        load_dataset("mnist", tmp_path)


def test_mnist_corrupt_gzip(tmp_path):
    _write_idx(tmp_path, gz=True)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(DatasetError, match=re.escape(f"{path}: not a valid gzip file")):
        load_dataset("mnist", tmp_path)


# ---------------------------------------------------------------------------------------------
# CIFAR pickles


def _cifar_batch(n, label_key, num_classes, rng, labels_as_list=True):
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=n)
    return {
        b"batch_label": b"testing batch",
        label_key: labels.tolist() if labels_as_list else labels,
        b"data": data,
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


def _write_cifar10(root: Path, sizes=(2, 2, 1, 2, 3), n_test=3, seed=0):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    batches = {}
    for i, n in enumerate(sizes, start=1):
        batches[f"data_batch_{i}"] = _cifar_batch(n, b"labels", 10, rng)
    batches["test_batch"] = _cifar_batch(n_test, b"labels", 10, rng)
    for name, obj in batches.items():
        with open(folder / name, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    return folder, batches


def _cifar_expected(batch, mean, std):
    x = torch.from_numpy(batch[b"data"].astype(np.float32) / 255.0).view(-1, 3, 32, 32)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_cifar10_loads_parent_or_folder(tmp_path):
    folder, batches = _write_cifar10(tmp_path)
    for where in (tmp_path, folder):
        b = load_dataset("cifar10", where)
        assert b.x_train.shape == (10, 3, 32, 32) and b.x_test.shape == (3, 3, 32, 32)
        assert b.num_classes == 10 and b.input_shape == (3, 32, 32)
        train = [batches[f"data_batch_{i}"] for i in range(1, 6)]
        expect = torch.cat([_cifar_expected(t, CIFAR10_MEAN, CIFAR10_STD) for t in train])
        assert torch.allclose(b.x_train, expect, atol=1e-5)
        assert b.y_train.tolist() == [label for t in train for label in t[b"labels"]]
        assert b.y_test.tolist() == batches["test_batch"][b"labels"]
        # channel-major rows: pixel (c, i, j) of sample 0 is data[0, c*1024 + i*32 + j]
        raw = batches["data_batch_1"][b"data"][0]
        c, i, j = 2, 5, 17
        value = (raw[c * 1024 + i * 32 + j] / 255.0 - CIFAR10_MEAN[c]) / CIFAR10_STD[c]
        assert abs(float(b.x_train[0, c, i, j]) - value) < 1e-5
        assert b.augment is not None
    assert load_dataset("cifar10", tmp_path, augment=False).augment is None


def test_cifar10_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"cifar-10-batches-py/data_batch_1: file not found"):
        load_dataset("cifar10", tmp_path)
    folder, batches = _write_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match=r"data_batch_3: file not found \(expected a CIFAR"):
        load_dataset("cifar10", tmp_path)
    path = folder / "data_batch_3"
    good = pickle.dumps(batches["data_batch_3"], protocol=2)
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(
        DatasetError, match=re.escape(f"{path}: not a readable CIFAR python pickle")
    ):
        load_dataset("cifar10", tmp_path)
    path.write_bytes(pickle.dumps({b"data": batches["data_batch_3"][b"data"]}))
    with pytest.raises(DatasetError, match=re.escape(f"{path}: missing key b'labels'")):
        load_dataset("cifar10", tmp_path)
    bad = {**batches["data_batch_3"], b"data": np.zeros((1, 100), dtype=np.uint8)}
    path.write_bytes(pickle.dumps(bad))
    with pytest.raises(
        DatasetError, match=r"uint8 array of shape \(n, 3072\), found uint8 \(1, 100\)"
    ):
        load_dataset("cifar10", tmp_path)
    bad = {**batches["data_batch_3"], b"labels": [10]}
    path.write_bytes(pickle.dumps(bad))
    with pytest.raises(DatasetError, match=r"must be integers in 0..9"):
        load_dataset("cifar10", tmp_path)
    bad = {**batches["data_batch_3"], b"labels": [1, 2]}
    path.write_bytes(pickle.dumps(bad))
    with pytest.raises(DatasetError, match=r"expected 1 labels in b'labels', found shape \(2,\)"):
        load_dataset("cifar10", tmp_path)
    path.write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DatasetError, match=r"expected a pickled dict .* found list"):
        load_dataset("cifar10", tmp_path)


class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/adabatch-should-not-exist"),))


def test_cifar_pickle_refuses_code(tmp_path):
    folder, _ = _write_cifar10(tmp_path)
    target = Path("/tmp/adabatch-should-not-exist")
    target.unlink(missing_ok=True)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": _Evil()}))
    with pytest.raises(DatasetError, match="refusing to load pathlib"):
        load_dataset("cifar10", tmp_path)
    assert not target.exists()


def test_cifar100_fine_and_coarse(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(3)
    objs = {}
    for name, n in (("train", 4), ("test", 2)):
        obj = _cifar_batch(n, b"fine_labels", 100, rng, labels_as_list=False)
        obj[b"coarse_labels"] = rng.integers(0, 20, size=n).tolist()
        objs[name] = obj
        (folder / name).write_bytes(pickle.dumps(obj, protocol=2))
    b = load_dataset("cifar100", tmp_path)
    assert b.num_classes == 100 and b.x_train.shape == (4, 3, 32, 32)
    assert b.y_train.tolist() == objs["train"][b"fine_labels"].tolist()
    assert torch.allclose(
        b.x_test, _cifar_expected(objs["test"], CIFAR100_MEAN, CIFAR100_STD), atol=1e-5
    )
    c = load_dataset("cifar-100", folder, labels="coarse")
    assert c.num_classes == 20 and c.y_test.tolist() == objs["test"][b"coarse_labels"]
    with pytest.raises(ValueError, match="labels must be 'fine' or 'coarse', got 'medium'"):
        load_dataset("cifar100", tmp_path, labels="medium")
    (folder / "test").unlink()
    with pytest.raises(DatasetError, match=r"cifar-100-python/test: file not found"):
        load_dataset("cifar100", tmp_path)


# ---------------------------------------------------------------------------------------------
# augmentation


def test_random_crop_flip_is_a_crop_of_the_padded_image():
    n, c, h, w, pad = 48, 3, 8, 8, 2
    fill = [-1.0, -2.0, -3.0]
    x = torch.randn(n, c, h, w)
    aug = random_crop_flip(pad, fill)
    out = aug(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert torch.equal(out, aug(x, torch.Generator().manual_seed(0)))
    assert not torch.equal(out, aug(x, torch.Generator().manual_seed(1)))
    padded = torch.tensor(fill).view(1, c, 1, 1).repeat(n, 1, h + 2 * pad, w + 2 * pad)
    padded[:, :, pad : pad + h, pad : pad + w] = x
    offsets, flips = set(), 0
    for i in range(n):
        matches = [
            (dy, dx, fl)
            for dy in range(2 * pad + 1)
            for dx in range(2 * pad + 1)
            for fl in (False, True)
            if torch.equal(
                out[i],
                padded[i, :, dy : dy + h, dx : dx + w].flip(-1)
                if fl
                else padded[i, :, dy : dy + h, dx : dx + w],
            )
        ]
        assert len(matches) == 1
        offsets.add(matches[0][:2])
        flips += matches[0][2]
    assert len(offsets) > 5 and 0 < flips < n  # offsets and flips vary over the batch
    with pytest.raises(ValueError, match=r"augment expects a batch of shape \(N, C, H, W\)"):
        aug(x[0], torch.Generator())


def test_regression_loss_squeezes_output():
    b = load_dataset("synthetic", n=20, d=2, seed=0)
    out = torch.zeros(20, 1)
    assert torch.allclose(b.loss(out, b.y_train), (b.y_train**2).mean())
    assert b.loss(out, b.y_train, reduction="none").shape == (20,)
