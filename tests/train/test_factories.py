"""`adabatch train --dataset package.module:factory --model package.module:factory`: the
user's own data and model, end to end, resumed, and every way a factory can be wrong (one line,
exit 2, naming the factory)."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest
import torch

from adabatch.cli import main
from adabatch.train.data import DatasetBundle

FACTORIES = '''
from pathlib import Path

import torch
from torch import nn

from adabatch.train.data import DatasetBundle

CALLS = []


def make_data(data_dir: Path | None, seed: int, n: int = 256, shift: float = 0.0,
              flip: bool = False) -> DatasetBundle:
    CALLS.append(("data", data_dir, seed, n, shift, flip))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + 64, 6, generator=g) + shift
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    if flip:
        y = 2 - y
    return DatasetBundle(name="blobs", x_train=x[:n], y_train=y[:n], x_test=x[n:],
                         y_test=y[n:], task="classification", num_classes=3)


def make_model(input_shape: tuple[int, ...], num_classes: int, width: int = 16) -> nn.Module:
    CALLS.append(("model", input_shape, num_classes, width))
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0], width), nn.ReLU(),
                         nn.Linear(width, num_classes))


def any_model(input_shape, num_classes, **options):
    CALLS.append(("any_model", options))
    return nn.Linear(input_shape[0], num_classes)


def raises(data_dir, seed):
    raise RuntimeError("the bucket is empty")


def raises_model(input_shape, num_classes):
    raise KeyError("no such layer")


def not_a_bundle(data_dir, seed):
    return {"x": 1}


def not_a_module(input_shape, num_classes):
    return "mlp"


def bad_labels(data_dir, seed):
    x = torch.randn(64, 3)
    return DatasetBundle(name="bad", x_train=x, y_train=torch.full((64,), 7), x_test=x,
                         y_test=torch.zeros(64, dtype=torch.long), task="classification",
                         num_classes=3)


NOT_CALLABLE = 3
'''

_names = itertools.count()
TINY = ["--quiet", "--no-plots", "--threads", "1", "--max-batch", "64"]


@pytest.fixture
def mod(tmp_path, monkeypatch) -> str:
    """A fresh module of factories, importable by name (written to tmp_path)."""
    name = f"adabatch_user_factories_{next(_names)}"
    folder = tmp_path / "pkgs"
    folder.mkdir()
    (folder / f"{name}.py").write_text(FACTORIES)
    (folder / f"{name}_broken.py").write_text("raise ImportError('needs the frobnicate package')\n")
    monkeypatch.syspath_prepend(str(folder))
    yield name
    for m in (name, f"{name}_broken"):
        sys.modules.pop(m, None)


def _steps(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if not r.get("eval")]


def test_trains_the_users_data_and_model_with_typed_options(tmp_path, mod):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--dataset", f"{mod}:make_data", "--model", f"{mod}:make_model",
                 "--data-option", "n=200", "--data-option", "shift=1",
                 "--data-option", "flip=yes", "--model-option", "width=8", "--seed", "3",
                 "--epochs", "2", "--out", str(run)]) == 0
    calls = sys.modules[mod].CALLS
    assert calls[0] == ("data", None, 3, 200, 1.0, True)  # typed from the signature
    assert isinstance(calls[0][4], float) and calls[0][5] is True
    assert calls[1] == ("model", (6,), 3, 8)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["dataset"] == f"{mod}:make_data" and cfg["model"] == f"{mod}:make_model"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["test_accuracy"] is not None
    assert sum(r["batch_size"] for r in _steps(run)) >= 400  # two epochs of 200


def test_a_factory_with_keyword_options_gets_them_all(tmp_path, mod):
    assert main(["train", *TINY, "--dataset", f"{mod}:make_data", "--model", f"{mod}:any_model",
                 "--model-option", "depth=3", "--steps", "1", "--out", str(tmp_path / "r")]) == 0
    assert ("any_model", {"depth": 3}) in sys.modules[mod].CALLS


def test_resume_imports_the_factories_again(tmp_path, mod):
    run = tmp_path / "run"
    args = ["--dataset", f"{mod}:make_data", "--model", f"{mod}:make_model", "--data-option",
            "n=128", "--checkpoint-every", "1"]
    assert main(["train", *TINY, *args, "--steps", "2", "--out", str(run)]) == 0
    sys.modules.pop(mod)  # a new process: nothing imported yet
    assert main(["train", "--resume", str(run), "--steps", "4"]) == 0
    assert [r["step"] for r in _steps(run)] == [1, 2, 3, 4]
    assert sys.modules[mod].CALLS[0] == ("data", None, 0, 128, 0.0, False)
    # the resumed run ends where one uninterrupted run ends
    whole = tmp_path / "whole"
    assert main(["train", *TINY, *args, "--steps", "4", "--out", str(whole)]) == 0
    assert [r["loss"] for r in _steps(run)] == [r["loss"] for r in _steps(whole)]


@pytest.mark.parametrize("flag, target, words", [
    ("--dataset", "no_such_module_here:make", ("dataset factory 'no_such_module_here:make'",
                                               "no module named 'no_such_module_here'")),
    ("--dataset", "{mod}:missing", ("has no attribute 'missing'",)),
    ("--dataset", "{mod}:NOT_CALLABLE", ("NOT_CALLABLE is a int, not a callable",)),
    ("--dataset", "{mod}:raises", ("raised RuntimeError: the bucket is empty",)),
    ("--dataset", "{mod}:not_a_bundle", ("returned a dict", "DatasetBundle")),
    ("--dataset", "{mod}:bad_labels", ("labels in [7, 7], outside [0, num_classes=3)",)),
    ("--dataset", "{mod}_broken:make", ("raised ImportError: needs the frobnicate package",)),
    ("--dataset", ":make", ("expected package.module:factory",)),
    ("--model", "{mod}:raises_model", ("model factory", "raised KeyError")),
    ("--model", "{mod}:not_a_module", ("returned a str", "torch.nn.Module")),
    ("--model", "no_such_module_here:make", ("model factory", "no module named")),
])
def test_a_wrong_factory_exits_2_with_one_line_naming_it(tmp_path, capsys, mod, flag, target,
                                                        words):
    target = target.format(mod=mod)
    other = (["--model", f"{mod}:make_model"] if flag == "--dataset"
             else ["--dataset", f"{mod}:make_data"])
    assert main(["train", *TINY, "--steps", "1", "--out", str(tmp_path / "r"), flag, target,
                 *other]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("adabatch: error:")
    assert target in err or target.startswith(":"), err
    for w in words:
        assert w in err, (w, err)


@pytest.mark.parametrize("option, words", [
    (["--data-option", "n=abc"], ("--data-option n: expected an integer",)),
    (["--data-option", "colour=red"], ("does not take option(s) colour", "n, shift, flip")),
    (["--model-option", "depth=2"], ("model factory", "does not take option(s) depth",
                                     "width")),
])
def test_options_are_checked_against_the_factorys_signature(tmp_path, capsys, mod, option,
                                                            words):
    assert main(["train", *TINY, "--steps", "1", "--out", str(tmp_path / "r"),
                 "--dataset", f"{mod}:make_data", "--model", f"{mod}:make_model",
                 *option]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    for w in words:
        assert w in err, (w, err)


def test_help_lists_the_choices_and_the_factory_form(capsys):
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in ("digits", "mnist1d", "synthetic", "cifar10", "fashion-mnist", "mlp", "cnn1d",
                 "resnet18", "cifar-cnn", "logistic"):
        assert name in text
    assert text.count("package.module:factory") == 2
    assert "-> adabatch.train.data.DatasetBundle" in text and "-> torch.nn.Module" in text


def test_dataset_bundle_public_constructor():
    x, y = torch.randn(10, 2, 3), torch.randint(0, 4, (10,))
    b = DatasetBundle(name="mine", x_train=x, y_train=y, x_test=x[:0], y_test=y[:0],
                      task="classification", num_classes=4)
    assert b.input_shape == (2, 3) and b.num_train == 10 and b.num_test == 0
    with pytest.raises(TypeError, match=r"x_train must be a torch\.Tensor, got ndarray"):
        DatasetBundle(name="m", x_train=x.numpy(), y_train=y, x_test=x, y_test=y,
                      task="classification", num_classes=4)
    with pytest.raises(ValueError, match="y_train of a classification must be int64"):
        DatasetBundle(name="m", x_train=x, y_train=y.float(), x_test=x, y_test=y,
                      task="classification", num_classes=4)
    with pytest.raises(ValueError, match="x_test must be floating-point"):
        DatasetBundle(name="m", x_train=x, y_train=y, x_test=x.long(), y_test=y,
                      task="classification", num_classes=4)
    with pytest.raises(ValueError, match="y_train of a regression must be floating-point"):
        DatasetBundle(name="m", x_train=x, y_train=y, x_test=x, y_test=y.float(),
                      task="regression", num_classes=1)


def test_the_readme_factory_module_trains_as_its_comment_says(tmp_path, monkeypatch):
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S)
              if "def blobs(" in b]
    assert len(blocks) == 1
    source = blocks[0]
    command = re.match(r"# mine\.py: adabatch (.*)\n", source)
    assert command is not None
    name = f"readme_mine_{next(_names)}"
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = command.group(1).replace("mine:", f"{name}:").split()
    run = tmp_path / "run"
    try:
        assert main([*args, *TINY, "--steps", "3", "--out", str(run)]) == 0
    finally:
        sys.modules.pop(name, None)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data_options"] == {"n": 2000} and cfg["model_options"] == {"width": 64}
