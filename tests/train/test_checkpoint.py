"""Checkpoint files: atomic writes, keep-last-K, format version, RNG capture/restore."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from adabatch.train import checkpoint as ck


def test_save_load_round_trip_and_keep_last_k(tmp_path):
    model = torch.nn.Linear(3, 2)
    for step in range(1, 6):
        ck.save_checkpoint(
            tmp_path,
            {
                "step": step,
                "model": model.state_dict(),
                "config": {"a": [1, 2]},
                "t": (1, 2.5, None),
            },
            keep=2,
        )
    names = [p.name for p in ck.list_checkpoints(tmp_path)]
    assert names == ["step_00000004.pt", "step_00000005.pt"]
    state = ck.load_checkpoint(tmp_path)  # a run dir: its newest checkpoint
    assert state["step"] == 5 and state["format_version"] == ck.FORMAT_VERSION
    assert torch.equal(state["model"]["weight"], model.weight.detach())
    # no temporary files are left behind
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_list_orders_by_step_not_name(tmp_path):
    for step in (9, 10, 100000000):
        ck.save_checkpoint(tmp_path, {"step": step}, keep=5)
    assert [int(p.stem.split("_")[1]) for p in ck.list_checkpoints(tmp_path)] == [9, 10, 100000000]


def test_other_format_version_is_rejected(tmp_path):
    path = tmp_path / "checkpoints" / "step_00000001.pt"
    ck.write_atomic({"format_version": ck.FORMAT_VERSION + 1, "step": 1}, path)
    with pytest.raises(
        ck.CheckpointError,
        match=rf"format version {ck.FORMAT_VERSION + 1}; this adabatch reads "
        rf"version {ck.FORMAT_VERSION}",
    ):
        ck.load_checkpoint(path)
    ck.write_atomic({"step": 1}, path)
    with pytest.raises(ck.CheckpointError, match=r"not an adabatch checkpoint"):
        ck.load_checkpoint(path)


def test_corrupt_and_missing(tmp_path):
    path = tmp_path / "checkpoints" / "step_00000003.pt"
    path.parent.mkdir()
    path.write_bytes(b"not a zip file at all")
    with pytest.raises(ck.CheckpointError, match=r"cannot read checkpoint"):
        ck.load_checkpoint(path)
    with pytest.raises(ck.CheckpointError, match=r"checkpoint not found"):
        ck.load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(ck.CheckpointError, match=r"no checkpoint in"):
        ck.load_checkpoint(tmp_path / "empty_run")


def test_failed_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "x.pt"
    ck.write_atomic({"v": 1}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ck.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ck.write_atomic({"v": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"v": 1}
    assert os.listdir(tmp_path) == ["x.pt"]


def test_rng_capture_restore_round_trip(tmp_path):
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(4)
    torch.randn(3, generator=gen)
    state = ck.capture_rng(gen)
    expected = (
        torch.rand(4),
        np.random.rand(4),
        [random.random() for _ in range(4)],
        torch.rand(4, generator=gen),
    )
    # through a file, loaded with weights_only=True
    ck.write_atomic(state, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    gen2 = torch.Generator().manual_seed(99)
    ck.restore_rng(loaded, gen2)
    got = (
        torch.rand(4),
        np.random.rand(4),
        [random.random() for _ in range(4)],
        torch.rand(4, generator=gen2),
    )
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1])
    assert got[2] == expected[2]
    assert torch.equal(got[3], expected[3])


def test_keep_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match=r"keep must be >= 1, got 0"):
        ck.save_checkpoint(tmp_path, {"step": 1}, keep=0)
