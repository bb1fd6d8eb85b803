"""The README's "Training frameworks" examples run as written and grow the batch."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[2] / "README.md"


def _examples() -> dict[str, str]:
    text = README.read_text()
    section = text.split("## Training frameworks\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 3
    return {"accelerate": blocks[0], "lightning": blocks[1], "transformers": blocks[2]}


def _run(source: str, tmp_path, monkeypatch) -> dict:
    monkeypatch.chdir(tmp_path)  # Lightning's logs, the Trainer's "out"
    torch.manual_seed(0)
    namespace: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(source, str(README), "exec"), namespace)
    return namespace


def test_accelerate_example(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    ns = _run(_examples()["accelerate"], tmp_path, monkeypatch)
    assert ns["adaptive"].sampler.epoch >= 3
    assert ns["controller"].batch_size > 32


def test_lightning_example(tmp_path, monkeypatch):
    pytest.importorskip("lightning")
    ns = _run(_examples()["lightning"], tmp_path, monkeypatch)
    assert 3 <= ns["adaptive"].sampler.epoch < 3.5
    assert ns["controller"].batch_size > 32
    assert ns["trainer"].global_step == ns["controller"].step


def test_transformers_example(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    ns = _run(_examples()["transformers"], tmp_path, monkeypatch)
    assert ns["trainer"].state.global_step == 20
    assert ns["controller"].step == 20
    assert ns["controller"].history  # tested, and decided
