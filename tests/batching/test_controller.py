"""BatchSizeController and the fixed schedules."""

from __future__ import annotations

import copy
import math
import pickle
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from adabatch.batching.batch_tests import NormTest
from adabatch.batching.controller import (
    BatchSizeController,
    ConstantSchedule,
    LinearSchedule,
    StagewiseSchedule,
    apply_lr,
)
from adabatch.batching.stats import GradientStats


def norm_stats(b: int, V: float, G: float = 1.0) -> GradientStats:
    return GradientStats(b, grad_sq_norm=G, variance_trace=V)


def required_for(V: float, G: float = 1.0, eta: float = 1.0) -> int:
    return max(1, math.ceil(V / (eta**2 * G)))


# --------------------------------------------------------------------------------------------
# decisions
# --------------------------------------------------------------------------------------------


def test_grows_to_required_rounded_and_clamped():
    c = BatchSizeController(NormTest(1.0), 8, 64, granularity=8)
    assert c.batch_size == 8 and c.needs == NormTest(1.0).needs
    assert c.update(norm_stats(8, V=5.0)) == 8      # passes: stays
    assert c.update(norm_stats(8, V=17.0)) == 24    # needs 17 -> rounded up to 24
    assert c.update(norm_stats(24, V=3.0)) == 24    # never decreases
    assert c.update(norm_stats(24, V=1e9)) == 64    # clamped to the maximum
    assert c.step == 4 and c.samples == 8 + 8 + 24 + 24
    rows = c.history
    assert [r["batch_size"] for r in rows] == [8, 8, 24, 24]
    assert [r["new_batch_size"] for r in rows] == [8, 24, 24, 64]
    assert [r["required"] for r in rows] == [5, 17, 3, 1_000_000_000]
    assert [r["passed"] for r in rows] == [True, False, True, False]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert [r["samples"] for r in rows] == [8, 16, 40, 64]
    assert rows[1]["statistic"] == pytest.approx(17.0 / 8)


def test_infinite_requirement_jumps_to_maximum():
    class Inf(NormTest):
        def __call__(self, stats):
            return math.inf

    c = BatchSizeController(Inf(1.0), 4, 40, granularity=4)
    assert c.update(norm_stats(4, V=1.0)) == 40
    assert c.history[-1]["required"] == math.inf and c.history[-1]["passed"] is False


@settings(max_examples=50, deadline=None)
@given(g=st.integers(1, 8), k0=st.integers(1, 5), extra=st.integers(0, 40),
       Vs=st.lists(st.floats(0.0, 500.0), min_size=1, max_size=20))
def test_invariants(g, k0, extra, Vs):
    initial, maximum = g * k0, g * (k0 + extra)
    c = BatchSizeController(NormTest(1.0), initial, maximum, granularity=g)
    prev = initial
    for V in Vs:
        b = c.batch_size
        stats = norm_stats(b, V) if c.wants_stats() else None
        new = c.update(stats)
        assert prev <= new <= maximum and new % g == 0
        if stats is not None:
            # the smallest admissible size that passes, unless clamped
            expected = min(maximum, max(b, g * math.ceil(required_for(V) / g)))
            assert new == expected
        prev = new


def test_interval_and_wants_stats():
    c = BatchSizeController(NormTest(1.0), 2, 100, interval=3)
    wants = []
    for _ in range(7):
        wants.append(c.wants_stats())
        c.update(norm_stats(c.batch_size, V=1.0) if wants[-1] else None)
    assert wants == [True, False, False, True, False, False, True]
    assert c.wants_stats(step=9) and not c.wants_stats(step=10)
    # statistics given on a non-test step are ignored
    before = c.batch_size
    assert c.update(norm_stats(before, V=1e6)) == before
    assert [r["step"] for r in c.history] == [0, 3, 6]


def test_no_statistics_wanted_at_maximum():
    c = BatchSizeController(NormTest(1.0), 2, 4)
    c.update(norm_stats(2, V=100.0))
    assert c.batch_size == 4 and not c.wants_stats()
    assert c.update(None) == 4


def test_missing_stats_on_test_step_raises_and_changes_nothing():
    c = BatchSizeController(NormTest(1.0), 2, 8)
    with pytest.raises(ValueError, match=r"update\(\) needs GradientStats on a test step"):
        c.update(None)
    assert c.step == 0 and c.samples == 0 and c.history == []


def test_undecidable_statistics_keep_size_count_and_warn_once():
    c = BatchSizeController(NormTest(1.0), 2, 8)
    with pytest.warns(RuntimeWarning, match=r"could not decide at step 0"):
        assert c.update(norm_stats(2, V=1.0, G=0.0)) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert c.update(norm_stats(2, V=math.nan)) == 2
        assert c.update(norm_stats(2, V=1.0, G=math.inf)) == 2
    assert c.warnings == 3
    assert [r["passed"] for r in c.history] == [None, None, None]
    assert c.update(norm_stats(2, V=5.0)) == 5  # decidable again
    assert c.warnings == 3


# --------------------------------------------------------------------------------------------
# learning-rate coupling
# --------------------------------------------------------------------------------------------


def _optimizer(lr=0.1):
    p = torch.nn.Parameter(torch.zeros(2))
    q = torch.nn.Parameter(torch.zeros(2))
    return torch.optim.SGD([{"params": [p]}, {"params": [q], "lr": 2 * lr}], lr=lr)


def _lrs(opt):
    return [float(g["lr"]) for g in opt.param_groups]


@pytest.mark.parametrize("mode,f", [("linear", lambda r: r), ("sqrt", math.sqrt)])
def test_lr_scaling(mode, f):
    """The controller keeps the factor; apply_lr is the one place that sets the rates."""
    opt = _optimizer(0.1)
    base = _lrs(opt)
    c = BatchSizeController(NormTest(1.0), 4, 64, lr_scaling=mode)
    c.update(norm_stats(4, V=3.0))  # passes: no change
    assert c.lr_factor == 1.0
    c.update(norm_stats(4, V=16.0))  # 4 -> 16
    c.update(norm_stats(16, V=40.0))  # 16 -> 40
    assert c.lr_factor == pytest.approx(f(40 / 4))
    assert _lrs(opt) == [0.1, 0.2]  # the controller never touches an optimizer
    apply_lr(opt, base, 1.0, c.lr_factor)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * f(10))
    assert opt.param_groups[1]["lr"] == pytest.approx(0.2 * f(10))


def test_apply_lr_composes_schedule_and_factor():
    """lr = base × schedule × factor, from the base rates every time (a step never compounds
    the previous one), exactly as the trainer computes it; and the factor composes with a
    scheduler that sets lr from its base_lrs."""
    opt = _optimizer(1.0)
    base = _lrs(opt)
    c = BatchSizeController(NormTest(1.0), 2, 8, lr_scaling="linear")
    c.update(norm_stats(2, V=8.0))     # ×4
    for _ in range(2):
        apply_lr(opt, base, 0.5, c.lr_factor)
        assert _lrs(opt) == [1.0 * 0.5 * 4.0, 2.0 * 0.5 * 4.0]
    apply_lr(opt, base, 0.3, 1.7)
    assert _lrs(opt) == [1.0 * 0.3 * 1.7, 2.0 * 0.3 * 1.7]  # left to right, bit for bit
    apply_lr(opt, base)
    assert _lrs(opt) == base
    with pytest.raises(ValueError, match=r"apply_lr: 1 base learning rates for 2 param"):
        apply_lr(opt, base[:1], 1.0, 1.0)
    opt2 = _optimizer(1.0)
    c2 = BatchSizeController(NormTest(1.0), 2, 8, lr_scaling="linear")
    sched = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 0.5**s * c2.lr_factor)
    opt2.step()
    c2.update(norm_stats(2, V=8.0))    # ×4
    sched.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(1.0 * 0.5 * 4)


def test_no_lr_scaling_by_default():
    c = BatchSizeController(NormTest(1.0), 2, 8)
    c.update(norm_stats(2, V=8.0))
    assert c.batch_size == 8 and c.lr_factor == 1.0


def test_apply_lr_tensor_lr():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([p], lr=torch.tensor(0.01))
    lr = opt.param_groups[0]["lr"]
    c = BatchSizeController(NormTest(1.0), 2, 8, lr_scaling="sqrt")
    c.update(norm_stats(2, V=8.0))
    apply_lr(opt, [0.01], 1.0, c.lr_factor)
    assert opt.param_groups[0]["lr"] is lr  # filled in place
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.02)


def test_optimizer_is_no_longer_a_controller_argument():
    with pytest.raises(TypeError, match="optimizer"):
        BatchSizeController(NormTest(1.0), 2, 8, lr_scaling="linear",
                            optimizer=_optimizer())  # type: ignore[call-arg]


def test_state_of_an_older_version_loads():
    """A controller state written by a version that scaled the optimizer in place (the same
    keys; anything extra is ignored) restores batch size and factor."""
    c = BatchSizeController(NormTest(1.0), 2, 8, lr_scaling="linear")
    c.update(norm_stats(2, V=8.0))
    old = {**c.state_dict(), "optimizer_lrs": [0.4]}
    d = BatchSizeController(NormTest(1.0), 2, 8, lr_scaling="linear")
    d.load_state_dict(old)
    assert d.batch_size == 8 and d.lr_factor == 4.0


# --------------------------------------------------------------------------------------------
# state_dict: exact resume
# --------------------------------------------------------------------------------------------


def _stats_sequence(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        V = float(torch.rand((), generator=gen)) * 60.0
        G = 0.0 if float(torch.rand((), generator=gen)) < 0.3 else 1.0
        out.append((V, G))
    return out


def _drive(c, seq):
    for V, G in seq:
        c.update(norm_stats(c.batch_size, V, G) if c.wants_stats() else None)


def test_resume_midway_gives_identical_decisions():
    seq = _stats_sequence(30)
    make = lambda opt: BatchSizeController(  # noqa: E731
        NormTest(0.8), 4, 400, interval=2, granularity=4, lr_scaling="linear")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt_a = _optimizer()
        a = make(opt_a)
        _drive(a, seq)

        opt_b = _optimizer()
        b = make(opt_b)
        _drive(b, seq[:13])
        saved = pickle.loads(pickle.dumps((b.state_dict(), opt_b.state_dict())))
        opt_c = _optimizer()
        c = make(opt_c)
        c.load_state_dict(saved[0])
        opt_c.load_state_dict(saved[1])
        _drive(c, seq[13:])
    assert c.state_dict() == a.state_dict()
    assert c.history == a.history and c.warnings == a.warnings > 0
    assert c.lr_factor == a.lr_factor > 1
    assert a.batch_size > 4  # the scenario actually grew


def test_state_dict_is_a_copy():
    c = BatchSizeController(NormTest(1.0), 2, 8)
    c.update(norm_stats(2, V=1.0))
    state = c.state_dict()
    state["history"][0]["batch_size"] = 999
    assert c.history[0]["batch_size"] == 2


@pytest.mark.parametrize(
    "patch,match",
    [
        ({"batch_size": 6}, r"batch_size 6 is not a multiple of granularity \(4\)"),
        ({"batch_size": 400}, r"in \[initial, maximum\] = \[4, 40\]"),
        ({"step": -1}, r"state_dict step must be an int >= 0, got -1"),
        ({"lr_factor": math.nan}, r"lr_factor must be finite and > 0"),
        ({"config": {"type": "LinearSchedule"}}, r"saved by a LinearSchedule"),
    ],
)
def test_load_state_dict_validates_and_loses_nothing(patch, match):
    c = BatchSizeController(NormTest(1.0), 4, 40, granularity=4)
    c.update(norm_stats(4, V=10.0))
    before = copy.deepcopy(c.state_dict())
    bad = dict(before, **patch)
    with pytest.raises(ValueError, match=match):
        c.load_state_dict(bad)
    assert c.state_dict() == before


def test_load_state_dict_missing_keys():
    c = BatchSizeController(NormTest(1.0), 4, 40, granularity=4)
    with pytest.raises(ValueError, match=r"state_dict is missing keys \['samples'"):
        c.load_state_dict({"batch_size": 4, "step": 0})


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def test_validation_messages():
    t = NormTest(1.0)
    with pytest.raises(ValueError, match=r"initial \(10\) must be a multiple of granularity"
                                         r" \(4\)"):
        BatchSizeController(t, 10, 40, granularity=4)
    with pytest.raises(ValueError, match=r"maximum \(42\) must be a multiple of granularity"):
        BatchSizeController(t, 8, 42, granularity=4)
    with pytest.raises(ValueError, match=r"maximum \(4\) must be >= initial \(8\)"):
        BatchSizeController(t, 8, 4)
    with pytest.raises(ValueError, match=r"Invalid initial: 0 \(must be >= 1\)"):
        BatchSizeController(t, 0, 4)
    with pytest.raises(ValueError, match=r"Invalid interval: 0 \(must be >= 1\)"):
        BatchSizeController(t, 1, 4, interval=0)
    with pytest.raises(ValueError, match=r"Invalid granularity: 0"):
        BatchSizeController(t, 1, 4, granularity=0)
    with pytest.raises(TypeError, match=r"Invalid initial: 2.0 \(must be an int\)"):
        BatchSizeController(t, 2.0, 4)
    with pytest.raises(ValueError, match=r"Invalid lr_scaling: 'cubic'"):
        BatchSizeController(t, 1, 4, lr_scaling="cubic")
    assert BatchSizeController(t, 1, 4, lr_scaling="linear").lr_factor == 1.0  # no optimizer
    with pytest.raises(TypeError, match=r"test must be a BatchTest"):
        BatchSizeController(0.1, 1, 4)


# --------------------------------------------------------------------------------------------
# fixed schedules
# --------------------------------------------------------------------------------------------


def _run(policy, steps):
    sizes = []
    for _ in range(steps):
        sizes.append(policy.batch_size)
        assert not policy.wants_stats() and policy.needs == frozenset()
        policy.update(None)
    return sizes


def test_constant_schedule():
    c = ConstantSchedule(32)
    assert _run(c, 5) == [32] * 5 and c.samples == 160 and c.history == []


def test_linear_schedule_matches_authors_meaning():
    # +increment after every step, capped at maximum (AdAdaGrad's --linear_ramp_up)
    s = LinearSchedule(8, 40, 10)
    assert _run(s, 6) == [8, 18, 28, 38, 40, 40]
    # with an interval and granularity
    s = LinearSchedule(8, 64, 10, interval=2, granularity=8)
    assert _run(s, 8) == [8, 8, 24, 24, 32, 32, 40, 40]
    assert [r["new_batch_size"] for r in s.history] == [24, 32, 40, 48]


def test_stagewise_schedule_matches_authors_meaning():
    # stages of 100, 200 samples then the last size forever
    s = StagewiseSchedule([10, 20, 40], [100, 200, 999])
    sizes = _run(s, 25)
    # stage 0 ends once 100 samples are seen: after 10 steps of 10
    assert sizes[:11] == [10] * 10 + [20]
    # stage 1 ends once 300 samples are seen: 100 + 10 steps of 20
    assert sizes[10:21] == [20] * 10 + [40]
    assert set(sizes[20:]) == {40}
    # one int means equal stages
    s2 = StagewiseSchedule([10, 20, 40], 100)
    assert s2.stage_samples == [100, 100]
    # a step that crosses several cumulative budgets moves one stage only
    s3 = StagewiseSchedule([50, 60, 70], [10, 10])
    assert _run(s3, 3) == [50, 60, 70]


def test_stagewise_geometric():
    s = StagewiseSchedule.geometric(512, 60000, 1000, factor=2.0, granularity=16)
    assert s.batch_sizes[:7] == [512, 1024, 2048, 4096, 8192, 16384, 32768]
    assert s.batch_sizes[-1] == 60000 and all(b % 16 == 0 for b in s.batch_sizes)
    s = StagewiseSchedule.geometric(3, 10, 5, factor=1.5)
    assert s.batch_sizes == [3, 5, 8, 10]
    with pytest.raises(ValueError, match=r"Invalid factor: 1 \(must be finite and > 1\)"):
        StagewiseSchedule.geometric(3, 10, 5, factor=1)


def test_schedule_validation():
    with pytest.raises(ValueError, match=r"batch_sizes must be non-decreasing, got \[4, 2\]"):
        StagewiseSchedule([4, 2], [10])
    with pytest.raises(ValueError, match=r"stage_samples needs one budget per stage"):
        StagewiseSchedule([2, 4, 8], [10])
    with pytest.raises(ValueError, match=r"batch size \(6\) must be a multiple of granularity"):
        StagewiseSchedule([4, 6, 8], [10, 10], granularity=4)
    with pytest.raises(ValueError, match=r"batch_sizes must not be empty"):
        StagewiseSchedule([], 10)
    with pytest.raises(ValueError, match=r"Invalid increment: 0"):
        LinearSchedule(2, 8, 0)


def test_schedules_resume_and_scale_lr():
    opt = _optimizer(0.1)
    full = StagewiseSchedule([10, 20, 40], [30, 60], lr_scaling="linear")
    sizes = _run(full, 12)
    assert full.lr_factor == 4.0
    apply_lr(opt, [0.1, 0.2], 1.0, full.lr_factor)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.4)
    half = StagewiseSchedule([10, 20, 40], [30, 60])
    first = _run(half, 5)
    resumed = StagewiseSchedule([10, 20, 40], [30, 60])
    resumed.load_state_dict(pickle.loads(pickle.dumps(half.state_dict())))
    assert first + _run(resumed, 7) == sizes
    with pytest.raises(ValueError, match=r"state_dict stage must be an int in \[0, 3\)"):
        resumed.load_state_dict(dict(resumed.state_dict(), stage=7))

    lin = LinearSchedule(4, 40, 4)
    a = _run(lin, 3)
    lin2 = LinearSchedule(4, 40, 4)
    lin2.load_state_dict(lin.state_dict())
    assert a + _run(lin2, 4) == _run(LinearSchedule(4, 40, 4), 7)


def test_exports():
    import adabatch.batching as B

    assert B.BatchSizeController is BatchSizeController
    assert B.ConstantSchedule is ConstantSchedule
    assert B.LinearSchedule is LinearSchedule
    assert B.StagewiseSchedule is StagewiseSchedule
    assert B.apply_lr is apply_lr


def test_fractional_requirement_from_a_custom_test_rounds_up():
    class Frac(NormTest):
        def __call__(self, stats):
            return 16.2

    c = BatchSizeController(Frac(1.0), 4, 64, granularity=4)
    assert c.update(norm_stats(4, V=1.0)) == 20
    c = BatchSizeController(Frac(1.0), 1, 64)
    assert c.update(norm_stats(1, V=1.0)) == 17
