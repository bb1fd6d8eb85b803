"""Sharded checkpoints of FSDP2 runs (``--parallel fsdp``) with ``torch.distributed.checkpoint``.

A sharded checkpoint is a directory ``checkpoints/step_XXXXXXXX/`` in the run directory::

    .metadata, __<rank>_0.distcp    DCP: the model and optimizer state, every rank its shards
    trainer.pt                      the trainer's other state (rank 0; torch.save, plain data)
    complete.json                   the completion marker: format, format_version, step,
                                    world_size, adabatch_version

**What is saved.** The model and optimizer state come from
:func:`torch.distributed.checkpoint.state_dict.get_state_dict`: parameters and optimizer state
are keyed by the parameters' fully qualified names (not by optimizer index) and held as
DTensor shards, so DCP writes each rank's own shards (no gather) and reads them back into any
number of processes, resharding on load (2 → 1, 1 → 2, ...). ``trainer.pt`` holds what
:mod:`adabatch.train.checkpoint` stores in a single-file checkpoint, except ``model`` and
``optimizer``: counters, controller, sampler, every rank's RNG states, ``metrics_offset``,
``extra``, with ``sharded: True``.

**Atomic at the run level.** Every rank writes into ``step_XXXXXXXX.tmp/``; after DCP's own
final collective (its coordinator writes ``.metadata`` once every rank's data is written)
rank 0 writes ``trainer.pt`` and then ``complete.json`` (each atomically: temporary file,
fsync, rename), fsyncs the directory and renames it to ``step_XXXXXXXX/``, then fsyncs
``checkpoints/``; a last barrier makes :func:`save_sharded` return on every rank only once
the checkpoint is in place. So a checkpoint is complete (its name has no ``.tmp`` and it holds
the marker) or it is ignored: a rank killed in the middle of a write leaves a ``.tmp``
directory, which :func:`remove_stale_directories` deletes on the next start (while the
resuming process holds the run directory's lock), and a ``step_XXXXXXXX/`` without its
marker is skipped when reading (the loop sets it aside as ``.damaged``, as it does damaged
single-file checkpoints), so the previous checkpoint is used. Older checkpoints beyond the
last ``keep`` are deleted after the new one is in place.

**Reading.** :func:`load_trainer_state` checks the marker (another ``format``, another
``format_version``: :class:`~adabatch.train.checkpoint.CheckpointError`, one line) and reads
``trainer.pt`` with ``weights_only=True``; every rank then calls :func:`load_sharded` (a
collective) to read its shards of the model and optimizer state. Several nodes need a file
system that every rank sees (the same path everywhere).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from adabatch import _dist
from adabatch.train.checkpoint import (
    CheckpointError,
    _first_line,
    _fsync_dir,
    write_atomic,
    write_text_atomic,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MARKER",
    "TRAINER_STATE",
    "list_sharded",
    "load_sharded",
    "load_trainer_state",
    "read_marker",
    "remove_stale_directories",
    "save_sharded",
]

#: The ``format`` of the completion marker: what wrote the directory.
FORMAT = "adabatch-sharded-checkpoint"
#: Bumped whenever the layout of a sharded checkpoint changes incompatibly.
FORMAT_VERSION = 1
#: The completion marker; a directory without it is not a checkpoint.
MARKER = "complete.json"
#: The trainer's state other than the model and optimizer (rank 0 writes it).
TRAINER_STATE = "trainer.pt"

_DIR = re.compile(r"^step_(\d{8,})$")
_STALE = re.compile(r"^step_(\d{8,})\.(tmp|replaced)$")


def _barrier() -> None:
    if _dist.world_size() > 1:
        dist.barrier()


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The model and optimizer state as DCP reads and writes it (FQN keys, DTensor shards).
    An optimizer without state yet gets it from one step with zero gradients and learning
    rate 0 (what :func:`get_state_dict` does), so the keys of a loaded state exist."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state}


def list_sharded(run_dir: str | Path) -> list[Path]:
    """The run's sharded checkpoint directories, complete or not, oldest first (by step)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir()
             if (m := _DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def remove_stale_directories(run_dir: str | Path) -> list[Path]:
    """Clear what an interrupted save left in the run's ``checkpoints/``; returns the
    directories removed. A ``step_XXXXXXXX.tmp`` directory is deleted, unless it holds its
    marker (written last: the save was complete) and its final name is free (killed between
    :func:`_move_into_place`'s two renames): then it is renamed into place. A
    ``step_XXXXXXXX.replaced`` directory (the previous save of the same step) is deleted
    once its step is in place, else renamed back. Call it only while this process owns the
    run directory (no save can be under way)."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    if not ckpt_dir.is_dir():
        return []
    removed = []
    found = [(m.group(2) == "replaced", p.name, p, m) for p in ckpt_dir.iterdir()
             if (m := _STALE.match(p.name)) and p.is_dir()]
    for _, _, p, m in sorted(found):  # the new (.tmp) before the old (.replaced)
        final = p.with_name(f"step_{m.group(1)}")
        complete = m.group(2) == "replaced" or (p / MARKER).is_file()
        if complete and not final.exists():
            os.replace(p, final)
            _fsync_dir(ckpt_dir)
        else:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _marker(step: int) -> dict[str, Any]:
    from adabatch import __version__

    return {"format": FORMAT, "format_version": FORMAT_VERSION, "step": int(step),
            "world_size": _dist.world_size(), "adabatch_version": __version__}


def _failure(e: BaseException) -> BaseException:
    """The first rank's exception inside DCP's CheckpointException (DCP reports the failure
    of any rank as one CheckpointException, a BaseException, on every rank)."""
    failures = getattr(e, "failures", None) or {}
    for _, failure in sorted(failures.items()):
        return failure[0] if isinstance(failure, tuple) else failure
    return e


def save_sharded(run_dir: str | Path, step: int, model: nn.Module,
                 optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any] | None, *,
                 keep: int = 3) -> Path:
    """Write the checkpoint of ``step``: every rank calls it (a collective). ``model`` is an
    FSDP2 (``fully_shard``) module or a plain one, ``optimizer`` its optimizer;
    ``trainer_state`` (plain data and tensors, read from rank 0 only) goes to
    ``trainer.pt`` with ``format_version`` and ``sharded`` added. Keeps the newest ``keep``
    checkpoints. Returns the checkpoint's directory (in place on every rank on return)."""
    import torch.distributed.checkpoint as dcp

    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    final = Path(run_dir) / "checkpoints" / f"step_{int(step):08d}"
    tmp = final.with_name(final.name + ".tmp")
    if _dist.rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    try:
        dcp.save(_dcp_state(model, optimizer), checkpoint_id=tmp)
    except dcp.CheckpointException as e:
        cause = _failure(e)
        if isinstance(cause, OSError):  # disk full, permission denied: the I/O exit code
            raise cause from None
        if "unexpected pos" in str(cause):
            # torch.save's zip writer, which DCP writes tensors with, turns a failed write
            # into this RuntimeError and drops the OSError (ENOSPC, EFBIG, EDQUOT, ...)
            raise OSError(errno.EIO, "a write of the checkpoint failed (disk full, a quota or "
                          "a file size limit)", str(tmp)) from None
        raise RuntimeError(f"saving checkpoint {final.name}: {_first_line(cause)}") from None
    _barrier()
    if _dist.rank() == 0:
        if trainer_state is None:
            raise ValueError("rank 0 needs the trainer state to save a checkpoint")
        write_atomic({**trainer_state, "format_version": FORMAT_VERSION, "sharded": True},
                     tmp / TRAINER_STATE)
        write_text_atomic(json.dumps(_marker(step), indent=1) + "\n", tmp / MARKER)
        _fsync_dir(tmp)
        _move_into_place(tmp, final)
        _prune(run_dir, keep)
    _barrier()
    return final


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` (the same step saved again: the
    last checkpoint of a run ending at a checkpoint step) is renamed aside first and deleted
    once the new one is in place."""
    old = final.with_name(final.name + ".replaced")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def _prune(run_dir: str | Path, keep: int) -> None:
    for old in list_sharded(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def read_marker(path: str | Path) -> dict[str, Any]:
    """The completion marker of checkpoint directory ``path``; CheckpointError (one line)
    when it is missing (an incomplete checkpoint), unreadable, of another format or of
    another format version."""
    path = Path(path)
    marker = path / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{path} is incomplete (no {MARKER}: its save did not finish)")
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {marker}: {_first_line(e)}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        named = data.get("format") if isinstance(data, dict) else None
        raise CheckpointError(f"{path} is not an adabatch sharded checkpoint ({MARKER} "
                              f"names format {named!r})")
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} has sharded checkpoint format version "
                              f"{data.get('format_version')!r}; this adabatch reads version "
                              f"{FORMAT_VERSION}")
    return data


def load_trainer_state(path: str | Path) -> dict[str, Any]:
    """The trainer state of the complete checkpoint directory ``path`` (its marker checked
    first); CheckpointError (one line) when it cannot be read."""
    path = Path(path)
    read_marker(path)
    if not (path / ".metadata").is_file():
        raise CheckpointError(f"{path} is damaged: it has no DCP .metadata")
    try:
        state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is damaged: it has no {TRAINER_STATE}") from None
    except Exception as e:  # damaged bytes raise struct.error, EOFError, RuntimeError, ...
        raise CheckpointError(f"cannot read {path / TRAINER_STATE}: the file is damaged "
                              f"({_first_line(e)})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path / TRAINER_STATE} is not the trainer state of a "
                              f"version-{FORMAT_VERSION} sharded checkpoint")
    return state


def _keep_saved_optimizer_state(state: dict[str, Any], path: Path) -> None:
    """Drop from the load target the optimizer state of the parameters that have none in the
    checkpoint: a trainable parameter that never had a gradient (unused in the forward) has
    no optimizer state in the saved run, but :func:`_dcp_state` initialises one for every
    trainable parameter. Loaded without it, the parameter is again without state, as in the
    saved run."""
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    per_param = state["optimizer"].get("state", {})
    for fqn in [fqn for fqn, entry in per_param.items()
                if not any(f"optimizer.state.{fqn}.{key}" in saved for key in entry)]:
        del per_param[fqn]


def load_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read the model and optimizer state of checkpoint directory ``path`` into ``model`` and
    ``optimizer``: every rank calls it (a collective), with any number of ranks (DCP reshards).
    CheckpointError (one line) when the checkpoint does not fit the model or optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    read_marker(path)
    state = _dcp_state(model, optimizer)
    try:
        _keep_saved_optimizer_state(state, Path(path))
        dcp.load(state, checkpoint_id=Path(path))  # fails on a key the checkpoint lacks
        # not strict: the keys are this model's and optimizer's own, and an optimizer may
        # keep no state for some parameters (AdaGrad-Norm: one accumulator per pool)
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"],
                       options=StateDictOptions(strict=False))
    except (dcp.CheckpointException, RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"cannot restore {path}: {_first_line(_failure(e))}") from None
