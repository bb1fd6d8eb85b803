"""The floor rows of benchmarks/test_overhead.py compute the real statistics (the README's
"Against the floors" compares the estimators with them): ip-floor's G and W, norm-floor's and
coord-floor's G, V and v_j, aip-floor's G, W and O equal PerSampleStats' in float64, on the
benchmark's CNN and MLP, at a batch that takes the Gram forms and one that takes the direct
products in several chunks."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    yield from load_benchmark(ROOT / "benchmarks" / "test_overhead.py", "test_overhead_bench")


@pytest.mark.parametrize("model", ["cnn", "mlp"])
@pytest.mark.parametrize("check", ["check_ip_floor", "check_stat_floors", "check_aip_floor"])
def test_floor_rows_match_the_estimator(bench, model, check):
    getattr(bench, check)(model)


def test_a_wrong_floor_is_caught(bench, monkeypatch):
    """The check is not vacuous: an aip-floor that leaves out the biases' norms fails it."""
    real = bench._aip_linear

    def no_bias_norm(m, a, d, b):
        t, nsq = real(m, a, d, b)
        return t, nsq - (d.square().sum() if b * sum(m.weight.shape) >= m.weight.numel()
                         else 0.0)

    monkeypatch.setattr(bench, "_aip_linear", no_bias_norm)
    with pytest.raises(AssertionError, match="aip-floor and PerSampleStats disagree"):
        bench.check_aip_floor("mlp")


def test_baseline_loads_another_source_tree(bench, monkeypatch):
    """``--baseline DIR`` (an interleaved before/after): the estimators of the adabatch tree in
    DIR are loaded beside the current ones, which stay in sys.modules; here DIR is this very
    checkout, so the two versions must give the same statistics while being other classes."""
    import sys

    import torch
    import torch.nn.functional as F

    from adabatch.batching import estimators

    monkeypatch.setattr(bench, "BASE", {})
    monkeypatch.setattr(bench, "BASE_DIR", [])
    before = {k: v for k, v in sys.modules.items() if k.startswith("adabatch")}
    bench._load_baseline(str(ROOT))
    assert {k: v for k, v in sys.modules.items() if k.startswith("adabatch")} == before
    base = bench.BASE["PerSampleStats"]
    assert base is not estimators.PerSampleStats and base.__name__ == "PerSampleStats"
    assert bench.BASE["MicroBatchStats"] is not estimators.MicroBatchStats
    out = []
    for cls in (estimators.PerSampleStats, base):
        torch.manual_seed(0)
        model = bench.make_model("mlp")
        x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
        est = cls(model, needs=bench.NEEDS["aip"])
        with est.measure():
            F.cross_entropy(model(x), y).backward()
        s = est.stats()
        out.append((s.grad_sq_norm, s.ip_variance, s.orth_variance))
    assert out[0] == out[1]
    with pytest.raises(SystemExit, match="no adabatch package"):
        bench._load_baseline(str(ROOT / "docs"))


def test_gap_table_pairs_rounds(bench):
    """The "above the floors" table: per round (kind − floor) / plain, median over the rounds,
    for the pairs of ``FLOORS`` whose columns were timed. Here, over three rounds, norm is
    0.1, 0.2 and 0.5 plain steps above ``floor`` (median +0.20×), while the median of its
    times minus the median of floor's is 0.5 plain steps: the gaps are paired by round."""
    key = ("mlp", 32)
    times = {(*key, "plain"): [1.0, 2.0, 1.0], (*key, "plain×4"): [4.0, 4.0, 4.0],
             (*key, "floor"): [1.0, 2.0, 1.0], (*key, "norm"): [1.1, 2.4, 1.5],
             (*key, "micro-hooks"): [4.4, 4.8, 4.0], (*key, "micro-floor"): [4.0, 4.0, 4.0]}
    kinds = ["plain", "floor", "norm", "plain×4", "micro-hooks", "micro-floor"]
    out = bench.gap_table(times, ["mlp"], [32], kinds).splitlines()
    assert out[0] == "| model | b | norm − floor | micro-hooks − micro-floor |"
    assert out[2] == "| mlp | 32 | +0.20× | +0.10× |"
    assert bench.gap_table(times, ["mlp"], [32], ["plain", "norm"]) == ""


def test_device_flag_names_what_is_wrong(bench):
    """``--device``: cpu passes; a device the benchmark does not run on, or CUDA where there
    is none, exits with the reason (before any timing)."""
    import torch

    assert bench.check_device("cpu") == "cpu"
    with pytest.raises(SystemExit, match="--device mps: the benchmark runs on cpu or cuda"):
        bench.check_device("mps")
    with pytest.raises(SystemExit, match="--device gpu: not a torch device"):
        bench.check_device("gpu")
    if torch.cuda.is_available():
        assert bench.check_device("cuda") == "cuda"
        n = torch.cuda.device_count()
        with pytest.raises(SystemExit, match=f"this machine has {n} CUDA device"):
            bench.check_device(f"cuda:{n}")
    else:
        with pytest.raises(SystemExit, match="--device cuda: CUDA is not available here"):
            bench.check_device("cuda")
