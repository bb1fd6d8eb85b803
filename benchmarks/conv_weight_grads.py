"""Per-sample conv weight gradients against the batch weight gradient they replace.

Run (about a minute on 2 cores)::

    python benchmarks/conv_weight_grads.py                  # b = 32, 128, 512
    python benchmarks/conv_weight_grads.py --sizes 128 --rounds 20

The layers are the two convolutions of the AdAdaGrad authors' MNIST CNN (see
``benchmarks/test_overhead.py``): conv1 1 -> 16 channels on 28 x 28 and conv2 16 -> 32 channels
on 14 x 14, both 5 x 5 with padding 2. For each batch size and layer it times, in shuffled order
every round, the backend's batch weight gradient (``convolution_backward``, weight only) and
the per-sample weight gradients the way :class:`adabatch.batching.PerSampleStats` can take them:

- ``grouped/c``: one grouped ``convolution_backward`` whose groups are the samples, in chunks of
  c samples (the estimator's path from 5 input channels per group; at most
  ``PerSampleTuning.grouped_max_chunk`` per chunk and within its memory budget);
- ``im2col/c``: the unfolded input and one batched matrix product, in chunks of c samples
  (its path up to ``PerSampleTuning.im2col_max_cin`` = 4 input channels per group).

Each cell is the best of the rounds, with its ratio to the batch weight gradient. The
estimator's fused convolution (``fuse_conv_grad=True``) skips the batch weight gradient, so a
ratio r costs r - 1 batch weight gradients more than a plain backward.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from adabatch.allocator import keep_freed_memory

LAYERS = {"conv1": (1, 16, 28), "conv2": (16, 32, 14)}  # in, out channels, spatial size
K, PAD = 5, 2


def _batch(d: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    torch.ops.aten.convolution_backward(d, x, w, None, [1, 1], [PAD, PAD], [1, 1], False, [0, 0],
                                        1, [False, True, False])


def _grouped(d: torch.Tensor, x: torch.Tensor, w: torch.Tensor, chunk: int) -> None:
    c_out, c_in = w.shape[:2]
    for lo in range(0, len(x), chunk):
        xc, dc = x[lo:lo + chunk], d[lo:lo + chunk]
        n = len(xc)
        torch.ops.aten.convolution_backward(
            dc.reshape(1, n * c_out, *dc.shape[2:]), xc.reshape(1, n * c_in, *xc.shape[2:]),
            w.new_empty(n * c_out, c_in, K, K), None, [1, 1], [PAD, PAD], [1, 1], False,
            [0, 0], n, [False, True, False])


def _im2col(d: torch.Tensor, x: torch.Tensor, w: torch.Tensor, chunk: int) -> None:
    c_out, c_in = w.shape[:2]
    for lo in range(0, len(x), chunk):
        xc = F.pad(x[lo:lo + chunk], (PAD,) * 4)
        n = len(xc)
        u = xc.unfold(2, K, 1).unfold(3, K, 1).permute(0, 1, 4, 5, 2, 3)
        u = u.reshape(n, c_in * K * K, -1)
        torch.bmm(d[lo:lo + chunk].reshape(n, c_out, -1), u.transpose(1, 2))


def configs(b: int) -> dict[str, Callable[[], None]]:
    out: dict[str, Callable[[], None]] = {}
    for name, (c_in, c_out, size) in LAYERS.items():
        x = torch.randn(b, c_in, size, size)
        d = torch.randn(b, c_out, size, size)
        w = torch.randn(c_out, c_in, K, K)
        out[f"{name} batch"] = lambda d=d, x=x, w=w: _batch(d, x, w)
        for chunk in sorted({c for c in (16, 32, 64, 128, 512) if c <= b} | {b}):
            out[f"{name} grouped/{chunk}"] = lambda d=d, x=x, w=w, c=chunk: _grouped(d, x, w, c)
            out[f"{name} im2col/{chunk}"] = lambda d=d, x=x, w=w, c=chunk: _im2col(d, x, w, c)
    return out


def best_times(fns: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    for f in fns.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    for _ in range(rounds):
        random.shuffle(order)
        for k in order:
            fns[k]()  # untimed: the previous configuration left other tensors in the caches
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="32,128,512")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    random.seed(0)
    torch.manual_seed(0)
    print("| b | layer | method | time | ratio to batch |")
    print("|---|---|---|---|---|")
    for b in (int(v) for v in args.sizes.split(",")):
        best = best_times(configs(b), args.rounds)
        for name in LAYERS:
            ref = best[f"{name} batch"]
            for k, t in best.items():
                if k.startswith(name + " "):
                    print(f"| {b} | {name} | {k.split(' ', 1)[1]} | {t * 1e3:.2f} ms | "
                          f"{t / ref:.2f}x |", flush=True)
    print(f"torch {torch.__version__}, {args.threads} threads, best of {args.rounds} rounds")


if __name__ == "__main__":
    main()
