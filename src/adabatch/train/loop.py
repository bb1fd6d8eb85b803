"""The reference training loop: one TrainConfig in, a run directory out.

:func:`train` builds everything from the public API (:mod:`adabatch.optim`,
:mod:`adabatch.batching`, :mod:`adabatch.train.data` and :mod:`adabatch.train.models`), then
runs the loop in :func:`_run`, which reads top to bottom::

    B = controller.batch_size                       # the policy decides the batch size
    for idx in sampler.take(B):                     # micro-batches of <= micro_batch samples
        loss = loss_fn(model(x[idx]), y[idx]) * len(idx) / B
        loss.backward()                             # inside estimator.measure() on test steps
    optimizer.step(); controller.update(stats)      # stats None on steps without a test

**Statistics.** They are measured only when ``controller.wants_stats()`` (a test step by
``--test-interval`` and the batch below its maximum). The per-sample estimator measures over
every sample of the step. The micro-batch estimator treats each micro-batch gradient as one
draw and needs at least two per step; :func:`adabatch.train.config.validate` guarantees that
(``--initial-batch >= 2 x --micro-batch``), so a step never has a single micro-batch.

**Learning rate.** ``lr = base_lr · warmup(s) · cosine(s) · controller.lr_factor`` with s the
samples seen before the step, so the schedule stays right as the batch grows; with a
``--steps`` budget the cosine runs over steps.

**Budget.** The loop stops after the step at which ``samples >= budget`` (epochs are counted
in samples, so the last step may overshoot by less than one batch) or ``step == steps``.

**Several processes** (under ``torchrun``; :mod:`adabatch.train.distributed`): B is the
global batch, each rank takes its share of every round of ``world × micro_batch`` indices
and scales its losses by ``len(idx) / (B / world)``; DDP averages the gradients (micro-batches
before the last run under ``no_sync``). The loss, the stop flag and the statistics' partial
sums travel in one small all-reduce per step, so every rank sees the same numbers and takes
the same decision. Rank 0 alone writes metrics, checkpoints and the summary; evaluation is
sharded and reduced. Restarted by torchrun, the run resumes from its ``--out``.

**Interruptions.** SIGINT and SIGTERM finish the current step, write a checkpoint and return
with ``interrupted`` set (the CLI exits with 128 + the signal number). A run killed without a
chance to react (SIGKILL, power loss) continues from its newest checkpoint with
``adabatch train --resume RUN``, bitwise identically on CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adabatch.train.checkpoint import (
    CheckpointError,
    capture_rng,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    write_atomic,
)
from adabatch.train.config import RESUME_MUTABLE, ConfigError, TrainConfig, replace, validate
from adabatch.train.distributed import (
    Dist,
    StepReducer,
    average_gradients,
    check_world_size,
    init_from_env,
    restart_count,
    wrap_ddp,
)
from adabatch.train.logging import MetricsWriter, Progress

__all__ = ["Run", "TrainResult", "build", "evaluate", "lr_multiplier", "train"]


@dataclass
class TrainResult:
    """What :func:`train` returns: the summary (as in ``summary.json``) and the run dir."""

    run_dir: Path
    summary: dict[str, Any]
    interrupted: int | None = None  # the signal number when stopped by SIGINT/SIGTERM
    rank: int = 0  # this process's rank (only rank 0 writes files and prints)


@dataclass
class Run:
    """Everything the loop works with (built by :func:`build`)."""

    cfg: TrainConfig
    run_dir: Path
    device: torch.device
    data: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    controller: Any
    sampler: Any
    estimator: Any
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    augment_gen: torch.Generator
    budget_kind: str
    budget: int
    base_lrs: list[float]
    step: int = 0
    samples: int = 0
    elapsed: float = 0.0
    metrics_offset: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    dist: Dist = field(default_factory=Dist)
    forward: nn.Module | None = None  # the module the training forward runs (DDP wrapper)
    reducer: StepReducer | None = None  # the per-step small all-reduce (distributed runs)


# ----------------------------------------------------------------------------- helpers


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: MPS is not available on this machine")
    return device


def _default_run_dir(cfg: TrainConfig) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    policy = cfg.batch_test if cfg.batch_test != "none" else (cfg.batch_schedule or "constant")
    base = Path("runs") / f"{stamp}-{cfg.dataset}-{cfg.optimizer}-{policy}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_multiplier(cfg: TrainConfig, samples: int, step: int, budget_kind: str,
                  budget: int) -> float:
    """Warmup (linear, in samples) times cosine decay (in samples, or steps for a step
    budget) down to ``min_lr_ratio``. ``samples``/``step``: seen before the step."""
    factor = 1.0
    if cfg.warmup_samples > 0:
        factor = min(1.0, (samples + 1) / cfg.warmup_samples)
    if cfg.lr_schedule == "cosine":
        if budget_kind == "steps":
            progress = step / max(1, budget)
        else:
            span = max(1, budget - cfg.warmup_samples)
            progress = max(0, samples - cfg.warmup_samples) / span
        progress = min(1.0, progress)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        factor *= cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine
    return factor


def _make_loss(task: str) -> Callable[[Tensor, Tensor], Tensor]:
    if task == "regression":
        def mse(out: Tensor, y: Tensor) -> Tensor:
            return F.mse_loss(out.reshape(y.shape).float(), y.float())
        return mse
    def cross_entropy(out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out.float(), y)
    return cross_entropy


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, task: str, *, batch: int = 1024,
             autocast: contextlib.AbstractContextManager | None = None,
             dist: Dist | None = None) -> tuple[float, float | None]:
    """Mean test loss and accuracy (None for regression) over ``x, y``.

    With ``dist`` (several ranks) each rank evaluates a contiguous shard of ``x, y`` and the
    sums of losses, correct predictions and samples are all-reduced (one small all-reduce).
    """
    was_training = model.training
    model.eval()
    total_loss, correct, n = 0.0, 0, len(x)
    lo, hi = 0, n
    if dist is not None and dist.enabled:
        lo, hi = n * dist.rank // dist.world_size, n * (dist.rank + 1) // dist.world_size
    try:
        for start in range(lo, hi, batch):
            xb, yb = x[start:min(hi, start + batch)], y[start:min(hi, start + batch)]
            with autocast if autocast is not None else contextlib.nullcontext():
                out = model(xb)
            if task == "regression":
                total_loss += float(F.mse_loss(out.reshape(yb.shape).float(), yb.float(),
                                               reduction="sum"))
            else:
                total_loss += float(F.cross_entropy(out.float(), yb, reduction="sum"))
                correct += int((out.argmax(dim=-1) == yb).sum())
    finally:
        model.train(was_training)
    if dist is not None and dist.enabled:
        import torch.distributed as tdist

        sums = torch.tensor([total_loss, float(correct)], dtype=torch.float64,
                            device=x.device if x.device.type == "cuda" else "cpu")
        tdist.all_reduce(sums)
        total_loss, correct = float(sums[0]), round(float(sums[1]))
    return total_loss / max(1, n), (None if task == "regression" else correct / max(1, n))


# ----------------------------------------------------------------------------- building


def _make_policy(cfg: TrainConfig, optimizer: torch.optim.Optimizer, micro: int,
                 budget_kind: str, budget: int) -> Any:
    from adabatch import batching

    lr_scaling = None if cfg.lr_scaling == "none" else cfg.lr_scaling
    common = {"granularity": micro, "lr_scaling": lr_scaling,
              "optimizer": optimizer if lr_scaling is not None else None}
    if cfg.batch_test != "none":
        test = {
            "norm": lambda: batching.NormTest(cfg.eta),
            "ip": lambda: batching.InnerProductTest(cfg.theta),
            "aip": lambda: batching.AugmentedInnerProductTest(cfg.theta, cfg.nu),
            "coord": lambda: batching.CoordinateNormTest(cfg.eta, reduce=cfg.coord_reduce,
                                                         q=cfg.coord_q),
        }[cfg.batch_test]()
        return batching.BatchSizeController(test, cfg.initial_batch, cfg.max_batch,
                                            interval=cfg.test_interval, **common)
    schedule = cfg.batch_schedule or "constant"
    if schedule == "constant":
        return batching.ConstantSchedule(cfg.initial_batch)
    if schedule == "linear":
        increment = cfg.ramp_increment or max(micro, (cfg.max_batch - cfg.initial_batch) // 10)
        return batching.LinearSchedule(cfg.initial_batch, cfg.max_batch, increment,
                                       interval=cfg.test_interval, **common)
    # stagewise: geometric stages from initial to max; default: equal shares of the budget
    # (in samples; for a step budget, as if every step ran at the initial batch size)
    n_stages = 1
    b = cfg.initial_batch
    while b < cfg.max_batch:
        b = min(cfg.max_batch, max(b + micro, math.ceil(b * cfg.stage_factor)))
        n_stages += 1
    total = budget if budget_kind == "samples" else budget * cfg.initial_batch
    stage_samples = cfg.stage_samples or max(1, total // n_stages)
    return batching.StagewiseSchedule.geometric(cfg.initial_batch, cfg.max_batch, stage_samples,
                                                factor=cfg.stage_factor, **common)


def _make_estimator(cfg: TrainConfig, model: nn.Module, needs: frozenset[str],
                    reduce: Callable[[Tensor], Tensor] | None = None) -> Any:
    from adabatch import batching

    if cfg.estimator == "per-sample":
        return batching.PerSampleStats(model, needs=needs, reduce=reduce)
    # increments read in gradient hooks: one pass over each gradient per micro-batch instead
    # of three (benchmarks/test_overhead.py, micro vs micro-hooks); enabled on test steps only
    return batching.MicroBatchStats(model, needs=needs, reduce=reduce, track="hooks")


def build(cfg: TrainConfig, run_dir: Path, dist: Dist | None = None) -> Run:
    """Load the data, build model, optimizer, batch policy, sampler and estimator.

    Every problem with the configuration raises :class:`ConfigError` (one line) before any
    training happens. With ``dist`` (several ranks): the sampler gives this rank its share of
    every global batch, the model is wrapped in DistributedDataParallel (``run.forward``), the
    batch-size granularity is micro-batch × world size and the estimator reduces its partial
    sums across ranks through ``run.reducer``.
    """
    d = dist if dist is not None else Dist()
    from adabatch import batching, optim
    from adabatch.train import data as data_mod
    from adabatch.train import models as models_mod

    validate(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = _resolve_device(cfg.device)
    if d.enabled and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", d.local_rank)  # one GPU per process
    if device.type == "cpu":
        from adabatch.allocator import keep_freed_memory

        # without it a CPU step re-faults the pages of every large tensor it allocates,
        # which costs more than the per-sample statistics themselves (see allocator.py)
        keep_freed_memory()
    if cfg.optimizer not in optim.list_optimizers():
        raise ConfigError(f"unknown optimizer {cfg.optimizer!r}; choose from "
                          f"{', '.join(optim.list_optimizers())}")
    try:
        data = data_mod.load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed,
                                     **cfg.data_options)
    except (ValueError, OSError, TypeError) as e:
        raise ConfigError(_one_line(e)) from None

    _seed_everything(cfg.seed)
    try:
        model = models_mod.create_model(cfg.model, data.input_shape, data.num_classes,
                                        norm=cfg.norm, **cfg.model_options)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model {cfg.model!r}: {_one_line(e)}") from None
    model.to(device)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_bn and cfg.batch_test != "none" and cfg.estimator == "per-sample":
        raise ConfigError(
            f"--estimator per-sample cannot measure model {cfg.model!r} with BatchNorm "
            "(it mixes the samples of a batch); use --estimator micro-batch or --norm group"
        )

    hparams = cfg.optimizer_hparams()
    spec = optim.get_spec(cfg.optimizer)
    known = set(spec.hyperparameters)
    unknown = sorted(k for k in hparams if known and k not in known)
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise ConfigError(f"optimizer {cfg.optimizer!r} does not take {flags} (it takes: "
                          f"{', '.join(sorted(known))})")
    try:
        optimizer = optim.create(cfg.optimizer, model.parameters(), **hparams)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"optimizer {cfg.optimizer!r}: {_one_line(e)}") from None

    n_train = len(data.x_train)
    budget_kind, amount = cfg.budget()
    if budget_kind == "epochs":
        budget_kind, budget = "samples", max(1, math.ceil(amount * n_train))
    else:
        budget = int(amount)
    micro = cfg.effective_micro_batch() or 1  # None: whole batches, any size
    granularity = cfg.batch_granularity or micro * d.world_size
    if d.enabled:
        preflight(replace(cfg, resume=None), d.world_size)
    try:
        controller = _make_policy(cfg, optimizer, granularity, budget_kind, budget)
        sampler = batching.AdaptiveBatchSampler(n_train, micro, seed=cfg.seed, rank=d.rank,
                                                world_size=d.world_size)
    except (ValueError, TypeError) as e:
        raise ConfigError(_one_line(e)) from None
    reducer = None
    if d.enabled or _debug_step("ADABATCH_DEBUG_NAN_AT_STEP") is not None:
        reducer = StepReducer(d, device if device.type == "cuda" else torch.device("cpu"))
    estimator = None
    if controller.needs:
        try:
            estimator = _make_estimator(cfg, model, controller.needs, reducer)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"--estimator {cfg.estimator}: {_one_line(e)}") from None

    data.x_train, data.y_train = data.x_train.to(device), data.y_train.to(device)
    data.x_test, data.y_test = data.x_test.to(device), data.y_test.to(device)
    # rank 0 augments as a single process would; the other ranks draw their own crops
    augment_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1 + 7919 * d.rank)
    return Run(cfg=cfg, run_dir=run_dir, device=device, data=data, model=model,
               optimizer=optimizer, controller=controller, sampler=sampler,
               estimator=estimator, loss_fn=_make_loss(data.task), augment_gen=augment_gen,
               budget_kind=budget_kind, budget=budget,
               base_lrs=[float(g["lr"]) for g in optimizer.param_groups],
               extra={"world_size": d.world_size}, dist=d,
               forward=wrap_ddp(model, d, device), reducer=reducer)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


# ----------------------------------------------------------------------------- checkpoints


def _checkpoint_state(run: Run, rng_ranks: list[Any] | None = None) -> dict[str, Any]:
    state = {
        "adabatch_version": _version(),
        "config": run.cfg.to_dict(),
        "step": run.step,
        "samples": run.samples,
        "elapsed": run.elapsed,
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "controller": run.controller.state_dict(),
        "sampler": run.sampler.state_dict(),
        "rng": capture_rng(run.augment_gen),
        "metrics_offset": run.metrics_offset,
        "extra": run.extra,
    }
    if rng_ranks is not None:  # every rank's RNG states (augmentation), rank order
        state["rng_ranks"] = rng_ranks
    return state


def _version() -> str:
    from adabatch import __version__

    return __version__


def check_compatible(saved: dict[str, Any], cfg: TrainConfig, where: Path) -> None:
    """Raise CheckpointError when ``cfg`` differs from the checkpoint's config in a key that
    changes the run (anything but budget, logging, device and the like)."""
    current = cfg.to_dict()
    for key in sorted(current):
        if key in RESUME_MUTABLE or key not in saved:
            continue
        if saved[key] != current[key]:
            raise CheckpointError(
                f"checkpoint {where} is incompatible: it was written with "
                f"{key}={saved[key]!r}, this run has {key}={current[key]!r}"
            )
    missing = sorted(set(saved) - set(current))
    if missing:
        raise CheckpointError(f"checkpoint {where} has unknown config keys {missing}")


def _restore(run: Run, state: dict[str, Any], path: Path) -> None:
    check_compatible(state["config"], run.cfg, path)
    d = run.dist
    saved_world = (state.get("extra") or {}).get("world_size", 1)
    try:
        check_world_size(int(state["controller"]["batch_size"]),
                         run.cfg.effective_micro_batch() or 1, d.world_size, saved_world, path)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    except (KeyError, TypeError):
        pass  # a malformed controller state is reported by load_state_dict below
    try:
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
        run.controller.load_state_dict(state["controller"])
        run.sampler.load_state_dict(state["sampler"])
    except (ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"cannot restore {path}: {_one_line(e)}") from None
    ranks = state.get("rng_ranks")
    if ranks is not None and len(ranks) == d.world_size:
        restore_rng(ranks[d.rank], run.augment_gen)
    else:  # another world size: rank 0 continues rank 0's stream, the others reseed
        restore_rng(state["rng"], run.augment_gen if d.rank == 0 else None)
        if d.rank != 0:
            run.augment_gen.manual_seed(run.cfg.seed + 1 + 7919 * d.rank + 104729 * state["step"])
    run.step, run.samples, run.elapsed = state["step"], state["samples"], state["elapsed"]
    run.metrics_offset = state["metrics_offset"]
    run.extra = {**dict(state.get("extra") or {}), "world_size": d.world_size}


# ----------------------------------------------------------------------------- debug hooks


def _debug_step(name: str) -> int | None:
    """Test hooks (ADABATCH_DEBUG_KILL_AT_STEP / ADABATCH_DEBUG_PAUSE_AT_STEP): the resume
    tests use them to kill or signal a subprocess at a known step."""
    value = os.environ.get(name)
    return int(value) if value else None


class _StopFlag:
    """SIGINT/SIGTERM set ``signum``; the loop checks it between steps."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ----------------------------------------------------------------------------- the loop


def _run(run: Run, writer: MetricsWriter, progress: Progress, stop: _StopFlag) -> None:
    cfg, model, opt, policy, sampler, est = (run.cfg, run.model, run.optimizer,
                                             run.controller, run.sampler, run.estimator)
    data, loss_fn, device = run.data, run.loss_fn, run.device
    d, reducer = run.dist, run.reducer
    forward = run.forward if run.forward is not None else model
    world = d.world_size
    autocast = _autocast(cfg, device)
    fixed_lr = cfg.lr_schedule == "constant" and cfg.warmup_samples == 0 \
        and cfg.lr_scaling == "none"
    kill_at, pause_at = _debug_step("ADABATCH_DEBUG_KILL_AT_STEP"), _debug_step(
        "ADABATCH_DEBUG_PAUSE_AT_STEP")
    kill_rank = _debug_step("ADABATCH_DEBUG_KILL_RANK")
    if kill_rank is not None and (kill_rank != d.rank or restart_count() > 0):
        kill_at = None  # kill one rank, on the first attempt only
    nan_at = _debug_step("ADABATCH_DEBUG_NAN_AT_STEP")  # NaN statistics on the last rank
    if d.rank != world - 1:
        nan_at = None
    whole = cfg.effective_micro_batch() is None
    per_sample = cfg.estimator == "per-sample"
    move = device.type != "cpu"  # the sampler's indices live on the CPU
    params = [p for p in model.parameters() if p.requires_grad]
    x_train, y_train, augment = data.x_train, data.y_train, data.augment
    by_steps = run.budget_kind == "steps"
    nothing = contextlib.nullcontext()
    # zero_grad(set_to_none=True) is `p.grad = None` for every parameter of the optimizer;
    # done here directly (torch's adds a profiler range), unless the optimizer overrides it
    plain_zero_grad = type(opt).zero_grad is torch.optim.Optimizer.zero_grad
    opt_params = [p for group in opt.param_groups for p in group["params"]]
    t0 = time.perf_counter() - run.elapsed
    model.train()
    while not _done(run):
        B = policy.batch_size
        B_local = B // world  # this rank's share; DDP averages the ranks' gradients
        measure = est is not None and policy.wants_stats()
        if est is not None and not per_sample:
            est.enabled = measure  # MicroBatchStats(track="hooks") measures test steps only
        lr_mult = 1.0 if fixed_lr else lr_multiplier(cfg, run.samples, run.step,
                                                      run.budget_kind, run.budget)
        if not fixed_lr:
            for group, base in zip(opt.param_groups, run.base_lrs):
                group["lr"] = base * lr_mult * policy.lr_factor
        if plain_zero_grad:
            for p in opt_params:
                p.grad = None
        else:
            opt.zero_grad(set_to_none=True)
        loss_sum = None
        batches = _micro_batches(sampler, B, whole=whole)
        # micro-batch statistics need each rank's local gradients: sync once, by hand
        manual_sync = d.enabled and measure and not per_sample
        last = len(batches) - 1
        for k, idx in enumerate(batches):
            if move:
                idx = idx.to(device, non_blocking=True)
            x, y = x_train.index_select(0, idx), y_train.index_select(0, idx)  # = x_train[idx]
            if augment is not None:
                x = augment(x, run.augment_gen)
            no_sync = d.enabled and (k < last or manual_sync)
            with forward.no_sync() if no_sync else nothing:  # type: ignore
                with est.measure() if measure and per_sample else nothing:
                    with autocast:
                        loss = loss_fn(forward(x), y)
                    if len(idx) != B_local:
                        loss = loss * (len(idx) / B_local)  # micro-batch losses sum to the mean
                    loss.backward()
            if measure and not per_sample:
                est.accumulate(len(idx))  # MicroBatchStats: one draw per micro-batch
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        if manual_sync:
            average_gradients(params, d)
        if reducer is not None:
            # one small all-reduce: [statistics partial sums (test steps), loss, stop flag]
            reducer.attach(loss_sum, stop.signum is not None)
            if nan_at is not None and run.step + 1 == nan_at:
                reducer.debug_nan = 1 if per_sample else 2  # keep the sample counts
            stats = est.stats() if measure else None
            loss_value, stop_any = reducer.finish()
            if stop_any and stop.signum is None:
                stop.signum = signal.SIGTERM  # another rank was signalled: stop together
        else:
            stats = est.stats() if measure else None
            loss_value, stop_any = float(loss_sum), False
        lr = float(opt.param_groups[0]["lr"])
        if not math.isfinite(loss_value):  # stop before the step spoils the model
            raise FloatingPointError(f"the loss is {loss_value} at step {run.step + 1}; "
                                     "try a smaller --lr")
        if kill_at is not None and run.step + 1 == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        opt.step()
        policy.update(stats)
        run.step += 1
        run.samples += B
        run.elapsed = time.perf_counter() - t0
        history = policy.history
        test = history[-1] if history and history[-1]["step"] == run.step - 1 else None
        writer.write_step(run.step, run.samples, B, loss_value, lr, run.elapsed, test)
        if not cfg.quiet:
            progress.update(run.step if by_steps else run.samples,
                            {"step": run.step, "B": B, "loss": f"{loss_value:.4f}"})
        if cfg.eval_every and run.step % cfg.eval_every == 0 and not _done(run):
            _eval(run, writer, progress)
        if pause_at is not None and run.step == pause_at:
            print(f"paused at step {run.step}", flush=True)
            while stop.signum is None:
                time.sleep(0.01)
        if stop.signum is not None and (reducer is None or not d.enabled or stop_any):
            _checkpoint(run, writer)
            return
        if cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0:
            _checkpoint(run, writer)


def _micro_batches(sampler: Any, batch_size: int, *, whole: bool) -> list[Tensor]:
    """The step's index tensors on this rank: micro-batches, or this rank's whole share when
    there is no micro-batch size (the sampler then has micro-batch 1: granularity = world
    size, and rank r takes every world-th index of the global batch)."""
    if not whole:
        return sampler.take(batch_size)
    idx = sampler.global_batch(batch_size)
    sampler.advance(batch_size)
    if sampler.world_size > 1:
        idx = idx.view(-1, sampler.world_size)[:, sampler.rank]
    return [idx]


def _done(run: Run) -> bool:
    if run.budget_kind == "steps":
        return run.step >= run.budget
    return run.samples >= run.budget


def _autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    if cfg.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _eval(run: Run, writer: MetricsWriter, progress: Progress) -> dict[str, Any]:
    autocast = _autocast(run.cfg, run.device)
    loss, acc = evaluate(run.model, run.data.x_test, run.data.y_test, run.data.task,
                         batch=run.cfg.eval_batch, autocast=autocast, dist=run.dist)
    row = {"eval": True, "step": run.step, "samples": run.samples, "test_loss": loss,
           "test_accuracy": acc, "time": run.elapsed}
    writer.write(row)
    writer.flush()
    acc_text = f" test_accuracy={acc:.4f}" if acc is not None else ""
    progress.write(f"eval step={run.step} samples={run.samples} test_loss={loss:.4f}"
                   f"{acc_text} batch_size={run.controller.batch_size}")
    return row


def _checkpoint(run: Run, writer: MetricsWriter) -> Path | None:
    """Rank 0 writes the checkpoint (atomically); with several ranks every rank's RNG states
    travel to it first (one all_gather of small objects)."""
    d = run.dist
    rng_ranks = d.gather_objects(capture_rng(run.augment_gen)) if d.enabled else None
    if not d.is_main:
        return None
    run.metrics_offset = writer.flush()
    return save_checkpoint(run.run_dir, _checkpoint_state(run, rng_ranks),
                           keep=run.cfg.keep_checkpoints)


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
    if cfg.resume is not None:
        return Path(cfg.resume)
    run_dir = Path(cfg.out) if cfg.out is not None else _default_run_dir(cfg)
    if (run_dir / "metrics.jsonl").exists() or latest_checkpoint(run_dir) is not None:
        raise ConfigError(f"{run_dir} already holds a run; continue it with --resume "
                          f"{run_dir} or choose another --out")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} exists and is not a directory")
    return run_dir


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
        path = latest_checkpoint(cfg.resume)
        if path is not None:
            state = load_checkpoint(path)
            check_compatible(state["config"], cfg, path)
            try:
                check_world_size(int(state["controller"]["batch_size"]), micro, world_size,
                                 (state.get("extra") or {}).get("world_size", 1), path)
            except ValueError as e:
                raise CheckpointError(str(e)) from None


def _auto_resume(cfg: TrainConfig) -> TrainConfig:
    """Restarted by torchrun (``TORCHELASTIC_RESTART_COUNT > 0``) into an ``--out`` that holds
    the run of the previous attempt: continue it from its newest checkpoint."""
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
    error: tuple[str, str] | None = None
    if d.is_main:
        try:
            result = fn()
        except (ConfigError, CheckpointError) as e:
            error = (type(e).__name__, str(e))
    result, error = d.broadcast_object((result, error))
    if error is not None:
        raise (ConfigError if error[0] == "ConfigError" else CheckpointError)(error[1])
    return result


def train(cfg: TrainConfig, *, say: Callable[[str], None] | None = None) -> TrainResult:
    """Run (or resume, with ``cfg.resume``) a training run; return its summary.

    Raises :class:`ConfigError` / :class:`~adabatch.train.checkpoint.CheckpointError` for bad
    configurations and checkpoints, before any training step.

    Under torchrun (``WORLD_SIZE > 1`` in the environment) it joins the process group (gloo on
    CPU, NCCL on CUDA) and trains data-parallel: see :mod:`adabatch.train.distributed`. Only
    rank 0 prints and writes files; every rank loads the checkpoint on resume.
    """
    validate(cfg)
    d = init_from_env(_resolve_device(cfg.device).type)
    try:
        return _train(cfg, d, say)
    finally:
        d.close()


def _train(cfg: TrainConfig, d: Dist, say: Callable[[str], None] | None) -> TrainResult:
    restarted = restart_count() > 0
    cfg = _auto_resume(cfg)
    quiet = cfg.quiet or not d.is_main
    say = say if say is not None and d.is_main else (
        lambda line: None if quiet else print(line, flush=True))
    run_dir = _rank0_first(d, lambda: _prepare_run_dir(cfg))

    def find_checkpoint() -> Path | None:
        if cfg.resume is None:
            return None
        path = latest_checkpoint(run_dir)
        if path is not None:  # readable and compatible, checked once before all ranks load
            check_compatible(load_checkpoint(path)["config"], cfg, path)
        return path

    ckpt_path = _rank0_first(d, find_checkpoint)
    ckpt_state = load_checkpoint(ckpt_path) if ckpt_path is not None else None
    if cfg.tensorboard and d.is_main:
        try:
            import torch.utils.tensorboard  # noqa: F401
        except (ModuleNotFoundError, ImportError):
            raise ConfigError("--tensorboard needs the tensorboard package "
                              "(pip install tensorboard)") from None
    run = build(cfg, run_dir, d)
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    if ckpt_state is not None:
        _restore(run, ckpt_state, ckpt_path)
        why = f"restarted by torchrun (restart {restart_count()}); " if restarted else ""
        say(f"{why}resuming {run_dir} from {ckpt_path.name} (step {run.step}, "
            f"{run.samples} samples)")
    elif cfg.resume is not None:
        say(f"no checkpoint in {run_dir}; starting it from the beginning")
    writer: Any = _NullWriter()
    if d.is_main:
        cfg.save(run_dir / "config.json")
        writer = MetricsWriter(
            run_dir / "metrics.jsonl",
            truncate_at=run.metrics_offset if ckpt_state is not None else None,
            tensorboard_dir=run_dir / "tensorboard" if cfg.tensorboard else None)
    unit = "step" if run.budget_kind == "steps" else "sample"
    progress = Progress(run.budget, unit, quiet=quiet,
                        start=run.step if unit == "step" else run.samples)
    initial_batch = cfg.initial_batch
    procs = f" x {d.world_size} processes" if d.enabled else ""
    say(f"training {cfg.model} on {cfg.dataset} ({len(run.data.x_train)} samples) with "
        f"{cfg.optimizer} + batch policy "
        f"{cfg.batch_test if cfg.batch_test != 'none' else cfg.batch_schedule or 'constant'}"
        f" on {run.device}{procs}; budget {run.budget} {unit}s; run dir {run_dir}")
    try:
        with _StopFlag() as stop:
            _run(run, writer, progress, stop)
        progress.close()
        if stop.signum is not None:
            name = signal.Signals(stop.signum).name
            say(f"stopped by {name} at step {run.step}; checkpoint written; continue with "
                f"`adabatch train --resume {run_dir}`")
            d.barrier()
            return TrainResult(run_dir, {"step": run.step, "samples": run.samples},
                               interrupted=stop.signum, rank=d.rank)
        final = _eval(run, writer, progress)
        _checkpoint(run, writer)
    finally:
        progress.close()
        writer.close()
    _debug_write_decisions(run)
    summary = {
        "test_accuracy": final["test_accuracy"],
        "test_loss": final["test_loss"],
        "steps": run.step,
        "samples": run.samples,
        "epochs": run.samples / len(run.data.x_train),
        "initial_batch_size": initial_batch,
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
    if d.is_main:
        write_atomic(run.model.state_dict(), run_dir / "final.pt")
        tmp = run_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, run_dir / "summary.json")
    d.barrier()  # every rank returns once the outputs exist
    return TrainResult(run_dir, summary, rank=d.rank)


def _debug_write_decisions(run: Run) -> None:
    """ADABATCH_DEBUG_DECISIONS=DIR: every rank writes its batch-size decisions to
    DIR/rank<r>.json (the tests check that the ranks agree)."""
    out = os.environ.get("ADABATCH_DEBUG_DECISIONS")
    if not out:
        return
    policy = run.controller
    record = {"rank": run.dist.rank, "world_size": run.dist.world_size,
              "history": policy.history, "final_batch_size": policy.batch_size,
              "warnings": getattr(policy, "warnings", 0), "step": run.step}
    Path(out).mkdir(parents=True, exist_ok=True)
    Path(out, f"rank{run.dist.rank}.json").write_text(json.dumps(record, default=str) + "\n")
