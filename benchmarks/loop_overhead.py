"""Overhead of the training program's loop against a minimal hand-written loop.

Both do the same work per step: the same model (initialised from the same seed), the same
data (digits, whole tensors, index gathers), the same optimizer (AdaGrad-Norm), a fixed batch
size, no statistics, one ``loss.item()`` per step. The trainer additionally runs its batch
policy (ConstantSchedule), the resumable sampler, the estimator protocol's step and
micro-batch contexts (a no-op estimator here: the trainer has one path for every estimator),
one ``apply_lr`` per step, the per-step metrics row (``metrics.jsonl``) and the progress
bookkeeping; checkpoints and evaluation are off (``--checkpoint-every 0``
writes one at the end, outside the timed steps).

Trainer time: from its metrics rows, ``time`` of the last step minus ``time`` of the first
(so setup, data loading and the final evaluation are excluded). Hand-written time: the same
steps 2..N. The two are interleaved (alternating order), each round runs N steps; every step
sees the same data in every round, so each step's best time over the rounds is taken and
summed (best-of-many at step granularity, robust on a shared, noisy machine). Goal: trainer
<= 1.1x the hand-written loop.

The trainer gathers batches with ``index_select`` and clears gradients with ``p.grad = None``
(the same results as ``x[idx]`` and ``optimizer.zero_grad()``, cheaper). The last column
compares it with a hand-written loop that uses the same two tricks ("tuned"), so what is left
there is the trainer's own bookkeeping (batch policy, sampler, step contexts, metrics row).

    python benchmarks/loop_overhead.py [--rounds 7] [--steps 200] [--batch 128] [--threads 1]
"""

from __future__ import annotations

import argparse
import itertools
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from adabatch.optim import create
from adabatch.train.config import build_config
from adabatch.train.data import load_dataset
from adabatch.train.loop import train
from adabatch.train.models import create_model


def trainer_times(model: str, steps: int, batch: int, workdir: Path, i: int) -> list[float]:
    cfg = build_config({
        "model": model, "batch_test": "none", "initial_batch": batch, "max_batch": batch,
        "steps": steps, "checkpoint_every": 0, "eval_every": 0, "quiet": True, "plots": False,
        "out": str(workdir / f"{model}-{i}"),
    })
    result = train(cfg)
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    times = [r["time"] for r in rows if not r.get("eval")]
    return [b - a for a, b in itertools.pairwise(times)]  # steps 2..N


def manual_times(model_name: str, steps: int, batch: int, tuned: bool = False) -> list[float]:
    data = load_dataset("digits")
    torch.manual_seed(0)
    model = create_model(model_name, data.input_shape, data.num_classes)
    opt = create("adagradnorm", model.parameters())
    params = list(model.parameters())
    x_all, y_all = data.x_train, data.y_train
    n = len(x_all)
    gen = torch.Generator().manual_seed(0)
    perm, pos = torch.randperm(n, generator=gen), 0
    stamps = []
    for _ in range(steps):
        if pos + batch > n:
            perm = torch.cat([perm[pos:], torch.randperm(n, generator=gen)])
            pos = 0
        idx = perm[pos:pos + batch]
        pos += batch
        if tuned:
            x, y = x_all.index_select(0, idx), y_all.index_select(0, idx)
            for p in params:
                p.grad = None
        else:
            x, y = x_all[idx], y_all[idx]
            opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        loss.item()
        stamps.append(time.perf_counter())
    return [b - a for a, b in itertools.pairwise(stamps)]  # steps 2..N


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", nargs="+", default=["mlp", "cnn"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, "
          f"{args.steps} steps per round, best of {args.rounds} rounds (interleaved)")
    print("| model | hand-written (ms/step) | trainer (ms/step) | trainer / hand-written "
          "| tuned hand-written (ms/step) | trainer / tuned |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            runs: dict[str, list[list[float]]] = {"t": [], "m": [], "tuned": []}
            for r in range(args.rounds):
                order = ("t", "m", "tuned")[r % 3:] + ("t", "m", "tuned")[:r % 3]
                for who in order if r % 2 == 0 else order[::-1]:
                    if who == "t":
                        runs[who].append(trainer_times(model, args.steps, args.batch,
                                                       Path(tmp), r))
                    else:
                        runs[who].append(manual_times(model, args.steps, args.batch,
                                                      tuned=who == "tuned"))
            # the same step (same data) in every round: its best time over the rounds
            best = {k: sum(min(col) for col in zip(*v)) for k, v in runs.items()}
            per = args.steps - 1
            print(f"| {model} | {1e3 * best['m'] / per:.3f} | {1e3 * best['t'] / per:.3f} | "
                  f"{best['t'] / best['m']:.3f} | {1e3 * best['tuned'] / per:.3f} | "
                  f"{best['t'] / best['tuned']:.3f} |")


if __name__ == "__main__":
    main()
