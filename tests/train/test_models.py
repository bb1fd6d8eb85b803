"""Models: shapes, forward/backward, architecture facts (parameter counts), errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from adabatch.train.models import create_model, has_batchnorm, list_models, model_info


def _count(model: nn.Module) -> tuple[int, int]:
    params = list(model.parameters())
    return sum(p.numel() for p in params), len(params)


def test_list_models():
    assert list_models() == ["charlm", "cifar-cnn", "cnn", "cnn1d", "logistic", "mlp",
                             "resnet18"]


CASES = [
    ("logistic", (1, 8, 8), 10, {}),
    ("logistic", (5,), 1, {}),
    ("mlp", (40,), 10, {}),
    ("mlp", (1, 8, 8), 10, {"hidden": [16, 8]}),
    ("cnn", (1, 28, 28), 10, {}),
    ("cnn", (1, 8, 8), 10, {}),
    ("cnn", (3, 17, 21), 4, {"padding": 0}),
    ("cifar-cnn", (3, 32, 32), 10, {}),
    ("cifar-cnn", (1, 8, 8), 3, {}),
    ("resnet18", (3, 16, 16), 10, {}),
    ("resnet18", (1, 8, 8), 10, {}),
    ("cnn1d", (40,), 10, {}),
    ("cnn1d", (2, 25), 5, {"channels": 4}),
]


@pytest.mark.parametrize(("name", "shape", "k", "options"), CASES)
def test_forward_backward(name, shape, k, options):
    torch.manual_seed(0)
    model = create_model(name, shape, k, **options)
    x = torch.randn(3, *shape)
    out = model(x)
    assert out.shape == (3, k) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    nonzero = sum(bool(p.grad.abs().sum() > 0) for p in model.parameters())
    assert nonzero == len(list(model.parameters()))


def test_same_seed_same_weights():
    torch.manual_seed(3)
    a = create_model("cnn", (1, 28, 28), 10)
    torch.manual_seed(3)
    b = create_model("cnn", (1, 28, 28), 10)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_cnn_is_the_papers_mnist_cnn():
    model = create_model("cnn", (1, 28, 28), 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    pools = [m for m in model.modules() if isinstance(m, nn.MaxPool2d)]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (1, 16, (5, 5), (1, 1), (2, 2)),
        (16, 32, (5, 5), (1, 1), (2, 2)),
    ]
    assert len(pools) == 2 and all(p.kernel_size == 2 for p in pools)
    assert [(lin.in_features, lin.out_features) for lin in linears] == [(32 * 7 * 7, 10)]
    expected = (16 * 1 * 25 + 16) + (32 * 16 * 25 + 32) + (32 * 7 * 7 * 10 + 10)
    assert _count(model) == (expected, 6) and expected == 28938
    valid = create_model("cnn", (1, 28, 28), 10, padding=0)
    assert [m.in_features for m in valid.modules() if isinstance(m, nn.Linear)] == [512]
    assert _count(valid)[0] == 416 + 12832 + 512 * 10 + 10


def test_cifar_cnn_architecture():
    model = create_model("cifar-cnn", (3, 32, 32), 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (3, 16, (3, 3), (1, 1)),
        (16, 32, (3, 3), (1, 1)),
        (32, 64, (3, 3), (1, 1)),
    ]
    linears = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears == [(1024, 500), (500, 10)]
    assert _count(model)[0] == 448 + 4640 + 18496 + 512500 + 5010


def test_resnet18_counts_and_norms():
    bn = create_model("resnet18", (3, 32, 32), 10, norm="batch")
    # the well-known CIFAR ResNet-18: 11,173,962 parameters in 62 tensors
    assert _count(bn) == (11_173_962, 62)
    assert has_batchnorm(bn)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in bn.modules()) == 20
    convs = [m for m in bn.modules() if isinstance(m, nn.Conv2d)]
    stem = convs[0]
    assert (stem.kernel_size, stem.stride, stem.padding) == ((3, 3), (1, 1), (1, 1))
    assert not any(isinstance(m, nn.MaxPool2d) for m in bn.modules())
    assert len(convs) == 20  # 1 stem + 16 block convs + 3 projections

    gn = create_model("resnet18", (3, 32, 32), 10)  # norm="group" by default
    assert not has_batchnorm(gn)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gn.modules())
    groups = [m for m in gn.modules() if isinstance(m, nn.GroupNorm)]
    assert len(groups) == 20 and all(g.num_groups == 32 for g in groups)
    assert _count(gn) == (11_173_962, 62)

    none = create_model("resnet18", (3, 32, 32), 100, norm="none")
    assert not any(isinstance(m, (nn.GroupNorm, nn.BatchNorm2d)) for m in none.modules())
    assert none.fc.out_features == 100


def test_resnet18_groupnorm_is_per_sample_batchnorm_is_not():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    gn = create_model("resnet18", (3, 8, 8), 10).train()
    together = gn(x)
    alone = torch.cat([gn(x[i : i + 1]) for i in range(4)])
    assert torch.allclose(together, alone, atol=1e-5)
    bn = create_model("resnet18", (3, 8, 8), 10, norm="batch").train()
    together = bn(x)
    alone = torch.cat([bn(x[i : i + 2]) for i in (0, 2)])  # batches of two
    assert not torch.allclose(together, alone, atol=1e-3)


def test_groupnorm_groups_for_small_channel_counts():
    from adabatch.train.models import _groups

    assert [_groups(c) for c in (1, 3, 12, 48, 64, 100)] == [1, 3, 12, 24, 32, 25]


def test_cnn1d_is_mnist1d_convbase():
    model = create_model("cnn1d", (40,), 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv1d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (1, 25, (5,), (2,), (1,)),
        (25, 25, (3,), (2,), (1,)),
        (25, 25, (3,), (2,), (1,)),
    ]
    assert model.linear.in_features == 125
    assert _count(model)[0] == 150 + 1900 + 1900 + 1260
    x = torch.randn(5, 40)
    assert torch.equal(model(x), model(x.unsqueeze(1)))
    channel = create_model("cnn1d", (1, 40), 10)
    assert _count(channel)[0] == 5210


@pytest.mark.parametrize(
    ("name", "shape", "kwargs", "message"),
    [
        ("vgg", (3, 32, 32), {},
         r"unknown model 'vgg'; choose from: charlm, cifar-cnn, cnn, cnn1d"),
        ("cnn", (40,), {}, r"model 'cnn' takes images of shape \(channels, height, width\)"),
        ("cnn", (1, 3, 3), {}, r"model 'cnn' with padding=2 needs images of at least 4x4 pixels"),
        ("cnn", (1, 8, 8), {"padding": 0}, r"padding=0 needs images of at least 16x16 pixels"),
        ("cnn", (1, 8, 8), {"padding": 3}, r"padding must be 0, 1 or 2, got 3"),
        ("cifar-cnn", (3, 4, 4), {}, r"model 'cifar-cnn' needs images of at least 8x8 pixels"),
        ("resnet18", (32, 32), {}, r"model 'resnet18' takes images of shape"),
        ("cnn1d", (1, 8, 8), {}, r"model 'cnn1d' takes sequences of shape \(length,\)"),
        ("cnn1d", (2,), {}, r"model 'cnn1d' needs sequences of length >= 3"),
        ("mlp", (4,), {"hidden": []}, r"hidden must be a positive int or a non-empty list"),
        ("mlp", (4,), {"hidden": [4, 0]}, r"hidden must be a positive int"),
        (
            "mlp",
            (4,),
            {"depth": 3},
            r"unknown option\(s\) for model 'mlp': depth \(allowed: hidden\)",
        ),
        (
            "logistic",
            (4,),
            {"norm": "layer"},
            r"norm must be one of group, batch, none; got 'layer'",
        ),
        ("logistic", (0,), {}, r"input_shape must be a tuple of positive ints, got \(0,\)"),
        ("logistic", (4,), {"num_classes": 0}, r"num_classes must be a positive int, got 0"),
    ],
)
def test_errors(name, shape, kwargs, message):
    kwargs = dict(kwargs)
    k = kwargs.pop("num_classes", 10)
    with pytest.raises(ValueError, match=message):
        create_model(name, shape, k, **kwargs)


def test_model_info():
    info = model_info("resnet18")
    assert info["name"] == "resnet18" and info["norm"] is True
    assert info["batchnorm"] is False and info["batchnorm_with"] == "batch"
    assert "CIFAR stem" in info["description"]
    assert model_info("cnn")["options"] == ["padding"]
    assert model_info("MLP")["input"] == "any" and model_info("mlp")["norm"] is False
    for name in list_models():
        model = create_model(
            name, (40,) if model_info(name)["input"] in ("sequence", "tokens") else (1, 8, 8), 10
        )
        assert has_batchnorm(model) == model_info(name)["batchnorm"]
    with pytest.raises(ValueError, match="unknown model 'x'"):
        model_info("x")
