"""Datasets for the training program, held whole in memory as tensors.

Every loader returns a :class:`DatasetBundle`: the normalised train and test inputs and targets as
tensors (the loop takes a batch with an index gather, ``x_train[idx]``), the task, the number of
classes, the per-sample input shape, an optional batch-level train augmentation written as tensor
ops, and ``extra`` facts about the data (normalisation constants, a known optimum).

Datasets (``list_datasets()``):

Embedded, offline:

* ``digits``: scikit-learn's 8x8 handwritten digits (1797 images, 10 classes). A fixed stratified
  held-out split (``test_fraction=0.2`` of every class, drawn with ``split_seed=0``; the split does
  not depend on the run's ``seed`` so runs stay comparable): 1438 train / 359 test. Pixels are
  scaled to [0, 1] (divided by 16) and then standardised with the mean and standard deviation of
  the training pixels (one scalar each). Shape (1, 8, 8).
* ``mnist1d``: MNIST-1D (Greydanus & Kobak 2020) generated offline by the ``mnist1d`` package's
  ``make_dataset(get_dataset_args())`` (the canonical arguments: 5000 sequences, seed 42, split
  4000 / 1000; ``make_dataset`` never touches the network, unlike ``get_dataset``). The package
  reseeds NumPy's and Python's global generators; this loader saves and restores both. Shape (40,).
* ``synthetic``: regression problems with a known optimum, generated from ``seed`` (options
  ``kind``, ``n``, ``n_test``, ``d``, ``noise``):

  - ``kind="least-squares"``: x ~ N(0, I_d), y = x·w* + b* + noise·ε with ε ~ N(0, 1),
    task "regression" (targets float of shape (n,)). The loss is the mean squared error
    mean_i (f(x_i) − y_i)². ``extra`` holds the planted (``planted_weight``, ``planted_bias``)
    and the exact minimiser of the empirical training loss over (w, b) (``optimal_weight``,
    ``optimal_bias``, from a float64 least-squares solve) with its loss ``optimal_loss``.
  - ``kind="logistic"``: x ~ N(0, I_d), y ~ Bernoulli(σ(x·w* + b*)), each label then flipped
    with probability ``noise`` (default 0), task "classification" with 2 classes (int64 labels).
    ``extra`` holds the planted parameters and the minimiser of the empirical logistic loss
    mean_i log(1 + exp(−s_i (x_i·w + b))) (s_i = ±1) found by Newton's method in float64
    (``optimal_weight``, ``optimal_bias``, ``optimal_loss``). A two-class softmax model trained
    with cross-entropy reaches the same loss value (only the difference of its two rows matters);
    when the classes are separable the minimiser does not exist and these three are ``None``.

Text, byte-level language modelling (task ``"language_model"``):

* ``pydoc``: the text of Python's ``pydoc_data.topics`` (the Python Language Reference topics
  that ``help()`` shows, about 465 KB of English and code; shipped with every CPython, so it is
  on every machine that runs adabatch): ``topics[k]`` joined in sorted key order, encoded as
  UTF-8. The corpus differs slightly between Python versions; ``extra`` records
  ``python_version`` and the corpus's ``sha256`` (compare them before comparing runs).
* ``text``: any local file, read as bytes (UTF-8 text or anything else): ``data_dir`` is the
  file, or a directory whose files matching ``pattern`` (option, default ``"*.txt"``, searched
  recursively) are joined in sorted path order. A missing, empty or too short file raises
  :class:`DatasetError`.

  Both are byte-level (tokens 0..255, ``num_classes=256``) and split by position: the first
  90% of the bytes (``len * 9 // 10``) train, the rest test (the validation split). Each split
  is cut into non-overlapping windows of ``context`` tokens (option, default 64; input shape
  ``(context,)``) whose targets are the next tokens (the window shifted by one), x and y int64
  of shape (n, context). A corpus needs at least ``10 * context + 1`` bytes (one window in the
  test split). The loss is the cross-entropy averaged over the tokens of a sequence and over
  the sequences (every sequence has ``context`` tokens, so the per-sequence losses average to
  the batch loss); the accuracy is the next-token accuracy.

From a local directory (``data_dir``; ``None`` means ``$ADABATCH_DATA_DIR`` or ``./data``):

* ``mnist`` and ``fashion-mnist``: the four IDX files ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (also with
  ``.`` before ``idx``, and each raw or ``.gz``). They are looked for in ``data_dir`` itself, then
  in ``data_dir/MNIST/raw`` (``data_dir/FashionMNIST/raw`` for Fashion-MNIST; torchvision's layout),
  ``data_dir/MNIST``, ``data_dir/mnist``, ``data_dir/fashion-mnist`` and ``data_dir/raw``.
  The magic numbers (2051 images, 2049 labels), the dimensions (28x28), the file lengths and the
  labels are checked. Pixels are scaled to [0, 1] and normalised with the usual constants
  (MNIST mean 0.1307, std 0.3081; Fashion-MNIST 0.2860, 0.3530). Shape (1, 28, 28).
* ``cifar10``: ``cifar-10-batches-py/data_batch_1`` … ``data_batch_5`` and ``test_batch`` (the
  python pickles, dicts with ``b"data"`` (n x 3072 uint8, channel-major) and ``b"labels"``);
  ``data_dir`` may be the ``cifar-10-batches-py`` folder or its parent.
* ``cifar100``: ``cifar-100-python/train`` and ``test`` with ``b"fine_labels"`` (100 classes;
  option ``labels="coarse"`` takes ``b"coarse_labels"``, 20 classes).

  CIFAR pixels are normalised per channel with the training set's per-channel pixel mean and
  standard deviation (CIFAR-10: mean (0.4914, 0.4822, 0.4465), std (0.2470, 0.2435, 0.2616), the
  constants the AdAdaGrad authors' code uses for its ViT runs; CIFAR-100: mean
  (0.5071, 0.4865, 0.4409), std (0.2673, 0.2564, 0.2762)). The train augmentation (``augment``,
  on by default, option ``augment=False``) is the standard one: a random 32x32 crop of the image
  zero-padded by 4 pixels (padding with raw black, as torchvision's ``RandomCrop(32, padding=4)``
  before normalisation) and a horizontal flip with probability 1/2, as batched tensor ops.
  The pickles are read with an unpickler that only accepts NumPy arrays and plain containers.

Missing, truncated or malformed files raise :class:`DatasetError` (a ``ValueError``) naming the
file and what was expected. Unknown names and options raise ``ValueError``.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import math
import os
import pickle
import random
import struct
import sys
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from adabatch._validation import check_choice, check_int, check_real

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "TASKS",
    "DatasetBundle",
    "DatasetError",
    "default_data_dir",
    "list_datasets",
    "load_dataset",
    "option_kinds",
    "random_crop_flip",
    "task_loss",
]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
CIFAR10_MEAN = (0.49139968, 0.48215841, 0.44653091)
CIFAR10_STD = (0.24703223, 0.24348513, 0.26158784)
CIFAR100_MEAN = (0.50707516, 0.48654887, 0.44091784)
CIFAR100_STD = (0.26733429, 0.25643846, 0.27615047)

IDX_IMAGE_MAGIC = 2051
IDX_LABEL_MAGIC = 2049


#: The tasks a :class:`DatasetBundle` may have (the loss of each: :func:`task_loss`).
TASKS = ("classification", "regression", "language_model")


class DatasetError(ValueError):
    """A dataset file is missing, truncated or malformed (the message names the file)."""


Augment = Callable[[Tensor, torch.Generator], Tensor]


@dataclass
class DatasetBundle:
    """A whole dataset as tensors: what a loader, built-in or the user's own
    (``--dataset package.module:factory``), returns.

    Construct one from your tensors (keywords; ``input_shape`` defaults to the per-sample shape
    of ``x_train``)::

        DatasetBundle(name="mine", x_train=x, y_train=y, x_test=xt, y_test=yt,
                      task="classification", num_classes=10)

    ``x_*`` are floating-point of shape ``(n, *input_shape)`` (float32 for the built-in models);
    ``y_*`` are int64 class indices in ``[0, num_classes)`` of shape ``(n,)`` for
    classification and floating-point of shape ``(n,)`` for regression (``num_classes=1``; a
    model's output of shape ``(n, 1)`` is compared with ``y`` reshaped to its shape; :meth:`loss`
    does that). For ``task="language_model"`` both ``x_*`` and ``y_*`` are int64 token ids in
    ``[0, num_classes)`` of shape ``(n, T)`` (``y``: the next tokens) and the model's output
    is ``(n, T, num_classes)`` logits. The test split may be empty (``n = 0``: nothing is
    evaluated).
    ``augment(x, generator)``, when not ``None``, maps a batch of training inputs to an augmented
    batch of the same shape, deterministically given the generator's state (its random numbers
    are drawn on the generator's device and moved to ``x``'s). ``extra``: facts about the data
    (normalisation constants, a known optimum). A wrong type raises TypeError and a wrong
    value ValueError, naming the field.
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    task: str
    num_classes: int
    input_shape: tuple[int, ...] = None  # type: ignore[assignment]  # None: x_train's
    augment: Augment | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be 'classification', 'regression' or "
                             f"'language_model', got {self.task!r}")
        for split in ("train", "test"):
            for kind in ("x", "y"):
                value = getattr(self, f"{kind}_{split}")
                if not isinstance(value, Tensor):
                    raise TypeError(f"{self.name}: {kind}_{split} must be a torch.Tensor, got "
                                    f"{type(value).__name__}")
        if self.input_shape is None:
            self.input_shape = tuple(self.x_train.shape[1:])
        self.input_shape = tuple(int(n) for n in self.input_shape)
        self.num_classes = check_int("num_classes", self.num_classes, 1)
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.shape[0] != y.shape[0]:
                raise ValueError(
                    f"{self.name}: x_{split} has {x.shape[0]} samples but y_{split} has "
                    f"{y.shape[0]}"
                )
            if tuple(x.shape[1:]) != tuple(self.input_shape):
                raise ValueError(
                    f"{self.name}: x_{split} has per-sample shape {tuple(x.shape[1:])}, "
                    f"expected {tuple(self.input_shape)}"
                )
            self._check_values(split, x, y)

    def _check_tokens(self, split: str, x: Tensor, y: Tensor) -> None:
        for kind, t in (("x", x), ("y", y)):
            if t.dtype != torch.int64 or t.dim() != 2:
                raise ValueError(f"{self.name}: {kind}_{split} of a language model must be "
                                 f"int64 token ids of shape (n, T), got {t.dtype} "
                                 f"{tuple(t.shape)}")
            if t.numel() and not (0 <= int(t.min()) and int(t.max()) < self.num_classes):
                raise ValueError(f"{self.name}: {kind}_{split} holds tokens in "
                                 f"[{int(t.min())}, {int(t.max())}], outside "
                                 f"[0, num_classes={self.num_classes})")
        if x.shape != y.shape:
            raise ValueError(f"{self.name}: y_{split} has shape {tuple(y.shape)}, expected "
                             f"x_{split}'s {tuple(x.shape)}")

    def _check_values(self, split: str, x: Tensor, y: Tensor) -> None:
        if self.task == "language_model":
            self._check_tokens(split, x, y)
            return
        if not x.is_floating_point():
            raise ValueError(f"{self.name}: x_{split} must be floating-point, got {x.dtype}")
        if y.dim() != 1:
            raise ValueError(f"{self.name}: y_{split} must have shape (n,), got "
                             f"{tuple(y.shape)}")
        if self.task == "regression":
            if not y.is_floating_point():
                raise ValueError(f"{self.name}: y_{split} of a regression must be "
                                 f"floating-point, got {y.dtype}")
            return
        if y.dtype != torch.int64:
            raise ValueError(f"{self.name}: y_{split} of a classification must be int64 class "
                             f"indices, got {y.dtype}")
        if len(y) and not (0 <= int(y.min()) and int(y.max()) < self.num_classes):
            raise ValueError(f"{self.name}: y_{split} holds labels in [{int(y.min())}, "
                             f"{int(y.max())}], outside [0, num_classes={self.num_classes})")

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.x_test.shape[0])

    def loss(self, output: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        """The task's loss (:func:`task_loss`): the one the trainer trains and evaluates with."""
        return task_loss(self.task, output, target, reduction)


def task_loss(task: str, output: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """Cross-entropy for classification, squared error for regression (the output reshaped
    to the target's shape, so an ``(n, 1)`` output fits an ``(n,)`` target), in float32
    whatever the output's dtype (bf16 autocast).

    ``"language_model"``: output ``(n, T, V)``, target ``(n, T)``; a sequence's loss is the
    mean cross-entropy of its T tokens; ``"mean"`` averages the sequences (= the mean over
    all tokens), ``"sum"`` sums them (n times the mean) and ``"none"`` returns the n
    per-sequence losses; float64 logits stay float64."""
    if task == "language_model":
        if output.dim() != 3 or target.dim() != 2 or output.shape[:2] != target.shape:
            raise ValueError(f"language_model loss: output (n, T, V) and target (n, T) "
                             f"expected, got {tuple(output.shape)} and {tuple(target.shape)}")
        n, t = target.shape
        logits = output if output.dtype == torch.float64 else output.float()
        per_token = F.cross_entropy(logits.flatten(0, 1), target.flatten(),
                                    reduction="mean" if reduction == "mean" else "none")
        if reduction == "mean":
            return per_token
        per_sequence = per_token.view(n, t).mean(dim=1)
        return per_sequence.sum() if reduction == "sum" else per_sequence
    if task == "classification":
        return F.cross_entropy(output.float(), target, reduction=reduction)
    return F.mse_loss(output.reshape(target.shape).float(), target.float(), reduction=reduction)


# --------------------------------------------------------------------------------------------
# registry


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return sorted(_LOADERS)


def default_data_dir() -> Path:
    """``$ADABATCH_DATA_DIR`` when set, else ``./data``."""
    return Path(os.environ.get("ADABATCH_DATA_DIR", "data"))


def _resolve(name: str) -> str:
    key = name.lower().replace("_", "-")
    key = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar-100": "cifar100"}.get(
        key, key
    )
    if key not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; choose from: {', '.join(list_datasets())}")
    return key


def option_kinds(name: str) -> dict[str, Any]:
    """The types each option of dataset ``name`` accepts (from its loader's signature; see
    :mod:`adabatch.train.options`); ValueError for an unknown name."""
    from adabatch.train.options import factory_options, import_factory, is_factory, kinds_of

    if is_factory(name):
        factory = import_factory(name, "dataset")
        return kinds_of(factory, factory_options(factory, 2)[0])
    loader, allowed = _LOADERS[_resolve(name)]
    return kinds_of(loader, allowed)


def load_dataset(
    name: str, data_dir: str | Path | None = None, *, seed: int = 0, **options: Any
) -> DatasetBundle:
    """Load dataset ``name`` (see the module docstring for names, options and file layouts).

    ``seed`` seeds generated data (``synthetic``); the embedded splits are fixed. Unknown options
    raise ``ValueError``; missing or malformed files raise :class:`DatasetError`.

    ``name`` may also be the user's own loader, ``package.module:factory``: a callable
    ``factory(data_dir: Path | None, seed: int, **data_options) -> DatasetBundle``. A module
    that does not import, a missing attribute, an option the factory does not take, an
    exception inside it or a return value that is not a :class:`DatasetBundle` raise a
    ``ValueError`` of one line naming the factory.
    """
    if ":" in name:
        return _load_from_factory(name, data_dir, seed, options)
    key = _resolve(name)
    loader, allowed = _LOADERS[key]
    unknown = sorted(set(options) - allowed)
    if unknown:
        allowed_txt = ", ".join(sorted(allowed)) if allowed else "none"
        raise ValueError(
            f"unknown option(s) for dataset {key!r}: {', '.join(unknown)} (allowed: {allowed_txt})"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    directory = Path(data_dir) if data_dir is not None else None
    return loader(directory, seed, **options)


def _load_from_factory(spec: str, data_dir: str | Path | None, seed: int,
                       options: dict[str, Any]) -> DatasetBundle:
    from adabatch.train.options import call_factory, check_factory_options, import_factory

    factory = import_factory(spec, "dataset")
    where = f"dataset factory {spec!r}"
    check_factory_options(where, factory, 2, options)
    directory = Path(data_dir) if data_dir is not None else None
    bundle = call_factory(where, factory, directory, seed, **options)
    if not isinstance(bundle, DatasetBundle):
        raise ValueError(f"{where} returned a {type(bundle).__name__}; it must return an "
                         "adabatch.train.data.DatasetBundle")
    return bundle


# --------------------------------------------------------------------------------------------
# embedded datasets


def _stratified_split(
    y: np.ndarray, test_fraction: float, split_seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and test indices with round(test_fraction * count) test samples per class."""
    rng = np.random.Generator(np.random.PCG64(split_seed))
    train, test = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(idx.size)]
        k = round(test_fraction * idx.size)
        test.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (1797, 8, 8) float64 pixels in 0..16 and int64 labels.

    Reads the CSV that ships with scikit-learn directly (importing ``sklearn.datasets`` costs
    seconds); falls back to ``sklearn.datasets.load_digits`` if the file is not where expected.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise ValueError("dataset 'digits' needs scikit-learn: pip install scikit-learn")
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    try:
        table = np.loadtxt(csv, delimiter=",")
        if table.shape != (1797, 65):
            raise ValueError(f"unexpected shape {table.shape}")
        images, labels = table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    except (OSError, ValueError):
        from sklearn.datasets import load_digits

        raw = load_digits()
        images = np.asarray(raw.images, dtype=np.float64)
        labels = np.asarray(raw.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _load_digits(
    data_dir: Path | None, seed: int, test_fraction: float = 0.2, split_seed: int = 0
) -> DatasetBundle:
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    images, labels = _digits_arrays()
    images = images / 16.0
    tr, te = _stratified_split(labels, float(test_fraction), int(split_seed))
    mean = float(images[tr].mean())
    std = float(images[tr].std())
    x = torch.from_numpy(((images - mean) / std).astype(np.float32)).unsqueeze(1)
    y = torch.tensor(labels)
    return DatasetBundle(
        name="digits",
        x_train=x[tr].contiguous(),
        y_train=y[tr].contiguous(),
        x_test=x[te].contiguous(),
        y_test=y[te].contiguous(),
        task="classification",
        num_classes=10,
        input_shape=(1, 8, 8),
        extra={
            "mean": mean,
            "std": std,
            "test_fraction": float(test_fraction),
            "split_seed": int(split_seed),
        },
    )


@lru_cache(maxsize=1)
def _mnist1d_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    np_state = np.random.get_state()
    py_state = random.getstate()
    try:
        d = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    arrays = (
        np.asarray(d["x"], dtype=np.float32),
        np.asarray(d["y"], dtype=np.int64),
        np.asarray(d["x_test"], dtype=np.float32),
        np.asarray(d["y_test"], dtype=np.int64),
    )
    for a in arrays:
        a.setflags(write=False)
    return arrays


def _load_mnist1d(data_dir: Path | None, seed: int) -> DatasetBundle:
    x, y, xt, yt = _mnist1d_arrays()
    return DatasetBundle(
        name="mnist1d",
        x_train=torch.tensor(x),
        y_train=torch.tensor(y),
        x_test=torch.tensor(xt),
        y_test=torch.tensor(yt),
        task="classification",
        num_classes=10,
        input_shape=(x.shape[1],),
        extra={"generator": "mnist1d.data.make_dataset(get_dataset_args())"},
    )


def _logistic_optimum(
    x: np.ndarray, s: np.ndarray, iters: int = 100
) -> tuple[np.ndarray, float, float] | None:
    """Newton's method with backtracking for min mean log(1 + exp(-s (X w + b)))."""
    n, d = x.shape
    a = np.concatenate([x, np.ones((n, 1))], axis=1)

    def loss(theta: np.ndarray) -> float:
        return float(np.mean(np.logaddexp(0.0, -s * (a @ theta))))

    theta = np.zeros(d + 1)
    f = loss(theta)
    for _ in range(iters):
        m = s * (a @ theta)
        p = 0.5 * (1.0 - np.tanh(0.5 * m))  # sigmoid(-m), stable
        grad = -(a.T @ (s * p)) / n
        if np.linalg.norm(grad) < 1e-12:
            return _checked_logistic(a, s, theta, f)
        h = (a.T * (p * (1.0 - p))) @ a / n
        try:
            step = np.linalg.solve(h, grad)
        except np.linalg.LinAlgError:
            return None
        t = 1.0
        while t > 1e-12:
            new = theta - t * step
            fn = loss(new)
            if fn <= f - 1e-4 * t * float(grad @ step):
                break
            t *= 0.5
        else:
            break
        if np.max(np.abs(new)) > 1e6:  # diverging: separable data, no minimiser
            return None
        theta, f = new, fn
    return _checked_logistic(a, s, theta, f)


def _checked_logistic(
    a: np.ndarray, s: np.ndarray, theta: np.ndarray, f: float
) -> tuple[np.ndarray, float, float] | None:
    """theta if it is a minimiser: a stationary point that does not separate the classes (a
    separating theta can always be scaled up to lower the loss, so then none exists)."""
    n, d = a.shape
    m = s * (a @ theta)
    if np.all(m > 0):
        return None
    p = 0.5 * (1.0 - np.tanh(0.5 * m))
    if np.linalg.norm((a.T @ (s * p)) / n) < 1e-8:
        return theta[: d - 1], float(theta[d - 1]), f
    return None


def _synthetic_options(
    kind: Any, n: Any, n_test: Any, d: Any, noise: Any
) -> tuple[str, int, int, int, float]:
    """The checked options of the synthetic data set (TypeError/ValueError naming one)."""
    if not isinstance(kind, str):
        raise TypeError(f"Invalid kind: {kind!r} (must be a string)")
    kind = check_choice("kind", kind.lower().replace("_", "-"), ("least-squares", "logistic"))
    n = check_int("n", n)
    d = check_int("d", d)
    n_test = check_int("n_test", max(n // 4, 1) if n_test is None else n_test)
    if noise is None:
        noise = 0.1 if kind == "least-squares" else 0.0
    noise = check_real("noise", noise, minimum=0.0)
    if kind == "logistic" and noise > 0.5:
        raise ValueError(f"noise (the label-flip probability) must be <= 0.5, got {noise!r}")
    if kind == "least-squares" and n < d + 1:
        raise ValueError(f"least-squares needs n >= d + 1 for a unique optimum, got n={n}, d={d}")
    return kind, n, n_test, d, noise


def _least_squares_targets(
    rng: np.random.Generator, x: np.ndarray, z: np.ndarray, n: int, noise: float,
    extra: dict[str, Any],
) -> Tensor:
    """Noisy linear targets; the training set's least-squares optimum goes into ``extra``."""
    d = x.shape[1]
    y = z + noise * rng.standard_normal(len(z))
    a = np.concatenate([x[:n], np.ones((n, 1))], axis=1)
    theta, *_ = np.linalg.lstsq(a, y[:n], rcond=None)
    resid = a @ theta - y[:n]
    extra.update(
        optimal_weight=torch.tensor(theta[:d]),
        optimal_bias=float(theta[d]),
        optimal_loss=float(np.mean(resid**2)),
        loss="mean squared error: mean_i (x_i·w + b − y_i)²",
    )
    return torch.tensor(y, dtype=torch.float32)


def _logistic_targets(
    rng: np.random.Generator, x: np.ndarray, z: np.ndarray, n: int, noise: float,
    extra: dict[str, Any],
) -> Tensor:
    """Bernoulli labels with flip probability ``noise``; the training set's logistic optimum
    (None when the classes are separable) goes into ``extra``."""
    total = len(z)
    prob = 1.0 / (1.0 + np.exp(-z))
    labels = (rng.random(total) < prob).astype(np.int64)
    flip = rng.random(total) < noise
    labels = np.where(flip, 1 - labels, labels)
    opt = _logistic_optimum(x[:n], 2.0 * labels[:n] - 1.0)
    if opt is None:
        extra.update(optimal_weight=None, optimal_bias=None, optimal_loss=None)
    else:
        extra.update(optimal_weight=torch.tensor(opt[0]), optimal_bias=opt[1], optimal_loss=opt[2])
    extra["loss"] = "mean logistic loss: mean_i log(1 + exp(−s_i (x_i·w + b))), s_i = 2y_i − 1"
    return torch.tensor(labels)


def _load_synthetic(
    data_dir: Path | None,
    seed: int,
    kind: str = "least-squares",
    n: int = 1000,
    n_test: int | None = None,
    d: int = 20,
    noise: float | None = None,
) -> DatasetBundle:
    kind, n, n_test, d, noise = _synthetic_options(kind, n, n_test, d, noise)
    rng = np.random.Generator(np.random.PCG64(seed))
    scale = 1.0 if kind == "least-squares" else 2.0
    w_star = rng.standard_normal(d) * (scale / math.sqrt(d))
    b_star = float(rng.standard_normal() * 0.5)
    x = rng.standard_normal((n + n_test, d))
    z = x @ w_star + b_star
    extra: dict[str, Any] = {
        "kind": kind,
        "noise": noise,
        "planted_weight": torch.tensor(w_star),
        "planted_bias": b_star,
    }
    if kind == "least-squares":
        y_t = _least_squares_targets(rng, x, z, n, noise, extra)
        task, num_classes = "regression", 1
    else:
        y_t = _logistic_targets(rng, x, z, n, noise, extra)
        task, num_classes = "classification", 2
    x_t = torch.tensor(x, dtype=torch.float32)
    return DatasetBundle(
        name="synthetic",
        x_train=x_t[:n].contiguous(),
        y_train=y_t[:n].contiguous(),
        x_test=x_t[n:].contiguous(),
        y_test=y_t[n:].contiguous(),
        task=task,
        num_classes=num_classes,
        input_shape=(d,),
        extra=extra,
    )


# --------------------------------------------------------------------------------------------
# text (byte-level language modelling)


def _pydoc_corpus() -> bytes:
    from pydoc_data.topics import topics

    return "".join(topics[k] for k in sorted(topics)).encode("utf-8")


def _byte_windows(tokens: Tensor, context: int) -> tuple[Tensor, Tensor]:
    """Non-overlapping windows of ``context`` tokens and their next tokens."""
    n = (len(tokens) - 1) // context
    x = tokens[: n * context].reshape(n, context)
    y = tokens[1 : n * context + 1].reshape(n, context)
    return x.contiguous(), y.contiguous()


def _byte_bundle(name: str, corpus: bytes, context: int, where: str,
                 extra: dict[str, Any]) -> DatasetBundle:
    """Byte tokens split by position (first 90% train) into windows of ``context``."""
    context = check_int("context", context, 1)
    if len(corpus) == 0:
        raise DatasetError(f"{where}: empty (no text to train on)")
    if len(corpus) < 10 * context + 1:
        raise DatasetError(f"{where}: {len(corpus)} bytes is too short for context={context} "
                           f"(needs at least {10 * context + 1} bytes: one window of "
                           f"{context + 1} in the last 10%)")
    tokens = torch.frombuffer(bytearray(corpus), dtype=torch.uint8).to(torch.int64)
    cut = len(tokens) * 9 // 10
    x_train, y_train = _byte_windows(tokens[:cut], context)
    x_test, y_test = _byte_windows(tokens[cut:], context)
    facts = {"bytes": len(corpus), "sha256": hashlib.sha256(corpus).hexdigest(),
             "context": context, "train_bytes": cut, "test_bytes": len(corpus) - cut,
             "vocabulary": "bytes (256)"}
    return DatasetBundle(name=name, x_train=x_train, y_train=y_train, x_test=x_test,
                         y_test=y_test, task="language_model", num_classes=256,
                         input_shape=(context,), extra={**facts, **extra})


def _load_pydoc(data_dir: Path | None, seed: int, context: int = 64) -> DatasetBundle:
    version = ".".join(map(str, sys.version_info[:3]))
    return _byte_bundle("pydoc", _pydoc_corpus(), context, "pydoc_data.topics",
                        {"corpus": "pydoc_data.topics (sorted keys, UTF-8)",
                         "python_version": version})


def _text_files(root: Path, pattern: str) -> list[Path]:
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DatasetError(f"{root}: file or directory not found (dataset 'text' reads a text "
                           "file, or the files of a directory)")
    files = sorted(p for p in root.rglob(pattern) if p.is_file())
    if not files:
        raise DatasetError(f"{root}: no file matching {pattern!r} (dataset 'text' reads a "
                           "file, or a directory's files matching the option pattern)")
    return files


def _load_text(data_dir: Path | None, seed: int, context: int = 64,
               pattern: str = "*.txt") -> DatasetBundle:
    if not isinstance(pattern, str):
        raise TypeError(f"Invalid pattern: {pattern!r} (must be a string)")
    if not pattern:
        raise ValueError("Invalid pattern: '' (must be a glob pattern such as '*.txt')")
    root = data_dir if data_dir is not None else default_data_dir()
    files = _text_files(root, pattern)
    parts = []
    for path in files:
        try:
            parts.append(path.read_bytes())
        except OSError as e:
            raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from e
    corpus = b"".join(parts)
    where = str(root) if len(files) == 1 else f"{root} ({len(files)} files)"
    return _byte_bundle("text", corpus, context, where,
                        {"files": [str(p) for p in files]})


# --------------------------------------------------------------------------------------------
# files


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when its name ends in .gz."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read ({e.strerror or e})") from e
    if path.suffix == ".gz":
        try:
            return gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DatasetError(f"{path}: not a valid gzip file ({e})") from e
    return data


def _candidate_dirs(root: Path, subdirs: Sequence[str]) -> list[Path]:
    dirs = [root] + [root / s for s in subdirs]
    seen, out = set(), []
    for d in dirs:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def _find_file(root: Path, names: Sequence[str], subdirs: Sequence[str], what: str) -> Path:
    """The first of ``names`` (raw or .gz) found in root or one of root/subdirs."""
    dirs = _candidate_dirs(root, subdirs)
    for d in dirs:
        for name in names:
            for candidate in (d / name, d / (name + ".gz")):
                if candidate.is_file():
                    return candidate
    looked = ", ".join(str(d) for d in dirs)
    raise DatasetError(
        f"{root / names[0]}: {what} file not found (looked for {names[0]}[.gz] in {looked})"
    )


def _parse_idx_images(path: Path) -> np.ndarray:
    data = _read_bytes(path)
    if len(data) < 16:
        raise DatasetError(
            f"{path}: expected an IDX image file with a 16-byte header, found {len(data)} bytes"
        )
    magic, n, rows, cols = struct.unpack(">iiii", data[:16])
    if magic != IDX_IMAGE_MAGIC:
        raise DatasetError(
            f"{path}: bad magic number {magic} (expected {IDX_IMAGE_MAGIC} for an IDX "
            f"file of unsigned-byte images)"
        )
    if (rows, cols) != (28, 28) or n < 0:
        raise DatasetError(f"{path}: expected {n} images of 28x28, header says {rows}x{cols}")
    expected = 16 + n * rows * cols
    if len(data) != expected:
        raise DatasetError(
            f"{path}: expected {expected} bytes for {n} images of {rows}x{cols}, found {len(data)}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=16).reshape(n, rows, cols)


def _parse_idx_labels(path: Path, num_classes: int) -> np.ndarray:
    data = _read_bytes(path)
    if len(data) < 8:
        raise DatasetError(
            f"{path}: expected an IDX label file with an 8-byte header, found {len(data)} bytes"
        )
    magic, n = struct.unpack(">ii", data[:8])
    if magic != IDX_LABEL_MAGIC:
        raise DatasetError(
            f"{path}: bad magic number {magic} (expected {IDX_LABEL_MAGIC} for an IDX "
            f"file of unsigned-byte labels)"
        )
    if n < 0 or len(data) != 8 + n:
        raise DatasetError(f"{path}: expected {8 + n} bytes for {n} labels, found {len(data)}")
    labels = np.frombuffer(data, dtype=np.uint8, offset=8).astype(np.int64)
    if labels.size and int(labels.max()) >= num_classes:
        raise DatasetError(
            f"{path}: labels must be in 0..{num_classes - 1}, found {int(labels.max())}"
        )
    return labels


def _idx_names(prefix: str, kind: str) -> list[str]:
    return [f"{prefix}-{kind}", f"{prefix}-{kind.replace('-idx', '.idx')}"]


def _load_idx_dataset(
    data_dir: Path | None, name: str, mean: float, std: float, subdirs: Sequence[str]
) -> DatasetBundle:
    root = data_dir if data_dir is not None else default_data_dir()
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        img_path = _find_file(
            root, _idx_names(prefix, "images-idx3-ubyte"), subdirs, f"{name} {split} images"
        )
        lbl_path = _find_file(
            root, _idx_names(prefix, "labels-idx1-ubyte"), subdirs, f"{name} {split} labels"
        )
        images = _parse_idx_images(img_path)
        labels = _parse_idx_labels(lbl_path, 10)
        if images.shape[0] != labels.shape[0]:
            raise DatasetError(
                f"{lbl_path}: expected {images.shape[0]} labels to match {img_path.name}, "
                f"found {labels.shape[0]}"
            )
        x = torch.from_numpy(images.copy()).to(torch.float32).div_(255.0)
        x = x.sub_(mean).div_(std).unsqueeze(1)
        splits[split] = (x, torch.from_numpy(labels))
    return DatasetBundle(
        name=name,
        x_train=splits["train"][0],
        y_train=splits["train"][1],
        x_test=splits["test"][0],
        y_test=splits["test"][1],
        task="classification",
        num_classes=10,
        input_shape=(1, 28, 28),
        extra={"mean": mean, "std": std},
    )


def _load_mnist(data_dir: Path | None, seed: int) -> DatasetBundle:
    return _load_idx_dataset(
        data_dir, "mnist", MNIST_MEAN, MNIST_STD, ("MNIST/raw", "MNIST", "mnist", "raw")
    )


def _load_fashion_mnist(data_dir: Path | None, seed: int) -> DatasetBundle:
    return _load_idx_dataset(
        data_dir,
        "fashion-mnist",
        FASHION_MNIST_MEAN,
        FASHION_MNIST_STD,
        ("FashionMNIST/raw", "FashionMNIST", "fashion-mnist", "fashion_mnist", "raw"),
    )


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles NumPy arrays and plain containers only (no arbitrary code)."""

    _ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("builtins", "bytes"),
            ("builtins", "bytearray"),
            ("_codecs", "encode"),
            ("copyreg", "_reconstructor"),
        }
    )

    #: Python 2 module names that protocol 0-2 pickles written by Python 3 also use
    _PY2_NAMES: ClassVar[dict[str, str]] = {"__builtin__": "builtins", "copy_reg": "copyreg"}

    def find_class(self, module: str, name: str) -> Any:
        module = self._PY2_NAMES.get(module, module)  # before the allow-list, not after
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core."):  # pickles from NumPy 1; same objects in NumPy 2
            try:
                import numpy._core  # noqa: F401

                module = "numpy._core." + module.split(".", 2)[2]
            except ImportError:
                pass
        return super().find_class(module, name)


def _read_cifar_pickle(
    path: Path, label_key: bytes, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DatasetError(f"{path}: file not found (expected a CIFAR python pickle batch)")
    raw = _read_bytes(path)
    try:
        obj = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as e:  # truncated or not a pickle: many exception types
        raise DatasetError(
            f"{path}: not a readable CIFAR python pickle ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(obj, dict):
        raise DatasetError(
            f"{path}: expected a pickled dict with b'data' and {label_key!r}, "
            f"found {type(obj).__name__}"
        )
    for key in (b"data", label_key):
        if key not in obj and key.decode() in obj:
            obj[key] = obj[key.decode()]
        if key not in obj:
            raise DatasetError(f"{path}: missing key {key!r} (expected b'data' and {label_key!r})")
    data = np.asarray(obj[b"data"])
    labels = np.asarray(obj[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DatasetError(
            f"{path}: expected b'data' to be a uint8 array of shape (n, 3072), "
            f"found {data.dtype} {data.shape}"
        )
    if labels.ndim != 1 or labels.shape[0] != data.shape[0]:
        raise DatasetError(
            f"{path}: expected {data.shape[0]} labels in {label_key!r}, found shape {labels.shape}"
        )
    if labels.size and (
        not np.issubdtype(labels.dtype, np.integer)
        or int(labels.min()) < 0
        or int(labels.max()) >= num_classes
    ):
        raise DatasetError(
            f"{path}: labels in {label_key!r} must be integers in 0..{num_classes - 1}"
        )
    return data, labels.astype(np.int64)


def random_crop_flip(padding: int, fill: Sequence[float], flip: bool = True) -> Augment:
    """A batched random crop (from the image padded by ``padding`` with per-channel ``fill``)
    followed by a random horizontal flip with probability 1/2, as tensor ops.

    The returned function maps ``(x, generator)`` with ``x`` of shape (N, C, H, W) to a new tensor
    of the same shape; all random numbers come from ``generator``.
    """
    fill_t = torch.tensor(list(fill), dtype=torch.float32)

    def augment(x: Tensor, generator: torch.Generator) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"augment expects a batch of shape (N, C, H, W), got {tuple(x.shape)}")
        n, c, h, w = x.shape
        gdev = generator.device
        offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=gdev)
        flips = torch.rand(n, generator=generator, device=gdev) < 0.5
        offsets, flips = offsets.to(x.device), flips.to(x.device)
        padded = (
            fill_t.to(device=x.device, dtype=x.dtype)
            .view(1, c, 1, 1)
            .expand(n, c, h + 2 * padding, w + 2 * padding)
            .clone()
        )
        padded[:, :, padding : padding + h, padding : padding + w] = x
        rows = offsets[0].view(n, 1) + torch.arange(h, device=x.device).view(1, h)
        cols = offsets[1].view(n, 1) + torch.arange(w, device=x.device).view(1, w)
        if flip:
            cols = torch.where(flips.view(n, 1), cols.flip(1), cols)
        batch = torch.arange(n, device=x.device).view(n, 1, 1)
        out = padded.permute(0, 2, 3, 1)[batch, rows.view(n, h, 1), cols.view(n, 1, w)]
        return out.permute(0, 3, 1, 2).contiguous()

    return augment


def _cifar_bundle(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: bool,
) -> DatasetBundle:
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def to_x(a: np.ndarray) -> Tensor:
        x = torch.from_numpy(a).view(-1, 3, 32, 32).to(torch.float32).div_(255.0)
        return x.sub_(m).div_(s)

    fill = [-mi / si for mi, si in zip(mean, std)]  # a raw black pixel after normalisation
    return DatasetBundle(
        name=name,
        x_train=to_x(train[0]),
        y_train=torch.from_numpy(train[1]),
        x_test=to_x(test[0]),
        y_test=torch.from_numpy(test[1]),
        task="classification",
        num_classes=num_classes,
        input_shape=(3, 32, 32),
        augment=random_crop_flip(4, fill) if augment else None,
        extra={"mean": tuple(mean), "std": tuple(std)},
    )


def _cifar_dir(root: Path, folder: str, marker: str) -> Path:
    if (root / marker).is_file() or (root / (marker + ".gz")).is_file():
        return root
    if (root / folder).is_dir():
        return root / folder
    raise DatasetError(
        f"{root / folder / marker}: file not found (expected the {folder} folder, or its "
        f"contents, in {root})"
    )


def _maybe_gz(path: Path) -> Path:
    gz = path.with_name(path.name + ".gz")
    return gz if not path.is_file() and gz.is_file() else path


def _load_cifar10(data_dir: Path | None, seed: int, augment: bool = True) -> DatasetBundle:
    root = _cifar_dir(
        data_dir if data_dir is not None else default_data_dir(),
        "cifar-10-batches-py",
        "data_batch_1",
    )
    parts = [
        _read_cifar_pickle(_maybe_gz(root / f"data_batch_{i}"), b"labels", 10) for i in range(1, 6)
    ]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    test = _read_cifar_pickle(_maybe_gz(root / "test_batch"), b"labels", 10)
    return _cifar_bundle("cifar10", train, test, 10, CIFAR10_MEAN, CIFAR10_STD, bool(augment))


def _load_cifar100(
    data_dir: Path | None, seed: int, augment: bool = True, labels: str = "fine"
) -> DatasetBundle:
    if labels not in ("fine", "coarse"):
        raise ValueError(f"labels must be 'fine' or 'coarse', got {labels!r}")
    key, k = (b"fine_labels", 100) if labels == "fine" else (b"coarse_labels", 20)
    root = _cifar_dir(
        data_dir if data_dir is not None else default_data_dir(), "cifar-100-python", "train"
    )
    train = _read_cifar_pickle(_maybe_gz(root / "train"), key, k)
    test = _read_cifar_pickle(_maybe_gz(root / "test"), key, k)
    return _cifar_bundle("cifar100", train, test, k, CIFAR100_MEAN, CIFAR100_STD, bool(augment))


_LOADERS: dict[str, tuple[Callable[..., DatasetBundle], set[str]]] = {
    "digits": (_load_digits, {"test_fraction", "split_seed"}),
    "mnist1d": (_load_mnist1d, set()),
    "synthetic": (_load_synthetic, {"kind", "n", "n_test", "d", "noise"}),
    "mnist": (_load_mnist, set()),
    "fashion-mnist": (_load_fashion_mnist, set()),
    "cifar10": (_load_cifar10, {"augment"}),
    "cifar100": (_load_cifar100, {"augment", "labels"}),
    "pydoc": (_load_pydoc, {"context"}),
    "text": (_load_text, {"context", "pattern"}),
}
