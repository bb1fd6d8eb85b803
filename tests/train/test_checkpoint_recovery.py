"""Damaged checkpoints and killed writers: fall back to the newest intact checkpoint, never to
an unsafe load, and clean the temporaries up (issue #16, item 8)."""

from __future__ import annotations

import pytest
import torch

from adabatch.train import checkpoint as ck


def _three(tmp_path):
    for step in (1, 2, 3):
        ck.save_checkpoint(tmp_path, {"step": step, "w": torch.full((4,), float(step))}, keep=5)
    return ck.list_checkpoints(tmp_path)


@pytest.mark.parametrize("damage", ["truncated", "random", "empty"])
def test_damaged_newest_falls_back_to_the_previous(tmp_path, damage: str) -> None:
    paths = _three(tmp_path)
    newest = paths[-1]
    data = newest.read_bytes()
    newest.write_bytes({"truncated": data[: len(data) // 2],
                        "random": bytes(range(256)) * 7,
                        "empty": b""}[damage])
    path, state, skipped = ck.newest_intact_checkpoint(tmp_path)
    assert path == paths[-2] and state["step"] == 2
    assert torch.equal(state["w"], torch.full((4,), 2.0))
    assert [p for p, _ in skipped] == [newest]
    assert "damaged" in skipped[0][1]
    assert "weights_only=False" not in skipped[0][1]


def test_a_pickle_with_code_is_refused_without_unsafe_advice(tmp_path) -> None:
    paths = _three(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(paths[-1], "wb") as f:
        torch.save({"format_version": ck.FORMAT_VERSION, "step": 3, "x": Evil()}, f,
                   pickle_protocol=2)
    with pytest.raises(ck.CheckpointError) as info:
        ck.load_checkpoint(paths[-1])
    assert "weights_only=False" not in str(info.value)
    assert "objects other than tensors" in str(info.value)
    _, state, skipped = ck.newest_intact_checkpoint(tmp_path)
    assert state["step"] == 2 and len(skipped) == 1


def test_all_damaged_names_every_file(tmp_path) -> None:
    for p in _three(tmp_path):
        p.write_bytes(b"junk")
    with pytest.raises(ck.CheckpointError, match=r"step_00000003.pt, step_00000002.pt, "
                                                 r"step_00000001.pt"):
        ck.newest_intact_checkpoint(tmp_path)
    assert ck.newest_intact_checkpoint(tmp_path / "nothing") is None


def test_other_format_version_is_skipped_with_its_reason(tmp_path) -> None:
    paths = _three(tmp_path)
    ck.write_atomic({"format_version": ck.FORMAT_VERSION + 1, "step": 3}, paths[-1])
    _, state, skipped = ck.newest_intact_checkpoint(tmp_path)
    assert state["step"] == 2 and "format version" in skipped[0][1]


def test_stale_temporaries_are_removed_and_nothing_else(tmp_path) -> None:
    paths = _three(tmp_path)
    stale = [tmp_path / "checkpoints" / ".step_00000004.pt.ab12cd_9.tmp",
             tmp_path / ".config.json.x1y2z3.tmp"]
    for p in stale:
        p.write_bytes(b"partial")
    keep = [tmp_path / "metrics.jsonl", tmp_path / "notes.tmp", tmp_path / ".hidden"]
    for p in keep:
        p.write_text("mine")
    removed = ck.remove_stale_temporaries(tmp_path)
    assert sorted(removed) == sorted(stale)
    assert all(p.exists() for p in keep + paths)
    assert not any(p.exists() for p in stale)


def test_write_text_atomic_keeps_the_old_file_on_failure(tmp_path, monkeypatch) -> None:
    path = tmp_path / "config.json"
    ck.write_text_atomic('{"a": 1}\n', path)
    assert path.read_text() == '{"a": 1}\n'

    real_fsync = ck.os.fsync

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ck.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="No space left"):
        ck.write_text_atomic('{"a": 2, "long": "' + "x" * 1000 + '"}\n', path)
    monkeypatch.setattr(ck.os, "fsync", real_fsync)
    assert path.read_text() == '{"a": 1}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]



def test_atomic_files_get_the_mode_of_a_plain_open(tmp_path) -> None:
    import os

    mask = os.umask(0o022)
    try:
        ck.write_text_atomic("{}", tmp_path / "config.json")
        ck.write_atomic({"a": 1}, tmp_path / "final.pt")
    finally:
        os.umask(mask)
    for name in ("config.json", "final.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
