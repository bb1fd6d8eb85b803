"""The training steps of a built :class:`~adabatch.train.build.Run` (see
:mod:`adabatch.train.loop` for what a step does). One path whatever the estimator: every
step is ``with est.step(measure) as step`` and every micro-batch ``with
step.micro_batch(n)`` (:mod:`adabatch.batching.protocol`); a policy without statistics gets a
no-op estimator whose steps never measure."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from adabatch.batching.controller import apply_lr
from adabatch.batching.policies import raw_statistics
from adabatch.batching.protocol import StepScope
from adabatch.batching.schedule import LinearWarmup, WarmupCosine
from adabatch.train.build import Run
from adabatch.train.callbacks import Callbacks
from adabatch.train.config import TrainConfig
from adabatch.train.data import task_loss
from adabatch.train.distributed import Dist, PeerTimeout, average_gradients, is_timeout
from adabatch.train.divergence import Diverged
from adabatch.train.fsdp import eval_padding
from adabatch.train.state import write_checkpoint

__all__ = ["StopFlag", "evaluate", "lr_multiplier", "run_steps"]


def lr_multiplier(cfg: TrainConfig, samples: int, step: int, budget_kind: str,
                  budget: int) -> float:
    """Warmup (linear, in samples) times cosine decay (in samples, or steps for a step
    budget) down to ``min_lr_ratio``. ``samples``/``step``: seen before the step. The
    public schedules of :mod:`adabatch.batching.schedule` built from ``cfg``."""
    if cfg.lr_schedule != "cosine":
        return LinearWarmup(cfg.warmup_samples)(samples, step)
    total = {"total_steps" if budget_kind == "steps" else "total_samples": budget}
    return WarmupCosine(cfg.warmup_samples, min_ratio=cfg.min_lr_ratio, **total)(samples, step)


def autocast(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16: torch.autocast; under FSDP2 none (its MixedPrecisionPolicy casts, train/fsdp.py)."""
    if cfg.precision == "bf16" and cfg.parallel != "fsdp":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, task: str, *, batch: int = 1024,
             autocast: contextlib.AbstractContextManager | None = None,
             dist: Dist | None = None, same_passes: bool = False
             ) -> tuple[float, float | None]:
    """Mean test loss and accuracy (None for regression) over ``x, y``.

    For a language model (``task="language_model"``) a sequence's loss and accuracy are the
    means over its tokens (the next-token accuracy), averaged over the sequences.

    With ``dist`` (several ranks) each rank evaluates a contiguous shard of ``x, y`` and the
    sums of losses, correct predictions and samples are all-reduced (one small all-reduce).
    ``same_passes`` (FSDP2, whose every forward all-gathers): every rank runs as many forward
    passes, the ranks with fewer batches adding dummy one-sample passes.
    """
    n = len(x)
    if n == 0:
        raise ValueError("evaluate(): the test set is empty")
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0.0 if task == "language_model" else 0
    tokens = task == "language_model"  # per-sequence accuracy: a fraction of its tokens
    lo, hi = 0, n
    if dist is not None and dist.enabled:
        lo, hi = n * dist.rank // dist.world_size, n * (dist.rank + 1) // dist.world_size
    try:
        for start in range(lo, hi, batch):
            xb, yb = x[start:min(hi, start + batch)], y[start:min(hi, start + batch)]
            with autocast if autocast is not None else contextlib.nullcontext():
                out = model(xb)
            total_loss += float(task_loss(task, out, yb, reduction="sum"))
            if tokens:
                correct += float((out.argmax(dim=-1) == yb).double().mean(dim=1).sum())
            elif task != "regression":
                correct += int((out.argmax(dim=-1) == yb).sum())
        if same_passes and dist is not None and dist.enabled:
            for _ in range(eval_padding(n, batch, dist.rank, dist.world_size)):
                with autocast if autocast is not None else contextlib.nullcontext():
                    model(x[:1])  # output discarded
    finally:
        model.train(was_training)
    if dist is not None and dist.enabled:
        import torch.distributed as tdist

        sums = torch.tensor([total_loss, float(correct)], dtype=torch.float64,
                            device=x.device if x.device.type == "cuda" else "cpu")
        tdist.all_reduce(sums)
        total_loss, correct = float(sums[0]), float(sums[1])
        if not tokens:
            correct = round(correct)
    return total_loss / n, (None if task == "regression" else correct / n)


class StopFlag:
    """SIGINT/SIGTERM set ``signum``; the loop checks it between steps."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
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


class _NoEstimator:
    """The estimator of a policy that needs no statistics: its steps never measure."""

    needs: frozenset[str] = frozenset()
    needs_local_grads = False

    @contextlib.contextmanager
    def step(self, measure: bool = True) -> Iterator[StepScope]:
        yield StepScope(False, lambda n: contextlib.nullcontext(), lambda n: None)

    def stats(self) -> Any:
        raise RuntimeError("no statistics: the batch policy needs none")


def done(run: Run) -> bool:
    if run.budget_kind == "steps":
        return run.step >= run.budget
    return run.samples >= run.budget


def eval_row(run: Run, writer: Any, progress: Any) -> dict[str, Any]:
    """Evaluate on the test split, write the row and a progress line; return the row.

    Without a test set nothing is measured: the row's ``test_loss`` and ``test_accuracy`` are
    None (null in ``metrics.jsonl`` and ``summary.json``), never a made-up 0."""
    if len(run.data.x_test) == 0:
        row = {"eval": True, "step": run.step, "samples": run.samples, "test_loss": None,
               "test_accuracy": None, "time": run.elapsed, "test_samples": 0}
        writer.write(row)
        writer.flush()
        progress.write(f"eval step={run.step}: no test set, nothing evaluated")
        return row
    loss, acc = evaluate(run.model, run.data.x_test, run.data.y_test, run.data.task,
                         batch=run.cfg.eval_batch, autocast=autocast(run.cfg, run.device),
                         dist=run.dist, same_passes=run.cfg.parallel == "fsdp")
    row = {"eval": True, "step": run.step, "samples": run.samples, "test_loss": loss,
           "test_accuracy": acc, "time": run.elapsed}
    writer.write(row)
    writer.flush()
    acc_text = f" test_accuracy={acc:.4f}" if acc is not None else ""
    progress.write(f"eval step={run.step} samples={run.samples} test_loss={loss:.4f}"
                   f"{acc_text} batch_size={run.controller.batch_size}")
    return row


class _Steps:
    """The loop over steps; the constants of the run are read once here."""

    def __init__(self, run: Run, writer: Any, progress: Any, stop: StopFlag,
                 callbacks: Callbacks) -> None:
        self.run, self.writer, self.progress, self.stop = run, writer, progress, stop
        self.callbacks = callbacks
        self.est = run.estimator if run.estimator is not None else _NoEstimator()
        self.forward = run.forward if run.forward is not None else run.model
        self.autocast = autocast(run.cfg, run.device)
        self.move = run.device.type != "cpu"  # the sampler's indices live on the CPU
        self.params = [p for p in run.model.parameters() if p.requires_grad]
        # FSDP2 reduce-scatters every micro-batch's gradient (train/fsdp.py): no DDP no_sync,
        # and its estimator reads the local gradients in hooks, never by hand
        self.ddp = run.dist.enabled and run.cfg.parallel != "fsdp"
        sampler = run.sampler
        max_pass = run.cfg.max_micro_batch
        if run.cfg.effective_micro_batch() is None:  # the whole share in one pass
            self.take = lambda B: [sampler.take_batch(B)]
        elif max_pass is not None:  # passes of up to max_pass samples, growing with B
            self.take = lambda B: list(sampler.take_batch(B).split(max_pass))
        else:
            self.take = sampler.take
        opt = run.optimizer
        # zero_grad(set_to_none=True) is `p.grad = None` for every parameter of the
        # optimizer; done here directly (torch's adds a profiler range), unless the optimizer
        # overrides it
        self.plain_zero_grad = type(opt).zero_grad is torch.optim.Optimizer.zero_grad
        self.opt_params = [p for group in opt.param_groups for p in group["params"]]

    def zero_grad(self) -> None:
        if self.plain_zero_grad:
            for p in self.opt_params:
                p.grad = None
        else:
            self.run.optimizer.zero_grad(set_to_none=True)

    def gradients(self, B: int, measure: bool) -> tuple[Tensor, bool]:
        """Forward and backward over this rank's share of a step of B samples: p.grad is the
        mean gradient (averaged over the ranks). Returns the local loss and whether the
        estimator measured."""
        run, d = self.run, self.run.dist
        B_local = B // d.world_size  # this rank's share; DDP averages the ranks' gradients
        data, loss_fn, forward = run.data, run.loss_fn, self.forward
        batches = self.take(B)
        # an estimator that needs each rank's local gradients: no DDP sync, one by hand
        manual_sync = self.ddp and measure and self.est.needs_local_grads
        last = len(batches) - 1
        loss_sum: Tensor | None = None
        with self.est.step(measure) as step:
            for k, idx in enumerate(batches):
                if self.move:
                    idx = idx.to(run.device, non_blocking=True)
                x = data.x_train.index_select(0, idx)  # = x_train[idx]
                y = data.y_train.index_select(0, idx)
                if data.augment is not None:
                    x = data.augment(x, run.augment_gen)
                no_sync = self.ddp and (k < last or manual_sync)
                with (forward.no_sync() if no_sync  # type: ignore[operator]
                      else contextlib.nullcontext()), step.micro_batch(len(idx)):
                    with self.autocast:
                        loss = loss_fn(forward(x), y)
                    if len(idx) != B_local:
                        loss = loss * (len(idx) / B_local)  # micro-batch losses sum to the mean
                    loss.backward()
                loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
        if manual_sync:
            average_gradients(self.params, d)
        assert loss_sum is not None
        return loss_sum, step.measuring

    def reduce(self, loss_sum: Tensor, measuring: bool) -> tuple[float, Any, bool]:
        """The statistics, the mean loss over the ranks and whether any rank asked to stop
        (one small all-reduce carries them all)."""
        reducer, stop = self.run.reducer, self.stop
        if reducer is None:
            return float(loss_sum), (self.est.stats() if measuring else None), False
        reducer.attach(loss_sum, stop.signum is not None)
        stats = self.est.stats() if measuring else None
        loss_value, stop_any = reducer.finish()
        if stop_any and stop.signum is None:
            stop.signum = signal.SIGTERM  # another rank was signalled: stop together
        return loss_value, stats, stop_any

    def record(self, B: int, loss_value: float, lr: float, t0: float, stats: Any) -> None:
        """Count the step, write its metrics row (with the raw statistics of a test step)
        and progress, evaluate when due."""
        run, cfg, history = self.run, self.run.cfg, self.run.controller.history
        run.step += 1
        run.samples += B
        run.elapsed = time.perf_counter() - t0
        test = history[-1] if history and history[-1]["step"] == run.step - 1 else None
        if stats is not None:  # the policy's own columns (a smoothed b_noise) win
            test = {**raw_statistics(stats), **(test or {})}
        self.writer.write_step(run.step, run.samples, B, loss_value, lr, run.elapsed, test)
        if not cfg.quiet:
            self.progress.update(run.step if run.budget_kind == "steps" else run.samples,
                                 {"step": run.step, "B": B, "loss": f"{loss_value:.4f}"})
        if cfg.eval_every and run.step % cfg.eval_every == 0 and not done(run):
            eval_row(run, self.writer, self.progress)

    def observe_time(self, B: int, start: float) -> None:
        """A policy that reads step times (Goodput) gets this step's: its forward, backward
        and reductions (``float(loss)`` waited for the device). Ranks agree on the slowest
        rank's time (one all-reduce of one number, only for such a policy)."""
        observe = getattr(self.run.controller, "observe_time", None)
        if observe is None:
            return
        seconds = time.perf_counter() - start
        d = self.run.dist
        if d.enabled:
            import torch.distributed as tdist

            t = torch.tensor([seconds], dtype=torch.float64,
                             device=self.run.device if self.run.device.type == "cuda" else "cpu")
            tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
            seconds = float(t)
        observe(B, seconds)

    def one_step(self, t0: float) -> bool:
        """One training step; True when the loop must stop (after a checkpoint)."""
        run, policy, opt, cb = self.run, self.run.controller, self.run.optimizer, self.callbacks
        cb.on_step_start(run)
        t_step = time.perf_counter()
        B = policy.batch_size
        apply_lr(opt, run.base_lrs, lr_multiplier(run.cfg, run.samples, run.step,
                                                  run.budget_kind, run.budget),
                 policy.lr_factor)
        self.zero_grad()
        loss_sum, measuring = self.gradients(B, policy.wants_stats())
        loss_value, stats, stop_any = self.reduce(loss_sum, measuring)
        lr = float(opt.param_groups[0]["lr"])
        try:  # before the step spoils the model (a NaN/inf loss, or a finite blow-up)
            run.divergence.check(loss_value, run.step + 1)
        except Diverged as e:
            raise Diverged(f"{e}; try a smaller --lr (continue from an earlier checkpoint "
                           f"with --resume {run.run_dir} --from-step N)") from None
        cb.before_optimizer_step(run)
        opt.step()
        self.observe_time(B, t_step)
        policy.update(stats)
        self.record(B, loss_value, lr, t0, stats)
        cb.on_step_end(run)
        d = run.dist
        if self.stop.signum is not None and (run.reducer is None or not d.enabled or stop_any):
            write_checkpoint(run, self.writer)
            return True
        if run.cfg.checkpoint_every and run.step % run.cfg.checkpoint_every == 0:
            write_checkpoint(run, self.writer)
        return False


def run_steps(run: Run, writer: Any, progress: Any, stop: StopFlag,
              callbacks: Callbacks | None = None) -> None:
    """Train until the budget is spent or a signal stops the run (with a checkpoint)."""
    steps = _Steps(run, writer, progress, stop,
                   callbacks if callbacks is not None else Callbacks())
    run.stop = stop
    t0 = time.perf_counter() - run.elapsed
    run.model.train()
    d = run.dist
    while not done(run):
        d.heartbeat(run.step + 1)
        try:
            if steps.one_step(t0):
                return
        except RuntimeError as e:
            if not (d.enabled and is_timeout(e)):
                raise
            behind = d.laggards(run.step + 1)
            who = (f"rank(s) {', '.join(map(str, behind))} did not reach step {run.step + 1}"
                   if behind else "another process stopped answering")
            raise PeerTimeout(f"rank {d.rank}: no answer within --dist-timeout "
                              f"{d.timeout_s:g} s at step {run.step + 1}: {who} (stopped "
                              "or stuck)") from None
