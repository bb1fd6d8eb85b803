"""The CUDA fused AdaBelief (Triton) at several launch shapes, against torch's fused Adam.

For each (elements per program, warps per program) the fused AdaBelief and ``Adam(fused=True)``
take turns, round after round, on the same parameters (ResNet-18 CIFAR shapes by default, or
the transformer set). A sample is ``--reps`` back-to-back steps between two synchronisations;
the table gives the best sample per step, and how much of it the host spent issuing the
steps (when that is most of it, the step is bound by the host, not by the GPU's memory).
``memory`` is the bandwidth implied by the bytes every step must move (read p, g, m, s and
write p, m, s, 4 bytes each) over the step time.

Usage (needs a GPU and Triton)::

    python benchmarks/fused_cuda_launch.py
    python benchmarks/fused_cuda_launch.py --sets transformer --rounds 20
"""

from __future__ import annotations

import argparse
import time

import torch

from adabatch.optim import AdaBelief
from adabatch.optim.fused import cuda as fused_cuda
from optimizer_step import resnet18_shapes, transformer_shapes


def sample(opt: torch.optim.Optimizer, reps: int) -> tuple[float, float]:
    """(seconds per step with the GPU done, seconds per step the host took to issue it)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        opt.step()
    issued = time.perf_counter() - t0
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps, issued / reps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sets", nargs="+", default=["resnet18"])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument(
        "--shapes", nargs="+", default=["1024x4", "2048x4", "2048x8", "4096x8", "8192x8"],
        help="BLOCKxWARPS launch shapes",
    )  # fmt: skip
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(device)}")
    for set_name in args.sets:
        shapes = resnet18_shapes() if set_name == "resnet18" else transformer_shapes()
        gen = torch.Generator().manual_seed(0)
        init = [(torch.randn(s, generator=gen) * 0.05).to(device) for s in shapes]
        grads = [(torch.randn(s, generator=gen) * 1e-2).to(device) for s in shapes]
        numel = sum(t.numel() for t in init)

        def make(
            kind: str, init: list[torch.Tensor] = init, grads: list[torch.Tensor] = grads
        ) -> torch.optim.Optimizer:
            params = [torch.nn.Parameter(t.clone()) for t in init]
            for p, g in zip(params, grads):
                p.grad = g
            if kind == "adam":
                return torch.optim.Adam(params, lr=1e-3, fused=True)
            return AdaBelief(params, lr=1e-3, fused=True)

        print(f"\n{set_name}: {len(shapes)} tensors, {numel / 1e6:.2f}M parameters")
        print("| launch | AdaBelief fused | host part | memory | Adam(fused=True) | ratio |")
        print("|---|---|---|---|---|---|")
        for shape in args.shapes:
            block, warps = (int(x) for x in shape.split("x"))
            fused_cuda.BLOCK, fused_cuda.NUM_WARPS = block, warps
            opts = {"adabelief": make("adabelief"), "adam": make("adam")}
            for opt in opts.values():  # warm-up (and compilation)
                for _ in range(6):
                    opt.step()
            best = {k: (float("inf"), 0.0) for k in opts}
            for r in range(args.rounds):
                for k in (("adabelief", "adam") if r % 2 else ("adam", "adabelief")):
                    t, host = sample(opts[k], args.reps)
                    if t < best[k][0]:
                        best[k] = (t, host)
            t_ab, host_ab = best["adabelief"]
            t_adam = best["adam"][0]
            gbps = numel * 4 * 7 / t_ab / 1e9
            print(
                f"| {block} x {warps} warps | {t_ab * 1e6:.0f} us | {host_ab * 1e6:.0f} us "
                f"| {gbps:.0f} GB/s | {t_adam * 1e6:.0f} us | {t_ab / t_adam:.2f}x |"
            )


if __name__ == "__main__":
    main()
