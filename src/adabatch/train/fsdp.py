"""Sharded data parallelism for the trainer: ``adabatch train --parallel fsdp`` (FSDP2,
``torch.distributed.fsdp.fully_shard``). docs/fsdp.md is the user's page.

**What is sharded.** Every parameter is split on its first dimension across the R ranks
(a DTensor holding this rank's shard), and so are its gradient (FSDP2 reduce-scatters the
gradients: each rank receives the mean over ranks of its shard only) and the optimizer state
(built on the sharded parameters, so Adam's moments are shards too). A unit's full
parameters exist only while it runs: they are all-gathered before its forward and again
before its backward, and freed after.

**Which modules are units** (:func:`shard_units`): each transformer block when the model has
an attribute ``blocks`` that is an ``nn.ModuleList`` (the ``charlm`` model, and the usual
layout of language models); otherwise each direct child that holds parameters. A candidate
that shares a parameter with the rest of the model (tied input and output embeddings) is not
a unit of its own: its parameters stay in the root unit, which is sharded last and holds
every parameter that no unit took.

**The step.** Each micro-batch's backward reduce-scatters its gradient into the sharded
p.grad, which accumulates over the micro-batches (FSDP2's default; the alternative,
``set_requires_gradient_sync(False)`` until the last micro-batch, gives the same statistics
but keeps an unsharded gradient of the whole model between micro-batches, which is what
sharding is for avoiding). Both estimators measure on the unsharded parameters, before the
reduce-scatter: the micro-batch estimator (``track="hooks"``) each rank's micro-batch
gradients, the per-sample estimator each rank's per-sample gradients; their partial sums
travel in one small all-reduce, per-coordinate sums are reduce-scattered
(:mod:`adabatch.batching._microbatch` and :mod:`adabatch.batching._sharded`; docs/fsdp.md
counts the bytes). The batch-size decisions are those of DDP and of one process on the same
global batch. The loss scaling is DDP's: each rank scales its micro-batch losses by
``n_k / (B / R)`` and FSDP2 averages over the ranks.

**Mixed precision.** ``--precision bf16`` becomes FSDP2's ``MixedPrecisionPolicy``: the
units compute in bfloat16 (parameters all-gathered in bfloat16), gradients are
reduce-scattered and accumulated in float32, the sharded parameters and the optimizer stay
float32, and the root's output is cast to float32 (the loss is computed in float32, as
autocast computes it). No autocast is used. On CPU gloo all-gathers bfloat16 (checked by
tests/distributed/test_fsdp_train.py); on CUDA the device must support bfloat16.

**Evaluation.** Every forward of an FSDP2 model all-gathers, so every rank must run the same
number of forward passes: ranks whose shard of the test set needs fewer batches run dummy
one-sample passes whose outputs are discarded (:func:`eval_padding`).

**Refused** (:func:`fsdp_problem`, one line, exit code 2): the coordinate test's quantile
(it would gather every coordinate's variance), ``--compile``, a device other than CPU or
CUDA, the optimizers whose step is not written for DTensor parameters
(:data:`FSDP_OPTIMIZERS` lists those that are) and AdaBelief's fused kernels (its foreach
path runs instead: :data:`FSDP_OPTIMIZER_DEFAULTS`). What an estimator cannot measure under
FSDP2 it refuses when it is built (one line naming the layer; docs/fsdp.md, Limits).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["FSDP_OPTIMIZERS", "FSDP_OPTIMIZER_DEFAULTS", "eval_padding", "fsdp_problem",
           "full_model_state", "is_sharded", "shard_model", "shard_units"]

#: Optimizers whose step runs on DTensor (sharded) parameters and equals the unsharded step
#: (torch.optim's; AdaGrad-Norm, whose norm sums the ranks' shards; AdaBelief's foreach and
#: for-loop paths, elementwise; checked against one process by
#: tests/distributed/test_fsdp_train.py).
FSDP_OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "adagrad", "adagradnorm", "adabelief")

#: Hyperparameters an optimizer gets under FSDP2 unless given: AdaBelief's fused kernels
#: (CPU and CUDA) take plain tensors, so its foreach path runs instead (the same step; its
#: default picks foreach for plain tensors only).
FSDP_OPTIMIZER_DEFAULTS: dict[str, dict[str, Any]] = {"adabelief": {"fused": False,
                                                                    "foreach": True}}


def fsdp_problem(cfg: Any) -> str | None:
    """What ``--parallel fsdp`` cannot run in ``cfg`` (None: nothing)."""
    if cfg.optimizer not in FSDP_OPTIMIZERS:
        return (f"optimizer {cfg.optimizer!r} does not step sharded (DTensor) parameters "
                f"yet; choose one of {', '.join(FSDP_OPTIMIZERS)}")
    if cfg.optimizer == "adabelief" and cfg.optimizer_options.get("fused"):
        return ("AdaBelief's fused kernels take plain tensors, not DTensor shards; leave "
                "--opt-option fused=true out (its foreach path runs, the same step)")
    if cfg.batch_test == "coord" and cfg.coord_reduce == "quantile":
        return ("--coord-reduce quantile would gather every coordinate's variance; use max "
                "or mean (reduced over the ranks without gathering)")
    if cfg.compile:
        return "--compile is not supported with FSDP2 here; leave --compile out"
    if cfg.device not in ("auto", "cpu", "cuda") and not cfg.device.startswith("cuda:"):
        return f"--device {cfg.device}: FSDP2 runs on cpu (gloo) or cuda (NCCL)"
    return None


def shard_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs that become FSDP units before the root (see the module
    docstring): the entries of ``model.blocks`` (an ``nn.ModuleList``), else the direct
    children with parameters; one that shares a parameter with the rest of the model is
    left to the root."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleList):
        prefix = next(n for n, m in model.named_modules() if m is blocks)
        candidates = [(f"{prefix}.{i}", m) for i, m in enumerate(blocks)]
    else:
        candidates = list(model.named_children())
    owners: dict[int, set[str]] = {}  # parameter -> every path of a module that holds it
    for path, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(path)
    units = []
    for name, module in candidates:
        params = list(module.parameters())
        if not params:
            continue
        inside = name + "."
        if all(path == name or path.startswith(inside)
               for p in params for path in owners[id(p)]):
            units.append((name, module))
    return units


def _policy(precision: str, device: torch.device, *, root: bool) -> Any:
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision != "bf16":
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                output_dtype=torch.float32 if root else None)


def shard_model(model: nn.Module, device: torch.device, precision: str) -> list[str]:
    """``fully_shard`` every unit of :func:`shard_units`, then the root, over all the ranks
    of the default process group (one rank: a 1-rank mesh). Returns the units' names.
    Raises ValueError when the device cannot run the requested precision."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--precision bf16: {device} does not support bfloat16; use "
                         f"--precision 32")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    units = shard_units(model)
    for _, module in units:
        fully_shard(module, mesh=mesh, mp_policy=_policy(precision, device, root=False))
    fully_shard(model, mesh=mesh, mp_policy=_policy(precision, device, root=True))
    return [name for name, _ in units]


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` was sharded by :func:`shard_model` (its parameters are DTensors)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_model_state(model: nn.Module) -> dict[str, Any]:
    """The model's full state dict on rank 0 (CPU tensors; the other ranks get an empty
    dict). A collective under FSDP2: every rank must call it. A model that is not sharded
    gives its plain ``state_dict()``."""
    if not is_sharded(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def eval_padding(n: int, batch: int, rank: int, world_size: int) -> int:
    """How many dummy forward passes rank ``rank`` adds so that every rank runs as many as
    the rank with the most batches (each rank evaluates ``n * r // R .. n * (r + 1) // R``
    in batches of ``batch``)."""
    def passes(r: int) -> int:
        size = n * (r + 1) // world_size - n * r // world_size
        return -(-size // batch)
    return max(passes(r) for r in range(world_size)) - passes(rank)
