"""One line and a distinct exit code for every kind of failure (issue #16, item 4/5)."""

from __future__ import annotations

import errno

import pytest
import torch

from adabatch.train import errors as E
from adabatch.train.checkpoint import CheckpointError
from adabatch.train.config import ConfigError
from adabatch.train.data import DatasetError
from adabatch.train.divergence import Diverged
from adabatch.train.download import DownloadError
from adabatch.train.rundir import RunDirBusy


@pytest.mark.parametrize("exc, code, start", [
    (ConfigError("bad --lr"), E.EXIT_USAGE, "bad --lr"),
    (CheckpointError("incompatible"), E.EXIT_USAGE, "incompatible"),
    (RunDirBusy("in use"), E.EXIT_USAGE, "in use"),
    (DatasetError("x: truncated"), E.EXIT_DATA, "x: truncated"),
    (DownloadError("could not fetch"), E.EXIT_DATA, "could not fetch"),
    (Diverged("the loss is 1e22 at step 4"), E.EXIT_DIVERGED, "diverged: the loss"),
    (FloatingPointError("the loss is nan"), E.EXIT_DIVERGED, "diverged: the loss is nan"),
    (OSError(errno.ENOSPC, "No space left on device", "/r/ck.pt"), E.EXIT_IO,
     "disk full (no space left on device): /r/ck.pt"),
    (PermissionError(errno.EACCES, "Permission denied", "/ro/run"), E.EXIT_IO,
     "permission denied: /ro/run"),
    (OSError(errno.EROFS, "Read-only file system"), E.EXIT_IO, "read-only file system"),
    (OSError(errno.EFBIG, "File too large", "/r/metrics.jsonl"), E.EXIT_IO, "file too large"),
    (OSError(errno.EIO, "Input/output error", "/r/x"), E.EXIT_IO, "I/O error: Input/output"),
    (MemoryError(), E.EXIT_MEMORY, "out of memory"),
    (torch.OutOfMemoryError("CUDA out of memory"), E.EXIT_MEMORY, "out of memory"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9e12 "
                  "bytes"), E.EXIT_MEMORY, "out of memory"),
    (KeyError("x"), E.EXIT_INTERNAL, "internal error: KeyError"),
    (RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:5. GLHF"), E.EXIT_PEER,
     "another process of the run ended"),
])
def test_classify(exc, code, start) -> None:
    got_code, line = E.classify(exc)
    assert got_code == code
    assert line.startswith(start), line
    assert "\n" not in line


def test_codes_are_distinct() -> None:
    codes = [E.EXIT_OK, E.EXIT_INTERNAL, E.EXIT_USAGE, E.EXIT_DATA, E.EXIT_IO, E.EXIT_DIVERGED,
             E.EXIT_MEMORY, E.EXIT_PEER]
    assert len(set(codes)) == len(codes) and max(codes) < 128
