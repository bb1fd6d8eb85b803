"""Page faults and step time with glibc's default malloc and with keep_freed_memory().

Each setting runs in its own process (malloc settings are process-wide): the AdAdaGrad
authors' MNIST CNN on random data, SGD, 2 threads; per batch size a plain step and steps with
:class:`PerSampleStats` measuring the norm test's and the augmented inner-product test's
statistics, each warmed up for 10 steps and then timed for 30 (best step; minor page faults
per step from ``getrusage``).

Usage::

    python benchmarks/page_faults.py
    python benchmarks/page_faults.py --sizes 32 --steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def worker(mode: str, sizes: list[int], steps: int) -> dict[str, list[float]]:
    import resource

    import torch
    import torch.nn.functional as F
    from torch import nn

    from adabatch import keep_freed_memory
    from adabatch.batching import PerSampleStats

    if mode == "keep" and not keep_freed_memory():
        raise SystemExit("keep_freed_memory() needs Linux with glibc")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 5, 1, 2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5, 1, 2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
    )  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    needs = {
        "plain": None,
        "norm": {"grad_sq_norm", "variance_trace"},
        "aip": {"grad_sq_norm", "ip_variance", "orth_variance"},
    }
    out: dict[str, list[float]] = {}
    for b in sizes:
        x, y = torch.randn(b, 1, 28, 28), torch.randint(0, 10, (b,))
        for kind, need in needs.items():
            est = PerSampleStats(model, needs=need) if need else None

            def step(est: PerSampleStats | None = est, x: torch.Tensor = x,
                     y: torch.Tensor = y) -> None:
                opt.zero_grad()
                if est is None:
                    F.cross_entropy(model(x), y).backward()
                else:
                    with est.measure():
                        F.cross_entropy(model(x), y).backward()
                    est.stats()
                opt.step()

            for _ in range(10):
                step()
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            best = float("inf")
            for _ in range(steps):
                t0 = time.perf_counter()
                step()
                best = min(best, time.perf_counter() - t0)
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            out[f"{b} {kind}"] = [best * 1e3, faults / steps]
            if est is not None:
                est.remove()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="32,128,512")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--worker", default=None)
    args = ap.parse_args()
    sizes = [int(v) for v in args.sizes.split(",")]
    if args.worker:
        print(json.dumps(worker(args.worker, sizes, args.steps)))
        return
    env = dict(os.environ)
    for var in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_"):
        env.pop(var, None)
    res = {}
    for mode in ("default", "keep"):
        cmd = [sys.executable, __file__, "--worker", mode, "--sizes", args.sizes,
               "--steps", str(args.steps)]  # fmt: skip
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        res[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    print("| b | step | glibc defaults | faults/step | keep_freed_memory() | faults/step |")
    print("|---|---|---|---|---|---|")
    for key in res["default"]:
        b, kind = key.split()
        (t0, f0), (t1, f1) = res["default"][key], res["keep"][key]
        p0, p1 = res["default"][f"{b} plain"][0], res["keep"][f"{b} plain"][0]
        print(f"| {b} | {kind} | {t0:.2f} ms ({t0 / p0:.2f}x) | {f0:.0f} "
              f"| {t1:.2f} ms ({t1 / p1:.2f}x) | {f1:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
