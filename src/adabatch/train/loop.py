"""The reference training loop: one TrainConfig in, a run directory out.

:func:`train` builds everything from the public API (:mod:`adabatch.optim`,
:mod:`adabatch.batching`, :mod:`adabatch.train.data` and :mod:`adabatch.train.models`), then
runs the steps (:mod:`adabatch.train.steps`), one path whatever the estimator
(:mod:`adabatch.batching.protocol`); each step reads top to bottom::

    B = controller.batch_size                       # the policy decides the batch size
    apply_lr(optimizer, base_lrs, schedule(s), controller.lr_factor)
    with estimator.step(measure=controller.wants_stats()) as step:
        for idx in sampler.take(B):                 # micro-batches of <= micro_batch samples
            with step.micro_batch(len(idx)):
                (loss_fn(model(x[idx]), y[idx]) * len(idx) / B).backward()
    stats = estimator.stats() if step.measuring else None
    optimizer.step(); controller.update(stats)      # stats None on steps without a test

**Statistics.** They are measured only when ``controller.wants_stats()`` (a test step by
``--test-interval`` and the batch below its maximum). The per-sample estimator measures over
every sample of the step. The micro-batch estimator treats each micro-batch gradient as one
draw and needs at least two per step; :func:`adabatch.train.config.validate` guarantees that
(``--initial-batch >= 2 x --micro-batch``), so a step never has a single micro-batch.

**Learning rate.** ``lr = base_lr · warmup(s) · cosine(s) · controller.lr_factor`` with s the
samples seen before the step, so the schedule stays right as the batch grows; with a
``--steps`` budget the cosine runs over steps. The loop alone sets it, once per step, with
:func:`adabatch.batching.apply_lr`; the controller only keeps its factor.

**Budget.** The loop stops after the step at which ``samples >= budget`` (epochs are counted
in samples, so the last step may overshoot by less than one batch) or ``step == steps``.

**Several processes** (under ``torchrun``; :mod:`adabatch.train.distributed`): B is the
global batch, each rank takes its share of every round of ``world × micro_batch`` indices
and scales its losses by ``len(idx) / (B / world)``; DDP averages the gradients (micro-batches
before the last run under ``no_sync``; when measuring with an estimator that
``needs_local_grads``, every one does and the gradients are averaged by hand). The loss,
the stop flag and the statistics' partial sums travel in one small all-reduce per step, so
every rank sees the same numbers and takes the same decision. Rank 0 alone writes metrics,
checkpoints and the summary; evaluation is sharded and reduced. Restarted by torchrun, the
run resumes from its ``--out``. ``--parallel fsdp`` shards the model with FSDP2 instead of
DDP (:mod:`adabatch.train.fsdp`, docs/fsdp.md): the same step, the same decisions.

**Interruptions.** SIGINT and SIGTERM finish the current step, write a checkpoint and return
with ``interrupted`` set (the CLI exits with 128 + the signal number). A run killed without a
chance to react (SIGKILL, power loss) continues from its newest checkpoint with
``adabatch train --resume RUN``, bitwise identically on CPU.

**Callbacks.** ``train(cfg, callbacks=...)`` calls the events of
:class:`adabatch.train.callbacks.Callbacks` (step start, before the optimizer step, step end,
train end); the tests inject their faults through them.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from adabatch.train.build import Run, build, resolve_device
from adabatch.train.callbacks import Callbacks
from adabatch.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    newest_intact_checkpoint,
    remove_stale_temporaries,
    set_aside,
    write_atomic,
    write_text_atomic,
)
from adabatch.train.config import ConfigError, TrainConfig, replace, validate
from adabatch.train.distributed import Dist, check_world_size, init_from_env, restart_count
from adabatch.train.fsdp import full_model_state
from adabatch.train.logging import MetricsWriter, Progress
from adabatch.train.rundir import RunDirBusy, RunDirLock, check_new_run_dir
from adabatch.train.state import check_compatible, restore, write_checkpoint
from adabatch.train.steps import StopFlag, eval_row, evaluate, lr_multiplier, run_steps

__all__ = ["Callbacks", "Run", "TrainResult", "build", "check_compatible", "evaluate",
           "lr_multiplier", "preflight", "train"]


@dataclass
class TrainResult:
    """What :func:`train` returns: the summary (as in ``summary.json``) and the run dir."""

    run_dir: Path
    summary: dict[str, Any]
    interrupted: int | None = None  # the signal number when stopped by SIGINT/SIGTERM
    rank: int = 0  # this process's rank (only rank 0 writes files and prints)


def _default_run_dir(cfg: TrainConfig) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    policy = cfg.batch_test if cfg.batch_test != "none" else (cfg.batch_schedule or "constant")
    # a user factory (pkg.mod:factory) names the data set by its function, without ':' or '.'
    dataset = cfg.dataset.rsplit(":", 1)[-1].replace(".", "_")
    base = Path("runs") / f"{stamp}-{dataset}-{cfg.optimizer}-{policy}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


class _NullWriter:
    """The metrics writer of ranks other than 0: they write nothing."""

    def write(self, row: dict[str, Any]) -> None:
        pass

    def write_step(self, *args: Any) -> None:
        pass

    def flush(self) -> int:
        return 0

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------- entry point


def _prepare_run_dir(cfg: TrainConfig) -> Path:
    """The run directory: ``--resume``'s, or a new ``--out`` that holds no run and none of
    the user's files (it must not exist, or be empty)."""
    if cfg.resume is not None:
        return Path(cfg.resume)
    if cfg.out is not None and not cfg.out.strip():
        raise ConfigError("--out is empty; give a directory for the run")
    run_dir = Path(cfg.out) if cfg.out is not None else _default_run_dir(cfg)
    if (run_dir / "metrics.jsonl").exists() or latest_checkpoint(run_dir) is not None:
        raise ConfigError(f"{run_dir} already holds a run; continue it with --resume "
                          f"{run_dir} or choose another --out")
    try:
        return check_new_run_dir(run_dir)
    except ValueError as e:
        raise ConfigError(str(e)) from None


class _Claim:
    """Rank 0's ownership of the run directory (see :mod:`adabatch.train.rundir`): the lock
    is taken before the data loads and held until the run ends."""

    def __init__(self) -> None:
        self.lock: RunDirLock | None = None
        self.removed: list[Path] = []

    def __call__(self, cfg: TrainConfig) -> Path:
        run_dir = _prepare_run_dir(cfg)
        lock = RunDirLock(run_dir)
        try:
            lock.acquire()
        except RunDirBusy as e:
            raise ConfigError(str(e)) from None
        self.lock = lock
        self.removed = remove_stale_temporaries(run_dir)  # ours alone: the lock is held
        return run_dir

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def preflight(cfg: TrainConfig, world_size: int) -> None:
    """The checks that a launcher can make before starting ``world_size`` processes: the batch
    sizes are multiples of micro-batch × processes, and a run to resume has a global batch
    size that the processes can share. Raises ConfigError / CheckpointError (one line)."""
    validate(cfg)
    micro = cfg.effective_micro_batch() or 1
    granularity = cfg.batch_granularity or micro * world_size
    if granularity % (micro * world_size):
        raise ConfigError(f"--batch-granularity ({granularity}) must be a multiple of "
                          f"micro-batch x processes ({micro} x {world_size})")
    for key in ("initial_batch", "max_batch"):
        if getattr(cfg, key) % granularity:
            raise ConfigError(
                f"--{key.replace('_', '-')} ({getattr(cfg, key)}) must be a multiple of "
                f"micro-batch x processes ({micro} x {world_size} = {granularity}) "
                f"with {world_size} processes")
    if cfg.resume is not None:
        found = newest_intact_checkpoint(cfg.resume)
        if found is not None:
            path, state, _ = found
            check_compatible(state["config"], cfg, path)
            try:
                check_world_size(int(state["controller"]["batch_size"]), micro, world_size,
                                 (state.get("extra") or {}).get("world_size", 1), path)
            except ValueError as e:
                raise CheckpointError(str(e)) from None


def _auto_resume(cfg: TrainConfig) -> TrainConfig:
    """Restarted by torchrun (``TORCHELASTIC_RESTART_COUNT > 0``) into an ``--out`` that holds
    the run of the previous attempt: continue it from its newest checkpoint. A restarted
    ``--resume RUN --from-step N`` continues from RUN's newest checkpoint too (the first
    attempt went back to step N and set the later ones aside), not from step N again."""
    if restart_count() > 0 and cfg.resume is not None and cfg.from_step is not None:
        return replace(cfg, from_step=None)
    if restart_count() == 0 or cfg.resume is not None or cfg.out is None:
        return cfg
    out = Path(cfg.out)
    if (out / "metrics.jsonl").exists() or latest_checkpoint(out) is not None:
        return replace(cfg, resume=str(out))
    return cfg


def _rank0_first(d: Dist, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 and give its result (or its ConfigError/CheckpointError) to every
    rank, so that all ranks fail or go on together."""
    result: Any = None
    error: tuple[str, Any] | None = None
    if d.is_main:
        try:
            result = fn()
        except (ConfigError, CheckpointError) as e:
            error = (type(e).__name__, str(e))
        except OSError as e:  # an unusable --out: the I/O exit code on every rank
            error = ("OSError", (e.errno, e.strerror or str(e), e.filename))
    result, error = d.broadcast_object((result, error))
    if error is not None:
        kind, detail = error
        if kind == "OSError":
            raise OSError(*detail)
        raise (ConfigError if kind == "ConfigError" else CheckpointError)(detail)
    return result


def train(cfg: TrainConfig, *, say: Callable[[str], None] | None = None,
          callbacks: Callbacks | None = None) -> TrainResult:
    """Run (or resume, with ``cfg.resume``) a training run; return its summary.

    Raises :class:`ConfigError` / :class:`~adabatch.train.checkpoint.CheckpointError` for bad
    configurations and checkpoints, before any training step.

    Under torchrun (``WORLD_SIZE > 1`` in the environment) it joins the process group (gloo on
    CPU, NCCL on CUDA) and trains data-parallel: see :mod:`adabatch.train.distributed`. Only
    rank 0 prints and writes files; every rank loads the checkpoint on resume.

    ``callbacks``: an :class:`adabatch.train.callbacks.Callbacks` whose events the loop calls.
    """
    validate(cfg)
    d = init_from_env(resolve_device(cfg.device).type, cfg.dist_timeout,
                      group_of_one=cfg.parallel == "fsdp")
    try:
        return _train(cfg, d, say, callbacks if callbacks is not None else Callbacks())
    finally:
        d.close()


def _warn(line: str) -> None:
    """A notice about recovered or set-aside files: on stderr, also under --quiet."""
    print(f"adabatch: {line}", file=sys.stderr, flush=True)


def _pick_checkpoint(cfg: TrainConfig, run_dir: Path,
                     say: Callable[[str], None] = _warn) -> Path | None:
    """Rank 0: the newest intact checkpoint (or the one of ``--from-step``), compatible with
    ``cfg``. Newer damaged ones are renamed ``*.damaged`` (kept for inspection, out of the
    way of keep-last-K), each with one line; with ``--from-step N`` the newer ones are set
    aside as ``*.abandoned`` the same way."""
    from_step = getattr(cfg, "from_step", None)
    if from_step is not None:
        return _checkpoint_at(run_dir, int(from_step), cfg, say)
    found = newest_intact_checkpoint(run_dir)
    if found is None:
        return None
    path, state, skipped = found
    for bad, why in skipped:
        set_aside(bad, ".damaged")
        say(f"skipped {bad.name} ({why}); kept as {bad.name}.damaged")
    check_compatible(state["config"], cfg, path)  # checked once, before every rank loads
    return path


def _checkpoint_at(run_dir: Path, step: int, cfg: TrainConfig,
                   say: Callable[[str], None]) -> Path:
    paths = {int(p.stem.split("_")[1]): p for p in list_checkpoints(run_dir)}
    if step not in paths:
        kept = ", ".join(str(k) for k in sorted(paths)) or "none"
        raise CheckpointError(f"--from-step {step}: {run_dir} has no checkpoint of step "
                              f"{step} (kept: {kept})")
    check_compatible(load_checkpoint(paths[step])["config"], cfg, paths[step])
    for later in sorted(k for k in paths if k > step):
        p = paths[later]
        set_aside(p, ".abandoned")
        say(f"--from-step {step}: set {p.name} aside as {p.name}.abandoned")
    return paths[step]


def _find_checkpoint(cfg: TrainConfig, d: Dist, run_dir: Path, say: Callable[[str], None]
                     ) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint to resume from (chosen once, on rank 0) and its state on every rank."""
    if cfg.resume is None:
        return None, None
    path = _rank0_first(d, lambda: _pick_checkpoint(cfg, run_dir))
    return path, (load_checkpoint(path) if path is not None else None)


def _check_tensorboard(cfg: TrainConfig, d: Dist) -> None:
    if cfg.tensorboard and d.is_main:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except (ModuleNotFoundError, ImportError):
            raise ConfigError("--tensorboard needs the tensorboard package "
                              "(pip install tensorboard)") from None


def _open_run(cfg: TrainConfig, d: Dist, say: Callable[[str], None],
              callbacks: Callbacks, claim: _Claim) -> tuple[Run, Any]:
    """Claim the run directory, build the run, restore its checkpoint (on resume) and open
    its metrics writer."""
    restarted = restart_count() > 0
    run_dir = _rank0_first(d, lambda: claim(cfg))
    if claim.removed:
        _warn(f"removed {len(claim.removed)} temporary file(s) of an interrupted write")
    ckpt_path, ckpt_state = _find_checkpoint(cfg, d, run_dir, say)
    _check_tensorboard(cfg, d)
    run = build(cfg, run_dir, d, step_reducer=callbacks.reduce_statistics)
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    if ckpt_state is not None:
        assert ckpt_path is not None
        restore(run, ckpt_state, ckpt_path)
        why = f"restarted by torchrun (restart {restart_count()}); " if restarted else ""
        say(f"{why}resuming {run_dir} from {ckpt_path.name} (step {run.step}, "
            f"{run.samples} samples)")
    elif cfg.resume is not None:
        say(f"no checkpoint in {run_dir}; starting it from the beginning")
    writer: Any = _NullWriter()
    if d.is_main:
        replace(cfg, from_step=None).save(run_dir / "config.json")  # --from-step: once
        writer = MetricsWriter(
            run_dir / "metrics.jsonl",
            truncate_at=run.metrics_offset if ckpt_state is not None else None,
            tensorboard_dir=run_dir / "tensorboard" if cfg.tensorboard else None)
    return run, writer


def _train(cfg: TrainConfig, d: Dist, say: Callable[[str], None] | None,
           callbacks: Callbacks) -> TrainResult:
    cfg = _auto_resume(cfg)
    quiet = cfg.quiet or not d.is_main
    tell: Callable[[str], None] = say if say is not None and d.is_main else (
        lambda line: None if quiet else print(line, flush=True))
    claim = _Claim()
    try:
        return _train_claimed(cfg, d, tell, quiet, callbacks, claim)
    finally:
        claim.release()


def _train_claimed(cfg: TrainConfig, d: Dist, tell: Callable[[str], None], quiet: bool,
                   callbacks: Callbacks, claim: _Claim) -> TrainResult:
    run, writer = _open_run(cfg, d, tell, callbacks, claim)
    unit = "step" if run.budget_kind == "steps" else "sample"
    progress = Progress(run.budget, unit, quiet=quiet,
                        start=run.step if unit == "step" else run.samples)
    procs = f" x {d.world_size} processes" if d.enabled else ""
    procs += " (FSDP2, sharded)" if cfg.parallel == "fsdp" else ""
    tell(f"training {cfg.model} on {cfg.dataset} ({len(run.data.x_train)} samples) with "
         f"{cfg.optimizer} + batch policy "
         f"{cfg.batch_test if cfg.batch_test != 'none' else cfg.batch_schedule or 'constant'}"
         f" on {run.device}{procs}; budget {run.budget} {unit}s; run dir {run.run_dir}")
    try:
        with StopFlag() as stop:
            run_steps(run, writer, progress, stop, callbacks)
        progress.close()
        if stop.signum is not None:
            name = signal.Signals(stop.signum).name
            tell(f"stopped by {name} at step {run.step}; checkpoint written; continue with "
                 f"`adabatch train --resume {run.run_dir}`")
            d.barrier()
            return TrainResult(run.run_dir, {"step": run.step, "samples": run.samples},
                               interrupted=stop.signum, rank=d.rank)
        final = _final_eval(run, writer, progress)
    finally:
        progress.close()
        writer.close()
    callbacks.on_train_end(run)
    return _finish(run, final)


def _final_eval(run: Run, writer: Any, progress: Any) -> dict[str, Any]:
    """The final evaluation row, written once: a resumed run whose last checkpoint already
    holds it (a finished run, or one killed between that checkpoint and ``final.pt``) reuses
    it instead of writing a second row for the same step."""
    saved = run.extra.get("final_eval")
    if isinstance(saved, dict) and saved.get("step") == run.step:
        return saved
    final = eval_row(run, writer, progress)
    run.extra["final_eval"] = final
    write_checkpoint(run, writer)
    return final


def _finish(run: Run, final: dict[str, Any]) -> TrainResult:
    """Write final.pt and summary.json (rank 0); every rank returns once they exist."""
    cfg, d = run.cfg, run.dist
    summary = {
        "test_accuracy": final["test_accuracy"],
        "test_loss": final["test_loss"],
        "steps": run.step,
        "samples": run.samples,
        "epochs": run.samples / len(run.data.x_train),
        "initial_batch_size": cfg.initial_batch,
        "final_batch_size": run.controller.batch_size,
        "wall_time_s": run.elapsed,
        "stat_warnings": getattr(run.controller, "warnings", 0),
        "micro_batch": cfg.effective_micro_batch(),
        "world_size": d.world_size,
        "optimizer_hparams": {k: v for k, v in run.optimizer.defaults.items()
                              if isinstance(v, (bool, int, float, str, tuple, list))
                              or v is None},
        "device": str(run.device),
        "config": cfg.to_dict(),
    }
    model_state = full_model_state(run.model)  # under FSDP2 a collective: every rank
    if d.is_main:
        write_atomic(model_state, run.run_dir / "final.pt")
        write_text_atomic(json.dumps(summary, indent=2) + "\n", run.run_dir / "summary.json")
    d.barrier()  # every rank returns once the outputs exist
    return TrainResult(run.run_dir, summary, rank=d.rank)
