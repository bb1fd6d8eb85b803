"""Fused AdaBelief: one-time build cost and step time against torch's Adam.

    python benchmarks/fused_build.py                # build cost (cold + cached) and step times
    python benchmarks/fused_build.py --fused-only   # step times only, with the cached build

Build cost: ``python -m adabatch.optim.fused`` in a fresh process with an empty
``TORCH_EXTENSIONS_DIR`` (cold: compiles), then again in the same directory (cached: loads).

Step time: ResNet-18-shaped parameters (62 tensors, 11.69M parameters, shapes written out
below), random gradients, one ``optimizer.step()`` per measurement. The competitors run
interleaved, round after round, and each keeps its best time (the machine is shared and
noisy); ratios are against torch's ``Adam(fused=True)``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import torch


def resnet18_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of torchvision's resnet18 (conv weights, BN weight/bias, fc)."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    for _ in range(4):  # layer1: two blocks of two 3x3 convs, each with BN
        shapes += [(64, 64, 3, 3), (64,), (64,)]
    cin = 64
    for c in (128, 256, 512):  # layer2..4: a downsampling block and a plain block
        shapes += [(c, cin, 3, 3), (c,), (c,), (c, c, 3, 3), (c,), (c,), (c, cin, 1, 1), (c,), (c,)]
        shapes += [(c, c, 3, 3), (c,), (c,), (c, c, 3, 3), (c,), (c,)]
        cin = c
    shapes += [(1000, 512), (1000,)]
    return shapes


def make_params(seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = []
    for shape in resnet18_shapes():
        p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.1)
        p.grad = torch.randn(shape, generator=gen) * 1e-3
        params.append(p)
    return params


def build_cost() -> None:
    with tempfile.TemporaryDirectory() as root:
        env = {**os.environ, "TORCH_EXTENSIONS_DIR": root}
        cmd = [sys.executable, "-m", "adabatch.optim.fused"]
        for label in ("cold (compile)", "cached (load)"):
            start = time.perf_counter()
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            wall = time.perf_counter() - start
            line = out.stdout.strip()
            inner = re.search(r"(built in [\d.]+ s|loaded from cache in [\d.]+ ms)", line)
            print(
                f"build {label:15s}: {inner.group(1) if inner else line}; "
                f"whole process (python + import torch + load) {wall:.1f} s"
            )
        print(f"  ({line.split('; ', 1)[1]})")


def competitors(include_class: bool) -> dict[str, torch.optim.Optimizer]:
    from adabatch.optim import fused

    fused.build()
    opts: dict[str, torch.optim.Optimizer] = {
        "torch Adam fused": torch.optim.Adam(make_params(0), fused=True),
        "torch Adam foreach": torch.optim.Adam(make_params(1), foreach=True),
    }
    if include_class:
        from adabatch.optim import AdaBelief

        opts["AdaBelief fused"] = AdaBelief(make_params(2), fused=True)
        opts["AdaBelief foreach"] = AdaBelief(make_params(3), foreach=True)
    return opts


def bench(threads: list[int], rounds: int, include_class: bool) -> None:
    opts = competitors(include_class)
    n = sum(p.numel() for p in opts["torch Adam fused"].param_groups[0]["params"])
    print(f"ResNet-18 shapes: {len(resnet18_shapes())} tensors, {n / 1e6:.2f}M parameters")
    for nt in threads:
        torch.set_num_threads(nt)
        for opt in opts.values():  # warm up (state allocation, first touch)
            opt.step()
        best = dict.fromkeys(opts, float("inf"))
        for _ in range(rounds):
            for name, opt in opts.items():
                start = time.perf_counter()
                opt.step()
                best[name] = min(best[name], time.perf_counter() - start)
        ref = best["torch Adam fused"]
        print(f"\n{nt} thread(s), best of {rounds} interleaved rounds")
        for name, t in best.items():
            print(f"  {name:20s} {t * 1e3:8.2f} ms   {t / ref:5.2f}x Adam(fused=True)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fused-only", action="store_true", help="skip the build-cost measurement")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument(
        "--no-class", action="store_true", help="only torch's Adams (no AdaBelief class)"
    )
    args = ap.parse_args()
    if not args.fused_only:
        build_cost()
    bench(args.threads, args.rounds, include_class=not args.no_class)


if __name__ == "__main__":
    main()
