"""What the norm test's statistics cost under FSDP2, beyond what they cost in one process.

Step time of a causal transformer language model (``create_model("charlm", ...)``: pre-LN
blocks in ``model.blocks``, a tied output layer) with

- ``plain``: no statistics,
- ``micro``: :class:`~adabatch.batching.MicroBatchStats` (``track="hooks"``) with the norm
  test's needs (G, V),
- ``persample``: :class:`~adabatch.batching.PerSampleStats` with the same needs,

each step 2 micro-batches per process, every step measured (the worst case: a test step every
step). Two settings: FSDP2 (``fully_shard`` on every block and on the root; 2 processes,
gloo, CPU, 1 thread each; the gradient sync on the last micro-batch only, as a loop with
accumulation does) and one process without FSDP doing one rank's work (its samples, its
micro-batches). The variants run on separate model copies in the same processes, interleaved
within each round (``--rounds`` rounds of ``--steps`` timed steps each, after a warm-up), and
the two settings alternate (``--blocks`` launches each), so both see the same machine load.
The report gives the median step time per variant and its ratio to ``plain`` in the same
setting, and per estimator ``ratio(FSDP2) − ratio(one process)``: what FSDP2 adds to the
statistics' cost (goal of issue #17: at most 0.15), and the statistics' extra time under FSDP2
less their time in one process, as a fraction of the FSDP2 step without statistics (the
same question in absolute time: a slow sharded step makes the first number small).

    python benchmarks/fsdp_overhead.py                      # defaults: ~5 minutes on 2 cores
    python benchmarks/fsdp_overhead.py --ddp                # + DDP, 2 processes (control)
    python benchmarks/fsdp_overhead.py --rounds 3 --steps 2 --blocks 1   # smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("plain", "micro", "persample")
NEEDS = ("grad_sq_norm", "variance_trace")


def _model(args: argparse.Namespace):
    from adabatch.train.models import create_model

    return create_model("charlm", (args.context,), args.vocab, d_model=args.d_model,
                        layers=args.layers, heads=args.heads)


def _estimator(kind: str, model, reduce):
    from adabatch.batching import MicroBatchStats, PerSampleStats

    if kind == "micro":
        return MicroBatchStats(model, needs=NEEDS, reduce=reduce, track="hooks")
    if kind == "persample":
        return PerSampleStats(model, needs=NEEDS, reduce=reduce)
    return None


def _setup(args: argparse.Namespace, setting: str) -> dict:
    """One model (same initial weights), optimizer and estimator per variant."""
    import torch
    import torch.distributed as dist

    out = {}
    for kind in VARIANTS:
        torch.manual_seed(0)
        model = _model(args)
        if setting == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks:
                fully_shard(block)
            fully_shard(model)
        est = _estimator(kind, model, None if setting == "single" else dist.all_reduce)
        if setting == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(model)
        out[kind] = (model, torch.optim.SGD(model.parameters(), lr=0.01), est)
    return out


def _sync(model, setting: str, last: bool):
    """The gradient sync of a micro-batch: on the last one only (FSDP2 and DDP)."""
    if setting == "fsdp":
        model.set_requires_gradient_sync(last)
    if setting == "ddp" and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def _step(model, opt, est, x, y, micro: int, setting: str) -> None:
    import torch.nn.functional as F

    opt.zero_grad(set_to_none=True)
    n_all = x.shape[0]
    starts = list(range(0, n_all, micro))
    with est.step(True) if est is not None else contextlib.nullcontext() as scope:
        for i, lo in enumerate(starts):
            xb, yb = x[lo:lo + micro], y[lo:lo + micro]
            with (_sync(model, setting, i == len(starts) - 1),
                  scope.micro_batch(len(xb)) if scope is not None else contextlib.nullcontext()):
                logits = model(xb)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1))
                (loss * len(xb) / n_all).backward()
    if est is not None:
        est.stats()
    opt.step()


def _worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    setting = args.worker
    sharded = setting != "single"  # (2 processes)
    if sharded:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if sharded else 0
    runs = _setup(args, setting)
    g = torch.Generator().manual_seed(1 + rank)
    batches = [torch.randint(0, args.vocab, (args.batch, args.context + 1), generator=g)
               for _ in range(4)]
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}

    def timed(kind: str, steps: int, start: int) -> float:
        model, opt, est = runs[kind]
        if sharded:
            dist.barrier()
        t0 = time.perf_counter()
        for s in range(steps):
            b = batches[(start + s) % len(batches)]
            _step(model, opt, est, b[:, :-1], b[:, 1:], args.micro, setting)
        if sharded:
            dist.barrier()
        return (time.perf_counter() - t0) / steps

    for kind in VARIANTS:  # warm-up
        timed(kind, 2, 0)
    for r in range(args.rounds):
        order = VARIANTS if r % 2 == 0 else VARIANTS[::-1]
        for kind in order:
            times[kind].append(timed(kind, args.steps, r))
    if rank == 0:
        Path(args.out).write_text(json.dumps(times))
    if sharded:
        dist.destroy_process_group()


def _launch(setting: str, args: argparse.Namespace, out: Path) -> dict[str, list[float]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    opts = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k not in ("worker", "out", "blocks", "json", "ddp")]
    me = [__file__, "--worker", setting, "--out", str(out), *opts]
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2", *me] if setting != "single" else [sys.executable, *me])
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.read_text())


def _report(times: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> dict:
    med = {s: {k: statistics.median(v) for k, v in t.items()} for s, t in times.items()}
    ratio = {s: {k: m[k] / m["plain"] for k in VARIANTS} for s, m in med.items()}
    n = len(times["fsdp"]["plain"])
    print(f"## Norm-test statistics under FSDP2: charlm d_model={args.d_model}, "
          f"layers={args.layers}, context={args.context}, vocab={args.vocab}; {args.batch} "
          f"samples per process in micro-batches of {args.micro}; median of {n} rounds of "
          f"{args.steps} steps\n")
    print("| setting | variant | step (ms) | / plain |")
    print("|---|---|---|---|")
    names = {"fsdp": "FSDP2, 2 processes", "ddp": "DDP, 2 processes",
             "single": "1 process, no FSDP"}
    for s in times:
        for k in VARIANTS:
            print(f"| {names[s]} | {k} | {med[s][k] * 1e3:.1f} | {ratio[s][k]:.3f} |")
    print("\n| estimator | / plain, FSDP2 | / plain, 1 process | FSDP2 adds (goal <= 0.15) "
          "| extra time under FSDP2 / FSDP2 plain step |")
    print("|---|---|---|---|---|")
    added, extra = {}, {}
    for k in VARIANTS[1:]:
        added[k] = ratio["fsdp"][k] - ratio["single"][k]
        # the statistics' time under FSDP2 less their time in one process, on the FSDP2 step
        extra[k] = ((med["fsdp"][k] - med["fsdp"]["plain"])
                    - (med["single"][k] - med["single"]["plain"])) / med["fsdp"]["plain"]
        print(f"| {k} | {ratio['fsdp'][k]:.3f} | {ratio['single'][k]:.3f} | "
              f"{added[k]:+.3f} | {extra[k]:+.3f} |")
    if "ddp" in ratio:  # the control: two processes without sharding
        for k in VARIANTS[1:]:
            print(f"| {k} (DDP control) | {ratio['ddp'][k]:.3f} | {ratio['single'][k]:.3f} | "
                  f"{ratio['ddp'][k] - ratio['single'][k]:+.3f} | |")
    return {"median_s": med, "ratio": ratio, "fsdp2_adds": added, "extra_time": extra,
            "rounds": times}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=15, help="timed rounds per launch")
    p.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    p.add_argument("--blocks", type=int, default=2, help="launches of each setting")
    p.add_argument("--batch", type=int, default=16, help="samples per process per step")
    p.add_argument("--micro", type=int, default=8, help="samples per micro-batch")
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--ddp", action="store_true",
                   help="also DDP with 2 processes (a control: two processes, no sharding)")
    p.add_argument("--worker", choices=("fsdp", "ddp", "single"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args)
        return
    settings = ("fsdp", "ddp", "single") if args.ddp else ("fsdp", "single")
    times: dict[str, dict[str, list[float]]] = {s: {} for s in settings}
    with tempfile.TemporaryDirectory() as tmp:
        for b in range(args.blocks):
            for setting in settings:
                got = _launch(setting, args, Path(tmp) / f"{setting}{b}.json")
                for k, v in got.items():
                    times[setting].setdefault(k, []).extend(v)
    result = _report(times, args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
