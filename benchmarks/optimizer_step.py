"""Time one optimizer step: this project's AdaBelief against the other AdaBeliefs and torch's Adam.

Two parameter sets:

- ``resnet18``: the 62 tensors (11.17M parameters) of ResNet-18 for 32x32 images and 10
  classes (3x3 stem, the usual four stages, 512->10 classifier), written out by hand.
- ``transformer``: a GPT-style decoder (vocabulary 32000, width 384, 12 layers, MLP 1536,
  learned positions for 512 tokens): 148 tensors, 33.8M parameters, a 12.3M-parameter
  embedding.

Every competitor owns its parameters and state; all share the same (random) gradients. Every
competitor first takes ``--warmup`` steps (default 10): AdaBelief's rectification takes the
cheaper SGD-like update for steps 1-5 (with beta2 = 0.999), so timing early steps would
flatter every rectified AdaBelief; the steady state is what a training run pays. Then the
competitors are timed in an interleaved, shuffled order, round after round; each reports its
median and its minimum (the least disturbed sample on a shared, noisy machine), and the ratios
to torch's foreach Adam are taken by median (``--stat min`` for the minima).

Besides the default AdaBelief (rectify=True, weight_decouple=True) the foreach path is timed
in the other configurations that take a different code path: ``rectify=False`` (the authors'
CNN setting), L2 weight decay (``weight_decouple=False``), decoupled weight decay and
``amsgrad``; the rows with weight decay use 5e-4 (the authors' CIFAR value).

Usage::

    python benchmarks/optimizer_step.py                  # both sets, 1 and 2 threads
    python benchmarks/optimizer_step.py --quick          # fewer rounds, resnet18 only
    python benchmarks/optimizer_step.py --rounds 30 --threads 1 --sets transformer
    python benchmarks/optimizer_step.py --rounds 15 --threads 1 --sets resnet18 \
        --only "foreach"              # the foreach rows (torch's foreach Adam always runs)
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
import statistics
import time
from collections.abc import Callable

import torch

from adabatch.optim import AdaBelief
from adabatch.optim.fused import cuda as fused_cuda
from adabatch.optim.fused import fused_available

Shape = tuple[int, ...]
HP = dict(lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0)
WD = 5e-4  # the weight decay of the configuration rows that use one (the authors' CIFAR value)
# (row label, AdaBelief options) of the foreach configurations besides the default
FOREACH_CONFIGS: list[tuple[str, dict[str, object]]] = [
    ("rectify=False", dict(rectify=False)),
    ("rectify=False, L2 wd", dict(rectify=False, weight_decouple=False, weight_decay=WD)),
    ("rectify=False, decoupled wd", dict(rectify=False, weight_decay=WD)),
    ("rectify=True, L2 wd", dict(weight_decouple=False, weight_decay=WD)),
    ("rectify=True, decoupled wd", dict(weight_decay=WD)),
    ("amsgrad, rectify=False", dict(amsgrad=True, rectify=False)),
    ("amsgrad, rectify=True", dict(amsgrad=True)),
]


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
    for label, options in FOREACH_CONFIGS:
        kw = {**ab, **options}
        out[f"adabatch AdaBelief (foreach, {label})"] = lambda p, kw=kw: AdaBelief(
            p, **kw, foreach=True, fused=False
        )
    fused_possible = (
        fused_available(device) if device.type == "cpu" else fused_cuda.triton_available()
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
    warmup: int = 10,
    seed: int = 0,
    device: torch.device | None = None,
    reps: int = 1,
    only: str | None = None,
) -> dict[str, list[float]]:
    """Step times in milliseconds per competitor, one per round (interleaved, shuffled
    rounds, after ``warmup`` steps of every competitor); ``only``: a substring the names of
    the competitors to time must contain (torch's foreach Adam, the reference, always runs)."""
    device = device or torch.device("cpu")
    cuda = device.type == "cuda"
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(seed)
    init = [(torch.randn(s, generator=gen) * 0.05).to(device) for s in shapes]
    grads = [(torch.randn(s, generator=gen) * 1e-2).to(device) for s in shapes]
    opts: dict[str, torch.optim.Optimizer] = {}
    for name, make in competitors(device).items():
        if only is not None and only not in name and name != "torch Adam (foreach)":
            continue
        params = [torch.nn.Parameter(t.clone()) for t in init]
        for p, g in zip(params, grads):
            p.grad = g  # shared, never modified by any competitor (weight_decay=0)
        opt = make(params)
        for _ in range(warmup):
            opt.step()
        opts[name] = opt
    times: dict[str, list[float]] = {name: [] for name in opts}
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
            times[name].append(1e3 * (time.perf_counter() - t0) / reps)
    return times


def table(columns: list[tuple[str, dict[str, list[float]]]], ref: str, stat: str) -> str:
    """A markdown table: per competitor and column, median / min in ms and the ratio."""
    pick = statistics.median if stat == "median" else min
    lines = [
        "| optimizer | " + " | ".join(label for label, _ in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for name in columns[0][1]:
        cells = []
        for _, res in columns:
            samples, base = res[name], pick(res[ref])
            cells.append(
                f"{statistics.median(samples):.1f} / {min(samples):.1f} ms "
                f"({pick(samples) / base:.2f}x)"
            )
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds (default 20)")
    parser.add_argument(
        "--warmup", type=int, default=10, help="untimed steps per competitor first (default 10)"
    )
    parser.add_argument(
        "--stat", default="median", choices=["median", "min"], help="what the ratios compare"
    )
    parser.add_argument("--only", default=None, help="time only competitors whose name has this")
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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.rounds, args.sets = 5, ["resnet18"]
    device = torch.device(args.device)
    if args.block:
        fused_cuda.BLOCK = args.block
    if args.warps:
        fused_cuda.NUM_WARPS = args.warps
    if device.type == "cuda":
        args.threads = args.threads[:1]
    reps = args.reps or (20 if device.type == "cuda" else 1)
    sets = {"resnet18": resnet18_shapes(), "transformer": transformer_shapes()}
    columns: list[tuple[str, dict[str, list[float]]]] = []
    for set_name in args.sets:
        shapes = sets[set_name]
        numel = sum(torch.Size(s).numel() for s in shapes)
        for threads in args.threads:
            where = torch.cuda.get_device_name(device) if device.type == "cuda" else "thr"
            label = f"{set_name} ({len(shapes)} tensors, {numel / 1e6:.2f}M), " + (
                where if device.type == "cuda" else f"{threads} {where}"
            )
            times = bench(
                shapes, threads, args.rounds, args.warmup, device=device, reps=reps,
                only=args.only,
            )  # fmt: skip
            columns.append((label, times))
    print(
        f"torch {torch.__version__}, {device.type}, {args.warmup} warm-up steps, then "
        f"{args.rounds} interleaved rounds{f' of {reps} steps' if reps > 1 else ''}; "
        f"median / min, ratio of the {args.stat}s to {args.ref}\n"
    )
    print(table(columns, args.ref, args.stat))
    compiled = fused_cuda.compile_seconds()
    if compiled:
        print("\nfused CUDA AdaBelief, first launch (compile or cache load) per variant:")
        for variant, seconds in compiled.items():
            print(f"  {variant}: {seconds:.2f} s")


if __name__ == "__main__":
    main()
