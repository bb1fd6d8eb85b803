"""Time one optimizer step: this project's AdaBelief against the other AdaBeliefs and torch's Adam.

Two parameter sets:

- ``resnet18``: the 62 tensors (11.17M parameters) of ResNet-18 for 32x32 images and 10
  classes (3x3 stem, the usual four stages, 512->10 classifier), written out by hand.
- ``transformer``: a GPT-style decoder (vocabulary 32000, width 384, 12 layers, MLP 1536,
  learned positions for 512 tokens): 148 tensors, 33.8M parameters, a 12.3M-parameter
  embedding.

Every competitor owns its parameters and state; all share the same (random) gradients. After
a warm-up (6 steps, past AdaBelief's rectification warm-up, so every AdaBelief takes its
adaptive step), the competitors are timed in an interleaved, shuffled order, round after
round, and each reports its best (minimum) time: the machine is shared and noisy, so the
minimum is the least disturbed measurement. Ratios are to torch's foreach Adam.

Usage::

    python benchmarks/optimizer_step.py                  # both sets, 1 and 2 threads
    python benchmarks/optimizer_step.py --quick          # fewer rounds, resnet18 only
    python benchmarks/optimizer_step.py --rounds 30 --threads 1 --sets transformer
    python benchmarks/optimizer_step.py --device cuda --ref "torch Adam (fused)"

On CUDA each timed sample is ``--reps`` back-to-back steps between two synchronisations,
divided by ``--reps`` (the steady state of a training loop, host overhead included), and the
one-time compilation of the fused AdaBelief (Triton) is reported; ``--block``/``--warps``
override its launch shape (for tuning).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import random
import time
from collections.abc import Callable

import torch

from adabatch.optim import adabelief_fused_cuda
from adabatch.optim.adabelief import AdaBelief, _fused_ok

Shape = tuple[int, ...]
HP = dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)


def resnet18_shapes(num_classes: int = 10) -> list[Shape]:
    """The parameter shapes of ResNet-18 (CIFAR stem: 3x3 conv, no max-pool)."""
    shapes: list[Shape] = [(64, 3, 3, 3), (64,), (64,)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            first_in = cin if block == 0 else cout
            shapes += [
                (cout, first_in, 3, 3),
                (cout,),
                (cout,),
                (cout, cout, 3, 3),
                (cout,),
                (cout,),
            ]
            if block == 0 and (stride != 1 or cin != cout):
                shapes += [(cout, cin, 1, 1), (cout,), (cout,)]
        cin = cout
    shapes += [(num_classes, 512), (num_classes,)]
    return shapes


def transformer_shapes(
    vocab: int = 32000, width: int = 384, layers: int = 12, mlp: int = 1536, context: int = 512
) -> list[Shape]:
    """The parameter shapes of a GPT-style decoder with a tied embedding."""
    shapes: list[Shape] = [(vocab, width), (context, width)]
    for _ in range(layers):
        shapes += [
            (width,), (width,),  # ln1
            (3 * width, width), (3 * width,),  # qkv
            (width, width), (width,),  # attention output
            (width,), (width,),  # ln2
            (mlp, width), (mlp,),  # MLP in
            (width, mlp), (width,),  # MLP out
        ]  # fmt: skip
    shapes += [(width,), (width,)]  # final layer norm
    return shapes


def competitors(
    device: torch.device,
) -> dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]]:
    """name -> factory; every AdaBelief with eps=1e-16, decoupled decay, rectification on."""
    ab = dict(HP, eps=1e-16)
    out: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
        "adabatch AdaBelief (for-loop)": lambda p: AdaBelief(p, **ab, foreach=False, fused=False),
        "adabatch AdaBelief (foreach)": lambda p: AdaBelief(p, **ab, foreach=True, fused=False),
    }
    fused_possible = (
        _fused_ok(device) if device.type == "cpu" else adabelief_fused_cuda.triton_available()
    )
    if fused_possible:
        out["adabatch AdaBelief (fused)"] = lambda p: AdaBelief(p, **ab, fused=True)
    try:
        from adabelief_pytorch import AdaBelief as Ref

        def make_ref(p: list[torch.Tensor]) -> torch.optim.Optimizer:
            with contextlib.redirect_stdout(io.StringIO()):  # 0.2.1 prints on construction
                return Ref(p, **ab, weight_decouple=True, rectify=True, print_change_log=False)

        out["adabelief-pytorch 0.2.1"] = make_ref
    except ImportError:
        pass
    try:
        from pytorch_optimizer import AdaBelief as PO

        out["pytorch_optimizer AdaBelief (foreach)"] = lambda p: PO(
            p, **ab, weight_decouple=True, rectify=True, foreach=True
        )
    except ImportError:
        pass
    try:
        from torch_optimizer import AdaBelief as TO

        out["torch-optimizer AdaBelief"] = lambda p: TO(p, **ab, weight_decouple=True, rectify=True)
    except ImportError:
        pass
    out["torch Adam (for-loop)"] = lambda p: torch.optim.Adam(p, **HP, foreach=False)
    out["torch Adam (foreach)"] = lambda p: torch.optim.Adam(p, **HP, foreach=True)
    out["torch Adam (fused)"] = lambda p: torch.optim.Adam(p, **HP, fused=True)
    return out


def bench(
    shapes: list[Shape],
    threads: int,
    rounds: int,
    warmup: int = 6,
    seed: int = 0,
    device: torch.device | None = None,
    reps: int = 1,
) -> dict[str, float]:
    """Best step time in milliseconds per competitor (interleaved, shuffled rounds)."""
    device = device or torch.device("cpu")
    cuda = device.type == "cuda"
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(seed)
    init = [(torch.randn(s, generator=gen) * 0.05).to(device) for s in shapes]
    grads = [(torch.randn(s, generator=gen) * 1e-2).to(device) for s in shapes]
    opts: dict[str, torch.optim.Optimizer] = {}
    for name, make in competitors(device).items():
        params = [torch.nn.Parameter(t.clone()) for t in init]
        for p, g in zip(params, grads):
            p.grad = g  # shared, never modified by any competitor (weight_decay=0)
        opt = make(params)
        for _ in range(warmup):
            opt.step()
        opts[name] = opt
    best = {name: float("inf") for name in opts}
    order = list(opts)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(reps):
                opts[name].step()
            if cuda:
                torch.cuda.synchronize(device)
            best[name] = min(best[name], (time.perf_counter() - t0) / reps)
    return {name: 1e3 * t for name, t in best.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds (default 20)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--sets",
        nargs="+",
        default=["resnet18", "transformer"],
        choices=["resnet18", "transformer"],
    )
    parser.add_argument("--quick", action="store_true", help="5 rounds, resnet18 only")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument(
        "--ref", default="torch Adam (foreach)", help="the competitor the ratios are to"
    )
    parser.add_argument("--reps", type=int, default=None, help="steps per sample (CUDA: 20)")
    parser.add_argument("--block", type=int, default=None, help="fused CUDA: elements/program")
    parser.add_argument("--warps", type=int, default=None, help="fused CUDA: warps/program")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.sets = 5, ["resnet18"]
    device = torch.device(args.device)
    if args.block:
        adabelief_fused_cuda.BLOCK = args.block
    if args.warps:
        adabelief_fused_cuda.NUM_WARPS = args.warps
    if device.type == "cuda":
        args.threads = args.threads[:1]
    reps = args.reps or (20 if device.type == "cuda" else 1)
    sets = {"resnet18": resnet18_shapes(), "transformer": transformer_shapes()}
    columns: list[tuple[str, dict[str, float]]] = []
    for set_name in args.sets:
        shapes = sets[set_name]
        numel = sum(torch.Size(s).numel() for s in shapes)
        for threads in args.threads:
            where = torch.cuda.get_device_name(device) if device.type == "cuda" else "thr"
            label = f"{set_name} ({len(shapes)} tensors, {numel / 1e6:.2f}M), " + (
                where if device.type == "cuda" else f"{threads} {where}"
            )
            columns.append(
                (label, bench(shapes, threads, args.rounds, device=device, reps=reps))
            )
    print(
        f"torch {torch.__version__}, {device.type}, best of {args.rounds} interleaved rounds"
        f"{f' of {reps} steps' if reps > 1 else ''}; ratio to {args.ref}\n"
    )
    print("| optimizer | " + " | ".join(label for label, _ in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for name in columns[0][1]:
        cells = []
        for _, res in columns:
            ref = res[args.ref]
            cells.append(f"{res[name]:.1f} ms ({res[name] / ref:.2f}x)")
        print(f"| {name} | " + " | ".join(cells) + " |")
    compiled = adabelief_fused_cuda.compile_seconds()
    if compiled:
        print("\nfused CUDA AdaBelief, first launch (compile or cache load) per variant:")
        for variant, seconds in compiled.items():
            print(f"  {variant}: {seconds:.2f} s")


if __name__ == "__main__":
    main()
