"""Data parallelism for the trainer: torch.distributed + DistributedDataParallel.

``adabatch train`` runs under ``torchrun`` (or any launcher that sets the ``torch.distributed``
environment: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``);
``adabatch train --nproc N`` starts ``torchrun --standalone --nproc-per-node N`` for the user
on one machine (:func:`launch`).

**What is shared.** The global batch of a step is ``world_size × accumulation × micro_batch``
samples: the sampler cuts every global batch into rounds of ``world_size × micro_batch``
indices and rank r takes its slice of each round, so the sequence of global batches depends
only on the seed (and the batch sizes), never on the number of ranks. Each rank scales its
micro-batch losses by ``n_k / (B / world_size)``; DDP averages the gradients, so p.grad is the
mean gradient over the B samples of the step, as in one process.

**Collectives per step.** The DDP gradient all-reduce (accumulation micro-batches run under
``no_sync`` except the last), plus one all-reduce of a small float64 vector (:class:`StepReducer`):
``[statistics partial sums..., loss, stop flag]`` on test steps, ``[loss, stop flag]`` on the
others. The coordinate-wise test adds one model-sized reduction of per-coordinate sums.
With the micro-batch estimator the estimator must see each rank's *local* micro-batch
gradients, so on test steps every backward runs under ``no_sync`` and the gradients are
averaged afterwards with one flat all-reduce (:func:`average_gradients`), the same amount of
traffic as DDP's.

**Agreement.** Every rank computes the batch-size decision from the reduced numbers, which are
identical on all ranks (an all-reduce returns the same result everywhere, and the gradients
the statistics read are the averaged ones). A NaN on one rank becomes a NaN in the sum on
every rank: the test then cannot decide on any rank, and all keep the batch size. The loss
and the SIGINT/SIGTERM stop flag travel in the same vector, so all ranks raise on a
non-finite loss, and stop (with a checkpoint) at the same step.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from adabatch import _dist

__all__ = [
    "Dist",
    "StepReducer",
    "average_gradients",
    "check_world_size",
    "env_world_size",
    "init_from_env",
    "launch",
    "restart_count",
]


@dataclass
class Dist:
    """This process's place in the group (``world_size == 1``: no group, no collectives)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this module created the process group (and destroys it)
    store: Any = None  # the group's key-value store: heartbeats that outlive a broken group
    timeout_s: float = 600.0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def heartbeat(self, step: int) -> None:
        """Record that this rank started ``step`` (one small store write per step)."""
        if self.enabled and self.store is not None:
            self.store.set(f"heartbeat/{self.rank}", str(step))

    def laggards(self, step: int) -> list[int]:
        """The ranks whose last heartbeat is before ``step`` (read from the store, which
        still answers when a collective has timed out)."""
        if not self.enabled or self.store is None:
            return []
        behind = []
        for r in range(self.world_size):
            key = f"heartbeat/{r}"
            try:
                seen = int(self.store.get(key)) if self.store.check([key]) else -1
            except (RuntimeError, ValueError):
                seen = -1
            if seen < step:
                behind.append(r)
        return behind

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when unset)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def restart_count() -> int:
    """How many times torchrun has restarted the worker group (0 outside torchrun)."""
    try:
        return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    except ValueError:
        return 0


def init_from_env(device_type: str, timeout_s: float = 600.0, *,
                  group_of_one: bool = False) -> Dist:
    """Join the process group described by the environment (torchrun's variables).

    gloo on CPU, NCCL on CUDA. Uses an existing group when the caller created one. With
    ``WORLD_SIZE`` unset or 1, nothing is initialised, unless ``group_of_one`` (FSDP2 needs a
    process group even for one process: a 1-rank group on an in-process store).
    ``timeout_s`` bounds every collective: a process that waits longer for the others fails
    with a timeout (``--dist-timeout``).
    """
    if _dist.initialized():
        return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    world = env_world_size()
    if world <= 1 and group_of_one:
        return _group_of_one(device_type, timeout_s)
    if world <= 1:
        return Dist()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        kwargs["device_id"] = torch.device("cuda", local_rank)
    timeout = timedelta(seconds=timeout_s)
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        # our own key prefix per torchrun attempt: after a restart, the store can still hold
        # the previous attempt's addresses (seen with --standalone on torch 2.13)
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                              world, is_master=not agent_store and rank == 0,
                              timeout=timeout, multi_tenant=not agent_store)
        run_id = os.environ.get("TORCHELASTIC_RUN_ID", "none")
        kwargs["store"] = dist.PrefixStore(f"adabatch/{run_id}/attempt_{restart_count()}",
                                           store)
        kwargs.update(rank=rank, world_size=world)
    dist.init_process_group(backend=backend, timeout=timeout, **kwargs)
    return Dist(rank=rank, world_size=world, local_rank=local_rank, owns_group=True,
                store=kwargs.get("store"), timeout_s=timeout_s)


def _group_of_one(device_type: str, timeout_s: float) -> Dist:
    if not dist.is_available():
        raise RuntimeError("--parallel fsdp needs torch.distributed, which this torch build "
                           "lacks")
    backend = "nccl" if device_type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        kwargs["device_id"] = torch.device("cuda", local_rank)
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                            timeout=timedelta(seconds=timeout_s), **kwargs)
    return Dist(owns_group=True, timeout_s=timeout_s)


class PeerTimeout(RuntimeError):
    """A collective timed out: another process stopped answering (``--dist-timeout``)."""


def is_timeout(e: BaseException) -> bool:
    """Whether ``e`` is a collective's timeout (gloo: "Timed out waiting ..."; NCCL: a
    watchdog timeout)."""
    text = str(e)
    return isinstance(e, RuntimeError) and ("Timed out" in text or "timed out" in text
                                            or "Timeout" in text)


class StepReducer:
    """One small all-reduce per step: the estimator's partial sums, the loss, a stop flag.

    Pass the instance as the estimator's ``reduce``. Before the estimator runs, the loop sets
    :meth:`attach` with the step's local loss and stop flag; the first ``reduce`` call of the
    step then all-reduces ``[partial sums..., loss, stop]`` together and keeps the last two
    entries. On steps without statistics, :meth:`finish` reduces ``[loss, stop]`` alone.
    Later calls in the same step (the per-coordinate sums of the coordinate-wise test) are
    plain sum all-reduces. ``debug_nan``: fault injection for the tests (set by a training
    callback, ``tests/_fault_runner.py``); when set to k, the next call replaces this rank's
    partial sums after the first k entries by NaN, as a rank with non-finite gradients would
    send (the decision must stay identical on all ranks). Both estimators send
    ``[N, K, S, s1, s2]`` (:func:`adabatch.batching.stats.stats_from_sums`), so k = 2 keeps
    the sample counts whatever the estimator.
    """

    def __init__(self, d: Dist, device: torch.device) -> None:
        self.dist = d
        self.device = device
        self.calls = 0  # all-reduces issued (for the benchmark)
        self._pending: Tensor | None = None
        self._result: Tensor | None = None
        self.debug_nan: int | None = None

    def attach(self, loss: Tensor, stop: bool) -> None:
        """The step's local loss (a 0-d tensor) and whether this rank wants to stop."""
        self._pending = torch.stack([loss.detach().double().reshape(()),
                                     torch.tensor(1.0 if stop else 0.0, dtype=torch.float64,
                                                  device=loss.device)])
        self._result = None

    def _all_reduce(self, t: Tensor) -> Tensor:
        t = t.to(self.device)
        if self.dist.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            self.calls += 1
        return t

    def __call__(self, flat: Tensor) -> Tensor:
        if self.debug_nan is not None:
            flat = flat.clone()
            flat[self.debug_nan:] = float("nan")
            self.debug_nan = None
        if self._pending is None or self._result is not None:
            return self._all_reduce(flat.double()).to(flat.device, flat.dtype)
        n = flat.numel()
        out = self._all_reduce(torch.cat([flat.reshape(-1).double().to(self.device),
                                          self._pending.to(self.device)]))
        self._result = out[n:]
        return out[:n].to(flat.device, flat.dtype)

    def finish(self) -> tuple[float, bool]:
        """The global mean loss and whether any rank asked to stop; ends the step."""
        if self._pending is None:
            raise RuntimeError("StepReducer.finish() without attach()")
        if self._result is None:
            self._result = self._all_reduce(self._pending)
        loss_sum, stop = (float(v) for v in self._result.cpu())
        self._pending, self._result = None, None
        return loss_sum / self.dist.world_size, stop > 0


def average_gradients(params: list[Tensor], d: Dist) -> None:
    """Average p.grad across ranks with one flat all-reduce (what DDP does in buckets)."""
    if d.enabled:
        _dist.average_gradients(params)


def wrap_ddp(model: nn.Module, d: Dist, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``model`` (the model itself when not distributed)."""
    if not d.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    if device.type == "cuda":
        return DDP(model, device_ids=[device.index], output_device=device.index)
    return DDP(model)


def check_world_size(batch_size: int, micro_batch: int, world_size: int,
                     saved_world_size: int | None, where: Any) -> None:
    """Resuming with ``world_size`` ranks needs the checkpoint's global batch size to be a
    multiple of ``micro_batch × world_size``; raise ValueError with one line otherwise."""
    granularity = micro_batch * world_size
    if batch_size % granularity:
        was = f" (it was written by {saved_world_size} processes)" if saved_world_size else ""
        raise ValueError(
            f"cannot resume {where} with {world_size} processes: its global batch size "
            f"{batch_size} is not a multiple of micro-batch x processes = {micro_batch} x "
            f"{world_size} = {granularity}{was}; use a number of processes that divides "
            f"{batch_size // micro_batch if batch_size % micro_batch == 0 else batch_size}"
        )


def launch(argv: list[str], nproc: int, *, max_restarts: int = 0) -> int:
    """Run ``python -m adabatch train ARGV`` under torchrun with ``nproc`` processes on this
    machine; return torchrun's exit code."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc-per-node", str(nproc), "--max-restarts", str(max_restarts),
           "-m", "adabatch", "train", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    try:
        return subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        return 130
