"""--tensorboard: scalars reach a SummaryWriter; without the package, a clear exit 2.

tensorboard itself is an optional extra that the test environment does not install, so the
writer is a recording stand-in placed where ``torch.utils.tensorboard`` is imported from.
"""

from __future__ import annotations

import json
import sys
import types
from typing import ClassVar

from adabatch.cli import main


class _RecordingWriter:
    instances: ClassVar[list[_RecordingWriter]] = []

    def __init__(self, logdir: str) -> None:
        self.logdir = logdir
        self.scalars: list[tuple[str, float, int]] = []
        self.closed = False
        _RecordingWriter.instances.append(self)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_tensorboard_gets_train_and_eval_scalars(monkeypatch, tmp_path, capsys):
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = _RecordingWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    run = tmp_path / "run"
    assert main(["train", "--steps", "6", "--tensorboard", "--quiet", "--no-plots",
                 "--threads", "1", "--out", str(run)]) == 0
    writer = _RecordingWriter.instances[-1]
    assert writer.logdir == str(run / "tensorboard")
    assert writer.closed
    by_tag: dict[str, list[tuple[float, int]]] = {}
    for tag, value, step in writer.scalars:
        by_tag.setdefault(tag, []).append((value, step))
    assert {"train/loss", "train/lr", "train/batch_size", "eval/test_accuracy"} <= set(by_tag)
    # one train/loss scalar per step, at the step's sample count, equal to metrics.jsonl
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if not r.get("eval")]
    assert [(r["loss"], r["samples"]) for r in steps] == by_tag["train/loss"]
    summary = json.loads((run / "summary.json").read_text())
    assert by_tag["eval/test_accuracy"][-1][0] == summary["test_accuracy"]


def test_tensorboard_missing_is_one_clear_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    assert main(["train", "--steps", "2", "--tensorboard", "--quiet",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tensorboard needs the tensorboard package" in err[0]
