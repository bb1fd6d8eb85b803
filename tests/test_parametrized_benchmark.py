"""benchmarks/parametrized_overhead.py runs every configuration and builds its table."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


def test_parametrized_benchmark_runs_every_configuration():
    """benchmarks/parametrized_overhead.py: every network and kind runs a step with finite
    statistics, and its table has a row per network (no timing asserted)."""
    import math

    gen = load_benchmark(ROOT / "benchmarks" / "parametrized_overhead.py", "parametrized_bench")
    bench = next(gen)
    try:
        for wrap in bench.WRAPS:
            for kind in bench.KINDS:
                out = bench.make_step(wrap, kind, 4)()
                if kind in bench.NEEDS:
                    assert out.is_finite() and out.batch_size == 4
                elif kind == "vmap":
                    assert math.isfinite(out) and out > 0
        # each cell is the median per-round ratio to the same network's plain step (2x and
        # 3x here), the plain cell its best round
        times = {(w, k): [0.001, 0.002] if k == "plain" else [0.002, 0.006]
                 for w in bench.WRAPS for k in bench.KINDS}
        rows = bench.table(times).splitlines()
        assert len(rows) == 2 + len(bench.WRAPS)
        assert rows[2] == "| linear | 1.00 ms | 2.50× | 2.50× | 2.50× |"
    finally:
        gen.close()
