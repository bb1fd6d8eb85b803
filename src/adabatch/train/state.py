"""A run's checkpoint: what is saved, what must match on resume, and the restore.

DDP and single-process runs write one file per checkpoint (rank 0, :mod:`.checkpoint`);
``--parallel fsdp`` runs write sharded checkpoints, every rank its shards of the model and
optimizer (:mod:`.sharded_checkpoint`), with the same trainer state beside them. A run
resumes only from its own kind; with DCP's resharding, a sharded checkpoint loads into
another number of processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from adabatch.train.build import Run, one_line
from adabatch.train.checkpoint import (
    CheckpointError,
    capture_rng,
    restore_rng,
    save_checkpoint,
)
from adabatch.train.config import RESUME_MUTABLE, RETIRED_KEYS, TrainConfig
from adabatch.train.distributed import check_world_size
from adabatch.train.sharded_checkpoint import load_sharded, save_sharded

__all__ = ["check_compatible", "checkpoint_state", "restore", "write_checkpoint"]


def _sharded(cfg: TrainConfig) -> bool:
    """Whether the run's checkpoints are sharded (``--parallel fsdp``)."""
    return getattr(cfg, "parallel", "ddp") == "fsdp"


def checkpoint_state(run: Run, rng_ranks: list[Any] | None = None, *,
                     sharded: bool = False) -> dict[str, Any]:
    """What a checkpoint holds; ``sharded``: all but the model and optimizer (which DCP
    writes beside it)."""
    from adabatch import __version__

    state = {
        "adabatch_version": __version__,
        "config": run.cfg.to_dict(),
        "step": run.step,
        "samples": run.samples,
        "elapsed": run.elapsed,
    }
    if not sharded:  # in this order: the bytes of a DDP checkpoint are those of before
        state["model"] = run.model.state_dict()
        state["optimizer"] = run.optimizer.state_dict()
    state |= {
        "controller": run.controller.state_dict(),
        "sampler": run.sampler.state_dict(),
        "rng": capture_rng(run.augment_gen),
        "metrics_offset": run.metrics_offset,
        "extra": run.extra,
        "divergence": run.divergence.state_dict(),
    }
    if rng_ranks is not None:  # every rank's RNG states (augmentation), rank order
        state["rng_ranks"] = rng_ranks
    return state


def write_checkpoint(run: Run, writer: Any) -> Path | None:
    """Rank 0 writes the checkpoint (atomically); with several ranks every rank's RNG states
    travel to it first (one all_gather of small objects). ``--parallel fsdp``: every rank
    writes its shards and rank 0 the rest (a collective; atomic at the run level)."""
    d = run.dist
    rng_ranks = d.gather_objects(capture_rng(run.augment_gen)) if d.enabled else None
    if _sharded(run.cfg):
        state = None
        if d.is_main:
            run.metrics_offset = writer.flush()
            state = checkpoint_state(run, rng_ranks, sharded=True)
        return save_sharded(run.run_dir, run.step, run.model, run.optimizer, state,
                            keep=run.cfg.keep_checkpoints)
    if not d.is_main:
        return None
    run.metrics_offset = writer.flush()
    return save_checkpoint(run.run_dir, checkpoint_state(run, rng_ranks),
                           keep=run.cfg.keep_checkpoints)


def check_compatible(saved: dict[str, Any], cfg: TrainConfig, where: Path) -> None:
    """Raise CheckpointError when ``cfg`` differs from the checkpoint's config in a key that
    changes the run (anything but budget, logging, device and the like; also ``lr`` with
    ``--from-step``). Keys that older versions wrote and this one retired (``RETIRED_KEYS``)
    are ignored."""
    current = cfg.to_dict()
    # going back to an earlier step (after a divergence) may change the learning rate
    mutable = RESUME_MUTABLE | ({"lr"} if cfg.from_step is not None else set())
    for key in sorted(current):
        if key in mutable or key not in saved:
            continue
        if saved[key] != current[key]:
            raise CheckpointError(
                f"checkpoint {where} is incompatible: it was written with "
                f"{key}={saved[key]!r}, this run has {key}={current[key]!r}"
            )
    missing = sorted(set(saved) - set(current) - RETIRED_KEYS)
    if missing:
        raise CheckpointError(f"checkpoint {where} has unknown config keys {missing}")
    _check_kind(cfg, Path(where))  # for checkpoints older than the key ``parallel``


def _check_kind(cfg: TrainConfig, where: Path) -> None:
    """A sharded checkpoint (a directory) resumes only under ``--parallel fsdp``, a
    single-file one only without it."""
    if where.is_dir() and not _sharded(cfg):
        raise CheckpointError(f"checkpoint {where} is sharded (written by a --parallel fsdp "
                              f"run); resume it with --parallel fsdp")
    if not where.is_dir() and _sharded(cfg):
        raise CheckpointError(f"checkpoint {where} was written by a run without --parallel "
                              f"fsdp (one file, not sharded); resume it without --parallel "
                              f"fsdp")


def _check_world(run: Run, state: dict[str, Any], path: Path) -> None:
    saved_world = (state.get("extra") or {}).get("world_size", 1)
    try:
        check_world_size(int(state["controller"]["batch_size"]),
                         run.cfg.effective_micro_batch() or 1, run.dist.world_size,
                         saved_world, path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    except (KeyError, TypeError):
        pass  # a malformed controller state is reported by load_state_dict


def restore(run: Run, state: dict[str, Any], path: Path) -> None:
    """Load a checkpoint's state into ``run`` (CheckpointError, one line, when it cannot: an
    incompatible configuration, a missing key, a state that does not fit, a bad RNG state)."""
    try:
        _restore(run, state, path)
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as e:
        what = f"missing key {e}" if isinstance(e, KeyError) else one_line(e)
        raise CheckpointError(f"cannot restore {path}: {what}") from None


def _restore(run: Run, state: dict[str, Any], path: Path) -> None:
    check_compatible(state["config"], run.cfg, path)
    d = run.dist
    _check_world(run, state, path)
    try:
        if _sharded(run.cfg):  # every rank reads its shards (DCP reshards to this world)
            load_sharded(path, run.model, run.optimizer)
        else:
            run.model.load_state_dict(state["model"])
            run.optimizer.load_state_dict(state["optimizer"])
        run.controller.load_state_dict(state["controller"])
        run.sampler.load_state_dict(state["sampler"])
        if "divergence" in state:  # checkpoints of 0.1.0 before the rule have none
            run.divergence.load_state_dict(state["divergence"])
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot restore {path}: {one_line(e)}") from None
    ranks = state.get("rng_ranks")
    if ranks is not None and len(ranks) == d.world_size:
        restore_rng(ranks[d.rank], run.augment_gen)
    else:  # another world size: rank 0 continues rank 0's stream, the others reseed
        restore_rng(state["rng"], run.augment_gen if d.rank == 0 else None)
        if d.rank != 0:
            run.augment_gen.manual_seed(run.cfg.seed + 1 + 7919 * d.rank + 104729 * state["step"])
    try:
        run.step, run.samples = int(state["step"]), int(state["samples"])
        run.elapsed, run.metrics_offset = float(state["elapsed"]), state["metrics_offset"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"cannot restore {path}: missing or bad counter "
                              f"({one_line(e)})") from None
    run.extra = {**dict(state.get("extra") or {}), "world_size": d.world_size}
