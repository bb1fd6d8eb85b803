"""``adabatch train`` with faults injected through callbacks (the tests' launcher).

Run as a script, alone or under torchrun, with the fault options first and the usual
``adabatch train`` flags after ``--``::

    python tests/_fault_runner.py --kill-at 6 -- --steps 9 --out RUN ...
    python -m torch.distributed.run --nproc-per-node 2 tests/_fault_runner.py \\
        --kill-at 10 --kill-rank 1 --nan-at 3 --decisions DIR -- FLAGS...

Faults (steps count from 1, as in metrics.jsonl):

- ``--kill-at N``: SIGKILL this process during step N, before its optimizer step; with
  ``--kill-rank R`` only rank R, and only on torchrun's first attempt.
- ``--pause-at N``: after step N print ``paused at step N`` and wait for SIGINT/SIGTERM; with
  ``--pause-rank R`` only rank R (the others go on and wait for it: a stuck, not dead, rank).
- ``--nan-at N``: the last rank sends NaN statistics at step N (the sample counts stay).
- ``--decisions DIR``: every rank writes its batch-size decisions to ``DIR/rank<r>.json``.
- ``--kill-in-write KIND:N``: SIGKILL this process in the middle of the N-th write of KIND:
  ``checkpoint``, ``config``, ``summary``, ``final`` (the temporary file is written, the
  rename never happens) or ``metrics`` (half a row reaches the file, as a torn write would).

The exit code is the CLI's: 0, 128 + the signal number when stopped by a signal, or the code
of :mod:`adabatch.train.errors` with its one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from adabatch.train.callbacks import Callbacks
from adabatch.train.distributed import restart_count


class Faults(Callbacks):
    """The faults above as training-loop events."""

    def __init__(self, *, kill_at: int | None = None, kill_rank: int | None = None,
                 pause_at: int | None = None, nan_at: int | None = None,
                 decisions: str | None = None, pause_rank: int | None = None) -> None:
        self.kill_at, self.kill_rank, self.pause_at = kill_at, kill_rank, pause_at
        self.pause_rank = pause_rank
        self.nan_at, self.decisions = nan_at, decisions
        # NaN partial sums go through the step reducer, also in one process
        self.reduce_statistics = nan_at is not None

    def on_step_start(self, run: Any) -> None:
        d = run.dist
        if self.nan_at == run.step + 1 and d.rank == d.world_size - 1:
            # [N, K, S, s1, s2]: keep both sample counts, NaN the sums (any estimator)
            run.reducer.debug_nan = 2

    def before_optimizer_step(self, run: Any) -> None:
        if self.kill_at != run.step + 1:
            return
        if self.kill_rank is not None and (self.kill_rank != run.dist.rank
                                           or restart_count() > 0):
            return  # kill one rank, on the first attempt only
        os.kill(os.getpid(), signal.SIGKILL)

    def on_step_end(self, run: Any) -> None:
        if self.pause_rank is not None and self.pause_rank != run.dist.rank:
            return
        if self.pause_at == run.step:
            print(f"paused at step {run.step}", flush=True)
            while run.stop.signum is None:
                time.sleep(0.01)

    def on_train_end(self, run: Any) -> None:
        if not self.decisions:
            return
        policy = run.controller
        record = {"rank": run.dist.rank, "world_size": run.dist.world_size,
                  "history": policy.history, "final_batch_size": policy.batch_size,
                  "warnings": getattr(policy, "warnings", 0), "step": run.step}
        Path(self.decisions).mkdir(parents=True, exist_ok=True)
        Path(self.decisions, f"rank{run.dist.rank}.json").write_text(
            json.dumps(record, default=str) + "\n")


_TARGETS = {"checkpoint": lambda name: name.startswith("step_") and name.endswith(".pt"),
            "config": lambda name: name == "config.json",
            "summary": lambda name: name == "summary.json",
            "final": lambda name: name == "final.pt"}


def kill_in_write(spec: str) -> None:
    """Arm the ``--kill-in-write KIND:N`` fault (see the module docstring)."""
    kind, _, count = spec.partition(":")
    left = [int(count or 1)]

    def due() -> bool:
        left[0] -= 1
        return left[0] == 0

    if kind == "metrics":
        from adabatch.train.logging import MetricsWriter

        flush = MetricsWriter.flush

        def torn_flush(self: MetricsWriter) -> int:
            if due():
                self._file.write('{"step": 99, "samples": 12')  # half a row
                self._file.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return flush(self)

        MetricsWriter.flush = torn_flush  # type: ignore[method-assign]
        return
    matches = _TARGETS[kind]
    replace = os.replace

    def dying_replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        if matches(Path(dst).name) and due():
            os.kill(os.getpid(), signal.SIGKILL)
        replace(src, dst, *args, **kwargs)

    os.replace = dying_replace  # type: ignore[assignment]


def run_train(flags: list[str], faults: Faults) -> int:
    """``adabatch train FLAGS`` with ``faults``; the CLI's exit code."""
    from adabatch.cli import build_parser
    from adabatch.train.config import build_config
    from adabatch.train.loop import train

    ns = build_parser().parse_args(["train", *flags])
    given = {k: v for k, v in vars(ns).items() if k != "command"}
    for key in ("data_options", "model_options", "optimizer_options"):
        if key in given:
            given[key] = dict(given[key])
    file = given.pop("config", None)
    try:
        result = train(build_config(given, file), callbacks=faults)
    except Exception as e:  # as the CLI does: one line and the exit code of train.errors
        from adabatch.cli import _fail

        return _fail(e, debug=False)
    return 128 + result.interrupted if result.interrupted is not None else 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    cut = args.index("--") if "--" in args else len(args)
    p = argparse.ArgumentParser(prog="_fault_runner")
    for name in ("--kill-at", "--kill-rank", "--pause-at", "--pause-rank", "--nan-at"):
        p.add_argument(name, type=int)
    p.add_argument("--decisions")
    p.add_argument("--kill-in-write", metavar="KIND:N")
    ns = p.parse_args(args[:cut])
    spec = ns.__dict__.pop("kill_in_write")
    if spec:
        kill_in_write(spec)
    return run_train(args[cut + 1:], Faults(**vars(ns)))


if __name__ == "__main__":
    sys.exit(main())
