"""Checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint is one ``torch.save`` file ``checkpoints/step_XXXXXXXX.pt`` in the run directory
holding a dict:

``format_version``, ``adabatch_version``, ``config`` (the run's TrainConfig as a dict),
``step``, ``samples``, ``elapsed`` (seconds of training so far), ``model``, ``optimizer``,
``controller``, ``sampler`` (state dicts), ``rng`` (torch CPU, CUDA, numpy and Python global
RNG states and the augmentation generator's state), ``metrics_offset`` (the byte length of
``metrics.jsonl`` at the checkpoint, so a resumed run cuts away rows written after it) and
``extra`` (a free dict; the trainer keeps ``world_size`` there, the number of processes that
wrote it) and, for runs of several processes, ``rng_ranks`` (every rank's RNG states, in rank
order; ``rng`` is rank 0's). Only rank 0 writes checkpoints; every rank reads them.

Only plain containers, numbers, strings and tensors are stored, so the file loads with
``torch.load(weights_only=True)``.

Atomic write: the file is written to a temporary file in the same directory, flushed and
fsynced, renamed over the final name with :func:`os.replace` and the directory is fsynced, so a
crash at any moment leaves either the previous set of checkpoints or the new one, never a
truncated file under a checkpoint name. Older checkpoints beyond the last ``keep`` are removed
after the new one is in place. A process killed during a write leaves its temporary file
(``.step_XXXXXXXX.pt.*.tmp``) behind: :func:`remove_stale_temporaries` deletes those once the
run directory is owned by the resuming process.

Sharded checkpoints (``--parallel fsdp``) are directories ``checkpoints/step_XXXXXXXX/``
written by every rank (:mod:`adabatch.train.sharded_checkpoint`): :func:`list_checkpoints`
lists them beside the files, :func:`load_checkpoint` reads their trainer state (complete
ones only: a directory without its completion marker is skipped like a damaged file) and
:func:`remove_stale_temporaries` clears the directories of an interrupted save.

Reading: :func:`newest_intact_checkpoint` tries the checkpoints newest first and returns the
first that loads, with the reason each newer one was skipped (truncated, random bytes, another
format version), so a damaged newest checkpoint costs the steps since the one before it and
nothing else. Files are always read with ``weights_only=True``; an unreadable file is never
retried with the unsafe ``weights_only=False``.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "capture_rng",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "newest_intact_checkpoint",
    "remove_stale_temporaries",
    "restore_rng",
    "save_checkpoint",
    "set_aside",
    "write_atomic",
    "write_text_atomic",
]

#: Bumped whenever the layout of the checkpoint dict changes incompatibly.
FORMAT_VERSION = 1

_NAME = re.compile(r"^step_(\d{8,})\.pt$")
#: a sharded checkpoint (``--parallel fsdp``) is a directory: see sharded_checkpoint.py
_SHARDED = re.compile(r"^step_(\d{8,})$")


class CheckpointError(ValueError):
    """A missing, corrupt or incompatible checkpoint."""


def _umask_mode(fd: int) -> None:
    """Give a temporary file the mode a plain ``open`` would (``mkstemp`` makes it 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    try:
        os.fchmod(fd, 0o666 & ~mask)
    except (AttributeError, OSError):  # no fchmod (Windows): keep mkstemp's mode
        pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported (e.g. Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (temp file, fsync, rename, fsync dir)."""
    # serialised in memory first: torch's zip writer turns a failed write into a RuntimeError
    # ("unexpected pos ..."), while a plain write keeps the OSError that names the cause
    # (ENOSPC: disk full, EFBIG: file size limit, EDQUOT, ...)
    buf = io.BytesIO()
    torch.save(obj, buf)
    return _write_bytes_atomic(buf.getbuffer(), Path(path))


def write_text_atomic(text: str, path: str | Path) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, as :func:`write_atomic` does: a crash or a
    full disk during the write leaves the previous file (or none), never a truncated one."""
    return _write_bytes_atomic(text.encode("utf-8"), Path(path))


def _write_bytes_atomic(data: bytes | memoryview, path: Path) -> Path:
    """``data`` into a temporary file beside ``path`` (the mode of a plain open), flushed and
    fsynced, renamed over ``path``, then the directory fsynced; the temporary file is removed
    when anything fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        _umask_mode(fd)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]+\.tmp$")


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`write_atomic`'s temporaries."""
    return _TEMPORARY.match(name) is not None


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete the temporary files that a killed writer left in the run directory and its
    ``checkpoints/`` (names ``.<final name>.<random>.tmp``, as :func:`write_atomic` and
    :func:`write_text_atomic` make them) and the directories of an interrupted sharded save
    (:func:`adabatch.train.sharded_checkpoint.remove_stale_directories`); returns what was
    removed. Call it only while this process owns the run directory (no other writer can be
    in the middle of a write)."""
    from adabatch.train.sharded_checkpoint import remove_stale_directories

    removed = remove_stale_directories(run_dir)
    for folder in (Path(run_dir), Path(run_dir) / "checkpoints"):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            if _TEMPORARY.match(p.name) and p.is_file():
                try:
                    p.unlink()
                    removed.append(p)
                except FileNotFoundError:
                    pass
    return removed


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's checkpoints, oldest first (by step): the files ``step_XXXXXXXX.pt`` and the
    sharded checkpoint directories ``step_XXXXXXXX/`` (complete or not)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = _NAME.match(p.name) or (_SHARDED.match(p.name) if p.is_dir() else None)
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint of a run, or None."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(run_dir: str | Path, state: dict[str, Any], *, keep: int = 3) -> Path:
    """Write ``state`` (must hold ``step``) as the run's newest checkpoint; keep the last
    ``keep`` checkpoints. ``format_version`` is added."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    state = {"format_version": FORMAT_VERSION, **state}
    path = Path(run_dir) / "checkpoints" / f"step_{int(state['step']):08d}.pt"
    write_atomic(state, path)
    for old in [p for p in list_checkpoints(run_dir) if not p.is_dir()][:-keep]:
        try:
            old.unlink()
        except FileNotFoundError:
            pass
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file (or a run directory's newest) and check its format version. Of a
    sharded checkpoint (a directory ``checkpoints/step_XXXXXXXX``) only the trainer state is
    read (``sharded`` is True in it; every rank then reads its shards of the model and
    optimizer with :func:`adabatch.train.sharded_checkpoint.load_sharded`)."""
    path = Path(path)
    if _is_sharded_dir(path):
        from adabatch.train.sharded_checkpoint import load_trainer_state

        return load_trainer_state(path)
    if path.is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"no checkpoint in {path / 'checkpoints'}")
        path = latest
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's message advises weights_only=False, which would run arbitrary code: never
        raise CheckpointError(f"cannot read checkpoint {path}: it holds objects other than "
                              "tensors and plain data (not written by adabatch, or "
                              "damaged)") from None
    except Exception as e:  # damaged bytes raise struct.error, EOFError, RuntimeError, ...
        raise CheckpointError(f"cannot read checkpoint {path}: the file is damaged "
                              f"(truncated or corrupt: {_first_line(e)})") from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise CheckpointError(f"{path} is not an adabatch checkpoint (no format_version)")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {state['format_version']}; this adabatch "
            f"reads version {FORMAT_VERSION}"
        )
    return state


def set_aside(path: Path, suffix: str) -> Path:
    """Rename checkpoint ``path`` to its name + ``suffix`` (``.damaged``, ``.abandoned``),
    over an earlier one of that name: also for a sharded checkpoint, a directory, which
    :func:`os.replace` cannot put over a non-empty one."""
    target = path.with_name(path.name + suffix)
    if path.is_dir() and target.is_dir():
        shutil.rmtree(target)
    os.replace(path, target)
    return target


def _is_sharded_dir(path: Path) -> bool:
    return (_SHARDED.match(path.name) is not None and path.parent.name == "checkpoints"
            and path.is_dir())


def newest_intact_checkpoint(
    run_dir: str | Path,
) -> tuple[Path, dict[str, Any], list[tuple[Path, str]]] | None:
    """The newest checkpoint of a run that loads, as ``(path, state, skipped)``.

    ``skipped`` lists the newer checkpoints that could not be read, newest first, each with
    the one-line reason. None when the run has no checkpoint; a :class:`CheckpointError`
    naming every file when none of them loads.
    """
    skipped: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path), skipped
        except CheckpointError as e:
            skipped.append((path, str(e)))
    if skipped:
        names = ", ".join(p.name for p, _ in skipped)
        raise CheckpointError(f"no checkpoint of {run_dir} can be read ({names}); the first "
                              f"error: {skipped[0][1]}")
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def capture_rng(generator: torch.Generator | None = None) -> dict[str, Any]:
    """The global RNG states (torch, CUDA, numpy, Python) and ``generator``'s, as plain data."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generator": generator.get_state() if generator is not None else None,
    }
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator | None = None) -> None:
    """Restore what :func:`capture_rng` captured."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
         n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and state.get("generator") is not None:
        generator.set_state(state["generator"])
