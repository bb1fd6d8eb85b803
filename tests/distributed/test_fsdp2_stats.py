"""Both estimators under FSDP2 (fully_shard) with 2 processes (gloo, CPU) against 1 process.

tests/distributed/_fsdp2_stats_worker.py runs float64 models under torchrun (one run checks
every case): three steps of 16 samples, 8 per rank in micro-batches of unequal sizes (step 1
with gradient sync after each micro-batch, the others accumulating without sync). The same
micro-batches in one process without FSDP, and under DDP, give the same G, V, W, O, v_j and
ḡ (MicroBatchStats: every (rank, micro-batch) pair is one micro-batch; PerSampleStats: every
sample), also after optimizer steps, for an MLP with uneven shards, a model whose Embedding
and output Linear share one Parameter, one with frozen parameters, charlm and a block with
nn.MultiheadAttention (recomputed by PerSampleStats); the batch tests and the
CriticalBatchSize/Goodput policies read them as in one process. The statistics' own
communication per measured step is 48 bytes all-reduced, plus one reduce-scatter of the
parameters' size for the coordinate sums and one all-gather of it for the inner products
(docs/fsdp.md, "Communication of the statistics"). Under bfloat16 compute
(MixedPrecisionPolicy) the statistics stay float32 and equal the float64 ones to rounding.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from adabatch.batching import MicroBatchStats
from adabatch.batching.batch_tests import CoordinateNormTest, NormTest
from tests.distributed._fsdp2_stats_worker import (
    ESTIMATORS,
    MODELS,
    NEEDS,
    SIZES,
    data,
    make_estimator,
    make_model,
    run_steps,
    train,
)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
WORKER = str(Path(__file__).with_name("_fsdp2_stats_worker.py"))
RTOL = 1e-10


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("fsdp2") / "result.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT),
                                         env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", WORKER, str(out)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def one_process() -> list[dict]:
    """The same steps in one process: rank 0's micro-batches, then rank 1's, of the global
    batch of 16, the loss scaled by n_k/16."""
    model = make_model()
    est = MicroBatchStats(model, needs=NEEDS, track="hooks")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs, ys = data()
    steps = []
    for step, sizes in enumerate(SIZES):
        opt.zero_grad()
        with est.step() as scope:
            start = 0
            for n in sizes[0] + sizes[1]:
                with scope.micro_batch(n):
                    sl = slice(start, start + n)
                    loss = nn.functional.mse_loss(model(xs[step, sl]), ys[step, sl]) * n / 16
                    loss.backward()
                start += n
        stats = est.stats()
        steps.append({"batch_size": stats.batch_size, "grad_sq_norm": stats.grad_sq_norm,
                      "variance_trace": stats.variance_trace,
                      "coord_variance": [v.tolist() for v in stats.coord_variance],
                      "mean_grad": [g.tolist() for g in stats.mean_grad],
                      "norm_ratio": NormTest(0.5).ratio(stats),
                      "coord_ratio": {how: CoordinateNormTest(0.5, how).ratio(stats)
                                      for how in ("max", "mean")}})
        opt.step()
    return steps


def _close(a, b) -> None:
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    assert ta.shape == tb.shape
    assert float((ta - tb).abs().max()) <= RTOL * float(tb.abs().max())


@pytest.mark.parametrize("run", ["steps", "ddp_steps"])
def test_fsdp2_and_ddp_statistics_equal_one_process(fsdp2, run):
    """Every (rank, micro-batch) pair is one micro-batch: also the last step, with one
    micro-batch per rank, has M = 2."""
    ref = one_process()
    assert len(fsdp2[run]) == len(ref) == len(SIZES)
    for got, want in zip(fsdp2[run], ref):
        assert got["batch_size"] == want["batch_size"] == 16
        for name in ("grad_sq_norm", "variance_trace"):
            assert got[name] == pytest.approx(want[name], rel=RTOL)
        assert want["variance_trace"] > 0
        for name in ("coord_variance", "mean_grad"):
            for a, b in zip(got[name], want[name], strict=True):
                _close(a, b)


def test_fsdp2_communication_per_measured_step(fsdp2):
    numel = fsdp2["param_numel"]
    for step, counted in enumerate(fsdp2["bytes"]):
        assert counted["stats_all_reduce"] == 6 * 8  # [N, M, P, 0, 0, G] in float64
        assert counted["stats_reduce_scatter"] == numel * 8  # C_j once, float64 parameters
        # FSDP2's reduce-scatter: once per micro-batch with sync (step 0), once without
        per_call = counted["fsdp_reduce_scatter"] / (2 if step == 0 else 1)
        assert numel * 8 <= per_call  # FSDP2 pads the uneven shards
    once = fsdp2["bytes"][1]["fsdp_reduce_scatter"]
    assert [b["fsdp_reduce_scatter"] for b in fsdp2["bytes"]] == [2 * once, once, once]


def test_fsdp2_refuses_what_would_be_wrong(fsdp2):
    r = fsdp2["refusals"]
    # today's default (track="grad") would read the shards of the mean over ranks
    assert r["track_grad"].startswith("ValueError") and "track='hooks'" in r["track_grad"]
    assert r["no_reduce"].startswith("ValueError") and "reduce=" in r["no_reduce"]
    assert r["params_list"].startswith("ValueError") and "module" in r["params_list"]
    assert (r["persample_no_reduce"].startswith("ValueError")
            and "reduce=" in r["persample_no_reduce"])
    for kind in ("micro", "persample"):  # G would count every shard once per replica
        assert r[f"hsdp_{kind}"].startswith("ValueError") and "HSDP" in r[f"hsdp_{kind}"]
    assert all("FSDP2" in msg for msg in r.values())


def test_fsdp2_norm_and_coordinate_tests_equal_one_process(fsdp2):
    """The norm test reads scalars (the same on every rank); the coordinate test reduces
    each rank's shard of v_j/(η²ḡ_j²) over the ranks (max, mean) without gathering them,
    and refuses the quantile (it would gather every v_j)."""
    for got, want in zip(fsdp2["steps"], one_process(), strict=True):
        assert got["ratios"]["norm"] == pytest.approx(want["norm_ratio"], rel=RTOL)
        for how in ("max", "mean"):
            assert want["coord_ratio"][how] > 0
            assert got["ratios"][f"coord_{how}"] == pytest.approx(want["coord_ratio"][how],
                                                                  rel=RTOL)
        quantile = got["ratios"]["coord_('quantile', 0.9)"]
        assert quantile.startswith("ValueError") and "FSDP2" in quantile


def _one_process_case(name: str, kind: str) -> tuple[list[dict], list]:
    """The worker's steps of one case in this process, without FSDP (all 16 samples)."""
    model = make_model(name)
    est = make_estimator(kind, model)
    records, _, policies = run_steps(
        train(model, est, lambda *a: contextlib.nullcontext(), name), lambda t: t)
    return records, policies


SCALARS = ("grad_sq_norm", "variance_trace", "ip_variance", "orth_variance")
ATTENTION = ("charlm", "attn", "attn_unit")  # the models with an attention key bias


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("kind", ESTIMATORS)
def test_every_statistic_equals_one_process(fsdp2, name, kind):
    """Every statistic, batch test and policy: FSDP2 = DDP = one process, for both
    estimators, with tied and frozen parameters. The coordinate test's quantile is refused
    under FSDP2 only (it would gather every v_j). The coordinate ratios of the models with
    attention are not compared: the key bias has ḡ_j = 0 in exact arithmetic (softmax
    ignores a shift of all scores), so v_j/(η²ḡ_j²) is rounding noise there, in one process
    too; their v_j and ḡ are compared like every other model's."""
    ref, ref_policies = _one_process_case(name, kind)
    case = fsdp2["cases"][f"{name}/{kind}"]
    for run in ("fsdp2", "ddp"):
        assert len(case[run]) == len(ref) == len(SIZES)
        for got, want in zip(case[run], ref):
            assert got["batch_size"] == want["batch_size"] == 16
            for k in SCALARS:
                assert want[k] > 0
                assert got[k] == pytest.approx(want[k], rel=RTOL), (run, k)
            for k in ("coord_variance", "mean_grad"):
                for a, b in zip(got[k], want[k], strict=True):
                    _close(a, b)
            for k, value in want["ratios"].items():
                if run == "fsdp2" and "quantile" in k:
                    assert got["ratios"][k].startswith("ValueError")
                    assert "FSDP2" in got["ratios"][k]
                elif value is None:
                    assert got["ratios"][k] is None
                elif not (name in ATTENTION and k.startswith("coord")):
                    assert got["ratios"][k] == pytest.approx(value, rel=RTOL), (run, k)
        for a, b in zip(case["policies"][run], ref_policies, strict=True):
            assert a[0] == b[0]
            assert a[1:] == pytest.approx(b[1:], rel=RTOL)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("kind", ESTIMATORS)
def test_communication_of_every_need(fsdp2, name, kind):
    """Per measured step, every need of both estimators: 48 bytes all-reduced, one
    reduce-scatter of the trainable parameters' bytes (coordinate sums) and one all-gather
    of them (ḡ for the inner products); against FSDP2's own reduce-scatter per micro-batch
    (step 0 syncs each of its 2 micro-batches, later steps once). The norm needs alone:
    48 bytes."""
    case = fsdp2["cases"][f"{name}/{kind}"]
    numel = case["param_numel"]
    for step, counted in enumerate(case["bytes"]):
        assert counted["stats_all_reduce"] == 6 * 8
        assert counted["stats_reduce_scatter"] == numel * 8
        assert counted["stats_all_gather"] == numel * 8
        per_sync = counted["fsdp_reduce_scatter"] / (2 if step == 0 else 1)
        assert numel * 8 <= per_sync
    # the estimators add no FSDP2 all-gather, except PerSampleStats around the layers it
    # recomputes (nn.MultiheadAttention): their FSDP modules (attn's block; attn_unit's block
    # and attention) are unsharded after each pass and once more for the inner products
    added = [a["fsdp_all_gather"] - b["fsdp_all_gather"] for a, b in zip(
        fsdp2["cases"][f"{name}/persample"]["bytes"], fsdp2["cases"][f"{name}/micro"]["bytes"])]
    block = sum(p.numel() for p in make_model("attn").block.parameters()) * 8
    passes = [len(sizes[0]) for sizes in SIZES]
    recomputing = name in ("attn", "attn_unit")
    assert added == ([(n + 1) * block for n in passes] if recomputing else [0, 0, 0])
    for kind_bytes in fsdp2["norm_only"].values():
        for counted in kind_bytes:
            assert counted["stats_all_reduce"] == 6 * 8
            assert counted["stats_reduce_scatter"] == counted["stats_all_gather"] == 0


@pytest.mark.parametrize("kind", ESTIMATORS)
def test_bfloat16_compute_keeps_float32_statistics(fsdp2, kind):
    """MixedPrecisionPolicy(param_dtype=bfloat16): the hooks see bfloat16 gradients of the
    unsharded layers; the coordinate sums accumulate in float32 (the sharded parameters'
    dtype) and every statistic is the float64 one-process value to bfloat16 rounding."""
    ref, _ = _one_process_case("mlp", kind)
    for got, want in zip(fsdp2["mixed"][kind], ref, strict=True):
        assert got["dtypes"] == ["torch.float32"] * 4
        for k in SCALARS:
            assert got[k] == pytest.approx(want[k], rel=5e-2), k
        for k in ("coord_variance", "mean_grad"):
            for a, b in zip(got[k], want[k], strict=True):
                ta, tb = torch.tensor(a), torch.tensor(b)
                assert float((ta - tb).abs().max()) <= 5e-2 * float(tb.abs().max())
