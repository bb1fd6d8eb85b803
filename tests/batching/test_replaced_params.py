"""An estimator built before the model's parameters were replaced (``fully_shard`` after
``PerSampleStats(model)``, or new Parameter objects assigned) refuses its statistics: the old
parameters get no gradient, so ḡ would read as zero (G = 0 with the per-sample estimator, G =
V = 0 with the micro-batch one, before this check)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from adabatch.batching import MicroBatchStats, PerSampleStats

NEEDS = {"grad_sq_norm", "variance_trace"}
ROOT = Path(__file__).resolve().parents[2]
MATCH = r"parameters are no longer those it was built with"


def _estimator(model: nn.Module, which: int):
    """0: PerSampleStats; 1: MicroBatchStats (track='grad'); 2: MicroBatchStats (hooks)."""
    if which == 0:
        return PerSampleStats(model, needs=NEEDS)
    return MicroBatchStats(model, needs=NEEDS, track="hooks" if which == 2 else "grad")


def _step(model: nn.Module, est):
    torch.manual_seed(1)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with est.step() as scope:
        for sl in (slice(0, 4), slice(4, 8)):
            with scope.micro_batch(4):
                (F.cross_entropy(model(x[sl]), y[sl]) * 0.5).backward()
    return est.stats()


@pytest.mark.parametrize("which", [0, 1, 2], ids=["persample", "micro-grad", "micro-hooks"])
def test_replaced_parameter_is_refused(which):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    est = _estimator(model, which)
    assert _step(model, est).grad_sq_norm > 0  # measured before the replacement
    model.zero_grad()
    model[2].weight = nn.Parameter(model[2].weight.detach().clone())
    with pytest.raises(RuntimeError, match=MATCH):
        _step(model, est)


@pytest.mark.parametrize("which", [0, 1, 2], ids=["persample", "micro-grad", "micro-hooks"])
def test_replaced_layer_is_refused(which):
    """A layer replaced by a new one (its parameters leave the model): refused, although
    the old layer's own parameter entries are unchanged (ParamWatch also watches the path
    of modules down to them)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    est = _estimator(model, which)
    _step(model, est)
    model.zero_grad()
    model[2] = nn.Linear(5, 3)
    with pytest.raises(RuntimeError, match=MATCH):
        _step(model, est)


def test_moved_parameters_are_found_again():
    """Parameters moved into another module of the model are still the model's: the cheap
    check fails, the full one passes, and the watch learns the new places; the statistics
    (of MicroBatchStats, which reads p.grad only) equal those of an estimator built after
    the move."""
    from adabatch.batching.protocol import ParamWatch

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    est = _estimator(model, 1)
    moved = nn.Linear(5, 3)
    moved.weight, moved.bias = model[2].weight, model[2].bias
    model[2] = moved
    old_entries = est._watch._entries
    got = _step(model, est)
    assert est._watch._entries != old_entries  # found again
    model.zero_grad()
    want = _step(model, _estimator(model, 1))
    assert got.grad_sq_norm == want.grad_sq_norm and got.variance_trace == want.variance_trace
    watch = ParamWatch("x", model, list(model.parameters()))
    watch.check()
    assert any(owner is moved for owner, _, _ in watch._entries[0])
    # a tensor that is no module's entry: no cheap check, every check is the full one
    loose = ParamWatch("x", model, [nn.Parameter(torch.zeros(1))])
    assert loose._entries is None
    with pytest.raises(RuntimeError, match=MATCH):
        loose.check()


def test_built_before_fully_shard_is_refused(tmp_path):
    """One process, a 1-rank gloo group: each estimator built before ``fully_shard`` raises."""
    script = tmp_path / "before_shard.py"
    script.write_text(textwrap.dedent("""
        import torch, torch.distributed as dist
        from torch import nn
        from torch.distributed.fsdp import fully_shard
        from tests.batching.test_replaced_params import _estimator, _step, MATCH
        import re
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0,
                                world_size=1)
        for which in range(3):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
            est = _estimator(model, which)
            fully_shard(model[0]); fully_shard(model[2]); fully_shard(model)
            try:
                _step(model, est)
            except RuntimeError as e:
                assert re.search(MATCH, str(e)), str(e)
            else:
                raise AssertionError(f"estimator {which} measured a sharded model")
        dist.destroy_process_group()
        print("refused 3")
    """))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT),
                                         env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "refused 3" in proc.stdout, proc.stderr[-2000:]
