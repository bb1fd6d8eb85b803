"""Models for the training program.

``create_model(name, input_shape, num_classes, norm="group", **options)`` builds one of
(``list_models()``):

* ``logistic``: flatten, then one ``Linear(prod(input_shape), num_classes)`` (multinomial logistic
  regression; least squares when ``num_classes == 1``).
* ``mlp``: flatten, then ``Linear``+ReLU for each width in ``hidden`` (default ``(128,)``), then a
  ``Linear`` to ``num_classes``.
* ``cnn``: the AdAdaGrad paper's MNIST CNN, as in the authors' code (``MNISTModule`` in
  ``modules.py`` of github.com/timlautk/AdAdaGrad): Conv2d(C→16, 5x5, stride 1, padding 2), ReLU,
  MaxPool 2x2, Conv2d(16→32, 5x5, stride 1, padding 2), ReLU, MaxPool 2x2, flatten,
  Linear(32·⌊⌊H/2⌋/2⌋·⌊⌊W/2⌋/2⌋ → num_classes). On 28x28 MNIST that is Linear(1568 → 10) and
  28,938 parameters. Option ``padding`` (default 2, the authors' code); ``padding=0`` gives the
  valid-convolution variant whose flattened size on 28x28 is 32·4·4 = 512 (Linear(512 → 10),
  18,378 parameters).
* ``cifar-cnn``: the AdAdaGrad authors' CIFAR-10 CNN (``CIFAR10Module`` in the same file), the
  classic three-block CIFAR network: three [Conv2d 3x3 padding 1, ReLU, MaxPool 2x2] blocks with
  16, 32, 64 channels, then Linear(64·(H/8)·(W/8) → 500), ReLU, Linear(500 → num_classes);
  541,094 parameters on CIFAR-10.
* ``resnet18``: ResNet-18 (He et al. 2016; the torchvision layout of BasicBlocks [2, 2, 2, 2]
  with 64, 128, 256, 512 channels) with the CIFAR stem the AdAdaGrad authors use: a 3x3 stride-1
  convolution and no max-pool. 11,173,962 parameters in 62 tensors for 10 classes.
  ``norm="group"`` (default) uses GroupNorm with 32 groups (or the largest divisor of the channel
  count below 32), which normalises each sample on its own, so the loss stays a mean of
  per-sample losses and per-sample gradient statistics are valid. ``norm="batch"`` uses
  BatchNorm2d with running statistics (the authors' code uses
  ``track_running_stats=False``); use the micro-batch estimator with it, as BatchNorm mixes the
  samples of a batch;
  ``norm="none"`` has no normalisation layers.
* ``cnn1d``: the 1D CNN of the MNIST-1D benchmarks (``ConvBase`` in ``notebooks/models.py`` of
  github.com/greydanus/mnist1d): Conv1d(C→25, k5, stride 2, padding 1), Conv1d(25→25, k3, stride
  2, padding 1), Conv1d(25→25, k3, stride 2, padding 1), ReLU after each, flatten, Linear to
  ``num_classes``; input (L,) or (C, L); option ``channels`` (default 25). 5,210 parameters on
  MNIST-1D (L = 40).

* ``charlm``: a small causal transformer language model over tokens (bytes for the ``pydoc``
  and ``text`` data sets): input int64 token ids of shape (T,) with T <= the context,
  ``num_classes`` the vocabulary. Token embedding plus a learned position embedding, ``layers``
  pre-LayerNorm blocks (LayerNorm, causal self-attention through
  ``F.scaled_dot_product_attention(..., is_causal=True)`` on q, k, v from one ``nn.Linear``, an
  output ``nn.Linear``, residual; LayerNorm, ``nn.Linear``/GELU/``nn.Linear`` MLP of width
  ``mlp_ratio * d_model``, residual), a final LayerNorm and an output projection tied to the
  token embedding (one Parameter: ``model.head.weight is model.tok.weight``). Output: logits of
  shape (n, T, vocabulary). The blocks are ``model.blocks`` (an ``nn.ModuleList``, one
  ``fully_shard`` unit each under FSDP2). Options ``d_model`` (default 64), ``layers`` (2),
  ``heads`` (4), ``mlp_ratio`` (4), ``context`` (default: the input length). Weights are drawn
  from N(0, 0.02²) (the residual output projections scaled by 1/√(2·layers), GPT-2's rule),
  biases zero. Every sample's loss depends only on its own tokens (no dropout, no padding,
  positions shared by every sample), so per-sample gradient statistics are exact.

``norm`` only changes ``resnet18``; the other models have no normalisation layers and accept any
valid ``norm`` value unchanged (``model_info(name)["norm"]`` says whether a model uses it).

``name`` may also be the user's own model, ``package.module:factory``: a callable
``factory(input_shape: tuple[int, ...], num_classes: int, **model_options) -> nn.Module``
(``norm`` is passed when the factory takes a ``norm`` keyword).
Inputs must have the per-sample ``input_shape`` given at construction; models run in float32 and
are initialised from torch's global generator (seed it for reproducible weights).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["NORMS", "create_model", "has_batchnorm", "list_models", "model_info", "option_kinds"]

NORMS = ("group", "batch", "none")


def _flat_size(input_shape: tuple[int, ...]) -> int:
    return math.prod(input_shape)


def _as_shape(name: str, input_shape: Sequence[int]) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError):
        raise ValueError(
            f"input_shape must be a tuple of positive ints, got {input_shape!r}"
        ) from None
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be a tuple of positive ints, got {input_shape!r}")
    return shape


def _image_shape(name: str, input_shape: tuple[int, ...], min_size: int) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(
            f"model {name!r} takes images of shape (channels, height, width), got {input_shape}"
        )
    c, h, w = input_shape
    if h < min_size or w < min_size:
        raise ValueError(
            f"model {name!r} needs images of at least {min_size}x{min_size} pixels, "
            f"got {input_shape}"
        )
    return c, h, w


def _logistic(input_shape: tuple[int, ...], num_classes: int, norm: str) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(_flat_size(input_shape), num_classes))


def _mlp(
    input_shape: tuple[int, ...], num_classes: int, norm: str, hidden: int | Sequence[int] = (128,)
) -> nn.Module:
    widths = [hidden] if isinstance(hidden, int) else list(hidden)
    if not widths or any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in widths):
        raise ValueError(
            f"hidden must be a positive int or a non-empty list of them, got {hidden!r}"
        )
    layers: list[nn.Module] = [nn.Flatten()]
    prev = _flat_size(input_shape)
    for h in widths:
        layers += [nn.Linear(prev, h), nn.ReLU()]
        prev = h
    layers.append(nn.Linear(prev, num_classes))
    return nn.Sequential(*layers)


def _cnn(input_shape: tuple[int, ...], num_classes: int, norm: str, padding: int = 2) -> nn.Module:
    if isinstance(padding, bool) or not isinstance(padding, int) or not 0 <= padding <= 2:
        raise ValueError(f"padding must be 0, 1 or 2, got {padding!r}")
    shrink = 4 - 2 * padding  # a 5x5 convolution shrinks each side by 4 - 2*padding

    def out(n: int) -> int:
        return ((n - shrink) // 2 - shrink) // 2

    c, h, w = _image_shape("cnn", input_shape, 1)
    smallest = next(n for n in range(1, 64) if out(n) >= 1)
    if h < smallest or w < smallest:
        raise ValueError(
            f"model 'cnn' with padding={padding} needs images of at least "
            f"{smallest}x{smallest} pixels, got {input_shape}"
        )
    ho, wo = out(h), out(w)
    return nn.Sequential(
        nn.Conv2d(c, 16, kernel_size=5, stride=1, padding=padding),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, kernel_size=5, stride=1, padding=padding),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * ho * wo, num_classes),
    )


def _cifar_cnn(input_shape: tuple[int, ...], num_classes: int, norm: str) -> nn.Module:
    c, h, w = _image_shape("cifar-cnn", input_shape, 8)
    layers: list[nn.Module] = []
    prev = c
    for width in (16, 32, 64):
        layers += [nn.Conv2d(prev, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        prev = width
    flat = 64 * (h // 8) * (w // 8)
    layers += [nn.Flatten(), nn.Linear(flat, 500), nn.ReLU(), nn.Linear(500, num_classes)]
    return nn.Sequential(*layers)


def _groups(channels: int, max_groups: int = 32) -> int:
    return max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)


def _norm_layer(norm: str) -> Callable[[int], nn.Module]:
    if norm == "group":
        return lambda ch: nn.GroupNorm(_groups(ch), ch)
    if norm == "batch":
        return nn.BatchNorm2d
    return lambda ch: nn.Identity()


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (a 1x1 projection when the shape changes)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        stride: int,
        norm: Callable[[int], nn.Module],
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=bias)
        self.bn1 = norm(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=bias)
        self.bn2 = norm(out_ch)
        self.relu = nn.ReLU()
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=bias), norm(out_ch)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18(nn.Module):
    """ResNet-18 with the CIFAR stem (3x3 stride-1 convolution, no max-pool)."""

    def __init__(self, in_channels: int, num_classes: int, norm: str = "group") -> None:
        super().__init__()
        make_norm = _norm_layer(norm)
        bias = norm == "none"
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=bias)
        self.bn1 = make_norm(64)
        self.relu = nn.ReLU()
        stages = []
        prev = 64
        for width, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(
                nn.Sequential(
                    BasicBlock(prev, width, stride, make_norm, bias),
                    BasicBlock(width, width, 1, make_norm, bias),
                )
            )
            prev = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _resnet18(input_shape: tuple[int, ...], num_classes: int, norm: str) -> nn.Module:
    c, _, _ = _image_shape("resnet18", input_shape, 1)
    return ResNet18(c, num_classes, norm)


class CNN1D(nn.Module):
    """Three strided 1D convolutions and a linear classifier (MNIST-1D's ConvBase layout)."""

    def __init__(self, in_channels: int, length: int, num_classes: int, channels: int = 25):
        super().__init__()
        self.in_channels = in_channels
        self.conv1 = nn.Conv1d(in_channels, channels, 5, stride=2, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(channels, channels, 3, stride=2, padding=1)
        n = (length + 2 - 5) // 2 + 1
        n = (n + 2 - 3) // 2 + 1
        n = (n + 2 - 3) // 2 + 1
        self.linear = nn.Linear(channels * n, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], self.in_channels, x.shape[-1])
        h = torch.relu(self.conv1(x))
        h = torch.relu(self.conv2(h))
        h = torch.relu(self.conv3(h))
        return self.linear(h.flatten(1))


def _cnn1d(
    input_shape: tuple[int, ...], num_classes: int, norm: str, channels: int = 25
) -> nn.Module:
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    if len(input_shape) == 1:
        c, length = 1, input_shape[0]
    elif len(input_shape) == 2:
        c, length = input_shape
    else:
        raise ValueError(
            f"model 'cnn1d' takes sequences of shape (length,) or (channels, length), "
            f"got {input_shape}"
        )
    if length < 3:
        raise ValueError(f"model 'cnn1d' needs sequences of length >= 3, got {input_shape}")
    return CNN1D(c, length, num_classes, channels)


class CausalBlock(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln1(x)), then h + mlp(ln2(h))."""

    def __init__(self, d_model: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, mlp_ratio * d_model)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_ratio * d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = (z.reshape(n, t, self.heads, d // self.heads).transpose(1, 2)
                   for z in self.qkv(self.ln1(x)).chunk(3, dim=-1))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(n, t, d))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class CharLM(nn.Module):
    """Causal transformer language model with learned positions and a tied output layer."""

    def __init__(self, vocab: int, context: int, d_model: int = 64, layers: int = 2,
                 heads: int = 4, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.context = context
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.blocks = nn.ModuleList(CausalBlock(d_model, heads, mlp_ratio)
                                    for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied: one Parameter
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                scale = 1 / math.sqrt(2 * layers) if name.endswith(("proj.weight",
                                                                    "fc2.weight")) else 1.0
                nn.init.normal_(p, std=0.02 * scale)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, tokens: Tensor) -> Tensor:
        t = tokens.shape[-1]
        if tokens.dim() != 2 or t > self.context:
            raise ValueError(f"charlm takes token ids of shape (n, T) with T <= "
                             f"{self.context}, got {tuple(tokens.shape)}")
        # positions as a [1, T] row: one index set shared by every sample of the batch
        h = self.tok(tokens) + self.pos(torch.arange(t, device=tokens.device)[None])
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _charlm(input_shape: tuple[int, ...], num_classes: int, norm: str, d_model: int = 64,
            layers: int = 2, heads: int = 4, mlp_ratio: int = 4,
            context: int | None = None) -> nn.Module:
    if len(input_shape) != 1:
        raise ValueError(f"model 'charlm' takes token sequences of shape (T,), got {input_shape}")
    for name, value in (("d_model", d_model), ("layers", layers), ("heads", heads),
                        ("mlp_ratio", mlp_ratio)):
        _positive(name, value)
    ctx = input_shape[0] if context is None else _positive("context", context)
    if ctx < input_shape[0]:
        raise ValueError(f"context ({ctx}) must be >= the input length ({input_shape[0]})")
    if d_model % heads:
        raise ValueError(f"d_model ({d_model}) must be a multiple of heads ({heads})")
    return CharLM(num_classes, ctx, d_model, layers, heads, mlp_ratio)


_MODELS: dict[str, tuple[Callable[..., nn.Module], set[str], dict[str, Any]]] = {
    "logistic": (
        _logistic,
        set(),
        {
            "description": "flatten + one Linear layer (logistic / least-squares regression)",
            "input": "any",
            "norm": False,
        },
    ),
    "mlp": (
        _mlp,
        {"hidden"},
        {
            "description": "flatten + ReLU MLP (option hidden, default (128,))",
            "input": "any",
            "norm": False,
        },
    ),
    "cnn": (
        _cnn,
        {"padding"},
        {
            "description": "the AdAdaGrad paper's MNIST CNN: conv 5x5 16, pool, conv 5x5 32, pool, "
            "linear",
            "input": "image",
            "norm": False,
        },
    ),
    "cifar-cnn": (
        _cifar_cnn,
        set(),
        {
            "description": "the AdAdaGrad authors' CIFAR-10 CNN: 3 conv/pool blocks (16, 32, 64), "
            "linear 500, linear",
            "input": "image",
            "norm": False,
        },
    ),
    "resnet18": (
        _resnet18,
        set(),
        {
            "description": "ResNet-18 with CIFAR stem (3x3 conv, no max-pool); GroupNorm by "
            "default, BatchNorm with norm='batch'",
            "input": "image",
            "norm": True,
        },
    ),
    "cnn1d": (
        _cnn1d,
        {"channels"},
        {
            "description": "MNIST-1D ConvBase: 3 strided Conv1d layers + linear",
            "input": "sequence",
            "norm": False,
        },
    ),
    "charlm": (
        _charlm,
        {"d_model", "layers", "heads", "mlp_ratio", "context"},
        {
            "description": "causal pre-LayerNorm transformer language model, tied embeddings "
            "(options d_model 64, layers 2, heads 4, mlp_ratio 4, context)",
            "input": "tokens",
            "norm": False,
        },
    ),
}


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_MODELS)


def _resolve(name: str) -> str:
    key = name.lower().replace("_", "-")
    if key not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose from: {', '.join(list_models())}")
    return key


def option_kinds(name: str) -> dict[str, Any]:
    """The types each option of model ``name`` accepts (from its factory's signature; see
    :mod:`adabatch.train.options`); ValueError for an unknown name."""
    from adabatch.train.options import factory_options, import_factory, is_factory, kinds_of

    if is_factory(name):
        user = import_factory(name, "model")
        return kinds_of(user, factory_options(user, 2)[0])
    factory, allowed, _ = _MODELS[_resolve(name)]
    return kinds_of(factory, allowed)


def model_info(name: str) -> dict[str, Any]:
    """Facts about a model: ``name``, ``description``, ``input`` ("any", "image", "sequence",
    "tokens"),
    ``norm`` (whether the ``norm`` argument changes it), ``batchnorm`` (whether the default
    configuration has BatchNorm layers; always False here, so per-sample statistics are valid
    by default), ``batchnorm_with`` (the ``norm`` value giving BatchNorm, or None) and
    ``options`` (the extra keyword options it takes)."""
    key = _resolve(name)
    _, options, info = _MODELS[key]
    return {
        "name": key,
        **info,
        "batchnorm": False,
        "batchnorm_with": "batch" if info["norm"] else None,
        "options": sorted(options),
    }


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` contains a BatchNorm layer (which makes per-sample statistics invalid)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _create_from_factory(spec: str, input_shape: tuple[int, ...], num_classes: int, norm: str,
                         options: dict[str, Any]) -> nn.Module:
    from adabatch.train.options import (
        call_factory,
        check_factory_options,
        factory_options,
        import_factory,
    )

    factory = import_factory(spec, "model")
    where = f"model factory {spec!r}"
    check_factory_options(where, factory, 2, options)
    if "norm" in factory_options(factory, 2)[0] and "norm" not in options:
        options = {**options, "norm": norm}
    model = call_factory(where, factory, input_shape, num_classes, **options)
    if not isinstance(model, nn.Module):
        raise ValueError(f"{where} returned a {type(model).__name__}; it must return a "
                         "torch.nn.Module")
    return model


def create_model(
    name: str,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    norm: str = "group",
    **options: Any,
) -> nn.Module:
    """Build model ``name`` for per-sample inputs of ``input_shape`` and ``num_classes`` outputs.

    Raises ``ValueError`` for an unknown name, norm or option, or an input shape the model
    cannot take; for a factory ``package.module:factory`` (see the module docstring) also for
    a module that does not import, a missing attribute, an exception inside the factory or a
    return value that is not an ``nn.Module``, in one line naming the factory.
    """
    if ":" in name:
        return _create_from_factory(name, tuple(input_shape), num_classes, norm, options)
    key = _resolve(name)
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {', '.join(NORMS)}; got {norm!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    factory, allowed, _ = _MODELS[key]
    unknown = sorted(set(options) - allowed)
    if unknown:
        allowed_txt = ", ".join(sorted(allowed)) if allowed else "none"
        raise ValueError(
            f"unknown option(s) for model {key!r}: {', '.join(unknown)} (allowed: {allowed_txt})"
        )
    shape = _as_shape(key, input_shape)
    return factory(shape, num_classes, norm, **options)
