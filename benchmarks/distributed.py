"""Data-parallel costs: the statistics reduction against the DDP gradient all-reduce, and
training throughput with 1 and 2 processes.

Part 1 (``--part reduce``, run under torchrun with 2 processes by this script): per step,
the time of

- the statistics all-reduce: one float64 vector of 6-7 numbers (the estimator's partial
  sums + loss + stop flag; what every test step adds),
- the coordinate-wise test's extra reduction: the per-coordinate sums, one float64 value
  per parameter,
- the gradient all-reduce of DDP: one float32 value per parameter (here as one flat
  all-reduce, as DDP's buckets do),

for the digits MLP and for a ~1M-parameter model. Competitors are interleaved, the median
of many rounds is reported (the minimum too).

Part 2 (``--part train``): ``adabatch train`` on digits with 1 and with 2 processes
(``--nproc 2``), a fixed batch of 256 and the norm test, interleaved over rounds; reports
samples per second of the training loop (``wall_time_s`` of summary.json, which excludes
start-up) and the wall time of the whole command.

    python benchmarks/distributed.py                # both parts
    python benchmarks/distributed.py --part reduce  # only part 1

On a 2-core machine, 2 processes each with 1 thread compete with the launcher and with each
other for the same 2 cores, and gloo goes through the loopback TCP stack: expect no speed-up
for a model as small as the digits MLP. The numbers say what the reduction costs relative to
the gradient all-reduce, which is what carries over to real machines.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _reduce_worker(rounds: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from adabatch.train.models import create_model

    models = {
        "digits MLP": create_model("mlp", (64,), 10),
        "~1M params": torch.nn.Sequential(torch.nn.Linear(1000, 1000), torch.nn.Linear(1000, 10)),
    }
    results = {}
    for name, model in models.items():
        n = sum(p.numel() for p in model.parameters())
        small = torch.zeros(7, dtype=torch.float64)
        coord = torch.zeros(n, dtype=torch.float64)
        grad = torch.zeros(n, dtype=torch.float32)
        cases = {"statistics (7 x f64)": small, "coordinate sums (n x f64)": coord,
                 "DDP gradients (n x f32)": grad}
        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(10):  # warm-up
            for t in cases.values():
                dist.all_reduce(t)
        for _ in range(rounds):
            for key, t in cases.items():
                dist.barrier()
                t0 = time.perf_counter()
                dist.all_reduce(t)
                times[key].append(time.perf_counter() - t0)
        results[name] = {"params": n, **{k: (statistics.median(v), min(v))
                                         for k, v in times.items()}}
    if rank == 0:
        print(json.dumps(results))
    dist.destroy_process_group()


def _part_reduce(rounds: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc-per-node", "2", __file__, "--worker", "--rounds",
                          str(rounds)], env=env, capture_output=True, text=True, check=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("{")][-1]
    results = json.loads(line)
    print("## all-reduce per step, 2 processes, gloo on CPU (median / min over "
          f"{rounds} rounds)\n")
    print("| model | parameters | statistics (7 x f64) | coordinate sums (n x f64) | "
          "DDP gradients (n x f32) | statistics / gradients |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        s, c, g = (r["statistics (7 x f64)"], r["coordinate sums (n x f64)"],
                   r["DDP gradients (n x f32)"])
        print(f"| {name} | {r['params']:,} | {s[0] * 1e6:.0f} / {s[1] * 1e6:.0f} us | "
              f"{c[0] * 1e6:.0f} / {c[1] * 1e6:.0f} us | {g[0] * 1e6:.0f} / {g[1] * 1e6:.0f} us"
              f" | {s[0] / g[0]:.2f} |")
    print()


def _train_once(nproc: int, out: Path, extra: list[str]) -> tuple[float, float, int]:
    args = [sys.executable, "-m", "adabatch", "train", "--quiet", "--no-plots", "--threads",
            "1", "--out", str(out), "--checkpoint-every", "0", *extra]
    if nproc > 1:
        args += ["--nproc", str(nproc)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    subprocess.run(args, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text())
    return summary["samples"] / summary["wall_time_s"], wall, summary["steps"]


def _part_train(rounds: int) -> None:
    configs = {
        "fixed batch 256 (no test)": ["--batch-test", "none", "--initial-batch", "256",
                                      "--max-batch", "256", "--micro-batch", "128",
                                      "--epochs", "30"],
        "norm test, per-sample, 64 -> 512": ["--initial-batch", "64", "--max-batch", "512",
                                             "--micro-batch", "32", "--eta", "0.3",
                                             "--epochs", "30"],
    }
    print(f"## adabatch train on digits, 1 vs 2 processes (best of {rounds} interleaved "
          "rounds)\n")
    print("| configuration | processes | steps | samples/s (loop) | command wall time |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in configs.items():
            best: dict[int, tuple[float, float, int]] = {}
            for r in range(rounds):
                for nproc in (1, 2):
                    res = _train_once(nproc, Path(tmp) / f"{name[:5]}-{nproc}-{r}", extra)
                    old = best.get(nproc)
                    best[nproc] = res if old is None else (max(old[0], res[0]),
                                                           min(old[1], res[1]), res[2])
            for nproc in (1, 2):
                sps, wall, steps = best[nproc]
                print(f"| {name} | {nproc} | {steps} | {sps:,.0f} | {wall:.1f} s |")
            print(f"| {name} | 2 / 1 | | {best[2][0] / best[1][0]:.2f}x | |")
    print()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("reduce", "train", "all"), default="all")
    p.add_argument("--rounds", type=int, default=0, help="default: 300 (reduce), 3 (train)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ns = p.parse_args()
    if ns.worker:
        _reduce_worker(ns.rounds)
        return
    print(f"torch threads per process: 1; cores: {os.cpu_count()}\n")
    if ns.part in ("reduce", "all"):
        _part_reduce(ns.rounds or 300)
    if ns.part in ("train", "all"):
        _part_train(ns.rounds or 3)


if __name__ == "__main__":
    main()
