"""Building a run: one TrainConfig in, a :class:`Run` (data, model, optimizer, batch policy,
sampler, estimator) out. Every problem with the configuration raises
:class:`~adabatch.train.config.ConfigError` (one line) before any training happens."""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from adabatch.train.config import ConfigError, TrainConfig, replace, validate
from adabatch.train.distributed import Dist, StepReducer, wrap_ddp
from adabatch.train.divergence import DivergenceMonitor

__all__ = ["Run", "build", "resolve_device"]


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
    estimator: Any  # an adabatch.batching.Estimator; None when the policy needs no statistics
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
    stop: Any = None  # while the loop runs: its SIGINT/SIGTERM flag (``stop.signum``)
    divergence: DivergenceMonitor = field(default_factory=DivergenceMonitor)


def resolve_device(name: str) -> torch.device:
    """``--device`` as a torch.device (``auto``: CUDA when available); ConfigError when the
    machine lacks it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: MPS is not available on this machine")
    return device


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _setup_device(cfg: TrainConfig, d: Dist) -> torch.device:
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    if d.enabled and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", d.local_rank)  # one GPU per process
    if device.type == "cpu":
        from adabatch.allocator import keep_freed_memory

        # without it a CPU step re-faults the pages of every large tensor it allocates,
        # which costs more than the per-sample statistics themselves (see allocator.py)
        keep_freed_memory()
    return device


def _make_model(cfg: TrainConfig, data: Any, device: torch.device) -> nn.Module:
    from adabatch.train import models as models_mod

    _seed_everything(cfg.seed)
    try:
        model = models_mod.create_model(cfg.model, data.input_shape, data.num_classes,
                                        norm=cfg.norm, **cfg.model_options)
    except (ValueError, TypeError) as e:
        named = ":" in cfg.model  # the factory's errors name it
        raise ConfigError(one_line(e) if named else f"model {cfg.model!r}: {one_line(e)}"
                          ) from None
    if cfg.parallel != "fsdp":  # fully_shard moves each unit's shards to the device
        model.to(device)
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_bn and cfg.batch_test != "none" and cfg.estimator == "per-sample":
        raise ConfigError(
            f"--estimator per-sample cannot measure model {cfg.model!r} with BatchNorm "
            "(it mixes the samples of a batch); use --estimator micro-batch or --norm group"
        )
    return model


def _shard(cfg: TrainConfig, model: nn.Module, device: torch.device) -> None:
    """--parallel fsdp: FSDP2 units and root (train/fsdp.py), before the optimizer is built
    on the sharded parameters."""
    if cfg.parallel != "fsdp":
        return
    from adabatch.train.fsdp import shard_model

    try:
        shard_model(model, device, cfg.precision)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"--parallel fsdp: {one_line(e)}") from None


def _make_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    from adabatch import optim

    hparams = cfg.optimizer_hparams()
    if cfg.parallel == "fsdp":  # what steps DTensor shards (train/fsdp.py)
        from adabatch.train.fsdp import FSDP_OPTIMIZER_DEFAULTS

        hparams = {**FSDP_OPTIMIZER_DEFAULTS.get(cfg.optimizer, {}), **hparams}
    spec = optim.get_spec(cfg.optimizer)
    known = set(spec.hyperparameters)
    unknown = sorted(k for k in hparams if known and k not in known)
    if unknown:
        flags = ", ".join("--" + k.replace("_", "-") for k in unknown)
        raise ConfigError(f"optimizer {cfg.optimizer!r} does not take {flags} (it takes: "
                          f"{', '.join(sorted(known))})")
    try:
        return optim.create(cfg.optimizer, model.parameters(), **hparams)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"optimizer {cfg.optimizer!r}: {one_line(e)}") from None


def _budget(cfg: TrainConfig, n_train: int) -> tuple[str, int]:
    """("samples" | "steps", amount): epochs are counted in samples."""
    budget_kind, amount = cfg.budget()
    if budget_kind == "epochs":
        return "samples", max(1, math.ceil(amount * n_train))
    return budget_kind, int(amount)


#: ``--lr-scaling gain``: the gain rule of each optimizer family (batching/policies.py).
_GAIN_RULES = {"sgd": "gain-sgd", "momentum": "gain-sgd", "adam": "gain-ema",
               "adamw": "gain-ema", "adabelief": "gain-ema", "adagrad": "gain-sum",
               "adagradnorm": "gain-sum"}


def _make_policy(cfg: TrainConfig, micro: int, budget_kind: str, budget: int) -> Any:
    from adabatch import batching

    lr_scaling = None if cfg.lr_scaling == "none" else cfg.lr_scaling
    common = {"granularity": micro, "lr_scaling": lr_scaling}
    if cfg.batch_test in ("critical", "goodput"):  # beyond the paper (batching/policies.py)
        if lr_scaling == "gain":
            if cfg.optimizer not in _GAIN_RULES:
                raise ConfigError(f"--lr-scaling gain: no gain rule for optimizer "
                                  f"{cfg.optimizer!r} (rules for {', '.join(_GAIN_RULES)})")
            common["lr_scaling"] = _GAIN_RULES[cfg.optimizer]
        policy = batching.CriticalBatchSize if cfg.batch_test == "critical" else batching.Goodput
        return policy(cfg.initial_batch, cfg.max_batch, kappa=cfg.kappa,
                      interval=cfg.test_interval, **common)
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

    if not needs:
        return None
    try:
        if cfg.estimator == "per-sample":
            return batching.PerSampleStats(model, needs=needs, reduce=reduce)
        # increments read in gradient hooks: one pass over each gradient per micro-batch
        # instead of three (benchmarks/test_overhead.py, micro vs micro-hooks)
        return batching.MicroBatchStats(model, needs=needs, reduce=reduce, track="hooks")
    except (ValueError, TypeError, NotImplementedError) as e:  # NotImplementedError: FSDP2
        raise ConfigError(f"--estimator {cfg.estimator}: {one_line(e)}") from None


def _load_data(cfg: TrainConfig) -> Any:
    from adabatch import optim
    from adabatch.train import data as data_mod

    if cfg.optimizer not in optim.list_optimizers():
        raise ConfigError(f"unknown optimizer {cfg.optimizer!r}; choose from "
                          f"{', '.join(optim.list_optimizers())}")
    try:
        return data_mod.load_dataset(cfg.dataset, cfg.data_dir, seed=cfg.seed,
                                     **cfg.data_options)
    except data_mod.DatasetError:
        raise  # a missing, empty or corrupt data file: exit code 3 (train/errors.py)
    except (ValueError, OSError, TypeError) as e:
        raise ConfigError(one_line(e)) from None


def _make_forward(cfg: TrainConfig, model: nn.Module, d: Dist,
                  device: torch.device) -> nn.Module:
    """The module the training forward runs: the model, in DDP when distributed, compiled
    with ``--compile`` (validate() has refused the combinations that would split the graph
    or recompile as the batch grows; the micro-batches all have one shape)."""
    if cfg.parallel == "fsdp":
        return model  # sharded by fully_shard (validate() refused --compile)
    forward = wrap_ddp(model, d, device)
    if not cfg.compile:
        return forward
    import torch._dynamo

    backends = torch._dynamo.list_backends(exclude_tags=())
    if cfg.compile_backend not in backends:
        raise ConfigError(f"--compile-backend {cfg.compile_backend!r}: not a torch.compile "
                          f"backend; choose from {', '.join(backends)}")
    # the parameters stay the model's: checkpoints, the estimator's hooks and evaluation
    # (uncompiled: its last batch has another shape) use run.model
    return torch.compile(forward, backend=cfg.compile_backend)


def build(cfg: TrainConfig, run_dir: Path, dist: Dist | None = None, *,
          step_reducer: bool = False) -> Run:
    """Load the data, build model, optimizer, batch policy, sampler and estimator.

    Every problem with the configuration raises :class:`ConfigError` (one line) before any
    training happens. With ``dist`` (several ranks): the sampler gives this rank its share of
    every global batch, the model is wrapped in DistributedDataParallel (``run.forward``), the
    batch-size granularity is micro-batch × world size and the estimator reduces its partial
    sums across ranks through ``run.reducer``. ``step_reducer``: a reducer also in one process
    (see :attr:`adabatch.train.callbacks.Callbacks.reduce_statistics`). With ``--parallel
    fsdp`` the model is sharded with FSDP2 instead (:mod:`adabatch.train.fsdp`; also with one
    rank) and ``run.forward`` is the model itself.
    """
    from adabatch import batching

    d = dist if dist is not None else Dist()
    validate(cfg)
    device = _setup_device(cfg, d)
    data = _load_data(cfg)
    model = _make_model(cfg, data, device)
    _shard(cfg, model, device)
    optimizer = _make_optimizer(cfg, model)
    n_train = len(data.x_train)
    if cfg.max_batch > n_train:
        raise ConfigError(f"--max-batch {cfg.max_batch} is larger than the training set "
                          f"({n_train} samples); a step cannot take more samples than there "
                          f"are")
    budget_kind, budget = _budget(cfg, n_train)
    micro = cfg.effective_micro_batch() or 1  # None: whole batches, any size
    granularity = cfg.batch_granularity or micro * d.world_size
    if d.enabled:
        from adabatch.train.loop import preflight

        preflight(replace(cfg, resume=None, from_step=None), d.world_size)
    try:
        controller = _make_policy(cfg, granularity, budget_kind, budget)
        sampler = batching.AdaptiveBatchSampler(n_train, micro, seed=cfg.seed, rank=d.rank,
                                                world_size=d.world_size)
    except (ValueError, TypeError) as e:
        raise ConfigError(one_line(e)) from None
    reducer = None
    if d.enabled or step_reducer or cfg.parallel == "fsdp":  # FSDP2 statistics: reduce=
        reducer = StepReducer(d, device if device.type == "cuda" else torch.device("cpu"))
    estimator = _make_estimator(cfg, model, controller.needs, reducer)
    data.x_train, data.y_train = data.x_train.to(device), data.y_train.to(device)
    data.x_test, data.y_test = data.x_test.to(device), data.y_test.to(device)
    # rank 0 augments as a single process would; the other ranks draw their own crops
    augment_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1 + 7919 * d.rank)
    return Run(cfg=cfg, run_dir=run_dir, device=device, data=data, model=model,
               optimizer=optimizer, controller=controller, sampler=sampler,
               estimator=estimator, loss_fn=data.loss, augment_gen=augment_gen,
               budget_kind=budget_kind, budget=budget,
               base_lrs=[float(g["lr"]) for g in optimizer.param_groups],
               extra={"world_size": d.world_size}, dist=d,
               forward=_make_forward(cfg, model, d, device), reducer=reducer)
