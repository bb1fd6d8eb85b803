"""The accelerate loop of the tests (also run by ``accelerate launch``: ``python -m``-style
script arguments ``OUT STEPS ESTIMATOR``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from adabatch.integrations.accelerate import AdaptiveBatch

if __package__ in (None, ""):  # run as a script by accelerate launch
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.integrations import _common as c


def run(steps: int, estimator: str = "per-sample", *, save_at: int | None = None,
        save_dir: str | None = None, resume: str | None = None) -> dict[str, Any]:
    """``steps`` global steps; ``save_at``: save_state after that many steps (and stop);
    ``resume``: load_state first. Returns this process's micro-batches per step, the
    decisions and the weights."""
    accelerator = Accelerator(cpu=True)
    net = c.model()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    model, opt = accelerator.prepare(net, opt)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model.register_comm_hook(None, c.counting_hook)
    controller = c.controller()
    adaptive = AdaptiveBatch(accelerator, model, controller, c.Indexed(), micro_batch=c.MICRO,
                             seed=c.SEED, estimator=estimator)
    if resume is not None:
        accelerator.load_state(resume)
    batches: list[list[int]] = []
    while controller.step < steps:
        mine: list[int] = []
        for x, y, idx in adaptive.micro_batches():
            adaptive.backward(F.cross_entropy(model(x), y))
            mine += idx.tolist()
        opt.step()
        opt.zero_grad()
        adaptive.end_step()
        batches.append(mine)
        if save_at is not None and controller.step == save_at:
            accelerator.save_state(save_dir)
            break
    return {"rank": accelerator.process_index, "batches": batches,
            "history": controller.history, "params": c.flat_params(net),
            "allreduces": c.ALLREDUCES[0]}


if __name__ == "__main__":
    out, steps, est = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    result = run(steps, est)
    Path(f"{out}.{result['rank']}.json").write_text(json.dumps(result))
